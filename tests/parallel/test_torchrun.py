"""Under torchrun every process joins the launch and gets the result (2 gloo processes on the CPU)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
from difforge_sdk.parity import assert_close

import difforge


def test_torchrun_joins_the_launch(qwen_folder: Path, tmp_path: Path) -> None:
    script = Path(__file__).with_name("torchrun_worker.py")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), str(qwen_folder), str(tmp_path / "out")]  # fmt: skip
    # its own session: on a timeout the launcher and both workers are killed together
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError("torchrun did not finish in 240 s:\n" + output[-3000:]) from None
    done = subprocess.CompletedProcess(cmd, proc.returncode, output, "")
    assert done.returncode == 0, done.stdout[-3000:]
    ranks = [torch.load(tmp_path / f"out.{r}.pt") for r in range(2)]
    ref = difforge.Pipeline.from_pretrained("qwen-image", qwen_folder, device="cpu")
    call = dict(prompt=["a cat", "a dog holding a big red sign"], height=32, width=48, num_inference_steps=2,
                output_type="pt", progress_bar_cmd=lambda it, **_: it)  # fmt: skip
    expected = ref(**call, seed=0)
    for r, out in enumerate(ranks):  # the result on every rank
        assert_close(out["seeded"], expected, atol=1e-4, name=f"torchrun rank {r} vs one process")
    assert torch.equal(ranks[0]["unseeded"], ranks[1]["unseeded"])

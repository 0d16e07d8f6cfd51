"""Whole tiny pipelines on 2 CPU processes (gloo) against the same pipeline in one process (1e-4).

One spawn per layout and family, shared by several checks (spawning 2 workers costs seconds):

- ``cfg_parallel=2``: with ``cfg_scale > 1`` the two ranks compute the two CFG branches; with
  ``cfg_scale=1`` the two ranks shard the DiT's tokens instead (Ulysses over both ranks);
- ``ulysses_degree=2``: Flux; Wan with disk offload; Qwen-Image with prompts of different lengths (a key padding mask), an odd token
  count (padding), First Block Cache at threshold 0 and at a threshold that skips;
- Wan exchanges Ulysses shards with gloo's ``all_gather`` fallback, the others with ``all_to_all``;
- a worker's exception surfaces in the parent, a dead worker stops everything without a hang, and
  ``close()`` leaves no live process.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from difforge_sdk.parity import assert_close

import difforge
from difforge import ConfigError
from difforge.parallel import ParallelPipeline, ParallelWorkerError

ATOL = 1e-4
QUIET = dict(progress_bar_cmd=lambda it, **_: it)

CALLS: dict[str, dict[str, Any]] = {
    # 3x3 image tokens and 15 T5 tokens: both streams need padding for 2 ranks
    "flux": dict(prompt="a cat holding a sign", negative_prompt="blurry", seed=0, height=48, width=48,
                 num_inference_steps=2, max_sequence_length=15, cfg_scale=2.5),
    "qwen-image": dict(prompt="a cat holding a sign", seed=0, height=32, width=48, num_inference_steps=2, cfg_scale=4.0),
    # one latent frame of 3x3 tokens: an odd sequence
    "wan": dict(prompt="a cat holding a sign", seed=0, height=48, width=48, num_frames=1, num_inference_steps=2,
                max_sequence_length=16, cfg_scale=5.0),
}  # fmt: skip


def run(pipe: Any, **kw: Any) -> torch.Tensor:
    call = {**kw, "output_type": "pt"}
    if isinstance(pipe, difforge.Pipeline):
        call.update(QUIET)
    return pipe(**call)


def no_live_workers(pipe: ParallelPipeline) -> bool:
    deadline = time.monotonic() + 10
    while any(p.is_alive() for p in pipe.processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(p.is_alive() for p in pipe.processes)


@pytest.fixture(scope="module")
def folders(request: pytest.FixtureRequest) -> dict[str, Path]:
    return {
        "flux": request.getfixturevalue("flux_folder"),
        "qwen-image": request.getfixturevalue("qwen_folder"),
        "wan": request.getfixturevalue("wan_folder"),
    }


@pytest.fixture(scope="module")
def references(folders: dict[str, Path]) -> dict[str, difforge.Pipeline]:
    return {name: difforge.Pipeline.from_pretrained(name, folder, device="cpu") for name, folder in folders.items()}


@pytest.fixture(scope="module", params=["flux", "qwen-image", "wan"])
def cfg_pipe(request: pytest.FixtureRequest, folders: dict[str, Path]) -> Iterator[tuple[str, ParallelPipeline]]:
    name = request.param
    env = {"DIFFORGE_ULYSSES_EXCHANGE": "all_gather"} if name == "wan" else {}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the spawned workers inherit it
    try:
        pipe = difforge.Pipeline.from_pretrained(name, folders[name], device="cpu", cfg_parallel=2)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    yield name, pipe
    pipe.close()
    assert no_live_workers(pipe)


def test_cfg_parallel_and_wide_ulysses(cfg_pipe: tuple[str, ParallelPipeline], references: dict[str, Any]) -> None:
    name, pipe = cfg_pipe
    assert isinstance(pipe, ParallelPipeline) and pipe.layout.cfg == 2 and pipe.layout.ulysses == 1
    ref = references[name]
    call = CALLS[name]
    # CFG parallel: rank 0 the conditional branch, rank 1 the unconditional one
    assert_close(run(pipe, **call), run(ref, **call), atol=ATOL, name=f"{name} cfg_parallel=2 vs one process")
    # without CFG the two ranks shard the sequence (Ulysses 2 over the CFG group)
    no_cfg = {**call, "cfg_scale": 1.0}
    out = run(pipe, **no_cfg)
    expected = run(ref, **no_cfg)
    assert_close(out, expected, atol=ATOL, name=f"{name} cfg_scale=1 on 2 ranks vs one process")
    assert not torch.equal(out, run(ref, **call))  # guidance changes the output: the comparison can fail


def test_ulysses_with_key_mask_and_cache(folders: dict[str, Path], references: dict[str, Any]) -> None:
    ref = references["qwen-image"]
    # two prompts of different lengths: the shorter one's padded text keys are masked
    call = {**CALLS["qwen-image"], "prompt": ["a cat", "a dog holding a big red sign on a sunny beach"]}
    with difforge.Pipeline.from_pretrained("qwen-image", folders["qwen-image"], device="cpu", ulysses_degree=2) as pipe:
        assert pipe.layout.ulysses == 2
        assert_close(run(pipe, **call), run(ref, **call), atol=ATOL, name="qwen-image ulysses=2 vs one process")

        exact = {"name": "fbcache", "threshold": 0.0}
        pipe.set_cache(exact)
        ref.set_cache(exact)
        try:
            long = {**call, "num_inference_steps": 4}
            assert_close(run(pipe, **long), run(ref, **long), atol=ATOL, name="ulysses=2 + fbcache threshold 0")
            (stats,), (ref_stats,) = pipe.cache_stats(), ref.cache_stats()
            assert stats["steps_cached"] == 0
            # the statistic each rank decides from is the whole sequence's (summed over the ranks)
            for branch in ("cond", "uncond"):
                changes, expected = stats["branches"][branch]["changes"], ref_stats["branches"][branch]["changes"]
                assert changes.keys() == expected.keys() and len(changes) >= 2
                assert all(abs(changes[k] - expected[k]) <= 1e-4 * abs(expected[k]) for k in expected), (changes, expected)

            # a threshold that skips: every rank decides from the whole sequence, as one process does
            skipping = {"name": "fbcache", "threshold": 10.0}
            pipe.set_cache(skipping)
            ref.set_cache(skipping)
            assert_close(run(pipe, **long), run(ref, **long), atol=ATOL, name="ulysses=2 + fbcache skipping")
            (stats,), (ref_stats,) = pipe.cache_stats(), ref.cache_stats()
            assert stats["steps_cached"] == ref_stats["steps_cached"] > 0
        finally:
            ref.set_cache(None)
    assert pipe.closed and no_live_workers(pipe)


def test_ulysses_wan_with_disk_offload(folders: dict[str, Path], references: dict[str, Any]) -> None:
    # each rank streams its own copy of the weights from the checkpoint files; CFG runs both branches per rank
    with difforge.Pipeline.from_pretrained("wan", folders["wan"], device="cpu", ulysses_degree=2, offload="disk") as pipe:
        call = CALLS["wan"]
        assert_close(run(pipe, **call), run(references["wan"], **call), atol=ATOL, name="wan ulysses=2 + disk offload")
    assert no_live_workers(pipe)


def test_worker_errors_and_lifecycle(folders: dict[str, Path], references: dict[str, Any]) -> None:
    pipe = difforge.Pipeline.from_pretrained("flux", folders["flux"], device="cpu", ulysses_degree=2)
    try:
        # Ulysses 2 (padded text and image streams), CFG on both branches in turn
        call = CALLS["flux"]
        assert_close(run(pipe, **call), run(references["flux"], **call), atol=ATOL, name="flux ulysses=2 vs one process")
        # a DifforgeError keeps its class; the worker's traceback comes along
        with pytest.raises(ConfigError, match="height must be a positive multiple of 16") as info:
            pipe(prompt="a cat", height=40, width=32, num_inference_steps=1)
        assert "parallel worker rank" in str(info.value) and "Traceback" in str(info.value)
        # any other exception becomes a ParallelWorkerError naming it
        with pytest.raises(ParallelWorkerError, match="AttributeError"):
            pipe(prompt="a cat", latents="not a tensor")
        # what cannot cross a process boundary is refused in the parent
        with pytest.raises(ConfigError, match="cannot be sent to the worker processes"):
            pipe(prompt="a cat", callback=lambda *a: None)
        # errors raised identically on every rank leave the pipeline usable
        out = pipe(prompt="a cat", seed=0, height=32, width=32, num_inference_steps=1, output_type="pt")
        assert out.shape == (1, 3, 32, 32)

        os.kill(pipe.processes[1].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ParallelWorkerError, match="rank 1 died"):
            pipe(prompt="a cat", seed=0, height=32, width=32, num_inference_steps=1)
        assert time.monotonic() - start < 60
        assert pipe.closed and no_live_workers(pipe)
        with pytest.raises(ParallelWorkerError, match="closed"):
            pipe(prompt="a cat")
    finally:
        pipe.close()
    assert no_live_workers(pipe)

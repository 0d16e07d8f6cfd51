"""Run by test_torchrun.py under ``torchrun --nproc_per_node 2``: joins the launch with
``parallelism=2`` and writes each rank's outputs for the test to compare."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import difforge
from difforge.plugins import PluginSettings


def main(folder: str, out: str) -> None:
    import difforge_cache
    import difforge_flux
    import difforge_qwen_image
    import difforge_text_encoders
    import difforge_wan

    torch.set_num_threads(1)
    plugins = [difforge_text_encoders, difforge_flux, difforge_wan, difforge_qwen_image, difforge_cache]
    difforge.reload_plugins(PluginSettings(autoload=False), plugins=plugins)
    pipe = difforge.Pipeline.from_pretrained("qwen-image", folder, device="cpu", parallelism=2, ulysses_degree=2)
    assert isinstance(pipe, difforge.Pipeline) and pipe.parallel_state is not None
    call = dict(prompt=["a cat", "a dog holding a big red sign"], height=32, width=48, num_inference_steps=2,
                output_type="pt", progress_bar_cmd=lambda it, **_: it)  # fmt: skip
    seeded = pipe(**call, seed=0)
    unseeded = pipe(**call)  # the seed is drawn on rank 0 and shared
    rank = pipe.parallel_state.rank
    torch.save({"seeded": seeded, "unseeded": unseeded}, f"{out}.{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

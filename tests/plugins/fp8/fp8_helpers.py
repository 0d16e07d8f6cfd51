"""Shared helpers of the difforge-fp8 tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import difforge
from difforge_sdk.toy.models import ToyDiTConfig

CALL = {"prompt": "a red cube", "seed": 3, "num_inference_steps": 3, "output_type": "latent", "progress_bar_cmd": lambda x: x}
DIT = ToyDiTConfig(depth=3)
TOLERANCE = 1e-2
"""Stated accuracy of fp8 storage on the toy pipeline: relative L2 error of the final latents
(3 steps, fp32 compute) below 1%. Measured: about 0.2% (fp8 e4m3), 0.1% (fp8-scaled), 0.25% (e5m2)."""


def build(checkpoints: list[Path], offload: Any = None) -> difforge.Pipeline:
    return difforge.Pipeline.from_pretrained("toy", checkpoints, device="cpu", offload=offload)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def remove_all(pipe: difforge.Pipeline) -> None:
    """Take the offload handles off in reverse order (location first, then dtype)."""
    for handle in reversed(pipe._offload_handles):
        handle.remove()
    pipe._offload_handles.clear()


def assert_state_equal(pipe: difforge.Pipeline, states: dict[str, dict[str, torch.Tensor]]) -> None:
    for slot, module in pipe.models().items():
        got = module.state_dict()
        assert got.keys() == states[slot].keys()
        for key, value in got.items():
            want = states[slot][key]
            assert value.dtype == want.dtype and value.device == want.device and torch.equal(value, want), (slot, key)

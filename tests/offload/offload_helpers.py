"""Shared helpers of the offload tests: the call every backend must reproduce, pipeline building,
and the check that ``remove()`` put every tensor back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import difforge
from difforge_sdk.toy.models import ToyDiTConfig

CALL = {"prompt": "a red cube", "seed": 3, "num_inference_steps": 3, "output_type": "latent", "progress_bar_cmd": lambda x: x}
DIT = ToyDiTConfig(depth=3)


def build(checkpoints: list[Path], offload: Any = None) -> difforge.Pipeline:
    return difforge.Pipeline.from_pretrained("toy", checkpoints, device="cpu", offload=offload)


def assert_state_equal(pipe: difforge.Pipeline, states: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every tensor of every component is back: same device, dtype, and bits."""
    for slot, module in pipe.models().items():
        got = module.state_dict()
        assert got.keys() == states[slot].keys()
        for key, value in got.items():
            want = states[slot][key]
            assert value.device == want.device and value.dtype == want.dtype, (slot, key)
            assert torch.equal(value, want), (slot, key)

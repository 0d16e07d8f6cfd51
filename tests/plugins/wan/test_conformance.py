"""difforge-wan passes the SDK's model conformance suite (wan-dit, wan-vae)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from difforge_sdk.testing import ModelConformance
from difforge_wan.dit import WanDiTConfig
from difforge_wan.vae import WanVAEConfig


class WanConformance(ModelConformance):
    @pytest.fixture(autouse=True)
    def wan_registry(self) -> Iterator[None]:
        """This folder's conftest isolates difforge-wan; the suite wants every installed plugin."""
        yield


class TestWanDiT(WanConformance):
    model = "wan-dit"
    # one head of 32: the head count is not in the shapes, and inference takes the widest head dividing dim
    tiny_config = WanDiTConfig(dim=32, num_heads=1, ffn_dim=40, freq_dim=32, text_dim=24, num_layers=2)

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        c = model.config
        return {"x": torch.randn(2, c.in_dim, 2, 4, 4), "timestep": torch.tensor([250.0, 900.0]),
                "context": torch.randn(2, 5, c.text_dim)}  # fmt: skip


class TestWanVAE(WanConformance):
    model = "wan-vae"
    tiny_config = WanVAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    method = "decode"
    # some twenty random 3x3x3 convolutions in a row: e4m3 weights (3 mantissa bits) drift about 10%
    dtype_offload_tolerance = 0.15

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        return {"latents": torch.randn(1, model.config.z_dim, 2, 2, 2)}

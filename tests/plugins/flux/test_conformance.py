"""difforge-flux passes the SDK's model conformance suite (flux-dit, flux-ae)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from difforge_sdk import tiny
from difforge_sdk.testing import ModelConformance


class FluxConformance(ModelConformance):
    @pytest.fixture(autouse=True)
    def flux_registry(self) -> Iterator[None]:
        """This folder's conftest isolates difforge-flux; the suite wants every installed plugin."""
        yield


class TestFluxDiT(FluxConformance):
    model = "flux-dit"
    tiny_config = tiny.tiny_config("flux-dit")  # hidden 64, 4 heads, 1 double + 2 single blocks, guidance embedding

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        c, (h, w), text = model.config, (4, 6), 7
        img_ids = torch.zeros(h * w, 3)
        img_ids[:, 1], img_ids[:, 2] = torch.arange(h * w) // w, torch.arange(h * w) % w
        return {
            "img": torch.randn(2, h * w, c.in_channels), "img_ids": img_ids,
            "txt": torch.randn(2, text, c.context_in_dim), "txt_ids": torch.zeros(text, 3),
            "timesteps": torch.tensor([0.25, 0.9]), "y": torch.randn(2, c.vec_in_dim), "guidance": torch.full((2,), 3.5),
        }


class TestFluxAE(FluxConformance):
    model = "flux-ae"
    tiny_config = tiny.tiny_config("flux-ae")  # ch 8, 4 levels, 16 latent channels
    method = "decode"

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        return {"latents": torch.randn(1, model.config.z_channels, 4, 6)}

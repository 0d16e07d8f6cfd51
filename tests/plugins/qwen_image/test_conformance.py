"""difforge-qwen-image passes the SDK's model conformance suite (qwen-image-dit; its VAE is difforge-wan's
wan-vae, which tests/plugins/wan/test_conformance.py covers)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from difforge_sdk import tiny
from difforge_sdk.testing import ModelConformance


class TestQwenImageDiT(ModelConformance):
    model = "qwen-image-dit"
    tiny_config = tiny.tiny_config("qwen-image-dit")  # hidden 32, 2 heads x 16, 2 blocks, text dim 32

    @pytest.fixture(autouse=True)
    def qwen_registry(self) -> Iterator[None]:
        """This folder's conftest isolates difforge-qwen-image; the suite wants every installed plugin."""
        yield

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        c, (h, w) = model.config, (4, 6)
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[1, 4:] = False  # two prompts of different lengths: the masked attention path
        return {"img": torch.randn(2, h * w, c.in_channels), "txt": torch.randn(2, 7, c.text_dim),
                "timesteps": torch.tensor([0.25, 0.9]), "grid": (h, w), "txt_mask": mask}  # fmt: skip

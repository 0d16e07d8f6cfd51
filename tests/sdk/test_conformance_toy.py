"""The SDK's toy family passes the model conformance suite (and shows how a family opts in)."""

from __future__ import annotations

from typing import Any

import torch

import difforge_sdk.toy
from difforge_sdk import tiny
from difforge_sdk.testing import ModelConformance


class TestToyDiT(ModelConformance):
    model = "toy-dit"
    tiny_config = tiny.tiny_config("toy-dit")
    plugins = [difforge_sdk.toy]  # the toy family is not installed through an entry point

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        c = model.config
        return {"latents": torch.randn(2, c.in_channels, 8, 8), "timestep": torch.tensor([250.0, 900.0]),
                "text": torch.randn(2, 5, c.text_dim)}


class TestToyVAE(ModelConformance):
    model = "toy-vae"
    tiny_config = tiny.tiny_config("toy-vae")
    plugins = [difforge_sdk.toy]
    method = "decode"

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        return {"latents": torch.randn(1, model.config.latent_channels, 4, 4)}


class TestToyTextEncoder(ModelConformance):
    model = "toy-text-encoder"
    tiny_config = tiny.tiny_config("toy-text-encoder")
    plugins = [difforge_sdk.toy]

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        return {"input_ids": model.tokenize(["a red fox", "a cat"])}

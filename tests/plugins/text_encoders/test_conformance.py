"""difforge-text-encoders passes the SDK's model conformance suite (every text encoder)."""

from __future__ import annotations

from typing import Any

import torch

from difforge_sdk import tiny
from difforge_sdk.testing import ModelConformance


def _ids(model: torch.nn.Module, batch: int = 2, length: int = 9) -> dict[str, Any]:
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    mask = (torch.arange(length) < torch.tensor([length, 5])[:batch, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


class TestCLIPText(ModelConformance):
    model = "clip-text"
    tiny_config = tiny.tiny_config("clip-text")

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        return _ids(model)


class TestT5Encoder(ModelConformance):
    model = "t5-encoder"
    tiny_config = tiny.tiny_config("t5-encoder")
    dtype_offload_tolerance = 0.2  # fp8 through gated-GELU FFNs on random weights: measured 0.10-0.11

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        return _ids(model)


class TestUMT5Encoder(ModelConformance):
    model = "umt5-encoder"
    tiny_config = tiny.tiny_config("umt5-encoder")
    dtype_offload_tolerance = 0.2  # as T5: measured 0.10-0.13

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        return _ids(model)


class TestQwen25VLText(ModelConformance):
    model = "qwen2.5-vl-text"
    tiny_config = tiny.tiny_config("qwen2.5-vl-text")

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        return _ids(model)

"""The toy text-to-image pipeline: the whole family part of a difforge pipeline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from difforge import Pipeline


class ToyPipeline(Pipeline):
    spatial_multiple = 16
    defaults = {"num_inference_steps": 4, "height": 32, "width": 32, "cfg_scale": 1.0}

    def encode_prompt(self, prompt: Sequence[str], **kw: Any) -> dict[str, torch.Tensor]:
        ids = self.text_encoder.tokenize(prompt).to(self.device)
        return {"text": self.text_encoder(ids)}

    def latent_shape(self, batch: int, height: int, width: int, **kw: Any) -> tuple[int, ...]:
        return (batch, self.dit.config.in_channels, height // 8, width // 8)

    def image_seq_len(self, shape: Sequence[int]) -> int:
        p = self.dit.config.patch_size
        return (shape[-2] // p) * (shape[-1] // p)

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor], **kw: Any) -> torch.Tensor:
        t = timestep.expand(latents.shape[0]).to(latents.dtype)
        return self.dit(latents, t, cond["text"].to(latents.dtype))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image)

    def decode(self, latents: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self.vae.decode(latents)

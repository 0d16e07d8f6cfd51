"""The FLUX.1 pipeline: text-to-image and image-to-image.

Only what is Flux's own lives here (prompt encoding with CLIP + T5, 2x2 latent packing, position
ids, distilled guidance, tiled AE decoding); the loop, CFG, seeds and outputs are the runtime's.
Prompt handling follows diffusers' ``FluxPipeline`` to the token: CLIP's pooled output at 77
tokens, T5 at ``max_sequence_length`` (512) tokens, both padded to their maximum length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from difforge import ConfigError, Pipeline


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H/2 * W/2, C * 4]``: 2x2 patches as tokens (row-major)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height`` x ``width``."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """``[H/2 * W/2, 3]`` position ids of the packed tokens of a ``height`` x ``width`` latent: (0, row, col)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def _blend_mask(h: int, w: int, overlap_h: int, overlap_w: int, device: torch.device) -> torch.Tensor:
    """Weights that ramp up linearly over the overlaps, so tiles blend without seams."""

    def ramp(n: int, overlap: int) -> torch.Tensor:
        r = torch.ones(n, device=device)
        if overlap > 0:
            edge = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
            r[:overlap] = torch.minimum(r[:overlap], edge)
            r[-overlap:] = torch.minimum(r[-overlap:], edge.flip(0))
        return r

    return ramp(h, overlap_h)[:, None] * ramp(w, overlap_w)[None, :]


def tiled_decode(decode: Any, latents: torch.Tensor, tile_size: int, tile_stride: int, scale: int) -> torch.Tensor:
    """Decode ``latents`` in overlapping ``tile_size`` tiles (latent pixels) every ``tile_stride``,
    blended linearly in the overlaps: memory grows with the tile, not the image."""
    if tile_stride <= 0 or tile_stride > tile_size:
        raise ConfigError(f"tile_stride must be in (0, tile_size]; got tile_size {tile_size}, tile_stride {tile_stride}")
    b, _, h, w = latents.shape
    if h <= tile_size and w <= tile_size:
        return decode(latents)

    def starts(n: int) -> list[int]:
        if n <= tile_size:
            return [0]
        s = list(range(0, n - tile_size, tile_stride))
        return s + [n - tile_size]

    out = weight = None
    for y in starts(h):
        for x in starts(w):
            tile = decode(latents[:, :, y : y + tile_size, x : x + tile_size]).float()
            th, tw = tile.shape[-2:]
            overlap = (tile_size - tile_stride) * scale
            mask = _blend_mask(th, tw, overlap if h > tile_size else 0, overlap if w > tile_size else 0, tile.device)
            if out is None:
                out = torch.zeros(b, tile.shape[1], h * scale, w * scale, device=tile.device)
                weight = torch.zeros(1, 1, h * scale, w * scale, device=tile.device)
            out[:, :, y * scale : y * scale + th, x * scale : x * scale + tw] += tile * mask
            weight[:, :, y * scale : y * scale + th, x * scale : x * scale + tw] += mask
    return (out / weight).to(latents.dtype)


class FluxPipeline(Pipeline):
    """FLUX.1 dev / schnell and fine-tunes.

    Call arguments beyond the runtime's: ``embedded_guidance`` (the distilled guidance of dev-like
    models, default 3.5; ignored by schnell-like models), ``max_sequence_length`` (T5 tokens, 512),
    ``tiled`` / ``tile_size`` / ``tile_stride`` (AE decoding in latent tiles: 64 / 32 latent pixels).
    """

    spatial_multiple = 16

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        schnell_like = not self.dit.config.guidance_embed
        return {
            "num_inference_steps": 4 if schnell_like else 28,
            "height": 1024,
            "width": 1024,
            "cfg_scale": 1.0,
            "embedded_guidance": 3.5,
            "max_sequence_length": 256 if self.variant == "FLUX.1-schnell" else 512,
            "tiled": False,
            "tile_size": 64,
            "tile_stride": 32,
        }

    def check_call(self, kw: dict[str, Any]) -> None:
        if kw.get("tiled") and not (0 < int(kw["tile_stride"]) <= int(kw["tile_size"])):
            raise ConfigError(f"tile_stride must be in (0, tile_size], got {kw['tile_stride']} and {kw['tile_size']}")
        if not 0 < int(kw.get("max_sequence_length", 512)) <= 512:
            raise ConfigError(f"max_sequence_length must be in 1..512, got {kw.get('max_sequence_length')}")

    # -- the family's part

    def encode_prompt(self, prompt: Sequence[str], max_sequence_length: int = 512, **kw: Any) -> dict[str, torch.Tensor]:
        from difforge_text_encoders.prompts import clip_pooled, t5_embeddings

        pooled = clip_pooled(self.tokenizer, self.text_encoder, prompt, device=self.device)
        t5 = t5_embeddings(self.tokenizer_2, self.text_encoder_2, prompt, max_length=max_sequence_length, device=self.device)
        return {"txt": t5.to(self.torch_dtype), "y": pooled.to(self.torch_dtype)}

    def latent_shape(self, batch: int, height: int, width: int, **kw: Any) -> tuple[int, ...]:
        return (batch, self.dit.config.in_channels // 4, height // 8, width // 8)

    def image_seq_len(self, shape: Sequence[int]) -> int:
        return (shape[-2] // 2) * (shape[-1] // 2)

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        embedded_guidance: float = 3.5,
        **kw: Any,
    ) -> torch.Tensor:
        b, _, h, w = latents.shape
        txt = cond["txt"]
        guidance = None
        if self.dit.config.guidance_embed:
            guidance = torch.full((b,), float(embedded_guidance), device=latents.device, dtype=torch.float32)
        velocity = self.dit(
            img=pack_latents(latents),
            img_ids=image_ids(h, w, latents.device),
            txt=txt.expand(b, -1, -1) if txt.shape[0] != b else txt,
            txt_ids=torch.zeros(txt.shape[1], 3, device=latents.device),
            timesteps=(timestep / 1000).expand(b).to(latents.dtype),
            y=cond["y"].expand(b, -1) if cond["y"].shape[0] != b else cond["y"],
            guidance=guidance,
        )
        return unpack_latents(velocity, h, w)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image)

    def decode(self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 64, tile_stride: int = 32, **kw: Any) -> torch.Tensor:
        if tiled:
            return tiled_decode(self.vae.decode, latents, int(tile_size), int(tile_stride), self.vae.downscale)
        return self.vae.decode(latents)

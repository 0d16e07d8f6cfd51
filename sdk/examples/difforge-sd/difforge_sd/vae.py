"""Stable Diffusion's autoencoder (diffusers' ``AutoencoderKL``), in diffusers' key layout.

4 latent channels, 8x downscaling, ``quant_conv`` / ``post_quant_conv``. SD 1.x and SDXL share the
architecture; only the latent scaling factor differs (0.18215 / 0.13025), which the weights do not
carry: the pipelines apply it (:data:`difforge_sd.pipeline.SCALING_FACTORS`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difforge.ops import attention

from .unet import ResnetBlock

__all__ = ["SDVAEConfig", "SDVAE", "SD_VAE", "vae_config_from_shapes", "vae_config_from_json"]

Shapes = Mapping[str, Sequence[int]]
_EPS = 1e-6


@dataclass(frozen=True)
class SDVAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32


SD_VAE = SDVAEConfig()
"""The released SD 1.x / SDXL autoencoder."""


class VAEAttention(nn.Module):
    """Single-head self-attention over pixels with a group norm and a residual (the mid block's)."""

    def __init__(self, dim: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, dim, eps=_EPS)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (p(t)[:, None] for p in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](attention(q, k, v)[:, 0])
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class VAEMidBlock(nn.Module):
    def __init__(self, dim: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(dim, dim, None, groups, _EPS), ResnetBlock(dim, dim, None, groups, _EPS)])
        self.attentions = nn.ModuleList([VAEAttention(dim, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Conv(nn.Module):
    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=stride, padding=0 if stride == 2 else 1)


class EncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, None, groups, _EPS) for i in range(layers))
        if downsample:
            self.downsamplers = nn.ModuleList([_Conv(cout, 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if "downsamplers" in self._modules:
            x = self.downsamplers[0].conv(F.pad(x, (0, 1, 0, 1)))
        return x


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, None, groups, _EPS) for i in range(layers))
        if upsample:
            self.upsamplers = nn.ModuleList([_Conv(cout, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if "upsamplers" in self._modules:
            x = self.upsamplers[0].conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    def __init__(self, c: SDVAEConfig) -> None:
        super().__init__()
        ch, g, n = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, i < n - 1) for i in range(n)
        )
        self.mid_block = VAEMidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, c: SDVAEConfig) -> None:
        super().__init__()
        ch, g, n = c.block_out_channels[::-1], c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g, i < n - 1) for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class SDVAE(nn.Module):
    """``encode(image) -> latent mean`` (unscaled), ``decode(latents) -> image`` in [-1, 1] (unscaled
    latents in; the pipeline divides by its scaling factor first)."""

    downscale = 8

    def __init__(self, config: SDVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode_moments(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent distribution's mean and log-variance."""
        mean, logvar = self.quant_conv(self.encoder(image)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.encode_moments(image)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents)


# ---------------------------------------------------------------- config inference

_OWN = re.compile(r"^((en|de)coder\.|quant_conv\.|post_quant_conv\.)")


def _count(shapes: Shapes, prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def vae_config_from_shapes(shapes: Shapes) -> SDVAEConfig | None:
    """diffusers-layout ``AutoencoderKL`` weights with quant convs -> config (32 groups assumed)."""
    need = ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "encoder.mid_block.attentions.0.to_q.weight")
    if any(k not in shapes for k in need) or not all(_OWN.match(k) for k in shapes):
        return None
    n = _count(shapes, "encoder.down_blocks.")
    if not n:
        return None
    return SDVAEConfig(
        in_channels=int(shapes["encoder.conv_in.weight"][1]),
        out_channels=int(shapes["decoder.conv_out.weight"][0]),
        block_out_channels=tuple(int(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0]) for i in range(n)),
        layers_per_block=_count(shapes, "encoder.down_blocks.0.resnets."),
        latent_channels=int(shapes["post_quant_conv.weight"][0]),
    )


def vae_config_from_json(config: Mapping[str, Any], shapes: Shapes) -> SDVAEConfig | None:
    inferred = vae_config_from_shapes(shapes)
    if inferred is None or config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        return None
    return SDVAEConfig(**{**inferred.__dict__, "norm_num_groups": int(config.get("norm_num_groups", 32))})

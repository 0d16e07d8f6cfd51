"""The FLUX.1 autoencoder (AE), in its own (BFL ``ae.safetensors``) checkpoint layout.

A KL autoencoder with 16 latent channels: images in [-1, 1] ``[B, 3, H, W]`` <-> latents
``[B, 16, H/8, W/8]``. :meth:`FluxAE.encode` returns latents already shifted and scaled for the
DiT, :meth:`FluxAE.decode` undoes that. The mid-block attention goes through
:func:`difforge.ops.attention`; its q/k/v/out projections are 1x1 convolutions, as BFL stores them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difforge.errors import ConfigError
from difforge.ops import attention

Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class FluxAEConfig:
    """The architecture of the Flux AE (BFL's ``AutoEncoderParams``); the defaults are the released one's.

    ``ch_mult`` gives each level's width as a multiple of ``ch``; every level but the last halves the
    resolution (4 levels: 8x). ``norm_groups`` is 32 in the release; tiny test models use fewer.
    BFL's ``resolution`` parameter is left out: it changes nothing the model computes.
    """

    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32


FLUX1_AE = FluxAEConfig()


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


def conv3x3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """Two (group norm, SiLU, 3x3 conv) steps plus the input (through a 1x1 conv when widths differ)."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = conv3x3(cin, cout)
        self.norm2 = group_norm(cout, groups)
        self.conv2 = conv3x3(cout, cout)
        self.nin_shortcut = nn.Conv2d(cin, cout, kernel_size=1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (proj(hn).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))  # [B, 1, HW, C]
        out = attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnet blocks, then a resampler (absent at the last level of each path)."""

    def __init__(self, cin: int, cout: int, count: int, groups: int, resample: type[nn.Module] | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(count))
        if resample is Downsample:
            self.downsample = Downsample(cout)
        elif resample is Upsample:
            self.upsample = Upsample(cout)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image -> the mean and log-variance ``[B, 2 * z_channels, H/8, W/8]`` of the latent."""

    def __init__(self, config: FluxAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        last = len(widths) - 1
        self.conv_in = conv3x3(config.in_channels, config.ch)
        inputs = [config.ch] + widths[:-1]
        self.down = nn.ModuleList(
            Level(inputs[i], widths[i], config.num_res_blocks, config.norm_groups, Downsample if i < last else None)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1], config.norm_groups)
        self.norm_out = group_norm(widths[-1], config.norm_groups)
        self.conv_out = conv3x3(widths[-1], 2 * config.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` -> image. ``up[i]`` is the level at ``widths[i]``; they run from the last."""

    def __init__(self, config: FluxAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = conv3x3(config.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1], config.norm_groups)
        inputs = widths[1:] + [widths[-1]]  # each level takes the output of the wider one run before it
        self.up = nn.ModuleList(
            Level(inputs[i], widths[i], config.num_res_blocks + 1, config.norm_groups, Upsample if i > 0 else None)
            for i in range(len(widths))
        )
        self.norm_out = group_norm(widths[0], config.norm_groups)
        self.conv_out = conv3x3(widths[0], config.out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FluxAE(nn.Module):
    """The Flux autoencoder; its ``state_dict`` is BFL's ``ae.safetensors`` layout."""

    def __init__(self, config: FluxAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        if any(w % config.norm_groups for w in widths):
            raise ConfigError(f"FluxAEConfig: widths {widths} must be multiples of norm_groups {config.norm_groups}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side (8 for the released AE)."""
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image ``[B, 3, H, W]`` in [-1, 1] -> latent ``[B, z_channels, H/8, W/8]``, shifted and scaled for the DiT.

        Without ``generator`` the latent is the mean of the encoded distribution (deterministic).
        With one, it is a sample ``mean + std * noise``, the noise drawn from ``generator`` as
        diffusers' ``DiagonalGaussianDistribution.sample`` draws it (one ``randn`` of the latent's
        shape and dtype on the generator's device), which is what diffusers' Flux image-to-image
        pipelines use (``retrieve_latents`` with its default ``sample_mode="sample"``).
        """
        mean, logvar = self.encoder(image).chunk(2, dim=1)
        z = mean
        if generator is not None:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            z = mean + std * noise.to(mean.device)
        return (z - self.config.shift_factor) * self.config.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent (as :meth:`encode` returns it) -> image ``[B, 3, H, W]``, nominally in [-1, 1] (not clamped)."""
        return self.decoder(latents / self.config.scale_factor + self.config.shift_factor)


# ---------------------------------------------------------------- config inference


def _count(shapes: Shapes, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return 1 + max((int(m.group(1)) for k in shapes if (m := pattern.match(k))), default=-1)


def flux_ae_config_from_shapes(shapes: Shapes) -> FluxAEConfig | None:
    """Infer the config from BFL-layout key names and shapes; None when these are not Flux AE weights.

    An LDM-style VAE with ``quant_conv`` (Stable Diffusion 1/2/XL) is not one. The scale and shift
    factors cannot be read from weights; the released ones are assumed. Group norms use 32 groups
    when every width allows it (the release), else the largest power of two that divides all widths.
    """
    required = [f"{side}.conv_{end}.weight" for side in ("encoder", "decoder") for end in ("in", "out")]
    if any(k not in shapes for k in required) or "quant_conv.weight" in shapes or "post_quant_conv.weight" in shapes:
        return None
    levels, res_blocks = _count(shapes, "encoder.down."), _count(shapes, "encoder.down.0.block.")
    if not levels or not res_blocks:
        return None
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    widths = [shapes[f"encoder.down.{i}.block.{res_blocks - 1}.conv2.weight"][0] for i in range(levels)]
    if any(w % ch for w in widths):
        return None
    groups = 32
    while any(w % groups for w in widths):
        groups //= 2
    return FluxAEConfig(
        in_channels=in_channels,
        ch=ch,
        out_ch=shapes["decoder.conv_out.weight"][0],
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=res_blocks,
        z_channels=shapes["encoder.conv_out.weight"][0] // 2,
        norm_groups=groups,
    )


def flux_ae_config_from_json(config: Mapping[str, Any], shapes: Shapes | None = None) -> FluxAEConfig | None:
    """The config of a diffusers ``AutoencoderKL`` folder with the Flux design (no quant convs, 16 channels)."""
    if config.get("_class_name") != "AutoencoderKL":
        return None
    if config.get("use_quant_conv", True) or config.get("use_post_quant_conv", True):
        return None
    if not config.get("mid_block_add_attention", True):
        return None
    widths = list(config.get("block_out_channels", (64,)))
    ch = widths[0]
    if any(w % ch for w in widths):
        return None
    return FluxAEConfig(
        in_channels=config.get("in_channels", 3),
        ch=ch,
        out_ch=config.get("out_channels", 3),
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=config.get("layers_per_block", 1),
        z_channels=config.get("latent_channels", 4),
        scale_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=float(config.get("shift_factor") or 0.0),
        norm_groups=config.get("norm_num_groups", 32),
    )

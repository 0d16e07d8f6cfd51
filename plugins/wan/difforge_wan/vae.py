"""The Wan video VAEs (Wan 2.1 and Wan 2.2), in Wan-AI's own checkpoint layout.

Class :class:`WanVAE`, built from a :class:`WanVAEConfig`:

- ``WAN21_VAE``: ``Wan2.1_VAE.pth``, 16 latent channels, 8x spatial and 4x temporal compression;
- ``WAN22_VAE``: ``Wan2.2_VAE.pth`` (TI2V-5B), 48 channels, 16x spatial (2x2 pixel patches, then 8x),
  4x temporal, residual down/up blocks and a wider decoder.

Qwen-Image's VAE is the Wan 2.1 design used on single frames (diffusers ``AutoencoderKLQwenImage``
has exactly ``AutoencoderKLWan``'s keys): build it as ``WanVAE(WanVAEConfig(latents_mean=...,
latents_std=...))``, or let :func:`wan_vae_config_from_json` read its ``vae/config.json``; the
``wan-vae-diffusers`` converter reads its weights. :meth:`WanVAE.encode` and :meth:`WanVAE.decode`
also take a single image ``[B, 3, H, W]`` (one frame) and return one.

API: ``encode(video [B, 3, F, H, W] in [-1, 1]) -> [B, z_dim, 1 + (F - 1) / 4, H / s, W / s]``,
normalised per channel with the config's ``latents_mean`` / ``latents_std`` (``(mu - mean) / std``),
and ``decode(latents) -> video`` in [-1, 1] (clamped), the inverse. ``F`` is ``1 + 4k``.

Causality and time chunks. Every 3D convolution pads time on the past side only, so frame ``t``
of every activation depends on frames ``<= t``. A pass over a video may therefore be cut into time
chunks: a *time cache* (a dict handed to every module) carries, per convolution, the last input
frames it needs from the previous chunk, and per resampler whether the first chunk (which holds
frame 0, the one frame that is not resampled in time) has been seen. Decoding chunk by chunk
equals decoding the whole latent at once, with memory bounded by the chunk (``time_chunk`` latent
frames per chunk; 1 as Wan-AI and diffusers do, ``None`` for one pass). Encoding goes frame 0 alone,
then ``4 * time_chunk`` frames at a time (chunks must keep the temporal strides aligned).
:meth:`WanVAE.tiled_decode` also cuts space into overlapping, linearly blended tiles.
"""

from __future__ import annotations

import math
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
TimeCache = dict
"""Per-module state of one causal pass over time chunks (module -> last input frames, or a flag)."""

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


@dataclass(frozen=True)
class WanVAEConfig:
    """The architecture of a Wan VAE; the defaults are Wan 2.1's (``Wan2.1_VAE.pth``).

    - ``base_dim`` / ``decoder_base_dim``: the encoder's and decoder's widths before ``dim_mult``
      (the decoder's defaults to the encoder's; Wan 2.2: 160 / 256);
    - ``dim_mult``: one width multiple per level; every level but the last halves the resolution;
    - ``temporal_downsample``: which of those halvings also halve time (the decoder mirrors them);
    - ``residual``: Wan 2.2's down/up blocks, which add a parameter-free average/duplicate shortcut;
    - ``patch_size``: pixels folded into channels before the encoder (Wan 2.2: 2);
    - ``latents_mean`` / ``latents_std``: the per-channel statistics latents are normalised with.

    Wan's ``attn_scales`` (attention inside the levels) is empty in every release and left out.
    """

    z_dim: int = 16
    base_dim: int = 96
    decoder_base_dim: int | None = None
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    residual: bool = False
    patch_size: int = 1
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    @property
    def spatial_ratio(self) -> int:
        """Video pixels per latent pixel along each side (8 for Wan 2.1, 16 for Wan 2.2)."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    @property
    def temporal_ratio(self) -> int:
        """Video frames per latent frame after the first (4 for both releases)."""
        return 2 ** sum(self.level_temporal())

    def level_temporal(self) -> list[bool]:
        """Per level: whether its downsampler also halves time (the last level has no downsampler)."""
        levels = len(self.dim_mult)
        return [i < levels - 1 and i < len(self.temporal_downsample) and bool(self.temporal_downsample[i])
                for i in range(levels)]


WAN21_VAE = WanVAEConfig()
WAN22_VAE = WanVAEConfig(
    z_dim=48,
    base_dim=160,
    decoder_base_dim=256,
    residual=True,
    patch_size=2,
    latents_mean=WAN22_LATENTS_MEAN,
    latents_std=WAN22_LATENTS_STD,
)


# ---------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """RMS norm over the channel dimension (dim 1), learnt ``gamma``: ``x / |x| * sqrt(C) * gamma``.

    Half-precision inputs are normalised in float32.
    """

    def __init__(self, dim: int, video: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalized = F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=1)
        return normalized.to(x.dtype) * self.scale * self.gamma


class CausalConv3d(nn.Conv3d):
    """A 3D convolution that pads time on the past side only (``2 * padding_t`` frames).

    With a time cache, the padding is the last input frames of the previous chunk (zeros before the
    first), so a pass cut into chunks computes what one pass over the whole video computes.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(cin, cout, kernel, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        if self.time_pad:
            past = None if cache is None else cache.get(self)
            if past is None:
                past = x.new_zeros(*x.shape[:2], self.time_pad, *x.shape[3:])
            x = torch.cat([past.to(x.device), x], dim=2)
            if cache is not None:
                cache[self] = x[:, :, -self.time_pad :].clone()
        return super().forward(x)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, H, W]`` -> ``[B * T, C, H, W]``."""
    return x.transpose(1, 2).flatten(0, 1)


def _video(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B * T, C, H, W]`` -> ``[B, C, T, H, W]``."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


class ResidualBlock(nn.Module):
    """(RMS norm, SiLU, 3x3x3 causal conv) twice, plus the input (through a 1x1x1 conv when widths differ).

    ``residual`` keeps Wan-AI's ``nn.Sequential`` numbering (0 norm, 2 conv, 3 norm, 6 conv).
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            RMSNorm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x)), cache)
        h = conv2(F.silu(norm2(h)), cache)
        return h + (x if self.shortcut is None else self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, with a residual connection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        b, c, _, h, w = x.shape
        qkv = self.to_qkv(self.norm(_frames(x))).flatten(2)  # [BT, 3C, HW]
        q, k, v = qkv.transpose(1, 2)[:, None].chunk(3, dim=-1)  # each [BT, 1, HW, C]
        out = attention(q, k, v)[:, 0].transpose(1, 2).unflatten(2, (h, w))
        return x + _video(self.proj(out), b)


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x upsampling of ``[N, C, H, W]`` (computed in float32, as Wan does for bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """A level's resampler: 2x in space (per frame), and for the ``3d`` modes also 2x in time.

    - ``upsample3d``: a causal time conv doubles the channels, which are interleaved into twice the
      frames; the first frame of a video is not doubled (``1 + 4k`` frames stay ``1 + 4k``);
    - ``downsample3d``: a stride-2 time conv over each frame and the two before it; the first frame
      of a video passes as it is.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, out_dim or dim // 2, 3, padding=1))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ConfigError(f"Resample mode must be up/downsample2d/3d, got {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            self.time_conv = None

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_time(x, cache)
        x = _video(self.resample(_frames(x)), x.shape[0])
        if self.mode == "downsample3d":
            x = self._halve_time(x, cache)
        return x

    def _double_time(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        first = self not in cache
        cache[self] = True
        head, rest = (x[:, :, :1], x[:, :, 1:]) if first else (None, x)
        if rest.shape[2]:
            y = self.time_conv(rest, cache)  # [B, 2C, T, H, W]: (frame 2t, frame 2t+1) in the channel halves
            b, c2, t, h, w = y.shape
            rest = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return rest if head is None else torch.cat([head, rest], dim=2)

    def _halve_time(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        past = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if past is not None:
            return self.time_conv(torch.cat([past.to(x.device), x], dim=2))
        if x.shape[2] < 3:
            return x[:, :, :1]
        return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)


def avg_down(x: torch.Tensor, cout: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """Wan 2.2's parameter-free down shortcut: fold ``factor_t x factor_s x factor_s`` neighbours into
    channels (time padded at the front to a multiple of ``factor_t``), then average groups to ``cout``."""
    x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % factor_t, 0))
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // factor_t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, cout, -1, t // factor_t, h // factor_s, w // factor_s)
    return x.mean(dim=2)


def dup_up(x: torch.Tensor, cout: int, factor_t: int, factor_s: int, first: bool) -> torch.Tensor:
    """Wan 2.2's parameter-free up shortcut: repeat channels, unfold them into ``factor_t x factor_s x
    factor_s`` neighbours; a video's first chunk drops the frames before its first frame."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(cout * factor_t * factor_s * factor_s // c, dim=1)
    x = x.view(b, cout, factor_t, factor_s, factor_s, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, cout, t * factor_t, h * factor_s, w * factor_s)
    return x[:, :, factor_t - 1 :] if first else x


class DownResidualBlock(nn.Module):
    """Wan 2.2's encoder level: residual blocks and the downsampler, plus :func:`avg_down` of the input."""

    def __init__(self, cin: int, cout: int, count: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.cout, self.factor_t, self.factor_s = cout, 2 if temporal else 1, 2 if down else 1
        blocks: list[nn.Module] = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(count)]
        if down:
            blocks.append(Resample(cout, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        shortcut = avg_down(x, self.cout, self.factor_t, self.factor_s)
        for block in self.downsamples:
            x = block(x, cache)
        return x + shortcut


class UpResidualBlock(nn.Module):
    """Wan 2.2's decoder level: residual blocks and the upsampler, plus :func:`dup_up` of the input."""

    def __init__(self, cin: int, cout: int, count: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.cout, self.factor_t, self.up = cout, 2 if temporal else 1, up
        blocks: list[nn.Module] = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(count)]
        if up:
            blocks.append(Resample(cout, "upsample3d" if temporal else "upsample2d", out_dim=cout))
        self.upsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        first = self not in cache
        cache[self] = True
        y = x
        for block in self.upsamples:
            y = block(y, cache)
        return y + dup_up(x, self.cout, self.factor_t, 2, first) if self.up else y


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(dim: int, cout: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, cout, 3, padding=1))


class Encoder3d(nn.Module):
    """Video (patchified) -> mean and log-variance ``[B, 2 * z_dim, T', H', W']``."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        temporal = config.level_temporal()
        last = len(config.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * config.patch_size**2, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if config.residual:
                blocks.append(DownResidualBlock(cin, cout, config.num_res_blocks, temporal[i], i < last))
                continue
            blocks += [ResidualBlock(cin if j == 0 else cout, cout) for j in range(config.num_res_blocks)]
            if i < last:
                blocks.append(Resample(cout, "downsample3d" if temporal[i] else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * config.z_dim)

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)


class Decoder3d(nn.Module):
    """Latent ``[B, z_dim, T, h, w]`` -> video (patchified) ``[B, 3 * p^2, 1 + 4 (T - 1), ...]``."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        mult = config.dim_mult
        dims = [config.decoder_dim * m for m in (mult[-1], *reversed(mult))]
        temporal = list(reversed(config.level_temporal()[:-1])) + [False]
        last = len(mult) - 1
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if config.residual:
                blocks.append(UpResidualBlock(cin, cout, config.num_res_blocks + 1, temporal[i], i < last))
                continue
            cin = cin // 2 if i > 0 else cin  # the Wan 2.1 upsamplers halve the width
            blocks += [ResidualBlock(cin if j == 0 else cout, cout) for j in range(config.num_res_blocks + 1)]
            if i < last:
                blocks.append(Resample(cout, "upsample3d" if temporal[i] else "upsample2d"))
        self.upsamples = nn.ModuleList(blocks)
        self.head = _head(dims[-1], 3 * config.patch_size**2)

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in (*self.middle, *self.upsamples):
            x = block(x, cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, T, H, W]`` -> ``[B, C * p * p, T, H / p, W / p]``, channels ordered (c, column, row) as Wan's."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)


# ---------------------------------------------------------------- the model


class WanVAE(nn.Module):
    """A Wan causal video VAE; its ``state_dict`` is Wan-AI's layout (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``)."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        if len(config.latents_mean) != config.z_dim or len(config.latents_std) != config.z_dim:
            raise ConfigError(
                f"WanVAEConfig: latents_mean and latents_std need z_dim={config.z_dim} values, got "
                f"{len(config.latents_mean)} and {len(config.latents_std)}"
            )
        self.config = config
        z = config.z_dim
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(config)

    @property
    def spatial_ratio(self) -> int:
        return self.config.spatial_ratio

    @property
    def temporal_ratio(self) -> int:
        return self.config.temporal_ratio

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, 1 / std)`` as ``[1, z, 1, 1, 1]`` tensors (computed as diffusers' Wan pipelines do)."""
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean).view(shape).to(like.device, like.dtype)
        inv_std = (1.0 / torch.tensor(self.config.latents_std)).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def _check(self, x: torch.Tensor, what: str, channels: int, multiple: int) -> None:
        if x.dim() != 5 or x.shape[1] != channels:
            raise ConfigError(f"WanVAE.{what} takes [B, {channels}, F, H, W] (or one frame [B, {channels}, H, W]); "
                              f"got {tuple(x.shape)}")
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ConfigError(f"WanVAE.{what}: height and width must be multiples of {multiple}; got {tuple(x.shape)}")

    def encode(
        self, video: torch.Tensor, generator: torch.Generator | None = None, time_chunk: int | None = 1
    ) -> torch.Tensor:
        """Video ``[B, 3, F, H, W]`` in [-1, 1] (``F = 1 + 4k``) -> normalised latents ``[B, z, 1 + k, H/s, W/s]``.

        Without ``generator`` the latent is the mean of the encoded distribution (what diffusers' Wan
        pipelines use); with one, a sample ``mean + std * noise``. ``time_chunk``: latent frames
        encoded per chunk after the first frame (None: the whole video in one pass).
        """
        image = video.dim() == 4
        x = video[:, :, None] if image else video
        self._check(x, "encode", 3, self.spatial_ratio)
        r = self.temporal_ratio
        if (x.shape[2] - 1) % r:
            raise ConfigError(f"WanVAE.encode: the number of frames must be 1 + {r}k, got {x.shape[2]}")
        x = patchify(x, self.config.patch_size)
        cache: TimeCache = {}
        if time_chunk is None:
            out = self.encoder(x, cache)
        else:
            step = r * int(time_chunk)
            chunks = [x[:, :, :1]] + [x[:, :, i : i + step] for i in range(1, x.shape[2], step)]
            out = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        mu, logvar = self.conv1(out).chunk(2, dim=1)
        z = mu
        if generator is not None:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mu.shape, generator=generator, device=generator.device, dtype=mu.dtype)
            z = mu + std * noise.to(mu.device)
        mean, inv_std = self._stats(z)
        z = (z - mean) * inv_std
        return z[:, :, 0] if image else z

    def decode(self, latents: torch.Tensor, time_chunk: int | None = 1) -> torch.Tensor:
        """Normalised latents ``[B, z, T, h, w]`` -> video ``[B, 3, 1 + 4 (T - 1), h * s, w * s]`` in [-1, 1].

        ``time_chunk``: latent frames decoded per chunk (None: all at once); the result is the same,
        the peak memory grows with the chunk.
        """
        image = latents.dim() == 4
        z = latents[:, :, None] if image else latents
        self._check(z, "decode", self.config.z_dim, 1)
        mean, inv_std = self._stats(z)
        x = self.conv2(z / inv_std + mean)
        cache: TimeCache = {}
        step = x.shape[2] if time_chunk is None else int(time_chunk)
        if step < 1:
            raise ConfigError(f"WanVAE.decode: time_chunk must be a positive number of latent frames, got {time_chunk}")
        outs = [self.decoder(x[:, :, i : i + step], cache) for i in range(0, x.shape[2], step)]
        out = unpatchify(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2), self.config.patch_size)
        out = out.clamp(-1.0, 1.0)
        return out[:, :, 0] if image else out

    def tiled_decode(
        self, latents: torch.Tensor, tile_size: int = 32, tile_stride: int = 24, time_chunk: int | None = 1
    ) -> torch.Tensor:
        """:meth:`decode` in overlapping ``tile_size`` x ``tile_size`` latent tiles every ``tile_stride``
        latent pixels, blended with linear ramps over the overlaps: the peak memory follows the tile.

        Each tile sees only its own latents, so the result is close to, not equal to, a plain decode.
        """
        if not 0 < tile_stride <= tile_size:
            raise ConfigError(f"tile_stride must be in (0, tile_size]; got tile_size {tile_size}, tile_stride {tile_stride}")
        h, w = latents.shape[-2:]
        if h <= tile_size and w <= tile_size:
            return self.decode(latents, time_chunk)
        s = self.spatial_ratio
        overlap = (tile_size - tile_stride) * s

        def starts(n: int) -> list[int]:
            return [0] if n <= tile_size else [*range(0, n - tile_size, tile_stride), n - tile_size]

        def ramp(n: int, lo: bool, hi: bool, device: torch.device) -> torch.Tensor:
            r = torch.ones(n, device=device)
            edge = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
            if lo and overlap:
                r[:overlap] = torch.minimum(r[:overlap], edge)
            if hi and overlap:
                r[-overlap:] = torch.minimum(r[-overlap:], edge.flip(0))
            return r

        out = weight = None
        for y in starts(h):
            for x in starts(w):
                tile = self.decode(latents[..., y : y + tile_size, x : x + tile_size], time_chunk).float()
                th, tw = tile.shape[-2:]
                mask = ramp(th, y > 0, y + tile_size < h, tile.device)[:, None] * ramp(
                    tw, x > 0, x + tile_size < w, tile.device
                )[None, :]
                if out is None:
                    out = tile.new_zeros(*tile.shape[:-2], h * s, w * s)
                    weight = tile.new_zeros(h * s, w * s)
                out[..., y * s : y * s + th, x * s : x * s + tw] += tile * mask
                weight[y * s : y * s + th, x * s : x * s + tw] += mask
        return (out / weight).to(latents.dtype)


# ---------------------------------------------------------------- config inference


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})


def _stats_for(z_dim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The latent statistics of the release with ``z_dim`` channels (identity for others)."""
    if z_dim == len(WAN21_LATENTS_MEAN):
        return WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
    if z_dim == len(WAN22_LATENTS_MEAN):
        return WAN22_LATENTS_MEAN, WAN22_LATENTS_STD
    return (0.0,) * z_dim, (1.0,) * z_dim


def _levels(shapes: Shapes, prefixes: Sequence[str]) -> list[tuple[int, int, bool, bool]] | None:
    """Per level ``(residual blocks, width, has resampler, resamples time)`` from the module lists
    ``prefixes`` (one flat list for Wan 2.1, one list per level for Wan 2.2)."""
    levels: list[tuple[int, int, bool, bool]] = []
    count, width = 0, 0
    for prefix in prefixes:
        for i in _indices(shapes, prefix):
            key = f"{prefix}{i}."
            if f"{key}residual.6.weight" in shapes:
                count, width = count + 1, shapes[f"{key}residual.6.weight"][0]
            elif f"{key}resample.1.weight" in shapes:
                levels.append((count, width, True, f"{key}time_conv.weight" in shapes))
                count = 0
            else:
                return None
        if len(prefixes) > 1 and count:  # a Wan 2.2 level without resampler (the last one)
            levels.append((count, width, False, False))
            count = 0
    if count:
        levels.append((count, width, False, False))
    return levels


def wan_vae_config_from_shapes(shapes: Shapes) -> WanVAEConfig | None:
    """Infer the config from Wan-AI-layout key names and shapes; None when these are not Wan VAE weights.

    The latent statistics cannot be read from weights: those of the release with the same number
    of channels are assumed (16: Wan 2.1, 48: Wan 2.2), else mean 0 and std 1.
    """
    required = ("encoder.conv1.weight", "decoder.conv1.weight", "conv1.weight", "conv2.weight", "decoder.head.2.weight")
    if any(k not in shapes for k in required) or len(shapes["encoder.conv1.weight"]) != 5:
        return None
    base, cin = shapes["encoder.conv1.weight"][:2]
    patch = math.isqrt(cin // 3)
    if 3 * patch * patch != cin:
        return None
    z = shapes["conv2.weight"][0]
    residual = any(k.startswith("encoder.downsamples.0.downsamples.") for k in shapes)
    if residual:
        prefixes = [f"encoder.downsamples.{i}.downsamples." for i in _indices(shapes, "encoder.downsamples.")]
    else:
        prefixes = ["encoder.downsamples."]
    levels = _levels(shapes, prefixes)
    if not levels or any(width % base for _, width, _, _ in levels):
        return None
    counts = {count for count, _, _, _ in levels}
    if len(counts) != 1:
        return None
    mult = tuple(width // base for _, width, _, _ in levels)
    decoder_base = shapes["decoder.head.2.weight"][1] // mult[0]
    mean, std = _stats_for(z)
    return WanVAEConfig(
        z_dim=z,
        base_dim=base,
        decoder_base_dim=None if decoder_base == base else decoder_base,
        dim_mult=mult,
        num_res_blocks=counts.pop(),
        temporal_downsample=tuple(t for _, _, down, t in levels if down),
        residual=residual,
        patch_size=patch,
        latents_mean=mean,
        latents_std=std,
    )


def wan_vae_config_from_json(config: Mapping[str, Any], shapes: Shapes | None = None) -> WanVAEConfig | None:
    """The config of a diffusers ``AutoencoderKLWan`` (or ``AutoencoderKLQwenImage``) folder's ``config.json``."""
    if config.get("_class_name") not in ("AutoencoderKLWan", "AutoencoderKLQwenImage"):
        return None
    patch = int(config.get("patch_size") or 1)
    if config.get("attn_scales") or config.get("in_channels", config.get("input_channels", 3)) != 3 * patch * patch:
        return None
    z = int(config.get("z_dim", 16))
    mean, std = _stats_for(z)
    base = int(config.get("base_dim", 96))
    decoder_base = config.get("decoder_base_dim")
    return WanVAEConfig(
        z_dim=z,
        base_dim=base,
        decoder_base_dim=None if decoder_base in (None, base) else int(decoder_base),
        dim_mult=tuple(config.get("dim_mult", (1, 2, 4, 4))),
        num_res_blocks=int(config.get("num_res_blocks", 2)),
        temporal_downsample=tuple(bool(t) for t in config.get("temperal_downsample", (False, True, True))),
        residual=bool(config.get("is_residual", False)),
        patch_size=patch,
        latents_mean=tuple(float(v) for v in config.get("latents_mean", mean)),
        latents_std=tuple(float(v) for v in config.get("latents_std", std)),
    )

"""The Stable Diffusion U-Net (SD 1.x/2.x and SDXL), equivalent to diffusers' ``UNet2DConditionModel``.

Own layout: diffusers' key names, except that the single mid block is ``mid_blocks.0.`` (diffusers:
``mid_block.``): a :class:`~difforge.BlockLayout` names ``nn.ModuleList`` s, and the mid block is one
of the blocks a cache skips. The ``diffusers`` converter renames just that prefix.

Every block is called ``block(hidden_states, temb=..., encoder_hidden_states=..., skips=[...])`` and
returns ``hidden_states``; down block ``i`` pushes its input and its layers' outputs onto ``skips``
(``layers_per_block + 1`` tensors), up block ``n-1-i`` pops exactly those. A cache that skips a
symmetric middle run of blocks therefore skips their pushes and pops together, which is what lets
DeepCache work on the U-Net with the generic block engine.

What :func:`unet_config_from_shapes` cannot read from the weights, and assumes:

- heads: 8 per block when ``proj_in`` is a 1x1 convolution (SD 1.x), ``channels // 64`` when it
  is linear (SD 2.x, SDXL: head dim 64);
- ``addition_time_embed_dim`` (SDXL's size-conditioning embedding width) is 256;
- group norms have 32 groups; up blocks mirror the down blocks (attention and depth reversed).
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

__all__ = [
    "SDUNetConfig",
    "SDUNet",
    "SD15_UNET",
    "SDXL_BASE_UNET",
    "unet_config_from_shapes",
    "unet_config_from_json",
    "timestep_embedding",
    "ResnetBlock",
]

Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class SDUNetConfig:
    """Architecture of an SD U-Net. Per-block tuples follow the down blocks; the up blocks mirror them.

    ``transformer_layers[i]`` is the depth of the transformers in down block ``i`` (0: no attention,
    diffusers' ``DownBlock2D``); ``mid_transformer_layers`` that of the mid block.
    ``addition_embed_dim`` is SDXL's ``projection_class_embeddings_input_dim`` (pooled text embeds +
    6 size ids of ``addition_time_embed_dim`` each); 0 for SD 1.x/2.x.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    transformer_layers: tuple[int, ...] = (1, 1, 1, 0)
    mid_transformer_layers: int = 1
    attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    addition_embed_dim: int = 0
    addition_time_embed_dim: int = 256
    norm_num_groups: int = 32
    norm_eps: float = 1e-5

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4


SD15_UNET = SDUNetConfig()
"""runwayml/stable-diffusion-v1-5 (and every SD 1.x fine-tune)."""
SDXL_BASE_UNET = SDUNetConfig(
    block_out_channels=(320, 640, 1280),
    transformer_layers=(0, 2, 10),
    mid_transformer_layers=10,
    attention_heads=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_dim=2816,
)
"""stabilityai/stable-diffusion-xl-base-1.0 (and SDXL fine-tunes)."""


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos | sin]`` of ``t`` (``[N]``), as diffusers' ``Timesteps(dim, True, 0)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (when ``temb_dim``)."""

    def __init__(self, cin: int, cout: int, temb_dim: int | None, groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        if temb_dim is not None:
            self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if "conv_shortcut" in self._modules else x
        return skip + h


class Attention(nn.Module):
    """Multi-head attention with diffusers' names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, bias: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"SD U-Net: {dim} channels do not split into {heads} attention heads")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(kv_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(kv_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        split = lambda t: t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = attention(split(q), split(k), split(v))
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, d))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text, GEGLU feed-forward; pre-LayerNorm, residual."""

    def __init__(self, dim: int, heads: int, cross_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, kv_dim=cross_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """diffusers' ``Transformer2DModel`` on image features: norm, ``proj_in`` (1x1 conv on SD 1.x,
    linear on SDXL), transformer blocks over the pixels as tokens, ``proj_out``, residual."""

    def __init__(self, dim: int, heads: int, depth: int, cross_dim: int, linear: bool, groups: int) -> None:
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(dim, heads, cross_dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = lambda t: t.permute(0, 2, 3, 1).reshape(b, h * w, c)  # noqa: E731
        pixels = lambda t: t.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        y = self.norm(x)
        y = self.proj_in(tokens(y)) if self.linear else tokens(self.proj_in(y))
        for block in self.transformer_blocks:
            y = block(y, context)
        y = pixels(self.proj_out(y)) if self.linear else self.proj_out(pixels(y))
        return y + x


class Downsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


class DownBlock(nn.Module):
    """diffusers' ``CrossAttnDownBlock2D`` (``depth > 0``) or ``DownBlock2D``."""

    def __init__(self, cin: int, cout: int, c: SDUNetConfig, depth: int, heads: int, downsample: bool) -> None:
        super().__init__()
        t, g, e = c.time_embed_dim, c.norm_num_groups, c.norm_eps
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, t, g, e) for i in range(c.layers_per_block))
        if depth:
            self.attentions = nn.ModuleList(
                Transformer2D(cout, heads, depth, c.cross_attention_dim, c.use_linear_projection, g)
                for _ in range(c.layers_per_block)
            )
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample(cout)])

    def forward(
        self, hidden_states: torch.Tensor, *, temb: torch.Tensor, encoder_hidden_states: torch.Tensor, skips: list[torch.Tensor]
    ) -> torch.Tensor:
        # the block's input is its first skip connection (diffusers pushes the same tensor as conv_in's or
        # the previous block's downsampler output): then up block n-1-i pops exactly what down block i pushed
        skips.append(hidden_states)
        h = hidden_states
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if "attentions" in self._modules:
                h = self.attentions[i](h, encoder_hidden_states)
            skips.append(h)
        if "downsamplers" in self._modules:
            h = self.downsamplers[0](h)
        return h


class MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    def __init__(self, dim: int, c: SDUNetConfig) -> None:
        super().__init__()
        t, g, e = c.time_embed_dim, c.norm_num_groups, c.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(dim, dim, t, g, e), ResnetBlock(dim, dim, t, g, e)])
        self.attentions = nn.ModuleList(
            [Transformer2D(dim, c.attention_heads[-1], c.mid_transformer_layers, c.cross_attention_dim, c.use_linear_projection, g)]
        )

    def forward(
        self, hidden_states: torch.Tensor, *, temb: torch.Tensor, encoder_hidden_states: torch.Tensor, skips: list[torch.Tensor]
    ) -> torch.Tensor:
        h = self.resnets[0](hidden_states, temb)
        h = self.attentions[0](h, encoder_hidden_states)
        return self.resnets[1](h, temb)


class UpBlock(nn.Module):
    """diffusers' ``CrossAttnUpBlock2D`` / ``UpBlock2D``: ``layers_per_block + 1`` resnets, each on the
    features concatenated with the skip connection it pops."""

    def __init__(self, prev: int, cout: int, skip_last: int, c: SDUNetConfig, depth: int, heads: int, upsample: bool) -> None:
        super().__init__()
        t, g, e, n = c.time_embed_dim, c.norm_num_groups, c.norm_eps, c.layers_per_block + 1
        self.resnets = nn.ModuleList(
            ResnetBlock((prev if i == 0 else cout) + (skip_last if i == n - 1 else cout), cout, t, g, e) for i in range(n)
        )
        if depth:
            self.attentions = nn.ModuleList(
                Transformer2D(cout, heads, depth, c.cross_attention_dim, c.use_linear_projection, g) for _ in range(n)
            )
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(
        self, hidden_states: torch.Tensor, *, temb: torch.Tensor, encoder_hidden_states: torch.Tensor, skips: list[torch.Tensor]
    ) -> torch.Tensor:
        h = hidden_states
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            if "attentions" in self._modules:
                h = self.attentions[i](h, encoder_hidden_states)
        if "upsamplers" in self._modules:
            # the next skip connection has the size to reach (odd sizes: as diffusers' upsample_size)
            h = self.upsamplers[0](h, skips[-1].shape[-2:] if skips else None)
        return h


class SDUNet(nn.Module):
    """``forward(sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None)`` -> the
    noise (or v) prediction, ``[B, out_channels, H, W]``. SDXL-like configs (``addition_embed_dim``)
    need ``text_embeds`` (pooled text) and ``time_ids`` (``[B, 6]`` size conditioning)."""

    def __init__(self, config: SDUNetConfig) -> None:
        super().__init__()
        self.config = c = config
        ch = c.block_out_channels
        n = len(ch)
        if not (len(c.transformer_layers) == len(c.attention_heads) == n):
            raise ConfigError(f"SD U-Net config: transformer_layers and attention_heads need {n} entries (one per block)")
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], c.time_embed_dim)
        if c.addition_embed_dim:
            self.add_embedding = TimestepEmbedding(c.addition_embed_dim, c.time_embed_dim)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], c, c.transformer_layers[i], c.attention_heads[i], i < n - 1) for i in range(n)
        )
        self.mid_blocks = nn.ModuleList([MidBlock(ch[-1], c)])
        rch, rdepth, rheads = ch[::-1], c.transformer_layers[::-1], c.attention_heads[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(rch[max(i - 1, 0)], rch[i], rch[min(i + 1, n - 1)], c, rdepth[i], rheads[i], i < n - 1) for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = self.config
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(b)
        temb = self.time_embedding(timestep_embedding(t, c.block_out_channels[0]).to(sample.dtype))
        if c.addition_embed_dim:
            if text_embeds is None or time_ids is None:
                raise ConfigError("this SDXL-like U-Net needs text_embeds (pooled text) and time_ids (size conditioning)")
            ids = timestep_embedding(time_ids.reshape(-1), c.addition_time_embed_dim).reshape(b, -1)
            temb = temb + self.add_embedding(torch.cat([text_embeds, ids.to(text_embeds.dtype)], dim=-1).to(temb.dtype))
        h = self.conv_in(sample)
        skips: list[torch.Tensor] = []
        kw: dict[str, Any] = dict(temb=temb, encoder_hidden_states=encoder_hidden_states, skips=skips)
        for block in self.down_blocks:
            h = block(h, **kw)
        for block in self.mid_blocks:
            h = block(h, **kw)
        for block in self.up_blocks:
            h = block(h, **kw)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# ---------------------------------------------------------------- config inference

_OWN = re.compile(
    r"^(conv_in|conv_out|conv_norm_out|time_embedding\.linear_[12]|add_embedding\.linear_[12])\.(weight|bias)$"
    r"|^(down_blocks|up_blocks|mid_blocks)\.\d+\.(resnets|attentions|downsamplers|upsamplers)\.\d+\."
)


def _count(shapes: Shapes, prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def unet_config_from_shapes(shapes: Shapes) -> SDUNetConfig | None:
    """Infer the config from own-layout keys (see the module docstring for what is assumed)."""
    if "conv_in.weight" not in shapes or "mid_blocks.0.resnets.0.conv1.weight" not in shapes:
        return None
    if not all(_OWN.match(k) for k in shapes):
        return None
    n = _count(shapes, "down_blocks.")
    if n == 0:
        return None
    ch = tuple(int(shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0]) for i in range(n))
    depth = tuple(_count(shapes, f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(n))
    mid_depth = _count(shapes, "mid_blocks.0.attentions.0.transformer_blocks.")
    block = next((f"down_blocks.{i}.attentions.0" for i in range(n) if depth[i]), "mid_blocks.0.attentions.0")
    linear = len(shapes[f"{block}.proj_in.weight"]) == 2
    heads = tuple(max(1, c // 64) for c in ch) if linear else (8,) * n
    add = shapes.get("add_embedding.linear_1.weight")
    return SDUNetConfig(
        in_channels=int(shapes["conv_in.weight"][1]),
        out_channels=int(shapes["conv_out.weight"][0]),
        block_out_channels=ch,
        layers_per_block=_count(shapes, "down_blocks.0.resnets."),
        transformer_layers=depth,
        mid_transformer_layers=mid_depth,
        attention_heads=heads,
        cross_attention_dim=int(shapes[f"{block}.transformer_blocks.0.attn2.to_k.weight"][1]),
        use_linear_projection=linear,
        addition_embed_dim=int(add[1]) if add is not None else 0,
    )


def unet_config_from_json(config: Mapping[str, Any], shapes: Shapes) -> SDUNetConfig | None:
    """diffusers' ``unet/config.json`` -> config: the head counts and size-embedding width come from
    it, the rest from the shapes (None unless ``shapes`` are this model's)."""
    inferred = unet_config_from_shapes(shapes)
    if inferred is None or config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        return None
    n = len(inferred.block_out_channels)
    heads = config.get("num_attention_heads") or config.get("attention_head_dim")
    if heads is not None:
        heads = tuple(int(h) for h in heads) if isinstance(heads, (list, tuple)) else (int(heads),) * n
    else:
        heads = inferred.attention_heads
    return SDUNetConfig(
        **{
            **inferred.__dict__,
            "attention_heads": heads,
            "addition_time_embed_dim": int(config.get("addition_time_embed_dim") or inferred.addition_time_embed_dim),
            "norm_num_groups": int(config.get("norm_num_groups", 32)),
            "norm_eps": float(config.get("norm_eps", 1e-5)),
        }
    )


def sd_unet_config(shapes: Shapes) -> SDUNetConfig | None:
    """``sd-unet``: an SD 1.x/2.x U-Net (no added-condition embedding)."""
    config = unet_config_from_shapes(shapes)
    return config if config is not None and not config.addition_embed_dim else None


def sdxl_unet_config(shapes: Shapes) -> SDUNetConfig | None:
    """``sdxl-unet``: a U-Net with SDXL's added-condition embedding."""
    config = unet_config_from_shapes(shapes)
    return config if config is not None and config.addition_embed_dim else None


def sd_unet_config_from_json(config: Mapping[str, Any], shapes: Shapes) -> SDUNetConfig | None:
    out = unet_config_from_json(config, shapes)
    return out if out is not None and not out.addition_embed_dim else None


def sdxl_unet_config_from_json(config: Mapping[str, Any], shapes: Shapes) -> SDUNetConfig | None:
    out = unet_config_from_json(config, shapes)
    return out if out is not None and out.addition_embed_dim else None

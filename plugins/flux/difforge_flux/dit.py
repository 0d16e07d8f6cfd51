"""The FLUX.1 diffusion transformer (DiT), in its own (BFL) checkpoint layout.

The model works on packed latent tokens, as Black Forest Labs' reference does: a latent
``[B, 16, H/8, W/8]`` is cut into 2x2 patches, giving ``img`` tokens ``[B, H/16 * W/16, 64]``,
each with a position id ``(0, row, column)``; text tokens carry the id ``(0, 0, 0)``.

Two kinds of blocks run in turn. Double-stream blocks keep separate weights for the image and
text tokens and meet only in a joint attention; single-stream blocks run one set of weights over
the joined sequence, with the attention and the MLP computed in parallel from one input
projection. Every block is modulated (shift, scale, gate) by ``vec``, the sum of the timestep,
guidance (FLUX.1-dev) and pooled CLIP embeddings. Positions enter through a 3-axis rotary
embedding (RoPE) of the query and key heads.

Block streams: every block, double or single, is called as ``block(img, txt, vec=vec, pe=pe)``
and returns ``(img, txt)``; a single-stream block joins ``[txt, img]`` itself and returns views of
the two parts. Cache and offload plugins therefore see one pair of streams through both groups
(``difforge_flux.BLOCK_LAYOUT``). The join is one copy of the hidden states per single block
(diffusers' single blocks make the same copy): ``benchmarks/flux.py`` measured it at 1.5% of a
single block's time in fp32 and 0.4% in bf16 (CPU, 384 tokens), about 1% of a whole forward;
joining once before the single blocks, as BFL does, would save that but give cache plugins a
different stream in each group.
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

from difforge import parallel
from difforge.errors import ConfigError
from difforge.ops import attention

Shapes = Mapping[str, Sequence[int]]
Rope = torch.Tensor
"""The rotations ``exp(i * angle)`` of the RoPE channel pairs: complex64, ``[B or 1, 1, N, head_dim / 2]``."""


@dataclass(frozen=True)
class FluxDiTConfig:
    """The architecture of a FLUX.1 DiT (BFL's ``FluxParams``); the defaults are FLUX.1-dev's.

    ``in_channels`` is the packed token width: 64 for text-to-image (16 latent channels x 2x2),
    384 for FLUX.1-Fill (latent, masked image and mask), 128 for FLUX.1-Canny/Depth.
    """

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


FLUX1_DEV = FluxDiTConfig()
FLUX1_SCHNELL = FluxDiTConfig(guidance_embed=False)


# ---------------------------------------------------------------- embeddings


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` (cosines, then sines) of ``1000 * t``, in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_rotations(ids: torch.Tensor, axes_dim: Sequence[int], theta: int) -> Rope:
    """The rotary embedding of position ids ``[B, N, n_axes]`` (or ``[N, n_axes]``), see :data:`Rope`.

    Axis ``i`` rotates ``axes_dim[i] / 2`` channel pairs at frequencies ``theta ** (-2j / axes_dim[i])``.
    Angles are computed in float64 (float32 where the device has none), rotations stored in complex64.
    """
    if ids.dim() == 2:
        ids = ids[None]
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for i, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim)
        angles.append(ids[..., i, None].to(dtype) * omega)
    angle = torch.cat(angles, dim=-1)[:, None]  # [B, 1, N, head_dim / 2]
    return torch.polar(torch.ones_like(angle), angle).to(torch.complex64)


def apply_rope(x: torch.Tensor, pe: Rope) -> torch.Tensor:
    """Rotate the consecutive channel pairs ``(x[2j], x[2j+1])`` of ``x [B, H, N, D]`` by ``pe``, in float32.

    One complex multiplication: several times faster in eager mode than the cos/sin formulation.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * pe).flatten(-2).type_as(x)


class MLPEmbedder(nn.Module):
    """Linear, SiLU, linear: lifts an embedding (timestep, guidance, pooled text) to the hidden width."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


# ---------------------------------------------------------------- attention pieces


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learnt ``scale`` (torch's fused kernel,
    which accumulates in float32 for half-precision inputs)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale.to(x.dtype), eps=1e-6)


class QKNorm(nn.Module):
    """Separate RMS norms of the query and key heads."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q), self.key_norm(k)


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, N, 3 * H * D]`` -> q, k, v, each ``[B, H, N, D]``."""
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: Rope) -> torch.Tensor:
    """RoPE on q and k, attention through :func:`difforge.ops.attention`; ``[B, H, N, D]`` -> ``[B, N, H * D]``."""
    out = attention(apply_rope(q, pe), apply_rope(k, pe), v)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """The attention weights of one stream of a double block: fused qkv, QK norm, output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised query, key and value heads ``[B, H, N, D]`` of the (modulated) tokens ``x``."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


class Modulation(nn.Module):
    """``vec`` -> ``count`` chunks ``[B, 1, dim]`` (shift, scale, gate, ...) for adaptive layer norms."""

    def __init__(self, dim: int, count: int) -> None:
        super().__init__()
        self.count = count
        self.lin = nn.Linear(dim, count * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None].chunk(self.count, dim=-1)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Layer norm without affine parameters (eps 1e-6), as every Flux block uses before modulating."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, layer_norm(x), 1 + scale)


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


# ---------------------------------------------------------------- blocks


class DoubleStreamBlock(nn.Module):
    """Image and text tokens with their own weights, joined only in attention (MMDiT block)."""

    def __init__(self, config: FluxDiTConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.img_mod = Modulation(dim, 6)
        self.img_attn = SelfAttention(dim, config.num_heads, config.qkv_bias)
        self.img_mlp = mlp(dim, config.mlp_hidden_dim)
        self.txt_mod = Modulation(dim, 6)
        self.txt_attn = SelfAttention(dim, config.num_heads, config.qkv_bias)
        self.txt_mlp = mlp(dim, config.mlp_hidden_dim)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.heads(modulate(img, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(txt, txt_shift1, txt_scale1))
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        out = joint_attention(q, k, v, pe)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]

        # x + gate * f(x), as one fused kernel
        img = torch.addcmul(img, img_gate1, self.img_attn.proj(img_out))
        img = torch.addcmul(img, img_gate2, self.img_mlp(modulate(img, img_shift2, img_scale2)))
        txt = torch.addcmul(txt, txt_gate1, self.txt_attn.proj(txt_out))
        txt = torch.addcmul(txt, txt_gate2, self.txt_mlp(modulate(txt, txt_shift2, txt_scale2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One set of weights over ``[txt, img]``: attention and MLP in parallel from one projection.

    ``linear1`` computes q, k, v and the MLP input at once; ``linear2`` takes the attention output
    and the activated MLP hidden state side by side. Called like a double block, on both streams.
    """

    def __init__(self, config: FluxDiTConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.mlp_hidden_dim = config.mlp_hidden_dim
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.norm = QKNorm(config.head_dim)
        self.modulation = Modulation(dim, 3)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, gate = self.modulation(vec)
        x = torch.cat((txt, img), dim=1)
        qkv, mlp_in = self.linear1(modulate(x, shift, scale)).split((3 * x.shape[-1], self.mlp_hidden_dim), dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k)
        out = torch.cat((joint_attention(q, k, v, pe), F.gelu(mlp_in, approximate="tanh")), dim=-1)
        x = torch.addcmul(x, gate, self.linear2(out))
        return x[:, txt.shape[1] :], x[:, : txt.shape[1]]


class LastLayer(nn.Module):
    """Adaptive layer norm (shift, scale from ``vec``) and the projection back to packed latents."""

    def __init__(self, dim: int, out_channels: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


# ---------------------------------------------------------------- the model


class FluxDiT(nn.Module):
    """The FLUX.1 transformer; its ``state_dict`` is BFL's layout (``flux1-dev.safetensors``)."""

    def __init__(self, config: FluxDiTConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ConfigError(
                f"FluxDiTConfig: hidden_size {config.hidden_size} is not a multiple of num_heads {config.num_heads}"
            )
        if sum(config.axes_dim) != config.head_dim or any(d % 2 for d in config.axes_dim):
            raise ConfigError(
                f"FluxDiTConfig: the RoPE axes {config.axes_dim} must be even and add up to "
                f"the head dim {config.head_dim}"
            )
        self.config = config
        dim = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(config.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if config.guidance_embed else None
        self.txt_in = nn.Linear(config.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.final_layer = LastLayer(dim, config.out_channels)

    @parallel.sequence_parallel
    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity of the packed image tokens.

        - ``img`` ``[B, N, in_channels]``: packed latent tokens; ``img_ids`` ``[N, 3]`` or ``[B, N, 3]``
          their position ids.
        - ``txt`` ``[B, L, context_in_dim]``: T5 embeddings; ``txt_ids`` ``[L, 3]`` or ``[B, L, 3]``
          (zeros for FLUX.1).
        - ``timesteps`` ``[B]``: the flow time (sigma) in [0, 1]; ``y`` ``[B, vec_in_dim]``: the pooled CLIP
          embedding; ``guidance`` ``[B]``: the distilled guidance scale (e.g. 3.5), required exactly when
          the model has a guidance embedding (FLUX.1-dev), refused otherwise (FLUX.1-schnell).

        Returns ``[B, N, out_channels]`` in ``img``'s dtype.
        """
        if img.dim() != 3 or txt.dim() != 3:
            raise ConfigError(
                f"FluxDiT takes packed tokens [B, N, C]; got img {tuple(img.shape)}, txt {tuple(txt.shape)}"
            )
        if (guidance is None) == (self.guidance_in is not None):
            raise ConfigError(
                "FluxDiT: this model has a guidance embedding (FLUX.1-dev-like); pass guidance=[B] (e.g. 3.5)"
                if guidance is None
                else "FluxDiT: this model has no guidance embedding (FLUX.1-schnell-like); do not pass guidance"
            )
        dtype = img.dtype
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        vec = vec + self.vector_in(y)

        if img_ids.dim() != txt_ids.dim():
            raise ConfigError(
                f"FluxDiT: img_ids {tuple(img_ids.shape)} and txt_ids {tuple(txt_ids.shape)} need the same rank"
            )
        pe = rope_rotations(torch.cat((txt_ids, img_ids), dim=-2), self.config.axes_dim, self.config.theta)

        img, txt = self.img_in(img), self.txt_in(txt)
        n_img, n_txt = img.shape[1], txt.shape[1]  # Ulysses (no-ops in one process): shard [txt, img] and RoPE
        txt, img = parallel.shard_tokens(txt, img)
        pe = parallel.shard_parts(pe, (n_txt, n_img), dim=2)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec=vec, pe=pe)
        for block in self.single_blocks:
            img, txt = block(img, txt, vec=vec, pe=pe)
        return parallel.gather_tokens(self.final_layer(img, vec), n_img)


# ---------------------------------------------------------------- config inference


def _count(shapes: Shapes, group: str) -> int:
    pattern = re.compile(rf"^{group}\.(\d+)\.")
    return 1 + max((int(m.group(1)) for k in shapes if (m := pattern.match(k))), default=-1)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """The RoPE split of ``head_dim`` over (index, row, column) that the weights cannot tell.

    128 gives the released (16, 56, 56); other head dims keep its 2:7:7 proportion in even parts
    (16 -> (4, 6, 6), 32 -> (4, 14, 14)). A diffusers folder's ``config.json`` overrides this.
    """
    side = 2 * (7 * head_dim // 32)
    return (head_dim - 2 * side, side, side)


def flux_dit_config_from_shapes(shapes: Shapes) -> FluxDiTConfig | None:
    """Infer the config from BFL-layout key names and shapes; None when these are not Flux DiT weights."""
    required = ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight")
    if any(k not in shapes for k in required):
        return None
    hidden, in_channels = shapes["img_in.weight"]
    depth, depth_single = _count(shapes, "double_blocks"), _count(shapes, "single_blocks")
    if depth:
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes
    elif depth_single:
        head_dim = shapes["single_blocks.0.norm.query_norm.scale"][0]
        mlp_hidden = shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
        qkv_bias = True
    else:
        return None
    if hidden % head_dim or head_dim % 2:
        return None
    return FluxDiTConfig(
        in_channels=in_channels,
        out_channels=shapes["final_layer.linear.weight"][0],
        vec_in_dim=shapes["vector_in.in_layer.weight"][1],
        context_in_dim=shapes["txt_in.weight"][1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=rope_axes(head_dim),
        qkv_bias=qkv_bias,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def flux_dit_config_from_json(config: Mapping[str, Any], shapes: Shapes | None = None) -> FluxDiTConfig | None:
    """The config of a diffusers ``FluxTransformer2DModel`` folder (``transformer/config.json``)."""
    if config.get("_class_name") != "FluxTransformer2DModel" or config.get("patch_size", 1) != 1:
        return None
    heads, head_dim = config.get("num_attention_heads", 24), config.get("attention_head_dim", 128)
    in_channels = config.get("in_channels", 64)
    return FluxDiTConfig(
        in_channels=in_channels,
        out_channels=config.get("out_channels") or in_channels,
        vec_in_dim=config.get("pooled_projection_dim", 768),
        context_in_dim=config.get("joint_attention_dim", 4096),
        hidden_size=heads * head_dim,
        num_heads=heads,
        depth=config.get("num_layers", 19),
        depth_single_blocks=config.get("num_single_layers", 38),
        axes_dim=tuple(config.get("axes_dims_rope", (16, 56, 56))),
        guidance_embed=bool(config.get("guidance_embeds", False)),
    )

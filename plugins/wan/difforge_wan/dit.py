"""The Wan diffusion transformer (DiT), in Wan-AI's own checkpoint layout (``blocks.N.self_attn.q``, ...).

One model serves Wan2.1 text-to-video (1.3B, 14B) and Wan2.2 TI2V-5B. A latent video
``[B, C, F, H, W]`` is cut into ``1 x 2 x 2`` patches by a strided 3D convolution, giving
``L = F * H/2 * W/2`` tokens. Every block runs, each modulated by the timestep (shift, scale, gate
from a learnt table plus the projected timestep embedding):

- self-attention over all tokens, with RMS-normed queries and keys and a 3D rotary embedding whose
  head dim is split over (frame, row, column) (128 -> 44 / 42 / 42);
- cross-attention to the umT5 text embeddings (through a small MLP), after a plain layer norm;
- a GELU MLP.

A head (adaptive layer norm and a linear layer) maps the tokens back to patches. Timesteps are one
per sample ``[B]``, or one per token ``[B, L]``: Wan2.2 TI2V-5B gives the tokens of a conditioning
first frame timestep 0. Per-token timesteps take few distinct values, so their embeddings are
computed once per value and gathered per token (:class:`TimeModulation`), instead of a
``[B, L, 6, dim]`` table per block.

Block streams: ``block(x, context=..., e=..., rope=...)`` returns ``x`` (:data:`BLOCK_LAYOUT` in the
entry module). All attention goes through :func:`difforge.ops.attention`.
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
"""The rotations ``exp(i * angle)`` of the RoPE channel pairs: complex64, ``[1, 1, L, head_dim / 2]``."""


@dataclass(frozen=True)
class WanDiTConfig:
    """The architecture of a Wan DiT (Wan-AI's ``WanModel`` arguments); the defaults are Wan2.1-T2V-1.3B's.

    ``in_dim`` / ``out_dim`` are latent channels (16 with the Wan 2.1 VAE, 48 with Wan 2.2's);
    ``text_dim`` is the umT5-XXL width. Text is attended to at whatever length it is given
    (the pipeline pads it to 512 tokens, as Wan does).
    """

    in_dim: int = 16
    out_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Head channels rotated by the frame, row and column positions (128 -> 44, 42, 42)."""
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))


WAN21_T2V_1_3B = WanDiTConfig()
WAN21_T2V_14B = WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
WAN22_TI2V_5B = WanDiTConfig(in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30)


# ---------------------------------------------------------------- embeddings


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """``[N]`` timesteps (0..1000) -> ``[N, dim]``: cosines, then sines, computed in float32 (as diffusers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_rotations(grid: tuple[int, int, int], axes: Sequence[int], device: torch.device, theta: float = 10_000.0) -> Rope:
    """The rotary embedding of the ``(frames, rows, columns)`` token grid, in raster order (see :data:`Rope`).

    Axis ``i`` rotates ``axes[i] / 2`` channel pairs at frequencies ``theta ** (-2j / axes[i])``;
    angles in float64 (float32 on devices without it), rotations stored in complex64.
    """
    dtype = torch.float32 if device.type == "mps" else torch.float64
    angles = []
    for i, (n, dim) in enumerate(zip(grid, axes)):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim)
        angle = torch.arange(n, dtype=dtype, device=device)[:, None] * omega  # [n, dim / 2]
        shape = [1, 1, 1, dim // 2]
        shape[i] = n
        angles.append(angle.view(shape).expand(*grid, dim // 2))
    angle = torch.cat(angles, dim=-1).flatten(0, 2)  # [L, head_dim / 2]
    return torch.polar(torch.ones_like(angle), angle).to(torch.complex64)[None, None]


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate the consecutive channel pairs ``(x[2j], x[2j+1])`` of ``x [B, H, L, D]`` by ``rope``, in float32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rope).flatten(-2).type_as(x)


@dataclass
class TimeModulation:
    """Timestep embeddings for the modulation of every token.

    ``values`` ``[N, k, dim]`` (float32) hold ``k`` embedding chunks per distinct timestep; ``index``
    is None when there is one timestep per sample (``N = B``), else ``[B, L]`` and picks each token's.
    """

    values: torch.Tensor
    index: torch.Tensor | None = None

    def chunks(self, table: torch.Tensor) -> list[torch.Tensor]:
        """``table [1, k, dim]`` + the embeddings -> ``k`` tensors ``[B, 1 or L, dim]`` (float32)."""
        mod = table.float() + self.values
        if self.index is None:
            return [m[:, None] for m in mod.unbind(1)]
        return [m[self.index] for m in mod.unbind(1)]


# ---------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """RMS norm over the last dimension with a learnt ``weight`` (queries and keys, all heads at once)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), eps=self.eps)


def layer_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Layer norm over the last dimension in float32 (returns float32)."""
    if weight is not None:
        weight, bias = weight.float(), bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale) + shift`` in float32, returned in ``x``'s dtype."""
    return torch.addcmul(shift, layer_norm(x, eps), 1 + scale).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with q/k/v/o projections and RMS-normed queries and keys (Wan's names)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else None
        self.norm_k = RMSNorm(dim, eps) if qk_norm else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # [B, N, dim] -> [B, H, N, D]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope: Rope | None = None) -> torch.Tensor:
        """Self-attention of ``x`` (with ``rope``), or cross-attention from ``x`` to ``context``."""
        source = x if context is None else context
        q, k, v = self.q(x), self.k(source), self.v(source)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        with parallel.keys_replicated(context is not None):  # Ulysses shards x, never the text
            out = attention(q, k, v)
        return self.o(out.transpose(1, 2).flatten(2))


class WanBlock(nn.Module):
    """Modulated self-attention, cross-attention to the text, modulated MLP (Wan-AI's ``WanAttentionBlock``)."""

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        dim, self.eps = config.dim, config.eps
        self.self_attn = Attention(dim, config.num_heads, config.qk_norm, config.eps)
        self.norm3 = nn.LayerNorm(dim, eps=config.eps) if config.cross_attn_norm else None
        self.cross_attn = Attention(dim, config.num_heads, config.qk_norm, config.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, e: TimeModulation, rope: Rope) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = e.chunks(self.modulation)
        y = self.self_attn(modulate(x, shift1, scale1, self.eps), rope=rope)
        x = torch.addcmul(x.float(), y.float(), gate1).type_as(x)
        y = x if self.norm3 is None else layer_norm(x, self.eps, self.norm3.weight, self.norm3.bias).type_as(x)
        x = x + self.cross_attn(y, context=context)
        y = self.ffn(modulate(x, shift2, scale2, self.eps))
        return torch.addcmul(x.float(), y.float(), gate2).type_as(x)


class Head(nn.Module):
    """Adaptive layer norm (shift, scale from the timestep embedding) and the projection to patches."""

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        self.eps = config.eps
        self.head = nn.Linear(config.dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, config.dim))

    def forward(self, x: torch.Tensor, e: TimeModulation) -> torch.Tensor:
        shift, scale = e.chunks(self.modulation)
        return self.head(modulate(x, shift, scale, self.eps))


# ---------------------------------------------------------------- the model


class WanDiT(nn.Module):
    """The Wan transformer; its ``state_dict`` is Wan-AI's layout (``diffusion_pytorch_model*.safetensors``)."""

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        if config.dim % config.num_heads or config.head_dim % 2 or min(config.rope_axes) < 2:
            raise ConfigError(
                f"WanDiTConfig: dim {config.dim} must split into {config.num_heads} heads of an even size of at least 6"
            )
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self._rope_cache: tuple[Any, Rope] | None = None  # (key, rotations) of the last call

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> Rope:
        """The rotations of a token grid, kept for the next call (an inference-mode tensor is not reused outside)."""
        key = (grid, device, torch.is_inference_mode_enabled())
        if self._rope_cache is None or self._rope_cache[0] != key:
            self._rope_cache = (key, rope_rotations(grid, self.config.rope_axes, device))
        return self._rope_cache[1]

    def time_modulation(self, timestep: torch.Tensor, tokens: int) -> tuple[TimeModulation, TimeModulation]:
        """The head's (``e``) and the blocks' (``e0``) modulation inputs for ``[B]`` or ``[B, L]`` timesteps."""
        index = None
        values = timestep
        if timestep.dim() == 2:
            if timestep.shape[1] != tokens:
                raise ConfigError(f"WanDiT: per-token timesteps {tuple(timestep.shape)} need one per token ({tokens})")
            values, index = torch.unique(timestep, return_inverse=True)
        elif timestep.dim() != 1:
            raise ConfigError(f"WanDiT: timestep must be [B] or [B, L], got {tuple(timestep.shape)}")
        weight = self.time_embedding[0].weight
        e = self.time_embedding(sinusoidal_embedding(values, self.config.freq_dim).to(weight.dtype))
        e0 = self.time_projection(e).float().unflatten(1, (6, -1))
        return TimeModulation(e.float()[:, None], index), TimeModulation(e0, index)

    @parallel.sequence_parallel
    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Predict the flow velocity of a latent video.

        - ``x`` ``[B, in_dim, F, H, W]``: the latents (``H``, ``W`` multiples of the patch size);
        - ``timestep`` ``[B]`` or ``[B, L]`` (one per token): flow time in 0..1000 (``1000 * sigma``);
        - ``context`` ``[B, N, text_dim]``: umT5 embeddings (Wan pads them with zeros to 512 tokens).

        Returns ``[B, out_dim, F, H, W]`` in ``x``'s dtype.
        """
        if x.dim() != 5 or context.dim() != 3:
            raise ConfigError(f"WanDiT takes x [B, C, F, H, W] and context [B, N, D]; got {tuple(x.shape)}, {tuple(context.shape)}")
        b, _, f, h, w = x.shape
        pt, ph, pw = self.config.patch_size
        if f % pt or h % ph or w % pw:
            raise ConfigError(f"WanDiT: latent size {(f, h, w)} is not a multiple of the patch size {(pt, ph, pw)}")
        grid = (f // pt, h // ph, w // pw)
        rope = self.rope(grid, x.device)
        x = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # [B, L, dim]
        e, e0 = self.time_modulation(timestep, x.shape[1])
        context = self.text_embedding(context)
        tokens = x.shape[1]  # Ulysses (no-ops in one process): shard the video tokens, RoPE, per-token timesteps
        (x,) = parallel.shard_tokens(x)
        rope = parallel.shard(rope, 2)
        if e.index is not None:
            e, e0 = (TimeModulation(m.values, parallel.shard(m.index, 1)) for m in (e, e0))
        for block in self.blocks:
            x = block(x, context=context, e=e0, rope=rope)
        x = parallel.gather_tokens(self.head(x, e), tokens)  # [B, L, C * pt * ph * pw]
        x = x.view(b, *grid, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, f, h, w)


# ---------------------------------------------------------------- config inference


def _count(shapes: Shapes, group: str) -> int:
    pattern = re.compile(rf"^{group}\.(\d+)\.")
    return 1 + max((int(m.group(1)) for k in shapes if (m := pattern.match(k))), default=-1)


def default_heads(dim: int) -> int:
    """The head count the weights cannot tell: heads of 128 (every release) when they divide ``dim``,
    else of the largest of 64, 32, 16, 8 that does. A ``config.json`` beside the weights overrides it."""
    for head_dim in (128, 64, 32, 16, 8):
        if dim % head_dim == 0:
            return dim // head_dim
    return 1


def wan_dit_config_from_shapes(shapes: Shapes) -> WanDiTConfig | None:
    """Infer the config from Wan-AI-layout key names and shapes; None when these are not Wan T2V/TI2V weights.

    Image-to-video models with a CLIP image branch (``img_emb``, Wan2.1-I2V) are not supported yet.
    """
    required = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight")
    if any(k not in shapes for k in required) or "img_emb.proj.0.weight" in shapes:
        return None
    if len(shapes["patch_embedding.weight"]) != 5 or not _count(shapes, "blocks"):
        return None
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    out = shapes["head.head.weight"][0]
    if out % math.prod(patch):
        return None
    return WanDiTConfig(
        in_dim=in_dim,
        out_dim=out // math.prod(patch),
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        freq_dim=shapes["time_embedding.0.weight"][1],
        text_dim=shapes["text_embedding.0.weight"][1],
        num_heads=default_heads(dim),
        num_layers=_count(shapes, "blocks"),
        patch_size=tuple(patch),
        qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
    )


def wan_dit_config_from_json(config: Mapping[str, Any], shapes: Shapes | None = None) -> WanDiTConfig | None:
    """The config of a diffusers ``WanTransformer3DModel`` folder or of Wan-AI's ``WanModel`` ``config.json``."""
    name = config.get("_class_name")
    if name == "WanTransformer3DModel":
        if config.get("image_dim") or config.get("added_kv_proj_dim"):
            return None
        heads, head_dim = int(config.get("num_attention_heads", 40)), int(config.get("attention_head_dim", 128))
        in_dim = int(config.get("in_channels", 16))
        return WanDiTConfig(
            in_dim=in_dim,
            out_dim=int(config.get("out_channels") or in_dim),
            dim=heads * head_dim,
            ffn_dim=int(config.get("ffn_dim", 13824)),
            freq_dim=int(config.get("freq_dim", 256)),
            text_dim=int(config.get("text_dim", 4096)),
            num_heads=heads,
            num_layers=int(config.get("num_layers", 40)),
            patch_size=tuple(config.get("patch_size", (1, 2, 2))),
            qk_norm=bool(config.get("qk_norm", "rms_norm_across_heads")),
            cross_attn_norm=bool(config.get("cross_attn_norm", True)),
            eps=float(config.get("eps", 1e-6)),
        )
    if name == "WanModel" or config.get("model_type") in ("t2v", "ti2v"):
        if config.get("model_type", "t2v") not in ("t2v", "ti2v"):
            return None
        base = wan_dit_config_from_shapes(shapes) if shapes else None
        fields = {f: config[f] for f in ("in_dim", "out_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "num_heads", "num_layers")
                  if f in config}  # fmt: skip
        if "patch_size" in config:
            fields["patch_size"] = tuple(config["patch_size"])
        if "eps" in config:
            fields["eps"] = float(config["eps"])
        return WanDiTConfig(**{**(vars(base) if base else {}), **fields})
    return None

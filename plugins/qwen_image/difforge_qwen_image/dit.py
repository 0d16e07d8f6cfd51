"""The Qwen-Image diffusion transformer (MMDiT), in its own checkpoint layout: diffusers' names.

The released ``transformer/`` folder is in diffusers' layout (``transformer_blocks.N.attn.to_q``,
``img_mod.1``, ``txt_mlp.net.2``, ...), and so are ComfyUI's repackaged single files after the
``model.diffusion_model.`` prefix, so one layout serves both without a converter.

The model works on packed latent tokens: a latent ``[B, 16, H/8, W/8]`` is cut into 2x2 patches,
giving ``img`` tokens ``[B, H/16 * W/16, 64]``; the text is the Qwen2.5-VL hidden states
``[B, L, 3584]`` (RMS-normed, then projected). Every block keeps separate weights for the two
streams, which meet only in one joint attention over ``[txt, img]``; both are modulated (shift,
scale, gate) by the timestep embedding.

Positions (MSRoPE): every token has a (frame, row, column) position rotating 16/56/56 of the 128
channels of a head. Image rows and columns are centred (a ``h x w`` token grid takes rows
``-(h - h//2) .. h//2 - 1``), frame 0. Text token ``k`` sits on the diagonal after the image,
at ``(m + k, m + k, m + k)`` with ``m = max(h//2, w//2)``. Padding text tokens are hidden from
every query by the key mask.

Block streams: ``block(img, txt, temb=, rope=, mask=)`` returns ``(img, txt)`` (:data:`BLOCK_LAYOUT`
in the entry module).
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
Rope = tuple[torch.Tensor, torch.Tensor]
"""Rotations ``exp(i * angle)`` (complex64) of the image and text tokens: ``[1, N, 1, D/2]``, ``[1, L, 1, D/2]``
(heads are ``[B, N, H, D]`` while they are normed and rotated)."""


@dataclass(frozen=True)
class QwenImageDiTConfig:
    """The architecture of a Qwen-Image DiT; the defaults are Qwen-Image's (``transformer/config.json``).

    ``in_channels`` is the packed token width (16 latent channels x 2x2), ``out_channels`` the latent
    channels the output unpacks to (``proj_out`` gives ``out_channels * 4`` per token).
    """

    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    num_heads: int = 24
    head_dim: int = 128
    text_dim: int = 3584
    mlp_ratio: float = 4.0
    axes_dim: tuple[int, int, int] = (16, 56, 56)
    theta: int = 10_000

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


QWEN_IMAGE = QwenImageDiTConfig()


# ---------------------------------------------------------------- positions


def _axis_rotations(positions: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """``[N, dim/2]`` rotations of integer positions ``[N]`` at frequencies ``theta ** (-2j / dim)``."""
    dtype = torch.float32 if positions.device.type == "mps" else torch.float64
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=positions.device) / dim)
    angle = positions.to(dtype)[:, None] * omega[None]
    return torch.polar(torch.ones_like(angle), angle).to(torch.complex64)


def centred(n: int, device: torch.device) -> torch.Tensor:
    """Positions ``-(n - n//2) .. n//2 - 1``: a grid side centred on 0 (Qwen-Image's ``scale_rope``)."""
    return torch.arange(n, device=device) - (n - n // 2)


def msrope(height: int, width: int, text_len: int, axes_dim: Sequence[int], theta: int, device: torch.device) -> Rope:
    """The rotary embedding of a ``height x width`` token grid (frame 0, centred rows and columns) and
    of ``text_len`` text tokens on the diagonal after it, see :data:`Rope` and the module docs."""
    frame, rows, cols = axes_dim
    zero = torch.zeros(1, dtype=torch.long, device=device)
    img = torch.cat(
        [
            _axis_rotations(zero, frame, theta).expand(height * width, -1),
            _axis_rotations(centred(height, device), rows, theta).repeat_interleave(width, dim=0),
            _axis_rotations(centred(width, device), cols, theta).repeat(height, 1),
        ],
        dim=-1,
    )
    start = max(height // 2, width // 2)
    text_pos = torch.arange(start, start + text_len, device=device)
    txt = torch.cat([_axis_rotations(text_pos, d, theta) for d in axes_dim], dim=-1)
    return img[None, :, None], txt[None, :, None]


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate the consecutive channel pairs ``(x[2j], x[2j+1])`` of ``x [B, N, H, D]``, in float32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotations).flatten(-2).type_as(x)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` (cosines, then sines) of ``1000 * t``, in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None] * 1000.0
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learnt ``weight`` (eps 1e-6)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), eps=1e-6)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Layer norm without affine parameters (eps 1e-6), before every modulation."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, layer_norm(x), 1 + scale)


class TimestepEmbedder(nn.Module):
    """Linear, SiLU, linear: the sinusoidal timestep embedding lifted to the hidden width."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """Holds the timestep embedder (the released key names: ``time_text_embed.timestep_embedder``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(timesteps).to(dtype))


class GELUProjection(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``net.0.proj`` (GELU, tanh) and ``net.2``, as diffusers' ``FeedForward`` names them."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GELUProjection(dim, hidden), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, N, H * D]`` -> ``[B, N, H, D]`` (a view: norms and RoPE run on contiguous heads)."""
    return x.unflatten(-1, (-1, head_dim))


class JointAttention(nn.Module):
    """Image (``to_*``) and text (``add_*``) projections, QK norms, one attention over ``[txt, img]``."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, rope: Rope, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.head_dim
        img_rot, txt_rot = rope
        img_q = apply_rope(self.norm_q(_heads(self.to_q(img), d)), img_rot)
        img_k = apply_rope(self.norm_k(_heads(self.to_k(img), d)), img_rot)
        txt_q = apply_rope(self.norm_added_q(_heads(self.add_q_proj(txt), d)), txt_rot)
        txt_k = apply_rope(self.norm_added_k(_heads(self.add_k_proj(txt), d)), txt_rot)
        txt_v, img_v = _heads(self.add_v_proj(txt), d), _heads(self.to_v(img), d)
        # joined as contiguous [B, H, L + N, D] (the copy cat makes anyway): attention kernels prefer it
        q, k, v = (torch.cat((t.transpose(1, 2), i.transpose(1, 2)), dim=2)
                   for t, i in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))  # fmt: skip
        out = attention(q, k, v, mask=mask).transpose(1, 2).flatten(2)
        n = txt.shape[1]  # contiguous slices: the projections then add their bias in the matmul (addmm)
        return self.to_out[0](out[:, n:].contiguous()), self.to_add_out(out[:, :n].contiguous())


def _modulation(dim: int) -> nn.Sequential:
    """SiLU, linear to ``(shift, scale, gate)`` x 2 (``img_mod.1`` / ``txt_mod.1``)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))


class QwenImageBlock(nn.Module):
    """One dual-stream block: ``forward(img, txt, temb, rope, mask) -> (img, txt)``."""

    def __init__(self, config: QwenImageDiTConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.img_mod = _modulation(dim)
        self.txt_mod = _modulation(dim)
        self.attn = JointAttention(dim, config.head_dim)
        self.img_mlp = FeedForward(dim, config.mlp_hidden_dim)
        self.txt_mlp = FeedForward(dim, config.mlp_hidden_dim)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, rope: Rope, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_mod = self.img_mod(temb)[:, None].chunk(6, dim=-1)
        txt_mod = self.txt_mod(temb)[:, None].chunk(6, dim=-1)
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = img_mod
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = txt_mod

        img_out, txt_out = self.attn(
            modulate(img, img_shift1, img_scale1), modulate(txt, txt_shift1, txt_scale1), rope, mask
        )
        img = torch.addcmul(img, img_gate1, img_out)  # x + gate * f(x), one fused kernel
        txt = torch.addcmul(txt, txt_gate1, txt_out)
        img = torch.addcmul(img, img_gate2, self.img_mlp(modulate(img, img_shift2, img_scale2)))
        txt = torch.addcmul(txt, txt_gate2, self.txt_mlp(modulate(txt, txt_shift2, txt_scale2)))
        if img.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


class OutputNorm(nn.Module):
    """Adaptive layer norm before ``proj_out``: ``(scale, shift)`` from the timestep embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb))[:, None].chunk(2, dim=-1)
        return modulate(x, shift, scale)


# ---------------------------------------------------------------- the model


class QwenImageDiT(nn.Module):
    """The Qwen-Image transformer; its ``state_dict`` is the released (diffusers) layout."""

    def __init__(self, config: QwenImageDiTConfig) -> None:
        super().__init__()
        if sum(config.axes_dim) != config.head_dim or any(d % 2 for d in config.axes_dim):
            raise ConfigError(
                f"QwenImageDiTConfig: the RoPE axes {config.axes_dim} must be even and add up to "
                f"the head dim {config.head_dim}"
            )
        self.config = config
        dim = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_norm = RMSNorm(config.text_dim)
        self.txt_in = nn.Linear(config.text_dim, dim)
        self.time_text_embed = TimeTextEmbed(dim)
        self.transformer_blocks = nn.ModuleList(QwenImageBlock(config) for _ in range(config.num_layers))
        self.norm_out = OutputNorm(dim)
        self.proj_out = nn.Linear(dim, 4 * config.out_channels)

    @parallel.sequence_parallel
    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        timesteps: torch.Tensor,
        grid: tuple[int, int],
        txt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity of the packed image tokens.

        - ``img`` ``[B, N, in_channels]``: packed latent tokens of a ``grid = (h, w)`` token grid
          (``N = h * w``, row-major; ``h, w`` are the latent height and width halved);
        - ``txt`` ``[B, L, text_dim]``: prompt embeddings, right-padded; ``txt_mask`` ``[B, L]``
          (1/True for tokens, 0/False for padding; None: no padding);
        - ``timesteps`` ``[B]``: the flow time (sigma) in [0, 1].

        Returns ``[B, N, 4 * out_channels]`` in ``img``'s dtype.
        """
        if img.dim() != 3 or txt.dim() != 3:
            raise ConfigError(
                f"QwenImageDiT takes packed tokens [B, N, C]; got img {tuple(img.shape)}, txt {tuple(txt.shape)}"
            )
        h, w = (int(s) for s in grid)
        if h * w != img.shape[1]:
            raise ConfigError(f"QwenImageDiT: grid {h}x{w} does not hold the {img.shape[1]} image tokens given")
        dtype = img.dtype
        # the reference rounds the timestep to the activation dtype before embedding it
        temb = self.time_text_embed(timesteps.to(dtype), dtype)
        rope = msrope(h, w, txt.shape[1], self.config.axes_dim, self.config.theta, img.device)
        mask = None
        if txt_mask is not None:
            txt_mask = txt_mask.to(device=img.device, dtype=torch.bool)
            if txt_mask.shape != txt.shape[:2]:
                raise ConfigError(
                    f"QwenImageDiT: txt_mask {tuple(txt_mask.shape)} does not match txt {tuple(txt.shape)}"
                )
            if not bool(txt_mask.all()):
                keys = torch.cat((txt_mask, txt_mask.new_ones(img.shape[0], img.shape[1])), dim=1)
                mask = keys[:, None, None, :]

        img = self.img_in(img)
        txt = self.txt_in(self.txt_norm(txt))
        n_img, n_txt = img.shape[1], txt.shape[1]  # Ulysses (no-ops in one process): shard [txt, img], RoPE, mask
        txt, img = parallel.shard_tokens(txt, img)
        rope = (parallel.shard(rope[0], 1), parallel.shard(rope[1], 1))
        mask = None if mask is None else parallel.shard_parts(mask, (n_txt, n_img), dim=3)
        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb=temb, rope=rope, mask=mask)
        return parallel.gather_tokens(self.proj_out(self.norm_out(img, temb)), n_img)


# ---------------------------------------------------------------- config inference


def _count(shapes: Shapes, group: str) -> int:
    pattern = re.compile(rf"^{group}\.(\d+)\.")
    return 1 + max((int(m.group(1)) for k in shapes if (m := pattern.match(k))), default=-1)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """The MSRoPE split of ``head_dim`` over (frame, row, column), which the weights cannot tell.

    128 gives the released (16, 56, 56); other head dims keep its 2:7:7 proportion in even parts
    (16 -> (4, 6, 6)). A diffusers ``config.json`` overrides this.
    """
    side = 2 * (7 * head_dim // 32)
    return (head_dim - 2 * side, side, side)


_REQUIRED = ("img_in.weight", "txt_in.weight", "txt_norm.weight", "proj_out.weight",
             "time_text_embed.timestep_embedder.linear_1.weight", "norm_out.linear.weight")  # fmt: skip
_VARIANT_KEYS = ("time_text_embed.addition_t_embedding.weight", "time_text_embed.guidance_embedder.linear_1.weight")


def qwen_image_dit_config_from_shapes(shapes: Shapes) -> QwenImageDiTConfig | None:
    """Infer the config from own-layout key names and shapes; None when these are not Qwen-Image DiT weights."""
    if any(k not in shapes for k in _REQUIRED) or any(k in shapes for k in _VARIANT_KEYS):
        return None
    hidden, in_channels = shapes["img_in.weight"]
    layers = _count(shapes, "transformer_blocks")
    if not layers or "transformer_blocks.0.attn.norm_q.weight" not in shapes:
        return None
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    out = shapes["proj_out.weight"][0]
    if hidden % head_dim or head_dim % 2 or out % 4:
        return None
    return QwenImageDiTConfig(
        in_channels=in_channels,
        out_channels=out // 4,
        num_layers=layers,
        num_heads=hidden // head_dim,
        head_dim=head_dim,
        text_dim=shapes["txt_in.weight"][1],
        mlp_ratio=shapes["transformer_blocks.0.img_mlp.net.0.proj.weight"][0] / hidden,
        axes_dim=rope_axes(head_dim),
    )


def qwen_image_dit_config_from_json(
    config: Mapping[str, Any], shapes: Shapes | None = None
) -> QwenImageDiTConfig | None:
    """The config of a diffusers ``QwenImageTransformer2DModel`` folder (``transformer/config.json``).

    Variants whose forward differs without a change of weights (``zero_cond_t``: Qwen-Image-Edit-2511;
    ``use_layer3d_rope``, ``use_additional_t_cond``: Qwen-Image-Layered) are refused, not silently run wrong.
    """
    if config.get("_class_name") != "QwenImageTransformer2DModel":
        return None
    flags = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds")
    unsupported = [k for k in flags if config.get(k)]
    if unsupported:
        raise ConfigError(
            f"QwenImageTransformer2DModel with {', '.join(f'{k}=true' for k in unsupported)} (Qwen-Image-Edit-2511 / "
            "Layered-style variants) is not supported by difforge-qwen-image yet; use the Qwen-Image text-to-image "
            "release"
        )
    if config.get("patch_size", 2) != 2:
        return None
    heads, head_dim = config.get("num_attention_heads", 24), config.get("attention_head_dim", 128)
    in_channels = config.get("in_channels", 64)
    mlp_ratio = 4.0
    if shapes is not None and "transformer_blocks.0.img_mlp.net.0.proj.weight" in shapes:
        mlp_ratio = shapes["transformer_blocks.0.img_mlp.net.0.proj.weight"][0] / (heads * head_dim)
    return QwenImageDiTConfig(
        in_channels=in_channels,
        out_channels=config.get("out_channels") or in_channels,  # diffusers: None means in_channels
        num_layers=config.get("num_layers", 60),
        num_heads=heads,
        head_dim=head_dim,
        text_dim=config.get("joint_attention_dim", 3584),
        mlp_ratio=mlp_ratio,
        axes_dim=tuple(config.get("axes_dims_rope", (16, 56, 56))),
    )

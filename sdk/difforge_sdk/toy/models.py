"""The toy family's torch modules, config inference and converter functions."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difforge.ops import attention

Shapes = Mapping[str, Sequence[int]]


# ---------------------------------------------------------------- DiT


@dataclass(frozen=True)
class ToyDiTConfig:
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 32
    num_heads: int = 2
    depth: int = 2
    text_dim: int = 16
    mlp_ratio: int = 2


TOY1_CONFIG = ToyDiTConfig()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps in [0, 1000]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ToyAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ToyBlock(nn.Module):
    """Pre-norm joint attention + MLP, modulated (shift/scale/gate) by the timestep embedding."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = ToyAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(approximate="tanh"), nn.Linear(dim * mlp_ratio, dim))
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(nn.functional.silu(temb))[:, None].chunk(6, dim=-1)
        x = hidden_states
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        x = x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
        return x


class ToyFinal(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(nn.functional.silu(temb))[:, None].chunk(2, dim=-1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


class ToyDiT(nn.Module):
    """Patchify the latent, prepend the text tokens, run the blocks, predict the flow velocity."""

    def __init__(self, config: ToyDiTConfig) -> None:
        super().__init__()
        self.config = config
        c, p, d = config.in_channels, config.patch_size, config.hidden_size
        self.x_embedder = nn.Linear(c * p * p, d)
        self.text_embedder = nn.Linear(config.text_dim, d)
        self.time_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(ToyBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final = ToyFinal(d, c * p * p)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        p = self.config.patch_size
        tokens = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        temb = self.time_embed(timestep_embedding(timestep, self.config.hidden_size).to(tokens.dtype))
        text_tokens = self.text_embedder(text)
        x = torch.cat([text_tokens, self.x_embedder(tokens)], dim=1)
        for block in self.blocks:
            x = block(x, temb)
        out = self.final(x[:, text_tokens.shape[1] :], temb)
        return out.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def toy_dit_config_from_shapes(shapes: Shapes) -> ToyDiTConfig | None:
    if "x_embedder.weight" not in shapes or "final.linear.weight" not in shapes:
        return None
    hidden, patch_in = shapes["x_embedder.weight"]
    depth = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    mlp_hidden = shapes["blocks.0.mlp.0.weight"][0] if depth else 2 * hidden
    text_dim = shapes["text_embedder.weight"][1]
    final_out = shapes["final.linear.weight"][0]
    # in_channels * p^2 == patch_in; the toy family always uses p = 2
    patch = 2
    heads = max(1, hidden // 16)
    if final_out != patch_in or patch_in % (patch * patch):
        return None
    return ToyDiTConfig(
        in_channels=patch_in // (patch * patch),
        patch_size=patch,
        hidden_size=hidden,
        num_heads=heads,
        depth=depth,
        text_dim=text_dim,
        mlp_ratio=mlp_hidden // hidden,
    )


# ---------------------------------------------------------------- VAE


@dataclass(frozen=True)
class ToyVAEConfig:
    latent_channels: int = 4
    scaling_factor: float = 0.5
    shift_factor: float = 0.1


class _Conv(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ToyVAE(nn.Module):
    """An 8x patch autoencoder: images in [-1, 1] <-> latents ``[B, C, H/8, W/8]``."""

    def __init__(self, config: ToyVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _Conv(nn.Conv2d(3, config.latent_channels, kernel_size=8, stride=8))
        self.decoder = _Conv(nn.ConvTranspose2d(config.latent_channels, 3, kernel_size=8, stride=8))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return (self.encoder(image) - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.decoder(latents / self.config.scaling_factor + self.config.shift_factor))


def toy_vae_config_from_shapes(shapes: Shapes) -> ToyVAEConfig | None:
    if "encoder.conv.weight" not in shapes:
        return None
    return ToyVAEConfig(latent_channels=shapes["encoder.conv.weight"][0])


# ---------------------------------------------------------------- text encoder


@dataclass(frozen=True)
class ToyTextConfig:
    vocab_size: int = 256
    dim: int = 16
    max_length: int = 8


class _MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class ToyTextEncoder(nn.Module):
    """Bytes of the prompt (truncated/padded to ``max_length``) -> embeddings ``[B, L, dim]``."""

    def __init__(self, config: ToyTextConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.mlp = _MLP(config.dim)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        n = self.config.max_length
        ids = [list(p.encode("utf-8"))[:n] for p in prompts]
        return torch.tensor([row + [0] * (n - len(row)) for row in ids], dtype=torch.long)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(input_ids % self.config.vocab_size)
        return x + self.mlp(x)


def toy_text_config_from_shapes(shapes: Shapes) -> ToyTextConfig | None:
    if "token_embedding.weight" not in shapes:
        return None
    vocab, dim = shapes["token_embedding.weight"]
    return ToyTextConfig(vocab_size=vocab, dim=dim)


# ---------------------------------------------------------------- converter: toy-diffusers <-> toy

_TO_OWN = [
    (r"^patch_embed\.proj\.", "x_embedder."),
    (r"^context_embed\.", "text_embedder."),
    (r"^time_mlp\.linear_1\.", "time_embed.0."),
    (r"^time_mlp\.linear_2\.", "time_embed.2."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_([qkv])\.", r"blocks.\1.attn.to_\2."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.", r"blocks.\1.attn.proj."),
    (r"^transformer_blocks\.(\d+)\.ff\.up\.", r"blocks.\1.mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff\.down\.", r"blocks.\1.mlp.2."),
    (r"^transformer_blocks\.(\d+)\.adaln\.", r"blocks.\1.modulation."),
    (r"^norm_out\.linear\.", "final.modulation."),
    (r"^proj_out\.", "final.linear."),
]
_TO_DIFFUSERS = [
    (r"^x_embedder\.", "patch_embed.proj."),
    (r"^text_embedder\.", "context_embed."),
    (r"^time_embed\.0\.", "time_mlp.linear_1."),
    (r"^time_embed\.2\.", "time_mlp.linear_2."),
    (r"^blocks\.(\d+)\.attn\.to_([qkv])\.", r"transformer_blocks.\1.attn.to_\2."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer_blocks.\1.attn.to_out."),
    (r"^blocks\.(\d+)\.mlp\.0\.", r"transformer_blocks.\1.ff.up."),
    (r"^blocks\.(\d+)\.mlp\.2\.", r"transformer_blocks.\1.ff.down."),
    (r"^blocks\.(\d+)\.modulation\.", r"transformer_blocks.\1.adaln."),
    (r"^final\.modulation\.", "norm_out.linear."),
    (r"^final\.linear\.", "proj_out."),
]


def _apply(rules: list[tuple[str, str]], key: str) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def is_toy_diffusers(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    return any(k.startswith("patch_embed.proj.") for k in keys) and any(".attn.to_q." in k for k in keys)


def toy_diffusers_rename(key: str) -> str | None:
    return _apply(_TO_OWN, key)


def toy_diffusers_inverse_rename(key: str) -> str | None:
    return _apply(_TO_DIFFUSERS, key)


def toy_diffusers_fuse_qkv(sd: dict[str, Any]) -> dict[str, Any]:
    """``blocks.N.attn.to_{q,k,v}.*`` -> ``blocks.N.attn.qkv.*`` (works on meta tensors too)."""
    out = {}
    for key, value in sd.items():
        m = re.match(r"^(blocks\.\d+\.attn\.)to_q\.(weight|bias)$", key)
        if m:
            base, kind = m.groups()
            out[f"{base}qkv.{kind}"] = torch.cat([sd[f"{base}to_{c}.{kind}"] for c in "qkv"], dim=0)
        elif not re.match(r"^blocks\.\d+\.attn\.to_[kv]\.", key):
            out[key] = value
    return out


def toy_diffusers_split_qkv(sd: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in sd.items():
        m = re.match(r"^(blocks\.\d+\.attn\.)qkv\.(weight|bias)$", key)
        if m:
            base, kind = m.groups()
            for c, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{base}to_{c}.{kind}"] = part
        else:
            out[key] = value
    return out

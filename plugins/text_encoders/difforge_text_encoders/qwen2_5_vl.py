"""The Qwen2.5-VL language model as a text encoder (Qwen-Image's text path).

Own layout: the decoder's keys without any prefix (``embed_tokens.weight``,
``layers.N.self_attn.q_proj.weight``, ``norm.weight``), which is what a text-only file with the
usual ``model.`` prefix becomes after the core's generic prefix stripping. Whole checkpoints
(``Qwen2_5_VLForConditionalGeneration``: ``model.layers.N`` or ``model.language_model.layers.N``
beside ``visual.*`` and ``lm_head.weight``) go through the ``qwen2.5-vl-text-full`` converter, which
keeps the language model and drops the vision tower and LM head (the vision tower may come later,
with image editing).

Text-only prompts take the same position for all three MRoPE axes, so the rotary embedding is
plain RoPE there; ``position_ids`` may still be given as ``[3, B, N]`` for multimodal positions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from difforge.errors import ConfigError
from difforge.ops import attention

from ._common import ACTIVATIONS, Shapes, count_indexed

__all__ = [
    "Qwen25VLTextConfig",
    "Qwen25VLTextEncoder",
    "Qwen25VLTextOutput",
    "QWEN2_5_VL_7B",
    "qwen_config_from_shapes",
    "qwen_config_from_json",
    "is_qwen_full",
    "qwen_full_rename",
]


@dataclass(frozen=True)
class Qwen25VLTextConfig:
    """Architecture of the Qwen2.5-VL language model (field names as in transformers' text config)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


QWEN2_5_VL_7B = Qwen25VLTextConfig()
"""Qwen/Qwen2.5-VL-7B-Instruct's language model, as Qwen-Image ships it in ``text_encoder/``."""


class Qwen25VLTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    """``[B, N, hidden]`` after the final norm (Qwen-Image's ``hidden_states[-1]``)."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """With ``output_hidden_states=True``: as transformers, the embeddings, every layer's output,
    the last one replaced by the normed ``last_hidden_state``."""


class Qwen2RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def mrope_cos_sin(config: Qwen25VLTextConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[B, N, head_dim]`` for ``[3, B, N]`` positions (temporal, height, width):
    the frequency bands are split by ``mrope_section`` and band ``i`` takes axis ``i % 3``."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=position_ids.device) / d))
    freqs = position_ids[..., None].float() * inv_freq  # [3, B, N, d/2]
    bands = freqs.split(list(config.mrope_section), dim=-1)
    freqs = torch.cat([band[i % 3] for i, band in enumerate(bands)], dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Qwen2Attention(nn.Module):
    def __init__(self, config: Qwen25VLTextConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.heads * hd)
        self.k_proj = nn.Linear(d, self.kv_heads * hd)
        self.v_proj = nn.Linear(d, self.kv_heads * hd)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        out = attention(q, k, v, mask=mask, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, config: Qwen25VLTextConfig) -> None:
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"Qwen2.5-VL text encoder: unknown hidden_act {config.hidden_act!r}")
        self.act = ACTIVATIONS[config.hidden_act]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    """``forward(hidden_states, cos, sin, mask) -> hidden_states`` (the block contract)."""

    def __init__(self, config: Qwen25VLTextConfig) -> None:
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin, mask)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Qwen25VLTextEncoder(nn.Module):
    """Causal decoder as an encoder: ``forward(input_ids, attention_mask=None, position_ids=None)
    -> Qwen25VLTextOutput``, the same ``last_hidden_state`` as transformers' Qwen2.5-VL language model.

    ``attention_mask`` (``[B, N]``, 1 = token) hides padding keys. Positions default to
    ``0 .. N-1`` as transformers uses for text-only input (with right padding, as Qwen-Image pads,
    these are also the positions older transformers derived from the mask).
    """

    def __init__(self, config: Qwen25VLTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> Qwen25VLTextOutput:
        x = self.embed_tokens(input_ids)
        b, n = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(n, device=x.device)[None].expand(b, n)
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, b, n)
        cos, sin = mrope_cos_sin(self.config, position_ids.to(x.device), x.dtype)
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
            mask = mask | ~mask.any(dim=-1, keepdim=True)  # a padding row with nothing to see attends to all
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x
        return Qwen25VLTextOutput(x, tuple(hidden) if hidden is not None else None)


# ---------------------------------------------------------------- config inference

_OWN_KEY = re.compile(
    r"^(embed_tokens\.weight|norm\.weight"
    r"|layers\.\d+\.(self_attn\.(q|k|v)_proj\.(weight|bias)|self_attn\.o_proj\.weight"
    r"|mlp\.(gate|up|down)_proj\.weight|(input|post_attention)_layernorm\.weight))$"
)
_HEAD_DIM = 128
"""Not in the shapes: every Qwen2.5-VL size (3B, 7B, 32B, 72B) uses 128-wide heads."""


def qwen_config_from_shapes(shapes: Shapes) -> Qwen25VLTextConfig | None:
    """Infer the config from own-layout keys; None when these are not (only) the language model's."""
    if "embed_tokens.weight" not in shapes or "layers.0.self_attn.q_proj.bias" not in shapes:
        return None
    if not all(_OWN_KEY.match(k) for k in shapes):
        return None
    vocab, hidden = shapes["embed_tokens.weight"]
    return Qwen25VLTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=count_indexed(shapes, "layers."),
        num_attention_heads=shapes["layers.0.self_attn.q_proj.weight"][0] // _HEAD_DIM,
        num_key_value_heads=shapes["layers.0.self_attn.k_proj.weight"][0] // _HEAD_DIM,
    )


def qwen_config_from_json(config: Mapping[str, Any], shapes: Shapes) -> Qwen25VLTextConfig | None:
    """A transformers ``config.json`` of model type ``qwen2_5_vl`` (text fields at the top level, as
    transformers 4 wrote them, or under ``text_config``) -> config."""
    if config.get("model_type") not in ("qwen2_5_vl", "qwen2_5_vl_text") or qwen_config_from_shapes(shapes) is None:
        return None
    text = {**config, **(config.get("text_config") or {})}
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    d = QWEN2_5_VL_7B
    get = lambda name: text.get(name, getattr(d, name))  # noqa: E731
    return Qwen25VLTextConfig(
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=get("num_attention_heads"),
        num_key_value_heads=get("num_key_value_heads"),
        rms_norm_eps=get("rms_norm_eps"),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", d.rope_theta))),
        mrope_section=tuple(rope.get("mrope_section", d.mrope_section)),
        hidden_act=get("hidden_act"),
    )


# ---------------------------------------------------------------- converter: whole Qwen2.5-VL checkpoints

_LANGUAGE = re.compile(r"^(model\.)?(language_model\.)?(?=(embed_tokens|layers|norm)\.)")
_DROPPED = re.compile(r"^(model\.)?(visual\.|lm_head\.)")
_PREFIXED_Q = re.compile(r"^(model\.|language_model\.)(language_model\.)?layers\.0\.self_attn\.q_proj\.bias$")


def is_qwen_full(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """A whole ``Qwen2_5_VLForConditionalGeneration`` (or ``Qwen2_5_VLModel``): the language model
    under ``model.`` / ``model.language_model.`` / ``language_model.``, beside a vision tower or LM head."""
    keys = list(keys)
    prefixed = any(_PREFIXED_Q.match(k) for k in keys)
    return prefixed and any(_DROPPED.match(k) or k.startswith("language_model.") for k in keys)


def qwen_full_rename(key: str) -> str | None:
    if _DROPPED.match(key):
        return None
    new, n = _LANGUAGE.subn("", key)
    return new if n else None

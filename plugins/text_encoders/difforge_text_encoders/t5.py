"""The T5 encoder: T5 v1.1 (FLUX.1's T5-XXL) and umT5 (Wan's umT5-XXL), in transformers' key layout.

One module serves both; they differ only in where the relative position bias lives: T5 computes it
with the table of the first block and shares it with every block, umT5 gives every block its own
table (``position_bias_per_layer``). Keys are transformers' ``T5EncoderModel`` / ``UMT5EncoderModel``
ones (``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.q.weight``, ...).

Attention: T5 adds a learned relative position bias to the attention scores and does not scale
them. :func:`difforge.ops.attention` takes a boolean mask only (no additive bias yet), so this module
computes its attention with :func:`torch.nn.functional.scaled_dot_product_attention` and a float
bias directly (:func:`biased_attention`). Once the op grows an additive ``bias=`` argument, that one
function switches to it and attention backends serve T5 too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from difforge.errors import ConfigError

from ._common import ACTIVATIONS, Shapes, count_indexed

__all__ = [
    "T5EncoderConfig",
    "T5Encoder",
    "T5EncoderOutput",
    "T5BiasContext",
    "T5_V1_1_XXL",
    "UMT5_XXL",
    "biased_attention",
    "relative_position_buckets",
    "t5_config_from_shapes",
    "umt5_config_from_shapes",
    "t5_config_from_json",
    "umt5_config_from_json",
]


@dataclass(frozen=True)
class T5EncoderConfig:
    """Architecture of a T5-style encoder (field names as in transformers' ``T5Config``)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    position_bias_per_layer: bool = False
    """False: T5 (block 0's table, shared); True: umT5 (a table per block)."""

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """transformers' ``dense_act_fn``: ``gated-gelu`` means the tanh GELU (``gelu_new``)."""
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]


T5_V1_1_XXL = T5EncoderConfig()
"""google/t5-v1_1-xxl's encoder, as FLUX.1 ships it in ``text_encoder_2/``."""
UMT5_XXL = T5EncoderConfig(vocab_size=256384, position_bias_per_layer=True)
"""google/umt5-xxl's encoder, as Wan ships it (``models_t5_umt5-xxl-enc-bf16.pth``)."""


class T5EncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    """``[B, N, d_model]`` after the final layer norm."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """With ``output_hidden_states=True``: the embeddings and every block's output."""


def relative_position_buckets(n_q: int, n_k: int, num_buckets: int, max_distance: int, device: Any) -> torch.Tensor:
    """``[n_q, n_k]`` bucket ids of ``key - query`` offsets, bidirectional (T5's encoder scheme)."""
    rel = torch.arange(n_k, device=device)[None, :] - torch.arange(n_q, device=device)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Unscaled attention with an additive bias ``[B|1, H, Nq, Nk]`` over ``[B, H, N, D]`` tensors.

    Not :func:`difforge.ops.attention`: that op takes boolean masks only (see the module docs).
    """
    return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' guard against fp16 overflow in T5 blocks (a no-op in other dtypes)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return x.clamp(min=-limit, max=limit)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias; the statistic is taken in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.heads, self.num_buckets = config.num_heads, config.relative_attention_num_buckets
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def position_bias(self, buckets: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``[1, H, Nq, Nk]`` from this layer's table, in ``like``'s dtype."""
        values = self.relative_attention_bias(buckets)
        return values.permute(2, 0, 1)[None].to(like.dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = biased_attention(q, k, v, bias)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5DenseReluDense(nn.Module):
    """The feed-forward: gated (``wi_0``, ``wi_1``, ``wo``; T5 v1.1) or plain (``wi``, ``wo``; T5 v1.0)."""

    def __init__(self, config: T5EncoderConfig) -> None:
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise ConfigError(f"T5 encoder: unknown feed_forward_proj {config.feed_forward_proj!r}")
        self.act = ACTIVATIONS[config.activation]
        self.gated = config.is_gated
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5EncoderConfig) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


@dataclass
class T5BiasContext:
    """What every block's attention bias is made of, for one forward; passed unchanged to each block.

    ``buckets``: ``[N, N]`` relative position buckets; ``mask_bias``: ``[B, 1, 1, N]`` additive padding
    mask (or None); ``shared``: the last bias a block with a table computed. T5's block 0 fills it and
    the other blocks reuse it; every umT5 block computes its own. The bias is made inside the block
    that owns the table, so offload backends that materialise weights per block work unchanged.
    """

    buckets: torch.Tensor
    mask_bias: torch.Tensor | None = None
    shared: torch.Tensor | None = None


class T5Block(nn.Module):
    """``forward(hidden_states, bias: T5BiasContext) -> hidden_states`` (the block contract)."""

    def __init__(self, config: T5EncoderConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.has_relative_attention_bias = has_relative_attention_bias
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)])

    def forward(self, hidden_states: torch.Tensor, bias: T5BiasContext) -> torch.Tensor:
        attn, ff = self.layer
        if self.has_relative_attention_bias:
            bias.shared = attn.SelfAttention.position_bias(bias.buckets, hidden_states)
            if bias.mask_bias is not None:
                bias.shared = bias.shared + bias.mask_bias
        if bias.shared is None:
            raise ConfigError("T5 encoder: a block without a relative position table ran before one with it")
        hidden_states = _clamp_fp16(hidden_states + attn.SelfAttention(attn.layer_norm(hidden_states), bias.shared))
        return _clamp_fp16(hidden_states + ff.DenseReluDense(ff.layer_norm(hidden_states)))


class T5Stack(nn.Module):
    def __init__(self, config: T5EncoderConfig) -> None:
        super().__init__()
        per_layer = config.position_bias_per_layer
        self.block = nn.ModuleList(T5Block(config, per_layer or i == 0) for i in range(config.num_layers))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """T5 / umT5 encoder: ``forward(input_ids, attention_mask=None) -> T5EncoderOutput``.

    Same ``last_hidden_state`` as transformers' ``T5EncoderModel`` / ``UMT5EncoderModel``.
    ``attention_mask`` (``[B, N]``, 1 = token, 0 = padding) hides padding keys; FLUX.1 passes none
    (its T5 sees its padding), Wan passes one.
    """

    def __init__(self, config: T5EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> T5EncoderOutput:
        cfg = self.config
        x = self.shared(input_ids)
        n = input_ids.shape[-1]
        buckets = relative_position_buckets(n, n, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, x.device)
        bias = T5BiasContext(buckets)
        if attention_mask is not None:
            keep = attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
            bias.mask_bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        hidden = [x] if output_hidden_states else None
        for block in self.encoder.block:
            x = block(x, bias)
            if hidden is not None:
                hidden.append(x)
        x = self.encoder.final_layer_norm(x)
        return T5EncoderOutput(x, tuple(hidden) if hidden is not None else None)


# ---------------------------------------------------------------- config inference

_BLOCK = "encoder.block."
_ATTN0 = "encoder.block.0.layer.0.SelfAttention."
_FF0 = "encoder.block.0.layer.1.DenseReluDense."
_OWN_KEY = re.compile(
    r"^(shared|encoder\.final_layer_norm"
    r"|encoder\.block\.\d+\.layer\.0\.(SelfAttention\.(q|k|v|o|relative_attention_bias)|layer_norm)"
    r"|encoder\.block\.\d+\.layer\.1\.(DenseReluDense\.(wi|wi_0|wi_1|wo)|layer_norm))\.weight$"
)


def _config_from_shapes(shapes: Shapes) -> T5EncoderConfig | None:
    """The config of an own-layout state dict; None when keys are missing or foreign ones present."""
    if "shared.weight" not in shapes or f"{_ATTN0}q.weight" not in shapes:
        return None
    if not all(_OWN_KEY.match(k) for k in shapes):
        return None
    table = shapes.get(f"{_ATTN0}relative_attention_bias.weight")
    if table is None:
        return None
    vocab, d_model = shapes["shared.weight"]
    buckets, heads = table  # the bias table is [buckets, heads]: T5's head count is in the shapes
    gated = f"{_FF0}wi_0.weight" in shapes
    return T5EncoderConfig(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=shapes[f"{_ATTN0}q.weight"][0] // heads,
        d_ff=shapes[f"{_FF0}wi_0.weight" if gated else f"{_FF0}wi.weight"][0],
        num_layers=count_indexed(shapes, _BLOCK),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
        position_bias_per_layer=f"{_BLOCK}1.layer.0.SelfAttention.relative_attention_bias.weight" in shapes,
    )


def t5_config_from_shapes(shapes: Shapes) -> T5EncoderConfig | None:
    """T5 (one bias table, in block 0). A one-block encoder is taken as T5; the two compute the same."""
    config = _config_from_shapes(shapes)
    return config if config is not None and not config.position_bias_per_layer else None


def umt5_config_from_shapes(shapes: Shapes) -> T5EncoderConfig | None:
    """umT5 (a bias table in every block)."""
    config = _config_from_shapes(shapes)
    return config if config is not None and config.position_bias_per_layer else None


def _config_from_json(config: Mapping[str, Any], shapes: Shapes, per_layer: bool) -> T5EncoderConfig | None:
    inferred = _config_from_shapes(shapes)
    if inferred is None or inferred.position_bias_per_layer != per_layer:  # not (only) this model's keys
        return None
    d = T5EncoderConfig(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj="relu")
    get = lambda name: config.get(name, getattr(d, name))  # noqa: E731
    return T5EncoderConfig(
        vocab_size=get("vocab_size"),
        d_model=get("d_model"),
        d_kv=get("d_kv"),
        d_ff=get("d_ff"),
        num_layers=get("num_layers"),
        num_heads=get("num_heads"),
        relative_attention_num_buckets=get("relative_attention_num_buckets"),
        relative_attention_max_distance=get("relative_attention_max_distance"),
        layer_norm_epsilon=get("layer_norm_epsilon"),
        feed_forward_proj=get("feed_forward_proj"),
        position_bias_per_layer=per_layer,
    )


def t5_config_from_json(config: Mapping[str, Any], shapes: Shapes) -> T5EncoderConfig | None:
    """A transformers ``config.json`` of model type ``t5`` (or ``mt5``) -> config."""
    if config.get("model_type") not in ("t5", "mt5"):
        return None
    return _config_from_json(config, shapes, per_layer=False)


def umt5_config_from_json(config: Mapping[str, Any], shapes: Shapes) -> T5EncoderConfig | None:
    """A transformers ``config.json`` of model type ``umt5`` -> config."""
    if config.get("model_type") != "umt5":
        return None
    return _config_from_json(config, shapes, per_layer=True)


# ---------------------------------------------------------------- converter: whole T5 checkpoints

_UNUSED = re.compile(r"^(decoder\.|lm_head\.|spiece_model$)")


def _is_t5_with_extras(keys: Sequence[str], per_layer: bool) -> bool:
    keys = set(keys)
    if f"{_ATTN0}q.weight" not in keys or not ("shared.weight" in keys or "encoder.embed_tokens.weight" in keys):
        return False
    if per_layer != (f"{_BLOCK}1.layer.0.SelfAttention.relative_attention_bias.weight" in keys):
        return False
    return "encoder.embed_tokens.weight" in keys or any(_UNUSED.match(k) for k in keys)


def is_t5_with_extras(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """A T5 checkpoint with more than the encoder: the tied ``encoder.embed_tokens.weight`` copy
    (files written from a state dict rather than ``save_pretrained``), a decoder and LM head, or the
    tokenizer ComfyUI embeds as a ``spiece_model`` byte tensor."""
    return _is_t5_with_extras(keys, per_layer=False)


def is_umt5_with_extras(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    return _is_t5_with_extras(keys, per_layer=True)


def t5_drop_unused(key: str) -> str | None:
    return None if _UNUSED.match(key) else key


def t5_untie_embeddings(sd: dict[str, Any]) -> dict[str, Any]:
    """Keep one embedding table: ``shared.weight`` (taken from ``encoder.embed_tokens`` if need be)."""
    sd = dict(sd)
    tied = sd.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in sd and tied is not None:
        sd["shared.weight"] = tied
    return sd


# ---------------------------------------------------------------- converter: Wan-AI's umT5 .pth <-> own

_WAN_TO_OWN = [
    (r"^token_embedding\.weight$", "shared.weight"),
    (r"^norm\.weight$", "encoder.final_layer_norm.weight"),
    (r"^blocks\.(\d+)\.norm1\.weight$", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"^blocks\.(\d+)\.attn\.([qkvo])\.weight$", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (r"^blocks\.(\d+)\.pos_embedding\.embedding\.weight$", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"^blocks\.(\d+)\.norm2\.weight$", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"^blocks\.(\d+)\.ffn\.fc1\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"^blocks\.(\d+)\.ffn\.fc2\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
]
_OWN_TO_WAN = [
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.final_layer_norm\.weight$", "norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", r"blocks.\1.norm1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$", r"blocks.\1.attn.\2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$", r"blocks.\1.pos_embedding.embedding.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", r"blocks.\1.norm2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$", r"blocks.\1.ffn.gate.0.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$", r"blocks.\1.ffn.fc1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$", r"blocks.\1.ffn.fc2.weight"),
]


def _apply(rules: list[tuple[str, str]], key: str) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def is_wan_umt5(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """Wan-AI's ``models_t5_umt5-xxl-enc-bf16.pth`` layout (``blocks.N.attn.q.weight``, ...)."""
    keys = set(keys)
    return {"token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.gate.0.weight"} <= keys and (
        "blocks.0.pos_embedding.embedding.weight" in keys
    )


def wan_umt5_rename(key: str) -> str | None:
    return _apply(_WAN_TO_OWN, key)


def wan_umt5_inverse_rename(key: str) -> str | None:
    return _apply(_OWN_TO_WAN, key)

"""The CLIP text encoder (transformers' ``CLIPTextModel``), in transformers' key layout.

FLUX.1 uses CLIP ViT-L/14's pooled output; SD-style pipelines use the hidden states. Key names are
transformers' (``text_model.encoder.layers.N.self_attn.q_proj.weight``), which is also how ComfyUI's
``clip_l.safetensors`` and FLUX's ``text_encoder/`` ship it, so both load without conversion.
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
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "CLIPTextOutput",
    "CLIP_VIT_L_14",
    "clip_config_from_shapes",
    "clip_config_from_json",
    "is_clip_with_extras",
    "clip_drop_extras",
    "is_clip_flat",
    "clip_flat_rename",
    "clip_flat_inverse_rename",
]


@dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text tower (field names as in transformers' ``CLIPTextConfig``).

    ``eos_token_id == 2`` selects transformers' legacy pooling (the position of the largest token id,
    which is the first ``<|endoftext|>`` for the original vocabulary); any other value pools at the
    first occurrence of that id. ``projection_dim`` is set when the checkpoint has ``text_projection``.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    projection_dim: int | None = None


CLIP_VIT_L_14 = CLIPTextConfig()
"""openai/clip-vit-large-patch14's text model, as FLUX.1 ships it in ``text_encoder/``."""


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    """``[B, N, D]`` after the final layer norm."""
    pooled_output: torch.Tensor
    """``[B, D]``: ``last_hidden_state`` at the end-of-text token (not projected)."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """With ``output_hidden_states=True``: the embeddings and every layer's output (before the final norm)."""


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[-1]
        if n > self.position_embedding.num_embeddings:
            raise ConfigError(
                f"CLIP text encoder: {n} tokens exceed its {self.position_embedding.num_embeddings} positions; "
                "truncate the prompt (the CLIP tokenizer does with max_length=77)"
            )
        positions = torch.arange(n, device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, mask=mask, scale=(d // self.heads) ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"CLIP text encoder: unknown hidden_act {config.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm attention + MLP. ``forward(hidden_states, mask) -> hidden_states`` (the block contract)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    """CLIP's causal text transformer: ``forward(input_ids, attention_mask=None) -> CLIPTextOutput``.

    Same outputs as transformers' ``CLIPTextModel`` (``last_hidden_state``, ``pooler_output`` as
    ``pooled_output``). ``attention_mask`` (``[B, N]``, 1 = token) is optional, as there: FLUX.1 passes
    none and relies on causality. When the checkpoint carries ``text_projection``, :meth:`project`
    applies it (``CLIPTextModelWithProjection.text_embeds``).
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        tm = self.text_model
        x = tm.embeddings(input_ids)
        n = input_ids.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        hidden = [x] if output_hidden_states else None
        for layer in tm.encoder.layers:
            x = layer(x, mask)
            if hidden is not None:
                hidden.append(x)
        x = tm.final_layer_norm(x)
        return CLIPTextOutput(x, self._pool(x, input_ids), tuple(hidden) if hidden is not None else None)

    def _pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(device=last_hidden_state.device, dtype=torch.int)
        if self.config.eos_token_id == 2:  # transformers' legacy rule: the largest id is <|endoftext|>
            index = ids.argmax(dim=-1)
        else:
            index = (ids == self.config.eos_token_id).int().argmax(dim=-1)
        return last_hidden_state[torch.arange(ids.shape[0], device=ids.device), index]

    def project(self, pooled_output: torch.Tensor) -> torch.Tensor:
        """``text_projection(pooled_output)``; only for checkpoints that carry the projection."""
        if self.config.projection_dim is None:
            raise ConfigError("this CLIP text encoder checkpoint has no text_projection weight to project with")
        return self.text_projection(pooled_output)


# ---------------------------------------------------------------- config inference

_TOKENS = "text_model.embeddings.token_embedding.weight"
_LAYERS = "text_model.encoder.layers."

# The head count is not in the shapes. Every released CLIP text tower uses 64-wide heads; OpenAI's
# (widths 512, 768) use quick_gelu, OpenCLIP's (1024 ViT-H, 1280 ViT-bigG) use exact gelu.
_OPENAI_WIDTHS = (512, 768)
_OWN_KEY = re.compile(
    r"^text_model\.(embeddings\.(token|position)_embedding\.weight"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias))$|^text_projection\.weight$"
)


def clip_config_from_shapes(shapes: Shapes) -> CLIPTextConfig | None:
    """Infer the config from transformers-layout keys; None when these are not CLIP text weights
    or when other keys are present too (those files go through a converter)."""
    if _TOKENS not in shapes or f"{_LAYERS}0.self_attn.q_proj.weight" not in shapes:
        return None
    if not all(_OWN_KEY.match(k) for k in shapes):
        return None
    vocab, width = shapes[_TOKENS]
    positions = shapes.get("text_model.embeddings.position_embedding.weight", (77, width))[0]
    projection = shapes.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=shapes[f"{_LAYERS}0.mlp.fc1.weight"][0],
        num_hidden_layers=count_indexed(shapes, _LAYERS),
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=positions,
        hidden_act="quick_gelu" if width in _OPENAI_WIDTHS else "gelu",
        projection_dim=projection[0] if projection is not None else None,
    )


def clip_config_from_json(config: Mapping[str, Any], shapes: Shapes) -> CLIPTextConfig | None:
    """A transformers ``config.json`` (``clip_text_model``, or ``clip`` with ``text_config``) -> config
    (None unless ``shapes`` are own-layout CLIP text weights)."""
    if config.get("model_type") == "clip":
        config = config.get("text_config") or {}
    elif config.get("model_type") != "clip_text_model":
        return None
    inferred = clip_config_from_shapes(shapes)
    if inferred is None:  # not (only) this model's own keys
        return None
    defaults = CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_attention_heads=8)  # transformers' defaults
    get = lambda name: config.get(name, getattr(defaults, name))  # noqa: E731
    return CLIPTextConfig(
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=get("num_attention_heads"),
        max_position_embeddings=get("max_position_embeddings"),
        hidden_act=get("hidden_act"),
        layer_norm_eps=get("layer_norm_eps"),
        eos_token_id=get("eos_token_id"),
        projection_dim=inferred.projection_dim,
    )


# ---------------------------------------------------------------- converter: keys a text encoder does not use

_EXTRAS = re.compile(r"^(text_model\.embeddings\.position_ids$|vision_model\.|visual_projection\.|logit_scale$)")


def is_clip_with_extras(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """A CLIP checkpoint with keys the text encoder has no use for: the ``position_ids`` buffer older
    transformers saved, or a whole ``CLIPModel`` (vision tower, ``logit_scale``)."""
    return _TOKENS in keys and any(_EXTRAS.match(k) for k in keys)


def clip_drop_extras(key: str) -> str | None:
    return None if _EXTRAS.match(key) else key


# ---------------------------------------------------------------- converter: transformers 5's flat layout

_FLAT = ("embeddings.token_embedding.weight", "encoder.layers.0.self_attn.q_proj.weight", "final_layer_norm.weight")


def is_clip_flat(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """``CLIPTextModel`` as transformers 5 saves a model it did not load from a legacy file:
    without the ``text_model.`` prefix (``embeddings.token_embedding.weight``, ``encoder.layers.N...``)."""
    keys = set(keys)
    return all(k in keys for k in _FLAT) and not any(k.startswith("text_model.") for k in keys)


def clip_flat_rename(key: str) -> str | None:
    if key == "embeddings.position_ids":
        return None
    return key if key.startswith("text_projection.") else f"text_model.{key}"


def clip_flat_inverse_rename(key: str) -> str | None:
    return key.removeprefix("text_model.")

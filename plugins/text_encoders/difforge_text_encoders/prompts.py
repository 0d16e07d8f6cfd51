"""Prompt encoding the family pipelines share, to the token as the reference pipelines do it.

- :func:`clip_pooled`: FLUX.1's CLIP input, the pooled output of prompts padded to 77 tokens;
- :func:`t5_embeddings`: FLUX.1's T5 input, every position of prompts padded to ``max_length``,
  the encoder seeing its padding (no mask), as diffusers and BFL do;
- :func:`masked_embeddings`: the encoder run with the padding mask, its padding positions then
  zeroed (Wan's umT5, ``pad_to=max_length``), or the valid tokens gathered with a prefix dropped
  and padded to the longest (Qwen-Image, ``drop=34``), via :func:`gather_valid`.

Family-specific parts (templates, text cleaning, how many tokens to drop) stay in the family plugins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .tokenization import TextTokenizer

__all__ = ["clip_pooled", "t5_embeddings", "masked_embeddings", "gather_valid"]


def _device(module: torch.nn.Module, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def clip_pooled(
    tokenizer: TextTokenizer, encoder: torch.nn.Module, prompts: str | Sequence[str], max_length: int = 77, device: Any = None
) -> torch.Tensor:
    """``[B, D]``: the CLIP pooled output of the prompts, padded to ``max_length`` (FLUX.1)."""
    ids, _ = tokenizer(prompts, max_length=max_length, padding="max_length")
    return encoder(ids.to(_device(encoder, device))).pooled_output


def t5_embeddings(
    tokenizer: TextTokenizer, encoder: torch.nn.Module, prompts: str | Sequence[str], max_length: int = 512, device: Any = None
) -> torch.Tensor:
    """``[B, max_length, D]``: every position of the prompts padded to ``max_length``, encoded without a
    mask (FLUX.1-dev uses 512 tokens, FLUX.1-schnell 256)."""
    ids, _ = tokenizer(prompts, max_length=max_length, padding="max_length")
    return encoder(ids.to(_device(encoder, device))).last_hidden_state


def gather_valid(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor, drop: int = 0, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's valid positions (mask 1), the first ``drop`` of them removed, right-padded with zeros
    to ``pad_to`` (default: the longest row). Returns ``(embeddings [B, L, D], mask [B, L])``."""
    rows = [h[m.bool()][drop:] for h, m in zip(hidden_states, attention_mask.to(hidden_states.device))]
    width = pad_to if pad_to is not None else max(r.shape[0] for r in rows)
    out = hidden_states.new_zeros(len(rows), width, hidden_states.shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=hidden_states.device)
    for i, row in enumerate(rows):
        row = row[:width]
        out[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    return out, mask


def masked_embeddings(
    tokenizer: TextTokenizer,
    encoder: torch.nn.Module,
    prompts: str | Sequence[str],
    max_length: int,
    padding: str = "max_length",
    drop: int = 0,
    pad_to: int | None = None,
    device: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode with the padding mask, then :func:`gather_valid`. Wan: ``padding="max_length",
    pad_to=max_length``; Qwen-Image: ``padding="longest", drop=34`` (after applying its template)."""
    ids, mask = tokenizer(prompts, max_length=max_length, padding=padding)
    dev = _device(encoder, device)
    hidden = encoder(ids.to(dev), mask.to(dev)).last_hidden_state
    return gather_valid(hidden, mask, drop=drop, pad_to=pad_to)

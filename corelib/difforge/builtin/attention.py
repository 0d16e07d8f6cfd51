"""The core's attention backends: ``sdpa`` (torch's fused kernels) and ``math`` (the reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..specs import AttentionQuery


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def sdpa_supports(query: AttentionQuery) -> bool | str:
    return True


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Plain softmax(q k^T * scale) v in float32: the reference every other backend is tested against."""
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v).to(dtype)


def math_supports(query: AttentionQuery) -> bool | str:
    return True

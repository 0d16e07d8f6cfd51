"""The ``triton`` attention backend: ``supports`` (what the kernel can serve) and the call itself.

``supports`` imports neither triton nor the kernel, so ``auto`` dispatch can ask it cheaply; the
kernel module is imported on the first call.
"""

from __future__ import annotations

import functools
import os

import torch

from difforge.specs import AttentionQuery

__all__ = ["attention", "supports", "HEAD_DIMS", "DTYPES"]

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_BATCH_HEADS = 65535  # the kernel's grid carries batch * heads on CUDA's second axis
MIN_CAPABILITY = (8, 0)


@functools.lru_cache(maxsize=None)
def _capability() -> tuple[int, int] | None:
    try:
        return torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover - a broken driver
        return None


def _broadcastable(shape: tuple[int, ...], target: tuple[int, int, int, int]) -> bool:
    if len(shape) > 4:
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def supports(query: AttentionQuery) -> bool | str:
    """True if the Triton kernel can serve ``query``, else the reason it cannot."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        if query.device_type != "cuda":
            return f"the Triton kernel runs on CUDA devices, not {query.device_type} (or anywhere under TRITON_INTERPRET=1)"
        cap = _capability()
        if cap is not None and cap < MIN_CAPABILITY:
            return f"the Triton kernel needs an Ampere or newer GPU (compute capability >= 8.0), this one is {cap[0]}.{cap[1]}"
        if query.batch * query.heads > MAX_BATCH_HEADS:
            return f"batch x heads = {query.batch * query.heads} exceeds the kernel's grid limit of {MAX_BATCH_HEADS}"
    if query.dtype not in DTYPES:
        return f"dtype {str(query.dtype).replace('torch.', '')} is not supported (float16, bfloat16 or float32)"
    if query.head_dim not in HEAD_DIMS:
        return f"head dim {query.head_dim} is not supported (64 or 128)"
    if query.q_len == 0 or query.kv_len == 0:
        return "empty query or key sequence"
    if query.has_mask and query.mask_shape is not None:
        target = (query.batch, query.heads, query.q_len, query.kv_len)
        if not _broadcastable(query.mask_shape, target):
            return f"mask of shape {query.mask_shape} does not broadcast to [B, H, Nq, Nk] = {list(target)}"
    return True


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Attention over ``[B, H, N, D]`` tensors with the fused Triton kernel (see :mod:`.kernel`)."""
    from .kernel import flash_attention

    return flash_attention(q, k, v, mask=mask, scale=scale)

"""``difforge.ops.attention``: scaled dot-product attention dispatched to a registered backend.

The backend is chosen, in this order, by the ``backend=`` argument, the innermost
:func:`use_attention` context (pipelines set it from their ``attention=`` option), the
``DIFFORGE_ATTENTION`` variable, and else ``auto``. A backend asked for by name is used strictly:
if it cannot serve the call, a :class:`~difforge.errors.ConfigError` says why; it never silently
falls back. ``auto`` takes the highest-priority backend whose ``supports()`` accepts the call.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .._names import normalize_name, resolve
from ..errors import ConfigError
from ..parallel.sequence import sequence_attention, sharding
from ..specs import AttentionQuery, AttentionSpec

__all__ = ["attention", "use_attention", "attention_backend", "current_attention_backend"]

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("difforge_attention", default=None)
_cache: dict[tuple[int, str], tuple[AttentionSpec, Callable[..., torch.Tensor], Callable[[AttentionQuery], Any]]] = {}


def current_attention_backend() -> str:
    """The backend name :func:`attention` uses when none is passed."""
    return _current.get() or os.environ.get("DIFFORGE_ATTENTION") or "auto"


@contextlib.contextmanager
def use_attention(name: str | None) -> Iterator[None]:
    """Within this context, :func:`attention` calls without ``backend=`` use ``name``.

    ``None`` keeps the surrounding choice. Nested contexts and threads are independent
    (a :mod:`contextvars` variable); the previous choice is restored even on error.
    """
    if name is None:
        yield
        return
    token = _current.set(name)
    try:
        yield
    finally:
        _current.reset(token)


def _registry() -> Any:
    from ..plugins import get_registry

    return get_registry()


def _backend(registry: Any, name: str) -> tuple[AttentionSpec, Callable[..., torch.Tensor], Callable[[AttentionQuery], Any]]:
    key = (id(registry), name)
    hit = _cache.get(key)
    if hit is None:
        spec = registry.attention.get(name)
        hit = (spec, resolve(spec.fn), resolve(spec.supports))
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = hit
    return hit


def attention_backend(query: AttentionQuery, name: str = "auto") -> AttentionSpec:
    """The backend that would serve ``query`` under ``name`` (raises if a named one cannot)."""
    registry = _registry()
    if normalize_name(name) != "auto":
        spec, _, supports = _backend(registry, name)
        answer = supports(query)
        if answer is not True:
            reason = answer if isinstance(answer, str) and answer else "it does not support this call"
            raise ConfigError(
                f"attention backend {spec.name!r} cannot serve this call ({_describe(query)}): {reason}. "
                f"Choose another backend, or attention='auto' to let difforge pick one."
            )
        return spec
    reasons = []
    for spec in sorted(registry.attention, key=lambda s: -s.priority):
        answer = _backend(registry, spec.name)[2](query)
        if answer is True:
            return spec
        reasons.append(f"{spec.name}: {answer}")
    raise ConfigError(f"no attention backend supports this call ({_describe(query)}): " + "; ".join(reasons))


def _describe(q: AttentionQuery) -> str:
    return (
        f"{q.device_type} {str(q.dtype).replace('torch.', '')}, head dim {q.head_dim}, "
        f"{q.heads} heads / {q.kv_heads} kv heads, q_len {q.q_len}, kv_len {q.kv_len}, mask {q.has_mask}"
    )


def make_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> AttentionQuery:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ConfigError(
            f"attention takes [B, H, N, D] tensors; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    b, h, n, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
        raise ConfigError(f"attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if h % k.shape[1]:
        raise ConfigError(f"attention: {h} query heads are not a multiple of {k.shape[1]} key/value heads")
    if mask is not None and mask.dtype != torch.bool:
        raise ConfigError(f"attention: mask must be boolean (True = attend), got {mask.dtype}")
    return AttentionQuery(
        device_type=q.device.type,
        dtype=q.dtype,
        batch=b,
        heads=h,
        kv_heads=k.shape[1],
        q_len=n,
        kv_len=k.shape[2],
        head_dim=d,
        has_mask=mask is not None,
        mask_shape=None if mask is None else tuple(mask.shape),
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over ``[B, H, N, D]`` tensors; returns ``[B, H, Nq, D]`` in ``q``'s dtype.

    ``mask``: boolean, broadcastable to ``[B, H, Nq, Nk]``, True where a query may attend.
    ``scale``: defaults to ``D ** -0.5``. k and v may have fewer heads than q (grouped-query).

    Inside a DiT forward sharded by Ulysses sequence parallelism (:mod:`difforge.parallel`), the token
    shards are exchanged for head shards around the backend call (``mask`` is then the local key mask).
    """
    if sharding():
        out = sequence_attention(q, k, v, mask, lambda q, k, v, m: _attention(q, k, v, m, scale, backend))
        if out is not None:
            return out
    return _attention(q, k, v, mask, scale, backend)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None, backend: str | None
) -> torch.Tensor:
    query = make_query(q, k, v, mask)
    name = backend or current_attention_backend()
    spec = attention_backend(query, name)
    fn = _backend(_registry(), spec.name)[1]
    return fn(q, k, v, mask=mask, scale=scale)

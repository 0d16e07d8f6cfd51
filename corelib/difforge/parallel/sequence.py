"""Ulysses sequence parallelism for a DiT (DeepSpeed-Ulysses, as xDiT/yunchang apply it to DiTs).

Each rank of a Ulysses group of size ``P`` keeps ``1/P`` of the DiT's tokens between attentions.
Around every attention, :func:`difforge.ops.attention` exchanges ``[B, H, N/P, D]`` token shards
for ``[B, H/P, N, D]`` head shards (one all-to-all of q, k and v together), runs the chosen
attention backend on the whole sequence for ``H/P`` heads, and exchanges the output back.

A DiT opts in with a few lines (all no-ops outside a parallel call):

- :func:`sequence_parallel` decorates its ``forward`` (it opens the per-forward shard state);
- :func:`shard_tokens` splits the token streams that attention joins, in their join order
  (Flux and Qwen-Image: ``txt, img``); each stream is padded to a multiple of ``P`` and the padded
  keys are masked;
- :func:`shard` / :func:`shard_parts` split what goes with the tokens (RoPE tables, key masks,
  per-token timesteps) the same way;
- :func:`gather_tokens` joins the output at the exit;
- :func:`keys_replicated` marks an attention whose keys are not sharded (cross-attention to the
  text, which every rank holds whole): its local queries attend to all keys, without exchange.

The order of tokens inside the exchanged sequence is rank-major (rank 0's shard of every stream,
then rank 1's, ...); attention is not causal, so only q, k, v, RoPE and mask need to agree on it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .state import ParallelState, current

__all__ = [
    "sequence_parallel", "shard_tokens", "shard", "shard_parts", "gather_tokens", "keys_replicated",
    "sharding", "all_reduce_sum", "gather_cfg_branches", "sequence_attention",
]

_shard: contextvars.ContextVar[SequenceShard | None] = contextvars.ContextVar("difforge_sequence_shard", default=None)
_replicated: contextvars.ContextVar[bool] = contextvars.ContextVar("difforge_keys_replicated", default=False)

F_ = TypeVar("F_", bound=Callable[..., Any])


class SequenceShard:
    """The state of one sharded DiT forward on one rank."""

    def __init__(self, state: ParallelState) -> None:
        self.state = state
        self.group, self.size, self.rank = state.sequence_group()
        self.local_len: int | None = None
        self.pad_mask: torch.Tensor | None = None  # [1, 1, 1, P * local_len] in exchange order, None: no padding
        self._masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(local mask) -> (it, gathered)

    # -- splitting

    def chunk(self, n: int) -> int:
        return -(-n // self.size)

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        dim = dim % x.dim()
        n = x.shape[dim]
        c = self.chunk(n)
        if c * self.size != n:  # zeros (bool, complex too), masked as keys by the attention
            shape = list(x.shape)
            shape[dim] = c * self.size - n
            x = torch.cat((x, x.new_zeros(shape)), dim=dim)
        return x.narrow(dim, self.rank * c, c)

    def register(self, lengths: Sequence[int], device: torch.device) -> None:
        chunks = [self.chunk(n) for n in lengths]
        self.local_len = sum(chunks)
        self._masks.clear()
        if all(c * self.size == n for c, n in zip(chunks, lengths)):
            self.pad_mask = None
            return
        valid = [
            torch.arange(r * c, (r + 1) * c, device=device) < n
            for r in range(self.size)
            for c, n in zip(chunks, lengths)
        ]
        self.pad_mask = torch.cat(valid)[None, None, None]

    def gather(self, x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
        dim = dim % x.dim()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, length)

    # -- attention

    def key_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The key mask over the exchanged sequence: the padding, and the model's own key mask
        (given in local form ``[B or 1, 1, 1, local_len]``, gathered once per forward)."""
        if mask is None:
            return self.pad_mask
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != self.local_len:
            raise ConfigError(
                f"sequence parallel attention takes a key mask [B, 1, 1, {self.local_len}] of the local tokens, "
                f"got {tuple(mask.shape)}; shard it with difforge.parallel.shard_parts like the tokens"
            )
        hit = self._masks.get(id(mask))
        if hit is None or hit[0] is not mask:
            parts = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(self.size)]
            dist.all_gather(parts, mask.to(torch.uint8).contiguous(), group=self.group)
            gathered = torch.cat(parts, dim=3).bool()
            if self.pad_mask is not None:
                gathered = gathered & self.pad_mask
            hit = self._masks[id(mask)] = (mask, gathered)
        return hit[1]

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[S, B, H, m, D]`` token shards -> ``[S, B, H/P, P*m, D]`` head shards (rank-major tokens)."""
        s, b, h, m, d = x.shape
        p = self.size
        if self.state.exchange == "all_to_all":
            send = x.view(s, b, p, h // p, m, d).permute(2, 0, 1, 3, 4, 5).contiguous()
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.group)  # recv[j]: rank j's tokens, my heads
        else:  # gloo without all-to-all: gather everything, keep my heads
            parts = [torch.empty_like(x) for _ in range(p)]
            dist.all_gather(parts, x.contiguous(), group=self.group)
            recv = torch.stack(parts).view(p, s, b, p, h // p, m, d)[:, :, :, self.rank]
        return recv.permute(1, 2, 3, 0, 4, 5).reshape(s, b, h // p, p * m, d)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H/P, P*m, D]`` -> ``[B, H, m, D]``: the inverse of :meth:`to_heads`."""
        b, hp, n, d = x.shape
        p = self.size
        m = n // p
        if self.state.exchange == "all_to_all":
            send = x.view(b, hp, p, m, d).permute(2, 0, 1, 3, 4).contiguous()
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.group)  # recv[j]: my tokens, rank j's heads
        else:
            parts = [torch.empty_like(x) for _ in range(p)]
            dist.all_gather(parts, x.contiguous(), group=self.group)
            recv = torch.stack(parts).view(p, b, hp, p, m, d)[:, :, :, self.rank]
        return recv.permute(1, 0, 2, 3, 4).reshape(b, hp * p, m, d)


def _active() -> SequenceShard | None:
    return _shard.get()


def sharding() -> bool:
    """True inside a DiT forward whose tokens are sharded across a Ulysses group."""
    return _shard.get() is not None


def sequence_parallel(forward: F_) -> F_:
    """Decorate a DiT's ``forward`` to opt it into Ulysses sequence parallelism (see the module docs).

    Outside a parallel pipeline call (or with ``ulysses_degree`` 1) it calls ``forward`` unchanged.
    """

    @functools.wraps(forward)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        state = current()
        if state is None or _shard.get() is not None:
            return forward(*args, **kwargs)
        shard = SequenceShard(state)
        if shard.size == 1:
            return forward(*args, **kwargs)
        token = _shard.set(shard)
        try:
            return forward(*args, **kwargs)
        finally:
            _shard.reset(token)

    wrapper._difforge_sequence_parallel = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def shard_tokens(*streams: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, ...]:
    """This rank's shards of the token ``streams`` that attention joins, in their join order.

    Each stream is zero-padded to a multiple of the Ulysses degree; attention masks the padded keys.
    Returns the streams unchanged outside a sharded forward.
    """
    sh = _shard.get()
    if sh is None:
        return streams
    sh.register([s.shape[dim] for s in streams], streams[0].device)
    return tuple(sh.split(s, dim) for s in streams)


def shard(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's shard of ``x`` along ``dim``, split as :func:`shard_tokens` splits a stream of that
    length (RoPE tables, per-token timesteps); ``x`` unchanged outside a sharded forward."""
    sh = _shard.get()
    return x if sh is None else sh.split(x, dim)


def shard_parts(x: torch.Tensor, lengths: Sequence[int], dim: int) -> torch.Tensor:
    """Shard ``x``, the concatenation of parts of ``lengths`` along ``dim`` (a joint RoPE table or key
    mask of ``[txt, img]``), part by part: the result lines up with :func:`shard_tokens` of the parts."""
    sh = _shard.get()
    if sh is None:
        return x
    return torch.cat([sh.split(p, dim) for p in x.split(list(lengths), dim=dim)], dim=dim)


def gather_tokens(x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """All ranks' shards of a stream joined again (padding dropped: ``length`` tokens); ``x`` unchanged
    outside a sharded forward."""
    sh = _shard.get()
    return x if sh is None else sh.gather(x, length, dim)


_NULL = contextlib.nullcontext()


def keys_replicated(flag: bool = True) -> contextlib.AbstractContextManager[None]:
    """Within the block, attention keys are whole on every rank (cross-attention to the text): local
    queries attend without exchange. A no-op outside a sharded forward or with ``flag`` False."""
    if not flag or _shard.get() is None:
        return _NULL
    return _replicated_block()


@contextlib.contextmanager
def _replicated_block() -> Iterator[None]:
    token = _replicated.set(True)
    try:
        yield
    finally:
        _replicated.reset(token)


def sequence_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, local: Callable[..., torch.Tensor]
) -> torch.Tensor | None:
    """Called by :func:`difforge.ops.attention`: None when no exchange applies (not sharded, or keys
    replicated), else the attention of the local query tokens over the whole sequence via ``local``."""
    sh = _shard.get()
    if sh is None or _replicated.get():
        return None
    p = sh.size
    if sh.local_len is None or q.shape[2] != sh.local_len or k.shape[2] != sh.local_len:
        raise ConfigError(
            f"sequence parallel attention: q/k have {q.shape[2]}/{k.shape[2]} local tokens, but the DiT sharded "
            f"{sh.local_len}; shard the joined streams with difforge.parallel.shard_tokens, and wrap attention "
            "to unsharded keys in difforge.parallel.keys_replicated()"
        )
    if q.shape[1] % p:
        raise ConfigError(f"sequence parallel attention: {q.shape[1]} heads are not divisible by ulysses_degree {p}")
    gathered_mask = sh.key_mask(mask)
    if k.shape[1] == q.shape[1]:
        q, k, v = sh.to_heads(torch.stack((q, k, v))).unbind(0)
    else:
        if k.shape[1] % p:  # grouped-query with too few kv heads to split: repeat them first
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        (q,) = sh.to_heads(q[None]).unbind(0)
        k, v = sh.to_heads(torch.stack((k, v))).unbind(0)
    out = local(q, k, v, gathered_mask)
    return sh.to_tokens(out)


# ---------------------------------------------------------------- other collectives


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks that share this DiT forward's sequence (the Ulysses group); ``t``
    itself outside a sharded forward. Caches use it so every rank takes the same skip decision."""
    sh = _shard.get()
    if sh is None:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=sh.group)
    return out


def gather_cfg_branches(mine: torch.Tensor, state: ParallelState) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) predictions from the two ranks of this rank's CFG group."""
    parts = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(parts, mine.contiguous(), group=state.cfg_group)
    return parts[0], parts[1]

"""The process groups of one parallel pipeline and the context that makes them current.

A :class:`ParallelState` is made once per process (a spawned worker, or a ``torchrun`` process):
every rank creates every group in the same order, as ``torch.distributed.new_group`` requires.
``Pipeline.__call__`` makes its state current (:func:`use`) for the length of the call, so the
runtime (CFG parallel) and the DiT helpers (:mod:`.sequence`) find it without being passed it.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .layout import ParallelLayout

log = logging.getLogger(__name__)

__all__ = ["ParallelState", "attach", "current", "use", "widened", "init_state", "launched_by_torchrun", "join_launch"]

_state: contextvars.ContextVar[ParallelState | None] = contextvars.ContextVar("difforge_parallel", default=None)
_wide: contextvars.ContextVar[bool] = contextvars.ContextVar("difforge_parallel_wide", default=False)

EXCHANGES = ("all_to_all", "all_gather")


@dataclass
class ParallelState:
    """One rank's place in a :class:`~.layout.ParallelLayout` and its groups."""

    layout: ParallelLayout
    rank: int
    device: torch.device
    backend: str
    cfg_group: Any = None
    ulysses_group: Any = None
    wide_group: Any = None
    """All ranks: with CFG parallel and a call without CFG, the CFG ranks join the sequence split."""
    wide_ok: bool = False
    """Whether the denoiser can shard over every rank (opted in, heads divisible): set by :func:`attach`."""
    exchange: str = "all_to_all"
    """How Ulysses exchanges heads for tokens: ``all_to_all`` (one ``all_to_all_single``), or
    ``all_gather`` (gather everything, keep one's slice) for gloo builds without all-to-all."""

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.layout.ulysses

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.layout.ulysses

    def sequence_group(self) -> tuple[Any, int, int]:
        """(group, size, rank) that a DiT forward shards its tokens over now: the Ulysses group, or every
        rank inside :func:`widened` (a call without CFG on a CFG-parallel layout)."""
        if _wide.get() and self.wide_group is not None:
            return self.wide_group, self.world_size, self.rank
        return self.ulysses_group, self.layout.ulysses, self.ulysses_rank

    def shared_seed(self) -> int:
        """A random seed, the same on every rank (rank 0's)."""
        seed = torch.tensor([int(torch.seed() % (2**62))], dtype=torch.int64, device=self._comm_device())
        dist.broadcast(seed, src=0)
        return int(seed.item())

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def current() -> ParallelState | None:
    """The parallel state of the pipeline call in progress, or None (one process)."""
    return _state.get()


@contextlib.contextmanager
def use(state: ParallelState | None) -> Iterator[None]:
    """Make ``state`` current within the block (``None``: leave things as they are)."""
    if state is None:
        yield
        return
    token = _state.set(state)
    try:
        yield
    finally:
        _state.reset(token)


@contextlib.contextmanager
def widened() -> Iterator[None]:
    """Within the block, DiT forwards shard their tokens over every rank (see :meth:`ParallelState.sequence_group`)."""
    token = _wide.set(True)
    try:
        yield
    finally:
        _wide.reset(token)


def _probe_all_to_all(group: Any, size: int) -> bool:
    """Whether this build's backend does ``all_to_all_single`` (some gloo builds do not)."""
    try:
        buf = torch.zeros(size)
        dist.all_to_all_single(torch.empty_like(buf), buf, group=group)
        return True
    except (RuntimeError, NotImplementedError) as exc:  # the same answer on every rank
        log.info("gloo has no all_to_all here (%s): Ulysses exchanges with all_gather", exc)
        return False


def init_state(layout: ParallelLayout, device: torch.device) -> ParallelState:
    """Create the CFG and Ulysses groups of ``layout`` in the initialised default group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != layout.world_size:
        raise ConfigError(f"{layout.describe()}, but this launch has {world} processes; make them agree")
    backend = dist.get_backend()
    state = ParallelState(layout=layout, rank=rank, device=device, backend=str(backend))
    c, u = layout.cfg, layout.ulysses
    for ci in range(c):  # every rank makes every group, in the same order
        ranks = [ci * u + ui for ui in range(u)]
        group = dist.new_group(ranks) if u > 1 else None
        if rank in ranks:
            state.ulysses_group = group
    for ui in range(u):
        ranks = [ci * u + ui for ci in range(c)]
        group = dist.new_group(ranks) if c > 1 else None
        if rank in ranks:
            state.cfg_group = group
    if c > 1:
        state.wide_group = dist.new_group(list(range(world)))
    forced = os.environ.get("DIFFORGE_ULYSSES_EXCHANGE")
    if forced:
        if forced not in EXCHANGES:
            raise ConfigError(f"DIFFORGE_ULYSSES_EXCHANGE must be one of {', '.join(EXCHANGES)}, got {forced!r}")
        if forced == "all_gather" and state.backend != "gloo":
            raise ConfigError("DIFFORGE_ULYSSES_EXCHANGE=all_gather is for gloo only; nccl always uses all_to_all")
        state.exchange = forced
    elif state.backend == "gloo" and world > 1 and not _probe_all_to_all(None, world):
        state.exchange = "all_gather"
    log.debug("rank %d: %s, backend %s, Ulysses exchange %s", rank, layout.describe(), backend, state.exchange)
    return state


def attach(pipe: Any, state: ParallelState) -> None:
    """Make ``pipe`` run as this rank of ``state``; decides whether calls without CFG on a CFG-parallel
    layout shard the DiT over every rank (else both CFG ranks compute the same conditional branch)."""
    from .layout import model_heads

    pipe.parallel_state = state
    if state.layout.cfg == 1:
        return
    ok = False
    for slot in pipe.denoiser_slots():
        module = pipe.components[slot]
        heads = model_heads(getattr(module, "config", None))
        opted = getattr(type(module).forward, "_difforge_sequence_parallel", False)
        ok = bool(opted and heads and heads % state.world_size == 0)
    state.wide_ok = ok
    if not ok and state.rank == 0:
        log.info("calls without CFG compute the same branch on both CFG ranks (the DiT cannot shard %d ways)", state.world_size)


def launched_by_torchrun() -> bool:
    """True in a process of a ``torchrun`` (or similar) launch: torch.distributed is initialised, or
    ``WORLD_SIZE`` and ``RANK`` are set."""
    if dist.is_available() and dist.is_initialized():
        return True
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def join_launch(layout: ParallelLayout, device: torch.device) -> ParallelState:
    """Join the running launch: initialise the default group if needed, bind this rank's device."""
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} has no CUDA device ({torch.cuda.device_count()} visible); "
                "launch at most one process per GPU"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return init_state(layout, device)

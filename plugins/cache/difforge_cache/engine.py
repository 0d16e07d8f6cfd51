"""The block-caching engine behind every preset of difforge-cache.

How it hooks in
---------------
:class:`BlockCache` replaces each block of the layout's ``ModuleList`` s by a :class:`CachedBlock`
that stands in for it, and puts the original blocks back on ``remove()`` (also when installing
fails half-way, and on leaving a ``with`` block). The stand-in shares the block's parameter, buffer
and child tables, so parameter names, ``state_dict`` keys, ``.to()`` and the parameters themselves
are unchanged while a cache is applied; hooks other plugins (offload) put on a block stay on it and
do not fire for a skipped block. Nothing is patched: not ``__call__``, not ``forward``, no global.

What it computes
----------------
The blocks of all groups, in layout order, form one sequence ``0 .. n-1``. A *step* begins when
block 0 runs (one model call); steps are counted per classifier-free-guidance branch
(:func:`difforge.runtime.current_cfg_branch`), each branch with its own state, and ``reset()``
(called by the runtime at the start of every pipeline call) forgets everything. The first ``front``
blocks and the last ``back`` blocks always run; the *middle* blocks are computed or skipped as a
whole, decided right after the last front block:

- threshold mode (fbcache, dbcache): ``change = mean|r - r_prev| / mean|r_prev|``, where ``r`` is the
  residual of the front blocks (output minus input) on the first stream and ``r_prev`` the one of
  the last computed step; the middle is skipped when ``change < threshold`` (so 0 never skips);
- interval mode (deepcache): the middle is computed on every ``interval``-th step.

The first step, warm-up steps, steps in ``force_compute_steps`` and (threshold mode) the step after
``max_consecutive_cached`` cached ones are always computed. A computed step stores the middle's
residual per stream (output of the last middle block minus input of the first); a skipped step
passes the streams unchanged through the middle blocks and adds the stored residual at the last
one. For fbcache this is exactly the arithmetic of diffusers' and ParaAttention's First Block Cache
(which measure the first block's ``hidden_states``, the image stream, and skip when the change is
at most the threshold: the two differ only at exact equality).

U-Nets (``BlockLayout.skip_connections``): the middle changes resolution and width, so a residual
cannot be added to fresh inputs; a skipped step returns the middle's stored *output* at its last
block (DeepCache's original form: the deep features are reused, the shallow blocks and their skip
connections are fresh), and threshold mode measures the change of the front blocks' output.

Groups with different streams: consecutive groups with equal ``streams`` form one *segment*. The
middle is cut at segment boundaries and each segment caches its own residual over its own streams;
the model's code between two segments (a concatenation, say) runs on the reconstructed states.
FLUX's double and single blocks both carry ``("img", "txt")`` and form one segment.

Blocks must not modify their stream inputs in place (the residuals are taken against them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from difforge import parallel
from difforge._names import normalize_name
from difforge.errors import ConfigError
from difforge.runtime import current_cfg_branch
from difforge.specs import BlockLayout

log = logging.getLogger(__name__)

__all__ = [
    "BlockCache",
    "CachedBlock",
    "FAMILY_THRESHOLDS",
    "DEFAULT_THRESHOLD",
    "apply_fbcache",
    "apply_dbcache",
    "apply_deepcache",
    "family_threshold",
    "relative_l1",
]

FAMILY_THRESHOLDS: dict[str, float] = {
    "flux": 0.08,  # ParaAttention's and diffusers' recommendation for FLUX.1
    # cache-dit's examples (examples/run_qwen_image.py, run_wan.py): F1B0 (First Block Cache), separate CFG,
    # residual_diff_threshold 0.08 for Qwen-Image and Wan2.1-T2V; both to be checked on the trained demo model
    "qwen-image": 0.08,
    "wan": 0.08,
}
DEFAULT_THRESHOLD = 0.05
"""For families without an entry: diffusers' ``FirstBlockCacheConfig`` default."""

_COUNTERS = ("steps", "steps_computed", "steps_cached", "blocks_computed", "blocks_skipped")


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean|current - previous| / mean|previous|``, accumulated in float32. Under Ulysses sequence
    parallelism each rank holds an equal shard of the tokens: the means are summed over the ranks, so
    every rank takes the same skip decision."""
    num = (current - previous).abs().mean(dtype=torch.float32)
    den = previous.abs().mean(dtype=torch.float32)
    if parallel.sharding():
        num, den = parallel.all_reduce_sum(torch.stack((num, den))).unbind()
    return (num / den).item()


@dataclass(frozen=True)
class _Slot:
    """Where one block sits in the cached sequence."""

    index: int
    path: str
    streams: tuple[str, ...]
    segment: int
    middle: bool
    first_middle: bool = False
    last_middle: bool = False


@dataclass(frozen=True)
class _Entry:
    """One block found through the layout: its list, position, module, dotted path and streams."""

    blocks: nn.ModuleList
    position: int
    block: nn.Module
    path: str
    streams: tuple[str, ...]


@dataclass
class _BranchState:
    """Everything a cache remembers for one CFG branch during one call."""

    step: int = -1
    compute: bool = True
    consecutive_cached: int = 0
    probe_input: torch.Tensor | None = None
    probe_residual: torch.Tensor | None = None
    middle_inputs: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    residuals: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    cached_steps: list[int] = field(default_factory=list)
    changes: dict[int, float] = field(default_factory=dict)
    blocks_computed: int = 0
    blocks_skipped: int = 0

    def release(self) -> None:
        """Drop the cached tensors (the counters stay)."""
        self.probe_input = self.probe_residual = None
        self.middle_inputs.clear()
        self.residuals.clear()

    def summary(self) -> dict[str, Any]:
        steps = self.step + 1
        return {
            "steps": steps,
            "steps_computed": steps - len(self.cached_steps),
            "steps_cached": len(self.cached_steps),
            "blocks_computed": self.blocks_computed,
            "blocks_skipped": self.blocks_skipped,
            "cached_steps": list(self.cached_steps),
            "changes": dict(self.changes),
        }


class CachedBlock(nn.Module):
    """Stands in for one block in its ``ModuleList`` while a :class:`BlockCache` is applied.

    It shares the block's parameter, buffer and child tables (so names and ``state_dict`` keys are
    the block's) and forwards every call to the cache, which runs or skips the block.
    """

    def __init__(self, block: nn.Module, cache: BlockCache, slot: _Slot) -> None:
        super().__init__()
        d = self.__dict__
        d["_parameters"], d["_buffers"], d["_modules"] = block._parameters, block._buffers, block._modules
        d["_non_persistent_buffers_set"] = block._non_persistent_buffers_set
        d["_block"], d["_cache"], d["_slot"] = block, cache, slot  # plain attributes, not submodules
        self.training = block.training

    @property
    def block(self) -> nn.Module:
        """The original block."""
        return self.__dict__["_block"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._cache._run(self._slot, self._block, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_block")
            if block is None:
                raise
            return getattr(block, name)

    def train(self, mode: bool = True) -> CachedBlock:
        self._block.train(mode)
        self.training = mode
        return self

    def _get_name(self) -> str:
        return f"CachedBlock[{type(self._block).__name__}]"


class BlockCache:
    """One block cache applied to one model: the handle ``CacheSpec.apply`` returns.

    ``front``/``back``: blocks that always run at each end of the sequence. Exactly one of
    ``threshold`` (skip the middle while the front residual's relative L1 change is below it) and
    ``interval`` (compute the middle every ``interval`` steps) is given. ``remove()`` restores the
    original modules, ``reset()`` forgets all state, ``stats()`` counts the steps and blocks computed
    and skipped since the last reset. Usable as a context manager that removes the cache on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: BlockLayout,
        *,
        name: str = "block-cache",
        front: int = 1,
        back: int = 0,
        threshold: float | None = None,
        interval: int | None = None,
        warmup_steps: int = 0,
        max_consecutive_cached: int | None = None,
        force_compute_steps: Iterable[int] = (),
    ) -> None:
        self.name = name
        self.threshold = None if threshold is None else _number(name, "threshold", threshold)
        self.interval = None if interval is None else _count(name, "cache_interval", interval, 1)
        if (self.threshold is None) == (self.interval is None):
            raise ConfigError(f"{name}: give exactly one of a threshold and an interval")
        self.front, self.back = _count(name, "front blocks", front), _count(name, "back blocks", back)
        self.warmup_steps = _count(name, "warmup_steps", warmup_steps)
        self.max_consecutive_cached = (
            None if max_consecutive_cached is None else _count(name, "max_consecutive_cached", max_consecutive_cached)
        )
        if isinstance(force_compute_steps, (int, str)) or not isinstance(force_compute_steps, Iterable):
            raise ConfigError(f"{name}: force_compute_steps must be a list of steps, got {force_compute_steps!r}")
        self.force_compute_steps = frozenset(_count(name, "force_compute_steps", s) for s in force_compute_steps)
        if self.threshold is not None and self.front < 1:
            raise ConfigError(f"{name}: at least one front block must run to measure the change (front_blocks >= 1)")

        self.model = model
        self.reuse_output = bool(getattr(layout, "skip_connections", False))
        if self.reuse_output and self.back and self.back != self.front:
            raise ConfigError(
                f"{name}: {type(model).__name__} has skip connections (a U-Net): the blocks that always run must pair "
                f"down and up blocks, so front and back blocks must be equal (got {self.front} and {self.back})"
            )
        self._states: dict[str, _BranchState] = {}
        self._installed: list[tuple[nn.ModuleList, int, nn.Module]] = []
        entries = self._collect(model, layout)
        self._slots = self._plan(entries)
        self._middle_segments = len({s.segment for s in self._slots if s.middle})
        self._probe_from = self.front - 1  # the front residual is measured from here, within one segment
        while 0 < self._probe_from < len(self._slots) and (
            self._slots[self._probe_from - 1].segment == self._slots[self.front - 1].segment
        ):
            self._probe_from -= 1
        try:
            for slot, e in zip(self._slots, entries):
                e.blocks[e.position] = CachedBlock(e.block, self, slot)
                self._installed.append((e.blocks, e.position, e.block))
        except BaseException:
            self.remove()
            raise
        middle = sum(s.middle for s in self._slots)
        if not middle:
            log.warning("%s: %s has %d blocks, all of them front or back blocks: nothing will be cached",
                        name, type(model).__name__, len(self._slots))
        rule = f"threshold {self.threshold}" if self.threshold is not None else f"interval {self.interval}"
        log.info("%s on %s: %d blocks (%d front, %d middle, %d back), %s",
                 name, type(model).__name__, len(self._slots), min(self.front, len(self._slots)), middle,
                 len(self._slots) - middle - min(self.front, len(self._slots)), rule)

    # ------------------------------------------------------------ the handle

    def remove(self) -> None:
        """Put the original blocks back (idempotent); ``stats()`` still reports the last call."""
        while self._installed:
            blocks, i, block = self._installed.pop()
            current = blocks[i]
            if isinstance(current, CachedBlock) and current.block is block:
                block.train(current.training)
                blocks[i] = block
            else:
                log.warning("%s: entry %d of a block list was replaced by someone else; left as it is", self.name, i)
        for state in self._states.values():
            state.release()

    def reset(self) -> None:
        """Forget every branch's state and the statistics (the runtime calls this at each call)."""
        self._states.clear()

    def stats(self) -> dict[str, Any]:
        """Steps and blocks computed and skipped since the last reset, in total and per CFG branch.

        Per branch also ``cached_steps`` (their indices) and ``changes`` (step -> the relative L1 change
        that decided it, for the steps where it was measured): what to look at when tuning a threshold.
        """
        branches = {name: state.summary() for name, state in self._states.items()}
        totals = {key: sum(b[key] for b in branches.values()) for key in _COUNTERS}
        return {"strategy": self.name, "blocks": len(self._slots), **totals, "branches": branches}

    def __enter__(self) -> BlockCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # ------------------------------------------------------------ set-up

    def _collect(self, model: nn.Module, layout: BlockLayout) -> list[_Entry]:
        entries = []
        for group in layout.groups:
            try:
                blocks = model.get_submodule(group.path)
            except AttributeError:
                blocks = None
            if not isinstance(blocks, nn.ModuleList):
                raise ConfigError(
                    f"{self.name}: the block layout names {group.path!r}, but {type(model).__name__} has no "
                    "nn.ModuleList there; fix the model's ModelSpec.layout"
                )
            for i, block in enumerate(blocks):
                if isinstance(block, CachedBlock):
                    raise ConfigError(
                        f"{self.name}: {group.path}.{i} already has a cache applied; remove it first "
                        "(pipe.set_cache(None) or handle.remove())"
                    )
                entries.append(_Entry(blocks, i, block, f"{group.path}.{i}", tuple(group.streams)))
        return entries

    def _plan(self, entries: list[_Entry]) -> list[_Slot]:
        """Number the blocks, cut them into segments of equal streams, mark the middle and its ends."""
        n = len(entries)
        segments = [0] * n
        for k in range(1, n):
            segments[k] = segments[k - 1] + (entries[k].streams != entries[k - 1].streams)
        middle = [self.front <= k < n - self.back for k in range(n)]

        def same_run(a: int, b: int) -> bool:
            return 0 <= b < n and middle[b] and segments[b] == segments[a]

        return [
            _Slot(k, e.path, e.streams, segments[k], middle[k],
                  first_middle=middle[k] and not same_run(k, k - 1), last_middle=middle[k] and not same_run(k, k + 1))
            for k, e in enumerate(entries)
        ]

    # ------------------------------------------------------------ the per-block call

    def _run(self, slot: _Slot, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        branch = current_cfg_branch()
        state = self._states.get(branch) or self._states.setdefault(branch, _BranchState())
        if slot.index == 0:
            state.step += 1
            state.compute = True
            state.middle_inputs.clear()
            if self.front == 0:
                self._decide(state, None)
        if slot.middle and not state.compute:
            streams = _inputs(slot, args, kwargs)
            if slot.last_middle:
                stored = state.residuals[slot.segment]
                streams = stored if self.reuse_output else tuple(x + r for x, r in zip(streams, stored))
            state.blocks_skipped += 1
            return streams[0] if len(streams) == 1 else streams
        if slot.first_middle:
            state.middle_inputs[slot.segment] = _inputs(slot, args, kwargs)
        if slot.index == self._probe_from and self.threshold is not None:
            state.probe_input = _inputs(slot, args, kwargs)[0]
        out = block(*args, **kwargs)
        state.blocks_computed += 1
        if slot.last_middle or slot.index == self.front - 1:
            outs = _outputs(slot, out)
            if slot.last_middle:
                inputs = state.middle_inputs.pop(slot.segment)
                state.residuals[slot.segment] = outs if self.reuse_output else tuple(o - i for o, i in zip(outs, inputs))
            if slot.index == self.front - 1:
                self._decide(state, outs[0])
        return out

    def _decide(self, state: _BranchState, probe_output: torch.Tensor | None) -> None:
        residual = None
        if self.threshold is not None and probe_output is not None:
            residual = probe_output if self.reuse_output else probe_output - state.probe_input
            state.probe_input = None
        state.compute = self._should_compute(state, residual)
        if state.compute:
            state.consecutive_cached = 0
            if residual is not None:
                state.probe_residual = residual
        else:
            state.consecutive_cached += 1
            state.cached_steps.append(state.step)

    def _should_compute(self, state: _BranchState, residual: torch.Tensor | None) -> bool:
        if (
            len(state.residuals) < self._middle_segments
            or not self._middle_segments
            or state.step < self.warmup_steps
            or state.step in self.force_compute_steps
        ):
            return True
        if self.interval is not None:
            return state.step % self.interval == 0
        if self.max_consecutive_cached is not None and state.consecutive_cached >= self.max_consecutive_cached:
            return True
        if residual is None or state.probe_residual is None:
            return True
        change = state.changes[state.step] = relative_l1(residual, state.probe_residual)
        log.debug("%s step %d (%s): change %.5f, threshold %s", self.name, state.step, current_cfg_branch(), change,
                  self.threshold)
        return not change < self.threshold


# ------------------------------------------------------------ presets (the CacheSpec.apply functions)


def family_threshold(family: str | None) -> float:
    """The default fbcache/dbcache threshold of a model family (``options["family"]``, set by the runtime)."""
    return FAMILY_THRESHOLDS.get(normalize_name(family), DEFAULT_THRESHOLD) if family else DEFAULT_THRESHOLD


def _threshold_options(preset: str, options: Mapping[str, Any]) -> dict[str, Any]:
    threshold = options.get("threshold")
    return dict(
        name=preset,
        threshold=family_threshold(options.get("family")) if threshold is None else threshold,
        warmup_steps=options.get("warmup_steps", 0),
        max_consecutive_cached=options.get("max_consecutive_cached"),
        force_compute_steps=options.get("force_compute_steps", ()),
    )


def apply_fbcache(model: nn.Module, layout: BlockLayout, options: Mapping[str, Any]) -> BlockCache:
    """First Block Cache: the first block decides, all the others are cached."""
    return BlockCache(model, layout, front=1, back=0, **_threshold_options("fbcache", options))


def apply_dbcache(model: nn.Module, layout: BlockLayout, options: Mapping[str, Any]) -> BlockCache:
    """Dual Block Cache: ``front_blocks`` decide, ``back_blocks`` always run, the middle is cached."""
    return BlockCache(
        model, layout, front=options.get("front_blocks", 8), back=options.get("back_blocks", 0),
        **_threshold_options("dbcache", options),
    )


def apply_deepcache(model: nn.Module, layout: BlockLayout, options: Mapping[str, Any]) -> BlockCache:
    """DeepCache for DiTs: a full pass every ``cache_interval`` steps, else ``cache_branch_id`` blocks at each end.

    The deep blocks' cached output is reused as their contribution (output minus input) on top of
    the fresh shallow features: a DiT has no U-Net skip connection that would carry them past it.
    On a U-Net (``layout.skip_connections``) this is DeepCache's original form: the cached output of
    the deep blocks feeds the fresh shallow up blocks, which also take the fresh skip connections.
    """
    ends = options.get("cache_branch_id", 1)
    return BlockCache(
        model, layout, name="deepcache", front=ends, back=ends, interval=options.get("cache_interval", 3),
        warmup_steps=options.get("warmup_steps", 0), force_compute_steps=options.get("force_compute_steps", ()),
    )


def _inputs(slot: _Slot, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    """The stream values a block was called with: the first positional arguments, else keywords."""
    values = []
    for i, name in enumerate(slot.streams):
        if i < len(args):
            values.append(args[i])
        elif name in kwargs:
            values.append(kwargs[name])
        else:
            raise ConfigError(
                f"block {slot.path} was called without its stream {name!r} (positional argument {i} or keyword "
                f"{name!r}); its block layout declares the streams {slot.streams}"
            )
    return tuple(values)


def _outputs(slot: _Slot, out: Any) -> tuple[torch.Tensor, ...]:
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    if len(outs) != len(slot.streams):
        raise ConfigError(
            f"block {slot.path} returned {len(outs)} values, but its block layout declares the streams "
            f"{slot.streams}: a block must return its streams in that order"
        )
    return outs


def _number(preset: str, option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"{preset}: option {option!r} must be a number >= 0, got {value!r}")
    return float(value)


def _count(preset: str, option: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{preset}: option {option!r} must be an integer >= {minimum}, got {value!r}")
    return value

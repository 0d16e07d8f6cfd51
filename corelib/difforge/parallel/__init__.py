"""Multi-process inference on ``torch.distributed``: CFG parallel and Ulysses sequence parallel.

``Pipeline.from_pretrained(..., parallelism=N, cfg_parallel=None, ulysses_degree=None, ring_degree=None)``
either spawns N workers and returns a :class:`ParallelPipeline` (a plain process), or joins a
``torchrun`` launch (every process builds its own pipeline and gets the result). See README.md,
"Multi-GPU", and PLUGINS.md for how a DiT opts into Ulysses with :func:`sequence_parallel`,
:func:`shard_tokens`, :func:`shard`, :func:`shard_parts`, :func:`gather_tokens` and
:func:`keys_replicated`.

Transport: process groups, ``all_gather`` and ``all_to_all_single`` of torch.distributed, nothing
home-made. gloo (CPU) builds without all-to-all exchange Ulysses shards with ``all_gather`` and
slicing instead (detected once per pipeline, or forced with ``DIFFORGE_ULYSSES_EXCHANGE=all_gather``);
nccl always uses ``all_to_all_single``.
"""

from __future__ import annotations

from typing import Any

from .layout import ParallelLayout, check_denoiser, default_uses_cfg, check_devices, model_heads, plan_layout
from .sequence import (
    all_reduce_sum,
    gather_cfg_branches,
    gather_tokens,
    keys_replicated,
    sequence_attention,
    sequence_parallel,
    shard,
    shard_parts,
    shard_tokens,
    sharding,
)
from .state import ParallelState, attach, current, init_state, join_launch, launched_by_torchrun, use, widened

__all__ = [
    "ParallelLayout", "ParallelPipeline", "ParallelState", "ParallelWorkerError", "all_reduce_sum", "attach", "check_denoiser",
    "check_devices", "current", "default_uses_cfg", "gather_cfg_branches", "gather_tokens", "init_state", "join_launch", "keys_replicated",
    "launched_by_torchrun", "model_heads", "plan_layout", "sequence_attention", "sequence_parallel", "shard",
    "shard_parts", "shard_tokens", "sharding", "use", "widened",
]


def __getattr__(name: str) -> Any:  # the launcher imports multiprocessing machinery: load it on use
    if name in ("ParallelPipeline", "ParallelWorkerError"):
        from . import launcher

        return getattr(launcher, name)
    raise AttributeError(f"module 'difforge.parallel' has no attribute {name!r}")

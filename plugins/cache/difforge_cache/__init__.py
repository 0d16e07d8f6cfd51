"""difforge-cache: block caches for every DiT that declares a block layout.

This entry module is light (no torch): the engine in :mod:`difforge_cache.engine` is named by lazy
references. One engine serves three presets, on any model through its ``ModelSpec.layout``:

- ``fbcache`` (First Block Cache, as ParaAttention and diffusers define it): the first block always
  runs; when the relative L1 change of its output residual since the last computed step is under
  ``threshold``, the other blocks are skipped and their cached residual is added.
- ``dbcache``: the same decision after ``front_blocks`` blocks; the last ``back_blocks`` always run.
- ``deepcache``: DeepCache for DiTs; every ``cache_interval`` steps a full pass refreshes the cached
  contribution of the deep (middle) blocks; in between only ``cache_branch_id`` blocks at each end run.

``threshold=None`` takes the family's default (:data:`difforge_cache.engine.FAMILY_THRESHOLDS`).
``pipe = Pipeline.from_pretrained(..., cache={"name": "fbcache", "threshold": 0.08})``;
``pipe.cache_stats()`` reports the steps and blocks computed and skipped in the last call.
"""

from __future__ import annotations

from collections.abc import Iterator

from difforge import CacheSpec, hookimpl

difforge_api = ">=1,<2"

ENGINE = "difforge_cache.engine"

_COMMON = {"warmup_steps": 0, "force_compute_steps": ()}
_THRESHOLD = {"threshold": None, "max_consecutive_cached": None, **_COMMON}


@hookimpl
def difforge_register_cache_strategies() -> Iterator[CacheSpec]:
    yield CacheSpec(
        name="fbcache",
        apply=f"{ENGINE}:apply_fbcache",
        options=_THRESHOLD,
        description="First Block Cache: skip all blocks after the first while its residual barely changes",
    )
    yield CacheSpec(
        name="dbcache",
        apply=f"{ENGINE}:apply_dbcache",
        options={"front_blocks": 8, "back_blocks": 0, **_THRESHOLD},
        description="Dual Block Cache: N front blocks decide, the middle is cached, M back blocks always run",
    )
    yield CacheSpec(
        name="deepcache",
        apply=f"{ENGINE}:apply_deepcache",
        options={"cache_interval": 3, "cache_branch_id": 1, **_COMMON},
        description="DeepCache for DiTs: refresh the deep blocks every cache_interval steps, run only the ends between",
    )

"""Tiny Qwen-Image and Wan releases for the difforge-cache pipeline tests, and the helpers those tests share.

The folders are diffusers ``save_pretrained`` folders with random weights (:mod:`difforge_sdk.parity_pipelines`),
built as the families' own tests build theirs (tests/plugins/qwen_image/conftest.py,
tests/plugins/wan/test_wan_pipeline.py), with four DiT blocks instead of two, so that dbcache has front,
middle and back blocks. difforge assembles its pipelines from them (``Pipeline.from_pretrained(family, folder)``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from difforge import Pipeline
from difforge.runtime import current_cfg_branch
from difforge_sdk import parity_pipelines

DIT_LAYERS = 4
TIME_SCALE = 0.1
"""Scale of the Qwen-Image DiT's timestep embedding output. With plain random weights the first block's
residual changes by 0.6-2 from one step to the next (every step looks new, no threshold near the
recommended ones would ever skip); scaled, it changes by a few tenths, the range where a threshold decides
(benchmarks/cache.py scales the FLUX embedders for the same reason)."""

#: presets with a threshold of 0 / an interval of 1: nothing may be skipped, outputs must be identical
EXACT_CACHES: list[dict[str, Any]] = [
    {"name": "fbcache", "threshold": 0.0},
    {"name": "dbcache", "threshold": 0.0, "front_blocks": 1, "back_blocks": 1},
    {"name": "dbcache", "threshold": 0.0, "front_blocks": 2, "back_blocks": 1},
    {"name": "deepcache", "cache_interval": 1, "cache_branch_id": 1},
]
EXACT_IDS = ["fbcache", "dbcache-F1B1", "dbcache-F2B1", "deepcache"]


def write_tiny_qwen_image(folder: Path, layers: int = DIT_LAYERS) -> Path:
    """A tiny diffusers ``QwenImagePipeline`` folder: DiT 2 heads x 16 with ``layers`` blocks and its timestep
    embedding scaled by ``TIME_SCALE``, Wan-style VAE (16 latent channels), Qwen2.5-VL (hidden 128), a
    locally trained Qwen2 tokenizer, Qwen-Image's scheduler."""
    return parity_pipelines.write_qwen_image(
        folder, dit_layers=layers, time_embed_scale=TIME_SCALE, std={"dit": 0.15, "vae": 0.15, "text": 0.05}
    )


def write_tiny_wan(folder: Path, layers: int = DIT_LAYERS) -> Path:
    """A tiny diffusers ``WanPipeline`` folder of the Wan2.1 T2V design: DiT 2 heads x 16 with ``layers`` blocks,
    16-channel VAE, umT5 (d_model 32), a locally trained T5 tokenizer, UniPC with flow shift 3."""
    return parity_pipelines.write_wan(folder, dit_layers=layers, std={"dit": 0.1, "vae": 0.2, "text": 0.3}, seed=1)


def dit_stats(pipe: Pipeline) -> dict[str, Any]:
    """The statistics of the cache on the pipeline's DiT (the only component a cache is applied to)."""
    (stats,) = pipe.cache_stats()
    return stats


class PerBranchDiT(nn.Module):
    """A stand-in for a pipeline's DiT that sends each call to the copy of the current CFG branch.

    The reference for "separate state per branch": one DiT per branch, each with a cache of its own.
    Attributes the pipeline reads (``config``, ...) come from the conditional copy.
    """

    def __init__(self, dits: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.dits = nn.ModuleDict(dict(dits))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.dits[current_cfg_branch()](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["dits"]["cond"], name)


@contextmanager
def one_dit_per_branch(pipe: Pipeline, apply: Any, layout: Any, options: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Within the block: the pipeline's DiT replaced by one copy per CFG branch, each with its own cache
    (``apply(copy, layout, options)``); yields the handles by branch. Everything is restored on exit."""
    pipe.set_cache(None)
    original = pipe.components["dit"]
    dits = {branch: copy.deepcopy(original) for branch in ("cond", "uncond")}
    handles = {branch: apply(dit, layout, dict(options)) for branch, dit in dits.items()}
    pipe.components["dit"] = PerBranchDiT(dits)
    try:
        yield handles
    finally:
        pipe.components["dit"] = original
        for handle in handles.values():
            handle.remove()

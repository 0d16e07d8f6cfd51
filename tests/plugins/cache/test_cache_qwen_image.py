"""difforge-cache on the whole Qwen-Image pipeline (difforge-qwen-image, tiny random release).

- Every preset at threshold 0 / interval 1 gives exactly the uncached output, with true CFG on (the
  family's default, cfg_scale 4 with Qwen-Image's norm rescale) and off.
- A real threshold (0.5) and interval (3) skip DiT work, counted by ``stats()``, and change the output.
- The CFG branches keep separate state: one cached DiT serving both branches equals one DiT per branch,
  each with its own cache. The same engine sharing one state between the branches cannot even run with the
  default negative prompt (its txt stream is shorter than the prompt's), and gives another result with a
  negative prompt of the prompt's length.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import difforge
import difforge_cache
import difforge_cache.engine as engine
from difforge import Pipeline
from difforge.plugins import PluginSettings
from difforge_cache.engine import apply_deepcache, apply_fbcache

from .tiny_families import DIT_LAYERS, EXACT_CACHES, EXACT_IDS, dit_stats, one_dit_per_branch, write_tiny_qwen_image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
difforge_qwen_image = pytest.importorskip("difforge_qwen_image")

STEPS = 6
CALL = dict(prompt="a cat holding a sign", seed=0, height=64, width=64, num_inference_steps=STEPS,
            output_type="latent", progress_bar_cmd=lambda x: x)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def cache_registry() -> Iterator[Any]:
    """difforge-qwen-image with its dependencies and difforge-cache (replaces the toy registry of conftest.py)."""
    import difforge_text_encoders
    import difforge_wan

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    plugins = [difforge_text_encoders, difforge_wan, difforge_qwen_image, difforge_cache]
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=plugins)
    yield host.registry
    difforge.reload_plugins()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory, cache_registry: Any) -> Iterator[Pipeline]:
    folder = write_tiny_qwen_image(Path(tmp_path_factory.mktemp("qwen-image")))
    pipe = Pipeline.from_pretrained("qwen-image", str(folder), device="cpu")
    assert len(pipe.dit.transformer_blocks) == DIT_LAYERS
    yield pipe


@pytest.fixture(scope="module")
def uncached(pipe: Pipeline) -> dict[float, torch.Tensor]:
    """The uncached latents with true CFG (the default cfg_scale 4) and without (1.0)."""
    pipe.set_cache(None)
    return {cfg: pipe(cfg_scale=cfg, **CALL) for cfg in (4.0, 1.0)}


@pytest.fixture(autouse=True)
def _no_cache_after(pipe: Pipeline) -> Iterator[None]:
    yield
    pipe.set_cache(None)


@pytest.mark.parametrize("cache", EXACT_CACHES, ids=EXACT_IDS)
@pytest.mark.parametrize("cfg_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_exact_at_threshold_zero_and_interval_one(
    pipe: Pipeline, uncached: dict[float, torch.Tensor], cache: dict, cfg_scale: float
) -> None:
    pipe.set_cache(cache)
    got = pipe(cfg_scale=cfg_scale, **CALL)
    assert torch.equal(got, uncached[cfg_scale])
    stats = dit_stats(pipe)
    branches = {"cond", "uncond"} if cfg_scale != 1.0 else {"cond"}
    assert set(stats["branches"]) == branches
    assert stats["steps"] == stats["steps_computed"] == STEPS * len(branches)
    assert stats["blocks_skipped"] == 0 and stats["blocks_computed"] == STEPS * len(branches) * DIT_LAYERS


@pytest.mark.parametrize(
    "cache",
    [{"name": "fbcache", "threshold": 0.5}, {"name": "dbcache", "threshold": 0.5, "front_blocks": 1, "back_blocks": 1},
     {"name": "deepcache", "cache_interval": 3}],
    ids=["fbcache", "dbcache", "deepcache"],
)  # fmt: skip
def test_real_settings_skip_work_and_change_the_output(
    pipe: Pipeline, uncached: dict[float, torch.Tensor], cache: dict
) -> None:
    pipe.set_cache(cache)
    got = pipe(**CALL)  # the default: true CFG
    stats = dit_stats(pipe)
    assert stats["steps_cached"] > 0 and stats["blocks_skipped"] > 0, stats
    assert stats["blocks_computed"] + stats["blocks_skipped"] == 2 * STEPS * DIT_LAYERS
    assert not torch.equal(got, uncached[4.0])
    assert torch.isfinite(got).all()


@pytest.mark.parametrize(
    ("apply", "options"), [(apply_fbcache, {"threshold": 0.5}), (apply_deepcache, {"cache_interval": 3})],
    ids=["fbcache", "deepcache"],
)  # fmt: skip
def test_cfg_branches_keep_separate_state(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, apply: Any,
                                          options: dict) -> None:  # fmt: skip
    name = "fbcache" if apply is apply_fbcache else "deepcache"
    layout = difforge_qwen_image.BLOCK_LAYOUT
    pipe.set_cache({"name": name, **options})
    separate = pipe(**CALL)
    branches = dit_stats(pipe)["branches"]
    assert set(branches) == {"cond", "uncond"} and branches["cond"]["steps"] == branches["uncond"]["steps"] == STEPS

    # the reference: a DiT per branch, each with its own cache
    with one_dit_per_branch(pipe, apply, layout, options) as handles:
        two_dits = pipe(**CALL)
    assert torch.equal(separate, two_dits)
    assert {b: h.stats()["branches"][b]["cached_steps"] for b, h in handles.items()} == {
        b: branches[b]["cached_steps"] for b in branches
    }

    # the same engine with one state for both branches: the default negative prompt (" ") has fewer text
    # tokens than the prompt, so the branches' txt streams cannot even share a residual ...
    monkeypatch.setattr(engine, "current_cfg_branch", lambda: "shared")
    pipe.set_cache({"name": name, **options})
    with pytest.raises(RuntimeError, match="must match the size"):
        pipe(**CALL)
    # ... and with a negative prompt of the prompt's length, sharing gives another result
    same_length = "a dog holding a sign"
    lengths = {p: pipe.encode_prompt([p])["txt"].shape[1] for p in (CALL["prompt"], same_length)}
    assert len(set(lengths.values())) == 1, lengths
    shared = pipe(negative_prompt=same_length, **CALL)
    assert set(dit_stats(pipe)["branches"]) == {"shared"}
    monkeypatch.undo()
    pipe.set_cache({"name": name, **options})
    separate = pipe(negative_prompt=same_length, **CALL)
    assert not torch.allclose(shared, separate, atol=1e-5)


def test_family_default_threshold(pipe: Pipeline) -> None:
    pipe.set_cache("fbcache")
    (handle,) = pipe._cache_handles
    assert handle.model is pipe.dit and handle.threshold == engine.FAMILY_THRESHOLDS["qwen-image"]

"""difforge-cache on whole Qwen-Image and Wan pipelines (tiny random releases; Wan2.1 T2V, 9 frames).

- Every preset at threshold 0 / interval 1 gives exactly the uncached output, with CFG on (the family's
  default: Qwen-Image cfg_scale 4 with its norm rescale, Wan cfg_scale 5) and off.
- A real threshold (0.5) and interval (3) skip DiT work, counted by ``stats()``, and change the output.
- The CFG branches keep separate state: one cached DiT serving both branches equals one DiT per branch,
  each with its own cache; the same engine sharing one state between the branches gives another result.
  On Qwen-Image sharing cannot even run with the default negative prompt (its txt stream is shorter than
  the prompt's), so there the comparison uses a negative prompt of the prompt's length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import difforge
import difforge_cache
import difforge_cache.engine as engine
from difforge import Pipeline
from difforge.plugins import PluginSettings
from difforge_cache.engine import apply_deepcache, apply_fbcache

from .tiny_families import DIT_LAYERS, EXACT_CACHES, EXACT_IDS, dit_stats, one_dit_per_branch, write_tiny_qwen_image, write_tiny_wan

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
difforge_qwen_image = pytest.importorskip("difforge_qwen_image")
difforge_wan = pytest.importorskip("difforge_wan")

STEPS = 6
_COMMON = dict(prompt="a cat holding a sign", seed=0, num_inference_steps=STEPS, output_type="latent",
               progress_bar_cmd=lambda x: x)  # fmt: skip


@dataclass(frozen=True)
class Family:
    name: str
    write: Callable[[Path], Path]
    plugin: Any
    blocks: str  # the DiT's block list
    cfg: float  # the family's default cfg_scale
    call: dict[str, Any]


FAMILIES = {
    "qwen-image": Family("qwen-image", write_tiny_qwen_image, difforge_qwen_image, "transformer_blocks", 4.0,
                         dict(height=64, width=64, **_COMMON)),
    "wan": Family("wan", write_tiny_wan, difforge_wan, "blocks", 5.0, dict(height=32, width=32, num_frames=9, **_COMMON)),
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def cache_registry() -> Iterator[Any]:
    """The two families, the text encoders and difforge-cache (replaces the toy registry of conftest.py)."""
    import difforge_text_encoders

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    plugins = [difforge_text_encoders, difforge_wan, difforge_qwen_image, difforge_cache]
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=plugins)
    yield host.registry
    difforge.reload_plugins()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory, cache_registry: Any, family: Family) -> Iterator[Pipeline]:
    folder = family.write(Path(tmp_path_factory.mktemp(family.name)))
    pipe = Pipeline.from_pretrained(family.name, str(folder), device="cpu")
    assert len(getattr(pipe.dit, family.blocks)) == DIT_LAYERS
    yield pipe


@pytest.fixture(scope="module")
def uncached(pipe: Pipeline, family: Family) -> dict[float, torch.Tensor]:
    """The uncached latents with CFG (the family's default cfg_scale) and without (1.0)."""
    pipe.set_cache(None)
    return {cfg: pipe(cfg_scale=cfg, **family.call) for cfg in (family.cfg, 1.0)}


@pytest.fixture(autouse=True)
def _no_cache_after(pipe: Pipeline) -> Iterator[None]:
    yield
    pipe.set_cache(None)


@pytest.mark.parametrize("cache", EXACT_CACHES, ids=EXACT_IDS)
@pytest.mark.parametrize("with_cfg", [True, False], ids=["cfg", "no-cfg"])
def test_exact_at_threshold_zero_and_interval_one(
    pipe: Pipeline, family: Family, uncached: dict[float, torch.Tensor], cache: dict, with_cfg: bool
) -> None:
    cfg_scale = family.cfg if with_cfg else 1.0
    pipe.set_cache(cache)
    got = pipe(cfg_scale=cfg_scale, **family.call)
    assert torch.equal(got, uncached[cfg_scale])
    stats = dit_stats(pipe)
    branches = {"cond", "uncond"} if with_cfg else {"cond"}
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
    pipe: Pipeline, family: Family, uncached: dict[float, torch.Tensor], cache: dict
) -> None:
    pipe.set_cache(cache)
    got = pipe(**family.call)  # the default: CFG on
    stats = dit_stats(pipe)
    assert stats["steps_cached"] > 0 and stats["blocks_skipped"] > 0, stats
    assert stats["blocks_computed"] + stats["blocks_skipped"] == 2 * STEPS * DIT_LAYERS
    assert not torch.equal(got, uncached[family.cfg])
    assert torch.isfinite(got).all()


@pytest.mark.parametrize(
    ("apply", "options"), [(apply_fbcache, {"threshold": 0.5}), (apply_deepcache, {"cache_interval": 3})],
    ids=["fbcache", "deepcache"],
)  # fmt: skip
def test_cfg_branches_keep_separate_state(pipe: Pipeline, family: Family, monkeypatch: pytest.MonkeyPatch,
                                          apply: Any, options: dict) -> None:  # fmt: skip
    name = "fbcache" if apply is apply_fbcache else "deepcache"
    call = family.call
    pipe.set_cache({"name": name, **options})
    separate = pipe(**call)
    branches = dit_stats(pipe)["branches"]
    assert set(branches) == {"cond", "uncond"} and branches["cond"]["steps"] == branches["uncond"]["steps"] == STEPS

    # the reference: a DiT per branch, each with its own cache
    with one_dit_per_branch(pipe, apply, family.plugin.BLOCK_LAYOUT, options) as handles:
        two_dits = pipe(**call)
    assert torch.equal(separate, two_dits)
    assert {b: h.stats()["branches"][b]["cached_steps"] for b, h in handles.items()} == {
        b: branches[b]["cached_steps"] for b in branches
    }

    # the same engine with one state for both branches
    monkeypatch.setattr(engine, "current_cfg_branch", lambda: "shared")
    pipe.set_cache({"name": name, **options})
    if family.name == "qwen-image":
        # the default negative prompt (" ") has fewer text tokens than the prompt: the branches' txt
        # streams cannot even share a residual; with a negative prompt of the prompt's length they can
        with pytest.raises(RuntimeError, match="must match the size"):
            pipe(**call)
        same_length = "a dog holding a sign"
        lengths = {p: pipe.encode_prompt([p])["txt"].shape[1] for p in (call["prompt"], same_length)}
        assert len(set(lengths.values())) == 1, lengths
        call = dict(call, negative_prompt=same_length)
    shared = pipe(**call)
    assert set(dit_stats(pipe)["branches"]) == {"shared"}
    monkeypatch.undo()
    pipe.set_cache({"name": name, **options})
    separate = pipe(**call)
    assert not torch.allclose(shared, separate, atol=1e-5)  # sharing gives another result


def test_family_default_threshold(pipe: Pipeline, family: Family) -> None:
    pipe.set_cache("fbcache")
    (handle,) = pipe._cache_handles
    assert handle.model is pipe.dit and handle.threshold == engine.FAMILY_THRESHOLDS[family.name]

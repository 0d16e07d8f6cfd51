"""difforge-cache on the toy pipeline and on hand-made models: exactness at threshold 0 / interval 1,
separate CFG state, removal, statistics, several block groups and option checks."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import difforge_cache.engine as engine
from difforge import BlockGroup, BlockLayout, ConfigError, ModelConfig, Pipeline
from difforge.runtime import current_cfg_branch
from difforge.runtime.pipeline import cfg_branch
from difforge_cache.engine import BlockCache, CachedBlock, apply_dbcache, apply_deepcache, apply_fbcache

TOY_LAYOUT = BlockLayout((BlockGroup("blocks", ("hidden_states",)),))
CALL = dict(seed=3, num_inference_steps=10, output_type="pt", progress_bar_cmd=lambda x: x)


def run(pipe: Pipeline, cache: Any = None, **kw: Any) -> torch.Tensor:
    pipe.set_cache(cache)
    return pipe("a cat", **{**CALL, **kw})


# ------------------------------------------------------------ exact when nothing may be skipped


@pytest.mark.parametrize(
    "cache",
    [
        {"name": "fbcache", "threshold": 0.0},
        {"name": "dbcache", "threshold": 0.0, "front_blocks": 1, "back_blocks": 1},
        {"name": "deepcache", "cache_interval": 1},
    ],
    ids=["fbcache", "dbcache", "deepcache"],
)
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_threshold_zero_and_interval_one_are_identical(toy_pipe: Pipeline, cache: dict, cfg_scale: float) -> None:
    expected = run(toy_pipe, None, cfg_scale=cfg_scale)
    got = run(toy_pipe, cache, cfg_scale=cfg_scale)
    assert torch.equal(got, expected)
    stats = toy_pipe.cache_stats()[0]
    assert stats["blocks_skipped"] == 0 and stats["steps_computed"] == stats["steps"] == 10 * (1 + (cfg_scale != 1))


def test_caching_changes_the_result_and_is_counted(toy_pipe: Pipeline) -> None:
    expected = run(toy_pipe)
    for cache in ({"name": "fbcache", "threshold": 0.3}, {"name": "deepcache", "cache_interval": 3}):
        got = run(toy_pipe, cache)
        stats = toy_pipe.cache_stats()[0]
        assert stats["blocks_skipped"] > 0 and not torch.equal(got, expected)
        assert (got - expected).abs().max() < 0.05  # an approximation, not garbage


# ------------------------------------------------------------ CFG branches


def test_cfg_branches_keep_separate_state(toy_pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """One cached DiT serving both branches gives exactly what two DiTs, one per branch, each with its
    own cache, give; an engine that shared one state between the branches would not."""
    options = {"threshold": 0.3}
    dits = {"cond": copy.deepcopy(toy_pipe.dit), "uncond": copy.deepcopy(toy_pipe.dit)}
    toy_pipe.set_cache({"name": "fbcache", **options})
    separate = toy_pipe("a cat", cfg_scale=4.0, **CALL)
    stats = toy_pipe.cache_stats()[0]["branches"]
    assert set(stats) == {"cond", "uncond"} and stats["cond"]["steps"] == stats["uncond"]["steps"] == 10

    # the reference: a DiT per branch, each with its own cache
    handles = {name: apply_fbcache(dit, TOY_LAYOUT, options) for name, dit in dits.items()}

    def predict(latents: torch.Tensor, timestep: torch.Tensor, cond: dict, **kw: Any) -> torch.Tensor:
        t = timestep.expand(latents.shape[0]).to(latents.dtype)
        return dits[current_cfg_branch()](latents, t, cond["text"])

    toy_pipe.set_cache(None)
    with monkeypatch.context() as m:
        m.setattr(toy_pipe, "predict", predict)
        two_models = toy_pipe("a cat", cfg_scale=4.0, **CALL)
    assert torch.equal(separate, two_models)
    assert {name: h.stats()["branches"][name]["cached_steps"] for name, h in handles.items()} == {
        name: stats[name]["cached_steps"] for name in stats
    }

    # the same engine keyed by one shared state instead: a different result
    monkeypatch.setattr(engine, "current_cfg_branch", lambda: "shared")
    toy_pipe.set_cache({"name": "fbcache", **options})
    shared = toy_pipe("a cat", cfg_scale=4.0, **CALL)
    assert set(toy_pipe.cache_stats()[0]["branches"]) == {"shared"}
    assert not torch.allclose(shared, separate, atol=1e-5)


def test_reset_starts_every_call_afresh(toy_pipe: Pipeline) -> None:
    first = run(toy_pipe, {"name": "fbcache", "threshold": 0.3})
    stats = toy_pipe.cache_stats()
    second = toy_pipe("a cat", **CALL)
    assert torch.equal(first, second) and toy_pipe.cache_stats() == stats


# ------------------------------------------------------------ with offload and fp8 (applied before the cache)


@pytest.mark.parametrize("offload", [["sequential"], ["disk"], ["fp8", "sequential"]], ids="+".join)
def test_composes_with_offload_and_fp8(toy_files: list[ModelConfig], offload: list[str]) -> None:
    """The cache wraps blocks whose weights an offload backend streams: same decisions, same result."""
    if "fp8" in offload:
        pytest.importorskip("difforge_fp8")
    cache = {"name": "fbcache", "threshold": 0.3}
    dtype_only = [o for o in offload if o == "fp8"] or None
    reference = Pipeline.from_pretrained("toy", model_configs=toy_files, device="cpu", offload=dtype_only, cache=cache)
    offloaded = Pipeline.from_pretrained("toy", model_configs=toy_files, device="cpu", offload=offload, cache=cache)
    expected = reference("a cat", cfg_scale=3.0, **CALL)
    assert torch.equal(offloaded("a cat", cfg_scale=3.0, **CALL), expected)
    assert offloaded.cache_stats() == reference.cache_stats() and offloaded.cache_stats()[0]["blocks_skipped"] > 0
    offloaded.set_cache({"name": "fbcache", "threshold": 0.0})
    assert torch.equal(offloaded("a cat", cfg_scale=3.0, **CALL), run(reference, None, cfg_scale=3.0))


# ------------------------------------------------------------ removal


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modules": [(name, m) for name, m in model.named_modules()],
        "params": {name: p for name, p in model.named_parameters()},
        "keys": list(model.state_dict()),
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "forward": [m.__dict__.get("forward") for m in model.modules()],
    }


def test_remove_restores_the_original_modules(toy_pipe: Pipeline) -> None:
    dit = toy_pipe.dit
    before, blocks = snapshot(dit), list(dit.blocks)
    expected = run(toy_pipe)
    toy_pipe.set_cache({"name": "fbcache", "threshold": 0.3})
    assert all(isinstance(b, CachedBlock) and b.block is orig for b, orig in zip(dit.blocks, blocks))
    # while applied, names, state_dict keys and the parameters themselves are the original ones
    assert list(dit.state_dict()) == before["keys"]
    assert dict(dit.named_parameters()) == before["params"]
    assert not torch.equal(toy_pipe("a cat", **CALL), expected)
    toy_pipe.set_cache(None)
    after = snapshot(dit)
    assert all(a is b for a, b in zip(dit.blocks, blocks))
    assert [(n, id(m)) for n, m in after["modules"]] == [(n, id(m)) for n, m in before["modules"]]
    assert after["params"] == before["params"] and after["keys"] == before["keys"]
    assert after["hooks"] == before["hooks"] and after["forward"] == before["forward"]
    assert torch.equal(toy_pipe("a cat", **CALL), expected)


def test_remove_is_idempotent_and_a_context_manager(toy_pipe: Pipeline) -> None:
    dit, blocks = toy_pipe.dit, list(toy_pipe.dit.blocks)
    with apply_fbcache(dit, TOY_LAYOUT, {}) as handle:
        assert isinstance(dit.blocks[0], CachedBlock)
        with pytest.raises(ConfigError, match="already has a cache applied"):
            apply_deepcache(dit, TOY_LAYOUT, {})
    handle.remove()
    assert list(dit.blocks) == blocks and all(a is b for a, b in zip(dit.blocks, blocks))


def test_failed_installation_leaves_nothing_behind(toy_pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    dit, blocks = toy_pipe.dit, list(toy_pipe.dit.blocks)
    real_init, made = CachedBlock.__init__, []

    def flaky_init(self: CachedBlock, *args: Any) -> None:
        if len(made) == 2:
            raise RuntimeError("boom")
        real_init(self, *args)
        made.append(self)

    monkeypatch.setattr(CachedBlock, "__init__", flaky_init)
    with pytest.raises(RuntimeError, match="boom"):
        apply_fbcache(dit, TOY_LAYOUT, {})
    assert all(a is b for a, b in zip(dit.blocks, blocks))


def test_wrong_layout_is_refused(toy_pipe: Pipeline) -> None:
    with pytest.raises(ConfigError, match="no nn.ModuleList"):
        apply_fbcache(toy_pipe.dit, BlockLayout((BlockGroup("blocks"), BlockGroup("nope"))), {})
    assert not any(isinstance(b, CachedBlock) for b in toy_pipe.dit.blocks)


# ------------------------------------------------------------ statistics


def test_stats_count_steps_and_blocks(toy_pipe: Pipeline) -> None:
    n = len(toy_pipe.dit.blocks)
    run(toy_pipe, {"name": "deepcache", "cache_interval": 3, "cache_branch_id": 1}, cfg_scale=2.0)
    stats = toy_pipe.cache_stats()[0]
    for branch in stats["branches"].values():
        assert branch["cached_steps"] == [1, 2, 4, 5, 7, 8]  # computed: 0, 3, 6, 9
        assert branch["blocks_skipped"] == 6 * (n - 2) and branch["blocks_computed"] == 10 * n - 6 * (n - 2)
    assert stats["strategy"] == "deepcache" and stats["blocks"] == n
    assert (stats["steps"], stats["steps_cached"], stats["blocks_skipped"]) == (20, 12, 12 * (n - 2))

    run(toy_pipe, {"name": "fbcache", "threshold": 0.3, "warmup_steps": 3, "force_compute_steps": [5],
                   "max_consecutive_cached": 1})  # fmt: skip
    stats = toy_pipe.cache_stats()[0]
    cached = stats["branches"]["cond"]["cached_steps"]
    assert cached and min(cached) >= 3 and 5 not in cached
    assert all(b - a > 1 for a, b in zip(cached, cached[1:]))  # never two cached steps in a row
    assert stats["blocks_skipped"] == len(cached) * (n - 1)
    assert stats["blocks_computed"] + stats["blocks_skipped"] == 10 * n
    toy_pipe._cache_handles[0].reset()
    assert toy_pipe.cache_stats()[0]["steps"] == 0


def test_family_thresholds_and_options(toy_pipe: Pipeline) -> None:
    toy_pipe.set_cache("fbcache")
    assert toy_pipe._cache_handles[0].threshold == engine.DEFAULT_THRESHOLD  # "toy" has no entry
    assert engine.family_threshold("flux") == 0.08 and engine.family_threshold("Qwen_Image") == 0.08
    toy_pipe.set_cache("dbcache")  # front_blocks 8 > 4 blocks: nothing to cache, still correct
    assert toy_pipe._cache_handles[0].stats()["blocks"] == 4
    with pytest.raises(ConfigError, match="threshold"):
        toy_pipe.set_cache({"name": "fbcache", "threshold": -1})
    with pytest.raises(ConfigError, match="cache_interval"):
        toy_pipe.set_cache({"name": "deepcache", "cache_interval": 0})
    with pytest.raises(ConfigError, match="has no option 'interval'"):
        toy_pipe.set_cache({"name": "deepcache", "interval": 2})
    with pytest.raises(ConfigError, match="force_compute_steps"):
        toy_pipe.set_cache({"name": "fbcache", "force_compute_steps": 3})
    assert not any(isinstance(b, CachedBlock) for b in toy_pipe.dit.blocks)


# ------------------------------------------------------------ several groups, keyword streams


class PairBlock(nn.Module):
    """Two streams in, two out (called with keywords by :class:`TwoStageModel`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + torch.tanh(self.a(x + y) * t), y + torch.tanh(self.b(x - y))


class JointBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.lin(h) * t)


class TwoStageModel(nn.Module):
    """Pair blocks on (x, y), a concatenation, then joint blocks on h: groups with different streams."""

    layout = BlockLayout((BlockGroup("pairs", ("x", "y")), BlockGroup("joint", ("h",))))

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.pairs = nn.ModuleList(PairBlock(dim) for _ in range(3))
        self.joint = nn.ModuleList(JointBlock(dim) for _ in range(3))

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for block in self.pairs:
            x, y = block(x=x, y=y, t=t)
        h = torch.cat([x, y], dim=1)
        for block in self.joint:
            h = block(h, t=t)
        return h


@pytest.mark.parametrize("preset", ["fbcache", "dbcache", "deepcache"])
def test_groups_with_different_streams(preset: str) -> None:
    torch.manual_seed(0)
    model = TwoStageModel().eval()
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    t = torch.tensor(0.7)
    expected = model(x, y, t)
    apply = {"fbcache": apply_fbcache, "dbcache": apply_dbcache, "deepcache": apply_deepcache}[preset]
    exact = {"fbcache": {"threshold": 0.0}, "dbcache": {"threshold": 0.0, "front_blocks": 2, "back_blocks": 1},
             "deepcache": {"cache_interval": 1}}[preset]  # fmt: skip
    with torch.no_grad(), apply(model, TwoStageModel.layout, exact) as handle:
        assert all(torch.equal(model(x, y, t), expected) for _ in range(3))
        assert handle.stats()["blocks_skipped"] == 0
    cached = {"fbcache": {"threshold": 0.1}, "dbcache": {"threshold": 0.1, "front_blocks": 2, "back_blocks": 1},
              "deepcache": {"cache_interval": 2}}[preset]  # fmt: skip
    with torch.no_grad(), apply(model, TwoStageModel.layout, cached) as handle:
        first, second = model(x, y, t), model(x, y, t)  # the same input twice: the second call is served from the cache
        stats = handle.stats()
    assert torch.equal(first, expected) and stats["steps_cached"] == 1 and stats["blocks_skipped"] > 0
    torch.testing.assert_close(second, expected, rtol=0, atol=1e-6)  # per-segment residuals rebuild the output


def test_blocks_must_follow_the_layout() -> None:
    model = TwoStageModel()
    wrong = BlockLayout((BlockGroup("pairs", ("x", "y", "z")), BlockGroup("joint", ("h",))))
    with apply_fbcache(model, wrong, {"threshold": 0.1}), pytest.raises(ConfigError, match="stream 'z'"):
        model(torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.tensor(0.5))


def test_branch_is_read_per_call() -> None:
    """Calls under different branches interleave without disturbing each other's step counts."""
    model = TwoStageModel()
    x, y, t = torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.tensor(0.5)
    with torch.no_grad(), apply_fbcache(model, TwoStageModel.layout, {"threshold": 0.5}) as handle:
        for _ in range(3):
            with cfg_branch("cond"):
                model(x, y, t)
            with cfg_branch("uncond"):
                model(-x, y, t)
        branches = handle.stats()["branches"]
    assert branches["cond"]["cached_steps"] == branches["uncond"]["cached_steps"] == [1, 2]


def test_model_attributes_pass_through() -> None:
    block = PairBlock(4)
    block.note = "kept"
    model = nn.Module()
    model.blocks = nn.ModuleList([block, PairBlock(4)])
    with BlockCache(model, BlockLayout((BlockGroup("blocks", ("x", "y")),)), threshold=0.1) as handle:
        wrapped = model.blocks[0]
        assert wrapped.note == "kept" and wrapped.a is block.a and "CachedBlock[PairBlock]" in repr(model)
        model.eval()
        assert not block.training and not block.a.training
    assert handle.stats()["blocks"] == 2 and model.blocks[0] is block and not block.training

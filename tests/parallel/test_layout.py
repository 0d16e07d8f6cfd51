"""Layouts of ``parallelism=N`` and the errors for impossible ones: all raised before any process starts
or any weights are read."""

from __future__ import annotations

import logging

import pytest
import torch

import difforge
from difforge import ConfigError, parallel
from difforge.parallel import ParallelLayout, plan_layout
from difforge.runtime.recipe import parse_recipe


def test_plan_layout_splits() -> None:
    assert plan_layout() is None
    assert plan_layout(1) is None
    assert plan_layout(2, uses_cfg=True) == ParallelLayout(cfg=2, ulysses=1)
    assert plan_layout(2, uses_cfg=False) == ParallelLayout(cfg=1, ulysses=2)
    assert plan_layout(4, uses_cfg=True) == ParallelLayout(cfg=2, ulysses=2)
    assert plan_layout(3, uses_cfg=True) == ParallelLayout(cfg=1, ulysses=3)
    assert plan_layout(4, ulysses_degree=4, uses_cfg=True) == ParallelLayout(cfg=1, ulysses=4)
    assert plan_layout(4, cfg_parallel=1) == ParallelLayout(cfg=1, ulysses=4)
    assert plan_layout(cfg_parallel=2) == ParallelLayout(cfg=2, ulysses=1)
    assert plan_layout(cfg_parallel=2, ulysses_degree=2, ring_degree=1).world_size == 4


def test_plan_layout_logs_its_choice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="difforge.parallel"):
        plan_layout(4, uses_cfg=True, pipeline="qwen-image")
    assert "cfg_parallel=2, ulysses_degree=2" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(parallelism=4, cfg_parallel=2, ulysses_degree=1), "is not cfg_parallel"),
        (dict(parallelism=3, cfg_parallel=2), "not a multiple of cfg_parallel"),
        (dict(cfg_parallel=3), "1 or 2"),
        (dict(parallelism=8, ulysses_degree=2), "at most 2"),
        (dict(parallelism=4, ring_degree=2), "ring attention is not implemented"),
        (dict(parallelism=0), "integer >= 1"),
        (dict(parallelism=2.0), "integer >= 1"),
    ],
)
def test_plan_layout_errors(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        plan_layout(**kwargs)


def test_impossible_layouts_fail_before_any_process(qwen_folder, wan_folder) -> None:
    # 2 heads cannot be split 4 ways: from the DiT's inferred config, before spawning or loading
    with pytest.raises(ConfigError, match="does not divide the 2 attention heads"):
        difforge.Pipeline.from_pretrained("qwen-image", qwen_folder, device="cpu", ulysses_degree=4)
    with pytest.raises(ConfigError, match="ring attention is not implemented"):
        difforge.Pipeline.from_pretrained("wan", wan_folder, device="cpu", parallelism=2, ring_degree=2)
    with pytest.raises(ConfigError, match="cfg_parallel"):
        difforge.Pipeline.from_pretrained("wan", wan_folder, device="cpu", parallelism=2, cfg_parallel=2, ulysses_degree=2)
    if torch.cuda.device_count() < 64:
        with pytest.raises(ConfigError, match="CUDA device"):
            difforge.Pipeline.from_pretrained("wan", wan_folder, device="cuda", parallelism=64)
    with pytest.raises(ConfigError, match="give device='cuda'"):
        difforge.Pipeline.from_pretrained("wan", wan_folder, device="cuda:1", parallelism=2)


def test_a_dit_that_did_not_opt_in_is_refused() -> None:
    class Plain(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Config:
        num_heads = 4

    with pytest.raises(ConfigError, match="does not support sequence parallelism"):
        parallel.check_denoiser(ParallelLayout(ulysses=2), "plain-dit", Plain, Config())
    parallel.check_denoiser(ParallelLayout(cfg=2), "plain-dit", Plain, Config())  # CFG parallel needs nothing


def test_default_split_reads_the_family_defaults() -> None:
    from difforge_flux.pipeline import FluxPipeline
    from difforge_qwen_image.pipeline import QwenImagePipeline
    from difforge_wan.pipeline import WanPipeline

    assert not parallel.default_uses_cfg(FluxPipeline)
    assert parallel.default_uses_cfg(QwenImagePipeline)
    assert parallel.default_uses_cfg(WanPipeline)


def test_recipe_keys() -> None:
    recipe = parse_recipe({"pipeline": {"name": "wan", "parallelism": 4, "ulysses_degree": 2}})
    kwargs = recipe.pretrained_kwargs()
    assert kwargs["parallelism"] == 4 and kwargs["ulysses_degree"] == 2 and kwargs["cfg_parallel"] is None
    assert "parallelism = 4" in recipe.to_toml()
    with pytest.raises(ConfigError, match="parallelism"):
        parse_recipe({"pipeline": {"name": "wan", "parallelism": "four"}})

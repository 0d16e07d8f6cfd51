"""Fixtures of the difforge-cache tests: the toy family with the cache plugin, and a toy pipeline."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import difforge
import difforge_cache
import difforge_sdk.toy
from difforge import ModelConfig, Pipeline
from difforge.plugins import PluginSettings
from difforge_sdk.toy.checkpoints import write_toy_checkpoints
from difforge_sdk.toy.models import ToyDiTConfig


@pytest.fixture(autouse=True, scope="module")
def cache_registry() -> Iterator[Any]:
    """The built-in plugin, the toy family, difforge-cache (and difforge-fp8 where installed) alone in the
    registry, restored afterwards; one thread, as tiny models on a shared machine only lose by more."""
    plugins: list[Any] = [difforge_sdk.toy, difforge_cache]
    if importlib.util.find_spec("difforge_fp8") is not None:
        import difforge_fp8

        plugins.append(difforge_fp8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=plugins)
    yield host.registry
    difforge.reload_plugins()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory: pytest.TempPathFactory) -> list[ModelConfig]:
    """Toy checkpoints with a 4-block DiT (so that there is a middle to cache)."""
    files = write_toy_checkpoints(tmp_path_factory.mktemp("toy"), dit_config=ToyDiTConfig(depth=4))
    return [ModelConfig(path=str(p)) for p in files.values()]


@pytest.fixture(scope="module")
def shared_toy_pipe(toy_files: list[ModelConfig], cache_registry: Any) -> Pipeline:
    return Pipeline.from_pretrained("toy", model_configs=toy_files, device="cpu")


@pytest.fixture
def toy_pipe(shared_toy_pipe: Pipeline) -> Iterator[Pipeline]:
    """The shared toy pipeline, its cache removed after each test."""
    yield shared_toy_pipe
    shared_toy_pipe.set_cache(None)

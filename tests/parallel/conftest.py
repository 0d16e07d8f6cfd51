"""Fixtures of the parallel tests: the family plugins alone in the registry (the spawned workers get the
same registry), one thread, and tiny Flux, Qwen-Image and Wan folders written once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import difforge
from difforge.plugins import PluginSettings

from .tiny_families import write_flux, write_qwen_image, write_wan

pytest.importorskip("diffusers")


@pytest.fixture(autouse=True, scope="module")
def parallel_registry() -> Iterator[Any]:
    import difforge_cache
    import difforge_flux
    import difforge_qwen_image
    import difforge_text_encoders
    import difforge_wan

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    plugins = [difforge_text_encoders, difforge_flux, difforge_wan, difforge_qwen_image, difforge_cache]
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=plugins)
    yield host.registry
    difforge.reload_plugins()
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_flux(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="session")
def qwen_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen_image(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="session")
def wan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wan(tmp_path_factory.mktemp("wan"))

"""Fixtures of the loading tests: the toy family alone in the registry (``toy_registry``, used by
the checkpoint tests through ``pytestmark``), and toy checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from .loading_helpers import to_diffusers, toy_state_dict, write_safetensors

import difforge
import difforge_sdk.toy
from difforge.plugins import PluginSettings


@pytest.fixture
def toy_registry(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Only the built-in plugin and the toy family (no installed plugins), restored afterwards.

    A test marked ``@pytest.mark.plugins([module, ...])`` gets those extra plugin modules too.
    """
    marker = request.node.get_closest_marker("plugins")
    extra = list(marker.args[0]) if marker else []
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_sdk.toy, *extra])
    yield host.registry
    difforge.reload_plugins()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "plugins(modules): extra plugin modules for the toy registry")


@pytest.fixture
def own_file(tmp_path: Path, toy_registry: Any) -> Path:
    """Toy-1 weights in the own layout."""
    return write_safetensors(tmp_path / "toy1.safetensors", toy_state_dict())


@pytest.fixture
def diffusers_file(tmp_path: Path, toy_registry: Any) -> Path:
    """Toy-1 weights in the toy-diffusers layout."""
    return write_safetensors(tmp_path / "toy1-diffusers.safetensors", to_diffusers(toy_state_dict()))

"""Fixtures for the difforge-text-encoders tests: a registry with only this plugin (and the core's
built-ins), and loading a checkpoint through the core (``difforge.load_model``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import difforge
import difforge_text_encoders
from difforge.plugins import PluginSettings


@pytest.fixture
def registry() -> Iterator[Any]:
    difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_text_encoders])
    try:
        yield difforge.get_registry()
    finally:
        difforge.reload_plugins()


def _load_detected(path: Path | str | list[Path]) -> tuple[torch.nn.Module, Any]:
    """``difforge.load_model(path)``: detected, built on the meta device, (converted) weights assigned."""
    model = difforge.load_model(path)
    return model, model.difforge_detection


def _save_transformers(model: Any, folder: Path) -> dict[str, torch.Tensor]:
    """``model.save_pretrained(folder)``; returns the tensors exactly as written to disk."""
    from safetensors.torch import load_file

    model.save_pretrained(folder)
    return load_file(folder / "model.safetensors")


@pytest.fixture
def load_detected(registry: Any) -> Any:
    """``load_detected(path) -> (model, detection)`` (the test modules run in importlib mode, so
    helpers are handed out as fixtures)."""
    return _load_detected


@pytest.fixture
def save_transformers() -> Any:
    """``save_transformers(model, folder) -> {name: tensor}`` as written by ``save_pretrained``."""
    return _save_transformers

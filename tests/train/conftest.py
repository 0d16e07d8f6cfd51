"""Fixtures of the training tests: a tiny random FLUX.1 pipeline saved by diffusers (so the same weights
run on both sides), and tiny shapes data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import difforge
from difforge_sdk.shapes.data import write_dataset
from difforge_sdk.parity_pipelines import write_flux

SIZE = 32


@pytest.fixture(autouse=True)
def _registry() -> Any:
    difforge.reload_plugins()
    yield


@pytest.fixture(scope="package", autouse=True)
def _threads() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    # FLUX.1-dev-like: 1 double + 2 single blocks (2 heads x 16), a 4-level AE of 8 channels, CLIP and T5
    return write_flux(tmp_path_factory.mktemp("tiny-flux"), dit_layers=3, vae_dim_mult=(1, 1, 1, 1),
                      std={"dit": 0.3, "vae": 0.3, "text": 0.3})


@pytest.fixture(scope="package")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 32x32 shapes images with their captions."""
    folder = tmp_path_factory.mktemp("shapes")
    write_dataset(folder, 4, seed=3, size=SIZE)
    return folder


@pytest.fixture(scope="package")
def shapes_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 32x32 shapes images (one batch of 2, or two batches of 1)."""
    folder = tmp_path_factory.mktemp("shapes2")
    write_dataset(folder, 2, seed=5, size=SIZE)
    return folder

"""Fixtures of the difforge-sd tests (helpers in :mod:`.sd_helpers`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import difforge


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only cost on the shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def registry() -> Iterator[Any]:
    """Every installed plugin (difforge-sd, difforge-text-encoders, difforge-cache among them)."""
    host = difforge.reload_plugins()
    yield host.registry
    difforge.reload_plugins()



"""Fixtures of the difforge-fp8 tests: the toy family and difforge-fp8 registered alone (with the
core's built-in location backends), toy checkpoints, and the plain run to compare with."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import difforge
import difforge_fp8
import difforge_sdk.toy
from difforge.plugins import PluginSettings
from difforge_sdk.toy.checkpoints import write_toy_checkpoints

from .fp8_helpers import CALL, DIT, build


@pytest.fixture(autouse=True, scope="module")
def registry() -> Iterator[Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: threads only add contention
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_sdk.toy, difforge_fp8])
    yield host.registry
    difforge.reload_plugins()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["toy", "toy-diffusers"])
def checkpoints(request: Any, tmp_path_factory: Any) -> list[Path]:
    paths = write_toy_checkpoints(tmp_path_factory.mktemp(request.param), dit_format=request.param, dit_config=DIT)
    return list(paths.values())


@pytest.fixture(scope="module")
def reference(registry: Any, checkpoints: list[Path]) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """The plain run's latents and every component's state dict (copies)."""
    pipe = build(checkpoints)
    out = pipe(**CALL)
    return out, {slot: {k: v.clone() for k, v in m.state_dict().items()} for slot, m in pipe.models().items()}

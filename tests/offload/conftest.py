"""Fixtures of the offload tests: the toy family registered alone, toy checkpoints in both layouts,
and the plain (no offload) output each backend must reproduce bit for bit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import difforge
import difforge_sdk.toy
from difforge.plugins import PluginSettings
from difforge_sdk.toy.checkpoints import write_toy_checkpoints

from .offload_helpers import CALL, DIT, build


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on a shared machine: intra-op threads only add contention (and minutes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def toy_registry() -> Iterator[Any]:
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_sdk.toy])
    yield host.registry
    difforge.reload_plugins()


@pytest.fixture(scope="module", params=["toy", "toy-diffusers"])
def checkpoints(request: Any, tmp_path_factory: Any) -> list[Path]:
    """The toy pipeline's files; the DiT in its own layout, or the diffusers one (renamed keys and a
    q/k/v fuse transform, so tensors are rebuilt through the converter)."""
    paths = write_toy_checkpoints(tmp_path_factory.mktemp(request.param), dit_format=request.param, dit_config=DIT)
    return list(paths.values())


@pytest.fixture(scope="module")
def reference(toy_registry: Any, checkpoints: list[Path]) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """The plain run's latents and every component's state dict (copies)."""
    pipe = build(checkpoints)
    out = pipe(**CALL)
    return out, {slot: {k: v.clone() for k, v in m.state_dict().items()} for slot, m in pipe.models().items()}

"""Fixtures of the LoRA manager tests: the toy family with a throwaway LoRA plugin, toy checkpoints."""

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
from difforge_sdk.toy.models import ToyDiTConfig

from . import lora_helpers

CALL = {"prompt": "a red cube", "seed": 3, "num_inference_steps": 2, "output_type": "latent", "progress_bar_cmd": lambda x: x}


@pytest.fixture(autouse=True, scope="module")
def toy_lora_registry() -> Iterator[Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    plugins = [difforge_sdk.toy, lora_helpers]
    try:
        import difforge_fp8

        plugins.append(difforge_fp8)
    except ImportError:  # the fp8 tests skip
        pass
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=plugins)
    yield host.registry
    difforge.reload_plugins()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: Any) -> list[Path]:
    return list(write_toy_checkpoints(tmp_path_factory.mktemp("toy"), dit_config=ToyDiTConfig(depth=3)).values())


@pytest.fixture
def build(checkpoints: list[Path]) -> Any:
    def make(offload: Any = None) -> difforge.Pipeline:
        return difforge.Pipeline.from_pretrained("toy", checkpoints, device="cpu", offload=offload)

    return make

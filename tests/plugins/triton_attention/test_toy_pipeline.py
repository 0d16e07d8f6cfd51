"""A whole pipeline with ``attention="triton"`` (under the interpreter) gives the image ``sdpa`` gives.

The toy family's DiT at hidden 128 with 2 heads has head dim 64, which the kernel serves. The
Flux, Qwen-Image and Wan pipelines get it in test_family_pipelines.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import difforge
import difforge_sdk.toy
import difforge_triton
import difforge_triton.kernel
from difforge import ModelConfig, Pipeline
from difforge.plugins import PluginSettings
from difforge_sdk.toy.checkpoints import write_toy_checkpoints
from difforge_sdk.toy.models import ToyDiT, ToyDiTConfig

pytestmark = pytest.mark.usefixtures("interpreted")

DIT = ToyDiTConfig(hidden_size=128, num_heads=2, depth=2)  # head dim 64


@pytest.fixture(autouse=True, scope="module")
def toy_and_triton(triton_registry: Any) -> Iterator[None]:
    difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_sdk.toy, difforge_triton])
    yield


def toy_pipeline(folder: Path) -> Pipeline:
    files = write_toy_checkpoints(folder, seed=3, dit_config=DIT)
    pipe = Pipeline.from_pretrained("toy", model_configs=[ModelConfig(path=str(p)) for p in files.values()], device="cpu")
    if pipe.dit.config.num_heads != DIT.num_heads:  # the toy's shape inference assumes head dim 16
        dit = ToyDiT(DIT).eval()
        dit.load_state_dict(pipe.dit.state_dict())
        pipe.components["dit"] = dit
    return pipe


def test_toy_pipeline_matches_sdpa(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    kernel = difforge_triton.kernel.flash_attention
    monkeypatch.setattr(difforge_triton.kernel, "flash_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))

    pipe = toy_pipeline(tmp_path)
    run = dict(prompt="a red square", seed=0, height=48, width=48, num_inference_steps=2, output_type="np")
    pipe.set_attention("sdpa")
    ref = pipe(**run)
    assert not calls
    pipe.set_attention("triton")
    out = pipe(**run)
    assert len(calls) == 2 * DIT.depth  # every attention call of both steps went to the kernel
    assert out.shape == ref.shape == (1, 48, 48, 3)
    err = abs(out - ref).max()
    assert err <= 1e-3, err

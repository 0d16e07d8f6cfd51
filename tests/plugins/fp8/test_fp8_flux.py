"""difforge-fp8 on a tiny FLUX.1 DiT loaded by ``difforge.load_model``: the Flux ModelSpec's
keep-high-precision patterns, accuracy, and composition with every location backend."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import difforge
import difforge_fp8
from difforge.plugins import PluginSettings

from .fp8_helpers import rel_err

difforge_flux = pytest.importorskip("difforge_flux")
from difforge_flux.dit import FluxDiT, FluxDiTConfig  # noqa: E402

CONFIG = FluxDiTConfig(
    in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64, mlp_ratio=2.0,
    num_heads=4, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6),
)
FLUX_TOLERANCE = 0.02
"""One DiT forward: relative error of the velocity below 2% (measured: about 0.4% for both)."""


@pytest.fixture(scope="module", autouse=True)
def registry() -> Iterator[Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_flux, difforge_fp8])
    yield host.registry
    difforge.reload_plugins()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory: Any) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("flux") / "flux-dit.safetensors"
    save_file({k: v.contiguous() for k, v in FluxDiT(CONFIG).state_dict().items()}, str(path))
    return path


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return {
        "img": torch.randn(1, 16, 16, generator=g), "img_ids": ids.reshape(16, 3),
        "txt": torch.randn(1, 8, 32, generator=g), "txt_ids": torch.zeros(8, 3),
        "timesteps": torch.tensor([0.7]), "y": torch.randn(1, 32, generator=g), "guidance": torch.tensor([3.5]),
    }


def pipeline(registry: Any, path: Path) -> Any:
    """What the offload backends read from a pipeline (there is no Flux pipeline yet)."""
    model = difforge.load_model(path)
    spec = registry.models.get("flux-dit")
    return SimpleNamespace(
        components={"dit": model}, spec=SimpleNamespace(component_order=("dit",)), device=torch.device("cpu"),
        torch_dtype=torch.float32, _model_spec=lambda slot: spec,
    )


def apply(registry: Any, pipe: Any, name: str) -> Any:
    spec = registry.offload.get(name)
    return difforge._names.resolve(spec.apply)(pipe, dict(spec.options))


def run(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs())


@pytest.mark.parametrize("dtype", ["fp8", "fp8-scaled"])
def test_flux_fp8_with_every_location_backend(registry: Any, dit_file: Path, dtype: str) -> None:
    pipe = pipeline(registry, dit_file)
    model = pipe.components["dit"]
    plain, state = run(model), {k: v.clone() for k, v in model.state_dict().items()}
    cast = apply(registry, pipe, dtype)
    patterns = registry.models.get("flux-dit").keep_high_precision
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            kept = any(fnmatch.fnmatchcase(f"{name}.weight", p) for p in patterns)
            assert layer.weight.dtype == (torch.float32 if kept else torch.float8_e4m3fn), name
    alone = run(model)
    assert 0 < rel_err(alone, plain) < FLUX_TOLERANCE
    for location in ("cpu", "sequential", "disk"):
        handle = apply(registry, pipe, location)
        assert torch.equal(run(model), alone), location
        handle.remove()
    cast.remove()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(run(model), plain)


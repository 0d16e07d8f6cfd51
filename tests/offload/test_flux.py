"""The location backends on a tiny FLUX.1 DiT (two block groups with two streams each), loaded by
``difforge.load_model`` in the file's dtype (memory-mapped) and converted to bf16 (rebuilt by cast)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import difforge
from difforge.builtin.offload import apply_cpu, apply_disk, apply_sequential
from difforge.plugins import PluginSettings

difforge_flux = pytest.importorskip("difforge_flux")
from difforge_flux.dit import FluxDiT, FluxDiTConfig  # noqa: E402

CONFIG = FluxDiTConfig(
    in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64, mlp_ratio=2.0,
    num_heads=4, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6),
)
APPLY = {"cpu": apply_cpu, "sequential": apply_sequential, "disk": apply_disk}


@pytest.fixture(scope="module", autouse=True)
def flux_registry() -> Iterator[Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_flux])
    yield host.registry
    difforge.reload_plugins()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory: Any) -> Path:
    torch.manual_seed(0)
    model = FluxDiT(CONFIG)
    path = tmp_path_factory.mktemp("flux") / "flux-dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "img": torch.randn(1, 16, 16, generator=g).to(dtype),
        "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3),
        "txt": torch.randn(1, 8, 32, generator=g).to(dtype),
        "txt_ids": torch.zeros(8, 3),
        "timesteps": torch.tensor([0.7]),
        "y": torch.randn(1, 32, generator=g).to(dtype),
        "guidance": torch.tensor([3.5]),
    }


def fake_pipeline(model: torch.nn.Module, registry: Any, dtype: torch.dtype) -> Any:
    """What the offload backends read from a pipeline (there is no Flux pipeline yet)."""
    spec = registry.models.get(model.difforge_detection.model)
    return SimpleNamespace(
        components={"dit": model}, spec=SimpleNamespace(component_order=("dit",)), device=torch.device("cpu"),
        torch_dtype=dtype, _model_spec=lambda slot: spec,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", list(APPLY))
def test_flux_location_backends_are_bit_exact(flux_registry: Any, dit_file: Path, backend: str, dtype: torch.dtype) -> None:
    model = difforge.load_model(dit_file, torch_dtype=dtype)
    assert model.difforge_detection.model == "flux-dit"
    x = inputs(dtype)
    with torch.inference_mode():
        want = model(**x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = APPLY[backend](fake_pipeline(model, flux_registry, dtype), dict(flux_registry.offload.get(backend).options))
    with torch.inference_mode():
        assert torch.equal(model(**x), want)
        assert torch.equal(model(**x), want)
    if backend != "cpu":
        assert handle.materialised() == []
        assert all(p.is_meta for p in model.parameters())
        names = [u.name for u in handle.all_units() if u.is_block]
        assert names == ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]
        if backend == "disk":
            assert handle.stats()["scratch_bytes"] == 0  # every tensor is re-read from the checkpoint
    handle.remove()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in state.items())

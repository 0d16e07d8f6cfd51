"""load_model: meta construction, lazy own-layout weights, dtype/device per tensor, clear errors."""

from __future__ import annotations

import gc
import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import difforge
import difforge_sdk.toy
from difforge import ConverterSpec, ModelSpec
from difforge.errors import LoadError
from difforge.loading.state_dict import save_safetensors
from difforge.plugins import PluginSettings
from difforge_sdk.toy.models import (
    TOY1_CONFIG,
    ToyDiT,
    ToyDiTConfig,
    is_toy_diffusers,
    toy_diffusers_fuse_qkv,
    toy_diffusers_rename,
)

from .loading_helpers import to_diffusers, toy_state_dict, write_safetensors

pytestmark = pytest.mark.usefixtures("toy_registry")


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 3, 16, generator=g)


def _reference(sd: dict[str, torch.Tensor], config: ToyDiTConfig = TOY1_CONFIG) -> ToyDiT:
    model = ToyDiT(config)
    model.load_state_dict(sd)
    return model.eval()


def test_round_trip_own_layout(own_file: Path) -> None:
    sd = toy_state_dict()
    model = difforge.load_model(own_file)
    assert isinstance(model, ToyDiT) and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert set(model.state_dict()) == set(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert model.difforge_detection.variant == "Toy-1" and model.difforge_detection.model == "toy-dit"
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), _reference(sd)(*_inputs()))
    # no second copy: every parameter is a view of the one memory map of the file
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1


def test_diffusers_layout_loads_the_same_weights(diffusers_file: Path) -> None:
    sd = toy_state_dict()
    model = difforge.load_model(diffusers_file)
    assert model.difforge_detection.format == "toy-diffusers"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_dtype_conversion_per_tensor(own_file: Path) -> None:
    sd = toy_state_dict()
    model = difforge.load_model(own_file, torch_dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.equal(model.state_dict()[k], v.bfloat16()) for k, v in sd.items())
    with torch.no_grad():
        x, t, text = _inputs()
        assert model(x.bfloat16(), t, text.bfloat16()).dtype == torch.bfloat16


def test_other_sources(tmp_path: Path) -> None:
    sd = toy_state_dict()
    prefixed = write_safetensors(
        tmp_path / "comfy.safetensors", {"model.diffusion_model." + k: v for k, v in to_diffusers(sd).items()}
    )
    torch.save(sd, tmp_path / "toy.pth")
    folder = tmp_path / "transformer"
    folder.mkdir()
    keys, weight_map = sorted(sd), {}
    for i, part in enumerate((keys[:16], keys[16:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        write_safetensors(folder / name, {k: sd[k].half() for k in part})
        weight_map |= {k: name for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for source, dtype in ((prefixed, None), (tmp_path / "toy.pth", None), (folder, torch.float32)):
        model = difforge.load_model(source, torch_dtype=dtype)
        expected = {k: v.half().float() if source == folder else v for k, v in sd.items()}
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items()), source


class FakeModelConfig:
    """What difforge.ModelConfig offers load_model: ``paths()`` and an optional forced model/format."""

    def __init__(self, paths: list[Path], model: str | None = None, format: str | None = None) -> None:
        self._paths, self.model, self.format = paths, model, format
        self.calls = 0

    def paths(self) -> list[str]:
        self.calls += 1
        return [str(p) for p in self._paths]


def test_model_config_like_object(own_file: Path) -> None:
    cfg = FakeModelConfig([own_file])
    model = difforge.load_model(cfg)
    assert cfg.calls == 1 and isinstance(model, ToyDiT)
    with pytest.raises(difforge.DetectionError, match="toy-vae"):
        difforge.load_model(FakeModelConfig([own_file], model="toy-vae"))


def test_given_detection_is_used(own_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    detection = difforge.detect(own_file)
    import difforge.loading.load as load_mod

    monkeypatch.setattr(load_mod, "detect_header", lambda *a, **k: pytest.fail("detected again"))
    assert difforge.load_model(own_file, detection=detection).difforge_detection is detection
    assert isinstance(difforge.load_model(None, detection=detection), ToyDiT)


def test_missing_and_unexpected_keys(tmp_path: Path) -> None:
    sd = toy_state_dict()
    del sd["blocks.1.mlp.2.bias"]
    sd["blocks.0.attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(LoadError) as info:
        difforge.load_model(write_safetensors(tmp_path / "bad.safetensors", sd))
    msg = str(info.value)
    assert "1 missing key(s): blocks.1.mlp.2.bias" in msg and "1 unexpected key(s): blocks.0.attn.extra.weight" in msg


def test_shape_mismatch(tmp_path: Path) -> None:
    sd = toy_state_dict()
    sd["blocks.1.mlp.0.weight"] = torch.zeros(96, 32)  # mlp width differs from block 0's
    sd["blocks.1.mlp.0.bias"] = torch.zeros(96)
    with pytest.raises(LoadError, match=r"blocks.1.mlp.0.bias \[96\] \(model wants \[64\]\)"):
        difforge.load_model(write_safetensors(tmp_path / "bad.safetensors", sd))


class WithBuffer(nn.Module):
    """Breaks the convention: a non-persistent buffer made in __init__ stays on meta."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(4.0), persistent=False)


def _buffer_models() -> Iterator[ModelSpec]:
    yield ModelSpec(name="buffered", family="test", role="dit", module=WithBuffer, format="own",
                    config_from_shapes=lambda shapes: {} if "proj.weight" in shapes else None,
                    identifying_keys=("proj.weight",))  # fmt: skip


def test_non_persistent_buffer_left_on_meta(tmp_path: Path) -> None:
    plugin = types.ModuleType("buffered_plugin")
    plugin.difforge_register_models = _buffer_models
    difforge.reload_plugins(PluginSettings(autoload=False), plugins=[plugin])
    path = write_safetensors(
        tmp_path / "b.safetensors", {f"proj.{k}": v for k, v in nn.Linear(4, 4).state_dict().items()}
    )
    with pytest.raises(LoadError, match="table stayed on the meta device"):
        difforge.load_model(path)


# ---------------------------------------------------------------- lazy transform

CALLS: list[int] = []


def _counting_fuse(sd: dict[str, Any]) -> dict[str, Any]:
    if not all(t.is_meta for t in sd.values()):
        CALLS.append(len(sd))
    return toy_diffusers_fuse_qkv(sd)


def _counting_converters() -> Iterator[ConverterSpec]:
    yield ConverterSpec(name="toy-dit-counted", source_format="toy-diffusers-counted", target_model="toy-dit",
                        detect=is_toy_diffusers, rename=toy_diffusers_rename, transform=_counting_fuse)  # fmt: skip


def test_transform_runs_per_fused_tensor_only(diffusers_file: Path) -> None:
    plugin = types.ModuleType("counting_plugin")
    plugin.difforge_register_converters = _counting_converters
    difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_sdk.toy, plugin])
    CALLS.clear()
    model = difforge.load_model(FakeModelConfig([diffusers_file], format="toy-diffusers-counted"))
    assert model.difforge_detection.converter == "toy-dit-counted"
    assert CALLS == [3, 3, 3, 3]  # q/k/v weight and bias of each block, one fused tensor at a time
    assert all(torch.equal(model.state_dict()[k], v) for k, v in toy_state_dict().items())


# ---------------------------------------------------------------- memory


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_memory_stays_close_to_the_file_size(tmp_path: Path) -> None:
    config = ToyDiTConfig(hidden_size=256, num_heads=16, depth=8, mlp_ratio=4)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ToyDiT(config).state_dict().items()}
    path = save_safetensors({k: torch.randn(s) for k, s in shapes.items()}, tmp_path / "m.safetensors")
    size = path.stat().st_size
    gc.collect()
    before = _rss()
    model = difforge.load_model(path)
    after_load = _rss() - before
    total = sum(float(p.sum()) for p in model.parameters())  # touch every weight
    after_touch = _rss() - before
    assert total == total  # not NaN
    print(
        f"file {size / 2**20:.1f} MiB, RSS +{after_load / size:.2f}x after load, +{after_touch / size:.2f}x after use"
    )
    assert after_load < 0.25 * size, f"loading (nothing touched) grew RSS by {after_load / size:.2f}x the file"
    assert after_touch < 1.15 * size, f"RSS grew by {after_touch / size:.2f}x the file"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_to_cuda(own_file: Path) -> None:
    model = difforge.load_model(own_file, torch_dtype=torch.float16, device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    sd = toy_state_dict()
    assert all(torch.equal(model.state_dict()[k].cpu(), v.half()) for k, v in sd.items())

"""difforge-fp8 on the toy pipeline and on single layers: accuracy, keep-high-precision patterns,
composition with every location backend, exact ``remove()``, options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from difforge import ConfigError, DifforgeError
from difforge_fp8.cast import SCALE, cast_module, dequantize, quantize

from .fp8_helpers import CALL, TOLERANCE, assert_state_equal, build, rel_err, remove_all

LAYER_TOLERANCE = 0.06
"""One e4m3 layer alone: 3 mantissa bits round each weight by up to 6%, about 3% on outputs."""
KEEP = ("*norm*", "time_embed.*", "x_embedder.*", "final.*")  # the toy DiT's keep_high_precision


# ---------------------------------------------------------------- quantisation


def test_plain_clips_scaled_keeps_range() -> None:
    w = torch.tensor([[1000.0, 0.5, -0.001], [0.002, -0.003, 0.001]])
    before = w.clone()
    q, scale = quantize(w, torch.float8_e4m3fn, scaled=False)
    assert q.dtype == torch.float8_e4m3fn and scale is None
    assert dequantize(q, None, torch.float32)[0, 0] == 448.0  # clipped, never NaN
    q, scale = quantize(w, torch.float8_e4m3fn, scaled=True)
    assert scale.shape == (2, 1) and scale.dtype == torch.float32
    back = dequantize(q, scale, torch.float32)
    assert torch.allclose(back.abs().amax(dim=1), w.abs().amax(dim=1))  # each row's largest value survives
    assert rel_err(back[1], w[1]) < 0.05  # the row of small weights keeps its accuracy
    q, _ = quantize(w, torch.float8_e5m2, scaled=False)
    assert q.dtype == torch.float8_e5m2 and dequantize(q, None, torch.float32)[0, 0] == 1024.0
    assert torch.equal(w, before)  # the input is never modified


def test_quantize_in_chunks_equals_at_once() -> None:
    torch.manual_seed(0)
    w = torch.randn(3000, 2000, dtype=torch.bfloat16)  # 6M elements: two row chunks
    q, scale = quantize(w, torch.float8_e4m3fn, scaled=True)
    wf = w.float()
    want_scale = wf.abs().amax(dim=1, keepdim=True) / 448
    assert torch.equal(scale, want_scale)
    assert torch.equal(q.view(torch.uint8), (wf / want_scale).to(torch.float8_e4m3fn).view(torch.uint8))


def test_scaled_beats_plain_on_weights_with_outliers() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(256, 128)
    with torch.no_grad():
        layer.weight.normal_(0, 0.004)  # mostly fp8-subnormal weights...
        layer.weight[::16, ::32] = 600.0  # ...and outliers beyond e4m3's 448 in some rows
    x = torch.randn(8, 256)
    want = layer(x)
    errors = {}
    for scaled in (False, True):
        test = nn.Linear(256, 128)
        test.load_state_dict(layer.state_dict())
        handle = cast_module(test, scaled=scaled)
        errors[scaled] = rel_err(test(x), want)
        handle.remove()
        assert torch.equal(test(x), test(x))
    assert errors[True] < 0.05 < errors[False]
    assert errors[True] < errors[False] / 5


def test_conv_layers_are_cast_per_output_channel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 4, 2, stride=2))
    x = torch.randn(1, 3, 10, 10)
    want = model(x)
    handle = cast_module(model, scaled=True, keep_original=True)
    assert model[0].weight.dtype == torch.float8_e4m3fn and model[0]._buffers[SCALE].shape == (8, 1, 1, 1)
    assert model[1]._buffers[SCALE].shape == (1, 4, 1, 1)  # ConvTranspose: output channels are dim 1
    assert rel_err(model(x), want) < LAYER_TOLERANCE
    handle.remove()
    assert torch.equal(model(x), want)


# ---------------------------------------------------------------- the pipeline


@pytest.mark.parametrize("offload", ["fp8", "fp8-scaled", {"name": "fp8", "format": "e5m2"}], ids=["fp8", "fp8-scaled", "e5m2"])
def test_pipeline_within_tolerance_and_remove_restores(checkpoints: list[Path], reference: Any, offload: Any) -> None:
    out, states = reference
    pipe = build(checkpoints, offload)
    got = pipe(**CALL)
    assert not torch.equal(got, out)  # something was cast...
    assert rel_err(got, out) < TOLERANCE  # ...within the stated tolerance
    remove_all(pipe)
    assert_state_equal(pipe, states)  # re-read from the checkpoint: exact, without keeping originals
    assert all("forward" not in m.__dict__ and SCALE not in m._buffers for c in pipe.models().values() for m in c.modules())
    assert torch.equal(pipe(**CALL), out)


def test_keep_high_precision_and_exclude(checkpoints: list[Path], reference: Any) -> None:
    _, states = reference
    pipe = build(checkpoints, {"name": "fp8", "exclude": ["blocks.0.*"]})
    (handle,) = pipe._offload_handles
    for name, layer in pipe.dit.named_modules():
        if isinstance(layer, nn.Linear):
            key = f"{name}.weight"
            kept = name.startswith("blocks.0.") or any(__import__("fnmatch").fnmatchcase(key, p) for p in KEEP)
            assert layer.weight.dtype == (torch.float32 if kept else torch.float8_e4m3fn), key
            if kept:
                assert torch.equal(layer.weight, states["dit"][key])
    stats = handle.stats()
    assert stats["kept_high_precision"] == 6 + 4  # x_embedder, time_embed.0/.2, final.modulation/.linear (+ blocks.0's 4)
    # ... and fp8 storage is a quarter of fp32 (half of bf16) for the cast layers
    assert stats["weight_bytes_after"] * 4 == stats["weight_bytes_before"]


@pytest.mark.parametrize("location", ["cpu", "sequential", "disk"])
@pytest.mark.parametrize("dtype", ["fp8", "fp8-scaled"])
def test_every_pair_of_dtype_and_location(checkpoints: list[Path], reference: Any, dtype: str, location: str) -> None:
    """A location backend over fp8 weights is bit-exact against fp8 alone, and both come off exactly."""
    out, states = reference
    alone = build(checkpoints, dtype)(**CALL)
    pipe = build(checkpoints, [location, dtype])  # listed in any order: the core applies dtype first
    fp8, where = pipe._offload_handles
    assert torch.equal(pipe(**CALL), alone)
    spill_dir = fp8.spill_dir
    if location == "disk":  # fp8 spilled its weights and scales as it cast them; disk streams them from there
        assert where.stats()["scratch_bytes"] == 0
        assert fp8.stats()["spilled_bytes"] >= fp8.stats()["weight_bytes_after"] > 0
        assert spill_dir is not None and sorted(p.name for p in spill_dir.iterdir()) == ["dit.fp8", "text_encoder.fp8", "vae.fp8"]
    else:
        assert spill_dir is None and fp8.stats()["spilled_bytes"] == 0
    if location != "cpu":
        assert where.materialised() == [] and all(p.is_meta for p in pipe.dit.parameters())
    with pytest.raises(DifforgeError, match="remove the location backend"):
        fp8.remove()
    remove_all(pipe)
    assert_state_equal(pipe, states)
    assert spill_dir is None or not spill_dir.exists()
    assert torch.equal(pipe(**CALL), out)


def _mapped_files(tensor: torch.Tensor) -> list[str]:
    """The files of this process's memory mappings that hold the tensor's data (Linux /proc/self/maps)."""
    ptr, found = tensor.data_ptr(), []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= ptr < end and len(fields) > 5:
                found.append(fields[5])
    return found


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps")
@pytest.mark.parametrize("dtype", ["fp8", "fp8-scaled"])
def test_fp8_before_disk_spills_as_it_casts(checkpoints: list[Path], dtype: str, tmp_path: Path) -> None:
    """With ``disk`` to follow, the cast layers' fp8 weights (and scales) are written to a file as they are cast
    and left there: between the two backends every one is a view of that file's mapping, not process memory."""
    from difforge._names import resolve
    from difforge.plugins import get_registry
    from difforge.runtime.options import parse_choices

    alone = build(checkpoints, dtype)(**CALL)
    pipe = build(checkpoints)
    pipe.offload_choices = parse_choices([dtype, {"name": "disk", "components": ["dit"], "offload_dir": str(tmp_path)}], "offload")
    spec = get_registry().offload.get(dtype)
    handle = resolve(spec.apply)(pipe, dict(spec.options))
    assert handle.spill_dir is not None and handle.spill_dir.parent == tmp_path
    spill = str(handle.spill_dir / "dit.fp8")
    in_dit = {id(m) for m in pipe.dit.modules()}
    assert sum(id(entry.module) in in_dit for entry in handle.layers) > 0
    for layer in (entry.module for entry in handle.layers):
        tensors = [layer.weight, *([layer._buffers[SCALE]] if dtype == "fp8-scaled" else [])]
        if id(layer) in in_dit:
            assert all(_mapped_files(t) == [spill] for t in tensors)
        else:  # the other components stay in memory
            assert all(spill not in _mapped_files(t) for t in tensors)
    assert torch.equal(pipe(**CALL), alone)  # the mapped weights compute like in-memory ones
    handle.remove()
    assert not Path(spill).exists() and not any(tmp_path.iterdir())  # the spill folder is deleted


def test_scaled_mm_option_falls_back_without_fp8_matmuls(checkpoints: list[Path]) -> None:
    want = build(checkpoints, "fp8-scaled")(**CALL)
    assert torch.equal(build(checkpoints, {"name": "fp8-scaled", "scaled_mm": True})(**CALL), want)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs a GPU with fp8 matmuls"
)
def test_scaled_mm_on_gpu() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(256, 128, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(32, 256, dtype=torch.bfloat16, device="cuda")
    want = layer(x)
    cast_module(layer, scaled=True, scaled_mm=True)
    assert rel_err(layer(x), want) < 0.05


# ---------------------------------------------------------------- remove without a checkpoint, errors


def test_remove_without_a_checkpoint() -> None:
    """Weights that cannot be re-read come back exactly when kept, else as their fp8 values upcast."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    original = layer.weight
    handle = cast_module(layer, keep_original=True)
    handle.remove()
    assert layer.weight is original
    want = original.detach().clone()
    handle = cast_module(layer)
    fp8 = layer.weight.detach().clone()
    handle.remove()
    assert layer.weight.dtype == torch.float32 and layer.weight.requires_grad
    assert torch.equal(layer.weight, fp8.float()) and not torch.equal(layer.weight, want)


@pytest.mark.parametrize(
    ("offload", "message"),
    [
        ({"name": "fp8", "format": "e4m4"}, "format must be one of 'e4m3', 'e5m2'"),
        ({"name": "fp8", "components": ["unet"]}, "no model component 'unet'"),
        ({"name": "fp8", "exclude": "*norm*"}, "exclude must be a list of strings"),
        ({"name": "fp8-scaled", "keep_original": 1}, "keep_original must be true or false"),
        (["fp8", "fp8-scaled"], "already cast"),
    ],
)
def test_bad_options(checkpoints: list[Path], offload: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(checkpoints, offload)


def test_components_option(checkpoints: list[Path]) -> None:
    pipe = build(checkpoints, {"name": "fp8", "components": ["dit"]})
    assert pipe.text_encoder.mlp.fc1.weight.dtype == torch.float32
    assert pipe.dit.blocks[0].mlp[0].weight.dtype == torch.float8_e4m3fn


def test_entry_module_is_light() -> None:
    code = "import sys, difforge_fp8; assert 'torch' not in sys.modules and 'difforge_fp8.cast' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

"""Tiny diffusers weights written in every on-disk layout load through ``difforge.load_model`` and
give diffusers' outputs: BFL (by the inverse key map), ComfyUI-prefixed BFL, diffusers files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import difforge


def save(path, sd, prefix: str = ""):
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("layout", ["bfl", "comfyui", "diffusers", "diffusers-folder"])
def test_dit_loads_in_every_layout(tmp_path, dit_pair, layout) -> None:
    if layout == "bfl":
        path = save(tmp_path / "flux.safetensors", dit_pair.ours.state_dict())
    elif layout == "comfyui":
        path = save(tmp_path / "flux.safetensors", dit_pair.ours.state_dict(), prefix="model.diffusion_model.")
    elif layout == "diffusers":
        path = save(tmp_path / "flux.safetensors", dit_pair.ref.state_dict())
    else:
        path = tmp_path / "transformer"
        path.mkdir()
        save(path / "diffusion_pytorch_model.safetensors", dit_pair.ref.state_dict())
        (path / "config.json").write_text(json.dumps(dict(dit_pair.ref.config, _class_name="FluxTransformer2DModel")))
    model = difforge.load_model(path)
    assert model.difforge_detection.model == "flux-dit"
    assert model.config == dit_pair.ours.config
    x = dit_pair.inputs
    with torch.no_grad():
        got = model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], guidance=x["guidance"])
        expected = dit_pair.ref_forward()
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_ae_loads_in_both_layouts(tmp_path, ae_pair, layout) -> None:
    sd = ae_pair.ours.state_dict() if layout == "bfl" else ae_pair.ref.state_dict()
    model = difforge.load_model(save(tmp_path / "ae.safetensors", sd))
    assert model.difforge_detection.format == layout
    assert model.config == ae_pair.ours.config
    cfg = ae_pair.ref.config
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model.decode(latents)
        expected = ae_pair.ref.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample
    assert (got - expected).abs().max().item() <= 1e-4

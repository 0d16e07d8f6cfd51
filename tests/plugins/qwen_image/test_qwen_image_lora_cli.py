"""`difforge convert --lora` on Qwen-Image LoRAs: the PEFT LoRA of ``test_qwen_image_lora`` rewritten
diffusers -> comfyui -> kohya -> diffusers through the CLI; every file loads to diffusers' image (1e-3),
and diffusers itself reads our ComfyUI file."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from difforge import Pipeline
from difforge.lora import lora_manager

from .test_qwen_image_lora import _diff, _reference, _run, lora

_FIXTURES = (lora,)  # pytest finds fixtures by name in this module

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def test_cli_converts_qwen_image_loras_between_layouts(tiny, lora, tmp_path) -> None:
    from difforge.cli import main

    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    source = lora["path"]
    detected = {"comfyui": "diffusers", "kohya": "kohya", "diffusers": "diffusers"}  # ComfyUI's is read as diffusers
    for fmt in ("comfyui", "kohya", "diffusers"):
        out = tmp_path / f"{fmt}.safetensors"
        assert main(["convert", "--lora", str(source), "--to", fmt, "-o", str(out)]) == 0
        keys = load_file(str(out))
        if fmt == "comfyui":
            assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
            assert _diff(_reference(tiny, lora["noise"], out), lora["lora"]) < 1e-3  # diffusers reads it
        name = pipe.load_lora(out)
        assert lora_manager(pipe).loras[name].formats == {"dit": detected[fmt]}
        assert _diff(_run(pipe, lora), lora["lora"]) < 1e-3, fmt
        pipe.clear_lora()
        source = out


def test_export_to_comfyui(tiny, lora, tmp_path) -> None:
    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    pipe.load_lora(lora["path"], name="peft", fuse=False)
    path = pipe.export_lora("peft", tmp_path / "comfy.safetensors", format="comfyui")
    assert all(k.startswith("diffusion_model.") for k in load_file(str(path)))
    pipe.clear_lora()
    pipe.load_lora(path)
    assert _diff(_run(pipe, lora), lora["lora"]) < 1e-3

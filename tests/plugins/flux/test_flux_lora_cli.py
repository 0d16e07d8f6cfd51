"""`difforge convert --lora` on Flux LoRAs: the PEFT LoRA of ``test_flux_lora`` (DiT and CLIP parts)
rewritten diffusers -> comfyui -> kohya -> diffusers through the CLI; every file loads (``target="all"``)
to diffusers' image (1e-3)."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from difforge.lora import lora_manager

from .test_flux_lora import _diff, _pipe, _registry, _run, _threads, expected, tiny

_FIXTURES = (_registry, _threads, expected, tiny)  # pytest finds fixtures by name in this module

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def test_cli_converts_flux_loras_between_layouts(tiny, expected, tmp_path) -> None:
    from difforge.cli import main

    pipe = _pipe(tiny)
    source = tiny["lora"]
    marks = {"comfyui": "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
             "kohya": "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
             "diffusers": "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"}  # fmt: skip
    for fmt, key in marks.items():
        out = tmp_path / f"{fmt}.safetensors"
        assert main(["convert", "--lora", str(source), "--to", fmt, "-o", str(out)]) == 0
        assert key in load_file(str(out)), fmt
        name = pipe.load_lora(out, target="all")
        assert lora_manager(pipe).loras[name].formats == {"dit": fmt, "text_encoder": fmt}
        assert _diff(_run(pipe, tiny), expected["lora"]) < 1e-3, fmt
        pipe.clear_lora()
        source = out

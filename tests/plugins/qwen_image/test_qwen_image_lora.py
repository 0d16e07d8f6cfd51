"""Qwen-Image LoRAs against diffusers: a tiny PEFT LoRA on conftest's tiny QwenImagePipeline, saved with
``QwenImagePipeline.save_lora_weights`` and loaded by diffusers (``load_lora_weights``) and by us, fused and
hot, in the layouts users have (kohya written by our export and read back by diffusers too; ComfyUI and
DiffSynth-Studio spellings written by key map).

Every comparison runs the whole pipeline (text encoder, DiT, VAE) on the same initial noise in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import difforge
from difforge_sdk.parity_pipelines import write_peft_lora
from difforge import Pipeline
from difforge.lora import lora_manager, read_lora, split_lora_key

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

PROMPT = "a cat holding a sign"
SIZE = 32
CALL = dict(height=SIZE, width=SIZE, num_inference_steps=2, output_type="np", cfg_scale=1.0, progress_bar_cmd=lambda x: x)
TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "img_mod.1", "txt_mod.1",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_in", "txt_in", "proj_out",
    "norm_out.linear", "linear_1", "linear_2",
]  # fmt: skip


@pytest.fixture(scope="module")
def lora(tiny: Path, tmp_path_factory: Any) -> dict[str, Any]:
    """A random PEFT LoRA (rank 4, alpha 8, ``to_k`` at alpha 2) on every linear layer of the DiT."""
    from diffusers import QwenImagePipeline

    ref = QwenImagePipeline.from_pretrained(tiny, torch_dtype=torch.float32)
    path = write_peft_lora(ref, tmp_path_factory.mktemp("qwen-image-lora"), TARGETS, alpha_pattern={"to_k": 2})
    noise = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    return {"path": path, "noise": noise, "base": _reference(tiny, noise), "lora": _reference(tiny, noise, path)}


def _reference(folder: Path, noise: torch.Tensor, path: Path | None = None) -> np.ndarray:
    from diffusers import QwenImagePipeline

    from difforge_qwen_image.pipeline import pack_latents

    ref = QwenImagePipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    if path is not None:
        ref.load_lora_weights(str(path))
    return ref(PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, true_cfg_scale=1.0,
               latents=pack_latents(noise), output_type="np").images  # fmt: skip


def _run(pipe: Pipeline, lora: dict[str, Any]) -> np.ndarray:
    return pipe(PROMPT, latents=lora["noise"], **CALL)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "hot"])
def test_peft_lora_matches_diffusers(tiny, lora, fuse) -> None:
    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    base = _run(pipe, lora)
    assert _diff(base, lora["base"]) < 1e-3
    assert _diff(lora["lora"], lora["base"]) > 1e-2  # the LoRA matters
    name = pipe.load_lora(str(lora["path"]), fuse=fuse)
    entry = lora_manager(pipe).loras[name]
    assert entry.fused is fuse and entry.formats == {"dit": "diffusers"}
    assert len(entry.deltas["dit"]) == 4 + 2 * 14 + 2  # every linear layer of the two blocks and around them
    assert _diff(_run(pipe, lora), lora["lora"]) < 1e-3
    pipe.clear_lora()
    assert np.array_equal(_run(pipe, lora), base)


def test_kohya_export_is_read_by_diffusers_and_by_us(tiny, lora, tmp_path) -> None:
    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    pipe.load_lora(lora["path"], name="peft")
    path = pipe.export_lora("peft", tmp_path / "kohya.safetensors", format="kohya")
    keys = load_file(str(path))
    assert "lora_unet_transformer_blocks_1_attn_add_k_proj.lora_down.weight" in keys
    assert "lora_unet_time_text_embed_timestep_embedder_linear_1.alpha" in keys
    assert _diff(_reference(tiny, lora["noise"], path), lora["lora"]) < 1e-3  # diffusers reads our export
    pipe.clear_lora()
    pipe.load_lora(path, fuse=False)
    assert lora_manager(pipe).loras["kohya"].formats == {"dit": "kohya"}
    assert _diff(_run(pipe, lora), lora["lora"]) < 1e-3


def _respell(lora_path: Path, out: Path, prefix: str, a: str, b: str, bake_alpha: bool) -> Path:
    """The PEFT file's modules behind ``prefix`` with down/up spelt ``a``/``b``; alphas kept as keys, or
    folded into the up projections (DiffSynth-Studio's files carry none and its loader scales by 1)."""
    tensors = read_lora(lora_path).tensors  # the PEFT metadata's alphas are keys here
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, role = split_lora_key(key)
        groups.setdefault(module.removeprefix("transformer."), {})[role] = value
    written = {}
    for module, g in groups.items():
        up = g["B"]
        if bake_alpha:
            up = up * (float(g["alpha"]) / g["A"].shape[0])
        else:
            written[f"{prefix}{module}.alpha"] = g["alpha"]
        written[f"{prefix}{module}.{a}"] = g["A"].contiguous()
        written[f"{prefix}{module}.{b}"] = up.contiguous()
    save_file(written, str(out))
    return out


@pytest.mark.parametrize(
    ("layout", "prefix", "a", "b", "bake"),
    [
        ("comfyui", "diffusion_model.", "lora_A.weight", "lora_B.weight", False),
        ("diffsynth", "", "lora_A.default.weight", "lora_B.default.weight", True),
        ("kohya-dotted", "", "lora_down.weight", "lora_up.weight", False),
    ],
)
def test_other_spellings_give_the_same_image(tiny, lora, tmp_path, layout, prefix, a, b, bake) -> None:
    path = _respell(lora["path"], tmp_path / f"{layout}.safetensors", prefix, a, b, bake)
    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    name = pipe.load_lora(path)
    assert lora_manager(pipe).loras[name].formats == {"dit": "diffusers"}
    assert _diff(_run(pipe, lora), lora["lora"]) < 1e-3


def test_a_lora_of_another_family_is_refused(tiny, tmp_path) -> None:
    """FLUX.1 diffusers names (``ff.net.2``, ``single_transformer_blocks``) are not Qwen-Image's."""
    path = tmp_path / "flux.safetensors"
    save_file({"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.zeros(2, 32),
               "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.zeros(128, 2)}, str(path))  # fmt: skip
    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    with pytest.raises(difforge.DifforgeError, match="LoRA"):
        pipe.load_lora(path)

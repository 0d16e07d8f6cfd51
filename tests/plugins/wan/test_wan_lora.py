"""Wan LoRAs against diffusers: a tiny PEFT LoRA on the tiny diffusers ``WanTransformer3DModel`` (the
reference), saved with ``WanPipeline.save_lora_weights`` and loaded by diffusers (``load_lora_weights``)
and by us, fused and hot, in every layout difforge-wan reads: diffusers/PEFT as saved, and the ComfyUI
(Wan-AI names) and kohya (musubi-tuner) layouts written from the same LoRA by our key maps. diffusers'
own reader of Wan-AI-named files checks those key maps independently.

Every comparison runs the whole pipeline (umT5, DiT, VAE) on the same initial noise in float32.
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
from difforge.lora import lora_manager, read_lora
from difforge_wan.lora import inverse_comfyui, inverse_kohya, rename_diffusers

from .test_wan_pipeline import _tiny_diffusers_pipeline

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

PROMPT = "a cat holding a sign"
SIZE, FRAMES = 32, 5  # a 4 x 4 latent, 2 latent frames
CALL = dict(height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=2, cfg_scale=1.0, output_type="np",
            progress_bar_cmd=lambda x: x)  # fmt: skip
#: every linear layer of the T2V DiT (diffusers names): attention, feed-forward, embeddings, output
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "linear_1", "linear_2", "time_proj", "proj_out"]
#: modules per block (self and cross attention q/k/v/o, ffn.0/2) x 2 blocks + 4 embeddings + time_proj + proj_out
MODULES = 10 * 2 + 4 + 1 + 1


@pytest.fixture(autouse=True)
def wan_registry():
    """Every installed plugin (umT5 and its tokenizer come from difforge-text-encoders)."""
    difforge.reload_plugins()
    yield
    difforge.reload_plugins()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: Any) -> Path:
    return _tiny_diffusers_pipeline(tmp_path_factory.mktemp("wan-lora"), "2.1")


def _reference(folder: Path, noise: torch.Tensor, path: Path | None = None) -> np.ndarray:
    from diffusers import WanPipeline

    ref = WanPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    if path is not None:
        ref.load_lora_weights(str(path))
    return ref(PROMPT, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=2, guidance_scale=1.0,
               latents=noise.clone(), output_type="np").frames  # fmt: skip


@pytest.fixture(scope="module")
def lora(tiny: Path, tmp_path_factory: Any) -> dict[str, Any]:
    """A random PEFT LoRA (rank 4, alpha 8, ``to_k`` at alpha 2) on every linear layer of the DiT."""
    from diffusers import WanPipeline

    ref = WanPipeline.from_pretrained(tiny, torch_dtype=torch.float32)
    path = write_peft_lora(ref, tmp_path_factory.mktemp("wan-lora-file"), TARGETS, alpha_pattern={"to_k": 2})
    noise = torch.randn(1, 16, (FRAMES - 1) // 4 + 1, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    return {"path": path, "noise": noise, "base": _reference(tiny, noise), "lora": _reference(tiny, noise, path)}


def _run(pipe: Pipeline, lora: dict[str, Any]) -> np.ndarray:
    return pipe(PROMPT, latents=lora["noise"].clone(), **CALL)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def _weights(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.components["dit"].state_dict().items()}


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _own(lora_path: Path) -> dict[str, torch.Tensor]:
    """The PEFT file in our own layout (Wan-AI module names, alphas from the PEFT metadata as keys)."""
    return {rename_diffusers(k): v for k, v in read_lora(lora_path).tensors.items()}


def _write(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "hot"])
def test_peft_lora_matches_diffusers(tiny, lora, fuse) -> None:
    pipe = Pipeline.from_pretrained("wan", str(tiny), device="cpu")
    before = _weights(pipe)
    base = _run(pipe, lora)
    assert _diff(base, lora["base"]) < 1e-3
    assert _diff(lora["lora"], lora["base"]) > 1e-2  # the LoRA matters
    name = pipe.load_lora(str(lora["path"]), fuse=fuse)
    entry = lora_manager(pipe).loras[name]
    assert entry.fused is fuse and entry.formats == {"dit": "diffusers"}
    assert len(entry.deltas["dit"]) == MODULES
    assert entry.deltas["dit"]["blocks.1.cross_attn.k"].scale == 0.5  # alpha_pattern: to_k at alpha 2, rank 4
    assert _diff(_run(pipe, lora), lora["lora"]) < 1e-3
    assert _same_bits(_weights(pipe), before) is not fuse  # fused: merged into the weights; hot: weights untouched
    pipe.clear_lora()
    assert _same_bits(_weights(pipe), before)  # bit for bit
    assert np.array_equal(_run(pipe, lora), base)  # as if never loaded
    assert not any(m._forward_hooks for m in pipe.components["dit"].modules())


def _layouts(lora_path: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """The PEFT LoRA written by our inverse key maps (and respelt as other tools write it):
    ``{name: (file, format detected)}``."""
    own = _own(lora_path)
    comfy = {inverse_comfyui(k): v for k, v in own.items()}
    kohya = {inverse_kohya(k): v for k, v in own.items()}
    assert None not in comfy and None not in kohya
    bare = {k.removeprefix("diffusion_model.").replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v
            for k, v in comfy.items()}  # fmt: skip
    baked = {}  # alphas folded into the ups (diffusers' reader of Wan-AI names ignores them outside the blocks)
    for key, value in comfy.items():
        if key.endswith(".lora_B.weight"):
            module = key.removesuffix(".lora_B.weight")
            value = value * (float(comfy[f"{module}.alpha"]) / comfy[f"{module}.lora_A.weight"].shape[0])
        if not key.endswith(".alpha"):
            baked[key] = value
    adapter = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
               for k, v in comfy.items()}  # fmt: skip
    peft = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
            for k, v in read_lora(lora_path).tensors.items()}  # fmt: skip  (alphas from the metadata, as keys)
    return {
        "diffusers-default-adapter": (_write(peft, tmp / "peft.safetensors"), "diffusers"),
        "comfyui": (_write(comfy, tmp / "comfyui.safetensors"), "comfyui"),
        "comfyui-baked": (_write(baked, tmp / "baked.safetensors"), "comfyui"),
        "wan-bare-down-up": (_write(bare, tmp / "bare.safetensors"), "comfyui"),
        "wan-default-adapter": (_write(adapter, tmp / "adapter.safetensors"), "comfyui"),
        "kohya": (_write(kohya, tmp / "kohya.safetensors"), "kohya"),
    }


def test_comfyui_and_kohya_layouts_give_the_same_video(tiny, lora, tmp_path) -> None:
    layouts = _layouts(lora["path"], tmp_path)
    comfy = load_file(str(layouts["comfyui"][0]))
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in comfy and "diffusion_model.head.head.alpha" in comfy
    assert "lora_unet_blocks_1_cross_attn_o.lora_up.weight" in load_file(str(layouts["kohya"][0]))
    # diffusers' own reader of Wan-AI-named files agrees with our key map
    assert _diff(_reference(tiny, lora["noise"], layouts["comfyui-baked"][0]), lora["lora"]) < 1e-3
    # and its reader of musubi-tuner files (blocks only: it knows no other module) agrees with our kohya map
    kohya = load_file(str(layouts["kohya"][0]))
    blocks = _write({k: v for k, v in kohya.items() if k.startswith("lora_unet_blocks_")}, tmp_path / "blocks.safetensors")
    pipe = Pipeline.from_pretrained("wan", str(tiny), device="cpu")
    pipe.load_lora(blocks, fuse=False)
    assert _diff(_run(pipe, lora), _reference(tiny, lora["noise"], blocks)) < 1e-3
    pipe.clear_lora()
    base = _run(pipe, lora)
    for layout, (path, fmt) in layouts.items():
        for fuse in (True, False):
            name = pipe.load_lora(path, fuse=fuse)
            entry = lora_manager(pipe).loras[name]
            assert entry.formats == {"dit": fmt} and len(entry.deltas["dit"]) == MODULES, layout
            assert _diff(_run(pipe, lora), lora["lora"]) < 1e-3, (layout, fuse)
            pipe.clear_lora()
    assert np.array_equal(_run(pipe, lora), base)


def test_export_round_trips_in_every_format(tiny, lora, tmp_path) -> None:
    pipe = Pipeline.from_pretrained("wan", str(tiny), device="cpu")
    pipe.load_lora(lora["path"], name="peft", fuse=False)
    hot = _run(pipe, lora)
    expect = {"diffusers": "transformer.blocks.0.attn1.to_out.0.lora_B.weight", "comfyui": "diffusion_model.time_projection.1.alpha",
              "kohya": "lora_unet_text_embedding_2.alpha"}  # fmt: skip
    other = Pipeline.from_pretrained("wan", str(tiny), device="cpu")
    for fmt, key in expect.items():
        path = pipe.export_lora("peft", tmp_path / f"{fmt}.safetensors", format=fmt)
        keys = load_file(str(path))
        assert key in keys, fmt
        if fmt == "diffusers":  # alpha folded in: diffusers' Wan loader takes no alpha keys
            assert not any(k.endswith(".alpha") for k in keys)
            assert _diff(_reference(tiny, lora["noise"], path), lora["lora"]) < 1e-3  # diffusers reads our export
        if fmt == "kohya":
            assert sum(k.endswith(".alpha") for k in keys) == MODULES
        name = other.load_lora(path, fuse=False)
        assert lora_manager(other).loras[name].formats == {"dit": fmt}
        assert _diff(_run(other, lora), hot) < 1e-5, fmt
        other.clear_lora()


def test_cli_converts_wan_loras_between_layouts(tiny, lora, tmp_path) -> None:
    """`difforge convert --lora`: diffusers -> comfyui -> kohya -> diffusers, each file loads to the same video."""
    from difforge.cli import main

    pipe = Pipeline.from_pretrained("wan", str(tiny), device="cpu")
    source = lora["path"]
    for fmt in ("comfyui", "kohya", "diffusers"):
        out = tmp_path / f"{fmt}.safetensors"
        assert main(["convert", "--lora", str(source), "--to", fmt, "-o", str(out)]) == 0
        name = pipe.load_lora(out)
        assert lora_manager(pipe).loras[name].formats == {"dit": fmt}
        assert _diff(_run(pipe, lora), lora["lora"]) < 1e-3, fmt
        pipe.clear_lora()
        source = out


def test_i2v_modules_are_reported_and_strict_false_skips_them(tiny, lora, tmp_path, caplog) -> None:
    """An image-to-video LoRA's ``k_img``/``v_img`` have no module in the T2V DiT: an error naming them, unless
    ``strict=False``, which applies the rest."""
    own = _own(lora["path"])
    extra = {"blocks.0.cross_attn.k_img.lora_A.weight": torch.zeros(4, 32),
             "blocks.0.cross_attn.k_img.lora_B.weight": torch.zeros(32, 4)}  # fmt: skip
    path = _write({inverse_comfyui(k): v for k, v in {**own, **extra}.items()}, tmp_path / "i2v.safetensors")
    pipe = Pipeline.from_pretrained("wan", str(tiny), device="cpu")
    with pytest.raises(difforge.DifforgeError, match=r"blocks\.0\.cross_attn\.k_img: no such module"):
        pipe.load_lora(path)
    pipe.load_lora(path, strict=False)
    assert "skipped 0 unknown key(s) and 1 mismatched module(s)" in caplog.text
    assert _diff(_run(pipe, lora), lora["lora"]) < 1e-3


def test_a_lightning_style_lora_sets_and_restores_the_scheduler(tiny, lora, tmp_path) -> None:
    """The LoRA's ``difforge.scheduler`` / ``difforge.call_defaults`` metadata (what a distilled LoRA needs) apply
    while it is loaded, are kept by export, and clearing restores the release's UniPC at shift 3."""
    own = _own(lora["path"])
    path = tmp_path / "lightning.safetensors"
    save_file({inverse_comfyui(k): v.contiguous() for k, v in own.items()}, str(path),
              {"difforge.scheduler": '{"name": "flow-euler", "shift": 5.0}',
               "difforge.call_defaults": '{"num_inference_steps": 3}'})  # fmt: skip
    pipe = Pipeline.from_pretrained("wan", str(tiny), device="cpu")
    release = pipe.scheduler_choice  # the folder's UniPC, flow shift 3
    assert release.name == "flow-unipc" and release.options["shift"] == 3.0
    call = {k: v for k, v in CALL.items() if k != "num_inference_steps"}
    pipe.load_lora(path, fuse=False)
    assert pipe.scheduler_choice.name == "flow-euler" and pipe.scheduler.shift == 5.0
    got = pipe(PROMPT, latents=lora["noise"].clone(), **call)
    exported = read_lora(pipe.export_lora("lightning", tmp_path / "out.safetensors", format="diffusers"))
    assert exported.metadata["difforge.call_defaults"] == '{"num_inference_steps": 3}'
    assert exported.metadata["difforge.scheduler"] == '{"name": "flow-euler", "shift": 5.0}'
    pipe.clear_lora()
    assert pipe.scheduler_choice is release
    assert "call_defaults" not in pipe.__dict__
    same = Pipeline.from_pretrained("wan", str(tiny), device="cpu", scheduler={"name": "flow-euler", "shift": 5.0})
    same.load_lora(path, fuse=False, scheduler=False)
    assert np.array_equal(got, same(PROMPT, latents=lora["noise"].clone(), num_inference_steps=3, **call))

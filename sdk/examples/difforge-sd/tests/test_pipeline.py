"""Whole pipelines against diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline (1e-3).

A tiny diffusers pipeline (random U-Net, VAE and CLIP encoders, locally trained tokenizers, the
released scheduler config) is saved with ``save_pretrained``; difforge assembles it from that folder
(its ``scheduler_config.json`` translated to our ``ddim`` / ``euler``) and from an original
single-file (``ldm``) checkpoint written with our inverse key maps, and both sides denoise the same
initial noise (img2img: the same image and noise; the tiny VAE's latent distribution is a point, so
diffusers' sampling of it and our mean agree). DeepCache at interval 1 must change nothing; at interval 2 it must skip and change
the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import difforge
from difforge import ModelConfig, Pipeline
from difforge.loading.convert import to_foreign_layout

from .sd_helpers import PROMPT, QUIET, write_pipeline

SIZE = 64  # pixels: latent 8x8
STEPS = 2


def _scheduler(kind: str, **kw: Any) -> Any:
    """The schedulers the releases ship (SD 1.5's PNDM aside: DDIM on its betas)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, **kw)
    if kind == "sd":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    return EulerDiscreteScheduler(timestep_spacing="leading", **common)


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def tiny(request: Any, tmp_path_factory: Any) -> tuple[str, Path]:
    kind = request.param
    return kind, write_pipeline(tmp_path_factory.mktemp(f"tiny-{kind}"), kind, _scheduler(kind))


@pytest.fixture(autouse=True)
def _registry() -> Any:
    yield difforge.reload_plugins()
    difforge.reload_plugins()


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def _reference(kind: str, folder: Path, noise: torch.Tensor, output_type: str = "np", **kw: Any) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if kind == "sd" else StableDiffusionXLPipeline
    ref = cls.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=noise.clone(),
               output_type=output_type, **kw).images


def _ours(pipe: Pipeline, noise: torch.Tensor, **kw: Any) -> Any:
    kw.setdefault("output_type", "np")
    return pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=noise.clone(), **QUIET, **kw)


def test_text_to_image_matches_diffusers(tiny):
    kind, folder = tiny
    pipe = Pipeline.from_pretrained(kind, str(folder), device="cpu")
    assert pipe.scheduler_choice.name == ("ddim" if kind == "sd" else "euler")
    assert pipe.defaults["cfg_scale"] == (7.5 if kind == "sd" else 5.0)
    noise = _noise()
    want = _reference(kind, folder, noise, guidance_scale=pipe.defaults["cfg_scale"])
    got = _ours(pipe, noise)
    assert got.shape == want.shape == (1, SIZE, SIZE, 3)
    assert np.abs(got - want).max() < 1e-3


def test_negative_prompt_matches_diffusers(tiny):
    kind, folder = tiny
    pipe = Pipeline.from_pretrained(kind, str(folder), device="cpu")
    noise = _noise(1)
    want = _reference(kind, folder, noise, output_type="latent", negative_prompt="blurry, low quality", guidance_scale=4.0)
    got = _ours(pipe, noise, output_type="latent", negative_prompt="blurry, low quality", cfg_scale=4.0)
    assert (want - noise).abs().max() > 0.1  # the denoiser did something
    assert (got - want).abs().max() < 1e-3
    without = _ours(pipe, noise, output_type="latent", cfg_scale=4.0)
    assert (without - got).abs().max() > 1e-3


def _sd_clip_skip_embeds(folder: Path, prompt: str, clip_skip: int) -> torch.Tensor:
    """diffusers' SD clip_skip rule, by hand: its own code reaches for ``text_encoder.text_model``, which
    transformers 5's CLIPTextModel no longer has (diffusers 0.42.1 + transformers 5.23)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    enc = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = enc(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return enc.final_layer_norm(hidden)


def test_clip_skip_matches_diffusers(tiny):
    kind, folder = tiny
    pipe = Pipeline.from_pretrained(kind, str(folder), device="cpu")
    noise = _noise(6)
    if kind == "sd":
        from diffusers import StableDiffusionPipeline

        ref = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        ref.set_progress_bar_config(disable=True)
        # diffusers skips layers for the prompt only
        want = ref(prompt_embeds=_sd_clip_skip_embeds(folder, PROMPT, 1), negative_prompt_embeds=_sd_clip_skip_embeds(folder, "", 0),
                   height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=noise.clone(), output_type="latent",
                   guidance_scale=3.0).images
    else:
        want = _reference(kind, folder, noise, output_type="latent", guidance_scale=3.0, clip_skip=1, negative_prompt="blurry")
    got = _ours(pipe, noise, output_type="latent", cfg_scale=3.0, clip_skip=1, negative_prompt=None if kind == "sd" else "blurry")
    assert (got - want).abs().max() < 1e-3
    assert (got - _ours(pipe, noise, output_type="latent", cfg_scale=3.0)).abs().max() > 1e-3


@pytest.mark.parametrize("tiny", ["sdxl"], indirect=True)
def test_sdxl_size_conditioning_matches_diffusers(tiny):
    kind, folder = tiny
    pipe = Pipeline.from_pretrained(kind, str(folder), device="cpu")
    noise = _noise(2)
    cond = dict(original_size=(32, 48), crops_coords_top_left=(4, 8), target_size=(64, 64))
    want = _reference(kind, folder, noise, output_type="latent", guidance_scale=5.0, **cond)
    got = _ours(pipe, noise, output_type="latent", **cond)
    assert (got - want).abs().max() < 1e-3
    assert (got - _ours(pipe, noise, output_type="latent")).abs().max() > 1e-3


@pytest.mark.parametrize("tiny", ["sd"], indirect=True)
def test_v_prediction_dpmpp_2m_matches_diffusers(tiny):
    """Another of our samplers with its diffusers twin, the U-Net read as predicting v."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    kind, folder = tiny

    ref = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                steps_offset=1, timestep_spacing="leading", prediction_type="v_prediction")
    ref.set_progress_bar_config(disable=True)
    noise = _noise(3)
    want = ref(PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, latents=noise.clone(), output_type="latent").images
    pipe = Pipeline.from_pretrained(kind, str(folder), device="cpu",
                                    scheduler={"name": "dpmpp-2m", "prediction_type": "v_prediction"})
    got = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, latents=noise.clone(), output_type="latent", **QUIET)
    assert (got - want).abs().max() < 1e-3


def test_image_to_image_matches_diffusers(tiny):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    kind, folder = tiny
    cls = StableDiffusionImg2ImgPipeline if kind == "sd" else StableDiffusionXLImg2ImgPipeline
    ref = cls.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    generator = torch.Generator().manual_seed(0)
    want = ref(PROMPT, image=image, strength=0.6, num_inference_steps=5, guidance_scale=4.0, generator=generator,
               output_type="latent").images
    # diffusers draws the latent sample, then the noise, from one generator: our initial noise is the second draw
    g = torch.Generator().manual_seed(0)
    torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g)
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g)
    pipe = Pipeline.from_pretrained(kind, str(folder), device="cpu")
    got = pipe(PROMPT, input_image=image, denoising_strength=0.6, num_inference_steps=5, cfg_scale=4.0, latents=noise,
               height=SIZE, width=SIZE, output_type="latent", **QUIET)
    assert len(pipe.scheduler.timesteps) == 3  # int(5 * 0.6) steps, as diffusers
    assert (got - want).abs().max() < 1e-3


# ---------------------------------------------------------------- the original single-file layout


def _single_file(kind: str, folder: Path, path: Path) -> Path:
    """One ldm checkpoint holding the U-Net, the VAE and CLIP-L, written with our inverse maps."""
    reg = difforge.get_registry()
    unet_conv, vae_conv, clip_conv = (reg.converters.get(n) for n in (f"{kind}-unet-ldm", "sd-vae-ldm", "sd-clip-ldm"))
    from difforge_sd.convert import unet_from_diffusers

    unet_own = {unet_from_diffusers(k): v for k, v in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items()}
    tensors = to_foreign_layout(unet_own, unet_conv.inverse_rename, unet_conv.inverse_transform, strict=True)
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    tensors |= to_foreign_layout(vae, vae_conv.inverse_rename, vae_conv.inverse_transform, strict=True)
    clip = load_file(folder / "text_encoder" / "model.safetensors")
    clip = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip.items()}
    if kind == "sdxl":  # SDXL files spell CLIP-L's place conditioner.embedders.0.transformer., CLIP-G is OpenCLIP's
        tensors |= {k.replace("cond_stage_model.", "conditioner.embedders.0."): v
                    for k, v in to_foreign_layout(clip, clip_conv.inverse_rename).items()}
        g = reg.converters.get("sdxl-clip-g-openclip")
        clip_g = load_file(folder / "text_encoder_2" / "model.safetensors")
        clip_g = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in clip_g.items()}
        tensors |= to_foreign_layout(clip_g, g.inverse_rename, g.inverse_transform, strict=True)
        tensors["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)  # dropped on loading
    else:
        tensors |= to_foreign_layout(clip, clip_conv.inverse_rename)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_original_single_file_loads_to_the_same_output(tiny, tmp_path):
    kind, folder = tiny
    path = _single_file(kind, folder, tmp_path / f"{kind}-tiny.safetensors")
    models = ["sd-unet" if kind == "sd" else "sdxl-unet", "sd-vae"]
    configs = [ModelConfig(path=str(path), model=m) for m in models]
    configs.append(ModelConfig(path=str(path), model="clip-text", format="ldm"))  # CLIP-L
    if kind == "sdxl":
        configs.append(ModelConfig(path=str(path), model="clip-text", format="openclip"))  # CLIP-G
    toks = [str(folder / "tokenizer")] + ([str(folder / "tokenizer_2")] if kind == "sdxl" else [])
    single = Pipeline.from_pretrained(kind, configs, tokenizer_config=toks, device="cpu",
                                      scheduler="ddim" if kind == "sd" else "euler")
    assert single.detections["unet"].format == "ldm" and single.detections["vae"].format == "ldm"
    if kind == "sdxl":
        assert single.detections["text_encoder_2"].format == "openclip"
    from_folder = Pipeline.from_pretrained(kind, str(folder), device="cpu")
    noise = _noise(4)
    a, b = _ours(single, noise, output_type="latent"), _ours(from_folder, noise, output_type="latent")
    assert (a - b).abs().max() < 1e-5


# ---------------------------------------------------------------- DeepCache on the U-Net


def test_deepcache_interval_1_is_exact_and_interval_2_skips(tiny):
    kind, folder = tiny
    pipe = Pipeline.from_pretrained(kind, str(folder), device="cpu")
    noise = _noise(5)
    plain = _ours(pipe, noise, output_type="latent")
    pipe.set_cache({"name": "deepcache", "cache_interval": 1})
    exact = _ours(pipe, noise, output_type="latent")
    assert pipe.cache_stats()[0]["steps_cached"] == 0
    assert torch.equal(exact, plain)
    pipe.set_cache({"name": "deepcache", "cache_interval": 2})  # cache_branch_id 1: one block at each end
    cached = _ours(pipe, noise, output_type="latent")
    stats = pipe.cache_stats()[0]
    assert stats["steps_cached"] == 2 and stats["blocks_skipped"] > 0  # step 1 of 2, in both CFG branches
    assert (cached - plain).abs().max() > 1e-4
    pipe.set_cache(None)
    assert torch.equal(_ours(pipe, noise, output_type="latent"), plain)


def test_translated_scheduler_configs_follow_diffusers_defaults() -> None:
    """A folder's scheduler_config.json is read as diffusers reads it: missing keys take the diffusers
    class's defaults (a bare Euler config is linspace spacing, steps_offset 0), and settings our samplers
    would run differently are refused rather than dropped."""
    from difforge import ConfigError
    from difforge_sd.pipeline import SDPipeline

    euler = SDPipeline.translate_scheduler_config({"_class_name": "EulerDiscreteScheduler"})
    assert euler["name"] == "euler"
    assert euler["timestep_spacing"] == "linspace" and euler["steps_offset"] == 0
    pndm = SDPipeline.translate_scheduler_config(
        {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "steps_offset": 1, "skip_prk_steps": True}
    )
    assert pndm["name"] == "ddim" and pndm["steps_offset"] == 1
    with pytest.raises(ConfigError, match="solver_order"):
        SDPipeline.translate_scheduler_config({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3})

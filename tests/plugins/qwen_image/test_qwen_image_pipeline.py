"""The whole Qwen-Image pipeline against diffusers' QwenImagePipeline / QwenImageImg2ImgPipeline on tiny weights.

A tiny diffusers pipeline (conftest's ``tiny``: random transformer, Wan-style VAE, Qwen2.5-VL text model,
a locally trained Qwen2 tokenizer, Qwen-Image's scheduler config) is saved with ``save_pretrained``; difforge assembles
the same weights from that folder (the VAE through difforge-wan), and both sides denoise the same
initial noise with true CFG on: ``output_type="np"`` agrees to 1e-3.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import difforge
from difforge import ModelConfig, Pipeline

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

QUIET = {"progress_bar_cmd": lambda x: x}
PROMPT = "a cat holding a sign that says hello world"
NEGATIVE = "blurry, low quality"
SIZE = 64  # pixels; latent 8x8, 16 packed tokens
Z = 16  # latent channels of conftest's tiny VAE


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, Z, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def _reference(folder: Path, noise: torch.Tensor, steps: int, **kw) -> np.ndarray:
    from diffusers import QwenImagePipeline

    from difforge_qwen_image.pipeline import pack_latents

    ref = QwenImagePipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref(PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, latents=pack_latents(noise),
               output_type="np", **kw).images  # fmt: skip


def test_pipeline_assembles_from_the_diffusers_folder(tiny) -> None:
    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    models = {slot: det.model for slot, det in pipe.detections.items() if slot != "tokenizer"}
    assert models == {"dit": "qwen-image-dit", "vae": "wan-vae", "text_encoder": "qwen2.5-vl-text"}
    assert type(pipe.tokenizer).__name__ == "Qwen2Tokenizer"
    assert pipe.vae.config.latents_mean[:2] == pytest.approx((-0.7571, -0.7089))  # from vae/config.json
    choice = pipe.scheduler_choice
    assert (choice.name, choice.options["shift_terminal"], choice.options["max_image_seq_len"]) == ("flow-euler", 0.02, 8192)


def test_text_to_image_with_true_cfg_matches_diffusers(tiny) -> None:
    noise = _noise()
    expected = _reference(tiny, noise, 4, negative_prompt=NEGATIVE, true_cfg_scale=4.0)
    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, cfg_scale=4.0, height=SIZE, width=SIZE, num_inference_steps=4,
                latents=noise, output_type="np", **QUIET)  # fmt: skip
    assert ours.shape == expected.shape == (1, SIZE, SIZE, 3)
    assert np.abs(ours - expected).max() < 1e-3
    # the defaults: cfg_scale 4 with the negative prompt " "
    expected = _reference(tiny, noise, 2, negative_prompt=" ", true_cfg_scale=4.0)
    ours = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, latents=noise, output_type="np", **QUIET)
    assert np.abs(ours - expected).max() < 1e-3


def test_without_cfg_matches_diffusers(tiny) -> None:
    noise = _noise(1)
    expected = _reference(tiny, noise, 3, true_cfg_scale=1.0)
    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    ours = pipe(PROMPT, cfg_scale=1.0, height=SIZE, width=SIZE, num_inference_steps=3, latents=noise,
                output_type="np", **QUIET)  # fmt: skip
    assert np.abs(ours - expected).max() < 1e-3


def test_batch_of_prompts_of_different_lengths_matches_diffusers(tiny) -> None:
    """Two prompts padded to the longer one (the DiT masks the padding), true CFG on."""
    from diffusers import QwenImagePipeline

    from difforge_qwen_image.pipeline import pack_latents

    prompts = [PROMPT, "a red fox"]
    noise = torch.randn(2, Z, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    ref = QwenImagePipeline.from_pretrained(tiny, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    expected = ref(prompts, negative_prompt=[NEGATIVE, " "], true_cfg_scale=4.0, height=SIZE, width=SIZE,
                   num_inference_steps=2, latents=pack_latents(noise), output_type="np").images  # fmt: skip
    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    ours = pipe(prompts, negative_prompt=[NEGATIVE, " "], height=SIZE, width=SIZE, num_inference_steps=2, latents=noise,
                output_type="np", **QUIET)  # fmt: skip
    assert ours.shape == (2, SIZE, SIZE, 3)
    assert np.abs(ours - expected).max() < 1e-3


def test_image_to_image_matches_diffusers(tiny, monkeypatch) -> None:
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img as img2img
    from diffusers import QwenImageImg2ImgPipeline
    from PIL import Image

    noise = _noise(2)
    source = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    # the same start on both sides: the VAE's mean (difforge encodes deterministically) and our noise
    real = img2img.retrieve_latents
    monkeypatch.setattr(img2img, "retrieve_latents", lambda out, generator=None, sample_mode="sample": real(out, sample_mode="argmax"))
    monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **kw: noise[:, None].clone())
    ref = QwenImageImg2ImgPipeline.from_pretrained(tiny, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, image=source, strength=0.6, negative_prompt=NEGATIVE, true_cfg_scale=4.0, height=SIZE,
                   width=SIZE, num_inference_steps=5, output_type="np").images  # fmt: skip

    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, input_image=source, denoising_strength=0.6, height=SIZE, width=SIZE,
                num_inference_steps=5, latents=noise, output_type="np", **QUIET)  # fmt: skip
    assert np.abs(ours - expected).max() < 1e-3


def test_tiled_decode_is_close_to_plain(tiny) -> None:
    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    noise = torch.randn(1, Z, 16, 24, generator=torch.Generator().manual_seed(4))
    call = dict(height=128, width=192, num_inference_steps=1, latents=noise, output_type="np", cfg_scale=1.0, **QUIET)
    plain = pipe(PROMPT, **call)
    tiled = pipe(PROMPT, tiled=True, tile_size=8, tile_stride=6, **call)
    assert tiled.shape == plain.shape
    # a tiny random VAE has a receptive field wider than the overlap; the blend keeps it close, not exact
    assert np.abs(tiled - plain).mean() < 0.05
    with pytest.raises(difforge.ConfigError, match="tile_stride"):
        pipe(PROMPT, tiled=True, tile_size=8, tile_stride=9, **call)


def test_long_prompts_warn_and_are_cut(tiny, caplog) -> None:
    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    long = " ".join(f"word{i}" for i in range(80))
    with caplog.at_level(logging.WARNING, logger="difforge_qwen_image.pipeline"):
        cond = pipe.encode_prompt([long, "a cat"], max_sequence_length=16)
    assert "max_sequence_length" in caplog.text
    assert cond["txt"].shape[:2] == cond["txt_mask"].shape == (2, 16)
    with pytest.raises(difforge.ConfigError, match="max_sequence_length"):
        pipe(PROMPT, max_sequence_length=2048, height=SIZE, width=SIZE, **QUIET)


def test_missing_components_are_reported_before_loading(tiny) -> None:
    with pytest.raises(difforge.ConfigError, match="text_encoder"):
        Pipeline.from_pretrained("qwen-image", model_configs=[ModelConfig(path=str(tiny / "transformer")),
                                                             ModelConfig(path=str(tiny / "vae"))], device="cpu")  # fmt: skip
    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    with pytest.raises(difforge.ConfigError, match="multiple of 16"):
        pipe(PROMPT, height=72, width=SIZE, **QUIET)


def test_single_files_in_any_order_give_the_same_image(tiny, tmp_path) -> None:
    """ComfyUI-style files: the DiT behind model.diffusion_model., the VAE in Wan-AI's layout (as
    qwen_image_vae.safetensors), the text encoder's folder; given in any order, routed by detection."""
    from safetensors.torch import load_file, save_file

    from difforge.loading.convert import convert_checkpoint

    noise = _noise(3)
    call = dict(height=SIZE, width=SIZE, num_inference_steps=2, latents=noise, output_type="np", **QUIET)
    expected = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")(PROMPT, **call)

    dit = tmp_path / "qwen_image_bf16.safetensors"
    sd = {}
    for shard in sorted((tiny / "transformer").glob("*.safetensors")):
        sd.update(load_file(str(shard)))
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(dit))
    vae = convert_checkpoint([str(tiny / "vae")], to_format="wan", output=tmp_path / "qwen_image_vae.safetensors")
    pipe = Pipeline.from_pretrained(
        "qwen-image", device="cpu", tokenizer_config=ModelConfig(path=str(tiny / "tokenizer")),
        model_configs=[ModelConfig(path=str(vae)), ModelConfig(path=str(tiny / "text_encoder")), ModelConfig(path=str(dit))],
    )  # fmt: skip
    assert (pipe.detections["dit"].prefix, pipe.detections["vae"].format) == ("model.diffusion_model.", "wan")
    assert np.abs(pipe(PROMPT, **call) - expected).max() < 1e-5


def test_prompt_embeds_give_the_same_image(tiny) -> None:
    pipe = Pipeline.from_pretrained("qwen-image", str(tiny), device="cpu")
    call = dict(height=SIZE, width=SIZE, num_inference_steps=2, latents=_noise(6), output_type="np", **QUIET)
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, **call)
    embeds, negative = pipe.encode_prompt([PROMPT]), pipe.encode_prompt([NEGATIVE])
    assert set(embeds) == {"txt", "txt_mask"} and embeds["txt"].shape[-1] == 128
    assert np.array_equal(pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, **call), expected)

"""The whole FLUX.1 pipeline against diffusers' FluxPipeline / FluxImg2ImgPipeline on tiny weights.

A tiny diffusers pipeline (random transformer, AE, CLIP and T5 encoders, locally trained
tokenizers) is saved with ``save_pretrained``; difforge assembles the same weights from that
diffusers folder, and from the original layouts (BFL DiT and AE files, with a ComfyUI prefix),
and both sides denoise the same initial noise: ``output_type="np"`` agrees to 1e-3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import difforge
from difforge import ModelConfig, Pipeline
from difforge_sdk.tiny_tokenizers import write_clip_tokenizer, write_t5_tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

QUIET = {"progress_bar_cmd": lambda x: x}
PROMPT = "a cat holding a sign that says hello world"
SIZE = 64  # pixels; latent 8x8, 16 packed tokens


@pytest.fixture(autouse=True)
def _registry():
    difforge.reload_plugins()
    yield


def _tiny_diffusers_pipeline(folder: Path, guidance: bool) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok"))
    tok2 = T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder / "_tok2"))
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    clip = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2, vocab_size=len(tok),
        max_position_embeddings=77, projection_dim=32, bos_token_id=tok.bos_token_id, eos_token_id=2,
        pad_token_id=tok.pad_token_id, hidden_act="quick_gelu",
    ))
    t5 = T5EncoderModel(T5Config(
        d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=len(tok2), relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, decoder_start_token_id=0,
    ))
    for module in (transformer, vae, clip, t5):
        with torch.no_grad():  # random, not zero-initialised, adaLN/output layers: a meaningful comparison
            for p in module.parameters():
                p.normal_(0, 0.3 if p.dim() > 1 else 0.1)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=tok2, transformer=transformer)
    pipe.save_pretrained(folder / "diffusers")
    return folder / "diffusers"


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux-" + request.node.name.split("[")[-1].rstrip("]"))
    return _tiny_diffusers_pipeline(folder, guidance=request.param), request.param


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def _reference(folder: Path, noise: torch.Tensor, steps: int, **kw):
    from diffusers import FluxPipeline

    from difforge_flux.pipeline import pack_latents

    ref = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref(PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, latents=pack_latents(noise),
               output_type="np", **kw).images


def test_text_to_image_matches_diffusers(tiny):
    folder, dev = tiny
    noise = _noise()
    kw = {"guidance_scale": 3.5} if dev else {}
    expected = _reference(folder, noise, 4, **kw)

    pipe = Pipeline.from_pretrained("flux", str(folder), device="cpu")
    assert pipe.scheduler_choice.name == "flow-euler"
    ours = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, latents=noise, output_type="np",
                embedded_guidance=3.5, **QUIET)
    assert ours.shape == expected.shape == (1, SIZE, SIZE, 3)
    assert np.abs(ours - expected).max() < 1e-3


def test_true_cfg_matches_diffusers(tiny):
    folder, dev = tiny
    noise = _noise(1)
    expected = _reference(folder, noise, 3, negative_prompt="blurry", true_cfg_scale=4.0,
                          **({"guidance_scale": 3.5} if dev else {}))
    pipe = Pipeline.from_pretrained("flux", str(folder), device="cpu")
    ours = pipe(PROMPT, negative_prompt="blurry", cfg_scale=4.0, height=SIZE, width=SIZE, num_inference_steps=3,
                latents=noise, output_type="np", **QUIET)
    assert np.abs(ours - expected).max() < 1e-3


def test_image_to_image_matches_diffusers(tiny, monkeypatch):
    import diffusers.pipelines.flux.pipeline_flux_img2img as img2img
    from diffusers import FluxImg2ImgPipeline
    from PIL import Image

    folder, dev = tiny
    noise = _noise(2)
    source = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    # the same start on both sides: the AE's mean (difforge encodes deterministically) and our noise
    real = img2img.retrieve_latents
    monkeypatch.setattr(img2img, "retrieve_latents", lambda out, generator=None, sample_mode="sample": real(out, sample_mode="argmax"))
    monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **kw: noise.clone())
    ref = FluxImg2ImgPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, image=source, strength=0.6, height=SIZE, width=SIZE, num_inference_steps=5,
                   output_type="np", **({"guidance_scale": 3.5} if dev else {})).images

    pipe = Pipeline.from_pretrained("flux", str(folder), device="cpu")
    ours = pipe(PROMPT, input_image=source, denoising_strength=0.6, height=SIZE, width=SIZE, num_inference_steps=5,
                latents=noise, output_type="np", **QUIET)
    assert np.abs(ours - expected).max() < 1e-3


def _write_original_layouts(folder: Path, out: Path, prefix: str) -> list[ModelConfig]:
    """The diffusers folder's DiT and AE written in BFL layout (by the inverse key maps), the DiT
    with a ComfyUI prefix; text encoders and tokenizers as transformers folders."""
    from difforge.loading.convert import convert_checkpoint

    out.mkdir()
    dit = convert_checkpoint([str(folder / "transformer")], to_format="bfl", output=out / "flux1-tiny.safetensors")
    ae = convert_checkpoint([str(folder / "vae")], to_format="bfl", output=out / "ae.safetensors")
    if prefix:
        from safetensors.torch import load_file

        save_file({prefix + k: v for k, v in load_file(dit).items()}, str(dit))
    return [
        ModelConfig(path=str(folder / "text_encoder_2")),
        ModelConfig(path=str(ae)),
        ModelConfig(path=str(folder / "text_encoder")),
        ModelConfig(path=str(dit)),
    ]


def test_original_layouts_give_the_same_image(tiny, tmp_path):
    folder, _ = tiny
    noise = _noise(3)
    call = dict(height=SIZE, width=SIZE, num_inference_steps=2, latents=noise, output_type="np", **QUIET)
    expected = Pipeline.from_pretrained("flux", str(folder), device="cpu")(PROMPT, **call)
    for prefix in ("", "model.diffusion_model."):
        configs = _write_original_layouts(folder, tmp_path / (prefix or "plain"), prefix)
        pipe = Pipeline.from_pretrained(
            "flux", model_configs=configs, device="cpu",
            tokenizer_config=[ModelConfig(path=str(folder / "tokenizer_2")), ModelConfig(path=str(folder / "tokenizer"))],
        )
        assert pipe.detections["dit"].format == "bfl"
        assert np.abs(pipe(PROMPT, **call) - expected).max() < 1e-5


def test_tiled_decode_is_close_to_plain(tiny):
    folder, _ = tiny
    pipe = Pipeline.from_pretrained("flux", str(folder), device="cpu")
    noise = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(4))
    plain = pipe(PROMPT, height=128, width=192, num_inference_steps=1, latents=noise, output_type="np", **QUIET)
    tiled = pipe(PROMPT, height=128, width=192, num_inference_steps=1, latents=noise, output_type="np", tiled=True,
                 tile_size=8, tile_stride=6, **QUIET)
    assert tiled.shape == plain.shape
    # a tiny random AE has a receptive field wider than the overlap; the blend keeps it close, not exact
    assert np.abs(tiled - plain).mean() < 0.05
    with pytest.raises(difforge.ConfigError, match="tile_stride"):
        pipe(PROMPT, height=128, width=192, num_inference_steps=1, tiled=True, tile_size=8, tile_stride=9, **QUIET)


def test_missing_text_encoder_is_reported_before_loading(tiny):
    folder, _ = tiny
    with pytest.raises(difforge.ConfigError, match="text_encoder_2"):
        Pipeline.from_pretrained("flux", model_configs=[ModelConfig(path=str(folder / "transformer"))], device="cpu")

"""The whole Wan pipeline against diffusers' WanPipeline / WanVideoToVideoPipeline /
WanImageToVideoPipeline on tiny weights.

A tiny diffusers pipeline (random transformer, VAE and umT5 encoder, a locally trained tokenizer)
is saved with ``save_pretrained``; difforge assembles the same weights from that diffusers folder,
and from Wan-AI's original layouts, and both sides denoise the same initial noise:
``output_type="np"`` agrees to 1e-3. Two designs: Wan2.1 T2V (16-channel VAE) and Wan2.2 TI2V
(48-channel VAE, per-token timesteps for a conditioning first frame).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import difforge
from difforge import ModelConfig, Pipeline
from difforge_sdk.tiny_tokenizers import write_t5_tokenizer

from .conftest import TINY_VAE, randomize

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

QUIET = {"progress_bar_cmd": lambda x: x}
PROMPT = "a cat holding a sign that says hello world"
NEGATIVE = "blurry, low quality"
FRAMES = 9  # 3 latent frames
SIZE = {"2.1": 32, "2.2": 64}  # pixels; a 4 x 4 latent for either VAE


@pytest.fixture(autouse=True)
def wan_registry():
    """Every installed plugin (the text encoders and tokenizers come from difforge-text-encoders)."""
    difforge.reload_plugins()
    yield
    difforge.reload_plugins()


def _tiny_diffusers_pipeline(folder: Path, version: str) -> Path:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    tok = T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder / "_tok"))
    torch.manual_seed(0)
    channels = 48 if version == "2.2" else 16
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=channels, out_channels=channels,
        text_dim=32, freq_dim=32, ffn_dim=40, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    )  # fmt: skip
    vae = AutoencoderKLWan(**TINY_VAE[version])
    umt5 = UMT5EncoderModel(UMT5Config(
        d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=len(tok), relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, decoder_start_token_id=0,
    ))  # fmt: skip
    randomize(transformer, 1, 0.2)
    randomize(vae, 2, 0.2)
    randomize(umt5, 3, 0.3)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tok, text_encoder=umt5, vae=vae, scheduler=scheduler, transformer=transformer,
                       expand_timesteps=version == "2.2")  # fmt: skip
    pipe.save_pretrained(folder / "diffusers")
    return folder / "diffusers"


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"wan-{request.param}")
    return _tiny_diffusers_pipeline(folder, request.param), request.param


def _noise(version: str, seed: int = 0, frames: int = FRAMES) -> torch.Tensor:
    channels = 48 if version == "2.2" else 16
    return torch.randn(1, channels, (frames - 1) // 4 + 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def _frames(size: int, count: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)) for _ in range(count)]


def _load(cls_name: str, folder: Path):
    pipe = getattr(diffusers, cls_name).from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_text_to_video_matches_diffusers(tiny):
    folder, version = tiny
    size, noise = SIZE[version], _noise(version)
    expected = _load("WanPipeline", folder)(
        PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_frames=FRAMES, num_inference_steps=3,
        guidance_scale=5.0, latents=noise.clone(), output_type="np",
    ).frames  # fmt: skip

    pipe = Pipeline.from_pretrained("wan", str(folder), device="cpu")
    assert pipe.scheduler_choice.name == "flow-unipc"
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_frames=FRAMES, num_inference_steps=3,
                cfg_scale=5.0, latents=noise, output_type="np", **QUIET)  # fmt: skip
    assert ours.shape == expected.shape == (1, FRAMES, size, size, 3)
    assert np.abs(ours - expected).max() < 1e-3


def test_flow_euler_matches_diffusers(tiny):
    """``scheduler="flow-euler"`` gets Wan's step spacing, as diffusers' FlowMatchEulerDiscreteScheduler makes it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder, version = tiny
    if version == "2.2":
        pytest.skip("one design is enough for the scheduler")
    size, noise = SIZE[version], _noise(version, seed=4)
    ref = _load("WanPipeline", folder)
    ref.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    expected = ref(PROMPT, height=size, width=size, num_frames=FRAMES, num_inference_steps=4, guidance_scale=1.0,
                   latents=noise.clone(), output_type="np").frames  # fmt: skip
    pipe = Pipeline.from_pretrained("wan", str(folder), device="cpu", scheduler="flow-euler")
    assert (pipe.scheduler.spacing, pipe.scheduler.shift) == ("sd3", 3.0)
    ours = pipe(PROMPT, height=size, width=size, num_frames=FRAMES, num_inference_steps=4, cfg_scale=1.0,
                latents=noise, output_type="np", **QUIET)  # fmt: skip
    assert np.abs(ours - expected).max() < 1e-3
    pipe.set_scheduler({"name": "flow-euler", "shift": 7.0})
    assert (pipe.scheduler.spacing, pipe.scheduler.shift) == ("sd3", 7.0)


def test_video_to_video_matches_diffusers(tiny, monkeypatch):
    import diffusers.pipelines.wan.pipeline_wan_video2video as v2v

    folder, version = tiny
    size, noise = SIZE[version], _noise(version, seed=1)
    video = _frames(size, FRAMES, seed=0)
    monkeypatch.setattr(v2v, "randn_tensor", lambda shape, **kw: noise.clone())
    # diffusers' video-to-video module calls ftfy without checking it is installed (the others check)
    monkeypatch.setattr(v2v, "ftfy", SimpleNamespace(fix_text=lambda text: text), raising=False)
    expected = _load("WanVideoToVideoPipeline", folder)(
        video=video, prompt=PROMPT, height=size, width=size, num_inference_steps=5, strength=0.6, guidance_scale=1.0,
        output_type="np",
    ).frames  # fmt: skip

    pipe = Pipeline.from_pretrained("wan", str(folder), device="cpu")
    ours = pipe(PROMPT, input_video=video, denoising_strength=0.6, height=size, width=size, num_inference_steps=5,
                cfg_scale=1.0, latents=noise, output_type="np", **QUIET)  # fmt: skip
    assert ours.shape == expected.shape == (1, FRAMES, size, size, 3)
    assert np.abs(ours - expected).max() < 1e-3


def test_image_to_video_matches_diffusers(tiny, monkeypatch):
    """Wan2.2 TI2V: the image is the first latent frame (timestep 0 for its tokens)."""
    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v

    monkeypatch.setattr(i2v, "ftfy", SimpleNamespace(fix_text=lambda text: text), raising=False)
    folder, version = tiny
    size, noise = SIZE[version], _noise(version, seed=2)
    image = _frames(size, 1, seed=3)[0]
    pipe = Pipeline.from_pretrained("wan", str(folder), device="cpu")
    if version == "2.1":
        with pytest.raises(difforge.ConfigError, match="image-to-video model"):
            pipe(PROMPT, input_image=image, height=size, width=size, num_frames=FRAMES, **QUIET)
        return
    from diffusers import WanImageToVideoPipeline

    ref = WanImageToVideoPipeline.from_pretrained(folder, torch_dtype=torch.float32, expand_timesteps=True)
    ref.set_progress_bar_config(disable=True)
    expected = ref(image=image, prompt=PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_frames=FRAMES,
                   num_inference_steps=3, guidance_scale=5.0, latents=noise.clone(), output_type="np").frames  # fmt: skip
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, input_image=image, height=size, width=size, num_frames=FRAMES,
                num_inference_steps=3, cfg_scale=5.0, latents=noise, output_type="np", **QUIET)  # fmt: skip
    assert ours.shape == expected.shape == (1, FRAMES, size, size, 3)
    assert np.abs(ours - expected).max() < 1e-3


def _write_wan_layouts(folder: Path, out: Path, version: str) -> list[ModelConfig]:
    """The diffusers folder's transformer, VAE and umT5 written in Wan-AI's layout (by the inverse key maps),
    side by side as in a Wan-AI repository: the DiT as safetensors with Wan-AI's ``config.json``, the VAE
    and the umT5 encoder as ``.pth`` files (read with ``torch.load(weights_only=True)``)."""
    from difforge.loading.convert import convert_checkpoint

    out.mkdir()
    dit = convert_checkpoint([str(folder / "transformer")], to_format="wan", output=out / "diffusion_pytorch_model.safetensors")
    ref_config = json.loads((folder / "transformer" / "config.json").read_text())
    heads, head_dim = ref_config["num_attention_heads"], ref_config["attention_head_dim"]
    (out / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "ti2v" if version == "2.2" else "t2v", "dim": heads * head_dim,
        "num_heads": heads, "in_dim": ref_config["in_channels"], "out_dim": ref_config["out_channels"],
        "ffn_dim": ref_config["ffn_dim"], "freq_dim": ref_config["freq_dim"], "text_len": 512, "num_layers": 2,
        "eps": 1e-6,
    }))  # fmt: skip
    from safetensors.torch import load_file

    for component, name in (("vae", "Wan2.1_VAE.pth"), ("text_encoder", "models_t5_umt5-xxl-enc-bf16.pth")):
        converted = convert_checkpoint([str(folder / component)], to_format="wan", output=out / "tmp.safetensors")
        torch.save(load_file(converted), out / name)
        Path(converted).unlink()
    return [ModelConfig(path=str(out / "Wan2.1_VAE.pth")), ModelConfig(path=str(out / "models_t5_umt5-xxl-enc-bf16.pth")),
            ModelConfig(path=str(dit))]  # fmt: skip


def test_wan_layouts_give_the_same_video(tiny, tmp_path):
    folder, version = tiny
    size = SIZE[version]
    call = dict(height=size, width=size, num_frames=5, num_inference_steps=2, latents=_noise(version, 3, frames=5),
                output_type="np", **QUIET)  # fmt: skip
    expected = Pipeline.from_pretrained("wan", str(folder), device="cpu")(PROMPT, **call)
    configs = _write_wan_layouts(folder, tmp_path / "wan", version)
    pipe = Pipeline.from_pretrained("wan", model_configs=configs, device="cpu",
                                    tokenizer_config=ModelConfig(path=str(folder / "tokenizer")))  # fmt: skip
    assert {slot: pipe.detections[slot].format for slot in ("dit", "vae", "text_encoder")} == dict.fromkeys(
        ("dit", "vae", "text_encoder"), "wan"
    )
    assert np.abs(pipe(PROMPT, **call) - expected).max() < 1e-5
    # the same DiT with a ComfyUI prefix
    from safetensors.torch import load_file

    dit = tmp_path / "wan" / "diffusion_pytorch_model.safetensors"
    comfy = tmp_path / "comfy" / "wan_tiny.safetensors"
    comfy.parent.mkdir()
    save_file({"model.diffusion_model." + k: v for k, v in load_file(dit).items()}, str(comfy))
    (comfy.parent / "config.json").write_text((tmp_path / "wan" / "config.json").read_text())
    configs = [c if "diffusion_pytorch_model" not in str(c.path) else ModelConfig(path=str(comfy)) for c in configs]
    configs[1] = ModelConfig(path=str(folder / "text_encoder"))  # and umT5 in transformers' layout
    pipe = Pipeline.from_pretrained("wan", model_configs=configs, device="cpu",
                                    tokenizer_config=ModelConfig(path=str(folder / "tokenizer")))  # fmt: skip
    assert pipe.detections["dit"].prefix == "model.diffusion_model."
    assert np.abs(pipe(PROMPT, **call) - expected).max() < 1e-5


def test_pil_frames_and_argument_checks(tiny, tmp_path):
    from PIL import Image

    folder, version = tiny
    size = SIZE[version]
    pipe = Pipeline.from_pretrained("wan", str(folder), device="cpu")
    frames = pipe(PROMPT, height=size, width=size, num_frames=5, num_inference_steps=1, seed=0, **QUIET)
    assert isinstance(frames, list) and len(frames) == 5 and frames[0].size == (size, size)
    with Image.open(difforge.save_video(frames, tmp_path / "out.webp", fps=8)) as webp:
        assert webp.n_frames == 5
    with pytest.raises(difforge.ConfigError, match="num_frames must be 4k \\+ 1"):
        pipe(PROMPT, height=size, width=size, num_frames=8, **QUIET)
    with pytest.raises(difforge.ConfigError, match=f"multiple of {pipe.spatial_multiple}"):
        pipe(PROMPT, height=size + 8, width=size, num_frames=5, **QUIET)
    with pytest.raises(difforge.ConfigError, match="fewer than num_frames"):
        pipe(PROMPT, input_video=_frames(size, 3, 0), num_frames=5, height=size, width=size, **QUIET)
    with pytest.raises(difforge.ConfigError, match="not both"):
        pipe(PROMPT, input_video=_frames(size, 5, 0), input_image=_frames(size, 1, 0)[0], height=size, width=size, **QUIET)
    assert pipe.defaults["cfg_scale"] == 5.0


def test_block_cache_plugin_works_on_wan(tiny):
    """The DiT's block layout is enough for difforge-cache: exact at threshold 0, fewer blocks above it."""
    pytest.importorskip("difforge_cache")
    folder, version = tiny
    size = SIZE[version]
    call = dict(height=size, width=size, num_frames=5, num_inference_steps=4, latents=_noise(version, 5, frames=5),
                cfg_scale=3.0, output_type="np", **QUIET)  # fmt: skip
    pipe = Pipeline.from_pretrained("wan", str(folder), device="cpu")
    plain = pipe(PROMPT, **call)
    pipe.set_cache({"name": "fbcache", "threshold": 0.0})
    assert np.abs(pipe(PROMPT, **call) - plain).max() < 1e-6
    pipe.set_cache({"name": "fbcache", "threshold": 10.0})
    pipe(PROMPT, **call)
    dit_stats = max(pipe.cache_stats(), key=lambda s: s["steps"])  # the DiT (the umT5 encoder has a layout too)
    assert dit_stats["steps"] == 8 and dit_stats["steps_cached"] > 0


def test_command_line_writes_a_video(tiny, tmp_path):
    from PIL import Image

    from difforge.cli import main

    folder, version = tiny
    size = str(SIZE[version])
    out = tmp_path / "clip.gif"
    models = [arg for c in ("transformer", "vae", "text_encoder", "tokenizer") for arg in ("--model", str(folder / c))]
    code = main(["generate", "wan", *models, "--prompt", PROMPT, "--num-frames", "5", "--steps", "1",
                 "--width", size, "--height", size, "--seed", "0", "--device", "cpu", "-o", str(out)])  # fmt: skip
    assert code == 0
    with Image.open(out) as gif:
        assert gif.n_frames == 5 and gif.size == (int(size), int(size))

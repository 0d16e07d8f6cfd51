"""``difforge train`` on a tiny random FLUX.1 (diffusers folder): the loss falls in full and LoRA training,
the saved files load (full weights detected as a FLUX.1 DiT in BFL layout; the LoRA in difforge and in
diffusers, to the same image), gradient checkpointing and accumulation change no gradient, and bad
arguments are DifforgeErrors before any weights are read."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import difforge
from difforge import ConfigError, DifforgeError, Pipeline
from difforge.train import TrainConfig, train
from difforge.train.dataset import SizeBuckets, target_size

SIZE = 32
PROMPT = "a red circle on a blue background"


def _config(folder: Path, data: Path, out: Path, **kw: Any) -> TrainConfig:
    base = dict(pipeline="flux", model_paths=[str(folder)], dataset_base_path=str(data), height=SIZE, width=SIZE,
                output_path=str(out), device="cpu", log_steps=1, seed=0)
    return TrainConfig(**{**base, **kw})


def _first_last(losses: list[float], n: int = 3) -> tuple[float, float]:
    return float(np.mean(losses[:n])), float(np.mean(losses[-n:]))


# ---------------------------------------------------------------- full training (through the CLI)


def test_full_training_via_cli_loss_falls_and_saves_a_bfl_dit(tiny_flux, shapes_data, tmp_path):
    from difforge.cli import main

    out = tmp_path / "full"
    rc = main([
        "train", "flux", "--model_paths", str(tiny_flux), "--dataset_base_path", str(shapes_data),
        "--height", str(SIZE), "--width", str(SIZE), "--batch_size", "4", "--dataset_repeat", "1",
        "--num_epochs", "12", "--learning_rate", "1e-3", "--output_path", str(out), "--device", "cpu",
        "--save_steps", "5", "--cache_inputs", "--pipeline_args", '{"max_sequence_length": 16}',
    ])
    assert rc == 0
    with (out / "loss.csv").open() as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 12
    first, last = _first_last(losses)
    assert last < 0.7 * first, losses
    assert (out / "step-5.safetensors").is_file() and (out / "step-10.safetensors").is_file()
    assert (out / "epoch-11.safetensors").is_file() and (out / "train_config.json").is_file()
    r = difforge.detect(str(out / "epoch-11.safetensors"))
    assert (r.model, r.format) == ("flux-dit", "bfl")
    # the trained DiT replaces the diffusers one in the same pipeline
    from safetensors.torch import load_file

    trained = load_file(str(out / "epoch-11.safetensors"))
    pipe = Pipeline.from_pretrained("flux", str(tiny_flux), device="cpu")
    before = pipe.dit.state_dict()
    assert set(trained) == set(before)
    assert any(not torch.equal(trained[k], before[k]) for k in trained)


# ---------------------------------------------------------------- LoRA: loss falls; difforge == diffusers


@pytest.fixture(scope="module")
def trained_lora(tiny_flux, shapes_data, tmp_path_factory) -> tuple[Path, list[float]]:
    out = tmp_path_factory.mktemp("lora")
    result = train(_config(
        tiny_flux, shapes_data, out, batch_size=4, num_epochs=12, learning_rate=1e-2, lora_base_model="dit",
        lora_rank=4, lora_alpha=8.0, lora_target_modules="img_attn.qkv,txt_attn.proj,img_mlp.2,linear1,linear2",
        use_gradient_checkpointing=True,
    ))
    assert result.mode == "lora" and result.steps == 12
    return result.files[-1], result.losses


def test_lora_training_loss_falls(trained_lora):
    path, losses = trained_lora
    first, last = _first_last(losses)
    assert last < 0.8 * first, losses
    assert path.name == "epoch-11.safetensors"


def test_trained_lora_loads_in_difforge_and_diffusers_to_the_same_image(trained_lora, tiny_flux):
    from diffusers import FluxPipeline

    from difforge_flux.pipeline import pack_latents

    path, _ = trained_lora
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    pipe = Pipeline.from_pretrained("flux", str(tiny_flux), device="cpu")
    call = dict(latents=noise, embedded_guidance=3.5, height=SIZE, width=SIZE, num_inference_steps=2, output_type="np",
                progress_bar_cmd=lambda x: x)
    base = pipe(PROMPT, **call)
    pipe.load_lora(str(path))
    ours = pipe(PROMPT, **call)

    ref = FluxPipeline.from_pretrained(tiny_flux, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path))
    theirs = ref(PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=3.5,
                 latents=pack_latents(noise), output_type="np").images
    assert np.abs(ours - base).max() > 1e-2  # the LoRA changes the image
    assert np.abs(ours - theirs).max() < 1e-3


# ---------------------------------------------------------------- gradients: checkpointing, accumulation


def _grads(config: TrainConfig) -> dict[str, torch.Tensor]:
    seen: list[dict[str, torch.Tensor]] = []
    train(config, on_gradients=seen.append)
    assert len(seen) == 1
    return seen[0]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-4) -> None:
    """Equal up to float32 summation order (relative to each tensor's largest gradient; a lost micro-batch
    or a wrong 1/accumulation scale would be off by order 1)."""
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-12)) for k in a)
    assert worst < tol, worst


def test_gradient_checkpointing_gives_the_same_gradients(tiny_flux, shapes_pair, tmp_path):
    kw = dict(batch_size=2, max_steps=1)
    plain = _grads(_config(tiny_flux, shapes_pair, tmp_path / "a", **kw))
    ckpt = _grads(_config(tiny_flux, shapes_pair, tmp_path / "b", use_gradient_checkpointing=True, **kw))
    _assert_same(plain, ckpt)


def test_accumulating_two_batches_of_one_equals_one_batch_of_two(tiny_flux, shapes_pair, tmp_path):
    kw = dict(max_steps=1, lora_rank=2, lora_target_modules="linear1,img_attn.qkv")
    batch = _grads(_config(tiny_flux, shapes_pair, tmp_path / "a", batch_size=2, **kw))
    accumulated = _grads(_config(tiny_flux, shapes_pair, tmp_path / "b", batch_size=1, gradient_accumulation_steps=2, **kw))
    _assert_same(batch, accumulated)


# ---------------------------------------------------------------- data and errors


def test_dynamic_resolution_sizes_and_buckets(tmp_path):
    assert target_size(64, 48, fixed=None, max_pixels=None, multiple=16) == (48, 64)
    assert target_size(1000, 500, fixed=None, max_pixels=128 * 64, multiple=16) == (64, 128)
    assert target_size(1000, 500, fixed=(32, 32), max_pixels=None, multiple=16) == (32, 32)
    sizes = [(32, 32), (48, 32), (32, 32), (48, 32), (32, 32)]
    batches = list(SizeBuckets(sizes, 2, seed=1))
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert all(len({sizes[i] for i in b}) == 1 for b in batches)


def test_dynamic_resolution_trains_with_mixed_sizes(tiny_flux, tmp_path):
    data = tmp_path / "mixed"
    (data / "images").mkdir(parents=True)
    rows = []
    for i, (w, h) in enumerate([(64, 48), (48, 64), (64, 48), (40, 40)]):
        Image.new("RGB", (w, h), (200, 30 * i, 40)).save(data / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,a red square on a green background")
    (data / "metadata.csv").write_text("image,prompt\n" + "\n".join(rows) + "\n")
    # at most 64 x 48 pixels: 48x64, 64x48 and 32x32 (40x40 cropped to multiples of 16): three batches of one size
    result = train(_config(tiny_flux, data, tmp_path / "out", height=None, width=None, max_pixels=64 * 48,
                           batch_size=2, lora_rank=2))
    assert result.steps == 3 and all(np.isfinite(result.losses))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(height=40, width=40), "multiple of 16"),
        (dict(height=32, width=None), "both --height and --width"),
        (dict(max_pixels=1024), "exclude each other"),
        (dict(lora_rank=4, trainable_models=["dit"]), "exclude each other"),
        (dict(lora_target_modules="to_q"), "needs LoRA training"),
        (dict(learning_rate=0.0), "--learning_rate"),
        (dict(gradient_accumulation_steps=0), "--gradient_accumulation_steps"),
        (dict(sigma_sampling="normal"), "--sigma_sampling"),
        (dict(dataset_base_path="/nonexistent/data"), "is not a folder"),
        (dict(pipeline="fluxx"), "flux"),
    ],
)
def test_bad_arguments_fail_before_loading(tiny_flux, shapes_pair, tmp_path, change, message):
    with pytest.raises(DifforgeError, match=message):
        train(_config(tiny_flux, shapes_pair, tmp_path, **change))


def test_errors_that_need_the_model(tiny_flux, shapes_pair, tmp_path):
    with pytest.raises(ConfigError, match="match.* no linear layer"):
        train(_config(tiny_flux, shapes_pair, tmp_path, lora_rank=2, lora_target_modules="to_q"))
    with pytest.raises(ConfigError, match="did you mean 'max_sequence_length'"):
        train(_config(tiny_flux, shapes_pair, tmp_path, pipeline_args={"max_sequence_lenght": 8}))
    with pytest.raises(ConfigError, match="not a model component"):
        train(_config(tiny_flux, shapes_pair, tmp_path, lora_base_model="unet", lora_rank=2))


def test_metadata_needs_image_and_prompt_columns(tiny_flux, tmp_path):
    (tmp_path / "metadata.csv").write_text("file,text\na.png,hello\n")
    with pytest.raises(ConfigError, match="image,prompt"):
        train(_config(tiny_flux, tmp_path, tmp_path / "out"))
    (tmp_path / "metadata.csv").write_text("image,prompt\nmissing.png,hello\n")
    with pytest.raises(ConfigError, match="do not exist"):
        train(_config(tiny_flux, tmp_path, tmp_path / "out"))

"""flow-euler against diffusers' FlowMatchEulerDiscreteScheduler, driven as diffusers' pipelines drive it.

Released scheduler configs (``scheduler/scheduler_config.json``), in diffusers' names:
FLUX.1-dev: shift 3.0, use_dynamic_shifting true, base/max_shift 0.5/1.15, base/max_image_seq_len
256/4096; FLUX.1-schnell: shift 1.0, use_dynamic_shifting false; Qwen-Image: use_dynamic_shifting
true, base/max_shift 0.5/0.9, base/max_image_seq_len 256/8192, shift_terminal 0.02, time_shift_type
exponential. FluxPipeline / QwenImagePipeline pass ``sigmas=linspace(1, 1/N, N)`` and ``mu``;
SD3/Wan-style pipelines call ``set_timesteps(N)`` with a static shift.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline, calculate_shift
from diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img import QwenImageImg2ImgPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

from difforge.errors import ConfigError
from difforge.schedulers import Scheduler, build_scheduler
from difforge.schedulers.flow_euler import FlowEulerScheduler, calculate_mu

FLUX = dict(base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
FLUX_DEV = dict(FLUX, shift=3.0, use_dynamic_shifting=True)
FLUX_SCHNELL = dict(FLUX, shift=1.0, use_dynamic_shifting=False)
QWEN_IMAGE = dict(
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)
WAN_EULER = dict(shift=5.0)
QWEN_CHOICE = {
    "name": "flow-euler",
    "dynamic_shift": True,
    "max_shift": 0.9,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
}  # the other options are the spec defaults (base_shift 0.5, base_image_seq_len 256, exponential)

# (id, difforge scheduler choice, diffusers config, how the pipeline sets timesteps, image tokens)
CASES = [
    ("flux-dev-512", {"name": "flow-euler", "shift": 3.0, "dynamic_shift": True}, FLUX_DEV, "flux", 32 * 32),
    ("flux-dev-1360x768", {"name": "flow-euler", "shift": 3.0, "dynamic_shift": True}, FLUX_DEV, "flux", 85 * 48),
    ("flux-schnell", {"name": "flow-euler", "shift": 1.0}, FLUX_SCHNELL, "flux", 64 * 64),
    ("qwen-image-1328", QWEN_CHOICE, QWEN_IMAGE, "flux", 83 * 83),
    ("wan-euler-shift5", {"name": "flow-euler", "shift": 5.0, "spacing": "sd3"}, WAN_EULER, "sd3", None),
]


def diffusers_scheduler(config: dict, kind: str, steps: int, image_seq_len: int | None):
    """A FlowMatchEulerDiscreteScheduler after the set_timesteps call its pipeline makes."""
    ref = FlowMatchEulerDiscreteScheduler(**config)
    if kind == "flux":  # FluxPipeline / QwenImagePipeline
        mu = calculate_shift(
            image_seq_len,
            ref.config.get("base_image_seq_len", 256),
            ref.config.get("max_image_seq_len", 4096),
            ref.config.get("base_shift", 0.5),
            ref.config.get("max_shift", 1.15),
        )
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    else:  # StableDiffusion3Pipeline / WanPipeline
        ref.set_timesteps(steps)
    ref.set_begin_index(0)
    return ref


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_text_to_image_matches_diffusers(case, steps, latents, parity):
    _, choice, config, kind, seq = case
    if choice.get("shift_terminal") and steps == 1:
        pytest.skip("diffusers stretches a one-sigma ladder to 0/0 (NaN); see test_one_step_terminal_stretch")
    ref = diffusers_scheduler(config, kind, steps, seq)
    ours = build_scheduler(choice)
    ours.set_timesteps(steps, image_seq_len=seq)

    assert isinstance(ours, Scheduler)
    assert ours.timesteps.dtype == ours.sigmas.dtype == torch.float32
    assert ours.sigmas.shape == (steps + 1,) and ours.sigmas[-1] == 0
    assert parity.diff(ours.sigmas, ref.sigmas) <= parity.tol
    assert parity.diff(ours.timesteps, ref.timesteps) <= parity.tol
    noise = latents[1]
    expected = parity.run_diffusers(ref, ref.timesteps, noise.clone())
    assert parity.diff(parity.run_ours(ours, noise.clone()), expected) <= parity.tol


@pytest.mark.parametrize("strength", [0.6, 0.95, 1.0])
@pytest.mark.parametrize("steps", [4, 28])
@pytest.mark.parametrize(
    "pipeline, choice, config, seq",
    [
        (FluxImg2ImgPipeline, {"name": "flow-euler", "shift": 3.0, "dynamic_shift": True}, FLUX_DEV, 64 * 64),
        (QwenImageImg2ImgPipeline, QWEN_CHOICE, QWEN_IMAGE, 64 * 64),
    ],
    ids=["flux-dev", "qwen-image"],
)
def test_img2img_matches_diffusers(pipeline, choice, config, seq, steps, strength, latents, parity):
    ref = diffusers_scheduler(config, "flux", steps, seq)
    timesteps, _ = pipeline.get_timesteps(SimpleNamespace(scheduler=ref), steps, strength, "cpu")
    ours = build_scheduler(choice)
    ours.set_timesteps(steps, denoising_strength=strength, image_seq_len=seq)

    assert len(ours.timesteps) == len(timesteps)
    assert parity.diff(ours.timesteps, timesteps) <= parity.tol
    assert parity.diff(ours.sigmas, ref.sigmas[ref.begin_index :]) <= parity.tol
    x0, noise = latents
    start_ref = ref.scale_noise(x0, timesteps[:1].repeat(x0.shape[0]), noise)
    start = ours.add_noise(x0, noise, 0)
    assert parity.diff(start, start_ref) <= parity.tol
    expected = parity.run_diffusers(ref, timesteps, start_ref)
    assert parity.diff(parity.run_ours(ours, start), expected) <= parity.tol


@pytest.mark.parametrize("seq", [256, 1024, 4080, 4096, 6889, 8192])
def test_mu_matches_pipelines(seq):
    assert calculate_mu(seq) == calculate_shift(seq)
    assert calculate_mu(seq, 256, 8192, 0.5, 0.9) == calculate_shift(seq, 256, 8192, 0.5, 0.9)


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_sd3_spacing_with_dynamic_shift_matches_set_timesteps(steps, parity):
    ref = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    ref.set_timesteps(steps, mu=calculate_shift(1024))
    ours = FlowEulerScheduler(shift=3.0, dynamic_shift=True, spacing="sd3")
    ours.set_timesteps(steps, image_seq_len=1024)
    assert parity.diff(ours.sigmas, ref.sigmas) <= parity.tol
    assert parity.diff(ours.timesteps, ref.timesteps) <= parity.tol


def test_linear_time_shift_matches_diffusers(parity):
    ref = FlowMatchEulerDiscreteScheduler(**{**FLUX_DEV, "time_shift_type": "linear"})
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=calculate_shift(2048))
    ours = FlowEulerScheduler(dynamic_shift=True, time_shift_type="linear")
    ours.set_timesteps(8, image_seq_len=2048)
    assert parity.diff(ours.sigmas, ref.sigmas) <= parity.tol


def test_one_step_terminal_stretch():
    """A single step at sigma 1 cannot be stretched to a terminal sigma; it is kept as is (not NaN)."""
    ours = FlowEulerScheduler(dynamic_shift=True, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02)
    ours.set_timesteps(1, image_seq_len=4096)
    assert ours.sigmas.tolist() == [1.0, 0.0] and ours.timesteps.tolist() == [1000.0]


def test_step_is_stateless_and_keeps_dtype(latents):
    scheduler = FlowEulerScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    x = latents[1].to(torch.bfloat16)
    v = torch.ones_like(x)
    first, again = scheduler.step(v, 2, x), scheduler.step(v, 2, x)
    assert first.dtype == torch.bfloat16 and torch.equal(first, again)
    assert scheduler.add_noise(latents[0].half(), latents[1].half()).dtype == torch.float16
    assert torch.equal(scheduler.training_target(latents[0], latents[1]), latents[1] - latents[0])


def test_add_noise_at_full_strength_is_the_noise(latents):
    scheduler = FlowEulerScheduler(shift=3.0, dynamic_shift=True)
    scheduler.set_timesteps(28, image_seq_len=4096)
    x0, noise = latents
    assert torch.equal(scheduler.add_noise(x0, noise, 0), noise)


def test_errors():
    dynamic = FlowEulerScheduler(dynamic_shift=True)
    with pytest.raises(ConfigError, match="image_seq_len"):
        dynamic.set_timesteps(4)
    static = FlowEulerScheduler()
    with pytest.raises(ConfigError, match="denoising_strength"):
        static.set_timesteps(4, denoising_strength=0.0)
    static.set_timesteps(2, denoising_strength=0.2)  # img2img rounds the steps run up: one step
    assert len(static.timesteps) == 1
    with pytest.raises(ConfigError, match="num_inference_steps"):
        static.set_timesteps(0)
    static.set_timesteps(3)
    with pytest.raises(ConfigError, match="step_index 3"):
        static.step(torch.zeros(1), 3, torch.zeros(1))
    with pytest.raises(ConfigError, match="time_shift_type"):
        FlowEulerScheduler(time_shift_type="cosine")
    with pytest.raises(ConfigError, match="spacing"):
        FlowEulerScheduler(spacing="karras")
    with pytest.raises(ConfigError, match="shift"):
        FlowEulerScheduler(shift=0.0)


def test_runs_on_another_device():
    """Sigmas stay on the CPU for the arithmetic; samples live elsewhere (``meta`` stands in for a GPU)."""
    scheduler = FlowEulerScheduler(shift=3.0, dynamic_shift=True)
    scheduler.set_timesteps(3, image_seq_len=1024, device="meta")
    assert scheduler.timesteps.device.type == scheduler.sigmas.device.type == "meta"
    x = torch.empty(2, 4, 3, 3, device="meta")
    for i in range(3):
        x = scheduler.step(x, i, x)
    assert x.device.type == "meta" and scheduler.add_noise(x, x).device.type == "meta"

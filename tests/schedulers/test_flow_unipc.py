"""flow-unipc against diffusers' UniPCMultistepScheduler as the Wan pipelines configure and drive it.

Wan2.1-T2V-1.3B-Diffusers ``scheduler/scheduler_config.json`` (the fields that matter): UniPCMultistepScheduler,
prediction_type flow_prediction, use_flow_sigmas true, flow_shift 3.0, solver_order 2, solver_type bh2,
predict_x0 true, lower_order_final true, final_sigmas_type zero, timestep_spacing linspace,
use_dynamic_shifting false, disable_corrector []. 720p generation uses flow_shift 5.0.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers.pipelines.wan.pipeline_wan_video2video import WanVideoToVideoPipeline
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

from difforge.errors import ConfigError
from difforge.schedulers import Scheduler, build_scheduler
from difforge.schedulers.flow_unipc import FlowUniPCScheduler

WAN21 = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    lower_order_final=True,
    final_sigmas_type="zero",
    timestep_spacing="linspace",
    use_dynamic_shifting=False,
    disable_corrector=[],
)


def diffusers_scheduler(steps: int, **overrides) -> UniPCMultistepScheduler:
    ref = UniPCMultistepScheduler(**{**WAN21, **overrides})
    ref.set_timesteps(steps)
    return ref


@pytest.mark.parametrize("steps", [1, 2, 4, 28, 50])
@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_text_to_video_matches_diffusers(shift, steps, latents, parity):
    ref = diffusers_scheduler(steps, flow_shift=shift)
    ref.set_begin_index(0)  # WanPipeline does
    ours = build_scheduler({"name": "flow-unipc", "shift": shift})
    ours.set_timesteps(steps)

    assert isinstance(ours, Scheduler)
    assert ours.timesteps.dtype == ours.sigmas.dtype == torch.float32
    assert ours.sigmas.shape == (steps + 1,) and ours.sigmas[-1] == 0
    assert parity.diff(ours.sigmas, ref.sigmas) <= parity.tol
    assert torch.equal(ours.timesteps, ref.timesteps.float())  # whole numbers, as the model sees them
    noise = latents[1]
    expected = parity.run_diffusers(ref, ref.timesteps, noise.clone())
    assert parity.diff(parity.run_ours(ours, noise.clone()), expected) <= parity.tol


@pytest.mark.parametrize("steps", [3, 20])
@pytest.mark.parametrize("order", [1, 3])
def test_other_solver_orders_match_diffusers(order, steps, latents, parity):
    ref = diffusers_scheduler(steps, solver_order=order)
    ref.set_begin_index(0)
    ours = FlowUniPCScheduler(shift=3.0, solver_order=order)
    ours.set_timesteps(steps)
    noise = latents[1]
    expected = parity.run_diffusers(ref, ref.timesteps, noise.clone())
    assert parity.diff(parity.run_ours(ours, noise.clone()), expected) <= parity.tol


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
@pytest.mark.parametrize("steps", [4, 50])
def test_video_to_video_matches_diffusers(steps, strength, latents, parity):
    """WanVideoToVideoPipeline: its own get_timesteps cut, add_noise at the first kept timestep, and no
    set_begin_index (diffusers finds the step index from the timestep)."""
    ref = diffusers_scheduler(steps, flow_shift=5.0)
    timesteps, _ = WanVideoToVideoPipeline.get_timesteps(
        SimpleNamespace(scheduler=ref), steps, ref.timesteps, strength, "cpu"
    )
    ours = FlowUniPCScheduler(shift=5.0)
    ours.set_timesteps(steps, denoising_strength=strength)

    assert torch.equal(ours.timesteps, timesteps.float())
    x0, noise = latents
    start_ref = ref.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
    start = ours.add_noise(x0, noise, 0)
    assert parity.diff(start, start_ref) <= parity.tol
    expected = parity.run_diffusers(ref, timesteps, start_ref)
    assert parity.diff(parity.run_ours(ours, start), expected) <= parity.tol


def test_step_zero_restarts_and_set_timesteps_resets(latents):
    scheduler = FlowUniPCScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    x = latents[1]
    v = torch.ones_like(x)
    first = [scheduler.step(v, 0, x), scheduler.step(v, 1, x)]
    again = [scheduler.step(v, 0, x), scheduler.step(v, 1, x)]  # a new run without set_timesteps
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    scheduler.set_timesteps(6)
    assert torch.equal(scheduler.step(v, 0, x), first[0])


def test_steps_must_run_in_order(latents):
    scheduler = FlowUniPCScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    x = latents[1]
    scheduler.step(x, 0, x)
    with pytest.raises(ConfigError, match="in order"):
        scheduler.step(x, 2, x)
    scheduler.step(x, 1, x)
    with pytest.raises(ConfigError, match="in order"):
        scheduler.step(x, 1, x)  # the same step twice


def test_dtype_and_training_target(latents):
    scheduler = FlowUniPCScheduler(shift=5.0)
    scheduler.set_timesteps(3)
    x = latents[1].to(torch.bfloat16)
    out = scheduler.step(torch.zeros_like(x), 0, x)
    assert out.dtype == torch.bfloat16
    assert scheduler.add_noise(latents[0].half(), latents[1].half()).dtype == torch.float16
    assert torch.equal(scheduler.training_target(latents[0], latents[1]), latents[1] - latents[0])


def test_errors():
    with pytest.raises(ConfigError, match="solver_order"):
        FlowUniPCScheduler(solver_order=4)
    with pytest.raises(ConfigError, match="shift"):
        FlowUniPCScheduler(shift=-1.0)
    scheduler = FlowUniPCScheduler()
    with pytest.raises(ConfigError, match="no step"):
        scheduler.set_timesteps(2, denoising_strength=0.2)  # int(2 * 0.2) == 0 steps, as Wan video2video rounds
    with pytest.raises(ConfigError, match="denoising_strength"):
        scheduler.set_timesteps(2, denoising_strength=1.5)


@pytest.mark.parametrize("order", [2, 3])
def test_runs_on_another_device(order):
    """Coefficients are computed on the CPU and applied to samples elsewhere (``meta`` stands in for a GPU)."""
    scheduler = FlowUniPCScheduler(shift=3.0, solver_order=order)
    scheduler.set_timesteps(5, device="meta")
    assert scheduler.timesteps.device.type == scheduler.sigmas.device.type == "meta"
    x = torch.empty(2, 4, 3, 3, device="meta")
    for i in range(5):
        x = scheduler.step(x, i, x)
    assert x.device.type == "meta" and scheduler.add_noise(x, x).device.type == "meta"

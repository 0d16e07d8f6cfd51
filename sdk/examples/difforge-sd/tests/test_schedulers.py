"""difforge-sd's samplers (ddim, euler, dpmpp-2m) against diffusers' DDIMScheduler,
EulerDiscreteScheduler and DPMSolverMultistepScheduler, configured with the same values and driven the
way StableDiffusionPipeline / StableDiffusionImg2ImgPipeline drive them.

The model is a fixed non-linear function of the sample and the timestep; both loops scale the fresh
noise by ``init_noise_sigma``, call ``scale_model_input`` and ``step``. On the CPU in float32 the two
sides agree to the bit (asserted with the tolerance ``TOL``)."""

from __future__ import annotations

import inspect
import re
from types import SimpleNamespace
from typing import Any

import diffusers
import pytest
import torch

import difforge
import difforge_sd
from difforge import ConfigError
from difforge.plugins import PluginSettings
from difforge.schedulers import Scheduler, build_scheduler
from difforge_sd import schedulers as sd_schedulers
from difforge_sd._scheduler_specs import OPTION_DOCS, SCHEDULERS, options_from_diffusers

TOL = 1e-5
STEPS = (1, 2, 10, 25, 50)
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction")

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "steps_offset": 1}

# The released scheduler/scheduler_config.json files (SD 1.5 ships PNDM: run as DDIM on its betas).
SD15_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
               "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
               "clip_sample": False}
SD21_CONFIG = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
               "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
               "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SDXL_CONFIG = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
               "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
               "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
               "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
# A DPM++ 2M Karras config as saved by DPMSolverMultistepScheduler.from_config(SD 1.5's, use_karras_sigmas=True),
# and a bare Euler config (diffusers' own defaults fill the rest: linspace spacing, steps_offset 0).
DPM_CONFIG = {**SD15_CONFIG, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
              "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
              "use_karras_sigmas": True, "final_sigmas_type": "zero", "lambda_min_clipped": float("-inf"),
              "variance_type": None, "thresholding": False, "timestep_spacing": "linspace"}
BARE_EULER_CONFIG = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
                     "beta_start": 0.00085, "beta_end": 0.012}

REFERENCE = {
    "ddim": (diffusers.DDIMScheduler, {"set_alpha_to_one": False, "clip_sample": False}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "dpmpp-2m": (
        diffusers.DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True},
    ),
}
OURS = {
    "ddim": sd_schedulers.DDIMScheduler,
    "euler": sd_schedulers.EulerScheduler,
    "dpmpp-2m": sd_schedulers.DPMPP2MScheduler,
}


def _grid() -> list[Any]:
    cases = []
    for name in OURS:
        for prediction in PREDICTIONS:
            for spacing in SPACINGS:
                for karras in (False, True) if name != "ddim" else (False,):
                    label = f"{name}-{prediction}-{spacing}" + ("-karras" if karras else "")
                    cases.append(pytest.param(name, prediction, spacing, karras, id=label))
    return cases


def _pair(name: str, **options: Any) -> tuple[Any, Any]:
    """Ours (built directly) and diffusers', configured alike (SD's values unless overridden; diffusers'
    Euler and DPM-Solver default to 'linspace' spacing, SD's configs say 'leading')."""
    options = {**SD15, "timestep_spacing": "leading", **options}
    ref_cls, ref_fixed = REFERENCE[name]
    return OURS[name](**options), ref_cls(**ref_fixed, **options)


def _options(name: str, prediction: str, spacing: str, karras: bool) -> dict[str, Any]:
    options: dict[str, Any] = {"prediction_type": prediction, "timestep_spacing": spacing}
    if name != "ddim":
        options["use_karras_sigmas"] = karras
    return options


def fake_model(sample: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """A fixed, non-linear function of the (scaled) sample and the timestep, standing in for the U-Net."""
    t = float(t)
    mix = torch.roll(sample, 1, dims=1) * 0.4 - 0.3 * sample
    return torch.tanh(mix + 0.002 * t - 1.0) + 0.1 * torch.cos(0.01 * t + sample)


def _noise(seed: int = 0, shape: tuple[int, ...] = (2, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_ours(sched: Any, latents: torch.Tensor) -> torch.Tensor:
    """The difforge runtime's loop (with difforge_sd's pipeline: scale_model_input, model at timesteps[i])."""
    for i in range(len(sched.timesteps)):
        out = fake_model(sched.scale_model_input(latents, i), sched.timesteps[i])
        latents = sched.step(out, i, latents)
    return latents


def run_diffusers(sched: Any, timesteps: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """StableDiffusionPipeline's denoising loop (no guidance: one model call per step, eta 0)."""
    for t in timesteps:
        out = fake_model(sched.scale_model_input(latents, t), t)
        latents = sched.step(out, t, latents, return_dict=False)[0]
    return latents


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name, prediction, spacing, karras", _grid())
def test_timesteps_and_sigmas_match_diffusers(name: str, prediction: str, spacing: str, karras: bool) -> None:
    for n in STEPS:
        ours, ref = _pair(name, **_options(name, prediction, spacing, karras))
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ours.timesteps.dtype == torch.float32
        assert torch.equal(ours.timesteps, ref.timesteps.to(torch.float32)), (n, ours.timesteps, ref.timesteps)
        assert len(ours.sigmas) == n + 1
        if name != "ddim":
            assert torch.equal(ours.sigmas, ref.sigmas), n
        assert ours.init_noise_sigma == float(ref.init_noise_sigma), n
        assert isinstance(ours.init_noise_sigma, float)


@pytest.mark.parametrize(
    "name, ref_cls, config",
    [
        pytest.param("ddim", diffusers.DDIMScheduler, SD15_CONFIG, id="sd15-pndm-as-ddim"),
        pytest.param("ddim", diffusers.DDIMScheduler, SD21_CONFIG, id="sd21-v-ddim"),
        pytest.param("euler", diffusers.EulerDiscreteScheduler, SDXL_CONFIG, id="sdxl-euler"),
        pytest.param("euler", diffusers.EulerDiscreteScheduler, BARE_EULER_CONFIG, id="bare-euler"),
        pytest.param("dpmpp-2m", diffusers.DPMSolverMultistepScheduler, DPM_CONFIG, id="dpmpp-2m-karras"),
    ],
)
def test_released_configs(name: str, ref_cls: Any, config: dict[str, Any]) -> None:
    """A scheduler_config.json through options_from_diffusers and the registry samples as diffusers'
    class made from_config of the same file."""
    options = options_from_diffusers(name, config)
    with _sd_registry():
        ours = build_scheduler({"name": name, **options}, family="sd")
    ref = ref_cls.from_config(config)
    for n in (1, 30, 50):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert torch.equal(ours.timesteps, ref.timesteps.float())
        x = _noise(3)
        assert diff(run_ours(ours, x * ours.init_noise_sigma), run_diffusers(ref, ref.timesteps, x * ref.init_noise_sigma)) <= TOL


@pytest.mark.parametrize(
    "name, key, value",
    [("dpmpp-2m", "solver_order", 3), ("dpmpp-2m", "algorithm_type", "sde-dpmsolver++"), ("ddim", "thresholding", True),
     ("euler", "timestep_type", "continuous"), ("euler", "use_exponential_sigmas", True)],
)
def test_unreproducible_configs_are_refused(name: str, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{key}={value!r} is not reproduced")):
        options_from_diffusers(name, {**SD15_CONFIG, key: value})


def test_trailing_keeps_n_steps_where_numpy_arange_adds_one() -> None:
    """At N = 61, diffusers' trailing spacing has an extra timestep -1; ours keeps the 61 others."""
    for name in OURS:
        ours, ref = _pair(name, timestep_spacing="trailing")
        ours.set_timesteps(61)
        ref.set_timesteps(61)
        assert len(ref.timesteps) == 62 and int(ref.timesteps[-1]) == -1
        assert torch.equal(ours.timesteps, ref.timesteps[:61].float())


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name, prediction, spacing, karras", _grid())
def test_sampling_loop_matches_diffusers(name: str, prediction: str, spacing: str, karras: bool) -> None:
    worst = 0.0
    for n in STEPS:
        ours, ref = _pair(name, **_options(name, prediction, spacing, karras))
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        x = _noise(n)
        a = run_ours(ours, x * ours.init_noise_sigma)
        b = run_diffusers(ref, ref.timesteps, x * ref.init_noise_sigma)
        assert torch.isfinite(a).all()
        worst = max(worst, diff(a, b))
    assert worst <= TOL


@pytest.mark.parametrize("name", list(OURS))
def test_zero_terminal_snr_v_prediction(name: str) -> None:
    """rescale_betas_zero_snr with v-prediction and trailing spacing (the combination it is made for)."""
    options = {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
    for n in (1, 10, 25):
        ours, ref = _pair(name, **options)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert torch.equal(ours.timesteps, ref.timesteps.float())
        x = _noise(n)
        a = run_ours(ours, x * ours.init_noise_sigma)
        b = run_diffusers(ref, ref.timesteps, x * ref.init_noise_sigma)
        assert torch.isfinite(a).all() and diff(a, b) <= TOL


@pytest.mark.parametrize("name, prediction, spacing, karras", _grid())
def test_img2img_cut_and_add_noise_match_diffusers(name: str, prediction: str, spacing: str, karras: bool) -> None:
    """StableDiffusionImg2ImgPipeline: get_timesteps' cut (and begin index), add_noise at the first
    kept timestep, then the loop over the kept timesteps."""
    source, noise = _noise(11), _noise(12)
    for n in (10, 25, 50):
        for strength in (0.3, 0.6):
            ours, ref = _pair(name, **_options(name, prediction, spacing, karras))
            ours.set_timesteps(n, denoising_strength=strength)
            ref.set_timesteps(n)
            pipe = SimpleNamespace(scheduler=ref)
            timesteps, steps = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(pipe, n, strength, "cpu")
            assert len(ours.timesteps) == steps == int(n * strength)
            assert torch.equal(ours.timesteps, timesteps.float())
            a = ours.add_noise(source, noise, 0)
            b = ref.add_noise(source, noise, timesteps[:1].repeat(source.shape[0]))
            assert diff(a, b) <= TOL, (n, strength)
            assert diff(run_ours(ours, a), run_diffusers(ref, timesteps, b)) <= TOL, (n, strength)


def test_add_noise_at_later_steps() -> None:
    """add_noise(x0, noise, i) is the sample at timesteps[i] (diffusers' add_noise there)."""
    source, noise = _noise(1), _noise(2)
    for name in OURS:
        ours, ref = _pair(name)
        ours.set_timesteps(20, denoising_strength=0.5)
        ref.set_timesteps(20)
        for i in (0, 4, 9):
            t = ref.timesteps[10 + i : 11 + i]
            expected = ref.add_noise(source, noise, t) if name == "ddim" else _diffusers_noise_at(ref, source, noise, 10 + i)
            assert diff(ours.add_noise(source, noise, i), expected) <= TOL


def _diffusers_noise_at(ref: Any, source: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    ref.set_begin_index(index)
    try:
        return ref.add_noise(source, noise, ref.timesteps[index : index + 1])
    finally:
        ref.set_begin_index(None)


def test_scale_model_input() -> None:
    x = _noise(5)
    for name in OURS:
        ours, ref = _pair(name)
        ours.set_timesteps(10)
        ref.set_timesteps(10)
        for i in (0, 5, 9):
            ref._step_index = None
            assert torch.equal(ours.scale_model_input(x, i), ref.scale_model_input(x, ref.timesteps[i]))
        if name != "euler":
            assert ours.scale_model_input(x, 3) is x
        else:
            assert not torch.equal(ours.scale_model_input(x, 0), x)


def test_multistep_history_is_reset() -> None:
    """dpmpp-2m forgets its history at set_timesteps (and at step 0), so a second run equals the first."""
    ours, _ = _pair("dpmpp-2m")
    x = _noise(4)
    ours.set_timesteps(12)
    first = run_ours(ours, x)
    second = run_ours(ours, x)  # no set_timesteps: step 0 starts afresh
    ours.set_timesteps(12)
    third = run_ours(ours, x)
    assert torch.equal(first, second) and torch.equal(first, third)
    ours.set_timesteps(12)
    ours.step(fake_model(x, ours.timesteps[0]), 0, x)
    with pytest.raises(ConfigError, match="in order"):
        ours.step(fake_model(x, ours.timesteps[2]), 2, x)


def test_half_precision_samples_keep_their_dtype() -> None:
    x = _noise(6).to(torch.bfloat16)
    for name in OURS:
        ours, _ = _pair(name)
        ours.set_timesteps(4)
        out = run_ours(ours, x * ours.init_noise_sigma)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_training_target() -> None:
    x0, noise = _noise(7), _noise(8)
    eps, _ = _pair("ddim")
    assert eps.training_target(x0, noise) is noise
    v, ref = _pair("ddim", prediction_type="v_prediction")
    with pytest.raises(ConfigError, match="timesteps="):
        v.training_target(x0, noise)
    t = torch.tensor([10, 700])
    assert diff(v.training_target(x0, noise, timesteps=t), ref.get_velocity(x0, noise, t)) == 0.0


# ----------------------------------------------------------------------------- registration and errors


class _sd_registry:
    """The built-in plugin and difforge-sd alone in the registry (restored afterwards)."""

    def __enter__(self) -> Any:
        return difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_sd]).registry

    def __exit__(self, *exc: Any) -> None:
        difforge.reload_plugins()


def test_specs_register_and_build() -> None:
    with _sd_registry() as registry:
        for spec in SCHEDULERS:
            assert registry.schedulers.get(spec.name) == spec
            assert set(spec.families) == {"sd", "sdxl"}
            for family in spec.families:
                sched = build_scheduler({"name": spec.name, "prediction_type": "v_prediction"}, family=family)
                assert isinstance(sched, OURS[spec.name]) and isinstance(sched, Scheduler)
                assert sched.prediction_type == "v_prediction"
            with pytest.raises(ConfigError, match="does not fit"):
                build_scheduler(spec.name, family="flux")
            with pytest.raises(ConfigError, match="unknown option 'use_karas_sigmas'"):
                build_scheduler({"name": spec.name, "use_karas_sigmas": True}, family="sd")
        built = build_scheduler({"name": "dpmpp-2m", "use_karras_sigmas": True}, family="sdxl")
        ours, ref = _pair("dpmpp-2m", use_karras_sigmas=True)
        built.set_timesteps(20)
        ref.set_timesteps(20)
        assert torch.equal(built.sigmas, ref.sigmas)


def test_spec_options_are_the_factories_defaults_and_documented() -> None:
    for spec in SCHEDULERS:
        params = inspect.signature(OURS[spec.name]).parameters
        assert {k: p.default for k, p in params.items()} == dict(spec.options), spec.name
        assert spec.factory == f"difforge_sd.schedulers:{OURS[spec.name].__name__}"
        assert set(spec.options) <= set(OPTION_DOCS)


def test_specs_module_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, difforge_sd._scheduler_specs; print('difforge_sd.schedulers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("ddim", {"prediction_type": "sample"}, "prediction_type must be one of 'epsilon', 'v_prediction'"),
        ("euler", {"timestep_spacing": "even"}, "timestep_spacing must be one of"),
        ("dpmpp-2m", {"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule must be one of"),
        ("ddim", {"eta": 0.5}, "eta=0.5: only deterministic DDIM"),
        ("euler", {"use_karras_sigmas": "yes"}, "use_karras_sigmas must be true or false"),
        ("dpmpp-2m", {"steps_offset": -1}, "steps_offset must be an integer >= 0"),
        ("ddim", {"beta_start": 0.02, "beta_end": 0.01}, "beta_start must not exceed beta_end"),
        ("euler", {"num_train_timesteps": 1.5}, "num_train_timesteps must be an integer"),
    ],
)
def test_bad_options_are_config_errors(name: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OURS[name](**options)


def test_bad_calls_are_config_errors() -> None:
    for name, cls in OURS.items():
        sched = cls()
        with pytest.raises(ConfigError, match="call set_timesteps"):
            sched.step(_noise(), 0, _noise())
        for bad in (0, 1001, 2.5, True):
            with pytest.raises(ConfigError, match="num_inference_steps"):
                sched.set_timesteps(bad)
        with pytest.raises(ConfigError, match="denoising_strength"):
            sched.set_timesteps(10, denoising_strength=1.5)
        with pytest.raises(ConfigError, match="raise denoising_strength"):
            sched.set_timesteps(10, denoising_strength=0.05)
        sched.set_timesteps(10, denoising_strength=0.3)
        for bad in (3, -1, 1.0):
            with pytest.raises(ConfigError, match="step_index"):
                sched.step(_noise(), bad, _noise())
        with pytest.raises(ConfigError, match="steps_offset"):
            cls(steps_offset=600).set_timesteps(2)


def test_timesteps_follow_device_and_strength_one_keeps_everything() -> None:
    for cls in OURS.values():
        sched = cls()
        sched.set_timesteps(7, device="cpu", image_seq_len=4096)
        assert sched.timesteps.device.type == "cpu" and len(sched.timesteps) == 7
        full = sched.timesteps.clone()
        sched.set_timesteps(7, denoising_strength=0.5)
        assert torch.equal(sched.timesteps, full[7 - 3 :])
        assert len(sched.sigmas) == 4

"""The ``ddim``, ``euler`` and ``dpmpp-2m`` scheduler specs of difforge-sd (light: no torch import).

The samplers live in :mod:`difforge_sd.schedulers`, named here by lazy ``"module:attr"`` strings.
Option names are diffusers' scheduler-config names, so the values of a model's
``scheduler/scheduler_config.json`` carry over unchanged; the defaults are the released
Stable Diffusion 1.5 / 2.x / SDXL values (``scaled_linear`` betas from 0.00085 to 0.012 over 1000
training steps, ``leading`` spacing with ``steps_offset`` 1). For SD 2.x-v models pass
``prediction_type="v_prediction"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from difforge import ConfigError, SchedulerSpec

__all__ = ["SCHEDULERS", "OPTION_DOCS", "FAMILIES", "DIFFUSERS_DEFAULTS", "options_from_diffusers"]

FAMILIES = ("sd", "sdxl")

_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "rescale_betas_zero_snr": False,
}

OPTION_DOCS: dict[str, str] = {
    "num_train_timesteps": "length of the training noise chain (1000)",
    "beta_start": "first beta of the training chain (SD: 0.00085)",
    "beta_end": "last beta of the training chain (SD: 0.012)",
    "beta_schedule": "'scaled_linear' (linear in sqrt(beta), SD's) or 'linear'",
    "prediction_type": "what the U-Net predicts: 'epsilon' (SD 1.x, SDXL) or 'v_prediction' (SD 2.x 768-v)",
    "timestep_spacing": "'leading' (multiples of T // N, plus steps_offset; SD's), 'trailing' (from T - 1 down) "
    "or 'linspace' (evenly over [0, T - 1])",
    "steps_offset": "added to 'leading' timesteps (SD's configs: 1)",
    "rescale_betas_zero_snr": "rescale the betas so the last timestep is pure noise (zero terminal SNR; "
    "use with v_prediction and 'trailing')",
    "set_alpha_to_one": "ddim: the last step lands on clean latents (True) or at the first training step (False, SD's)",
    "eta": "ddim: only 0 (deterministic DDIM)",
    "clip_sample": "ddim: clamp the predicted clean latents to +-clip_sample_range (off for SD)",
    "clip_sample_range": "ddim: the clamp of clip_sample (1.0)",
    "use_karras_sigmas": "euler, dpmpp-2m: Karras et al. (rho 7) sigma spacing",
}
"""What each option means (the options' defaults are in each spec's ``options``)."""

SCHEDULERS: tuple[SchedulerSpec, ...] = (
    SchedulerSpec(
        name="ddim",
        factory="difforge_sd.schedulers:DDIMScheduler",
        families=FAMILIES,
        options={**_COMMON, "set_alpha_to_one": False, "eta": 0.0, "clip_sample": False, "clip_sample_range": 1.0},
        description="deterministic DDIM (eta 0) for epsilon- and v-prediction SD models; diffusers' DDIMScheduler",
    ),
    SchedulerSpec(
        name="euler",
        factory="difforge_sd.schedulers:EulerScheduler",
        families=FAMILIES,
        options={**_COMMON, "use_karras_sigmas": False},
        description="Euler on the variance-exploding ODE (SDXL's default); diffusers' EulerDiscreteScheduler",
    ),
    SchedulerSpec(
        name="dpmpp-2m",
        factory="difforge_sd.schedulers:DPMPP2MScheduler",
        families=FAMILIES,
        options={**_COMMON, "use_karras_sigmas": False},
        description="DPM-Solver++ 2M (midpoint, first order on the first and last steps); "
        "diffusers' DPMSolverMultistepScheduler(algorithm_type='dpmsolver++')",
    ),
)


_DIFFUSERS_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": {**_DIFFUSERS_COMMON, "timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True,
             "clip_sample_range": 1.0},
    "euler": {**_DIFFUSERS_COMMON, "timestep_spacing": "linspace", "use_karras_sigmas": False},
    "dpmpp-2m": {**_DIFFUSERS_COMMON, "timestep_spacing": "linspace", "use_karras_sigmas": False},
}
"""What diffusers' ``DDIMScheduler`` / ``EulerDiscreteScheduler`` / ``DPMSolverMultistepScheduler`` assume
for an option missing from a ``scheduler_config.json`` (they differ from the SD defaults of the specs)."""

_NEG_INF = float("-inf")

# Config keys that change the sampler, with the values these samplers reproduce (anything else is refused).
_REPRODUCED: dict[str, dict[str, tuple[Any, ...]]] = {
    "ddim": {"thresholding": (False,), "trained_betas": (None,)},
    "euler": {
        "interpolation_type": ("linear",),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "timestep_type": ("discrete",),
        "final_sigmas_type": ("zero",),
        "sigma_min": (None,),
        "sigma_max": (None,),
        "trained_betas": (None,),
    },
    "dpmpp-2m": {
        "algorithm_type": ("dpmsolver++",),
        "solver_order": (2,),
        "solver_type": ("midpoint",),
        "final_sigmas_type": ("zero",),  # with a final sigma 0, lower_order_final and euler_at_final change nothing
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "use_flow_sigmas": (False,),
        "use_dynamic_shifting": (False,),
        "lambda_min_clipped": (_NEG_INF,),
        "variance_type": (None,),
        "thresholding": (False,),
        "trained_betas": (None,),
    },
}


def options_from_diffusers(name: str, config: Mapping[str, Any], source: str = "scheduler_config.json") -> dict[str, Any]:
    """The options of scheduler ``name`` (``ddim``, ``euler``, ``dpmpp-2m``) that reproduce what diffusers'
    corresponding class makes of ``config`` (a ``scheduler_config.json``, possibly another class's, as
    ``from_config`` accepts): every option the spec declares, from the config or else from the class's
    own default (:data:`DIFFUSERS_DEFAULTS`). Keys the sampler does not read are ignored; a key whose
    value would make diffusers sample differently (``thresholding``, ``solver_order: 3``, ...) is a
    :class:`~difforge.ConfigError`.
    """
    if name not in DIFFUSERS_DEFAULTS:
        raise ConfigError(f"{source}: no diffusers equivalent for scheduler {name!r}; use one of {', '.join(DIFFUSERS_DEFAULTS)}")
    for key, allowed in _REPRODUCED[name].items():
        value = config.get(key, allowed[0])
        if value not in allowed:
            raise ConfigError(
                f"{source}: {key}={value!r} is not reproduced by difforge-sd's {name!r} scheduler, which samples "
                f"as {key}={allowed[0]!r}; to run that instead, pass the scheduler explicitly "
                f"(scheduler={{'name': {name!r}, ...}})"
            )
    options: dict[str, Any] = {}
    for key, default in DIFFUSERS_DEFAULTS[name].items():
        value = config.get(key, default)
        options[key] = default if value is None else value  # e.g. "use_karras_sigmas": null
    return options

"""Samplers of DDPM-trained latent diffusion models: SD 1.x (epsilon), SD 2.x-v (v), SDXL (epsilon).

The models were trained on a discrete variance-preserving chain of ``num_train_timesteps`` steps,
``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise``, with ``abar_t`` the cumulative product of
``1 - beta`` over a ``scaled_linear`` (``linspace(sqrt(beta_start), sqrt(beta_end))**2``) or ``linear``
beta ladder; the U-Net predicts the noise (``epsilon``) or the velocity
``v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0`` (``v_prediction``) at an integer timestep.
Three samplers integrate that chain backwards:

* ``ddim`` (:class:`DDIMScheduler`): deterministic DDIM (``eta = 0``) on the ``abar`` ladder;
* ``euler`` (:class:`EulerScheduler`): Euler on the variance-exploding form ``x / sqrt(abar)``, with
  ``sigma = sqrt((1 - abar) / abar)``; its latents live at scale ``sqrt(sigma^2 + 1)``, hence
  ``init_noise_sigma`` and ``scale_model_input``;
* ``dpmpp-2m`` (:class:`DPMPP2MScheduler`): DPM-Solver++ (data prediction) multistep, second
  order with the midpoint formula, first order on the first and the last step.

Timesteps, sigmas and every step are computed as diffusers' ``DDIMScheduler``,
``EulerDiscreteScheduler`` and ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``,
``solver_order=2``, ``solver_type="midpoint"``, ``lower_order_final=True``) compute them, in the same
floating-point types and order, when ``StableDiffusionPipeline`` and ``StableDiffusionImg2ImgPipeline``
drive them; so a float32 run agrees with diffusers to the bit (the tests check it). The option names
are diffusers' (``scheduler_config.json`` values carry over unchanged). The defaults are the values
of the released SD 1.5 / SD 2.x / SDXL configs.

One deliberate difference: for the few step counts (61, 103, 121, ...) at which
``numpy.arange(1000, 0, -1000 / N)`` rounds to ``N + 1`` entries, diffusers' ``trailing`` spacing
makes an extra timestep ``-1``; here the schedule keeps its ``N`` steps.

With ``denoising_strength < 1`` (img2img) the schedule is cut as the img2img pipelines of diffusers
cut it: ``int(N * strength)`` steps run, the last ones of the full ``N``-step schedule; step ``0`` is
the first step taken and ``add_noise(x0, noise, 0)`` makes the starting latents.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import numpy as np
import torch

from difforge import ConfigError

__all__ = [
    "DDIMScheduler",
    "EulerScheduler",
    "DPMPP2MScheduler",
    "train_betas",
    "zero_terminal_snr",
    "spaced_timesteps",
    "karras_sigmas",
    "sigmas_to_timesteps",
    "img2img_start",
    "PREDICTION_TYPES",
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
]

logger = logging.getLogger("difforge_sd.schedulers")

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "linear")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
KARRAS_RHO = 7.0


# ----------------------------------------------------------------------------- schedules


def train_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> torch.Tensor:
    """The training noise ladder ``beta_0 .. beta_{T-1}`` (float32), as the released configs name it."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # linear in sqrt(beta): Stable Diffusion's schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    raise ConfigError(f"beta_schedule must be one of {_choices(BETA_SCHEDULES)}, got {beta_schedule!r}")


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale ``betas`` so that the last timestep is pure noise (``abar_{T-1} = 0``).

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed": ``sqrt(abar)`` is
    shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def spaced_timesteps(
    num_inference_steps: int,
    *,
    num_train_timesteps: int = 1000,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    one_more: bool = False,
) -> np.ndarray:
    """The ``N`` decreasing integer timesteps (int64) at which the model is evaluated.

    * ``leading``: multiples of ``T // N`` from 0, plus ``steps_offset`` (SD's configs: 1);
    * ``trailing``: ``round(T - k * T / N) - 1``, so the first step is at ``T - 1``;
    * ``linspace``: ``N`` evenly spaced points of ``[0, T - 1]``, rounded.

    ``one_more`` spaces ``N + 1`` points and drops the last (0), as diffusers' DPM-Solver does for
    ``leading`` and ``linspace``.
    """
    n, total = num_inference_steps, num_train_timesteps
    if timestep_spacing == "linspace":
        points = n + 1 if one_more else n
        ts = np.linspace(0, total - 1, points).round()[::-1]
        ts = ts[:n]
    elif timestep_spacing == "leading":
        points = n + 1 if one_more else n
        ts = (np.arange(0, points) * (total // points)).round()[::-1][:n] + steps_offset
    elif timestep_spacing == "trailing":
        ts = np.arange(total, 0, -total / n).round()
        if len(ts) > n:  # float rounding in arange: diffusers would also run a step at timestep -1
            logger.debug("trailing spacing: %d steps keep %d of numpy's %d points", n, n, len(ts))
        ts = ts[:n] - 1
    else:
        raise ConfigError(f"timestep_spacing must be one of {_choices(TIMESTEP_SPACINGS)}, got {timestep_spacing!r}")
    return ts.astype(np.int64)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """``N`` sigmas from ``sigma_max`` down to ``sigma_min``, evenly spaced in ``sigma^(1/rho)``
    (Karras et al. 2022, eq. 5), float64."""
    ramp = np.linspace(0, 1, num_inference_steps)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigmas_to_timesteps(sigmas: np.ndarray, train_log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of ``sigmas``: linear interpolation in ``log sigma`` between the
    two neighbouring training timesteps (clamped to the ends of the ladder), float64.

    ``train_log_sigmas`` (float32, increasing with the timestep) is ``log(sigma_t)`` of the training ladder.
    """
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    last = train_log_sigmas.shape[0] - 2
    # the last training timestep whose log sigma is <= log_sigma (0 below the ladder)
    low = (np.searchsorted(train_log_sigmas.astype(np.float64), log_sigma, side="right") - 1).clip(0, last)
    high = low + 1
    lo, hi = train_log_sigmas[low], train_log_sigmas[high]  # float32, as their difference must be
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * high


def img2img_start(num_inference_steps: int, denoising_strength: float) -> int:
    """The first step of an img2img run: ``int(N * strength)`` steps run, the last ones of the schedule
    (``StableDiffusionImg2ImgPipeline.get_timesteps``)."""
    run = min(int(num_inference_steps * denoising_strength), num_inference_steps)
    return max(num_inference_steps - run, 0)


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(map(repr, values))


# ----------------------------------------------------------------------------- common part


class _DiscreteScheduler:
    """What the three samplers share: options, the training ladder, the schedule and its img2img cut.

    ``timesteps`` (``[N']`` float32, the integer or fractional training timesteps the U-Net receives)
    and ``sigmas`` (``[N' + 1]`` float32, the variance-exploding ``sqrt((1 - abar) / abar)`` each step
    starts from, then where the last step lands) hold the steps that run (``N' = N`` unless
    ``denoising_strength < 1``).
    """

    name = "sd-scheduler"
    order = 1  # one model evaluation per step
    #: Euler and DPM-Solver keep the last abar of a zero-SNR ladder just above 0 (finite sigma), as diffusers does
    _zero_snr_floor = True

    def __init__(
        self,
        *,
        num_train_timesteps: int,
        beta_start: float,
        beta_end: float,
        beta_schedule: str,
        prediction_type: str,
        timestep_spacing: str,
        steps_offset: int,
        rescale_betas_zero_snr: bool,
    ) -> None:
        self.num_train_timesteps = self._int_option("num_train_timesteps", num_train_timesteps, minimum=2)
        self.steps_offset = self._int_option("steps_offset", steps_offset, minimum=0)
        for key, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
                raise self._option_error(key, value, "a number in (0, 1) (SD: beta_start 0.00085, beta_end 0.012)")
        if not float(beta_start) <= float(beta_end):
            raise ConfigError(
                f"{self.name} options beta_start={beta_start!r} and beta_end={beta_end!r}: beta_start must not exceed "
                f"beta_end; copy both from the model's scheduler_config.json"
            )
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.beta_schedule = self._choice_option("beta_schedule", beta_schedule, BETA_SCHEDULES)
        self.prediction_type = self._choice_option("prediction_type", prediction_type, PREDICTION_TYPES)
        self.timestep_spacing = self._choice_option("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.rescale_betas_zero_snr = self._bool_option("rescale_betas_zero_snr", rescale_betas_zero_snr)

        betas = train_betas(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)
        if self.rescale_betas_zero_snr:
            betas = zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if self.rescale_betas_zero_snr and self._zero_snr_floor:
            self.alphas_cumprod[-1] = 2**-24
        self.init_noise_sigma = 1.0
        self.num_inference_steps = 0
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        # the full (uncut) schedule, on the CPU: steps index it at ``self._start + step_index``
        self._all_timesteps = np.zeros(0, dtype=np.int64)
        self._all_sigmas = torch.empty(0)
        self._start = 0

    # -- option checks

    def _option_error(self, key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.name} option {key} must be {expected}, got {value!r}")

    def _int_option(self, key: str, value: Any, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._option_error(key, value, f"an integer >= {minimum}")
        return int(value)

    def _bool_option(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self._option_error(key, value, "true or false")
        return value

    def _choice_option(self, key: str, value: Any, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self._option_error(key, value, f"one of {_choices(choices)}")
        return str(value)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(prediction_type={self.prediction_type!r}, "
            f"timestep_spacing={self.timestep_spacing!r}, steps={len(self.timesteps)})"
        )

    # -- the schedule

    def _train_sigmas(self) -> torch.Tensor:
        """``sqrt((1 - abar_t) / abar_t)`` of every training timestep (float32)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def _schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(timesteps [N], sigmas [N + 1] float32)`` of the full ``n``-step schedule."""
        raise NotImplementedError

    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        denoising_strength: float = 1.0,
        image_seq_len: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Compute the schedule of ``num_inference_steps`` steps, cut for img2img when
        ``denoising_strength < 1``, and forget any multistep history. ``image_seq_len`` is unused
        (these schedules do not depend on the image size)."""
        try:
            n = operator.index(num_inference_steps)
        except TypeError:
            n = 0
        if isinstance(num_inference_steps, bool) or not 1 <= n <= self.num_train_timesteps:
            raise ConfigError(
                f"{self.name}: num_inference_steps must be an integer from 1 to num_train_timesteps "
                f"({self.num_train_timesteps}), got {num_inference_steps!r}"
            )
        strength = float(denoising_strength)
        if not 0.0 < strength <= 1.0:
            raise ConfigError(f"{self.name}: denoising_strength must be in (0, 1], got {denoising_strength!r}")
        start = img2img_start(n, strength)
        if start >= n:
            raise ConfigError(
                f"{self.name}: denoising_strength={strength} runs int({n} * {strength}) = 0 of num_inference_steps={n}; "
                f"raise denoising_strength or num_inference_steps"
            )
        timesteps, sigmas = self._schedule(n)
        if timesteps.min() < 0 or timesteps.max() > self.num_train_timesteps - 1:
            raise ConfigError(
                f"{self.name}: with timestep_spacing={self.timestep_spacing!r} and steps_offset={self.steps_offset}, "
                f"{n} steps reach timestep {timesteps.max()}, outside 0..{self.num_train_timesteps - 1}; "
                f"lower steps_offset (SD's configs use 1)"
            )
        self.num_inference_steps = n
        self._start = start
        self._all_timesteps = timesteps
        self._all_sigmas = torch.from_numpy(np.ascontiguousarray(sigmas, dtype=np.float32))
        self.timesteps = torch.from_numpy(timesteps[start:].astype(np.float32)).to(device)
        self.sigmas = self._all_sigmas[start:].to(device)
        self._reset()

    def _reset(self) -> None:
        """Forget multistep history (set_timesteps calls it)."""

    def _index(self, step_index: int) -> int:
        """The index in the full schedule of ``step_index`` (counted from the first step taken)."""
        steps = len(self._all_timesteps) - self._start
        if not self.num_inference_steps:
            raise ConfigError(f"{self.name}: call set_timesteps(num_inference_steps) before stepping or adding noise")
        try:
            index = operator.index(step_index)
        except TypeError:
            index = -1
        if isinstance(step_index, bool) or not 0 <= index < steps:
            raise ConfigError(
                f"{self.name}: step_index must be an integer from 0 to {steps - 1} (the steps set by set_timesteps), "
                f"got {step_index!r}"
            )
        return self._start + index

    # -- the protocol's rest

    def scale_model_input(self, sample: torch.Tensor, step_index: int) -> torch.Tensor:
        """The U-Net's input at step ``step_index``: ``sample`` itself (Euler overrides this)."""
        self._index(step_index)
        return sample

    def training_target(
        self, sample: torch.Tensor, noise: torch.Tensor, *, timesteps: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """What the U-Net is trained to predict for ``sample`` (clean latents) noised with ``noise``.

        ``epsilon``: ``noise``. ``v_prediction``: ``sqrt(abar_t) * noise - sqrt(1 - abar_t) * sample``,
        which depends on the training timestep: pass ``timesteps`` (integers, one per sample or one
        for all). Note that difforge's ``train`` command is flow-matching only: it does not train
        these models.
        """
        if self.prediction_type == "epsilon":
            return noise
        if timesteps is None:
            raise ConfigError(
                f"{self.name} with prediction_type='v_prediction': the velocity target depends on the training "
                f"timestep; call training_target(sample, noise, timesteps=t) with the integer timesteps the "
                f"noise was added at"
            )
        t = torch.as_tensor(timesteps, device="cpu").long().reshape(-1)
        abar = self.alphas_cumprod[t].to(device=sample.device, dtype=sample.dtype)
        abar = abar.reshape(-1, *([1] * (sample.dim() - 1)))
        return abar**0.5 * noise - (1 - abar) ** 0.5 * sample


# ----------------------------------------------------------------------------- DDIM


class DDIMScheduler(_DiscreteScheduler):
    """Deterministic DDIM (Song et al. 2021) with ``eta = 0``; diffusers' ``DDIMScheduler``.

    Options (the names of the ``ddim`` :class:`~difforge.SchedulerSpec`), besides the common ones
    (``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``, ``prediction_type``,
    ``timestep_spacing``, ``steps_offset``, ``rescale_betas_zero_snr``):

    * ``set_alpha_to_one``: where the last step lands: ``abar = 1`` (clean) or, as SD's configs say
      (False), ``abar_0``;
    * ``eta``: only 0 (the stochastic variant would need the pipeline's generator in ``step``);
    * ``clip_sample`` / ``clip_sample_range``: clamp the predicted clean latents (off for SD).

    Each step goes from timestep ``t`` to ``t - num_train_timesteps // N`` (so with ``trailing`` or
    ``linspace`` spacing it does not land exactly on the next timestep, as in diffusers).
    """

    name = "ddim"
    _zero_snr_floor = False

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
        set_alpha_to_one: bool = False,
        eta: float = 0.0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or float(eta) != 0.0:
            raise ConfigError(
                f"ddim option eta={eta!r}: only deterministic DDIM (eta=0) is available; set eta to 0, or use "
                f"'euler' or 'dpmpp-2m'"
            )
        self.eta = 0.0
        self.set_alpha_to_one = self._bool_option("set_alpha_to_one", set_alpha_to_one)
        self.clip_sample = self._bool_option("clip_sample", clip_sample)
        if isinstance(clip_sample_range, bool) or not isinstance(clip_sample_range, (int, float)) or not clip_sample_range > 0:
            raise self._option_error("clip_sample_range", clip_sample_range, "a positive number")
        self.clip_sample_range = float(clip_sample_range)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    def _schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        ts = spaced_timesteps(
            n, num_train_timesteps=self.num_train_timesteps, timestep_spacing=self.timestep_spacing,
            steps_offset=self.steps_offset,
        )
        train = self._train_sigmas()
        last = ((1 - self.final_alpha_cumprod) / self.final_alpha_cumprod) ** 0.5
        if len(ts) and (ts.min() < 0 or ts.max() >= self.num_train_timesteps):
            return ts, np.zeros(len(ts) + 1, dtype=np.float32)  # refused by set_timesteps
        sigmas = torch.cat([train[torch.from_numpy(ts)], last.reshape(1)])
        return ts, sigmas.numpy()

    def _alphas(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``abar`` at the step's timestep and where the step lands (0-d float32)."""
        t = int(self._all_timesteps[index])
        prev = t - self.num_train_timesteps // self.num_inference_steps
        return self.alphas_cumprod[t], self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """One DDIM step (float32 inside, returned in ``sample``'s dtype)."""
        abar, abar_prev = self._alphas(self._index(step_index))
        x, out = sample.float(), model_output.float()
        beta = 1 - abar
        if self.prediction_type == "epsilon":
            x0 = (x - beta**0.5 * out) / abar**0.5
            eps = out
        else:
            x0 = abar**0.5 * x - beta**0.5 * out
            eps = abar**0.5 * out + beta**0.5 * x
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        prev = abar_prev**0.5 * x0 + (1 - abar_prev) ** 0.5 * eps
        return prev.to(sample.dtype)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, step_index: int = 0) -> torch.Tensor:
        """``sqrt(abar_t) * original + sqrt(1 - abar_t) * noise`` at ``timesteps[step_index]``."""
        t = int(self._all_timesteps[self._index(step_index)])
        abar = self.alphas_cumprod.to(original.dtype)[t]
        return abar**0.5 * original + (1 - abar) ** 0.5 * noise


# ----------------------------------------------------------------------------- Euler


class EulerScheduler(_DiscreteScheduler):
    """Euler sampling of the variance-exploding ODE; diffusers' ``EulerDiscreteScheduler``.

    Latents live at scale ``sqrt(sigma^2 + 1)``: fresh noise is multiplied by ``init_noise_sigma``
    and the U-Net sees ``scale_model_input(x, i) = x / sqrt(sigma_i^2 + 1)``. Sigmas are interpolated
    linearly between the training timesteps, or with ``use_karras_sigmas`` respaced as Karras et al.
    (rho 7) between the schedule's smallest and largest sigma, the timesteps then being fractional.
    """

    name = "euler"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
        use_karras_sigmas: bool = False,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self.use_karras_sigmas = self._bool_option("use_karras_sigmas", use_karras_sigmas)

    def _schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        total = self.num_train_timesteps
        if self.timestep_spacing == "linspace":  # not rounded: fractional timesteps
            ts = np.linspace(0, total - 1, n)[::-1].astype(np.float32)
        else:
            ts = spaced_timesteps(
                n, num_train_timesteps=total, timestep_spacing=self.timestep_spacing, steps_offset=self.steps_offset
            ).astype(np.float32)
        train = self._train_sigmas().numpy()
        sigmas = np.interp(ts, np.arange(0, len(train)), train)
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), n)
            ts = sigmas_to_timesteps(sigmas, np.log(train)).astype(np.float32)
        return ts, np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        denoising_strength: float = 1.0,
        image_seq_len: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().set_timesteps(
            num_inference_steps, denoising_strength=denoising_strength, image_seq_len=image_seq_len, device=device
        )
        top = self._all_sigmas.max()
        self.init_noise_sigma = float(top if self.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5)

    def _sigma(self, step_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._index(step_index)
        return self._all_sigmas[index], self._all_sigmas[index + 1]

    def scale_model_input(self, sample: torch.Tensor, step_index: int) -> torch.Tensor:
        """``sample / sqrt(sigma^2 + 1)``: the variance-preserving input the U-Net was trained on."""
        sigma, _ = self._sigma(step_index)
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step from ``sigmas[step_index]`` to ``sigmas[step_index + 1]`` (float32 inside)."""
        sigma, sigma_next = self._sigma(step_index)
        x, out = sample.float(), model_output.float()
        if self.prediction_type == "epsilon":
            x0 = x - sigma * out
        else:
            x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        slope = (x - x0) / sigma
        return (x + slope * (sigma_next - sigma)).to(sample.dtype)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, step_index: int = 0) -> torch.Tensor:
        """``original + sigma * noise`` at ``sigmas[step_index]`` (the unscaled latents Euler walks)."""
        index = self._index(step_index)
        sigma = self._all_sigmas.to(device=original.device, dtype=original.dtype)[index]
        return original + noise * sigma


# ----------------------------------------------------------------------------- DPM-Solver++ 2M


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The variance-preserving ``(alpha_t, sigma_t) = (1, sigma) / sqrt(sigma^2 + 1)``."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def _half_log_snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(alpha) - torch.log(sigma)


class DPMPP2MScheduler(_DiscreteScheduler):
    """DPM-Solver++ 2M (Lu et al. 2022): multistep, data prediction, midpoint second-order update;
    diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", lower_order_final=True)``.

    The first step taken is first order (no history yet), and so is the last one (it lands on sigma 0).
    Steps must be taken in order; :meth:`set_timesteps` forgets the history. ``use_karras_sigmas``
    respaces the sigmas as Karras et al. (rho 7) over the whole training range, with timesteps
    rounded to integers.
    """

    name = "dpmpp-2m"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
        use_karras_sigmas: bool = False,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self.use_karras_sigmas = self._bool_option("use_karras_sigmas", use_karras_sigmas)
        self._previous: tuple[int, torch.Tensor] | None = None  # (full-schedule index, x0 prediction)

    def _schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        ts = spaced_timesteps(
            n, num_train_timesteps=self.num_train_timesteps, timestep_spacing=self.timestep_spacing,
            steps_offset=self.steps_offset, one_more=True,
        )
        train = self._train_sigmas().numpy()
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(train[0].item(), train[-1].item(), n)
            ts = np.round(sigmas_to_timesteps(sigmas, np.log(train))).astype(np.int64)
        else:
            sigmas = np.interp(ts, np.arange(0, len(train)), train)
        return ts, np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def _reset(self) -> None:
        self._previous = None

    def _data_prediction(self, model_output: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
        alpha, sigma = _alpha_sigma(self._all_sigmas[index])
        if self.prediction_type == "epsilon":
            return (sample - sigma * model_output) / alpha
        return alpha * sample - sigma * model_output

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """One DPM-Solver++ step from ``sigmas[step_index]`` to ``sigmas[step_index + 1]``."""
        index = self._index(step_index)
        x = sample.float()
        x0 = self._data_prediction(model_output.float(), x, index)
        previous = None if step_index == 0 else self._previous  # step 0 always starts afresh
        if step_index > 0 and (previous is None or previous[0] != index - 1):
            done = "no step" if previous is None else f"step {previous[0] - self._start}"
            raise ConfigError(
                f"dpmpp-2m: step {step_index} was asked for after {done}; a multistep solver takes its steps in "
                f"order 0, 1, 2, ... (call set_timesteps, or step 0, to start again)"
            )
        self._previous = (index, x0)
        sigmas = self._all_sigmas
        alpha_t, sigma_t = _alpha_sigma(sigmas[index + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(sigmas[index])
        lambda_t, lambda_s0 = _half_log_snr(alpha_t, sigma_t), _half_log_snr(alpha_s0, sigma_s0)
        h = lambda_t - lambda_s0
        decay = alpha_t * (torch.exp(-h) - 1.0)
        last = index == len(self._all_timesteps) - 1
        if previous is None or last:  # first order: DPM-Solver++ 1 (= DDIM in data prediction)
            prev = (sigma_t / sigma_s0) * x - decay * x0
        else:  # second order, midpoint: the slope of x0 over lambda from the last two predictions
            alpha_s1, sigma_s1 = _alpha_sigma(sigmas[index - 1])
            h_0 = lambda_s0 - _half_log_snr(alpha_s1, sigma_s1)
            r0 = h_0 / h
            d1 = (1.0 / r0) * (x0 - previous[1])
            prev = (sigma_t / sigma_s0) * x - decay * x0 - 0.5 * decay * d1
        return prev.to(sample.dtype)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, step_index: int = 0) -> torch.Tensor:
        """``alpha_t * original + sigma_t * noise`` at ``sigmas[step_index]`` (variance preserving)."""
        index = self._index(step_index)
        sigma = self._all_sigmas.to(device=original.device, dtype=original.dtype)[index]
        alpha, sigma_t = _alpha_sigma(sigma)
        return alpha * original + sigma_t * noise

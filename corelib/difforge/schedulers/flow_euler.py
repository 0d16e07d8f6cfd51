"""First-order Euler sampling of flow-matching models (FLUX.1, Qwen-Image, Wan, SD3).

The sampler walks the sigma ladder ``1 = sigma_0 > sigma_1 > ... > sigma_N = 0`` with
``x <- x + (sigma_{i+1} - sigma_i) * v(x, sigma_i)``. All the model-specific knowledge is in the
ladder: a base grid bent towards high noise by a shift, which is either static
(``s -> shift * s / (1 + (shift - 1) * s)``) or follows the image size (FLUX.1-dev, Qwen-Image:
``s -> e^mu / (e^mu + 1/s - 1)``, ``mu`` linear in the number of image tokens), optionally
stretched so that its last non-zero sigma is ``shift_terminal`` (Qwen-Image).

The ladders are computed the way diffusers' pipelines compute them, in the same floating-point
precision and order, so that sigmas and timesteps agree with diffusers bit for bit:

* ``spacing="flux"``: the base grid is ``linspace(1, 1/N, N)`` in float32, which
  ``FluxPipeline``, ``QwenImagePipeline`` and their img2img variants pass as ``sigmas=``;
* ``spacing="sd3"``: the base grid spans ``[sigma_max, sigma_min]`` of the shifted 1000-step training
  schedule in float64, which ``FlowMatchEulerDiscreteScheduler.set_timesteps(N)`` makes when a
  pipeline passes only the number of steps (``StableDiffusion3Pipeline``, ``WanPipeline``). The shift
  is then applied a second time, as diffusers does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from . import _check_steps, _too_weak

__all__ = ["FlowEulerScheduler", "calculate_mu", "flow_sigmas", "img2img_start"]

SPACINGS = ("flux", "sd3")
TIME_SHIFT_TYPES = ("exponential", "linear")


def calculate_mu(
    image_seq_len: int,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """``mu`` of the resolution-dependent shift: the line through ``(base_image_seq_len, base_shift)``
    and ``(max_image_seq_len, max_shift)`` evaluated at ``image_seq_len`` (not clamped)."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    intercept = base_shift - slope * base_image_seq_len
    return image_seq_len * slope + intercept


def _shift(
    s: np.ndarray, *, shift: float, mu: float | None, time_shift_type: str, dtype: type
) -> np.ndarray:
    """Bend the grid ``s`` towards high noise: statically by ``shift``, or by ``mu`` when it is given."""
    one = dtype(1)
    if mu is None:
        return dtype(shift) * s / (one + dtype(shift - 1) * s)
    odds = one / s - one  # (1 - s) / s
    scale = dtype(math.exp(mu)) if time_shift_type == "exponential" else dtype(mu)
    return scale / (scale + odds)


def _stretch_to_terminal(s: np.ndarray, terminal: float, dtype: type) -> np.ndarray:
    """Stretch ``1 - s`` so that the last sigma becomes ``terminal`` (the first stays where it is).

    A one-sigma ladder at ``s = 1`` cannot be stretched (diffusers returns NaN there); it is kept.
    """
    one = dtype(1)
    one_minus = one - s
    if one_minus[-1] == 0:
        return s
    return one - one_minus / (one_minus[-1] / dtype(1 - terminal))


def flow_sigmas(
    num_inference_steps: int,
    *,
    spacing: str = "flux",
    shift: float = 1.0,
    mu: float | None = None,
    time_shift_type: str = "exponential",
    shift_terminal: float | None = None,
    num_train_timesteps: int = 1000,
) -> np.ndarray:
    """The ``N`` non-terminal sigmas (float32, decreasing) of the full ladder, before any img2img cut.

    ``mu`` given: resolution-dependent shift (``shift`` unused); otherwise static ``shift``.
    """
    n, total = num_inference_steps, num_train_timesteps
    if spacing == "flux":
        dtype: type = np.float32
        s = np.linspace(1.0, 1.0 / n, n).astype(np.float32)
    elif spacing == "sd3":
        dtype = np.float64
        # The ends of the 1000-step training ladder, kept in float32 like the ladder itself; the
        # static shift is already in them (a dynamic one is applied later only).
        ends = torch.tensor([float(total), 1.0], dtype=torch.float32) / total
        if mu is None:
            ends = shift * ends / (1 + (shift - 1) * ends)
        sigma_max, sigma_min = ends.tolist()
        s = np.linspace(sigma_max * total, sigma_min * total, n) / total
    else:
        raise ConfigError(f"spacing must be one of {', '.join(map(repr, SPACINGS))}, got {spacing!r}")
    s = _shift(s, shift=shift, mu=mu, time_shift_type=time_shift_type, dtype=dtype)
    if shift_terminal:
        s = _stretch_to_terminal(s, shift_terminal, dtype)
    return s.astype(np.float32)


def img2img_start(num_inference_steps: int, denoising_strength: float) -> int:
    """The first step an img2img run takes: the last ``num_inference_steps * strength`` steps run.

    Rounds as diffusers' Flux, Qwen-Image and SD3 img2img pipelines do (``int`` of the skipped
    part, so the number of steps run is rounded up).
    """
    run = min(num_inference_steps * denoising_strength, num_inference_steps)
    return int(max(num_inference_steps - run, 0))


class FlowEulerScheduler:
    """Euler sampler for flow-matching models; diffusers' ``FlowMatchEulerDiscreteScheduler``.

    Options (the names of the ``flow-euler`` :class:`~difforge.SchedulerSpec`):

    * ``shift``: static shift (FLUX.1-schnell 1.0, SD3 3.0, Wan 5.0); None means 1.0. Unused when
      ``dynamic_shift`` is on.
    * ``dynamic_shift``: resolution-dependent shift; ``mu`` comes from ``image_seq_len`` through
      ``base_shift``/``max_shift`` at ``base_image_seq_len``/``max_image_seq_len``
      (FLUX.1-dev: 0.5/1.15 at 256/4096; Qwen-Image: 0.5/0.9 at 256/8192).
    * ``time_shift_type``: ``"exponential"`` (``e^mu``, diffusers' default) or ``"linear"`` (``mu``).
    * ``shift_terminal``: stretch the ladder so its last sigma is this (Qwen-Image: 0.02).
    * ``spacing``: the base grid, ``"flux"`` or ``"sd3"`` (see the module docstring).
    * ``num_train_timesteps``: timestep units per unit sigma (1000).
    """

    order = 1

    def __init__(
        self,
        shift: float | None = None,
        dynamic_shift: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        num_train_timesteps: int = 1000,
        spacing: str = "flux",
    ) -> None:
        if shift is not None and not float(shift) > 0:
            raise ConfigError(f"flow-euler option shift must be positive, got {shift!r}")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ConfigError(
                f"flow-euler option time_shift_type must be one of {', '.join(map(repr, TIME_SHIFT_TYPES))}, "
                f"got {time_shift_type!r}"
            )
        if shift_terminal is not None and not 0.0 <= float(shift_terminal) < 1.0:
            raise ConfigError(f"flow-euler option shift_terminal must be in [0, 1), got {shift_terminal!r}")
        if spacing not in SPACINGS:
            choices = ", ".join(map(repr, SPACINGS))
            raise ConfigError(f"flow-euler option spacing must be one of {choices}, got {spacing!r}")
        if dynamic_shift and base_image_seq_len == max_image_seq_len:
            raise ConfigError("flow-euler options base_image_seq_len and max_image_seq_len must differ")
        if int(num_train_timesteps) < 1:
            raise ConfigError(f"flow-euler option num_train_timesteps must be positive, got {num_train_timesteps!r}")
        self.shift = 1.0 if shift is None else float(shift)
        self.dynamic_shift = bool(dynamic_shift)
        self.base_shift, self.max_shift = float(base_shift), float(max_shift)
        self.base_image_seq_len, self.max_image_seq_len = int(base_image_seq_len), int(max_image_seq_len)
        self.time_shift_type = time_shift_type
        self.shift_terminal = None if shift_terminal is None else float(shift_terminal)
        self.num_train_timesteps = int(num_train_timesteps)
        self.spacing = spacing
        self.mu: float | None = None
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._sigmas = torch.empty(0)  # float32 on the CPU: step arithmetic reads scalars from here

    def __repr__(self) -> str:
        shift = "dynamic" if self.dynamic_shift else self.shift
        return f"{type(self).__name__}(shift={shift}, spacing={self.spacing!r}, steps={len(self.timesteps)})"

    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        denoising_strength: float = 1.0,
        image_seq_len: int | None = None,
        device: Any = None,
    ) -> None:
        """Compute ``sigmas``/``timesteps`` for ``num_inference_steps`` (cut for img2img).

        ``image_seq_len`` (the number of image tokens the model sees) is needed with ``dynamic_shift``.
        """
        n, strength = _check_steps(num_inference_steps, denoising_strength)
        self.mu = None
        if self.dynamic_shift:
            if image_seq_len is None:
                raise ConfigError(
                    "flow-euler with dynamic_shift needs image_seq_len (the number of image tokens) in set_timesteps"
                )
            self.mu = calculate_mu(
                image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift
            )
        sigmas = flow_sigmas(
            n,
            spacing=self.spacing,
            shift=self.shift,
            mu=self.mu,
            time_shift_type=self.time_shift_type,
            shift_terminal=self.shift_terminal,
            num_train_timesteps=self.num_train_timesteps,
        )
        start = img2img_start(n, strength)
        if start >= n:
            raise _too_weak(n, strength)
        sigmas = torch.from_numpy(sigmas[start:])
        self.timesteps = (sigmas * self.num_train_timesteps).to(device)
        self._sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self.sigmas = self._sigmas.to(device)

    def _sigma(self, step_index: int) -> torch.Tensor:
        if not 0 <= step_index < len(self._sigmas) - 1:
            raise ConfigError(
                f"step_index {step_index} is outside the {len(self._sigmas) - 1} steps set by set_timesteps"
            )
        return self._sigmas[step_index]

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step from ``sigmas[step_index]`` to ``sigmas[step_index + 1]`` (float32 inside)."""
        sigma = self._sigma(step_index)
        dt = self._sigmas[step_index + 1] - sigma
        return (sample.float() + dt * model_output.float()).to(sample.dtype)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, step_index: int = 0) -> torch.Tensor:
        """``x`` at ``sigmas[step_index]``: ``sigma * noise + (1 - sigma) * original``."""
        sigma = self._sigma(step_index)
        return (sigma * noise.float() + (1.0 - sigma) * original.float()).to(original.dtype)

    def training_target(self, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The flow-matching velocity ``noise - sample``."""
        return noise - sample

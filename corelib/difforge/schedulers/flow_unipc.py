"""UniPC multistep sampling of flow-matching models (the Wan 2.1 / 2.2 default sampler).

UniPC (Zhao et al. 2023, https://arxiv.org/abs/2302.04867) is a predictor-corrector solver of the
probability-flow ODE written in ``lambda = log((1 - sigma) / sigma)``. With a flow model the data
prediction is ``x0 = x - sigma * v``; from the last ``p`` of them the predictor (UniP) extrapolates to
the next sigma, and once the model has been evaluated there, the corrector (UniC) refines that
sample with the new prediction before the next predictor step. This is the ``bh2`` variant
(``B(h) = e^h - 1``) in data-prediction form, as Wan's own sampler and diffusers'
``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)`` run it:

* sigmas: ``linspace(1, 1/1000, N + 1)[:-1]``, statically shifted by ``shift`` (Wan's
  ``flow_shift``), the first one pulled just below 1 (``1 - 1e-6``) so ``lambda`` stays finite, then a
  terminal 0;
* timesteps: ``sigma * 1000`` truncated to whole numbers (the model sees integer timesteps);
* the order warms up (1, 2, ..., ``solver_order``) and drops to 1 on the final step, and to at most
  ``N - i`` on step ``i`` (diffusers' ``lower_order_final``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from . import _check_steps, _too_weak

__all__ = ["FlowUniPCScheduler", "unipc_sigmas", "video2video_start"]


def unipc_sigmas(num_inference_steps: int, *, shift: float = 1.0, num_train_timesteps: int = 1000) -> np.ndarray:
    """The ``N`` non-terminal sigmas of the ladder, in float64 (timesteps are cut from these)."""
    s = np.linspace(1.0, 1.0 / num_train_timesteps, num_inference_steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    if abs(s[0] - 1.0) < 1e-6:
        s[0] -= 1e-6  # lambda(1) = -inf
    return s


def video2video_start(num_inference_steps: int, denoising_strength: float) -> int:
    """The first step of a partial run, rounded as diffusers' ``WanVideoToVideoPipeline`` does
    (``int`` of the steps run, so that number is rounded down)."""
    run = min(int(num_inference_steps * denoising_strength), num_inference_steps)
    return max(num_inference_steps - run, 0)


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """``lambda = log(alpha / sigma)`` with ``alpha = 1 - sigma`` (log signal-to-noise ratio / 2)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class FlowUniPCScheduler:
    """UniPC (bh2, predictor + corrector) on flow-prediction sigmas.

    Options (the names of the ``flow-unipc`` :class:`~difforge.SchedulerSpec`):

    * ``shift``: static flow shift (Wan's ``flow_shift``: 3.0 for 480p, 5.0 for 720p);
    * ``solver_order``: the number of past data predictions the predictor uses (2);
    * ``num_train_timesteps``: timestep units per unit sigma (1000).

    Steps must be taken in order ``0, 1, 2, ...``; step 0 (and :meth:`set_timesteps`) starts afresh.
    """

    order = 1  # one model evaluation per step

    def __init__(self, shift: float | None = 1.0, solver_order: int = 2, num_train_timesteps: int = 1000) -> None:
        if shift is not None and not float(shift) > 0:
            raise ConfigError(f"flow-unipc option shift must be positive, got {shift!r}")
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or not 1 <= solver_order <= 3:
            raise ConfigError(f"flow-unipc option solver_order must be 1, 2 or 3, got {solver_order!r}")
        if int(num_train_timesteps) < 1:
            raise ConfigError(f"flow-unipc option num_train_timesteps must be positive, got {num_train_timesteps!r}")
        self.shift = 1.0 if shift is None else float(shift)
        self.solver_order = solver_order
        self.num_train_timesteps = int(num_train_timesteps)
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._sigmas = torch.empty(0)  # float32 on the CPU: the solver coefficients are computed from these
        self._reset()

    def __repr__(self) -> str:
        name, steps = type(self).__name__, len(self.timesteps)
        return f"{name}(shift={self.shift}, solver_order={self.solver_order}, steps={steps})"

    def _reset(self) -> None:
        self._x0: list[torch.Tensor] = []  # the latest data predictions, oldest first
        self._last_sample: torch.Tensor | None = None  # the sample the last predictor started from
        self._last_order = 0
        self._next = 0

    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        denoising_strength: float = 1.0,
        image_seq_len: int | None = None,
        device: Any = None,
    ) -> None:
        """Compute ``sigmas``/``timesteps`` (cut for video2video) and forget the solver history.

        ``image_seq_len`` is accepted for interface compatibility and unused (the shift is static).
        """
        n, strength = _check_steps(num_inference_steps, denoising_strength)
        sigmas = unipc_sigmas(n, shift=self.shift, num_train_timesteps=self.num_train_timesteps)
        timesteps = np.trunc(sigmas * self.num_train_timesteps)
        start = video2video_start(n, strength)
        if start >= n:
            raise _too_weak(n, strength)
        self.timesteps = torch.from_numpy(timesteps[start:].astype(np.float32)).to(device)
        self._sigmas = torch.from_numpy(np.append(sigmas[start:], 0.0).astype(np.float32))
        self.sigmas = self._sigmas.to(device)
        self._reset()

    def _coefficients(self, t: int, s0: int, history: list[int], order: int) -> tuple:
        """The UniPC weights for a step from ``sigmas[s0]`` to ``sigmas[t]``.

        ``history``: the indices of the older predictions used (most recent first). Returns the
        scalars ``sigma_t / sigma_s0``, ``alpha_t * (e^{-h} - 1)`` (times ``x0_s0``), ``alpha_t * B(h)``,
        the ratios ``r_k``, and the vectors ``b`` and ``R`` of the order conditions ``R rho = b``.
        """
        sig = self._sigmas
        sigma_t, sigma_s0 = sig[t], sig[s0]
        alpha_t = 1 - sigma_t
        lam_s0 = _lam(sigma_s0)
        h = _lam(sigma_t) - lam_s0
        ratios = [(_lam(sig[k]) - lam_s0) / h for k in history]
        hh = -h  # data prediction
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)  # bh2
        rks = torch.stack([*ratios, torch.ones(())])
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        R, b = [], []
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h, ratios, torch.stack(b), torch.stack(R)

    def _weighted_differences(self, rhos: torch.Tensor, ratios: list[torch.Tensor]) -> torch.Tensor | int:
        """``sum_k rho_k (x0_k - x0_s0) / r_k`` over the older predictions (``x0_s0 = self._x0[-1]``)."""
        if not ratios:
            return 0
        diffs = torch.stack([(self._x0[-(k + 2)] - self._x0[-1]) / r for k, r in enumerate(ratios)])
        return torch.einsum("k,k...->...", rhos.to(diffs.device), diffs)

    def _predict(self, sample: torch.Tensor, i: int, order: int) -> torch.Tensor:
        """UniP: from ``sigmas[i]`` (with ``self._x0[-1]`` its data prediction) to ``sigmas[i + 1]``."""
        history = [i - k for k in range(1, order)]
        scale, c0, cb, ratios, b, R = self._coefficients(i + 1, i, history, order)
        x = scale * sample - c0 * self._x0[-1]
        if order == 1:
            return x
        rhos = torch.full((1,), 0.5) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        return x - cb * self._weighted_differences(rhos, ratios)

    def _correct(self, sample: torch.Tensor, x0_new: torch.Tensor, i: int, order: int) -> torch.Tensor:
        """UniC: redo the step ``sigmas[i - 1] -> sigmas[i]`` using the new prediction ``x0_new`` too."""
        history = [i - 1 - k for k in range(1, order)]
        scale, c0, cb, ratios, b, R = self._coefficients(i, i - 1, history, order)
        x = scale * self._last_sample - c0 * self._x0[-1]
        rhos = torch.full((1,), 0.5) if order == 1 else torch.linalg.solve(R, b)
        correction = self._weighted_differences(rhos[:-1], ratios) + rhos[-1] * (x0_new - self._x0[-1])
        return x - cb * correction

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """Correct ``sample`` with the new model output, then predict the sample at the next sigma."""
        n = len(self._sigmas) - 1
        if step_index == 0:
            self._reset()
        if step_index != self._next or not 0 <= step_index < n:
            raise ConfigError(
                f"flow-unipc is a multistep solver: steps run in order 0..{n - 1}; got step_index {step_index} "
                f"where {self._next} was due (call set_timesteps to start again)"
            )
        dtype = sample.dtype
        sample = sample.float()
        x0 = sample - self._sigmas[step_index] * model_output.float()
        if self._last_sample is not None:
            sample = self._correct(sample, x0, step_index, self._last_order)
        self._x0 = [*self._x0, x0][-self.solver_order :]
        order = min(self.solver_order, n - step_index, len(self._x0))
        self._last_sample, self._last_order = sample, order
        self._next = step_index + 1
        return self._predict(sample, step_index, order).to(dtype)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, step_index: int = 0) -> torch.Tensor:
        """``x`` at ``sigmas[step_index]``: ``(1 - sigma) * original + sigma * noise``."""
        if not 0 <= step_index < len(self._sigmas) - 1:
            raise ConfigError(f"step_index {step_index} is outside the steps set by set_timesteps")
        sigma = self._sigmas[step_index]
        return ((1 - sigma) * original.float() + sigma * noise.float()).to(original.dtype)

    def training_target(self, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The flow-matching velocity ``noise - sample``."""
        return noise - sample

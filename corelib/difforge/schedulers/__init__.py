"""Samplers for flow-matching models, and :func:`build_scheduler`, which makes one from a plugin name.

Every scheduler integrates the probability-flow ODE of rectified flow, ``x_sigma = sigma * noise +
(1 - sigma) * x0``, from ``sigma = 1`` (noise) to ``0`` (data), with the model predicting the
velocity ``v = noise - x0``. A scheduler follows :class:`Scheduler`: the pipeline calls
:meth:`~Scheduler.set_timesteps` once per generation, then :meth:`~Scheduler.step` for
``i = 0, 1, ..., len(timesteps) - 1`` with the model evaluated at ``timesteps[i]``.

The built-in schedulers (``flow-euler``, ``flow-unipc``) reproduce diffusers'
``FlowMatchEulerDiscreteScheduler`` and flow-prediction ``UniPCMultistepScheduler`` as the Flux,
Qwen-Image and Wan pipelines of diffusers drive them, to float32 rounding.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import ConfigError, closest

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Scheduler", "build_scheduler"]

logger = logging.getLogger("difforge.schedulers")


@runtime_checkable
class Scheduler(Protocol):
    """What a pipeline needs from a sampler.

    ``timesteps`` (``[N]`` float32, in the model's timestep units, ``sigma * num_train_timesteps``)
    and ``sigmas`` (``[N + 1]`` float32, ending with the terminal sigma 0) are set by
    :meth:`set_timesteps`. With ``denoising_strength < 1`` both are already cut to the steps that
    run, so step ``0`` is always the first step taken.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        denoising_strength: float = 1.0,
        image_seq_len: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Prepare the schedule of one generation (and forget any multistep history)."""

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """Advance ``sample`` from ``sigmas[step_index]`` to ``sigmas[step_index + 1]``."""

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, step_index: int = 0) -> torch.Tensor:
        """``x`` at ``sigmas[step_index]``: ``sigma * noise + (1 - sigma) * original`` (img2img start)."""

    def training_target(self, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity a flow-matching model is trained to predict: ``noise - sample``."""


def build_scheduler(
    scheduler: str | Mapping[str, Any] | None,
    *,
    family: str | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Scheduler:
    """Build a scheduler from a registered :class:`~difforge.SchedulerSpec`.

    ``scheduler`` is a name (``"flow-euler"``, ``"flow-euler@builtin"``), a dict
    ``{"name": ..., **options}``, or None for the default: ``defaults["name"]`` if given, else
    ``flow-euler``. Options are merged as ``spec.options`` <- ``defaults`` <- the user's options.
    The user's options must all be known to the spec (a :class:`~difforge.ConfigError` names the
    unknown one and lists the known ones); ``defaults`` (a pipeline's own choice, possibly made for
    another scheduler) only fill the options the spec knows. A static ``shift`` given by the user
    turns off a ``dynamic_shift`` that came from the spec or ``defaults``.

    ``family``: the model family of the pipeline; a scheduler whose spec does not fit it is refused.
    """
    from .. import get_registry
    from .._names import resolve

    name, user = _parse_choice(scheduler, defaults)
    spec = get_registry().schedulers.get(name)
    if family is not None and not spec.fits(family):
        raise ConfigError(
            f"scheduler {spec.name!r} does not fit model family {family!r}; it is made for: "
            f"{', '.join(spec.families)}. Choose another scheduler (`difforge plugins` lists them)."
        )
    known = dict(spec.options)
    for key in user:
        if key not in known:
            hint = closest(key, known)
            raise ConfigError(
                f"unknown option {key!r} for scheduler {spec.name!r}."
                + (f" Did you mean {hint!r}?" if hint else "")
                + f" Known options: {', '.join(known) if known else '(none)'}."
            )
    options = dict(known)
    options.update({k: v for k, v in (defaults or {}).items() if k in known})
    options.update(user)
    if "shift" in user and user["shift"] is not None and "dynamic_shift" not in user and options.get("dynamic_shift"):
        logger.info("scheduler %s: static shift %s replaces the default dynamic shift", spec.name, user["shift"])
        options["dynamic_shift"] = False
    factory = resolve(spec.factory)
    return factory(**options)


def _parse_choice(
    scheduler: str | Mapping[str, Any] | None, defaults: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """``(name, user options)`` from the forms ``build_scheduler`` accepts."""
    if scheduler is None:
        name = (defaults or {}).get("name") or "flow-euler"
        return str(name), {}
    if isinstance(scheduler, str):
        return scheduler, {}
    if isinstance(scheduler, Mapping):
        options = dict(scheduler)
        name = options.pop("name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"a scheduler given as a dict needs a 'name' entry, e.g. {{'name': 'flow-euler', 'shift': 3.0}}; "
                f"got {dict(scheduler)!r}"
            )
        return name, options
    raise ConfigError(
        f"scheduler must be a name or a dict {{'name': ..., **options}}, not {type(scheduler).__name__} {scheduler!r}"
    )


def _check_steps(num_inference_steps: Any, denoising_strength: Any) -> tuple[int, float]:
    """Validated ``(num_inference_steps, denoising_strength)``, shared by the built-in schedulers."""
    try:
        steps = operator.index(num_inference_steps)
    except TypeError:
        steps = 0
    if isinstance(num_inference_steps, bool) or steps < 1:
        raise ConfigError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    strength = float(denoising_strength)
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"denoising_strength must be in (0, 1], got {denoising_strength!r}")
    return steps, strength


def _too_weak(num_inference_steps: int, strength: float) -> ConfigError:
    return ConfigError(
        f"denoising_strength={strength} leaves no step to run out of num_inference_steps={num_inference_steps}; "
        f"raise denoising_strength or num_inference_steps"
    )

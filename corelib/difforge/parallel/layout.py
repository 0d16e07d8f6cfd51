"""How ``parallelism=N`` is split into CFG-parallel, Ulysses and ring degrees, and the checks on a layout
that run before any weights are read."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["ParallelLayout", "default_uses_cfg", "plan_layout", "check_devices", "check_denoiser", "model_heads"]


@dataclass(frozen=True)
class ParallelLayout:
    """``cfg * ulysses * ring`` processes. Rank ``r`` is CFG rank ``r // ulysses`` and Ulysses rank
    ``r % ulysses`` (the Ulysses group of a CFG branch is a run of consecutive ranks)."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses * self.ring

    def describe(self) -> str:
        return f"{self.world_size} processes: cfg_parallel={self.cfg}, ulysses_degree={self.ulysses}, ring_degree={self.ring}"


def _degree(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1 (or None), got {value!r}")
    return value


def plan_layout(
    parallelism: Any = None,
    cfg_parallel: Any = None,
    ulysses_degree: Any = None,
    ring_degree: Any = None,
    *,
    uses_cfg: bool = False,
    pipeline: str = "pipeline",
) -> ParallelLayout | None:
    """The layout asked for, or None for one process.

    ``parallelism = cfg_parallel * ulysses_degree * ring_degree``. Given only ``parallelism``, CFG
    parallel takes 2 of it when the pipeline runs true CFG by default (``uses_cfg``) and ``N`` is even,
    and Ulysses the rest; the choice is logged. A degree given alone fixes ``parallelism``.
    """
    n = _degree("parallelism", parallelism)
    cfg = _degree("cfg_parallel", cfg_parallel)
    uly = _degree("ulysses_degree", ulysses_degree)
    ring = _degree("ring_degree", ring_degree)
    if n is None and cfg is None and uly is None and ring is None:
        return None
    if ring is not None and ring > 1:
        raise ConfigError(
            f"ring_degree={ring}: ring attention is not implemented in difforge; "
            "use ulysses_degree (and cfg_parallel) for sequence parallelism, with ring_degree=1 or None"
        )
    ring = 1
    if cfg is not None and cfg > 2:
        raise ConfigError(
            f"cfg_parallel={cfg}: classifier-free guidance has two branches, so cfg_parallel is 1 or 2; "
            "put the other processes into ulysses_degree"
        )
    if n is None:
        layout = ParallelLayout(cfg or 1, uly or 1, ring)
    else:
        if cfg is None and uly is None:
            cfg = 2 if uses_cfg and n % 2 == 0 else 1
            uly = n // cfg
            log.info(
                "parallelism=%d for %s: cfg_parallel=%d, ulysses_degree=%d (%s)", n, pipeline, cfg, uly,
                "true CFG is its default" if cfg == 2 else "no CFG by default, or an odd count",
            )
        elif cfg is None:
            if n % uly:
                raise ConfigError(f"parallelism={n} is not a multiple of ulysses_degree={uly}; give parallelism = cfg_parallel * ulysses_degree")
            cfg = n // uly
            if cfg > 2:
                raise ConfigError(
                    f"parallelism={n} with ulysses_degree={uly} leaves cfg_parallel={cfg}, but it can be at most 2; "
                    f"use ulysses_degree={n // 2} or {n}"
                )
        elif uly is None:
            if n % cfg:
                raise ConfigError(f"parallelism={n} is not a multiple of cfg_parallel={cfg}; give parallelism = cfg_parallel * ulysses_degree")
            uly = n // cfg
        layout = ParallelLayout(cfg, uly, ring)
        if layout.world_size != n:
            raise ConfigError(
                f"parallelism={n} is not cfg_parallel * ulysses_degree * ring_degree = {cfg} * {uly} * {ring}; "
                "make them agree, or give only parallelism"
            )
    if layout.world_size == 1:
        return None
    return layout


def check_devices(layout: ParallelLayout, device: torch.device, *, world_size_hint: int | None = None) -> None:
    """More ranks than CUDA devices, or a device index with several processes, is refused."""
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"device={str(device)!r} with {layout.world_size} processes: give device='cuda'; "
                "rank r then uses cuda:r (under torchrun, cuda:LOCAL_RANK)"
            )
        count = torch.cuda.device_count()
        if layout.world_size > count and world_size_hint is None:
            raise ConfigError(
                f"{layout.describe()}, but only {count} CUDA device(s) are visible; "
                f"lower parallelism to at most {count} (one process per GPU)"
            )
    elif device.type != "cpu":
        raise ConfigError(f"parallel runs on 'cuda' (nccl) or 'cpu' (gloo) devices, not {device.type!r}")


def model_heads(config: Any) -> int | None:
    """The attention head count a DiT config declares (``num_heads``, ``num_attention_heads`` or ``heads``)."""
    for attr in ("num_heads", "num_attention_heads", "heads", "n_heads"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def check_denoiser(layout: ParallelLayout, model_name: str, model_cls: type, config: Any) -> None:
    """Ulysses needs a DiT that opted in (see PLUGINS.md) and a head count divisible by its degree."""
    if layout.ulysses == 1:
        return
    if not getattr(getattr(model_cls, "forward", None), "_difforge_sequence_parallel", False):
        raise ConfigError(
            f"ulysses_degree={layout.ulysses}: model {model_name!r} ({model_cls.__name__}) does not support "
            "sequence parallelism (its forward is not marked with difforge.parallel.sequence_parallel); "
            "use cfg_parallel only, or ask its plugin's author to opt in"
        )
    heads = model_heads(config)
    if heads is None:
        raise ConfigError(f"ulysses_degree={layout.ulysses}: cannot tell the head count of {model_name!r} from its config")
    if heads % layout.ulysses:
        raise ConfigError(
            f"ulysses_degree={layout.ulysses} does not divide the {heads} attention heads of {model_name!r}; "
            f"choose a ulysses_degree that divides {heads}"
        )


class _Probe:
    """Stands in for a pipeline instance when a family computes its ``defaults`` in a property (Wan's
    depend on the checkpoint): every attribute is another probe, falsy and equal to nothing."""

    def __getattr__(self, name: str) -> _Probe:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _Probe:
        return self

    def __bool__(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__


def default_uses_cfg(pipeline_cls: type) -> bool:
    """Whether ``pipeline_cls`` runs true classifier-free guidance by default (``cfg_scale`` != 1),
    read before any instance exists; False when it cannot be told."""
    defaults: Any = None
    for klass in pipeline_cls.__mro__:
        if "defaults" in klass.__dict__:
            defaults = klass.__dict__["defaults"]
            break
    try:
        if isinstance(defaults, property) and defaults.fget is not None:
            defaults = defaults.fget(_Probe())
        return float(defaults.get("cfg_scale", 1.0)) != 1.0
    except Exception:  # noqa: BLE001 - an unusual property: no CFG split by default
        log.debug("cannot read the default cfg_scale of %s", pipeline_cls.__name__, exc_info=True)
        return False

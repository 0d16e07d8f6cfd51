"""The hook specifications: the whole contract between difforge and its plugins.

A plugin is a module (found through the ``difforge`` entry-point group) with functions marked
``@difforge.hookimpl`` whose names are the hooks below. pluggy passes an implementation only the
arguments it names, so hooks only ever grow by opt-in arguments and old plugins keep working.

The six registration hooks are *collect-all*: every plugin's implementation is called once when
the registry is built, and each returns an iterable of frozen spec objects
(:mod:`difforge.specs`). They must be cheap and import nothing heavy: name torch modules and
kernels by lazy ``"package.module:attribute"`` strings. An implementation that raises, or yields
something that is not the hook's spec type, marks its whole plugin as broken; nothing of that
plugin is registered.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .specs import (
        AttentionSpec,
        CacheSpec,
        ConverterSpec,
        ModelSpec,
        OffloadSpec,
        PipelineSpec,
        SchedulerSpec,
    )

PROJECT = "difforge"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------- registration (collect-all)


@hookspec
def difforge_register_models() -> Iterable[ModelSpec | PipelineSpec]:
    """model_registry: yield the :class:`ModelSpec` and :class:`PipelineSpec` objects this plugin provides.

    Called once per registry build. ModelSpecs are used for detection (fingerprints, then
    ``identifying_keys`` + ``config_from_shapes``), construction on the meta device and block-level
    wrapping; PipelineSpecs for ``Pipeline.from_pretrained(name, ...)``.
    """


@hookspec
def difforge_register_converters() -> Iterable[ConverterSpec]:
    """state_dict_converter: yield :class:`ConverterSpec` objects.

    Each turns one foreign checkpoint (``kind="checkpoint"``) or LoRA (``kind="lora"``) layout into
    the layout of the ModelSpec named by ``target_model``. When two converters' ``detect`` accept
    the same file, loading fails with a message naming both; nothing is guessed.
    """


@hookspec
def difforge_register_schedulers() -> Iterable[SchedulerSpec]:
    """scheduler: yield :class:`SchedulerSpec` objects (``flow-euler``, ``flow-unipc``, ...)."""


@hookspec
def difforge_register_cache_strategies() -> Iterable[CacheSpec]:
    """cache_strategy: yield :class:`CacheSpec` objects (``fbcache``, ``deepcache``, ...)."""


@hookspec
def difforge_register_offload_backends() -> Iterable[OffloadSpec]:
    """offload_backend: yield :class:`OffloadSpec` objects (``fp8``, ``cpu``, ``sequential``, ``disk``)."""


@hookspec
def difforge_register_attention_backends() -> Iterable[AttentionSpec]:
    """attention_backend: yield :class:`AttentionSpec` objects serving :func:`difforge.ops.attention`."""


# ---------------------------------------------------------------- lifecycle


@hookspec(historic=True)
def difforge_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Called when a plugin is registered, so that it can add hook specs of its own
    (``pluginmanager.add_hookspecs(module)``) for other plugins to implement."""


@hookspec
def difforge_pipeline_built(pipeline: Any) -> None:
    """Called once a pipeline is assembled (weights loaded, offload/cache/attention applied),
    before it is returned to the user. Return value ignored."""


@hookspec
def difforge_step_end(pipeline: Any, step: int, timestep: Any, latents: Any) -> None:
    """Called after every denoising step of every pipeline call. Return value ignored; use the
    call's ``callback`` argument to change latents."""

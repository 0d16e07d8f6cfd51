"""difforge: diffusion models (Qwen-Image, Flux, Wan) assembled from plugins.

Importing ``difforge`` is cheap: it imports neither torch nor any plugin. The heavier parts of the
public API (``Pipeline``, ``ModelConfig``, ``detect``, ``load_model``, ``ops``, ...) are imported on
first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import API_VERSION, __version__
from .errors import (
    ConfigError,
    ConversionError,
    DetectionError,
    DifforgeError,
    LoadError,
    PluginError,
    PluginUnavailable,
    UnknownNameError,
)
from .hookspecs import hookimpl, hookspec
from .plugins import get_plugin_host, get_plugin_manager, get_registry, reload_plugins
from .specs import (
    AttentionQuery,
    AttentionSpec,
    BlockGroup,
    BlockLayout,
    CacheSpec,
    ConverterSpec,
    ModelSpec,
    OffloadSpec,
    PipelineSpec,
    SchedulerSpec,
    SlotSpec,
    SourceSpec,
)

_LAZY = {
    "Pipeline": "difforge.runtime.pipeline:Pipeline",
    "ModelConfig": "difforge.loading.model_config:ModelConfig",
    "fetch_model": "difforge.loading.model_config:fetch_model",
    "detect": "difforge.loading.detect:detect",
    "DetectionResult": "difforge.loading.detect:DetectionResult",
    "fingerprint": "difforge.loading.fingerprint:fingerprint",
    "load_state_dict": "difforge.loading.state_dict:load_state_dict",
    "load_model": "difforge.loading.load:load_model",
    "build_scheduler": "difforge.schedulers:build_scheduler",
    "save_video": "difforge.runtime.video:save_video",
    "ops": "difforge.ops",
}

__all__ = [
    "API_VERSION",
    "__version__",
    "hookimpl",
    "hookspec",
    "get_registry",
    "get_plugin_host",
    "get_plugin_manager",
    "reload_plugins",
    "DifforgeError",
    "PluginError",
    "PluginUnavailable",
    "DetectionError",
    "ConversionError",
    "LoadError",
    "ConfigError",
    "UnknownNameError",
    "AttentionQuery",
    "AttentionSpec",
    "BlockGroup",
    "BlockLayout",
    "CacheSpec",
    "ConverterSpec",
    "ModelSpec",
    "OffloadSpec",
    "PipelineSpec",
    "SchedulerSpec",
    "SlotSpec",
    "SourceSpec",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'difforge' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    value = getattr(module, attr) if attr else module
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from . import ops
    from .loading.detect import DetectionResult, detect
    from .loading.fingerprint import fingerprint
    from .loading.load import load_model
    from .loading.model_config import ModelConfig, fetch_model
    from .loading.state_dict import load_state_dict
    from .runtime.pipeline import Pipeline
    from .runtime.video import save_video
    from .schedulers import build_scheduler

"""Name normalisation and lazy references shared by the registry and the specs."""

from __future__ import annotations

import importlib
import re
from typing import Any

from .errors import PluginError

_SEP = re.compile(r"[\s_.]+")


def normalize_name(name: str) -> str:
    """``Qwen_Image`` -> ``qwen-image``: names compare case-, ``_``- and ``-``-insensitively."""
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"a plugin-provided name must be a non-empty string, got {name!r}")
    return _SEP.sub("-", name.strip().lower())


_resolved: dict[str, Any] = {}


def resolve(ref: Any) -> Any:
    """Resolve a lazy ``"package.module:attribute"`` reference; anything else is returned as is.

    Specs name heavy objects (torch modules, kernels) by such strings so that plugin
    discovery imports nothing heavy.
    """
    if not isinstance(ref, str):
        return ref
    if ref in _resolved:
        return _resolved[ref]
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"lazy reference {ref!r} must look like 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"cannot resolve {ref!r}: {exc}. Is the plugin that provides it installed?") from exc
    _resolved[ref] = obj
    return obj

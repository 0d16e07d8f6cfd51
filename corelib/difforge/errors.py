"""The one error hierarchy of difforge.

Every public error is a :class:`DifforgeError`; its message says what was wrong (the plugin,
file, key or argument at fault) and what to do about it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "DifforgeError",
    "PluginError",
    "DetectionError",
    "ConversionError",
    "LoadError",
    "ConfigError",
    "UnknownNameError",
    "PluginUnavailable",
    "closest",
]


class DifforgeError(Exception):
    """Base class of every error difforge raises on purpose."""


class PluginError(DifforgeError):
    """A plugin failed to import, register, or conflicts with another plugin."""


class DetectionError(DifforgeError):
    """A checkpoint could not be recognised as exactly one known model."""


class ConversionError(DifforgeError):
    """A checkpoint or LoRA could not be converted to a model's own layout."""


class LoadError(DifforgeError):
    """A file could not be read, is corrupt, incomplete, or unsafe to load."""


class ConfigError(DifforgeError, ValueError):
    """An argument, option, recipe or configuration value is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A plugin-provided name (model, pipeline, scheduler, backend, ...) does not exist."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class PluginUnavailable(DifforgeError):
    """Raised by a plugin (at import or registration) whose optional dependency is missing.

    The plugin is then listed as *unavailable* rather than *broken*.
    """


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None

"""Plugin-name arguments: ``"fbcache"`` or ``{"name": "fbcache", "threshold": 0.08}``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class PluginChoice:
    """A parsed plugin-name argument: the name and the user's options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def as_arg(self) -> str | dict[str, Any]:
        return {"name": self.name, **self.options} if self.options else self.name


def parse_choice(value: Any, argument: str) -> PluginChoice | None:
    """Parse one plugin-name argument (None stays None)."""
    if value is None:
        return None
    if isinstance(value, PluginChoice):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError(f"{argument}: empty name; give a plugin name like 'sdpa' or a dict {{'name': ...}}")
        return PluginChoice(value.strip())
    if isinstance(value, Mapping):
        options = dict(value)
        name = options.pop("name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{argument}: a dict needs a 'name' key naming the plugin, got {dict(value)!r}")
        return PluginChoice(name, options)
    raise ConfigError(f"{argument}: expected a name or a dict {{'name': ..., **options}}, got {type(value).__name__}")


def parse_choices(value: Any, argument: str) -> list[PluginChoice]:
    """Parse a list-valued plugin argument (``offload=["fp8", "sequential"]``); a single item is a list of one."""
    if value is None:
        return []
    if isinstance(value, (str, Mapping, PluginChoice)):
        value = [value]
    choices = [parse_choice(v, argument) for v in value]
    return [c for c in choices if c is not None]


def merge_options(kind: str, name: str, declared: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``declared`` defaults overridden by ``given``; an option not declared is an error naming the known ones."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "(none)"
        raise ConfigError(f"{kind} {name!r} has no option {', '.join(map(repr, unknown))}; its options are: {known}")
    return {**declared, **given}

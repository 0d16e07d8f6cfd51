"""The Registry: one object built from every plugin's registration-hook results."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ._names import normalize_name
from .errors import PluginError, UnknownNameError, closest
from .specs import SPEC_KINDS

T = TypeVar("T")

_KIND_WORDS = {
    "models": "model",
    "pipelines": "pipeline",
    "converters": "converter",
    "schedulers": "scheduler",
    "caches": "cache strategy",
    "offload": "offload backend",
    "attention": "attention backend",
}


@dataclass(frozen=True)
class Entry(Generic[T]):
    spec: T
    plugin: str
    distribution: str | None


def split_choice(name: str) -> tuple[str, str | None]:
    """``"triton@difforge-triton"`` -> ``("triton", "difforge-triton")``."""
    base, sep, provider = name.partition("@")
    return base, (provider if sep else None)


class SpecTable(Generic[T]):
    """The specs of one kind, looked up by normalised name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.word = _KIND_WORDS.get(kind, kind)
        self._entries: dict[str, list[Entry[T]]] = {}

    def add(self, spec: T, plugin: str, distribution: str | None) -> None:
        key = normalize_name(spec.name)  # type: ignore[attr-defined]
        self._entries.setdefault(key, []).append(Entry(spec, plugin, distribution))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self, name: str | None = None) -> list[Entry[T]]:
        if name is None:
            return [e for key in sorted(self._entries) for e in self._entries[key]]
        return list(self._entries.get(normalize_name(name), ()))

    def conflicts(self) -> dict[str, list[Entry[T]]]:
        return {k: v for k, v in self._entries.items() if len(v) > 1}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalize_name(split_choice(name)[0]) in self._entries

    def __iter__(self) -> Iterator[T]:
        """Every spec, one per name (a conflicting name yields its first registration)."""
        for key in sorted(self._entries):
            yield self._entries[key][0].spec

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> T:
        """The spec called ``name`` (``name@distribution`` picks one of several providers)."""
        base, provider = split_choice(name)
        key = normalize_name(base)
        entries = self._entries.get(key)
        if not entries:
            known = self.names()
            hint = closest(key, known)
            msg = f"unknown {self.word} {base!r}."
            if hint:
                msg += f" Did you mean {hint!r}?"
            msg += f" Known {self.kind}: {', '.join(known) if known else '(none)'}."
            if not known or not hint:
                msg += " Is the plugin that provides it installed? `difforge plugins` lists what is loaded."
            raise UnknownNameError(msg)
        if provider is not None:
            want = normalize_name(provider)
            chosen = [
                e
                for e in entries
                if want in {normalize_name(e.plugin), normalize_name(e.distribution or e.plugin)}
            ]
            if not chosen:
                providers = ", ".join(_provider(e) for e in entries)
                raise UnknownNameError(
                    f"{self.word} {base!r} is not provided by {provider!r}; it is provided by: {providers}."
                )
            return chosen[0].spec
        if len(entries) > 1:
            providers = " and ".join(_provider(e) for e in entries)
            picks = ", ".join(f"'{base}@{e.distribution or e.plugin}'" for e in entries)
            raise PluginError(
                f"{self.word} {base!r} is registered by {providers}. Pick one by name ({picks}), "
                f"or block one plugin with DIFFORGE_PLUGINS=no:<plugin>."
            )
        return entries[0].spec

    def provider(self, name: str) -> Entry[T]:
        base, _ = split_choice(name)
        spec = self.get(name)
        for e in self._entries[normalize_name(base)]:
            if e.spec is spec:
                return e
        raise AssertionError("unreachable")


def _provider(e: Entry[Any]) -> str:
    return f"{e.distribution} (plugin {e.plugin!r})" if e.distribution else f"plugin {e.plugin!r}"


class Registry:
    """Every spec every loaded plugin registered, by kind.

    ``registry.models``, ``.pipelines``, ``.converters``, ``.schedulers``, ``.caches``,
    ``.offload``, ``.attention`` are :class:`SpecTable` objects; ``registry.get(kind, name)`` is the
    same as ``getattr(registry, kind).get(name)``.
    """

    def __init__(self) -> None:
        self.models: SpecTable[Any] = SpecTable("models")
        self.pipelines: SpecTable[Any] = SpecTable("pipelines")
        self.converters: SpecTable[Any] = SpecTable("converters")
        self.schedulers: SpecTable[Any] = SpecTable("schedulers")
        self.caches: SpecTable[Any] = SpecTable("caches")
        self.offload: SpecTable[Any] = SpecTable("offload")
        self.attention: SpecTable[Any] = SpecTable("attention")

    def table(self, kind: str) -> SpecTable[Any]:
        if kind not in SPEC_KINDS:
            raise UnknownNameError(f"unknown registry kind {kind!r}; choose one of {', '.join(SPEC_KINDS)}")
        return getattr(self, kind)

    def get(self, kind: str, name: str) -> Any:
        return self.table(kind).get(name)

    def add(self, spec: Any, plugin: str, distribution: str | None) -> str:
        for kind, cls in SPEC_KINDS.items():
            if isinstance(spec, cls):
                self.table(kind).add(spec, plugin, distribution)
                return kind
        raise TypeError(f"not a difforge spec: {spec!r}")

    def conflicts(self) -> dict[str, dict[str, list[Entry[Any]]]]:
        return {kind: c for kind in SPEC_KINDS if (c := self.table(kind).conflicts())}

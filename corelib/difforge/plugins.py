"""Plugin discovery, isolation and the process-wide registry.

Discovery order: the core's built-in plugin, then every entry point of the ``difforge`` group
(unless ``DIFFORGE_DISABLE_PLUGIN_AUTOLOAD=1``), then the modules named in ``DIFFORGE_PLUGINS``
(comma-separated; ``no:NAME`` blocks the plugin called NAME, built-in or installed).

A plugin that fails to import, raises while registering, implements an unknown hook, yields
something that is not a spec (or one spec name twice), or declares an API range that excludes
:data:`API_VERSION`, is isolated: nothing of it is registered, the rest keeps working, and ``difforge plugins`` lists it
with its status and the reason.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from ._names import normalize_name
from ._version import API_VERSION, __version__
from .errors import PluginError, PluginUnavailable, closest
from .registry import Registry
from .specs import (
    AttentionSpec,
    CacheSpec,
    ConverterSpec,
    ModelSpec,
    OffloadSpec,
    PipelineSpec,
    SchedulerSpec,
)

try:  # Python >= 3.10 has the selectable API; importlib-metadata backports newer fixes
    from importlib_metadata import entry_points, packages_distributions, version as dist_version
except ImportError:  # pragma: no cover
    from importlib.metadata import entry_points, packages_distributions, version as dist_version

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "difforge"
BUILTIN_PLUGINS = ("difforge.builtin",)

#: registration hook -> the spec types its implementations may yield
REGISTRATION_HOOKS: dict[str, tuple[type, ...]] = {
    "difforge_register_models": (ModelSpec, PipelineSpec),
    "difforge_register_converters": (ConverterSpec,),
    "difforge_register_schedulers": (SchedulerSpec,),
    "difforge_register_cache_strategies": (CacheSpec,),
    "difforge_register_offload_backends": (OffloadSpec,),
    "difforge_register_attention_backends": (AttentionSpec,),
}

STATUSES = ("ok", "broken", "refused", "blocked", "unavailable")


@dataclass
class PluginRecord:
    """What the plugin manager knows about one plugin (one row of ``difforge plugins``)."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    source: str = "entrypoint"  # builtin | entrypoint | env | manual
    status: str = "ok"
    reason: str | None = None
    hooks: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)
    api: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "source": self.source,
            "status": self.status,
            "reason": self.reason,
            "hooks": list(self.hooks),
            "provides": {k: list(v) for k, v in self.provides.items()},
            "api": self.api,
        }


class _PluginManager(pluggy.PluginManager):
    """pluggy's manager, taking every ``difforge_*`` function as a hook implementation (as pytest
    does for ``pytest_*``), so a misspelt hook name is caught even without the marker."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("difforge_") and name != "difforge_api":
            method = getattr(plugin, name, None)
            if callable(method) and not isinstance(method, type):
                return {}
        return opts


# ---------------------------------------------------------------- API version ranges

_CLAUSE = re.compile(r"^\s*(>=|<=|==|!=|>|<|~=)?\s*(\d+)\s*$")


def api_compatible(spec: str | int | None, version: int = API_VERSION) -> bool:
    """Whether ``version`` satisfies a plugin's declared range (``">=1,<2"``, ``"==1"``, ``1``).

    Raises ValueError on a range it cannot read.
    """
    if spec is None:
        return True
    if isinstance(spec, int):
        return spec == version
    ops = {
        ">=": version.__ge__,
        "<=": version.__le__,
        ">": version.__gt__,
        "<": version.__lt__,
        "==": version.__eq__,
        "!=": version.__ne__,
        "~=": version.__ge__,
        None: version.__eq__,
    }
    clauses = [c for c in str(spec).split(",") if c.strip()]
    if not clauses:
        raise ValueError(f"empty API range {spec!r}")
    for clause in clauses:
        m = _CLAUSE.match(clause)
        if not m:
            raise ValueError(f"cannot read API range {spec!r} (expected e.g. '>=1,<2')")
        if not ops[m.group(1)](int(m.group(2))):
            return False
    return True


# ---------------------------------------------------------------- settings from the environment


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class PluginSettings:
    autoload: bool = True
    extra: tuple[str, ...] = ()
    blocked: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PluginSettings:
        env = os.environ if env is None else env
        extra: list[str] = []
        blocked: set[str] = set()
        for item in (env.get("DIFFORGE_PLUGINS") or "").split(","):
            item = item.strip()
            if not item:
                continue
            if item.startswith("no:"):
                blocked.add(normalize_name(item[3:]))
            else:
                extra.append(item)
        return cls(
            autoload=not _truthy(env.get("DIFFORGE_DISABLE_PLUGIN_AUTOLOAD")),
            extra=tuple(extra),
            blocked=frozenset(blocked),
        )


# ---------------------------------------------------------------- the host


class PluginHost:
    """Loads plugins into a pluggy manager and builds the :class:`Registry` from them.

    Plugins are imported and registered in ``__init__``; their registration hooks run when
    :attr:`registry` is first built, so a plugin whose hook raises is marked broken only then:
    read :attr:`records` after :attr:`registry` (or use :meth:`plugin_rows`, which builds it).
    """

    def __init__(self, settings: PluginSettings | None = None, *, plugins: Iterable[Any] = ()) -> None:
        self.settings = settings or PluginSettings.from_env()
        self.pm = _PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self._modules: dict[str, Any] = {}
        self._registry: Registry | None = None
        self.pm.hook.difforge_addhooks.call_historic(kwargs={"pluginmanager": self.pm})
        _packages_distributions.cache_clear()  # once per discovery: distributions may have been installed since
        self._load(list(plugins))

    # -- loading

    def _load(self, manual: list[Any]) -> None:
        for module_name in BUILTIN_PLUGINS:
            self._add(
                "builtin",
                lambda m=module_name: importlib.import_module(m),
                module_name,
                source="builtin",
                distribution="difforge",
                version=__version__,
            )
        if self.settings.autoload:
            seen: set[tuple[str, str]] = set()
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                if (ep.name, ep.value) in seen:
                    continue
                seen.add((ep.name, ep.value))
                dist = getattr(ep, "dist", None)
                self._add(
                    ep.name,
                    ep.load,
                    ep.value,
                    source="entrypoint",
                    distribution=getattr(dist, "name", None),
                    version=getattr(dist, "version", None),
                )
        for module_name in self.settings.extra:
            self._add(
                module_name,
                lambda m=module_name: importlib.import_module(m),
                module_name,
                source="env",
            )
        for obj in manual:
            name = getattr(obj, "__name__", None) or type(obj).__name__
            self._add(name, lambda o=obj: o, name, source="manual")
        self._check_hooks()
        self.pm.check_pending()

    def _add(
        self,
        name: str,
        loader: Any,
        module_name: str,
        *,
        source: str,
        distribution: str | None = None,
        version: str | None = None,
    ) -> None:
        key = normalize_name(name)
        if key in self.records and self.records[key].status == "ok":
            other = self.records[key]
            self.records[f"{key}#{len(self.records)}"] = PluginRecord(
                name,
                module_name,
                distribution,
                version,
                source,
                status="broken",
                reason=f"a plugin named {name!r} is already loaded from {other.distribution or other.module}; "
                f"rename the entry point or block one with DIFFORGE_PLUGINS=no:{name}",
            )
            return
        rec = PluginRecord(name, module_name, distribution, version, source)
        self.records[key] = rec
        if key in self.settings.blocked:
            rec.status, rec.reason = "blocked", "blocked by DIFFORGE_PLUGINS=no:" + name
            return
        try:
            plugin = loader()
        except PluginUnavailable as exc:
            rec.status, rec.reason = "unavailable", str(exc)
            return
        except Exception as exc:  # isolation: any import-time failure
            rec.status, rec.reason = "broken", f"import failed: {type(exc).__name__}: {exc}"
            log.warning("difforge plugin %r failed to import and is disabled: %s", name, exc)
            return
        if rec.distribution is None and isinstance(plugin, ModuleType):
            rec.distribution, rec.version = _distribution_of(plugin)
        api = getattr(plugin, "difforge_api", None)
        rec.api = None if api is None else str(api)
        try:
            ok = api_compatible(api)
        except ValueError as exc:
            rec.status, rec.reason = "refused", f"unreadable difforge_api: {exc}"
            return
        if not ok:
            rec.status = "refused"
            rec.reason = (
                f"supports difforge API {api}, but this difforge has API version {API_VERSION}; "
                f"install a version of {rec.distribution or name} made for API {API_VERSION}"
            )
            log.warning("difforge plugin %r refused: %s", name, rec.reason)
            return
        try:
            self.pm.register(plugin, name=key)
        except Exception as exc:  # pluggy validation errors (bad signatures, ...), a raising addhooks
            if self.pm.is_registered(plugin):  # a failure in a historic replay leaves it half-registered
                self.pm.unregister(plugin)
            rec.status, rec.reason = "broken", f"registration failed: {exc}"
            log.warning("difforge plugin %r failed to register: %s", name, exc)
            return
        self._modules[key] = plugin
        rec.hooks = sorted(hc.name for hc in (self.pm.get_hookcallers(plugin) or []))

    def _check_hooks(self) -> None:
        """Disable plugins implementing hooks no spec declares (typos), naming the closest hook."""
        known = [n for n in dir(self.pm.hook) if n.startswith("difforge_") and getattr(self.pm.hook, n).spec]
        for key, plugin in list(self._modules.items()):
            unknown = [hc.name for hc in (self.pm.get_hookcallers(plugin) or []) if hc.spec is None]
            if unknown:
                parts = []
                for hook in unknown:
                    hint = closest(hook, known)
                    parts.append(f"{hook!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
                self._disable(key, "implements unknown hook " + ", ".join(parts))

    def _disable(self, key: str, reason: str, status: str = "broken") -> None:
        rec = self.records[key]
        rec.status, rec.reason = status, reason
        plugin = self._modules.pop(key, None)
        if plugin is not None and self.pm.is_registered(plugin):
            self.pm.unregister(plugin)
        log.warning("difforge plugin %r disabled: %s", rec.name, reason)

    # -- the registry

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = self._build_registry()
        return self._registry

    def _build_registry(self) -> Registry:
        collected: dict[str, list[Any]] = {}
        for key, plugin in list(self._modules.items()):
            try:
                collected[key] = self._collect(plugin)
            except PluginUnavailable as exc:
                self._disable(key, str(exc), status="unavailable")
            except Exception as exc:  # isolation: registration failures
                self._disable(key, f"registration failed: {type(exc).__name__}: {exc}")
        registry = Registry()
        for key, specs in collected.items():
            if key not in self._modules:
                continue
            rec = self.records[key]
            for spec in specs:
                kind = registry.add(spec, rec.name, rec.distribution)
                rec.provides.setdefault(kind, []).append(spec.name)
        for kind, conflicts in registry.conflicts().items():
            for name, entries in conflicts.items():
                log.warning(
                    "%s %r is registered by several plugins (%s); pick one with 'name@distribution'",
                    kind,
                    name,
                    ", ".join(e.distribution or e.plugin for e in entries),
                )
        return registry

    def _collect(self, plugin: Any) -> list[Any]:
        """All specs ``plugin`` yields; PluginError when one is not a spec or a name comes twice."""
        specs: list[Any] = []
        seen: dict[tuple[type, str], str] = {}
        for hook, types in REGISTRATION_HOOKS.items():
            caller = getattr(self.pm.hook, hook)
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                result = impl.function()
                if result is None:
                    continue
                if isinstance(result, (str, bytes)) or not isinstance(result, Iterable):
                    raise PluginError(f"{hook} must return an iterable of specs, got {type(result).__name__}")
                for item in result:
                    if not isinstance(item, types):
                        allowed = " or ".join(t.__name__ for t in types)
                        raise PluginError(f"{hook} yielded {item!r}, which is not a {allowed}")
                    key = (type(item), normalize_name(item.name))
                    if key in seen:
                        raise PluginError(
                            f"{hook} yields the {type(item).__name__} name {item.name!r} more than once "
                            f"(first as {seen[key]!r}); names compare normalised, give each spec its own name"
                        )
                    seen[key] = item.name
                    specs.append(item)
        return specs

    # -- introspection

    def plugin_rows(self) -> list[PluginRecord]:
        _ = self.registry  # registration problems are part of the status
        return list(self.records.values())

    def get_plugin(self, name: str) -> Any:
        return self._modules.get(normalize_name(name))


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    """Top-level package -> distributions (scanning every installed distribution: slow, so once)."""
    return dict(packages_distributions())


def _distribution_of(module: ModuleType) -> tuple[str | None, str | None]:
    top = module.__name__.split(".")[0]
    try:
        dists = _packages_distributions().get(top) or []
    except Exception:  # pragma: no cover - broken metadata
        dists = []
    if not dists:
        return None, None
    try:
        return dists[0], dist_version(dists[0])
    except Exception:  # pragma: no cover
        return dists[0], None


# ---------------------------------------------------------------- process-wide host

_host: PluginHost | None = None
_lock = threading.Lock()


def get_plugin_host() -> PluginHost:
    """The process-wide :class:`PluginHost`, built on first use from the environment."""
    global _host
    with _lock:
        if _host is None:
            _host = PluginHost()
        return _host


def get_registry() -> Registry:
    """The process-wide :class:`Registry` of every loaded plugin's specs."""
    return get_plugin_host().registry


def reload_plugins(settings: PluginSettings | None = None, *, plugins: Iterable[Any] = ()) -> PluginHost:
    """Discard the loaded plugins and discover them again (after installing one, or in tests).

    ``plugins`` are extra plugin objects (modules or instances) registered directly.
    """
    global _host
    with _lock:
        _host = PluginHost(settings, plugins=plugins)
        return _host


def get_plugin_manager() -> pluggy.PluginManager:
    """The pluggy manager behind the process-wide host (for lifecycle hook calls)."""
    return get_plugin_host().pm

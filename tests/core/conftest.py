"""Fixtures for the plugin-manager tests: throw-away *installed* distributions with entry points.

``make_dist`` writes, under a temporary site folder put on ``sys.path``, a package with a plugin
module and a ``<name>-<version>.dist-info`` folder (``METADATA``, ``entry_points.txt``,
``top_level.txt``), exactly what ``pip install`` leaves behind, so discovery goes through
``importlib.metadata`` entry points as it does for real plugins.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import difforge.plugins
from difforge.plugins import PluginHost, PluginSettings

try:
    import importlib_metadata
except ImportError:  # pragma: no cover
    importlib_metadata = None  # type: ignore[assignment]

PLUGIN_ENV = ("DIFFORGE_PLUGINS", "DIFFORGE_DISABLE_PLUGIN_AUTOLOAD", "DIFFORGE_ATTENTION")

MakeDist = Callable[..., Path]


def _invalidate() -> None:
    importlib.invalidate_caches()
    if importlib_metadata is not None:
        importlib_metadata.MetadataPathFinder.invalidate_caches()


@pytest.fixture(autouse=True)
def clean_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No user plugin settings leak into the tests; the process-wide host is restored afterwards."""
    for name in PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(difforge.plugins, "_host", None)


@pytest.fixture
def make_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeDist]:
    """``make_dist(dist, package, source, entry=None, version="0.1", extra={module: source})``.

    Creates package ``package`` whose ``plugin`` module has ``source``, installed as distribution
    ``dist`` with the entry point ``[difforge] <entry> = <package>.plugin`` (``entry`` defaults to
    ``package`` without a ``_pkg`` suffix). Returns the package folder.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    packages: list[str] = []

    def make(
        dist: str,
        package: str,
        source: str,
        *,
        entry: str | None = None,
        version: str = "0.1",
        extra: dict[str, str] | None = None,
    ) -> Path:
        pkg = site / package
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "plugin.py").write_text(source)
        for module, text in (extra or {}).items():
            (pkg / f"{module}.py").write_text(text)
        info = site / f"{re.sub(r'[-_.]+', '_', dist)}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        entry_name = entry or package.removesuffix("_pkg")
        (info / "entry_points.txt").write_text(f"[difforge]\n{entry_name} = {package}.plugin\n")
        (info / "top_level.txt").write_text(package + "\n")
        packages.append(package)
        _invalidate()
        return pkg

    yield make
    for name in [m for m in sys.modules if m.split(".")[0] in packages]:
        del sys.modules[name]
    _invalidate()


@pytest.fixture
def host_from_env() -> Callable[..., PluginHost]:
    """``host_from_env(DIFFORGE_PLUGINS="...", ...)``: a fresh PluginHost from those variables only."""

    def build(**env: str) -> PluginHost:
        return PluginHost(PluginSettings.from_env(env))

    return build

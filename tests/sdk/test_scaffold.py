"""``difforge new-plugin``: each kind's package installs into the venv, is listed by ``difforge plugins``
and passes its own generated tests (the SDK's conformance suites) as generated."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from difforge import ConfigError
from difforge.cli import PLUGIN_KINDS, main
from difforge_sdk.scaffold import KINDS, scaffold

try:
    import importlib_metadata
except ImportError:  # pragma: no cover
    importlib_metadata = None  # type: ignore[assignment]

NAMES = {kind: f"sdkcheck-{kind}-{os.getpid()}" for kind in KINDS}
"""Per-process names: test runs of several people at once install and uninstall only their own."""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DIFFORGE_")}


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers() -> list[str]:
    """Scaffolded distributions of test runs that were interrupted (their process is gone)."""
    found = []
    for dist in importlib_metadata.distributions() if importlib_metadata is not None else ():
        m = re.fullmatch(r"difforge-sdkcheck-[a-z]+-(\d+)", dist.metadata["Name"] or "")
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            found.append(m.group(0))
    return found


def _uninstall(*extra: str) -> None:
    _pip("uninstall", "-y", *(f"difforge-{n}" for n in NAMES.values()), *extra)
    importlib.invalidate_caches()
    if importlib_metadata is not None:
        importlib_metadata.MetadataPathFinder.invalidate_caches()


def test_kinds_match_the_cli() -> None:
    assert tuple(KINDS) == PLUGIN_KINDS


def test_cli_writes_a_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new-plugin", "difforge-My_Cache", "--kind", "cache", "--dir", str(tmp_path)]) == 0
    root = tmp_path / "difforge-my-cache"
    assert str(root) in capsys.readouterr().out
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["README.md", "difforge_my_cache/__init__.py", "difforge_my_cache/cache.py", "pyproject.toml", "tests/test_my_cache.py"]
    assert 'my-cache = "difforge_my_cache"' in (root / "pyproject.toml").read_text()
    assert main(["new-plugin", "my-cache", "--kind", "cache", "--dir", str(tmp_path)]) == 2  # exists
    with pytest.raises(ConfigError, match="lowercase letters"):
        scaffold("1st", "cache", tmp_path)


@pytest.mark.parametrize("kind", list(KINDS))
def test_generated_code_is_complete(tmp_path: Path, kind: str) -> None:
    root = scaffold(NAMES[kind], kind, tmp_path)
    for path in root.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "{{" not in text, path  # every field filled
            if path.suffix == ".py":
                compile(text, str(path), "exec")


@pytest.fixture
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One package of each kind, pip-installed (editable) into this venv; uninstalled afterwards."""
    folder = tmp_path_factory.mktemp("scaffold")
    roots = {kind: scaffold(NAMES[kind], kind, folder) for kind in KINDS}
    _uninstall(*_leftovers())  # and what interrupted runs left behind
    try:
        args = [a for root in roots.values() for a in ("-e", str(root))]
        done = _pip("install", "--no-deps", "--no-build-isolation", *args)
        assert done.returncode == 0, done.stderr
        yield roots
    finally:
        _uninstall()


@pytest.mark.slow
def test_each_kind_installs_and_passes_its_tests(installed: dict[str, Path]) -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "difforge.cli", "plugins", "--json"], capture_output=True, text=True, env=_env(), check=True
    )
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    for kind, name in NAMES.items():
        row = rows.get(name)
        assert row is not None, f"difforge plugins does not list {name}: {sorted(rows)}"
        assert row["status"] == "ok" and row["distribution"] == f"difforge-{name}", row
        assert name in [n for names in row["provides"].values() for n in names], row
    folder = next(iter(installed.values())).parent
    tests = [str(root / "tests") for root in installed.values()]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib", *tests],
        capture_output=True, text=True, env=_env(), cwd=folder,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " failed" not in result.stdout and " passed" in result.stdout

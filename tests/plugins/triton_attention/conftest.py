"""Fixtures of the difforge-triton tests: the kernel runs in Triton's interpreter on the CPU.

Triton fixes its mode when it is imported (its own library functions are made for the
interpreter only if ``TRITON_INTERPRET=1`` is set then), so this conftest imports triton with the
variable set, and restores the environment right away. Each test of this folder then sets the
variable again (``monkeypatch``, undone after the test): ``supports()`` accepts CPU tensors only
while it is set, so other folders' tests, and the processes they start, never see it.

What stays for the rest of the pytest process is triton itself in interpreter mode: harmless on
the CPU. Tests of the compiled kernel on a GPU must run in a process of their own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import difforge
import difforge_triton
from difforge.plugins import PluginSettings


def _import_triton_interpreted() -> str | None:
    """Import triton in interpreter mode; the reason it cannot be, or None."""
    if "triton" not in sys.modules:
        before = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton.language  # noqa: F401
        except ImportError as exc:
            return f"triton is not installed ({exc})"
        finally:
            if before is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = before
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.zeros, InterpretedFunction):
        return "triton was imported before this conftest without TRITON_INTERPRET=1; run this folder on its own"
    return None


NOT_INTERPRETED = _import_triton_interpreted()


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("DIFFORGE_ATTENTION", raising=False)
    monkeypatch.delenv("DIFFORGE_TRITON_PRIORITY", raising=False)


@pytest.fixture
def interpreted() -> None:
    """Skips a test that runs the kernel when triton could not be put in interpreter mode."""
    if NOT_INTERPRETED:
        pytest.skip(NOT_INTERPRETED)


def triton_only() -> Any:
    """Build a registry of the built-in plugin and difforge-triton alone, with its default priority."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DIFFORGE_TRITON_PRIORITY", raising=False)
        return difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_triton]).registry


@pytest.fixture(autouse=True, scope="module")
def triton_registry() -> Iterator[Any]:
    """:func:`triton_only` for each module of this folder; the environment's own registry afterwards."""
    yield triton_only()
    difforge.reload_plugins()


@pytest.fixture
def restore_registry() -> Iterator[None]:
    """For a test that reloads the plugins: :func:`triton_only` again afterwards."""
    yield
    triton_only()

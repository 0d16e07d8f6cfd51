"""PLUGINS.md stays in sync with the code: its hook reference lists exactly the hook specs."""

from __future__ import annotations

import re
from pathlib import Path

from difforge import hookspecs

PLUGINS_MD = Path(__file__).resolve().parents[2] / "PLUGINS.md"


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_hook_reference_lists_exactly_the_hookspecs() -> None:
    table = _section(PLUGINS_MD.read_text(encoding="utf-8"), "Hook reference")
    documented = re.findall(r"^\| `(difforge_\w+)", table, flags=re.MULTILINE)
    specs = sorted(name for name in dir(hookspecs) if getattr(getattr(hookspecs, name), "difforge_spec", None) is not None)
    assert specs, "no hook specs found in difforge.hookspecs"
    assert sorted(documented) == specs, (
        f"PLUGINS.md's hook reference table lists {sorted(documented)}, difforge/hookspecs.py declares {specs}: "
        "document new hooks in the table (and remove gone ones)"
    )
    assert len(documented) == len(set(documented)), "a hook is listed twice"


def test_documents_every_plugin_kind_of_the_scaffold() -> None:
    from difforge_sdk.scaffold import KINDS

    text = PLUGINS_MD.read_text(encoding="utf-8")
    steps = _section(text, "Step by step, per kind")
    for kind, heading in zip(KINDS, ("A model family", "A cache strategy", "An attention backend", "An offload backend", "A scheduler")):
        assert f"### {heading}" in steps, f"PLUGINS.md has no step-by-step section for {kind} plugins"
    for section in ("Testing with difforge-sdk", "The versioning promise", "Publishing"):
        assert f"\n## {section}\n" in text

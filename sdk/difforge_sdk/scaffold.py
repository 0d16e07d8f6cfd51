"""``difforge new-plugin NAME --kind KIND``: a plugin package that installs and passes its tests as generated.

The package (``difforge-NAME/``) holds a ``pyproject.toml`` with the ``difforge`` entry point, a light
entry module declaring ``difforge_api`` and implementing the kind's registration hook, a working
implementation to start from, a test running the difforge-sdk conformance suite of the kind, and a
README. Kinds: ``model`` (a small DiT family with config inference and a block layout), ``cache``
(a step cache over the block layout), ``attention`` (a chunked float32 kernel), ``offload`` (a
bfloat16 storage dtype backend) and ``scheduler`` (a flow-matching Euler sampler).
"""

from __future__ import annotations

import argparse
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any

from difforge import ConfigError, __version__

log = logging.getLogger(__name__)

__all__ = ["KINDS", "scaffold", "main"]

KINDS: dict[str, tuple[str, str, str]] = {
    # kind: (implementation module, summary, how to use it)
    "model": ("model", "a diffusion transformer family", 'difforge.load_model("checkpoint.safetensors")  # detected as {name}'),
    "cache": ("cache", "a step cache reusing the blocks' residual", 'Pipeline.from_pretrained(..., cache={{"name": "{name}", "cache_interval": 3}})'),
    "attention": ("attention", "an attention kernel", 'Pipeline.from_pretrained(..., attention="{name}")'),
    "offload": ("offload", "weights stored in bfloat16, upcast per layer", 'Pipeline.from_pretrained(..., offload=["{name}", "sequential"])'),
    "scheduler": ("scheduler", "a flow-matching Euler sampler", 'Pipeline.from_pretrained(..., scheduler={{"name": "{name}", "shift": 3.0}})'),
}
API = ">=1,<2"
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_FIELD = re.compile(r"\{\{(\w+)\}\}")


def _fields(name: str, kind: str) -> dict[str, str]:
    impl, summary, usage = KINDS[kind]
    snake = name.replace("-", "_")
    major, minor = __version__.split(".")[:2]
    return {
        "name": name,
        "kind": kind,
        "dist": f"difforge-{name}",
        "package": f"difforge_{snake}",
        "snake": snake,
        "Title": "".join(part.capitalize() for part in name.split("-")),
        "api": API,
        "difforge_version": f"{major}.{minor}",
        "impl": impl,
        "summary": summary,
        "usage": "```python\n" + usage.format(name=name) + "\n```",
    }


def _render(text: str, fields: dict[str, str], source: str) -> str:
    def field(m: re.Match[str]) -> str:
        if m.group(1) not in fields:
            raise KeyError(f"template {source}: unknown field {m.group(0)}")
        return fields[m.group(1)]

    return _FIELD.sub(field, text)


def scaffold(name: str, kind: str, directory: str | Path = ".") -> Path:
    """Write the package of plugin ``name`` (``difforge-`` is optional) of ``kind`` into ``directory``.

    Returns the package folder. Raises :class:`~difforge.ConfigError` for a bad name or kind, or
    when the folder exists.
    """
    name = name.strip().lower().removeprefix("difforge-").removeprefix("difforge_").replace("_", "-")
    if not _NAME.match(name):
        raise ConfigError(f"plugin name {name!r}: use lowercase letters, digits and dashes, starting with a letter (e.g. my-cache)")
    if kind not in KINDS:
        raise ConfigError(f"unknown plugin kind {kind!r}; choose one of {', '.join(KINDS)}")
    fields = _fields(name, kind)
    target = Path(directory) / fields["dist"]
    if target.exists():
        raise ConfigError(f"{target} already exists; choose another name or directory")
    root = resources.files("difforge_sdk") / "scaffold_templates"
    written = []
    for base in ("common", kind):
        for rel, template in _walk(root / base):
            parts = [fields["package"] if p == "PACKAGE" else p.replace("NAME", fields["snake"]) for p in rel]
            out = target.joinpath(*parts).with_suffix("")  # drop .tmpl
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(_render(template.read_text(encoding="utf-8"), fields, "/".join(rel)), encoding="utf-8")
            written.append(out)
    log.info("wrote %d files of %s (%s plugin) into %s", len(written), fields["dist"], kind, target)
    return target


def _walk(folder: Any, rel: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """``(relative path parts, template)`` of every ``*.tmpl`` under ``folder`` (a resources Traversable)."""
    out = []
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.is_dir():
            out.extend(_walk(item, (*rel, item.name)))
        elif item.name.endswith(".tmpl"):
            out.append(((*rel, item.name), item))
    return out


def main(args: argparse.Namespace) -> int:
    """``difforge new-plugin`` (the arguments are declared by :mod:`difforge.cli`)."""
    target = scaffold(args.name, args.kind, args.dir)
    package = _fields(target.name.removeprefix("difforge-"), args.kind)["package"]
    print(target)
    print(f"  cd {target} && pip install -e '.[test]' && difforge plugins && pytest")
    print(f"  edit {package}/{KINDS[args.kind][0]}.py; keep {package}/__init__.py light (no torch)")
    return 0

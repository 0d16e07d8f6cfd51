"""Discovery stays light: building the registry imports no torch and no plugin module but the entry modules.

Each check runs in a fresh interpreter with the plugins actually installed in this environment
(every first-party plugin under ``plugins/`` once they are installed), so it holds for the real
distributions, not for test doubles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

PROBE = """
import json, sys
import difforge
from difforge.plugins import ENTRY_POINT_GROUP, entry_points

host = difforge.get_plugin_host()
registry = host.registry
eps = [
    {"name": ep.name, "module": ep.module, "dist": getattr(getattr(ep, "dist", None), "name", None)}
    for ep in entry_points(group=ENTRY_POINT_GROUP)
]
print(json.dumps({
    "modules": sorted(sys.modules),
    "entry_points": eps,
    "records": [r.as_dict() for r in host.plugin_rows()],
}))
"""

HEAVY = ("torch", "numpy", "safetensors", "modelscope", "huggingface_hub", "transformers", "diffusers", "triton")


def _probe(**env: str) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIFFORGE_")}
    clean.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env=clean, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def core_only() -> dict[str, Any]:
    return _probe(DIFFORGE_DISABLE_PLUGIN_AUTOLOAD="1")


@pytest.fixture(scope="module")
def all_plugins() -> dict[str, Any]:
    return _probe()


def _heavy(modules: list[str]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules} & set(HEAVY))


def test_core_registry_imports_nothing_heavy(core_only: dict[str, Any]) -> None:
    assert [r["name"] for r in core_only["records"]] == ["builtin"]
    assert _heavy(core_only["modules"]) == []


def test_discovery_imports_only_entry_modules(all_plugins: dict[str, Any]) -> None:
    entry_modules = {ep["module"] for ep in all_plugins["entry_points"]}
    allowed = {m.rsplit(".", i)[0] for m in entry_modules for i in range(m.count(".") + 1)}  # + parent packages
    tops = {m.split(".")[0] for m in entry_modules} - {"difforge"}  # the core package itself is not a plugin
    # a plugin may keep its spec objects in light ``*_specs`` modules (difforge-sd's ``_scheduler_specs``);
    # that they import nothing heavy is test_discovery_of_all_plugins_imports_nothing_heavy's business
    extra = sorted(m for m in all_plugins["modules"]
                   if m.split(".")[0] in tops and m not in allowed and not m.rsplit(".", 1)[-1].endswith("_specs"))
    assert not extra, (
        f"plugin discovery imported modules beyond the entry modules {sorted(entry_modules)}: {extra}. "
        "Entry modules must name their implementations by lazy 'package.module:attr' strings."
    )


def test_discovery_of_all_plugins_imports_nothing_heavy(all_plugins: dict[str, Any]) -> None:
    heavy = _heavy(all_plugins["modules"])
    assert not heavy, f"discovering {[ep['name'] for ep in all_plugins['entry_points']]} imported {heavy}"


def test_installed_plugins_are_not_broken(all_plugins: dict[str, Any]) -> None:
    bad = [f"{r['name']} ({r['distribution']}): {r['status']}: {r['reason']}"
           for r in all_plugins["records"] if r["status"] in ("broken", "refused")]
    assert not bad, "installed plugins failed to load:\n" + "\n".join(bad)
    discovered = {r["module"] for r in all_plugins["records"]}
    assert {ep["module"] for ep in all_plugins["entry_points"]} <= discovered

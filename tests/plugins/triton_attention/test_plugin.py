"""The installed distribution: discovery, a light entry module, and 'unavailable' without triton.

Each check runs a fresh interpreter with the installed entry points (and no ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

PROBE = """
import json, sys
{prelude}
import difforge

host = difforge.get_plugin_host()
row = next(r for r in host.plugin_rows() if r.name == "triton")
print(json.dumps({{
    "row": row.as_dict(),
    "attention": sorted(s.name for s in host.registry.attention),
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton", "difforge_triton")),
}}))
"""


def probe(prelude: str = "") -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFORGE_", "TRITON_"))}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(prelude=prelude)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_discovered_and_light() -> None:
    found = probe()
    assert found["row"]["status"] == "ok", found["row"]
    assert found["row"]["distribution"] == "difforge-triton" and found["row"]["module"] == "difforge_triton"
    assert found["row"]["provides"] == {"attention": ["triton"]}
    assert "triton" in found["attention"]
    assert found["modules"] == ["difforge_triton"], "the entry module must import neither torch nor triton"


def test_unavailable_without_triton() -> None:
    missing = probe("sys.modules['triton'] = None  # importlib.util.find_spec('triton') is now None")
    assert missing["row"]["status"] == "unavailable"
    assert "pip install 'triton==3.9.0'" in missing["row"]["reason"]
    assert "triton" not in missing["attention"] and {"sdpa", "math"} <= set(missing["attention"])

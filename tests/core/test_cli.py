"""``difforge plugins`` and ``difforge list`` through :func:`difforge.cli.main`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import difforge.plugins
from difforge.cli import main
from difforge.errors import PluginError

MakeDist = Callable[..., Path]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_json_lists_the_builtin_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    builtin = rows["builtin"]
    assert builtin["status"] == "ok" and builtin["distribution"] == "difforge" and builtin["source"] == "builtin"
    assert builtin["version"] == difforge.__version__ and builtin["reason"] is None
    assert {"sdpa", "math"} <= set(builtin["provides"]["attention"])
    assert {"flow-euler", "flow-unipc"} <= set(builtin["provides"]["schedulers"])
    assert "difforge_register_attention_backends" in builtin["hooks"]


def test_plugins_table_shows_broken_plugins_with_reason(
    make_dist: MakeDist, capsys: pytest.CaptureFixture[str]
) -> None:
    make_dist("difforge-bad", "bad_pkg", "raise ImportError('no module named triton')\n", version="0.2")
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    header, rule, *lines = out.splitlines()
    assert header.split() == ["plugin", "distribution", "version", "hooks", "registers", "status"]
    (bad,) = [line for line in lines if line.startswith("bad ")]
    assert "difforge-bad" in bad and "0.2" in bad
    assert bad.endswith("broken: import failed: ImportError: no module named triton")
    (builtin,) = [line for line in lines if line.startswith("builtin ")]
    assert "attention: sdpa, math" in builtin and builtin.endswith("ok")


def test_list_attention(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", "attention")
    assert code == 0
    names = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert {"sdpa", "math"} <= set(names) and "difforge" in names["sdpa"] and "priority 10" in names["sdpa"]


def test_list_schedulers_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", "schedulers", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert code == 0 and {"flow-euler", "flow-unipc"} <= set(rows)
    assert rows["flow-euler"]["provider"] == "difforge"


def test_list_unknown_kind_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["list", "kernels"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_difforge_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken_registry() -> None:
        raise PluginError("attention 'x' is registered by dist-a and dist-b")

    monkeypatch.setattr(difforge.plugins, "get_registry", broken_registry)
    code, out, err = run(capsys, "list", "attention")
    assert code == 2 and out == ""
    assert err.strip() == "difforge: error: attention 'x' is registered by dist-a and dist-b"

"""The SDK's pytest plugin from the outside (pytest's ``pytester``): it loads at every pytest start
without importing anything heavy, and its conformance suite explains what a broken plugin must fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]

try:
    from importlib_metadata import entry_points
except ImportError:  # pragma: no cover
    from importlib.metadata import entry_points


def test_registered_as_a_pytest_plugin() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert eps.get("difforge") == "difforge_sdk.testing"


def test_loading_the_plugin_imports_nothing_heavy() -> None:
    code = (
        "import sys, difforge_sdk.testing as t; t.pytest_configure;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'difforge', 'difforge_flux', 'numpy', 'safetensors'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_does_nothing_unless_a_test_opts_in(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        import sys

        def test_nothing_heavy_was_imported():
            assert "torch" not in sys.modules and "difforge" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=1)
    markers = pytester.runpytest_subprocess("--markers", "-p", "no:cacheprovider")
    markers.stdout.fnmatch_lines(["*difforge_conformance:*conformance suite*"])


BROKEN_PLUGIN = '''
import re
from dataclasses import dataclass

import torch
from torch import nn

from difforge import ModelSpec, hookimpl

difforge_api = ">=1,<2"


@dataclass(frozen=True)
class Config:
    width: int = 8
    depth: int = 2


class BrokenNet(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(nn.Linear(config.width, config.width) for _ in range(config.depth))
        self.register_buffer("table", torch.arange(4.0), persistent=False)  # the mistake the suite must explain

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x + self.table.sum()


def config_from_shapes(shapes):
    if "blocks.0.weight" not in shapes:
        return None
    return Config(width=shapes["blocks.0.weight"][0], depth=1)  # wrong: ignores the block count


@hookimpl
def difforge_register_models():
    yield ModelSpec(name="broken-net", family="broken", role="dit", module="broken_plugin:BrokenNet",
                    config_from_shapes="broken_plugin:config_from_shapes", format="broken",
                    identifying_keys=("blocks.*.weight", "head.weight"))
'''


def test_failures_say_what_to_fix(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(broken_plugin=BROKEN_PLUGIN)
    pytester.makepyfile(
        test_broken=textwrap.dedent(
            """
            import broken_plugin
            from difforge_sdk.testing import ModelConformance

            class TestBroken(ModelConformance):
                model = "broken-net"
                tiny_config = broken_plugin.Config()
                plugins = [broken_plugin]
            """
        )
    )
    # a subprocess: an in-process run next to torch._dynamo makes triton's nanobind report leaks at exit
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-k", "meta or config_from_shapes or identifying or checkpoint_format"
    )
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(
        [
            "*broken-net: __init__ registers non-persistent buffers (table)*compute them in forward*",
            "*broken-net: config_from_shapes recovered depth=1 (tiny config: 2)*",
            "*broken-net: identifying_keys ?'head.weight'? match no key*",
            "*broken-net: a tiny checkpoint in format 'broken' (its own layout) is not detected*",
        ],
        consecutive=False,
    )

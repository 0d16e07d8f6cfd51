"""Registry lookups over real installed plugin distributions: conflicts, picking one, names."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from difforge.errors import PluginError, UnknownNameError
from difforge.plugins import PluginHost, PluginSettings
from difforge.registry import Registry

MakeDist = Callable[..., Path]


def attention_plugin(name: str, description: str) -> str:
    return textwrap.dedent(
        f"""
        from difforge import hookimpl, AttentionSpec

        @hookimpl
        def difforge_register_attention_backends():
            yield AttentionSpec(name={name!r}, fn="x.y:fn", supports="x.y:ok", description={description!r})
        """
    )


@pytest.fixture
def two_providers(make_dist: MakeDist) -> Registry:
    """``dist-a`` (plugin ``plug_a``) and ``dist-b`` (plugin ``plug_b``) both register attention ``x``."""
    make_dist("dist-a", "plug_a_pkg", attention_plugin("x", "from a"), entry="plug_a")
    make_dist("dist-b", "plug_b_pkg", attention_plugin("X", "from b"), entry="plug_b")
    return PluginHost(PluginSettings()).registry


def test_duplicate_name_names_both_distributions(two_providers: Registry) -> None:
    with pytest.raises(PluginError) as info:
        two_providers.attention.get("x")
    message = str(info.value)
    assert "dist-a (plugin 'plug_a')" in message and "dist-b (plugin 'plug_b')" in message
    assert "'x@dist-a'" in message and "'x@dist-b'" in message and "DIFFORGE_PLUGINS=no:" in message
    assert "x" in two_providers.attention.conflicts()


def test_user_picks_one_provider(two_providers: Registry) -> None:
    attention = two_providers.attention
    assert attention.get("x@dist-b").description == "from b"
    assert attention.get("X@Dist_A").description == "from a"  # both halves normalised
    assert attention.get("x@plug_b").description == "from b"  # the plugin name works too
    assert attention.provider("x@dist-b").distribution == "dist-b"
    assert two_providers.get("attention", "x@dist-a").description == "from a"
    with pytest.raises(UnknownNameError, match=r"not provided by 'dist-c'.*dist-a.*dist-b"):
        attention.get("x@dist-c")


def test_blocking_one_provider_resolves_the_conflict(make_dist: MakeDist) -> None:
    make_dist("dist-a", "plug_a_pkg", attention_plugin("x", "from a"), entry="plug_a")
    make_dist("dist-b", "plug_b_pkg", attention_plugin("x", "from b"), entry="plug_b")
    registry = PluginHost(PluginSettings.from_env({"DIFFORGE_PLUGINS": "no:plug_a"})).registry
    assert registry.attention.get("x").description == "from b"


def test_unknown_name_suggests_the_closest(make_dist: MakeDist) -> None:
    make_dist("difforge-qwen", "qwen_pkg", attention_plugin("qwen_image", "q"))
    registry = PluginHost(PluginSettings()).registry
    with pytest.raises(UnknownNameError) as info:
        registry.attention.get("sdpx")
    message = str(info.value)
    assert "unknown attention backend 'sdpx'. Did you mean 'sdpa'?" in message
    assert "Known attention:" in message and "math" in message and "qwen-image" in message
    with pytest.raises(UnknownNameError, match="Did you mean 'flow-euler'"):
        registry.schedulers.get("flow_eulr")
    empty = PluginHost(PluginSettings(autoload=False, blocked=frozenset({"builtin"}))).registry
    with pytest.raises(UnknownNameError, match=r"\(none\).*difforge plugins"):
        empty.caches.get("fbcache")
    with pytest.raises(UnknownNameError, match="choose one of"):
        registry.table("kernels")
    assert isinstance(info.value, KeyError)  # usable where a mapping lookup is expected


@pytest.mark.parametrize("spelling", ["qwen_image", "qwen-image", "Qwen Image", "QWEN.image"])
def test_names_are_normalised(make_dist: MakeDist, spelling: str) -> None:
    make_dist("difforge-qwen", "qwen_pkg", attention_plugin("qwen_image", "q"))
    attention = PluginHost(PluginSettings()).registry.attention
    assert attention.get(spelling).name == "qwen_image"
    assert spelling in attention and "qwen-image" in attention.names()

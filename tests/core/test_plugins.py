"""The plugin manager against real installed distributions (entry points in a temp site folder).

Covers discovery, ``no:NAME`` blocking, autoload off, the API-version range, and the isolation of a
plugin that fails to import, to register, implements an unknown hook or is unavailable.
"""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from difforge.plugins import PluginHost, PluginSettings

MakeDist = Callable[..., Path]
HostFromEnv = Callable[..., PluginHost]

#: the header every generated plugin module starts with
PRELUDE = "from difforge import hookimpl, AttentionSpec, SchedulerSpec, PluginUnavailable\n"


def attention_plugin(name: str) -> str:
    """Source of a plugin module registering one attention backend called ``name``."""
    return PRELUDE + textwrap.dedent(
        f"""
        @hookimpl
        def difforge_register_attention_backends():
            yield AttentionSpec(name={name!r}, fn="x.y:fn", supports="x.y:ok", description={name!r})
        """
    )

GOOD = PRELUDE + textwrap.dedent(
    """
    difforge_api = ">=1,<2"

    @hookimpl
    def difforge_register_attention_backends():
        yield AttentionSpec(name="myattn", fn="myplug_pkg.kernels:attn", supports="myplug_pkg.kernels:ok")

    @hookimpl
    def difforge_register_schedulers():
        return [SchedulerSpec(name="my-sched", factory="myplug_pkg.kernels:Sched")]
    """
)


def test_discovery_records_distribution_and_registers_specs(make_dist: MakeDist) -> None:
    make_dist("difforge-myplug", "myplug_pkg", GOOD, version="0.3.1")
    host = PluginHost(PluginSettings())
    rec = host.records["myplug"]
    assert (rec.status, rec.source, rec.module) == ("ok", "entrypoint", "myplug_pkg.plugin")
    assert (rec.distribution, rec.version, rec.api) == ("difforge-myplug", "0.3.1", ">=1,<2")
    assert rec.hooks == ["difforge_register_attention_backends", "difforge_register_schedulers"]
    registry = host.registry
    assert rec.provides == {"attention": ["myattn"], "schedulers": ["my-sched"]}
    assert registry.attention.provider("myattn").distribution == "difforge-myplug"
    assert registry.schedulers.get("my_sched").factory == "myplug_pkg.kernels:Sched"
    assert "sdpa" in registry.attention and host.records["builtin"].distribution == "difforge"
    assert "myplug_pkg.kernels" not in sys.modules  # lazy references stay lazy


@pytest.mark.parametrize("spelling", ["no:myplug", "no:MyPlug", " no:my_plug , "])
def test_blocked_plugin_is_not_imported(make_dist: MakeDist, host_from_env: HostFromEnv, spelling: str) -> None:
    make_dist("difforge-myplug", "myplug_pkg", GOOD, entry="my-plug" if "_" in spelling else "myplug")
    host = host_from_env(DIFFORGE_PLUGINS=spelling)
    (rec,) = [r for r in host.plugin_rows() if r.module == "myplug_pkg.plugin"]
    assert rec.status == "blocked" and "no:" in (rec.reason or "")
    assert "myattn" not in host.registry.attention
    assert "myplug_pkg.plugin" not in sys.modules


def test_builtin_can_be_blocked(host_from_env: HostFromEnv) -> None:
    host = host_from_env(DIFFORGE_PLUGINS="no:builtin")
    assert host.records["builtin"].status == "blocked" and "sdpa" not in host.registry.attention


def test_autoload_off_still_loads_named_modules(make_dist: MakeDist, host_from_env: HostFromEnv) -> None:
    make_dist("difforge-myplug", "myplug_pkg", GOOD)
    make_dist("other-dist", "otherplug_pkg", attention_plugin("otherattn"), version="2.0")
    host = host_from_env(DIFFORGE_DISABLE_PLUGIN_AUTOLOAD="1", DIFFORGE_PLUGINS="otherplug_pkg.plugin")
    assert not any(r.module == "myplug_pkg.plugin" for r in host.plugin_rows())
    assert "myplug_pkg.plugin" not in sys.modules
    rec = host.records["otherplug-pkg-plugin"]
    assert (rec.status, rec.source, rec.distribution, rec.version) == ("ok", "env", "other-dist", "2.0")
    assert "otherattn" in host.registry.attention and "myattn" not in host.registry.attention
    assert host.records["builtin"].status == "ok"  # the core's own plugin is not "autoloaded"


@pytest.mark.parametrize(
    ("api", "reason"),
    [('">=2"', r"supports difforge API >=2, but this difforge has API version 1; install a version of "
               r"difforge-future made for API 1"),
     ("0", r"API 0.*API version 1"),
     ('"one or two"', r"unreadable difforge_api")],
)
def test_api_version_refusal(make_dist: MakeDist, api: str, reason: str) -> None:
    make_dist("difforge-future", "future_pkg", f"difforge_api = {api}\n" + attention_plugin("futureattn"))
    make_dist("difforge-myplug", "myplug_pkg", GOOD)
    host = PluginHost(PluginSettings())
    rec = host.records["future"]
    assert rec.status == "refused"
    assert rec.reason is not None
    assert re.search(reason, rec.reason), rec.reason
    assert "futureattn" not in host.registry.attention and "myattn" in host.registry.attention


def test_import_failure_is_isolated(make_dist: MakeDist, caplog: pytest.LogCaptureFixture) -> None:
    make_dist("difforge-bad", "bad_pkg", "raise RuntimeError('kernel library missing')\n")
    make_dist("difforge-myplug", "myplug_pkg", GOOD)
    host = PluginHost(PluginSettings())
    rec = host.records["bad"]
    assert rec.status == "broken"
    assert rec.reason == "import failed: RuntimeError: kernel library missing"
    assert rec.distribution == "difforge-bad"
    assert host.records["myplug"].status == "ok" and "myattn" in host.registry.attention
    assert "bad" in caplog.text and "failed to import" in caplog.text


REGISTRATION_FAILURES = {
    "raises": """
        @hookimpl
        def difforge_register_attention_backends():
            raise ValueError("cannot read my kernel table")
        """,
    "yields a non-spec": """
        @hookimpl
        def difforge_register_attention_backends():
            yield {"name": "dictattn"}
        """,
    "yields the wrong spec": """
        @hookimpl
        def difforge_register_attention_backends():
            yield SchedulerSpec(name="wrong", factory="a:b")
        """,
    "returns a string": """
        @hookimpl
        def difforge_register_attention_backends():
            return "sdpa"
        """,
}
REGISTRATION_REASONS = {
    "raises": "registration failed: ValueError: cannot read my kernel table",
    "yields a non-spec": "yielded {'name': 'dictattn'}, which is not a AttentionSpec",
    "yields the wrong spec": "which is not a AttentionSpec",
    "returns a string": "must return an iterable of specs, got str",
}


@pytest.mark.parametrize("case", sorted(REGISTRATION_FAILURES))
def test_registration_failure_registers_nothing(make_dist: MakeDist, case: str) -> None:
    # the scheduler hook runs (and succeeds) before the failing attention hook
    source = PRELUDE + textwrap.dedent(
        """
        @hookimpl
        def difforge_register_schedulers():
            yield SchedulerSpec(name="half-registered", factory="a:b")
        """
    ) + textwrap.dedent(REGISTRATION_FAILURES[case])
    make_dist("difforge-half", "half_pkg", source)
    make_dist("difforge-myplug", "myplug_pkg", GOOD)
    host = PluginHost(PluginSettings())
    registry = host.registry
    rec = host.records["half"]
    assert rec.status == "broken" and REGISTRATION_REASONS[case] in (rec.reason or ""), rec.reason
    assert "half-registered" not in registry.schedulers and rec.provides == {}
    assert "myattn" in registry.attention
    assert host.get_plugin("half") is None


def test_duplicate_names_inside_one_plugin_are_a_registration_failure(make_dist: MakeDist) -> None:
    source = PRELUDE + textwrap.dedent(
        """
        @hookimpl
        def difforge_register_attention_backends():
            yield AttentionSpec(name="twice", fn="a:b", supports="a:c")
            yield AttentionSpec(name="Twice", fn="a:d", supports="a:c")
        """
    )
    make_dist("difforge-twice", "twice_pkg", source)
    host = PluginHost(PluginSettings())
    _ = host.registry
    rec = host.records["twice"]
    assert rec.status == "broken" and "'Twice'" in (rec.reason or "") and "more than once" in (rec.reason or "")
    assert "twice" not in host.registry.attention


def test_invalid_hook_signature_leaves_no_half_registered_plugin(make_dist: MakeDist) -> None:
    source = PRELUDE + textwrap.dedent(
        """
        @hookimpl
        def difforge_pipeline_built(pipeline):
            return "should never run"

        @hookimpl
        def difforge_step_end(pipeline, step, not_an_argument):
            pass
        """
    )
    make_dist("difforge-badsig", "badsig_pkg", source)
    host = PluginHost(PluginSettings())
    rec = host.records["badsig"]
    assert rec.status == "broken" and "not_an_argument" in (rec.reason or "")
    assert host.pm.get_plugin("badsig") is None
    assert host.pm.hook.difforge_pipeline_built(pipeline=None) == []


def test_failing_addhooks_leaves_no_half_registered_plugin(make_dist: MakeDist) -> None:
    source = PRELUDE + textwrap.dedent(
        """
        @hookimpl
        def difforge_addhooks(pluginmanager):
            raise ImportError("no module named hooks")

        @hookimpl
        def difforge_pipeline_built(pipeline):
            return "should never run"
        """
    )
    make_dist("difforge-badadd", "badadd_pkg", source)
    host = PluginHost(PluginSettings())
    assert host.records["badadd"].status == "broken"
    assert "no module named hooks" in (host.records["badadd"].reason or "")
    assert host.pm.get_plugin("badadd") is None
    assert host.pm.hook.difforge_pipeline_built(pipeline=None) == []


@pytest.mark.parametrize("marked", [True, False])
def test_unknown_hook_name_suggests_the_right_one(make_dist: MakeDist, marked: bool) -> None:
    source = PRELUDE + ("@hookimpl\n" if marked else "") + textwrap.dedent(
        """
        def difforge_register_attention_backend():
            return []
        """
    )
    make_dist("difforge-typo", "typo_pkg", source)
    make_dist("difforge-myplug", "myplug_pkg", GOOD)
    host = PluginHost(PluginSettings())
    rec = host.records["typo"]
    assert rec.status == "broken"
    assert rec.reason == (
        "implements unknown hook 'difforge_register_attention_backend' "
        "(did you mean 'difforge_register_attention_backends'?)"
    )
    assert host.records["myplug"].status == "ok" and "myattn" in host.registry.attention


def test_unavailable_at_import_and_at_registration(make_dist: MakeDist) -> None:
    make_dist("difforge-gpuonly", "gpuonly_pkg", PRELUDE + "raise PluginUnavailable('needs triton, not installed')\n")
    late = PRELUDE + textwrap.dedent(
        """
        @hookimpl
        def difforge_register_attention_backends():
            raise PluginUnavailable("no CUDA device")
        """
    )
    make_dist("difforge-late", "late_pkg", late)
    host = PluginHost(PluginSettings())
    _ = host.registry
    assert (host.records["gpuonly"].status, host.records["gpuonly"].reason) == (
        "unavailable",
        "needs triton, not installed",
    )
    assert (host.records["late"].status, host.records["late"].reason) == ("unavailable", "no CUDA device")


def test_same_plugin_name_from_two_distributions(make_dist: MakeDist) -> None:
    make_dist("dist-a", "a_pkg", attention_plugin("from-a"), entry="clash")
    make_dist("dist-b", "b_pkg", attention_plugin("from-b"), entry="clash")
    host = PluginHost(PluginSettings())
    rows = [r for r in host.plugin_rows() if r.name == "clash"]
    assert sorted(r.status for r in rows) == ["broken", "ok"]
    (broken,) = [r for r in rows if r.status == "broken"]
    (ok,) = [r for r in rows if r.status == "ok"]
    assert ok.distribution in (broken.reason or "") and "no:clash" in (broken.reason or "")
    assert len([n for n in ("from-a", "from-b") if n in host.registry.attention]) == 1


def test_addhooks_lets_a_plugin_add_a_hook_for_others(make_dist: MakeDist) -> None:
    hooks = textwrap.dedent(
        """
        from difforge import hookspec

        @hookspec
        def difforge_myplug_transform(value):
            "Plugins return a transformed value."
        """
    )
    provider = PRELUDE + textwrap.dedent(
        """
        @hookimpl
        def difforge_addhooks(pluginmanager):
            from . import hooks
            pluginmanager.add_hookspecs(hooks)
        """
    )
    user = PRELUDE + textwrap.dedent(
        """
        @hookimpl
        def difforge_myplug_transform(value):
            return value * 10
        """
    )
    # the implementing plugin sorts first, so it is loaded before the spec exists
    make_dist("difforge-aaa-user", "aaauser_pkg", user)
    make_dist("difforge-myplug", "myplug_pkg", provider, extra={"hooks": hooks})
    host = PluginHost(PluginSettings())
    assert host.records["aaauser"].status == "ok", host.records["aaauser"].reason
    assert host.records["aaauser"].hooks == ["difforge_myplug_transform"]
    assert host.pm.hook.difforge_myplug_transform(value=4) == [40]


def test_addhooks_implementation_without_its_provider_is_unknown(make_dist: MakeDist, host_from_env: HostFromEnv) -> None:
    user = PRELUDE + "@hookimpl\ndef difforge_myplug_transform(value):\n    return value\n"
    make_dist("difforge-aaa-user", "aaauser_pkg", user)
    host = host_from_env()
    assert host.records["aaauser"].status == "broken"
    assert "difforge_myplug_transform" in (host.records["aaauser"].reason or "")

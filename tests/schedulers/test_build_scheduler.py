"""build_scheduler: names, dicts, option merging and the errors a user sees."""

from __future__ import annotations

import types

import pytest

import difforge
from difforge import SchedulerSpec, hookimpl
from difforge.errors import ConfigError, UnknownNameError
from difforge.schedulers import build_scheduler
from difforge.schedulers.flow_euler import FlowEulerScheduler
from difforge.schedulers.flow_unipc import FlowUniPCScheduler


@pytest.mark.parametrize("name", ["flow-euler", "flow_euler", "Flow-Euler", "flow-euler@builtin"])
def test_name_forms(name):
    assert isinstance(build_scheduler(name), FlowEulerScheduler)


def test_dict_form_and_defaults():
    unipc = build_scheduler({"name": "flow-unipc", "shift": 5.0})
    assert isinstance(unipc, FlowUniPCScheduler) and unipc.shift == 5.0 and unipc.solver_order == 2
    euler = build_scheduler(None)
    assert isinstance(euler, FlowEulerScheduler) and euler.shift == 1.0 and not euler.dynamic_shift
    # the spec's defaults are FLUX.1-dev's released values
    dev = build_scheduler({"name": "flow-euler", "dynamic_shift": True})
    assert (dev.base_shift, dev.max_shift, dev.base_image_seq_len, dev.max_image_seq_len) == (0.5, 1.15, 256, 4096)


def test_pipeline_defaults():
    wan = {"name": "flow-unipc", "shift": 3.0, "solver_order": 2}
    assert build_scheduler(None, defaults=wan).shift == 3.0
    # another scheduler keeps the options it knows and ignores the rest
    euler = build_scheduler("flow-euler", defaults=wan)
    assert isinstance(euler, FlowEulerScheduler) and euler.shift == 3.0
    # the user's options win over the pipeline's
    assert build_scheduler({"name": "flow-unipc", "shift": 5.0}, defaults=wan).shift == 5.0


def test_user_static_shift_replaces_default_dynamic_shift():
    flux_dev = {"name": "flow-euler", "shift": 3.0, "dynamic_shift": True}
    assert build_scheduler(None, defaults=flux_dev).dynamic_shift
    chosen = build_scheduler({"name": "flow-euler", "shift": 2.0}, defaults=flux_dev)
    assert chosen.shift == 2.0 and not chosen.dynamic_shift
    both = build_scheduler({"name": "flow-euler", "shift": 2.0, "dynamic_shift": True})
    assert both.dynamic_shift


def test_unknown_name_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'flow-euler'") as info:
        build_scheduler("flow-eular")
    assert isinstance(info.value, ConfigError)
    assert "flow-unipc" in str(info.value)


def test_unknown_option_names_it_and_the_known_ones():
    with pytest.raises(ConfigError) as info:
        build_scheduler({"name": "flow-euler", "shfit": 3.0})
    message = str(info.value)
    assert "'shfit'" in message and "Did you mean 'shift'" in message
    assert "dynamic_shift" in message and "shift_terminal" in message
    with pytest.raises(ConfigError, match="'flow_shift'.*Known options: shift, solver_order"):
        build_scheduler({"name": "flow-unipc", "flow_shift": 3.0})


def test_bad_choices():
    with pytest.raises(ConfigError, match="'name' entry"):
        build_scheduler({"shift": 3.0})
    with pytest.raises(ConfigError, match="name or a dict"):
        build_scheduler(3.0)
    with pytest.raises(ConfigError, match="time_shift_type"):
        build_scheduler({"name": "flow-euler", "time_shift_type": "cosine"})


_only_wan = types.ModuleType("only_wan_scheduler_plugin")
_only_wan.difforge_api = ">=1"


@hookimpl
def _register(*_args):
    yield SchedulerSpec(
        name="wan-only",
        factory="difforge.schedulers.flow_unipc:FlowUniPCScheduler",
        families=("wan",),
        options={"shift": 1.0},
    )


_only_wan.difforge_register_schedulers = _register


@pytest.fixture
def wan_only_scheduler():
    difforge.reload_plugins(plugins=[_only_wan])
    try:
        yield
    finally:
        difforge.reload_plugins()


def test_family_is_checked(wan_only_scheduler):
    assert isinstance(build_scheduler("wan-only", family="wan"), FlowUniPCScheduler)
    assert isinstance(build_scheduler("flow-euler", family="flux"), FlowEulerScheduler)
    with pytest.raises(ConfigError, match="does not fit model family 'flux'"):
        build_scheduler("wan-only", family="flux")

"""The core's own plugin: default attention backends and flow-matching schedulers.

It is registered through the same hooks as any installed plugin (name ``builtin``), so it shows
in ``difforge plugins`` and can be blocked with ``DIFFORGE_PLUGINS=no:builtin``. Like every entry
module it imports nothing heavy: the implementations are named by lazy references.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..hookspecs import hookimpl
from ..specs import AttentionSpec, SchedulerSpec

difforge_api = ">=1,<2"


@hookimpl
def difforge_register_attention_backends() -> Iterator[AttentionSpec]:
    yield AttentionSpec(
        name="sdpa",
        fn="difforge.builtin.attention:sdpa_attention",
        supports="difforge.builtin.attention:sdpa_supports",
        priority=10,
        description="torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math)",
    )
    yield AttentionSpec(
        name="math",
        fn="difforge.builtin.attention:math_attention",
        supports="difforge.builtin.attention:math_supports",
        priority=0,
        description="plain float32 softmax(QK^T)V; the reference implementation",
    )


@hookimpl
def difforge_register_schedulers() -> Iterator[SchedulerSpec]:
    yield SchedulerSpec(
        name="flow-euler",
        factory="difforge.schedulers.flow_euler:FlowEulerScheduler",
        options={
            "shift": None,
            "dynamic_shift": False,
            "base_shift": 0.5,
            "max_shift": 1.15,
            "base_image_seq_len": 256,
            "max_image_seq_len": 4096,
            "time_shift_type": "exponential",
            "shift_terminal": None,
            "num_train_timesteps": 1000,
            "spacing": "flux",
        },
        description="first-order Euler on the flow-matching ODE; static, resolution-dependent or terminal-stretched shift",
    )
    yield SchedulerSpec(
        name="flow-unipc",
        factory="difforge.schedulers.flow_unipc:FlowUniPCScheduler",
        options={"shift": 1.0, "solver_order": 2, "num_train_timesteps": 1000},
        description="UniPC multistep solver (bh2) on flow-prediction sigmas, as the original Wan code samples",
    )

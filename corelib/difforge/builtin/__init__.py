"""The core's own plugin: default attention backends and flow-matching schedulers.

It is registered through the same hooks as any installed plugin (name ``builtin``), so it shows
in ``difforge plugins`` and can be blocked with ``DIFFORGE_PLUGINS=no:builtin``. Like every entry
module it imports nothing heavy: the implementations are named by lazy references.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..hookspecs import hookimpl
from ..specs import AttentionSpec, OffloadSpec, SchedulerSpec

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


@hookimpl
def difforge_register_offload_backends() -> Iterator[OffloadSpec]:
    yield OffloadSpec(
        name="cpu",
        kind="location",
        apply="difforge.builtin.offload:apply_cpu",
        options={"offload_device": "cpu", "components": None},
        description="model-level: each component lives on offload_device and moves to the compute device for its turn",
    )
    yield OffloadSpec(
        name="sequential",
        kind="location",
        apply="difforge.builtin.offload:apply_sequential",
        options={"offload_device": "cpu", "pin_memory": True, "prefetch": True, "vram_limit": None, "vram_buffer": 0.5,
                 "components": None},
        description="stream weights block by block to the compute device (CUDA: pinned memory, next block prefetched); "
        "vram_limit/vram_buffer (GiB) keep what fits resident",
    )
    yield OffloadSpec(
        name="disk",
        kind="location",
        apply="difforge.builtin.offload:apply_disk",
        options={"offload_dir": None, "verify": False, "vram_limit": None, "vram_buffer": 0.5, "components": None},
        description="weights stay in the checkpoint files and are read block by block for compute "
        "(resident: about one block plus activations)",
    )

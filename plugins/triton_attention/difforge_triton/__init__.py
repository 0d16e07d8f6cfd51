"""difforge-triton: a fused Triton attention kernel as the ``triton`` attention backend.

This entry module is light: it imports neither torch nor triton. The backend is named by lazy
references (:mod:`.backend` for ``supports`` and the call, :mod:`.kernel` for the Triton kernel).
Without triton installed the plugin is listed as *unavailable* (not broken) by ``difforge plugins``.

Priority: 5, below ``sdpa`` (10), so ``auto`` keeps torch's SDPA until the kernel is measured
faster on a GPU (see the README and ``benchmarks/attention.py``). Ask for it by name
(``attention="triton"``, ``DIFFORGE_ATTENTION=triton``), or set ``DIFFORGE_TRITON_PRIORITY``
(e.g. 20) to let ``auto`` prefer it where it supports a call.
"""

from __future__ import annotations

import importlib.util
import os

from difforge import AttentionSpec, ConfigError, PluginUnavailable, hookimpl

difforge_api = ">=1,<2"

DEFAULT_PRIORITY = 5


def _priority() -> int:
    raw = os.environ.get("DIFFORGE_TRITON_PRIORITY")
    if raw is None:
        return DEFAULT_PRIORITY
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"DIFFORGE_TRITON_PRIORITY must be an integer (sdpa has 10), got {raw!r}") from None


@hookimpl
def difforge_register_attention_backends() -> list[AttentionSpec]:
    if importlib.util.find_spec("triton") is None:
        raise PluginUnavailable("the triton package is not installed: pip install 'triton==3.9.0' (Linux, CUDA GPUs)")
    return [
        AttentionSpec(
            name="triton",
            fn="difforge_triton.backend:attention",
            supports="difforge_triton.backend:supports",
            priority=_priority(),
            description="fused Triton flash-attention forward (fp16/bf16/fp32, head dim 64/128, masks, GQA)",
        )
    ]

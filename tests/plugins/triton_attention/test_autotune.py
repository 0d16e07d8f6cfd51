"""The GPU autotuning setup, checked without a GPU (the configs were compiled offline for sm80 and
sm90 with ``benchmarks/attention.py --compile-only``; their speed is measured only on a GPU)."""

from __future__ import annotations

import pytest
import torch
import triton

from difforge_triton import kernel

SHARED = {(8, 0): 166912, (8, 6): 101376, (9, 0): 232448}  # opt-in shared memory per block


@pytest.mark.parametrize("capability", list(SHARED), ids=lambda c: f"sm{c[0]}{c[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_pruned_configs_fit(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], dtype: torch.dtype, head_dim: int
) -> None:
    monkeypatch.setattr(kernel, "_shared_memory_limit", lambda: SHARED[capability])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    configs = kernel.autotune_configs(capability)
    kept = kernel._prune(configs, {"Q": torch.empty(0, dtype=dtype)}, HEAD_DIM=head_dim)
    assert kept and all(c in configs for c in kept)
    buffers = (lambda c: c.num_stages) if capability[0] >= 9 else (lambda c: c.num_stages - 1)
    for c in kept:
        shared = (c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"] * buffers(c)) * head_dim * dtype.itemsize
        assert shared <= SHARED[capability]
        assert c.kwargs["BLOCK_M"] * head_dim <= 64 * 32 * c.num_warps  # no register spills
    if dtype == torch.bfloat16:
        assert len(kept) >= 3  # a real choice for the 16-bit dtypes


def test_autotuner_keys() -> None:
    tuner = kernel._kernel(False, (9, 0))
    assert isinstance(tuner, triton.runtime.Autotuner)
    assert tuner.keys == ["HEAD_DIM", "N_Q", "N_KV"] and len(tuner.configs) == len(kernel.autotune_configs((9, 0)))

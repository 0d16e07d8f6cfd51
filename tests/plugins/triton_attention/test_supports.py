"""What the ``triton`` backend accepts and refuses, strict dispatch by name, and its place in ``auto``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import difforge
import difforge_triton
from difforge.ops import attention
from difforge.ops.attention import attention_backend
from difforge.plugins import PluginSettings
from difforge.specs import AttentionQuery
from difforge_triton.backend import supports

OK = AttentionQuery(
    device_type="cpu", dtype=torch.bfloat16, batch=2, heads=4, kv_heads=2, q_len=77, kv_len=300, head_dim=128,
    has_mask=True, mask_shape=(2, 1, 1, 300),
)


def query(**changes: object) -> AttentionQuery:
    return dataclasses.replace(OK, **changes)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"dtype": torch.float16, "head_dim": 64, "has_mask": False, "mask_shape": None},
        {"dtype": torch.float32, "kv_heads": 4},
        {"mask_shape": (300,)},
        {"mask_shape": (1, 4, 77, 300)},
        {"mask_shape": (2, 1, 77, 1)},
    ],
    ids=["bf16-d128-key-mask", "fp16-d64", "fp32", "mask-1d", "mask-full", "mask-per-query"],
)
def test_supported(changes: dict) -> None:
    assert supports(query(**changes)) is True


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"head_dim": 96}, "head dim 96 is not supported (64 or 128)"),
        ({"head_dim": 16}, "head dim 16"),
        ({"dtype": torch.float64}, "dtype float64 is not supported"),
        ({"mask_shape": (2, 1, 5, 300)}, "does not broadcast"),
        ({"mask_shape": (1, 1, 1, 1, 300)}, "does not broadcast"),
        ({"kv_len": 0, "mask_shape": None}, "empty"),
    ],
)
def test_refused_with_reason(changes: dict, reason: str) -> None:
    answer = supports(query(**changes))
    assert isinstance(answer, str) and reason in answer


def test_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    answer = supports(OK)
    assert isinstance(answer, str) and "CUDA" in answer and "TRITON_INTERPRET" in answer


def test_named_backend_is_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(difforge.ConfigError, match=r"'triton' cannot serve this call .*head dim 32 is not supported"):
        attention(q, q, q, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(difforge.ConfigError, match="runs on CUDA devices, not cpu"):
        attention(q, q, q, backend="triton")


def test_registered_below_sdpa() -> None:
    spec = difforge.get_registry().attention.get("triton@difforge-triton")
    assert spec.name == "triton" and spec.priority == difforge_triton.DEFAULT_PRIORITY < 10
    assert attention_backend(OK, "auto").name == "sdpa"  # auto keeps SDPA until triton is measured faster


@pytest.mark.usefixtures("restore_registry")
def test_priority_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFORGE_TRITON_PRIORITY", "20")
    difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_triton])
    assert attention_backend(OK, "auto").name == "triton"
    assert attention_backend(query(head_dim=80), "auto").name == "sdpa"  # what triton refuses goes on to sdpa

    monkeypatch.setenv("DIFFORGE_TRITON_PRIORITY", "high")
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_triton])
    row = next(r for r in host.plugin_rows() if r.name == "difforge_triton")
    assert row.status == "broken" and "DIFFORGE_TRITON_PRIORITY must be an integer" in row.reason

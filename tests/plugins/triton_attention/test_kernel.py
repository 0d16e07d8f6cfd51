"""The Triton kernel under the interpreter against the ``math`` reference, through ``difforge.ops.attention``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from difforge.builtin.attention import math_attention
from difforge.ops import attention
from difforge_triton.kernel import flash_attention

pytestmark = pytest.mark.usefixtures("interpreted")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    mask: str | None = None  # None, "key" [B,1,1,Nk], "key-1d" [Nk], "tile" [B,1,Nq,Nk], "heads" [1,H,Nq,Nk]
    scale: float | None = None


CASES = {
    "self-tails-d64": Case(1, 2, 2, 37, 37, 64),
    "even-d128": Case(1, 1, 1, 32, 32, 128),
    "cross-d128": Case(2, 2, 2, 20, 45, 128, scale=0.3),
    "gqa": Case(1, 4, 2, 19, 33, 64),
    "mqa-key-mask": Case(2, 4, 1, 17, 40, 64, mask="key"),
    "key-mask-1d": Case(1, 2, 2, 9, 23, 128, mask="key-1d"),
    "tile-mask-cross": Case(2, 2, 2, 21, 30, 64, mask="tile"),
    "head-mask-gqa": Case(1, 2, 1, 16, 18, 128, mask="heads"),
}


def make_mask(case: Case, gen: torch.Generator) -> torch.Tensor | None:
    shape = {
        None: None,
        "key": (case.batch, 1, 1, case.kv_len),
        "key-1d": (case.kv_len,),
        "tile": (case.batch, 1, case.q_len, case.kv_len),
        "heads": (1, case.heads, case.q_len, case.kv_len),
    }[case.mask]
    if shape is None:
        return None
    mask = torch.rand(shape, generator=gen) > 0.4
    mask[..., 0] = True  # no query row without a key (the reference gives NaN there)
    return mask


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(case.batch, case.heads, case.q_len, case.head_dim, generator=gen)
    k = torch.randn(case.batch, case.kv_heads, case.kv_len, case.head_dim, generator=gen)
    v = torch.randn(case.batch, case.kv_heads, case.kv_len, case.head_dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), make_mask(case, gen)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err:.3g} > {TOL[dtype]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_math(name: str, dtype: torch.dtype) -> None:
    case = CASES[name]
    q, k, v, mask = make_inputs(case, dtype)
    out = attention(q, k, v, mask=mask, scale=case.scale, backend="triton")
    assert_close(out, math_attention(q, k, v, mask=mask, scale=case.scale), dtype)


@pytest.mark.parametrize("block_m, block_n", [(32, 64), (16, 32)])
def test_other_tiles(block_m: int, block_n: int) -> None:
    """Fewer keys than one tile (only the tail step runs), and tiles of different sizes."""
    case = Case(1, 2, 1, 40, 27, 64, mask="key")
    q, k, v, mask = make_inputs(case, torch.float32, seed=1)
    out = flash_attention(q, k, v, mask=mask, block_m=block_m, block_n=block_n)
    assert_close(out, math_attention(q, k, v, mask=mask), torch.float32)


def test_strided_inputs() -> None:
    """Views of a fused qkv projection (as models make them) and a last dim that is not contiguous."""
    gen = torch.Generator().manual_seed(2)
    b, n, h, d = 2, 19, 2, 64
    q, k, v = torch.randn(b, n, 3, h, d, generator=gen).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    out = attention(q, k, v, backend="triton")
    assert_close(out, math_attention(q, k, v), torch.float32)
    kt = k.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) != 1
    assert kt.stride(-1) != 1
    assert_close(attention(q, kt, v, backend="triton"), math_attention(q, k, v), torch.float32)


def test_fully_masked_rows_are_zero() -> None:
    case = Case(1, 1, 1, 5, 20, 64)
    q, k, v, _ = make_inputs(case, torch.float32)
    mask = torch.ones(1, 1, 5, 20, dtype=torch.bool)
    mask[:, :, 2] = False
    out = attention(q, k, v, mask=mask, backend="triton")
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    rows = [0, 1, 3, 4]
    assert_close(out[:, :, rows], math_attention(q, k, v, mask=mask)[:, :, rows], torch.float32)

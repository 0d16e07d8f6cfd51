"""A fused attention forward kernel in Triton (FlashAttention-2 style).

Each program owns ``BLOCK_M`` queries of one (batch, head) and streams the keys and values of
that head's kv head in ``BLOCK_N`` tiles, keeping a running maximum, a running softmax sum and an
unnormalised output accumulator in registers (online softmax): the ``Nq x Nk`` score matrix never
exists in memory. Non-causal. Supported:

* ``[B, H, N, D]`` inputs with any strides (copied if the last is not 1), fp16 / bf16 / fp32, ``D`` in {64, 128};
* any lengths, separate for queries and keys (tails are masked: the full key tiles run without
  bounds checks, the one partial tile with them);
* grouped-query attention: query head ``h`` reads kv head ``h // (H // H_kv)``, no repeat;
* an optional boolean mask broadcastable to ``[B, H, Nq, Nk]``: a key padding mask (no ``Nq``
  extent, e.g. ``[B, 1, 1, Nk]``) is read as one vector per key tile, any other mask as a tile.
  Query rows that may attend to no key at all come out as zeros (the ``math`` reference gives NaN).

The kernel is made on first use. Under ``TRITON_INTERPRET=1`` (which, as for any Triton code, must
be set before triton is imported) it runs in Triton's interpreter on any device with a fixed small
tile, and its ``tl.dot`` operands are upcast to fp32 (Triton 3.9's interpreter computes bf16 dots
wrongly, triton-lang/triton#11584). On CUDA it is autotuned over block sizes, warps and stages
chosen for the GPU's architecture (Ampere or Hopper), keyed on head dim and lengths (and dtype).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["flash_attention", "interpreting", "autotune_configs"]

log = logging.getLogger(__name__)

# mask modes (a constexpr of the kernel)
NO_MASK, KEY_MASK, TILE_MASK = 0, 1, 2


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _attn_fwd(
    Q, K, V, Mask, Out,  # noqa: N803 (Triton's naming)
    sm_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, GROUPS, N_Q, N_KV,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: ``BLOCK_M`` queries of one (batch, head) against all keys of its kv head."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kvh = (h // GROUPS).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]  # [D, BLOCK_N]: K^T
    v_base = V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]  # [BLOCK_N, D]
    m_base = Mask + b * stride_mb + h * stride_mh

    qk_scale = sm_scale * 1.4426950408889634  # log2(e): the softmax is computed with exp2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_full = (N_KV // BLOCK_N) * BLOCK_N
    # phase 0: the full key tiles, no bounds checks; phase 1: the partial tail tile (if any)
    for phase in tl.static_range(2):
        lo = 0 if phase == 0 else n_full
        hi = n_full if phase == 0 else N_KV
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            if phase == 0:
                k = tl.load(k_base + start_n * stride_kn)
                v = tl.load(v_base + start_n * stride_vn)
            else:
                k = tl.load(k_base + start_n * stride_kn, mask=cols[None, :] < N_KV, other=0.0)
                v = tl.load(v_base + start_n * stride_vn, mask=cols[:, None] < N_KV, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale

            if MASK_MODE == 1:  # key padding: one vector per tile
                keep = tl.load(m_base + cols * stride_mn, mask=cols < N_KV, other=0) != 0
                qk = tl.where(keep[None, :], qk, float("-inf"))
            elif MASK_MODE == 2:  # general mask: one tile
                in_bounds = row_ok[:, None] & (cols[None, :] < N_KV)
                rows = offs_m[:, None].to(tl.int64) * stride_mm  # Nq * Nk may pass 2**31
                keep = tl.load(m_base + rows + cols[None, :] * stride_mn, mask=in_bounds, other=0) != 0
                qk = tl.where(keep, qk, float("-inf"))
            elif phase == 1:
                qk = tl.where(cols[None, :] < N_KV, qk, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(qk, 1))
            if MASK_MODE != 0:  # a row may have had nothing to attend to yet: keep exp2 away from -inf - -inf
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_safe = m_new
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if UPCAST:
                acc += tl.dot(p, v, input_precision=PRECISION)
            else:
                acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # fully masked rows: 0 / 1 = 0
    out = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------- autotuning


def autotune_configs(capability: tuple[int, int]) -> list[triton.Config]:
    """Block sizes, warps and pipeline stages to try on a GPU of compute ``capability``.

    A config needs about ``(BLOCK_M + 2 * BLOCK_N * buffers) * head_dim * itemsize`` bytes of
    shared memory (the Q tile and the buffered K and V tiles: ``num_stages`` of each on Hopper,
    ``num_stages - 1`` on Ampere, as compiled by Triton 3.9). Hopper (sm90, 227 KB)
    takes 128 x 128 tiles with 3 stages at head dim 128 and feeds them to wgmma with 8 warps;
    Ampere has 163 KB (sm80) or 99 KB (sm86/89), so its tiles are narrower or shallower.
    :func:`_prune` drops the configs that do not fit the device or would spill registers at the
    call's head dim; the last, small one fits fp32 (a testing dtype) everywhere.
    """

    def cfg(m: int, n: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)

    if capability[0] >= 9:  # Hopper and newer
        return [
            cfg(128, 128, 8, 3), cfg(128, 128, 8, 2), cfg(128, 64, 8, 3), cfg(128, 64, 4, 4),
            cfg(64, 128, 4, 3), cfg(64, 64, 4, 4), cfg(64, 32, 4, 2),
        ]
    return [  # Ampere / Ada
        cfg(128, 64, 4, 3), cfg(128, 64, 8, 3), cfg(128, 128, 8, 2), cfg(128, 32, 4, 4),
        cfg(64, 64, 4, 3), cfg(64, 32, 4, 4), cfg(64, 32, 4, 2),
    ]


def _shared_memory_limit() -> int:
    try:
        device = torch.cuda.current_device()
        return int(triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"])
    except Exception:  # pragma: no cover - fall back on the smallest Ampere part
        return 101376


MAX_ACC_PER_THREAD = 64
"""fp32 accumulator elements per thread (``BLOCK_M * head_dim / (32 * num_warps)``) beyond which
ptxas spills registers (checked with ``ptxas -v`` for sm80: 128 spills hundreds of bytes)."""


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Drop configs that spill registers at this head dim or whose tiles do not fit the device's
    shared memory (saves compiling and timing them)."""
    budget = _shared_memory_limit()
    itemsize = named_args["Q"].element_size()
    head_dim = kwargs["HEAD_DIM"]
    hopper = torch.cuda.get_device_capability()[0] >= 9  # buffers num_stages K/V tiles; Ampere num_stages - 1

    def needs(c: triton.Config) -> int:
        buffers = c.num_stages if hopper else max(c.num_stages - 1, 1)
        return (c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"] * buffers) * head_dim * itemsize

    def acc_per_thread(c: triton.Config) -> int:
        return c.kwargs["BLOCK_M"] * head_dim // (32 * c.num_warps)

    kept = [c for c in configs if needs(c) <= budget and acc_per_thread(c) <= MAX_ACC_PER_THREAD]
    return kept or [min(configs, key=needs)]


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool, capability: tuple[int, int] | None) -> Callable[..., Any]:
    """The kernel: plain under the interpreter, autotuned for ``capability`` on a GPU."""
    kernel = triton.jit(_attn_fwd)
    if interpret or capability is None:
        return kernel
    log.debug("difforge-triton: autotuning attention for compute capability %s", capability)
    return triton.autotune(
        configs=autotune_configs(capability),
        key=["HEAD_DIM", "N_Q", "N_KV"],
        prune_configs_by={"early_config_prune": _prune},
    )(kernel)


# ---------------------------------------------------------------- launcher


def _mask_args(
    mask: torch.Tensor | None, shape: tuple[int, int, int, int], like: torch.Tensor
) -> tuple[torch.Tensor, list[int], int]:
    """The mask as bytes broadcast (by strides, without copying) to ``shape``, its strides and its mode."""
    if mask is None:
        return like, [0, 0, 0, 0], NO_MASK
    full = torch.broadcast_to(mask.to(like.device), shape)
    strides = [0 if size == 1 else stride for size, stride in zip(full.shape, full.stride())]
    mode = KEY_MASK if strides[2] == 0 else TILE_MASK
    return full.view(torch.uint8), strides, mode


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    block_m: int = 16,
    block_n: int = 16,
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over ``[B, H, N, D]`` tensors; returns ``[B, H, Nq, D]`` in q's dtype.

    ``block_m`` / ``block_n`` are the tile sizes used under the interpreter (on CUDA the autotuner
    chooses). The caller (:func:`difforge_triton.backend.attention`) has checked the call with
    ``supports``.
    """
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_kv = k.shape[1], k.shape[2]
    out = torch.empty((batch, heads, n_q, head_dim), dtype=q.dtype, device=q.device)
    mask_t, mask_strides, mask_mode = _mask_args(mask, (batch, heads, n_q, n_kv), q)
    interpret = interpreting()
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda and not interpret else None
    kernel = _kernel(interpret, capability)

    args: list[Any] = [
        q, k, v, mask_t, out,
        float(head_dim**-0.5 if scale is None else scale),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *mask_strides,
        heads, heads // kv_heads, n_q, n_kv,
    ]
    consts: dict[str, Any] = {
        "HEAD_DIM": head_dim,
        "MASK_MODE": mask_mode,
        "UPCAST": interpret,
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",  # tf32 only matters for fp32 operands
    }
    if capability is None:
        grid = (triton.cdiv(n_q, block_m), batch * heads)
        kernel[grid](*args, **consts, BLOCK_M=block_m, BLOCK_N=block_n)
    else:
        with torch.cuda.device(q.device):  # Triton launches on the current device
            kernel[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads)](*args, **consts)
    return out

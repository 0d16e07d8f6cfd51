"""Attention throughput: the difforge-triton kernel vs torch SDPA (flash and cuDNN backends) on a GPU.

Shapes (B, H, N, D): B=1, H=24, D=128 (Flux / Qwen-Image) at N in {1024, 4096, 8192, 16384}, and the
Wan2.1 1.3B self-attention (H=12, N=32760 tokens of an 81-frame 480x832 video). TFLOP/s counts the
two matmuls, ``4 * B * H * Nq * Nk * D`` FLOPs, over the median time of ``triton.testing.do_bench``.
The kernel is autotuned first (its chosen config is recorded); every output is checked against
SDPA's default backend.

    python benchmarks/attention.py                    # bf16
    python benchmarks/attention.py --dtype fp16
    python benchmarks/attention.py --mask             # with a key padding mask [B, 1, 1, N] (no flash SDPA)
    python benchmarks/attention.py --compile-only     # no GPU: compile for sm80 and sm90, report shared memory

Writes ``benchmarks/results/attention.json`` (``attention-compile.json`` with ``--compile-only``; or
``--out``). On a machine without CUDA nothing is timed: the script says so and runs a correctness check
instead, the kernel in Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported) on
each distinct batch, heads and head dim of the shapes with the sequence cut to ``--check-len`` tokens (default 77, not a
multiple of the tile; with ``--mask`` a key padding mask), in float32 against torch SDPA: it prints the
largest difference and exits 1 if one exceeds 1e-5. It writes no JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("benchmarks.attention")

SHAPES: list[tuple[str, int, int, int, int]] = [  # name, B, H, N, D
    ("N=1024", 1, 24, 1024, 128),
    ("N=4096", 1, 24, 4096, 128),
    ("N=8192", 1, 24, 8192, 128),
    ("N=16384", 1, 24, 16384, 128),
    ("wan-1.3b", 1, 12, 32760, 128),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS = Path(__file__).parent / "results"


def sdpa_backends() -> dict[str, Any]:
    """The SDPA backends to pin with ``torch.nn.attention.sdpa_kernel`` (None: torch's own choice)."""
    from torch.nn.attention import SDPBackend

    backends: dict[str, Any] = {"sdpa": None, "sdpa-flash": SDPBackend.FLASH_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends["sdpa-cudnn"] = SDPBackend.CUDNN_ATTENTION
    return backends


@contextlib.contextmanager
def pinned(backend: Any) -> Iterator[None]:
    if backend is None:
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        yield


def measure(fn: Callable[[], torch.Tensor], flops: float) -> dict[str, float]:
    from triton.testing import do_bench

    ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
    return {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}


def bench_shape(name: str, b: int, h: int, n: int, d: int, dtype: torch.dtype, with_mask: bool) -> list[dict[str, Any]]:
    import torch.nn.functional as F

    from difforge_triton import kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    mask = None
    if with_mask:
        mask = torch.ones(b, 1, 1, n, device="cuda", dtype=torch.bool)
        mask[..., int(n * 0.9) :] = False  # 10% padding
    flops = 4.0 * b * h * n * n * d
    rows: list[dict[str, Any]] = []
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    t0 = time.perf_counter()
    out = kernel.flash_attention(q, k, v, mask=mask)  # the first call autotunes
    torch.cuda.synchronize()
    tuner = kernel._kernel(False, torch.cuda.get_device_capability(q.device))
    row = {"backend": "triton", "tune_s": time.perf_counter() - t0, "config": str(getattr(tuner, "best_config", None))}
    row.update(measure(lambda: kernel.flash_attention(q, k, v, mask=mask), flops))
    row["max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
    rows.append(row)

    for label, backend in sdpa_backends().items():
        try:
            with pinned(backend):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                timing = measure(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), flops)
            rows.append({"backend": label, **timing})
        except RuntimeError as exc:  # the pinned backend cannot serve this call (e.g. flash with a mask)
            rows.append({"backend": label, "error": str(exc).splitlines()[0][:200]})
    for row in rows:
        row.update(shape=name, batch=b, heads=h, seq_len=n, head_dim=d)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    lines = [f"{'shape':10} " + " ".join(f"{b:>11}" for b in backends) + f" {'triton/best':>12}  (TFLOP/s; best = fastest SDPA)"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by = {r["backend"]: r for r in rows if r["shape"] == shape}
        cells = [f"{by[b]['tflops']:11.1f}" if "tflops" in by.get(b, {}) else f"{'-':>11}" for b in backends]
        best_sdpa = max((r["tflops"] for b, r in by.items() if b != "triton" and "tflops" in r), default=None)
        ratio = f"{by['triton']['tflops'] / best_sdpa:12.2f}" if best_sdpa else f"{'-':>12}"
        lines.append(f"{shape:10} " + " ".join(cells) + " " + ratio)
    return "\n".join(lines)


# ---------------------------------------------------------------- compile check (no GPU needed)


def compile_check(dtype: str, head_dim: int = 128) -> list[dict[str, Any]]:
    """Compile the kernel for sm80 and sm90, each with its autotune configs, without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from difforge_triton import kernel

    names = list(inspect.signature(kernel._attn_fwd).parameters)
    pointers = ("Q", "K", "V", "Mask", "Out")
    consts = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "MASK_MODE", "UPCAST", "PRECISION")

    def arg_type(name: str) -> str:
        if name in pointers:
            return "*u8" if name == "Mask" else f"*{dtype}"
        return "constexpr" if name in consts else "fp32" if name == "sm_scale" else "i32"

    signature = {name: arg_type(name) for name in names}
    # what the JIT specialises for contiguous [B, H, N, D] tensors: 16-byte aligned pointers and strides
    aligned = [i for i, n in enumerate(names) if n in pointers or n.startswith(("stride_q", "stride_k", "stride_v", "stride_o"))]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    fn = triton.jit(kernel._attn_fwd)
    rows = []
    for arch in (80, 90):
        for config in kernel.autotune_configs((arch // 10, arch % 10)):
            values = {"HEAD_DIM": head_dim, "MASK_MODE": kernel.KEY_MASK, "UPCAST": False, "PRECISION": "tf32"}
            values.update(config.kwargs)
            src = ASTSource(fn, signature, constexprs={(names.index(c),): values[c] for c in consts}, attrs=attrs)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                row: dict[str, Any] = {"shared_bytes": compiled.metadata.shared}
            except Exception as exc:  # report and go on
                row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            row.update(arch=f"sm{arch}", head_dim=head_dim, config=str(config), compile_s=round(time.perf_counter() - t0, 1))
            log.info("%s %-60s %s", row["arch"], row["config"], row.get("shared_bytes", row.get("error")))
            rows.append(row)
    return rows


# ---------------------------------------------------------------- CPU: a correctness check in the interpreter

CHECK_ATOL = 1e-5


def interpret_check(with_mask: bool, length: int) -> int:
    """Each shape's (B, H, D) at ``length`` tokens, float32, the kernel (interpreted) vs torch SDPA; 0 if all agree."""
    import torch.nn.functional as F

    from difforge_triton import kernel

    worst = 0.0
    checked: set[tuple[int, int, int, int]] = set()
    for name, b, h, n, d in SHAPES:
        n = min(n, length)
        if (b, h, n, d) in checked:  # the N=... shapes differ only in length: cut, they are one
            continue
        checked.add((b, h, n, d))
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
        mask = None
        if with_mask:
            mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
            mask[..., int(n * 0.9) :] = False
        t0 = time.perf_counter()
        out = kernel.flash_attention(q, k, v, mask=mask, block_m=32, block_n=32)
        diff = (out - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max().item()
        worst = max(worst, diff)
        log.info("%-9s B=%d H=%-2d N=%-3d D=%d%s: max |triton - sdpa| = %.2e (%.1f s in the interpreter)", name, b, h,
                 n, d, ", key padding mask" if with_mask else "", diff, time.perf_counter() - t0)  # fmt: skip
    ok = worst <= CHECK_ATOL
    log.info("interpreter check %s (largest difference %.2e, tolerance %.0e); no timing without a GPU",
             "passed" if ok else "FAILED", worst, CHECK_ATOL)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--mask", action="store_true", help="add a key padding mask [B, 1, 1, N] (10%% padding)")
    parser.add_argument("--shapes", nargs="*", help="names of the shapes to run (default: all)")
    parser.add_argument("--compile-only", action="store_true", help="compile for sm80/sm90 offline instead of timing")
    parser.add_argument("--head-dim", type=int, choices=(64, 128), default=128, help="head dim of --compile-only")
    parser.add_argument("--out", type=Path, help="default: results/attention.json (attention-compile.json with --compile-only)")
    parser.add_argument("--check-len", type=int, default=77, help="tokens per shape of the CPU interpreter check")
    args = parser.parse_args(argv)
    if not args.compile_only and not torch.cuda.is_available():
        log.info("no CUDA device here: nothing is timed (the benchmark needs a GPU; --compile-only works without one). "
                 "Running the kernel in Triton's interpreter instead, as a correctness check at %d tokens.", args.check_len)
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            log.error("triton was imported before TRITON_INTERPRET=1 could be set; run this script in its own process")
            return 1
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: it fixes its mode then
        return interpret_check(args.mask, args.check_len)

    import triton

    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": args.dtype,
        "mask": args.mask,
    }
    if args.compile_only:
        result = {**meta, "compile_check": compile_check(args.dtype, args.head_dim)}
    else:
        meta["gpu"] = torch.cuda.get_device_name()
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        rows = []
        for name, b, h, n, d in SHAPES:
            if args.shapes and name not in args.shapes:
                continue
            log.info("measuring %s (B=%d, H=%d, N=%d, D=%d) ...", name, b, h, n, d)
            rows += bench_shape(name, b, h, n, d, DTYPES[args.dtype], args.mask)
        log.info("\n%s, %s, torch %s, triton %s%s\n%s", meta["gpu"], args.dtype, meta["torch"], meta["triton"],
                 ", key padding mask" if args.mask else "", table(rows))
        for r in rows:
            if "error" in r:
                log.info("%s / %s: %s", r["shape"], r["backend"], r["error"])
        result = {**meta, "results": rows}
    out = args.out or RESULTS / ("attention-compile.json" if args.compile_only else "attention.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

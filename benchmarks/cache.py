"""difforge-cache presets vs no cache on the FLUX.1 DiT at real width: time, work skipped, output error.

The DiT of difforge-flux at its released width (hidden 3072, 24 heads x 128, T5 width 4096, guidance
embedding), with random weights and a few blocks (default 1 double + 2 single), runs a whole Euler
denoising run (sigma 1 -> 0, fixed noise and text, no CFG) without a cache and with each preset and
options; the runs alternate, a few rounds, each with its cache applied afresh. Per row: the best wall
time of a run and its ratio to no cache; the same for the process's CPU time (steadier than wall
time on a shared machine, for CPU runs); ``ideal``, the ratio if time were proportional to the
blocks computed; the steps cached, the share of block calls skipped, and the difference of the final
latents from the uncached ones (max abs, and PSNR over the uncached latents' range). ``fbcache`` at
threshold 0 computes every block and measures the change each step: its row is the engine's overhead.

With PyTorch's default initialisation the random timestep embedding swings so much between steps
that the first block's residual changes by about 0.5 from one step to the next, and no threshold
near the recommended ones ever skips. The output layers of the timestep and guidance embedders are
therefore scaled by ``--time-scale`` (default 0.1), which brings that change to about 0.1 per step
at 10 steps: the range in which the thresholds decide. The measured changes are in the JSON.
Random weights say nothing about image quality (the trained demo model will); they show the cost
side and how large the error is. With few blocks, the front/back blocks that always run are a large
share of the model; a released FLUX.1 has 57 blocks, so the skipped share there is higher.

    python benchmarks/cache.py                              # 512x512, 28 steps, 3 rounds
    python benchmarks/cache.py --double 4 --single 8        # more blocks
    python benchmarks/cache.py --quick --device cpu         # 64x64, 32 text tokens, 10 steps, 2 rounds

Writes ``benchmarks/results/cache.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from difforge_cache.engine import apply_dbcache, apply_deepcache, apply_fbcache
from difforge_flux import BLOCK_LAYOUT
from difforge_flux.dit import FluxDiT, FluxDiTConfig

log = logging.getLogger("benchmarks.cache")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
APPLY = {"fbcache": apply_fbcache, "dbcache": apply_dbcache, "deepcache": apply_deepcache}
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("fbcache", {"threshold": 0.0}),
    ("fbcache", {"threshold": 0.04}),
    ("fbcache", {"threshold": 0.08}),
    ("fbcache", {"threshold": 0.12}),
    ("fbcache", {"threshold": 0.2}),
    ("dbcache", {"threshold": 0.08, "front_blocks": 1, "back_blocks": 1}),
    ("dbcache", {"threshold": 0.12, "front_blocks": 1, "back_blocks": 1}),
    ("deepcache", {"cache_interval": 2, "cache_branch_id": 1}),
    ("deepcache", {"cache_interval": 3, "cache_branch_id": 1}),
]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(args: argparse.Namespace) -> FluxDiT:
    torch.manual_seed(0)
    config = FluxDiTConfig(depth=args.double, depth_single_blocks=args.single)
    with torch.device(args.device):
        model = FluxDiT(config)
    with torch.no_grad():
        for embedder in (model.time_in, model.guidance_in):
            embedder.out_layer.weight.mul_(args.time_scale)
            embedder.out_layer.bias.mul_(args.time_scale)
    return model.to(DTYPES[args.dtype]).eval().requires_grad_(False)


def inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    side = args.size // 16  # 8x VAE, then 2x2 patches
    gen = torch.Generator().manual_seed(1)
    ids = torch.zeros(side * side, 3)
    ids[:, 1], ids[:, 2] = torch.arange(side * side) // side, torch.arange(side * side) % side
    dtype = DTYPES[args.dtype]
    return {
        "img": torch.randn(1, side * side, 64, generator=gen).to(args.device, dtype),
        "img_ids": ids.to(args.device),
        "txt": torch.randn(1, args.text_tokens, 4096, generator=gen).to(args.device, dtype),
        "txt_ids": torch.zeros(args.text_tokens, 3, device=args.device),
        "y": torch.randn(1, 768, generator=gen).to(args.device, dtype),
        "guidance": torch.full((1,), 3.5, device=args.device),
    }


def denoise(model: FluxDiT, x: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Euler from sigma 1 to 0 in ``steps`` equal steps."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=x["img"].device)
    img = x["img"]
    for i in range(steps):
        v = model(img, x["img_ids"], x["txt"], x["txt_ids"], sigmas[i : i + 1], x["y"], x["guidance"])
        img = img + (sigmas[i + 1] - sigmas[i]) * v
    return img


def run_all(model: FluxDiT, x: dict[str, torch.Tensor], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration (no cache first) once per round, in alternating order so that all see the same
    machine state; each run applies its cache afresh and removes it after."""
    configs: list[tuple[str, dict[str, Any]]] = [("none", {}), *CONFIGS]
    times: list[list[float]] = [[] for _ in configs]
    cpu: list[list[float]] = [[] for _ in configs]
    outputs: list[torch.Tensor] = [x["img"]] * len(configs)
    stats: list[dict[str, Any] | None] = [None] * len(configs)
    for r in range(args.rounds):
        for i in range(len(configs)) if r % 2 == 0 else reversed(range(len(configs))):
            preset, options = configs[i]
            handle = None if preset == "none" else APPLY[preset](model, BLOCK_LAYOUT, {**options, "family": "flux"})
            try:
                sync(args.device)
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs[i] = denoise(model, x, args.steps)
                sync(args.device)
                times[i].append(time.perf_counter() - start)
                cpu[i].append(time.process_time() - start_cpu)
            finally:
                if handle is not None:
                    handle.remove()
                    stats[i] = handle.stats()
        log.info("round %d/%d done", r + 1, args.rounds)
    blocks = args.double + args.single
    rows = []
    for (preset, options), t, c, out, st in zip(configs, times, cpu, outputs, stats):
        max_abs, psnr = difference(out, outputs[0])
        skipped = st["blocks_skipped"] if st else 0
        rows.append({
            "preset": preset, "options": options, "seconds_best": min(t), "seconds_median": statistics.median(t),
            "cpu_seconds_best": min(c), "cpu_speedup": min(cpu[0]) / min(c),
            "speedup": min(times[0]) / min(t), "ideal_speedup": args.steps * blocks / (args.steps * blocks - skipped),
            "steps_cached": st["steps_cached"] if st else 0, "blocks_skipped": skipped,
            "skipped_share": skipped / (args.steps * blocks), "max_abs": max_abs, "psnr_db": psnr,
            "changes": st["branches"]["cond"]["changes"] if st else {}, "runs": t,
        })  # fmt: skip
    return rows


def difference(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Max abs difference and PSNR (dB) over the range of ``ref``."""
    got, ref = got.float(), ref.float()
    mse = (got - ref).pow(2).mean().item()
    span = (ref.max() - ref.min()).item()
    return (got - ref).abs().max().item(), math.inf if mse == 0 else 10 * math.log10(span**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=DTYPES)
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (image tokens: (size/16)^2)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--time-scale", type=float, default=0.1, help="scale of the time/guidance embedders' output")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64x64, 32 text tokens, 10 steps, 2 rounds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cache.json")
    args = parser.parse_args()
    if args.quick:
        args.size, args.text_tokens, args.steps, args.rounds = 64, 32, 10, 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    logging.getLogger("difforge_cache").setLevel(logging.WARNING)  # one apply per run: keep it quiet

    model, x = build(args), inputs(args)
    with torch.inference_mode():
        denoise(model, x, 1)  # warm-up
        rows = run_all(model, x, args)

    tokens = (args.size // 16) ** 2
    print(f"\nFLUX DiT, hidden 3072, {args.double} double + {args.single} single blocks, {args.size}x{args.size} "
          f"({tokens} image + {args.text_tokens} text tokens), {args.steps} Euler steps, {args.dtype}, {args.device}, "
          f"best of {args.rounds} alternating rounds")  # fmt: skip
    print(f"{'preset':10} {'options':44} {'s/run':>8} {'speedup':>8} {'cpu s':>8} {'speedup':>8} {'ideal':>6} "
          f"{'cached':>7} {'skipped':>8} "
          f"{'max|diff|':>10} {'PSNR dB':>8}")  # fmt: skip
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        print(f"{r['preset']:10} {opts:44} {r['seconds_best']:8.3f} {r['speedup']:8.2f} {r['cpu_seconds_best']:8.3f} "
              f"{r['cpu_speedup']:8.2f} {r['ideal_speedup']:6.2f} "
              f"{r['steps_cached']:>4}/{args.steps:<2} {100 * r['skipped_share']:7.1f}% {r['max_abs']:10.2e} "
              f"{r['psnr_db']:8.1f}")  # fmt: skip

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "difforge-cache presets on the FLUX.1 DiT",
        "device": args.device,
        "device_name": (
            torch.cuda.get_device_name() if args.device.startswith("cuda")
            else platform.processor() or platform.machine()
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "double_blocks": args.double,
        "single_blocks": args.single,
        "size": args.size,
        "image_tokens": tokens,
        "text_tokens": args.text_tokens,
        "steps": args.steps,
        "time_scale": args.time_scale,
        "rounds": args.rounds,
        "quick": args.quick,
        "results": [{**r, "psnr_db": None if math.isinf(r["psnr_db"]) else r["psnr_db"]} for r in rows],
    }, indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

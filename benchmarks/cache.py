"""difforge-cache presets vs no cache on the FLUX.1, Qwen-Image and Wan DiTs at real width: time, work skipped,
output error.

Each family's DiT at its released width (FLUX.1: hidden 3072, 24 heads x 128, T5 width 4096, guidance
embedding; Qwen-Image: hidden 3072, 24 heads x 128, text width 3584; Wan2.1-T2V-1.3B: dim 1536, 12
heads x 128, ffn 8960, umT5 width 4096), with random weights and a few blocks, runs a whole Euler
denoising run (sigma 1 -> 0, fixed noise and text, no CFG) without a cache and with each preset and
options; the runs alternate, a few rounds, each with its cache applied afresh. Per row: the best wall
time of a run and its ratio to no cache; the same for the process's CPU time (steadier than wall
time on a shared machine, for CPU runs); ``ideal``, the ratio if time were proportional to the
blocks computed; the steps cached, the share of block calls skipped, and the difference of the final
latents from the uncached ones (max abs, and PSNR over the uncached latents' range). ``fbcache`` at
threshold 0 computes every block and measures the change each step: its row is the engine's overhead.

With PyTorch's default initialisation the random timestep embedding swings so much between steps
that the first block's residual changes by about 0.5 from one step to the next, and no threshold
near the recommended ones ever skips. The output layer of each DiT's timestep (and FLUX's guidance)
embedder is therefore scaled by ``--time-scale`` (default per family, ``TIME_SCALES``), which brings that
change to about 0.1 per step at 10 steps: the range in which the thresholds decide. The measured per-step changes are in the JSON.
Random weights say nothing about image quality (the trained demo model will); they show the cost
side and how large the error is. With few blocks, the front/back blocks that always run are a large
share of the model; released models have 30-60 blocks, so the skipped share there is higher.

    python benchmarks/cache.py                              # FLUX, 512x512, 28 steps, 3 rounds
    python benchmarks/cache.py --family all --quick         # every family, small sizes, 10 steps, 2 rounds
    python benchmarks/cache.py --family qwen-image wan      # some families
    python benchmarks/cache.py --family wan --blocks 8      # more blocks
    python benchmarks/cache.py --double 4 --single 8        # FLUX with more blocks

Writes ``benchmarks/results/cache.json`` (or ``--out``): one entry per family.
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difforge.specs import BlockLayout
from difforge_cache.engine import apply_dbcache, apply_deepcache, apply_fbcache

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


def _scale(layers: list[nn.Linear], scale: float) -> None:
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(scale)
            layer.bias.mul_(scale)


@dataclass(frozen=True)
class Family:
    """What the benchmark needs of one family: its DiT, inputs, one prediction, its block layout."""

    name: str
    layout: Callable[[], BlockLayout]
    build: Callable[[argparse.Namespace], nn.Module]
    inputs: Callable[[argparse.Namespace], dict[str, Any]]
    predict: Callable[[nn.Module, dict[str, Any], torch.Tensor, torch.Tensor], torch.Tensor]
    blocks: Callable[[argparse.Namespace], int]
    describe: Callable[[argparse.Namespace], str]


def _device_model(args: argparse.Namespace, make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(args.device):
        model = make()
    return model


# ---------------------------------------------------------------- FLUX.1


def flux_build(args: argparse.Namespace) -> nn.Module:
    from difforge_flux.dit import FluxDiT, FluxDiTConfig

    model = _device_model(args, lambda: FluxDiT(FluxDiTConfig(depth=args.double, depth_single_blocks=args.single)))
    _scale([model.time_in.out_layer, model.guidance_in.out_layer], args.time_scale)
    return model.to(DTYPES[args.dtype]).eval().requires_grad_(False)


def flux_inputs(args: argparse.Namespace) -> dict[str, Any]:
    side = args.size // 16  # 8x VAE, then 2x2 patches
    gen = torch.Generator().manual_seed(1)
    ids = torch.zeros(side * side, 3)
    ids[:, 1], ids[:, 2] = torch.arange(side * side) // side, torch.arange(side * side) % side
    dtype = DTYPES[args.dtype]
    return {
        "latents": torch.randn(1, side * side, 64, generator=gen).to(args.device, dtype),
        "img_ids": ids.to(args.device),
        "txt": torch.randn(1, args.text_tokens, 4096, generator=gen).to(args.device, dtype),
        "txt_ids": torch.zeros(args.text_tokens, 3, device=args.device),
        "y": torch.randn(1, 768, generator=gen).to(args.device, dtype),
        "guidance": torch.full((1,), 3.5, device=args.device),
    }


def flux_predict(model: nn.Module, x: dict[str, Any], latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return model(latents, x["img_ids"], x["txt"], x["txt_ids"], sigma, x["y"], x["guidance"])


# ---------------------------------------------------------------- Qwen-Image


def qwen_build(args: argparse.Namespace) -> nn.Module:
    from difforge_qwen_image.dit import QwenImageDiT, QwenImageDiTConfig

    model = _device_model(args, lambda: QwenImageDiT(QwenImageDiTConfig(num_layers=args.blocks or 3)))
    _scale([model.time_text_embed.timestep_embedder.linear_2], args.time_scale)
    return model.to(DTYPES[args.dtype]).eval().requires_grad_(False)


def qwen_inputs(args: argparse.Namespace) -> dict[str, Any]:
    side = args.size // 16  # 8x VAE, then 2x2 patches
    gen = torch.Generator().manual_seed(1)
    dtype = DTYPES[args.dtype]
    return {
        "latents": torch.randn(1, side * side, 64, generator=gen).to(args.device, dtype),
        "txt": torch.randn(1, args.text_tokens, 3584, generator=gen).to(args.device, dtype),
        "grid": (side, side),
    }


def qwen_predict(model: nn.Module, x: dict[str, Any], latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return model(latents, x["txt"], sigma.to(latents.dtype), x["grid"])  # the pipeline's timestep / 1000 = sigma


# ---------------------------------------------------------------- Wan


def wan_build(args: argparse.Namespace) -> nn.Module:
    from difforge_wan.dit import WanDiT, WanDiTConfig

    model = _device_model(args, lambda: WanDiT(WanDiTConfig(num_layers=args.blocks or 4)))
    with torch.no_grad():  # WanDiT leaves some parameters uninitialised (they are always loaded): N(0, 0.02), norms 1
        for name, p in model.named_parameters():
            p.fill_(1.0) if p.dim() == 1 and "norm" in name else p.normal_(0, 0.02)
    _scale([model.time_embedding[2]], args.time_scale)
    return model.to(DTYPES[args.dtype]).eval().requires_grad_(False)


def wan_inputs(args: argparse.Namespace) -> dict[str, Any]:
    side = args.size // 8
    frames = (args.frames - 1) // 4 + 1
    gen = torch.Generator().manual_seed(1)
    dtype = DTYPES[args.dtype]
    return {
        "latents": torch.randn(1, 16, frames, side, side, generator=gen).to(args.device, dtype),
        "context": torch.randn(1, args.text_tokens, 4096, generator=gen).to(args.device, dtype),
    }


def wan_predict(model: nn.Module, x: dict[str, Any], latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return model(latents, sigma * 1000, x["context"])  # Wan's timesteps are sigma * 1000


def _layout(module: str) -> Callable[[], BlockLayout]:
    return lambda: __import__(module).BLOCK_LAYOUT


FAMILIES: dict[str, Family] = {
    "flux": Family(
        "flux", _layout("difforge_flux"), flux_build, flux_inputs, flux_predict,
        lambda a: a.double + a.single,
        lambda a: f"FLUX.1 DiT, hidden 3072, {a.double} double + {a.single} single blocks, {a.size}x{a.size} "
                  f"({(a.size // 16) ** 2} image + {a.text_tokens} text tokens)",
    ),
    "qwen-image": Family(
        "qwen-image", _layout("difforge_qwen_image"), qwen_build, qwen_inputs, qwen_predict,
        lambda a: a.blocks or 3,
        lambda a: f"Qwen-Image DiT, hidden 3072, {a.blocks or 3} blocks, {a.size}x{a.size} "
                  f"({(a.size // 16) ** 2} image + {a.text_tokens} text tokens)",
    ),
    "wan": Family(
        "wan", _layout("difforge_wan"), wan_build, wan_inputs, wan_predict,
        lambda a: a.blocks or 4,
        lambda a: f"Wan2.1-T2V-1.3B DiT, dim 1536, {a.blocks or 4} blocks, {a.frames} frames {a.size}x{a.size} "
                  f"({((a.frames - 1) // 4 + 1) * (a.size // 16) ** 2} video + {a.text_tokens} text tokens)",
    ),
}  # fmt: skip


TIME_SCALES = {"flux": 0.1, "qwen-image": 0.02, "wan": 0.6}
"""Per family, the ``--time-scale`` that brings the first block's residual change to about 0.1 per step at
10 steps (measured at the ``--quick`` sizes: FLUX ~0.1, Qwen-Image 0.085-0.095, Wan ~0.09). Wan's DiT is drawn
from N(0, 0.02) (as benchmarks/wan.py does), so its embedding is small to begin with and is scaled by 0.6 only."""


def denoise(family: Family, model: nn.Module, x: dict[str, Any], steps: int) -> torch.Tensor:
    """Euler from sigma 1 to 0 in ``steps`` equal steps."""
    latents = x["latents"]
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=latents.device)
    for i in range(steps):
        v = family.predict(model, x, latents, sigmas[i : i + 1])
        latents = latents + (sigmas[i + 1] - sigmas[i]) * v
    return latents


def run_all(family: Family, model: nn.Module, x: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration (no cache first) once per round, in alternating order so that all see the same
    machine state; each run applies its cache afresh and removes it after."""
    configs: list[tuple[str, dict[str, Any]]] = [("none", {}), *CONFIGS]
    layout = family.layout()
    times: list[list[float]] = [[] for _ in configs]
    cpu: list[list[float]] = [[] for _ in configs]
    outputs: list[torch.Tensor] = [x["latents"]] * len(configs)
    stats: list[dict[str, Any] | None] = [None] * len(configs)
    for r in range(args.rounds):
        for i in range(len(configs)) if r % 2 == 0 else reversed(range(len(configs))):
            preset, options = configs[i]
            handle = None if preset == "none" else APPLY[preset](model, layout, {**options, "family": family.name})
            try:
                sync(args.device)
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs[i] = denoise(family, model, x, args.steps)
                sync(args.device)
                times[i].append(time.perf_counter() - start)
                cpu[i].append(time.process_time() - start_cpu)
            finally:
                if handle is not None:
                    handle.remove()
                    stats[i] = handle.stats()
        log.info("%s: round %d/%d done", family.name, r + 1, args.rounds)
    blocks = family.blocks(args)
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


def bench_family(family: Family, args: argparse.Namespace) -> dict[str, Any]:
    args = argparse.Namespace(**{**vars(args), "time_scale": args.time_scale or TIME_SCALES[family.name]})
    model, x = family.build(args), family.inputs(args)
    with torch.inference_mode():
        denoise(family, model, x, 1)  # warm-up
        rows = run_all(family, model, x, args)
    del model

    print(f"\n{family.describe(args)}, {args.steps} Euler steps, {args.dtype}, {args.device}, "
          f"best of {args.rounds} alternating rounds")  # fmt: skip
    print(f"{'preset':10} {'options':44} {'s/run':>8} {'speedup':>8} {'cpu s':>8} {'speedup':>8} {'ideal':>6} "
          f"{'cached':>7} {'skipped':>8} "
          f"{'max|diff|':>10} {'PSNR dB':>8}")  # fmt: skip
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        print(f"{r['preset']:10} {opts:44} {r['seconds_best']:8.3f} {r['speedup']:8.2f} {r['cpu_seconds_best']:8.3f} "
              f"{r['cpu_speedup']:8.2f} {r['ideal_speedup']:6.2f} "
              f"{r['steps_cached']:>4}/{args.steps:<2} {100 * r['skipped_share']:7.1f}% {r['max_abs']:10.2e} "
              f"{r['psnr_db']:8.1f}", flush=True)  # fmt: skip
    return {
        "family": family.name,
        "model": family.describe(args),
        "blocks": family.blocks(args),
        "time_scale": args.time_scale,
        "results": [{**r, "psnr_db": None if math.isinf(r["psnr_db"]) else r["psnr_db"]} for r in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=[*FAMILIES, "all"], default=["flux"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=DTYPES)
    parser.add_argument("--double", type=int, default=1, help="FLUX: double-stream blocks")
    parser.add_argument("--single", type=int, default=2, help="FLUX: single-stream blocks")
    parser.add_argument("--blocks", type=int, default=None, help="Qwen-Image (default 3) and Wan (default 4) blocks")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (image tokens: (size/16)^2)")
    parser.add_argument("--frames", type=int, default=17, help="Wan: video frames ((frames-1)/4+1 latent frames)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--time-scale", type=float, default=None,
                        help="scale of the timestep embedders' output (default per family: TIME_SCALES)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64x64 (Wan: 9 frames), 32 text tokens, 10 steps, 2 rounds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cache.json")
    args = parser.parse_args()
    if args.quick:
        args.size, args.frames, args.text_tokens, args.steps, args.rounds = 64, 9, 32, 10, 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("difforge_cache").setLevel(logging.WARNING)  # one apply per run: keep it quiet

    names = list(FAMILIES) if "all" in args.family else list(dict.fromkeys(args.family))
    families: list[dict[str, Any]] = []
    for name in names:
        families.append(bench_family(FAMILIES[name], args))
        write(args, families)  # after each family: a long run keeps what it measured


def write(args: argparse.Namespace, families: list[dict[str, Any]]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "difforge-cache presets on real-width DiTs",
        "device": args.device,
        "device_name": (
            torch.cuda.get_device_name() if args.device.startswith("cuda")
            else platform.processor() or platform.machine()
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "size": args.size,
        "frames": args.frames,
        "text_tokens": args.text_tokens,
        "steps": args.steps,
        "rounds": args.rounds,
        "quick": args.quick,
        "families": families,
    }, indent=2))  # fmt: skip
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()

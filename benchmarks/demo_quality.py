"""Image quality of the trained shapes demo model under cache and fp8 settings: does the picture still
show what the prompt says?

The shapes model (``difforge_sdk/shapes/model/``, a tiny FLUX.1-architecture model trained with
``difforge train``; see its MODEL_CARD.md) draws "a {colour} {circle|square|triangle} on a {colour}
background". For 24 fixed prompts (seed = prompt index) each setting generates one image; its colours
are read back from the pixels (background: the median of a 3-pixel border; shape: the median of the
pixels more than 60 RGB units from the background; each snapped to the nearest of the 8 palette
colours) and the image *matches* when both are the prompt's. Per setting: the fraction of matching
images, the PSNR of its images against the plain pipeline's (same prompt and seed; over [0, 255]),
the mean time per image (process CPU time and wall time), and the cache's skipped steps.

Settings: the plain pipeline; ``fbcache`` at thresholds 0.05, 0.1, 0.2, 0.4; ``deepcache`` (interval 3);
``fp8`` and ``fp8-scaled`` weight storage (``offload=[...]``). Plain runs first, then every setting
on the same 24 prompts.

    python benchmarks/demo_quality.py                  # 8 steps (the model's default)
    python benchmarks/demo_quality.py --steps 20 --model path/to/shapes-model

Writes ``benchmarks/results/demo_quality.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("plain", {}),
    ("fbcache 0.05", {"cache": {"name": "fbcache", "threshold": 0.05}}),
    ("fbcache 0.1", {"cache": {"name": "fbcache", "threshold": 0.1}}),
    ("fbcache 0.2", {"cache": {"name": "fbcache", "threshold": 0.2}}),
    ("fbcache 0.4", {"cache": {"name": "fbcache", "threshold": 0.4}}),
    ("deepcache 3", {"cache": {"name": "deepcache", "cache_interval": 3}}),
    ("fp8", {"offload": ["fp8"]}),
    ("fp8-scaled", {"offload": ["fp8-scaled"]}),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def run_setting(pipe: Any, prompts: list[str], steps: int, options: dict[str, Any]) -> dict[str, Any]:
    from difforge_sdk.shapes.data import classify, prompt_colors

    pipe.set_offload(options.get("offload"))
    pipe.set_cache(options.get("cache"))
    images, rows, wall, cpu, cached = [], [], [], [], []
    try:
        for i, prompt in enumerate(prompts):
            start, start_cpu = time.perf_counter(), time.process_time()
            image = pipe(prompt, seed=i, num_inference_steps=steps, progress_bar_cmd=lambda x: x)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            stats = pipe.cache_stats()
            if stats:
                cached.append(stats[0]["steps_cached"])
            array = np.asarray(image.convert("RGB"))
            got = classify(array)
            images.append(array)
            rows.append({"prompt": prompt, "seed": i, "shape": got[0], "background": got[1],
                         "match": got == prompt_colors(prompt)})
    finally:
        pipe.set_cache(None)
        pipe.set_offload(None)
    return {"images": images, "rows": rows, "wall_s": float(np.mean(wall)), "cpu_s": float(np.mean(cpu)),
            "steps_cached": float(np.mean(cached)) if cached else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="shapes model folder (default: the one shipped with difforge-sdk)")
    parser.add_argument("--steps", type=int, default=None, help="inference steps (default: the model's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_quality.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from difforge_sdk.shapes import MODEL_DIR
    from difforge_sdk.shapes.data import fixed_prompts
    from difforge_sdk.shapes.train_demo_model import GENERATION, load_pipeline

    steps = args.steps or GENERATION["num_inference_steps"]
    pipe = load_pipeline(args.model or MODEL_DIR, device="cpu")
    prompts = fixed_prompts(24)
    results: dict[str, dict[str, Any]] = {}
    for name, options in SETTINGS:
        results[name] = run_setting(pipe, prompts, steps, options)
    plain = results["plain"]["images"]
    table = []
    for name, options in SETTINGS:
        r = results[name]
        matches = sum(row["match"] for row in r["rows"])
        values = [psnr(a, b) for a, b in zip(r["images"], plain)]
        finite = [v for v in values if math.isfinite(v)]
        table.append({
            "setting": name, "options": options, "accuracy": matches / len(prompts), "matches": matches,
            "psnr_db_vs_plain": None if not finite else float(np.mean(finite)), "identical_images": len(values) - len(finite),
            "cpu_s_per_image": r["cpu_s"], "wall_s_per_image": r["wall_s"],
            "cpu_ratio_vs_plain": r["cpu_s"] / results["plain"]["cpu_s"], "steps_cached": r["steps_cached"],
            "rows": r["rows"],
        })
    print(f"shapes demo model, {len(prompts)} prompts, {steps} steps, 64x64, CPU ({torch.get_num_threads()} threads)")
    print(f"{'setting':<14} {'match':>7} {'PSNR vs plain':>14} {'CPU s/img':>10} {'ratio':>6} {'wall s/img':>10} {'cached steps':>12}")
    for row in table:
        p = row["psnr_db_vs_plain"]
        ptxt = "identical" if p is None else f"{p:.1f} dB"
        print(f"{row['setting']:<14} {row['accuracy']:>6.0%} {ptxt:>14} {row['cpu_s_per_image']:>10.3f} "
              f"{row['cpu_ratio_vs_plain']:>6.2f} {row['wall_s_per_image']:>10.3f} {row['steps_cached']:>12.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "shapes demo model: prompt/colour match under cache and fp8 settings",
        "model": str(args.model or MODEL_DIR),
        "device": "cpu", "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": steps,
        "prompts": prompts, "results": table,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

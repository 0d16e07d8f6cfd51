"""DiT forward time of difforge-qwen-image vs diffusers' QwenImageTransformer2DModel on the same weights.

Real width (hidden 3072, 24 heads x 128, text width 3584) with 2 dual-stream blocks, in one process:
the two models run alternately (the order flips every round) so that both see the same machine
state, and the median of each is compared. ``ratio`` is ours / diffusers (below 1.0: ours is faster).

Two calls are timed: one prompt without padding (what a text-to-image call runs; diffusers drops an
all-ones mask too), and, with ``--padded``, two prompts of different lengths in one batch with the
text padding mask (the masked attention path).

    python benchmarks/qwen_image.py                        # 512x512 (1024 image + 128 text tokens), fp32 and bf16
    python benchmarks/qwen_image.py --size 1328            # 6889 image tokens (Qwen-Image's 1:1 size)
    python benchmarks/qwen_image.py --quick --device cpu   # 256x256 and 64 text tokens, fewer rounds

Writes ``benchmarks/results/qwen_image.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

import diffusers
from difforge_qwen_image.dit import QwenImageDiT, qwen_image_dit_config_from_shapes
from harness import alternate  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WIDTH = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584)


def build(dtype: torch.dtype, device: str, blocks: int) -> tuple[torch.nn.Module, QwenImageDiT]:
    """A random diffusers model and ours holding the same weights (the same layout: no conversion)."""
    torch.manual_seed(0)
    ref = diffusers.QwenImageTransformer2DModel(num_layers=blocks, **WIDTH)
    ref = ref.to(device=device, dtype=dtype).eval().requires_grad_(False)
    sd = ref.state_dict()
    with torch.device("meta"):
        ours = QwenImageDiT(qwen_image_dit_config_from_shapes({k: v.shape for k, v in sd.items()}))
    ours.load_state_dict(sd, assign=True)
    return ref, ours.eval().requires_grad_(False)


def inputs(size: int, text_tokens: int, padded: bool, dtype: torch.dtype, device: str) -> dict[str, Any]:
    side = size // 16  # 8x VAE, then 2x2 patches
    batch = 2 if padded else 1
    gen = torch.Generator().manual_seed(1)
    mask = None
    if padded:
        mask = torch.ones(batch, text_tokens, dtype=torch.long)
        mask[1, text_tokens // 2 :] = 0
    tensors = {
        "img": torch.randn(batch, side * side, 64, generator=gen).to(device, dtype),
        "txt": torch.randn(batch, text_tokens, 3584, generator=gen).to(device, dtype),
        "timesteps": torch.tensor([0.5] * batch, device=device),
        "mask": None if mask is None else mask.to(device),
    }
    return {**tensors, "grid": (side, side)}


def measure(ref: torch.nn.Module, ours: QwenImageDiT, x: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    b = x["img"].shape[0]

    def run_ref() -> torch.Tensor:
        return ref(
            hidden_states=x["img"], encoder_hidden_states=x["txt"], encoder_hidden_states_mask=x["mask"],
            timestep=x["timesteps"], img_shapes=[[(1, *x["grid"])]] * b, return_dict=False,
        )[0]  # fmt: skip

    def run_ours() -> torch.Tensor:
        return ours(x["img"], x["txt"], x["timesteps"], x["grid"], x["mask"])

    with torch.inference_mode():
        expected = run_ref().float()
        diff = (run_ours().float() - expected).abs().max().item()
        scale = expected.abs().max().item()
        times, cpu_times = alternate({"diffusers": run_ref, "ours": run_ours}, args.rounds, args.warmup, args.device)
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    cpu = args.device == "cpu"
    return {
        "batch": b,
        "masked": x["mask"] is not None,
        "diffusers_s": med["diffusers"],
        "ours_s": med["ours"],
        "ratio": med["ours"] / med["diffusers"],
        "cpu_time_ratio": med_cpu["ours"] / med_cpu["diffusers"] if cpu else None,
        "max_abs_diff": diff,
        "reference_max_abs": scale,
        "runs": times,
        "cpu_time_runs": cpu_times if cpu else None,
    }


def run(dtype_name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = DTYPES[dtype_name]
    ref, ours = build(dtype, args.device, args.blocks)
    out = []
    for padded in (False, True) if args.padded else (False,):
        x = inputs(args.size, args.text_tokens, padded, dtype, args.device)
        out.append({"dtype": dtype_name, **measure(ref, ours, x, args)})
    del ref, ours
    return out


def main() -> None:
    diffusers.utils.logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (image tokens: (size/16)^2)")
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--padded", action="store_true", help="also time 2 prompts of different lengths with the mask")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="256x256, 64 text tokens, 5 rounds, 1 warm-up")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "qwen_image.json")
    args = parser.parse_args()
    if args.quick:
        args.size, args.text_tokens, args.rounds, args.warmup = 256, 64, 5, 1

    results = [r for name in args.dtype.split(",") for r in run(name.strip(), args)]
    tokens = (args.size // 16) ** 2
    print(f"Qwen-Image DiT, hidden 3072, {args.blocks} blocks, {args.size}x{args.size} "
          f"({tokens} image + {args.text_tokens} text tokens), {args.device}, median of {args.rounds}")  # fmt: skip
    print(f"{'dtype':6} {'call':14} {'diffusers ms':>13} {'ours ms':>9} {'ratio':>6} {'cpu-time ratio':>15} "
          f"{'max|diff|':>10} {'max|ref|':>9}")  # fmt: skip
    for r in results:
        call = "2 padded" if r["masked"] else "1 prompt"
        cpu_ratio = "-" if r["cpu_time_ratio"] is None else f"{r['cpu_time_ratio']:.3f}"
        print(f"{r['dtype']:6} {call:14} {1e3 * r['diffusers_s']:13.1f} {1e3 * r['ours_s']:9.1f} {r['ratio']:6.3f} "
              f"{cpu_ratio:>15} {r['max_abs_diff']:10.2e} {r['reference_max_abs']:9.2f}")  # fmt: skip

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "qwen-image-dit-forward",
        "device": args.device,
        "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "size": args.size,
        "blocks": args.blocks,
        "image_tokens": tokens,
        "text_tokens": args.text_tokens,
        "rounds": args.rounds,
        "results": results,
    }, indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

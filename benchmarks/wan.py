"""DiT forward time of difforge-wan vs diffusers' WanTransformer3DModel on the same weights.

The Wan2.1-T2V-1.3B width (dim 1536, 12 heads x 128, ffn 8960, umT5 width 4096) with 2 blocks, on a
17-frame 256x256 video (a 5 x 32 x 32 latent: 1280 tokens) and 512 text tokens, in one process: the
two models run alternately (the order flips every round) so that both see the same machine state,
and the median of each is compared. ``ratio`` is ours / diffusers (below 1.0: ours is faster);
``best ratio`` compares the fastest runs (on a shared machine the least disturbed ones).

Two timestep forms are measured: one per sample (``[B]``, text-to-video) and one per token
(``[B, L]``, Wan2.2 TI2V's conditioning first frame at timestep 0; diffusers embeds every token's
timestep, ours each distinct value once).

    python benchmarks/wan.py                        # fp32 and bf16 (on a GPU), both timestep forms
    python benchmarks/wan.py --frames 81 --size 480 # more tokens
    python benchmarks/wan.py --quick --device cpu   # fp32, 3 rounds, 1 warm-up

Writes ``benchmarks/results/wan.json`` (or ``--out``).
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
from difforge_wan.convert import dit_from_diffusers
from difforge_wan.dit import WanDiT, WanDiTConfig
from harness import alternate  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WIDTH = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096, freq_dim=256,
             in_channels=16, out_channels=16, cross_attn_norm=True, qk_norm="rms_norm_across_heads")  # fmt: skip


def build(blocks: int, dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, WanDiT]:
    """A random diffusers model and ours holding the same weights (converted by our converter)."""
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(num_layers=blocks, **WIDTH)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but keep the weights well scaled
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ref = ref.to(device=device, dtype=dtype).eval().requires_grad_(False)
    sd = {dit_from_diffusers(k): v for k, v in ref.state_dict().items()}
    with torch.device("meta"):
        ours = WanDiT(WanDiTConfig(num_layers=blocks))
    ours.load_state_dict(sd, assign=True)
    return ref, ours.eval().requires_grad_(False)


def run(dtype_name: str, timesteps: str, args: argparse.Namespace) -> dict[str, Any]:
    dtype, device = DTYPES[dtype_name], args.device
    ref, ours = build(args.blocks, dtype, device)
    gen = torch.Generator().manual_seed(1)
    frames = (args.frames - 1) // 4 + 1
    side = args.size // 8
    x = torch.randn(1, 16, frames, side, side, generator=gen).to(device, dtype)
    context = torch.randn(1, args.text_tokens, 4096, generator=gen).to(device, dtype)
    per_frame = (side // 2) ** 2
    if timesteps == "per-sample":
        t = torch.tensor([500.0], device=device)
    else:  # TI2V: the first frame's tokens clean
        t = torch.full((1, frames * per_frame), 500.0, device=device)
        t[:, :per_frame] = 0.0

    def run_ref() -> torch.Tensor:
        return ref(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]

    def run_ours() -> torch.Tensor:
        return ours(x, t, context)

    with torch.inference_mode():
        expected = run_ref().float()
        diff = (run_ours().float() - expected).abs().max().item()
        scale = expected.abs().max().item()
        times, cpu_times = alternate({"diffusers": run_ref, "ours": run_ours}, args.rounds, args.warmup, device)
    med = {name: statistics.median(v) for name, v in times.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu_times.items()}
    return {
        "dtype": dtype_name,
        "timesteps": timesteps,
        "diffusers_s": med["diffusers"],
        "ours_s": med["ours"],
        "ratio": med["ours"] / med["diffusers"],
        "best_ratio": min(times["ours"]) / min(times["diffusers"]),
        "cpu_time_ratio": med_cpu["ours"] / med_cpu["diffusers"] if device == "cpu" else None,
        "max_abs_diff": diff,
        "reference_max_abs": scale,
        "runs": times,
        "cpu_time_runs": cpu_times if device == "cpu" else None,
    }


def main() -> None:
    diffusers.utils.logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="comma-separated: fp32, bf16, fp16 (default fp32,bf16; fp32 with --quick)")
    parser.add_argument("--timesteps", default="per-sample,per-token", help="comma-separated: per-sample, per-token")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--frames", type=int, default=17, help="video frames (4k + 1)")
    parser.add_argument("--size", type=int, default=256, help="video side in pixels")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=None, help="timed runs per model (default 10, 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per model first (default 2, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fp32 only, 3 rounds, 1 warm-up (unless given)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "wan.json")
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.dtype = args.dtype or ("fp32" if args.quick else "fp32,bf16")

    results = [run(d.strip(), t.strip(), args) for d in args.dtype.split(",") for t in args.timesteps.split(",")]
    tokens = ((args.frames - 1) // 4 + 1) * (args.size // 16) ** 2
    print(f"Wan DiT, dim 1536 (12 x 128 heads), {args.blocks} blocks, {args.frames} frames at {args.size}x{args.size} "
          f"({tokens} video + {args.text_tokens} text tokens), {args.device}, median of {args.rounds}")  # fmt: skip
    print(f"{'dtype':6} {'timesteps':11} {'diffusers ms':>13} {'ours ms':>9} {'ratio':>6} {'best ratio':>11} "
          f"{'cpu-time ratio':>15} {'max|diff|':>10} {'max|ref|':>9}")  # fmt: skip
    for r in results:
        cpu_ratio = "-" if r["cpu_time_ratio"] is None else f"{r['cpu_time_ratio']:.3f}"
        print(f"{r['dtype']:6} {r['timesteps']:11} {1e3 * r['diffusers_s']:13.1f} {1e3 * r['ours_s']:9.1f} "
              f"{r['ratio']:6.3f} {r['best_ratio']:11.3f} {cpu_ratio:>15} {r['max_abs_diff']:10.2e} "
              f"{r['reference_max_abs']:9.2f}")  # fmt: skip

    on_gpu = args.device.startswith("cuda")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "wan-dit-forward",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "blocks": args.blocks,
        "frames": args.frames,
        "size": args.size,
        "video_tokens": tokens,
        "text_tokens": args.text_tokens,
        "rounds": args.rounds,
        "results": results,
    }, indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

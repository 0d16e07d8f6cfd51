"""DiT forward time of difforge-flux vs diffusers' FluxTransformer2DModel on the same weights.

Real width (hidden 3072, 24 heads x 128, T5 width 4096, guidance embedding) with 1 double and
2 single blocks, in one process: the two models run alternately (the order flips every round) so
that both see the same machine state, and the median of each is compared. ``ratio`` is ours /
diffusers (below 1.0: ours is faster). Also measured: the cost of the single blocks' stream join
(``torch.cat((txt, img))``, which lets every block take and return ``(img, txt)``) relative to one
single block.

    python benchmarks/flux.py                        # 512x512 (1024 image + 512 text tokens), fp32 and bf16
    python benchmarks/flux.py --size 1024            # 4096 image tokens
    python benchmarks/flux.py --quick --device cpu   # 256x256 and 128 text tokens, fewer rounds

Writes ``benchmarks/results/flux.json`` (or ``--out``).
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
from difforge_flux.convert import dit_from_diffusers, dit_fuse
from difforge_flux.dit import FluxDiT, FluxDiTConfig, rope_rotations
from harness import alternate  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WIDTH = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768)


def build(dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, FluxDiT]:
    """A random diffusers model and ours holding the same weights (converted by our converter)."""
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=2, guidance_embeds=True, **WIDTH)
    ref = ref.to(device=device, dtype=dtype).eval().requires_grad_(False)
    sd = dit_fuse({dit_from_diffusers(k): v for k, v in ref.state_dict().items()})
    config = FluxDiTConfig(depth=1, depth_single_blocks=2)
    with torch.device("meta"):
        ours = FluxDiT(config)
    ours.load_state_dict(sd, assign=True)
    return ref, ours.eval().requires_grad_(False)


def inputs(size: int, text_tokens: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    side = size // 16  # 8x VAE, then 2x2 patches
    gen = torch.Generator().manual_seed(1)
    ids = torch.zeros(side * side, 3)
    ids[:, 1] = torch.arange(side * side) // side
    ids[:, 2] = torch.arange(side * side) % side
    tensors = {
        "img": torch.randn(1, side * side, 64, generator=gen),
        "img_ids": ids,
        "txt": torch.randn(1, text_tokens, 4096, generator=gen),
        "txt_ids": torch.zeros(text_tokens, 3),
        "timesteps": torch.tensor([0.5]),
        "y": torch.randn(1, 768, generator=gen),
        "guidance": torch.tensor([3.5]),
    }
    # hidden states in the model dtype; ids, timesteps and guidance stay float32 (both models embed them in float32)
    return {k: v.to(device=device, dtype=dtype if k in ("img", "txt", "y") else v.dtype) for k, v in tensors.items()}


def run(dtype_name: str, args: argparse.Namespace) -> dict[str, Any]:
    dtype, device = DTYPES[dtype_name], args.device
    ref, ours = build(dtype, device)
    x = inputs(args.size, args.text_tokens, dtype, device)

    def run_ref() -> torch.Tensor:
        return ref(
            hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["timesteps"],
            img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"], return_dict=False,
        )[0]  # fmt: skip

    def run_ours() -> torch.Tensor:
        return ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"])

    with torch.inference_mode():
        expected = run_ref().float()
        diff = (run_ours().float() - expected).abs().max().item()
        scale = expected.abs().max().item()
        times, cpu_times = alternate({"diffusers": run_ref, "ours": run_ours}, args.rounds, args.warmup, device)

        # the single blocks' stream join, against one single block on the same hidden states
        img, txt = ours.img_in(x["img"]), ours.txt_in(x["txt"])
        vec = torch.randn(1, 3072, device=device, dtype=dtype)
        pe = rope_rotations(torch.cat((x["txt_ids"], x["img_ids"])), ours.config.axes_dim, ours.config.theta)
        block = ours.single_blocks[0]
        join, _ = alternate(
            {"block": lambda: block(img, txt, vec=vec, pe=pe), "join": lambda: torch.cat((txt, img), dim=1)},
            args.rounds, args.warmup, device,
        )  # fmt: skip
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    del ref, ours
    return {
        "dtype": dtype_name,
        "diffusers_s": med["diffusers"],
        "ours_s": med["ours"],
        "ratio": med["ours"] / med["diffusers"],
        "cpu_time_ratio": med_cpu["ours"] / med_cpu["diffusers"] if device == "cpu" else None,
        "max_abs_diff": diff,
        "reference_max_abs": scale,
        "join_fraction_of_single_block": statistics.median(join["join"]) / statistics.median(join["block"]),
        "runs": times,
        "cpu_time_runs": cpu_times if device == "cpu" else None,
    }


def main() -> None:
    diffusers.utils.logging.set_verbosity_error()  # its note about casting with .to() is not ours to act on
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (image tokens: (size/16)^2)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="256x256, 128 text tokens, 5 rounds, 1 warm-up")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "flux.json")
    args = parser.parse_args()
    if args.quick:
        args.size, args.text_tokens, args.rounds, args.warmup = 256, 128, 5, 1

    results = [run(name.strip(), args) for name in args.dtype.split(",")]
    tokens = (args.size // 16) ** 2
    print(f"FLUX DiT, hidden 3072, 1 double + 2 single blocks, {args.size}x{args.size} "
          f"({tokens} image + {args.text_tokens} text tokens), {args.device}, median of {args.rounds}")  # fmt: skip
    print(f"{'dtype':6} {'diffusers ms':>13} {'ours ms':>9} {'ratio':>6} {'cpu-time ratio':>15} "
          f"{'max|diff|':>10} {'max|ref|':>9} {'join/single':>12}")  # fmt: skip
    for r in results:
        cpu_ratio = "-" if r["cpu_time_ratio"] is None else f"{r['cpu_time_ratio']:.3f}"
        join = 100 * r["join_fraction_of_single_block"]
        print(f"{r['dtype']:6} {1e3 * r['diffusers_s']:13.1f} {1e3 * r['ours_s']:9.1f} {r['ratio']:6.3f} "
              f"{cpu_ratio:>15} {r['max_abs_diff']:10.2e} {r['reference_max_abs']:9.2f} {join:11.2f}%")  # fmt: skip

    on_gpu = args.device.startswith("cuda")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "flux-dit-forward",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "size": args.size,
        "image_tokens": tokens,
        "text_tokens": args.text_tokens,
        "rounds": args.rounds,
        "results": results,
    }, indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""2-way CFG-parallel speedup of a Qwen-Image pipeline at real DiT width (needs >= 2 GPUs).

The pipeline is assembled from a folder written here: a real-width DiT (hidden 3072, 24 heads x 128,
text width 3584) with ``--blocks`` of the released 60 blocks and random bf16 weights, and a tiny VAE and
text encoder (their cost is negligible next to the DiT's, as in a real call). The same call
(``cfg_scale`` 4, Qwen-Image's default, so both CFG branches run) is timed in one process and with
``cfg_parallel=2`` (and ``ulysses_degree=2``, and ``parallelism=4`` where 4 GPUs exist); the table gives
the median seconds per call and the speedup over one process.

    python benchmarks/parallel.py                       # 1328x1328, 10 steps, 4 blocks
    python benchmarks/parallel.py --blocks 8 --steps 20
    python benchmarks/parallel.py --device cpu --quick  # tiny width on 2 CPU processes (gloo): checks the script

With fewer than 2 CUDA devices (and no ``--device cpu``) it says so and exits 0. Writes
``benchmarks/results/parallel.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import difforge

REAL = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584)
QUICK = dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=128)


def write_folder(folder: Path, width: dict[str, int], blocks: int) -> Path:
    """A diffusers-layout Qwen-Image folder: the DiT at ``width`` with ``blocks`` blocks, everything else tiny."""
    import diffusers
    import transformers
    from difforge_sdk.tiny_tokenizers import write_qwen2_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(write_qwen2_tokenizer(folder / "_tok"))
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=blocks, axes_dims_rope=(16, 56, 56)
        if width["attention_head_dim"] == 128 else (4, 6, 6), **width,
    ).to(torch.bfloat16)  # fmt: skip
    text = width["joint_attention_dim"]
    heads = 28 if text == 3584 else 1
    text_encoder = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=text, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=4 if heads == 28 else 1, bos_token_id=None,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>")),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=text),
    )).to(torch.bfloat16)  # fmt: skip
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
    with torch.no_grad():  # small random weights: finite activations through every block
        for module in (transformer, text_encoder, vae):
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * (0.02 if p.dim() > 1 else 0.01))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0, shift_terminal=0.02,
        time_shift_type="exponential", use_dynamic_shifting=True,
    )  # fmt: skip
    diffusers.QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    ).save_pretrained(folder / "diffusers")
    return folder / "diffusers"


def time_layout(folder: Path, layout: dict[str, int], call: dict[str, Any], device: str, dtype: torch.dtype,
                rounds: int) -> dict[str, Any]:  # fmt: skip
    pipe = difforge.Pipeline.from_pretrained("qwen-image", folder, device=device, torch_dtype=dtype, **layout)
    quiet = {} if layout else {"progress_bar_cmd": lambda it, **_: it}
    try:
        pipe(**call, **quiet)  # warm-up (kernels, allocator)
        times = []
        for _ in range(rounds):
            if device == "cuda" and not layout:
                torch.cuda.synchronize()
            start = time.perf_counter()
            pipe(**call, **quiet)  # a ParallelPipeline returns after every rank finished
            if device == "cuda" and not layout:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    finally:
        close = getattr(pipe, "close", None)
        if close is not None:
            close()
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"layout": layout or {"parallelism": 1}, "median_s": statistics.median(times), "runs_s": times}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny width, 64x64, 2 steps (a check of the script)")
    ap.add_argument("--size", type=int, default=1328)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "parallel.json")
    args = ap.parse_args()

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and gpus < 2:
        print(f"benchmarks/parallel.py needs at least 2 CUDA devices, this machine has {gpus}: not measured.")
        return 0
    size, steps = (64, 2) if args.quick else (args.size, args.steps)
    width = QUICK if args.quick else REAL
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    call = dict(prompt="a cat holding a sign that says hello", seed=0, height=size, width=size,
                num_inference_steps=steps, cfg_scale=4.0, output_type="latent")  # fmt: skip
    layouts: list[dict[str, int]] = [{}, {"cfg_parallel": 2}, {"ulysses_degree": 2}]
    if gpus >= 4:
        layouts.append({"parallelism": 4})  # cfg_parallel 2 x ulysses_degree 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp), width, args.blocks)
        rows = [time_layout(folder, layout, call, args.device, dtype, args.rounds) for layout in layouts]
    base = rows[0]["median_s"]
    for row in rows:
        row["speedup"] = base / row["median_s"]
    print(f"Qwen-Image {size}x{size}, {steps} steps, cfg_scale 4, DiT {args.blocks} blocks at "
          f"{'tiny' if args.quick else 'real'} width, {args.device} ({gpus} GPUs), {str(dtype).replace('torch.', '')}")  # fmt: skip
    print(f"{'layout':<34} {'median s/call':>14} {'speedup':>8}")
    for row in rows:
        name = ", ".join(f"{k}={v}" for k, v in row["layout"].items())
        print(f"{name:<34} {row['median_s']:>14.3f} {row['speedup']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "parallel", "device": args.device, "gpus": gpus,
        "gpu_name": torch.cuda.get_device_name(0) if gpus else None, "platform": platform.platform(),
        "torch": torch.__version__, "size": size, "steps": steps, "blocks": args.blocks, "quick": args.quick,
        "rows": rows,
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

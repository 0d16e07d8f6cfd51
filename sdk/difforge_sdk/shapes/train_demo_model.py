"""Train the "shapes" demo model from scratch: ``python -m difforge_sdk.shapes.train_demo_model``.

1. draws the data set (``data/``: PNGs + ``metadata.csv``, see :mod:`.data`);
2. writes the tokenizers (trained on the captions) and the random, frozen CLIP and T5 encoders;
3. trains the tiny Flux AE as an autoencoder (:func:`.model.train_autoencoder`);
4. trains the tiny Flux DiT with ``difforge train`` (:func:`difforge.train.train`, full fine-tuning,
   flow matching, cached latents and prompt embeddings);
5. copies the files into ``--out`` (default: this package's ``model/`` folder), scores the model on
   the 24 fixed prompts and writes ``MODEL_CARD.md`` with the loss curve ``loss.png``.

Every step is seeded. On the shared 2-core machine it was trained on, the AE took about 10 minutes and
the DiT's steps about 4 per second (numbers in the model card).
``--ae`` reuses a trained AE file; ``--dit_steps`` / ``--ae_steps`` shorten a trial run.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from .model import AE_FILE, DIT_FILE, IMAGE_SIZE, MAX_SEQUENCE_LENGTH

log = logging.getLogger("difforge.shapes")

PACKAGE_MODEL = Path(__file__).parent / "model"


def model_files(folder: str | Path = PACKAGE_MODEL) -> dict[str, Path]:
    """The files of a shapes model folder, by pipeline slot."""
    folder = Path(folder)
    return {
        "dit": folder / DIT_FILE,
        "vae": folder / AE_FILE,
        "text_encoder": folder / "text_encoder" / "model.safetensors",
        "text_encoder_2": folder / "text_encoder_2" / "model.safetensors",
        "tokenizer": folder / "tokenizer",
        "tokenizer_2": folder / "tokenizer_2",
    }


def load_pipeline(folder: str | Path = PACKAGE_MODEL, **kw):  # noqa: ANN201
    """The shapes model as a difforge ``flux`` pipeline (files detected and routed like any FLUX.1)."""
    import difforge
    from difforge import ModelConfig

    files = model_files(folder)
    weights = [ModelConfig(path=str(files[s])) for s in ("dit", "vae", "text_encoder", "text_encoder_2")]
    tokenizers = [ModelConfig(path=str(files[s])) for s in ("tokenizer", "tokenizer_2")]
    kw.setdefault("device", "cpu")
    pipe = difforge.Pipeline.from_pretrained("flux", model_configs=weights, tokenizer_config=tokenizers, **kw)
    pipe.call_defaults = dict(GENERATION)
    return pipe


#: how the demo model is meant to be run (its pipeline's call defaults, see :func:`load_pipeline`)
GENERATION = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 8, "max_sequence_length": MAX_SEQUENCE_LENGTH}


def evaluate(pipe, prompts: list[str], seed: int = 0, **kw) -> dict:  # noqa: ANN001
    """Generate one image per prompt (seed ``seed + i``) and score its colours against the prompt."""
    from .data import classify, prompt_colors

    hits, rows = 0, []
    for i, prompt in enumerate(prompts):
        image = pipe(prompt, seed=seed + i, progress_bar_cmd=lambda x: x, **kw)
        got = classify(image)
        ok = got == prompt_colors(prompt)
        hits += ok
        rows.append({"prompt": prompt, "shape": got[0], "background": got[1], "match": bool(ok)})
    return {"accuracy": hits / len(prompts), "rows": rows}


def loss_curve_png(losses: list[float], path: Path, width: int = 640, height: int = 320, smooth: int = 50) -> Path:
    """The loss per step (light) and its moving average (dark), log scale, drawn with PIL."""
    import math

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 15, 15, height - 35
    values = [math.log10(max(v, 1e-6)) for v in losses]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1

    def xy(i: int, v: float) -> tuple[float, float]:
        return left + (right - left) * i / max(1, len(values) - 1), bottom - (bottom - top) * (v - lo) / (hi - lo)

    pen.rectangle((left, top, right, bottom), outline="black")
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        y = xy(0, v)[1]
        pen.line((left - 4, y, left, y), fill="black")
        pen.text((4, y - 6), f"{10**v:.3g}", fill="black")
    for k in range(5):
        i = round((len(values) - 1) * k / 4)
        x = xy(i, lo)[0]
        pen.line((x, bottom, x, bottom + 4), fill="black")
        pen.text((x - 10, bottom + 8), str(i + 1), fill="black")
    pen.text((left, height - 14), "optimizer step (x), training loss (y, log scale), moving average of %d" % smooth, fill="black")
    pen.line([xy(i, v) for i, v in enumerate(values)], fill=(170, 190, 230), width=1)
    avg, acc = [], 0.0
    for i, v in enumerate(losses):
        acc += v
        if i >= smooth:
            acc -= losses[i - smooth]
        avg.append(math.log10(max(acc / min(i + 1, smooth), 1e-6)))
    pen.line([xy(i, v) for i, v in enumerate(avg)], fill=(20, 40, 140), width=2)
    image.save(path)
    return path


def write_model_card(out: Path, summary: dict, config_dump: dict) -> Path:
    """``MODEL_CARD.md``: what the model is, how it was trained, and what it measured."""
    from dataclasses import asdict

    from . import model
    from .data import PALETTE, SHAPES

    cfg = model.configs()
    ae = summary["ae"]
    acc = summary["accuracy_24_prompts"]
    lines = [
        "# shapes-flux-tiny: a FLUX.1-architecture model that draws coloured shapes",
        "",
        "A tiny model in FLUX.1's architecture and file layouts, trained from scratch on CPU with `difforge train`",
        "so that `make demo` draws what its prompt says. Prompts have the form of the training captions:",
        "`a {colour} {shape} on a {colour} background` with the shape one of " + ", ".join(SHAPES)
        + " and the colours two different ones of " + ", ".join(PALETTE) + ".",
        "",
        "```python",
        "from difforge_sdk.shapes.train_demo_model import load_pipeline",
        "pipe = load_pipeline()   # difforge.Pipeline.from_pretrained('flux', ...) on these files",
        "pipe('a yellow triangle on a purple background', seed=0).save('demo.png')",
        "```",
        "",
        "Generation settings (the pipeline's call defaults set by `load_pipeline`): "
        + ", ".join(f"`{k}={v}`" for k, v in GENERATION.items())
        + ". The model was trained with T5 prompts of `max_sequence_length=16` tokens (the captions need 8);",
        "run it with that value (FLUX.1-dev's 512 would show the model 496 padding tokens it never saw).",
        "",
        "## Files (detected by difforge like any FLUX.1 release)",
        "",
        "| file | difforge model | what |",
        "|---|---|---|",
        f"| `{model.DIT_FILE}` | flux-dit (BFL layout) | the DiT, trained here |",
        f"| `{model.AE_FILE}` | flux-ae (BFL layout) | the autoencoder, trained here as an autoencoder |",
        "| `text_encoder/` | clip-text (transformers layout) | CLIP text tower, random and frozen |",
        "| `text_encoder_2/` | t5-encoder (transformers layout) | T5 encoder, random and frozen |",
        "| `tokenizer/`, `tokenizer_2/` | clip-tokenizer, t5-tokenizer | trained on the captions: one token per word |",
        "",
        "## Architecture",
        "",
        f"- DiT: `{asdict(cfg['dit'])}`",
        f"- AE: `{asdict(cfg['vae'])}` (8x downscale, 16 latent channels, FLUX.1's scale and shift)",
        f"- CLIP: hidden {cfg['clip'].hidden_size}, {cfg['clip'].num_hidden_layers} layers; "
        f"T5: d_model {cfg['t5'].d_model}, {cfg['t5'].num_layers} layers",
        "",
        "64x64 images -> 8x8x16 latents -> 16 image tokens of 64 channels; 16 T5 tokens; no guidance embedding",
        "(FLUX.1-schnell-like), no classifier-free guidance.",
        "",
        "The text encoders are random (zero-mean weights scaled to keep activations near unit size) and were never",
        "trained: different words still get different embeddings, and the DiT learns what they mean. They are",
        "not CLIP or T5 in any semantic sense.",
        "",
        "## Data",
        "",
        f"{summary['images']} procedural 64x64 images (`difforge_sdk.shapes.data`, seed {summary.get('seed', 0) + 7}):",
        "one circle, square or triangle, radius 22-40% of the side, wholly inside the image, of one palette colour on",
        "a background of another (8 x 7 x 3 = 168 captions).",
        "",
        "## Training",
        "",
        f"1. AE: {ae.get('steps_32px_crops')} steps on random 32x32 crops then {ae.get('steps_64px')} steps on whole",
        f"   images (batch {ae.get('batch')}, AdamW, one-cycle LR 3e-3), loss L1 + MSE of the reconstruction from the",
        "   latent plus Gaussian noise (std 0.1 in the DiT's scaled latent space), plus a penalty keeping each scaled",
        f"   latent channel near mean 0 and std 1. Wall time {ae.get('wall_s')} s; held-out mean absolute error",
        f"   {ae.get('heldout_mean_abs_error_0_255')} / 255 per pixel channel; latent mean {ae.get('latent_mean')},",
        f"   std {ae.get('latent_std')}.",
        f"2. DiT: `difforge train` full training, flow matching (uniform sigma), {summary['dit_steps']} optimizer",
        f"   steps of batch {summary['batch_size']}, AdamW lr {summary['learning_rate']} (200 warm-up steps, cosine",
        "   decay, no weight decay, gradient norm clipped at 1), latents and prompt embeddings cached, from PyTorch's",
        f"   default initialisation (output projection zeroed). Wall time {summary['dit_wall_s']} s on",
        f"   {summary['threads']} CPU threads (a machine shared with other jobs).",
        f"   Loss: {summary['first_loss_mean_first_20']} (mean of the first 20 steps) -> "
        f"{summary['final_loss_mean_last_200']} (mean of the last 200).",
        "",
        *(["   (The AE file was trained beforehand by `train_autoencoder` with these defaults and passed with `--ae`.)"]
          if summary.get("ae_reused") else []),
        "",
        "![loss curve](loss.png)",
        "",
        "Training arguments (`difforge train`; WORKDIR is the script's `--workdir`):",
        "",
        "```json",
        json.dumps({k: v for k, v in config_dump.items() if v not in (None, [], {}) or k == "pipeline_args"},
                   indent=1).replace(str(summary.get("workdir", "\0")), "WORKDIR"),
        "```",
        "",
        "Rerun everything (AE and DiT together took about 35 minutes here): `python -m difforge_sdk.shapes.train_demo_model`.",
        "",
        "## Quality",
        "",
        "On 24 fixed prompts (`difforge_sdk.shapes.data.fixed_prompts`, seed = prompt index), the fraction of",
        "images whose shape colour and background colour, read back from the pixels, are the prompt's:",
        "",
        "| inference steps | match |",
        "|---|---|",
        *[f"| {k} | {v:.0%} |" for k, v in acc.items()],
        "",
        "Cache and fp8 settings: `benchmarks/demo_quality.py` (results in benchmarks/README.md).",
        "",
        "## Limits",
        "",
        "It knows 3 shapes, 8 colours and one sentence pattern at 64x64; anything else gives an arbitrary shapes",
        "picture. The colours are what it gets right; the shapes come out as rough blobs of about the right size",
        "(the shape word is followed loosely at best; it is not measured), with soft edges from the tiny AE.",
        "",
    ]
    path = out / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="out/shapes-train", help="data, intermediate files and the training run")
    parser.add_argument("--out", default=str(PACKAGE_MODEL), help="where the finished model goes")
    parser.add_argument("--images", type=int, default=1500, help="data set size")
    parser.add_argument("--ae", help="reuse this trained AE file instead of training one")
    parser.add_argument("--ae_steps", type=int, default=2000)
    parser.add_argument("--ae_full_size_steps", type=int, default=200)
    parser.add_argument("--dit_steps", type=int, default=8000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 was fastest on the shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    import torch

    from difforge.train import TrainConfig, train

    from . import model
    from .data import fixed_prompts, write_dataset

    torch.set_num_threads(args.threads)
    work, out = Path(args.workdir), Path(args.out)
    start = time.perf_counter()
    write_dataset(work / "data", args.images, seed=args.seed + 7, size=IMAGE_SIZE)
    files = {"dit": work / "init" / DIT_FILE, "vae": work / "init" / AE_FILE}
    files.update(model.write_encoders(work / "init", seed=args.seed))
    model.write_initial_dit(files["dit"], seed=args.seed)
    if args.ae:
        shutil.copy(args.ae, files["vae"])
        ae_info = json.loads((Path(args.ae).parent / "ae_info.json").read_text()) if (Path(args.ae).parent / "ae_info.json").is_file() else {"reused": args.ae}
    else:
        ae_info = model.train_autoencoder(files["vae"], steps=args.ae_steps, full_size_steps=args.ae_full_size_steps, seed=args.seed)
    (work / "init" / "ae_info.json").write_text(json.dumps(ae_info, indent=2))

    config = TrainConfig(
        pipeline="flux",
        model_paths=[str(files[s]) for s in ("dit", "vae", "text_encoder", "text_encoder_2")],
        tokenizer_paths=[str(files["tokenizer"]), str(files["tokenizer_2"])],
        dataset_base_path=str(work / "data"),
        height=IMAGE_SIZE, width=IMAGE_SIZE,
        batch_size=args.batch_size,
        dataset_repeat=args.dit_steps * args.batch_size // args.images + 1,
        max_steps=args.dit_steps,
        learning_rate=args.learning_rate,
        lr_scheduler="cosine",
        lr_warmup_steps=200,
        weight_decay=0.0,
        cache_inputs=True,
        pipeline_args={"max_sequence_length": MAX_SEQUENCE_LENGTH},
        save_steps=500,
        output_path=str(work / "train"),
        device="cpu",
        seed=args.seed,
        log_steps=100,
    )
    result = train(config)

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(result.files[-1], out / DIT_FILE)
    shutil.copy(files["vae"], out / AE_FILE)
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        src = files[name] if files[name].is_dir() else files[name].parent
        shutil.rmtree(out / src.name, ignore_errors=True)
        shutil.copytree(src, out / src.name)
    losses = result.losses
    loss_curve_png(losses, out / "loss.png")
    with (out / "loss.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows((i + 1, f"{v:.5f}") for i, v in enumerate(losses))

    pipe = load_pipeline(out)
    quality = {steps: evaluate(pipe, fixed_prompts(24), num_inference_steps=steps) for steps in (4, 8, 20)}
    summary = {
        "images": args.images, "dit_steps": result.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "dit_wall_s": round(result.wall_s, 1),
        "total_wall_s": round(time.perf_counter() - start, 1),
        "final_loss_mean_last_200": round(sum(losses[-200:]) / len(losses[-200:]), 5),
        "first_loss_mean_first_20": round(sum(losses[:20]) / len(losses[:20]), 5),
        "ae": ae_info,
        "accuracy_24_prompts": {steps: q["accuracy"] for steps, q in quality.items()},
        "threads": args.threads,
        "seed": args.seed,
        "torch": torch.__version__,
        "ae_reused": bool(args.ae),
        "workdir": str(work),
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    write_model_card(out, summary, config.as_dict())
    log.info("done: %s", summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

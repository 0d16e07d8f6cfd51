"""The ``difforge`` command line.

``difforge plugins [--json]``, ``difforge list KIND``, ``difforge detect FILE...``,
``difforge convert IN --to FORMAT -o OUT``, ``difforge generate PIPELINE --prompt ...``,
``difforge run RECIPE.toml``, ``difforge train PIPELINE --dataset_base_path ...`` (with ``difforge[train]``),
``difforge new-plugin NAME --kind KIND`` (with difforge-sdk). Errors are one clear line on stderr (``--debug`` for tracebacks).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .errors import DifforgeError

LIST_KINDS = ("models", "pipelines", "schedulers", "caches", "offload", "attention", "converters")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import get_plugin_host

    rows = get_plugin_host().plugin_rows()
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    table = []
    for r in rows:
        provides = "; ".join(f"{k}: {', '.join(v)}" for k, v in r.provides.items())
        hooks = ", ".join(h.removeprefix("difforge_") for h in r.hooks)
        status = r.status if r.status == "ok" else f"{r.status}: {r.reason}"
        table.append([r.name, r.distribution or "-", r.version or "-", hooks or "-", provides or "-", status])
    print(_table(table, ["plugin", "distribution", "version", "hooks", "registers", "status"]))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .plugins import get_registry

    table = get_registry().table(args.kind)
    rows = []
    for entry in table.entries():
        spec = entry.spec
        extra = ""
        if args.kind == "models":
            extra = f"{spec.family}/{spec.role}, format {spec.format}"
        elif args.kind == "pipelines":
            extra = f"slots: {', '.join(s.name for s in spec.slots)}"
        elif args.kind == "schedulers":
            extra = f"families: {', '.join(spec.families)}"
        elif args.kind == "offload":
            extra = spec.kind
        elif args.kind == "attention":
            extra = f"priority {spec.priority}"
        elif args.kind == "converters":
            extra = f"{spec.kind}: {spec.source_format} -> {spec.target_model}"
        rows.append([spec.name, entry.distribution or entry.plugin, extra, getattr(spec, "description", "")])
    if args.json:
        print(json.dumps([dict(zip(["name", "provider", "summary", "description"], r)) for r in rows], indent=2))
    else:
        print(_table(rows, ["name", "provider", "summary", "description"]))
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    import time

    from .loading.detect import detect

    paths: list[str] = args.files
    groups = [paths] if args.together else [[p] for p in paths]
    results = []
    for group in groups:
        start = time.perf_counter()
        result = detect(group if len(group) > 1 else group[0])
        elapsed = time.perf_counter() - start
        info = result.as_dict()
        info["seconds"] = round(elapsed, 4)
        results.append(info)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        for info in results:
            print(f"{', '.join(info['paths'])}")
            for key in ("model", "family", "role", "format", "variant", "fingerprint", "config", "seconds"):
                print(f"  {key:12s} {info.get(key)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if args.lora:
        from .lora.formats import convert_lora

        source = args.input[0] if len(args.input) == 1 else args.input
        out = convert_lora(source, to_format=args.to, output=args.output)
    else:
        from .loading.convert import convert_checkpoint

        out = convert_checkpoint(args.input, to_format=args.to, output=args.output)
    logging.getLogger("difforge").info("wrote %s", out)
    print(out)
    return 0


def _plugin_option(value: str | None) -> Any:
    """``--cache fbcache`` or ``--cache '{"name": "fbcache", "threshold": 0.1}'``."""
    if value is None:
        return None
    value = value.strip()
    if value.startswith("{"):
        return json.loads(value)
    if value.lower() in {"none", "off"}:
        return None
    return value


def _generate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for name in ("prompt", "negative_prompt", "seed", "width", "height", "cfg_scale", "embedded_guidance",
                 "denoising_strength", "num_frames", "input_image"):
        value = getattr(args, name, None)
        if value is not None:
            kw[name] = value
    if args.steps is not None:
        kw["num_inference_steps"] = args.steps
    return kw


def _save_output(result: Any, output: str, fps: int) -> None:
    from .runtime.video import save_output

    save_output(result, output, fps=fps)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .runtime.pipeline import Pipeline

    offload = [_plugin_option(o) for o in args.offload] if args.offload else None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = Pipeline.from_pretrained(
        args.pipeline,
        model_configs=args.model or None,
        torch_dtype=dtype,
        device=args.device,
        attention=_plugin_option(args.attention),
        cache=_plugin_option(args.cache),
        offload=offload,
        scheduler=_plugin_option(args.scheduler),
        parallelism=args.parallelism,
        cfg_parallel=args.cfg_parallel,
        ulysses_degree=args.ulysses_degree,
    )
    try:
        result = pipe(**_generate_kwargs(args))
    finally:
        close = getattr(pipe, "close", None)  # a ParallelPipeline stops its workers
        if close is not None:
            close()
    state = getattr(pipe, "parallel_state", None)
    if state is None or state.rank == 0:  # under torchrun, rank 0 writes the file
        _save_output(result, args.output, args.fps)
        print(args.output)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime.pipeline import Pipeline
    from .runtime.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    pipe = Pipeline.from_recipe(recipe)
    kw = dict(recipe.defaults)
    kw.update(_generate_kwargs(args))
    result = pipe(**kw)
    output = args.output or recipe.output or "out.png"
    _save_output(result, output, args.fps)
    print(output)
    return 0


PLUGIN_KINDS = ("model", "cache", "attention", "offload", "scheduler")


def cmd_new_plugin(args: argparse.Namespace) -> int:
    """Scaffold a plugin package; the templates live in the plugin author's kit, difforge-sdk."""
    from .errors import ConfigError

    try:
        from difforge_sdk import scaffold
    except ImportError:
        raise ConfigError(
            "`difforge new-plugin` comes with the plugin author's kit: pip install difforge-sdk "
            "(in a difforge checkout: pip install -e sdk)"
        ) from None
    return scaffold.main(args)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import config_from_args, train

    result = train(config_from_args(args))
    print(f"trained {result.steps} steps ({result.mode}) in {result.wall_s:.0f}s; loss log: {result.output_path / 'loss.csv'}")
    for path in result.files:
        print(f"wrote {path}")
    return 0


def _add_generation_args(p: argparse.ArgumentParser, *, prompt_required: bool) -> None:
    p.add_argument("--prompt", required=prompt_required)
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="num_inference_steps")
    p.add_argument("--cfg-scale", dest="cfg_scale", type=float)
    p.add_argument("--embedded-guidance", dest="embedded_guidance", type=float)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--num-frames", dest="num_frames", type=int)
    p.add_argument("--input-image", dest="input_image")
    p.add_argument("--denoising-strength", dest="denoising_strength", type=float)
    p.add_argument("--fps", type=int, default=16, help="frames per second of a video output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difforge", description="Diffusion models assembled from plugins.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list discovered plugins, what they register and their status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("list", help="list registered names of one kind")
    p.add_argument("kind", choices=LIST_KINDS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("detect", help="detect what checkpoint files are (reads headers only)")
    p.add_argument("files", nargs="+")
    p.add_argument("--together", action="store_true", help="treat the files as shards of one checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("convert", help="write a checkpoint in another registered format (safetensors)")
    p.add_argument("input", nargs="+")
    p.add_argument("--to", required=True, help="target format, e.g. diffusers, bfl, comfyui (LoRA: kohya, xlabs, ...)")
    p.add_argument("--lora", action="store_true", help="the input is a LoRA file, not a model checkpoint")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate an image or video")
    p.add_argument("pipeline")
    _add_generation_args(p, prompt_required=True)
    p.add_argument("--model", action="append", help="a checkpoint path, shard glob, folder or model id (repeatable)")
    p.add_argument("--cache")
    p.add_argument("--attention")
    p.add_argument("--offload", action="append")
    p.add_argument("--scheduler")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--parallelism", type=int, help="processes (GPUs) to run on: cfg_parallel * ulysses_degree")
    p.add_argument("--cfg-parallel", type=int, choices=[1, 2], help="2: the two CFG branches on different processes")
    p.add_argument("--ulysses-degree", type=int, help="processes that split the DiT's token sequence (Ulysses)")
    p.add_argument("-o", "--output", default="out.png")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="run a TOML recipe")
    p.add_argument("recipe")
    _add_generation_args(p, prompt_required=False)
    p.add_argument("-o", "--output")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="flow-matching training of a pipeline's denoiser, full or LoRA (difforge[train])")
    from .train.config import add_train_arguments

    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("new-plugin", help="scaffold a plugin package that installs and passes its tests (needs difforge-sdk)")
    p.add_argument("name", help="plugin name, e.g. my-cache (the distribution becomes difforge-my-cache)")
    p.add_argument("--kind", required=True, choices=PLUGIN_KINDS)
    p.add_argument("--dir", default=".", help="where to create the package folder (default: the current one)")
    p.set_defaults(func=cmd_new_plugin)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except DifforgeError as exc:
        if args.debug:
            raise
        print(f"difforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

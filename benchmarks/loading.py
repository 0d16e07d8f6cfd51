"""Load time and peak RSS of ``difforge.load_model`` vs diffusers on the same safetensors file.

The model is a FLUX.1 DiT at real width (hidden 3072, 24 heads x 128, T5 width 4096, CLIP pooled
768, guidance embedding) with few blocks (default 1 double + 2 single: ~1.4 GB in bf16), random
bf16 weights, written once in two layouts:

- ``bfl``: one BFL-layout file (FLUX.1-dev's own layout), loaded by ``difforge.load_model(file)``
  and by ``FluxTransformer2DModel.from_single_file(file, config=<local diffusers config folder>)``;
- ``diffusers``: a ``save_pretrained`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``),
  loaded by ``difforge.load_model(folder)`` (renames keys and fuses q/k/v into BFL's ``qkv``/``linear1``)
  and by ``FluxTransformer2DModel.from_pretrained(folder)``.

Every measurement runs in a fresh subprocess, so imports, allocator state and caches do not leak
from one to the next. In each: the imports are timed on their own, the peak-RSS counter is reset
after them (``/proc/self/clear_refs``), then the load call alone is timed, then one pass reads every
weight (a bf16 ``sum`` of each parameter and buffer: no temporaries). RSS is reported right after
the load and after that pass, as increments over the RSS after imports: safetensors tensors that
stay memory-mapped are not resident until read, so "after load" alone would flatter a lazy loader;
"after read" is what a first forward pass costs. Resident file-backed pages (``RssFile``) are page
cache shared with the kernel and reclaimable; anonymous pages (``RssAnon``) are real copies.

The files are warm in the page cache for every run (each run is preceded by a full read of its
file); the page cache is not dropped, as this is a shared machine. So times are load-from-RAM
times, not disk times, for both sides alike. Runs alternate ours / diffusers (the order flips
every repeat); medians are reported.

    python benchmarks/loading.py             # 3 repeats per side and layout (~3-4 minutes on 2 cores)
    python benchmarks/loading.py --quick     # 1 repeat
    python benchmarks/loading.py --double 2 --single 4 --keep --workdir /tmp/x   # bigger file, kept

Needs ``diffusers`` and ``accelerate`` (without accelerate diffusers cannot build on the meta
device and falls back to a random initialisation, which would make it a strawman). Writes
``benchmarks/results/loading.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WIDTH = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768)
TARGET_SPEEDUP = 2.0  # ours at least 2x faster than diffusers
TARGET_RSS = 1.15  # ours' peak RSS increment within 1.15x of the file size
MiB = 1 << 20


# ---------------------------------------------------------------- /proc/self/status


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024  # kB
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- child: write the files


def write_files(double: int, single: int, workdir: Path) -> dict[str, Any]:
    """Random bf16 weights -> BFL file; diffusers config folder; diffusers save_pretrained folder."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from difforge_flux.dit import FluxDiT, FluxDiTConfig

    bfl = workdir / "flux-dit-bfl.safetensors"
    config_dir = workdir / "diffusers-config"
    folder = workdir / "diffusers-folder"
    with torch.device("meta"):
        meta = FluxDiT(FluxDiTConfig(depth=double, depth_single_blocks=single))
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for key, t in meta.state_dict().items():
        tensors[key] = torch.randn(t.shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
    save_file(tensors, str(bfl), metadata={"format": "pt"})
    del tensors
    t1 = time.perf_counter()

    with init_empty_weights():
        empty = FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True, **WIDTH)
    empty.save_config(str(config_dir / "transformer"))
    del empty
    ref = FluxTransformer2DModel.from_single_file(
        str(bfl), config=str(config_dir), subfolder="transformer", torch_dtype=torch.bfloat16, local_files_only=True
    )
    # sanity: diffusers split BFL's fused qkv as we expect (same weights on both sides)
    from safetensors import safe_open

    with safe_open(str(bfl), framework="pt") as f:
        qkv = f.get_tensor("double_blocks.0.img_attn.qkv.weight")
    assert torch.equal(ref.transformer_blocks[0].attn.to_k.weight, qkv[3072:6144]), "diffusers read other weights"
    ref.save_pretrained(str(folder), safe_serialization=True)
    del ref
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, f"expected one diffusers weight file, got {files}"
    log(f"  wrote {bfl.name} in {t1 - t0:.0f}s, the diffusers folder in {time.perf_counter() - t1:.0f}s")
    return {"bfl": str(bfl), "config_dir": str(config_dir), "folder": str(folder), "folder_file": str(files[0])}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- child: one measurement


def measure(side: str, layout: str, paths: dict[str, str], dtype_name: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch

    if side == "ours":
        import difforge
    else:
        from diffusers import FluxTransformer2DModel
    import_s = time.perf_counter() - t0
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype_name]

    import gc

    gc.collect()
    base = proc_status()
    peak_reset = reset_peak()
    if not peak_reset:
        base["VmRSS"] = base["VmHWM"]  # best effort: increments over the import peak
    dynamo_before = "torch._dynamo" in sys.modules
    t1 = time.perf_counter()
    if side == "ours":
        model = difforge.load_model(paths["bfl"] if layout == "bfl" else paths["folder"], torch_dtype=dtype)
    elif layout == "bfl":
        model = FluxTransformer2DModel.from_single_file(
            paths["bfl"], config=paths["config_dir"], subfolder="transformer", torch_dtype=dtype, local_files_only=True
        )
    else:
        model = FluxTransformer2DModel.from_pretrained(paths["folder"], torch_dtype=dtype, local_files_only=True)
    load_s = time.perf_counter() - t1
    after_load = proc_status()
    dynamo_imported = not dynamo_before and "torch._dynamo" in sys.modules

    t2 = time.perf_counter()
    nbytes = 0
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()  # reads every element; a same-dtype sum makes no temporary copy (dtype=float32 would)
            nbytes += t.numel() * t.element_size()
    read_s = time.perf_counter() - t2
    after_read = proc_status()

    def incs(st: dict[str, int]) -> dict[str, float]:
        return {
            "rss_inc_mib": (st["VmRSS"] - base["VmRSS"]) / MiB,
            "peak_inc_mib": (st["VmHWM"] - base["VmRSS"]) / MiB,
            "anon_inc_mib": (st["RssAnon"] - base["RssAnon"]) / MiB,
            "file_inc_mib": (st["RssFile"] - base["RssFile"]) / MiB,
            "rss_abs_mib": st["VmRSS"] / MiB,
            "peak_abs_mib": st["VmHWM"] / MiB,
        }

    return {
        "side": side,
        "layout": layout,
        "import_s": import_s,
        "load_s": load_s,
        "read_s": read_s,
        "base_rss_mib": base["VmRSS"] / MiB,
        "import_peak_mib": base["VmHWM"] / MiB,
        "peak_reset": peak_reset,
        "after_load": incs(after_load),
        "after_read": incs(after_read),
        "model_bytes": nbytes,
        "load_imported_torch_dynamo": dynamo_imported,
    }


# ---------------------------------------------------------------- parent


def run_child(args: list[str]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("DIFFUSERS_VERBOSITY", "error")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child {args[:3]} failed with exit status {proc.returncode}")
    if args[1].startswith('{"kind": "write"'):
        sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm(path: str) -> None:
    """Read the whole file so that it is in the page cache for whichever side runs next."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 * MiB):
            pass


def median(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v[p]
        values.append(v)
    return statistics.median(values)


def versions() -> dict[str, str | None]:
    """Installed versions (from package metadata: importing diffusers here would cost seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "accelerate", "safetensors", "difforge", "difforge-flux"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--double", type=int, default=1, help="double-stream blocks (default 1)")
    ap.add_argument("--single", type=int, default=2, help="single-stream blocks (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side and layout (default 3; median)")
    ap.add_argument("--quick", action="store_true", help="1 repeat")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="torch_dtype asked of both")
    ap.add_argument("--layouts", default="bfl,diffusers", help="comma list of bfl, diffusers")
    ap.add_argument("--workdir", type=Path, default=None, help="where the files go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the written files (reused by a later --workdir run)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "loading.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        job = json.loads(args.child)
        if job["kind"] == "write":
            result = write_files(job["double"], job["single"], Path(job["workdir"]))
        else:
            result = measure(job["side"], job["layout"], job["paths"], job["dtype"])
        print(json.dumps(result))
        return

    repeats = 1 if args.quick else args.repeats
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    ver = versions()
    if not ver.get("accelerate"):
        print("warning: accelerate is not installed, so diffusers initialises the model randomly before loading; "
              "`pip install accelerate` for a fair comparison", file=sys.stderr)  # fmt: skip
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="difforge-bench-loading-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = workdir / "stamp.json"
    want = {"double": args.double, "single": args.single, "seed": 0}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        paths = None
        if stamp.is_file():
            doc = json.loads(stamp.read_text())
            if doc.get("spec") == want and all(Path(p).exists() for p in doc["paths"].values()):
                paths = doc["paths"]
                print(f"reusing the files in {workdir}")
        if paths is None:
            print(f"writing {args.double} double + {args.single} single block FLUX DiT (bf16) to {workdir} ...")
            paths = run_child(["--child", json.dumps({"kind": "write", **want, "workdir": str(workdir)})])
            stamp.write_text(json.dumps({"spec": want, "paths": paths}))
        setup_s = time.perf_counter() - t0
        files = {"bfl": paths["bfl"], "diffusers": paths["folder_file"]}
        sizes = {k: os.path.getsize(v) for k, v in files.items()}

        runs: list[dict[str, Any]] = []
        for layout in layouts:
            for r in range(repeats):
                for side in ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours"):
                    warm(files[layout])
                    job = {"kind": "measure", "side": side, "layout": layout, "paths": paths, "dtype": args.dtype}
                    res = run_child(["--child", json.dumps(job)])
                    res["repeat"] = r
                    runs.append(res)
                    print(
                        f"  {layout:9s} {side:9s} #{r}: load {res['load_s']:6.2f}s  read {res['read_s']:5.2f}s  "
                        f"peak +{res['after_read']['peak_inc_mib']:7.0f} MiB  (import {res['import_s']:.2f}s)",
                        flush=True,
                    )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    bench_s = time.perf_counter() - t0

    summary: dict[str, Any] = {}
    for layout in layouts:
        size = sizes[layout]
        entry: dict[str, Any] = {"file_bytes": size, "file_mib": size / MiB}
        for side in ("ours", "diffusers"):
            rs = [r for r in runs if r["layout"] == layout and r["side"] == side]
            entry[side] = {
                "import_s": median(rs, "import_s"),
                "load_s": median(rs, "load_s"),
                "read_s": median(rs, "read_s"),
                "load_plus_read_s": statistics.median(r["load_s"] + r["read_s"] for r in rs),
                **{
                    f"{when}_{what}": median(rs, when, what)
                    for when in ("after_load", "after_read")
                    for what in ("rss_inc_mib", "peak_inc_mib", "anon_inc_mib", "file_inc_mib", "peak_abs_mib")
                },
                "peak_over_file": median(rs, "after_read", "peak_inc_mib") * MiB / size,
                "runs": len(rs),
                "load_imported_torch_dynamo": any(r["load_imported_torch_dynamo"] for r in rs),
            }
        o, d = entry["ours"], entry["diffusers"]
        entry["ratios"] = {
            "load_time_ours_over_diffusers": o["load_s"] / d["load_s"],
            "load_plus_read_time_ours_over_diffusers": o["load_plus_read_s"] / d["load_plus_read_s"],
            "ours_peak_inc_over_file_after_load": o["after_load_peak_inc_mib"] * MiB / size,
            "ours_peak_inc_over_file_after_read": o["after_read_peak_inc_mib"] * MiB / size,
            "diffusers_peak_inc_over_file_after_read": d["after_read_peak_inc_mib"] * MiB / size,
        }
        entry["targets"] = {
            "speedup_2x_load": d["load_s"] / o["load_s"] >= TARGET_SPEEDUP,
            "speedup_2x_load_plus_read": d["load_plus_read_s"] / o["load_plus_read_s"] >= TARGET_SPEEDUP,
            "peak_rss_within_1.15x_file": o["after_read_peak_inc_mib"] * MiB / size <= TARGET_RSS,
        }
        summary[layout] = entry

    print_table(summary, args, repeats)
    doc = {
        "benchmark": "loading",
        "model": f"FLUX.1 DiT, real width, {args.double} double + {args.single} single blocks, random bf16 weights",
        "dtype": args.dtype,
        "repeats": repeats,
        "command": " ".join(["python", "benchmarks/loading.py", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "mem_total_gib": mem_total_gib(),
            "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
        },
        "versions": ver,
        "setup_s": setup_s,
        "total_s": bench_s,
        "notes": [
            "Each run is a fresh subprocess; import time is measured separately from the load call.",
            "Peak RSS: VmHWM reset via /proc/self/clear_refs after the imports; increments are over the RSS after "
            "imports. 'after_load' = right after the load call; 'after_read' = after one pass summing every "
            "parameter (memory-mapped weights only become resident when read).",
            "RssFile = resident file-backed pages (page cache, shared and reclaimable); RssAnon = private copies.",
            "Files are warm in the page cache for both sides (read fully before each run; caches are not dropped).",
            "Targets (issue 3): ours >= 2x faster than diffusers; ours' peak RSS increment <= 1.15x the file size.",
        ],
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(
        f"\nwrote {args.out} (setup {setup_s:.0f}s, total {bench_s:.0f}s; 1-minute load average "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs)"
    )


def mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def print_table(summary: dict[str, Any], args: argparse.Namespace, repeats: int) -> None:
    print(
        f"\nFLUX DiT, real width, {args.double} double + {args.single} single blocks, {args.dtype}; "
        f"median of {repeats}; files warm in the page cache.\n"
        "Times in s. RSS in MiB over the RSS after imports: peak@load = peak during the load call, "
        "peak@read = peak through load and one pass reading every weight, anon/file@read = resident private / "
        "file-backed (page cache) pages after that pass; peak/file = peak@read / file size; abs peak = the "
        "process's peak RSS from the end of its imports on (the RSS after imports included)."
    )
    head = (
        f"{'layout':9s} {'side':9s} {'import s':>8s} {'load s':>7s} {'read s':>7s} "
        f"{'peak@load':>9s} {'peak@read':>9s} {'anon@read':>9s} {'file@read':>9s} {'peak/file':>9s} {'abs peak':>8s}"
    )
    print(head)
    print("-" * len(head))
    for layout, e in summary.items():
        for side in ("ours", "diffusers"):
            s = e[side]
            print(
                f"{layout:9s} {side:9s} {s['import_s']:8.2f} {s['load_s']:7.2f} {s['read_s']:7.2f} "
                f"{s['after_load_peak_inc_mib']:9.0f} {s['after_read_peak_inc_mib']:9.0f} "
                f"{s['after_read_anon_inc_mib']:9.0f} {s['after_read_file_inc_mib']:9.0f} {s['peak_over_file']:9.2f} "
                f"{s['after_read_peak_abs_mib']:8.0f}"
            )
        r, t = e["ratios"], e["targets"]
        print(
            f"{layout:9s} file {e['file_mib']:.0f} MiB | ours/diffusers time: load {r['load_time_ours_over_diffusers']:.2f} "
            f"(speedup {1 / r['load_time_ours_over_diffusers']:.2f}x, 2x target {'met' if t['speedup_2x_load'] else 'NOT met'}), "
            f"load+read {r['load_plus_read_time_ours_over_diffusers']:.2f} "
            f"(speedup {1 / r['load_plus_read_time_ours_over_diffusers']:.2f}x, "
            f"{'met' if t['speedup_2x_load_plus_read'] else 'NOT met'}) | ours peak/file "
            f"{r['ours_peak_inc_over_file_after_load']:.2f} at load, {r['ours_peak_inc_over_file_after_read']:.2f} after read "
            f"(1.15x target {'met' if t['peak_rss_within_1.15x_file'] else 'NOT met'})"
        )
        if e["ours"]["load_imported_torch_dynamo"]:
            print(
                f"{layout:9s} note: ours' load imported torch._dynamo (the meta kernel of torch.cat, used when the "
                "converter's transform runs on meta tensors, imports it on first use); that import is in ours' load time"
            )
        print()


if __name__ == "__main__":
    main()

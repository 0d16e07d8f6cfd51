"""``make demo``: run the main job end to end on tiny local checkpoints and write an image.

No model weights can be downloaded where difforge is built and tested, so the demo writes tiny
random checkpoints in real on-disk layouts, lets difforge detect and route them, assembles the
pipeline, generates, and saves the result. The picture is noise-like: the weights are random.
It prints what it assembled and the command to run the same with real weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("difforge.demo")


def run_toy(out: Path) -> Path:
    import difforge
    import difforge_sdk.toy
    from difforge_sdk.toy.checkpoints import write_toy_checkpoints

    difforge.reload_plugins(plugins=[difforge_sdk.toy])
    files = write_toy_checkpoints(out / "checkpoints", dit_format="toy-diffusers", prefix="model.diffusion_model.")
    for path in files.values():
        r = difforge.detect(str(path))
        log.info("detected %s: model=%s format=%s variant=%s", path.name, r.model, r.format, r.variant)
    start = time.perf_counter()
    pipe = difforge.Pipeline.from_pretrained(
        "toy", model_configs=[str(p) for p in files.values()][::-1], device="cpu", cache=None, attention="sdpa"
    )
    image = pipe("a red fox in the snow", seed=0, height=64, width=64, num_inference_steps=8)
    path = out / "demo.png"
    image.save(path)
    log.info("generated %s in %.2fs with scheduler %s", path, time.perf_counter() - start, pipe.scheduler_choice)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = run_toy(out)
    print(f"wrote {path}")
    print("With real weights (downloaded from ModelScope, or HuggingFace with DIFFORGE_DOWNLOAD_SOURCE=huggingface):")
    print("  difforge generate flux --prompt 'a cat holding a sign' --steps 28 -o cat.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

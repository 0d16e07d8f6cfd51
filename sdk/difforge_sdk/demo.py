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


def run_flux(out: Path) -> Path:
    import difforge
    from difforge import ModelConfig

    from .tiny_flux import write_tiny_flux

    difforge.reload_plugins()
    files = write_tiny_flux(out / "tiny-flux")
    for slot, path in files.items():
        r = difforge.detect(str(path))
        log.info("detected %-22s model=%s format=%s variant=%s", path.name, r.model, r.format, r.variant)
    weights = [ModelConfig(path=str(files[s])) for s in ("vae", "text_encoder_2", "dit", "text_encoder")]
    tokenizers = [ModelConfig(path=str(files["tokenizer_2"])), ModelConfig(path=str(files["tokenizer"]))]
    start = time.perf_counter()
    pipe = difforge.Pipeline.from_pretrained(
        "flux", model_configs=weights, tokenizer_config=tokenizers, device="cpu", attention="sdpa"
    )
    log.info("scheduler: %s (FLUX.1-dev's scheduler_config.json)", pipe.scheduler_choice.as_arg())
    image = pipe("a cat holding a sign that says hello world", seed=0, height=256, width=256, num_inference_steps=8)
    path = out / "demo.png"
    image.save(path)
    log.info("generated %s in %.2fs", path, time.perf_counter() - start)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import difforge_flux  # noqa: F401
        import difforge_text_encoders  # noqa: F401
    except ImportError:
        log.info("difforge-flux is not installed: running the toy family instead")
        path = run_toy(out)
    else:
        path = run_flux(out)
    print(f"wrote {path}")
    print("The weights were tiny and random (no weights can be downloaded here), so the image is noise.")
    print("With the real FLUX.1-dev (downloaded from ModelScope, or HuggingFace with DIFFORGE_DOWNLOAD_SOURCE=huggingface):")
    print("  difforge generate flux --prompt 'a cat holding a sign' --steps 28 --dtype bfloat16 -o cat.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

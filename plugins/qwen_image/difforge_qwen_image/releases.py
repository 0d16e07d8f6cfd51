"""The released Qwen-Image checkpoints as key names and shapes, and their fingerprints.

The fingerprints in :mod:`difforge_qwen_image` are constants (the entry module must stay light);
this module recomputes them from the released configs, built on the meta device. The transformer is
published in its own (diffusers) layout only: ``transformer/`` in 9 shards, whose union is
fingerprinted, and ComfyUI's repackaged single file, which is the same keys behind the generic
``model.diffusion_model.`` prefix. Run ``python -m difforge_qwen_image.releases`` to print them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from difforge.loading.fingerprint import fingerprint_shapes

from .dit import QWEN_IMAGE, QwenImageDiT

RELEASES: dict[tuple[str, str], tuple[Callable[[Any], torch.nn.Module], Any]] = {
    ("qwen-image-dit", "Qwen-Image"): (QwenImageDiT, QWEN_IMAGE),
}
"""(model, variant) -> (module class, config)."""


def released_shapes(model: str, variant: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a released checkpoint in its published layout, built on meta."""
    cls, config = RELEASES[(model, variant)]
    with torch.device("meta"):
        sd = cls(config).state_dict()
    return {k: tuple(v.shape) for k, v in sd.items()}


def released_fingerprints() -> dict[tuple[str, str], str]:
    """``(model, variant) -> fingerprint`` for every release."""
    return {(model, variant): fingerprint_shapes(released_shapes(model, variant)) for model, variant in RELEASES}


if __name__ == "__main__":
    for (model, variant), fp in released_fingerprints().items():
        print(f"{model:16} {variant:16} {fp}")  # noqa: T201 - a developer script's output

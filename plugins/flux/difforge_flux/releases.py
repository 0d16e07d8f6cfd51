"""The released FLUX.1 checkpoints as key names and shapes, and their fingerprints.

The fingerprints in :mod:`difforge_flux` are constants (the entry module must stay light); this
module recomputes them from the released configs, built on the meta device and, for the diffusers
layouts, taken through the inverse converters. The tests assert that both agree; run
``python -m difforge_flux.releases`` to print them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from difforge.loading.convert import to_foreign_layout
from difforge.loading.fingerprint import fingerprint_shapes

from .ae import FLUX1_AE, FluxAE
from .convert import ae_to_diffusers, ae_unreshape, dit_split, dit_to_diffusers
from .dit import FLUX1_DEV, FLUX1_SCHNELL, FluxDiT

RELEASES: dict[tuple[str, str], tuple[Callable[[Any], torch.nn.Module], Any]] = {
    ("flux-dit", "FLUX.1-dev"): (FluxDiT, FLUX1_DEV),
    ("flux-dit", "FLUX.1-schnell"): (FluxDiT, FLUX1_SCHNELL),
    ("flux-ae", "FLUX.1"): (FluxAE, FLUX1_AE),
}
"""(model, variant) -> (module class, config). One AE serves every FLUX.1 model."""

LAYOUTS = ("bfl", "diffusers")


def _to_diffusers(model: str, sd: Mapping[str, Any]) -> dict[str, Any]:
    split, rename = (dit_split, dit_to_diffusers) if model == "flux-dit" else (ae_unreshape, ae_to_diffusers)
    return to_foreign_layout(sd, rename, split, name=f"{model} -> diffusers", strict=True)


def released_shapes(model: str, variant: str, layout: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a released checkpoint (``layout`` ``"bfl"`` or ``"diffusers"``), built on meta."""
    cls, config = RELEASES[(model, variant)]
    with torch.device("meta"):
        sd: Mapping[str, Any] = cls(config).state_dict()
    if layout == "diffusers":
        sd = _to_diffusers(model, sd)
    elif layout != "bfl":
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    return {k: tuple(v.shape) for k, v in sd.items()}


def released_fingerprints() -> dict[tuple[str, str, str], str]:
    """``(model, variant, layout) -> fingerprint`` for every release in every layout."""
    return {
        (model, variant, layout): fingerprint_shapes(released_shapes(model, variant, layout))
        for model, variant in RELEASES
        for layout in LAYOUTS
    }


if __name__ == "__main__":  # python -m <module>: the fingerprints to paste into the entry module
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for (model, variant, layout), fp in released_fingerprints().items():
        logging.getLogger(__name__).info(f"{model:10} {variant:16} {layout:10} {fp}")

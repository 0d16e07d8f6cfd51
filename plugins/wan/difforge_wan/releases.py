"""The released Wan checkpoints as key names and shapes, and their fingerprints.

The fingerprints in :mod:`difforge_wan` are constants (the entry module must stay light); this
module recomputes them from the released configs, built on the meta device and, for the diffusers
layouts (the ``-Diffusers`` repositories), taken through the inverse converters. The tests assert
that both agree; run ``python -m difforge_wan.releases`` to print them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from difforge.loading.convert import to_foreign_layout
from difforge.loading.fingerprint import fingerprint_shapes

from .convert import dit_to_diffusers, vae_to_diffusers, vae_unstructure
from .dit import WAN21_T2V_1_3B, WAN21_T2V_14B, WAN22_TI2V_5B, WanDiT
from .vae import WAN21_VAE, WAN22_VAE, WanVAE

RELEASES: dict[tuple[str, str], tuple[Callable[[Any], torch.nn.Module], Any]] = {
    ("wan-dit", "Wan2.1-T2V-1.3B"): (WanDiT, WAN21_T2V_1_3B),
    ("wan-dit", "Wan2.1-T2V-14B"): (WanDiT, WAN21_T2V_14B),
    ("wan-dit", "Wan2.2-TI2V-5B"): (WanDiT, WAN22_TI2V_5B),
    ("wan-vae", "Wan2.1-VAE"): (WanVAE, WAN21_VAE),
    ("wan-vae", "Wan2.2-VAE"): (WanVAE, WAN22_VAE),
}
"""(model, variant) -> (module class, config)."""

LAYOUTS = ("wan", "diffusers")

_TO_DIFFUSERS: dict[str, tuple[Callable[[Mapping[str, Any]], dict[str, Any]], Callable[[str], str | None]]] = {
    "wan-dit": (dict, dit_to_diffusers),
    "wan-vae": (vae_unstructure, vae_to_diffusers),
}


def _to_diffusers(model: str, sd: Mapping[str, Any]) -> dict[str, Any]:
    unstructure, rename = _TO_DIFFUSERS[model]
    return to_foreign_layout(sd, rename, unstructure, name=f"{model} -> diffusers", strict=True)


def released_shapes(model: str, variant: str, layout: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a released checkpoint (``layout`` ``"wan"`` or ``"diffusers"``), built on meta."""
    cls, config = RELEASES[(model, variant)]
    with torch.device("meta"):
        sd: Mapping[str, Any] = cls(config).state_dict()
    if layout == "diffusers":
        sd = _to_diffusers(model, sd)
    elif layout != "wan":
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
        logging.getLogger(__name__).info(f"{model:8} {variant:16} {layout:10} {fp}")

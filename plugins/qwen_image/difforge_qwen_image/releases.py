"""The released Qwen-Image checkpoints as key names and shapes, and their fingerprints.

The fingerprints in :mod:`difforge_qwen_image` are constants (the entry module must stay light);
this module recomputes them from the released configs, built on the meta device. The transformer is
published in its own (diffusers) layout only: ``transformer/`` in 9 shards, whose union is
fingerprinted, and ComfyUI's repackaged single file, which is the same keys behind the generic
``model.diffusion_model.`` prefix. Run ``python -m difforge_qwen_image.releases`` to print them.

The VAE is difforge-wan's ``wan-vae``: Qwen-Image's ``vae/`` (diffusers ``AutoencoderKLQwenImage``)
has exactly the keys, shapes and latent statistics of the Wan 2.1 VAE in diffusers' layout, so its
fingerprint is the one difforge-wan registers for ``Wan2.1-VAE`` (headers cannot tell the two sets of
weights apart). :data:`QWEN_IMAGE_VAE` is the config its ``vae/config.json`` describes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from difforge.loading.fingerprint import fingerprint_shapes

from .dit import QWEN_IMAGE, QwenImageDiT

QWEN_IMAGE_VAE_JSON = {
    "_class_name": "AutoencoderKLQwenImage",
    "attn_scales": [],
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}  # fmt: skip
"""Qwen/Qwen-Image's ``vae/config.json``."""


def qwen_image_vae_config() -> Any:
    """The ``WanVAEConfig`` of Qwen-Image's VAE (read from :data:`QWEN_IMAGE_VAE_JSON` by difforge-wan)."""
    from difforge_wan.vae import wan_vae_config_from_json

    return wan_vae_config_from_json(QWEN_IMAGE_VAE_JSON)


def qwen_image_vae_shapes() -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of Qwen-Image's ``vae/diffusion_pytorch_model.safetensors`` (diffusers layout), on meta."""
    from difforge_wan.convert import vae_to_diffusers, vae_unstructure
    from difforge_wan.vae import WanVAE

    with torch.device("meta"):
        sd = WanVAE(qwen_image_vae_config()).state_dict()
    return {vae_to_diffusers(k): tuple(v.shape) for k, v in vae_unstructure(sd).items()}

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


if __name__ == "__main__":  # python -m <module>: the fingerprints to paste into the entry module
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for (model, variant), fp in released_fingerprints().items():
        logging.getLogger(__name__).info(f"{model:16} {variant:16} {fp}")

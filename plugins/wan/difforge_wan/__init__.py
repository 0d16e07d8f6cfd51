"""difforge-wan: the Wan video family (Wan2.1 T2V 1.3B / 14B, Wan2.2 TI2V-5B and their VAEs).

This entry module is light: it imports no torch. Models and converters are named by lazy
``"module:attr"`` references. Models (own format ``wan``: Wan-AI's original key names):

- ``wan-vae`` (:mod:`.vae`, :class:`~difforge_wan.vae.WanVAE`): the causal video VAEs, Wan 2.1
  (``Wan2.1_VAE.pth``, 16 channels, 8x) and Wan 2.2 (``Wan2.2_VAE.pth``, 48 channels, 16x); the
  Wan 2.1 design also serves Qwen-Image's VAE.

Converters (:mod:`.convert`): the ``-Diffusers`` repositories' ``vae/``. Wan-AI's ``.pth`` files
load through the core's safe ``torch.load(weights_only=True)``.

The fingerprints below are recomputed from the released configs by :mod:`.releases` (and checked
by the tests); the diffusers layouts of a release carry the same variant name as Wan-AI's files.
"""

from __future__ import annotations

from collections.abc import Iterator

from difforge import ConverterSpec, ModelSpec, PipelineSpec, hookimpl

difforge_api = ">=1,<2"

VAE = "difforge_wan.vae"
CONVERT = "difforge_wan.convert"

VAE_FINGERPRINTS = {
    "00afa3b97b4c90a04726206c5c9c2291": "Wan2.1-VAE",  # Wan2.1_VAE.pth (Wan-AI)
    "b2b7c70320ae6614f5057e553dd55ed2": "Wan2.1-VAE",  # vae/ of the Wan2.1 -Diffusers repositories
    "a48071c03c30b4251dc9108c6e8e75a3": "Wan2.2-VAE",  # Wan2.2_VAE.pth (Wan-AI)
    "1c951839d5760c605847a4ce78469443": "Wan2.2-VAE",  # vae/ of Wan2.2-TI2V-5B-Diffusers
}


@hookimpl
def difforge_register_models() -> Iterator[ModelSpec | PipelineSpec]:
    yield ModelSpec(
        name="wan-vae",
        family="wan",
        role="vae",
        module=f"{VAE}:WanVAE",
        config_from_shapes=f"{VAE}:wan_vae_config_from_shapes",
        config_from_json=f"{VAE}:wan_vae_config_from_json",
        format="wan",
        identifying_keys=("encoder.conv1.weight", "encoder.middle.1.to_qkv.weight", "decoder.head.2.weight", "conv2.weight"),
        fingerprints=VAE_FINGERPRINTS,
        keep_high_precision=("*.gamma",),
        released_configs={"Wan2.1-VAE": f"{VAE}:WAN21_VAE", "Wan2.2-VAE": f"{VAE}:WAN22_VAE"},
        description="Wan causal video VAE: 2.1 (16 channels, 8x, 4x in time), 2.2 (48 channels, 16x)",
    )


@hookimpl
def difforge_register_converters() -> Iterator[ConverterSpec]:
    yield ConverterSpec(
        name="wan-vae-diffusers",
        source_format="diffusers",
        target_model="wan-vae",
        detect=f"{CONVERT}:is_wan_vae_diffusers",
        rename=f"{CONVERT}:vae_from_diffusers",
        transform=f"{CONVERT}:vae_restructure",
        inverse_rename=f"{CONVERT}:vae_to_diffusers",
        inverse_transform=f"{CONVERT}:vae_unstructure",
        description="diffusers AutoencoderKLWan / AutoencoderKLQwenImage (vae/) -> Wan-AI layout: "
        "leaf names, flat Wan 2.1 decoder list, Wan 2.2 sampler positions",
    )

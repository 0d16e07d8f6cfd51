"""difforge-wan: the Wan video family (Wan2.1 T2V 1.3B / 14B, Wan2.2 TI2V-5B and their VAEs).

This entry module is light: it imports no torch. Models and converters are named by lazy
``"module:attr"`` references. Models (own format ``wan``: Wan-AI's original key names):

- ``wan-dit`` (:mod:`.dit`, :class:`~difforge_wan.dit.WanDiT`): Wan2.1-T2V-1.3B / -14B and
  Wan2.2-TI2V-5B (``blocks.N.self_attn.q``, ...);
- ``wan-vae`` (:mod:`.vae`, :class:`~difforge_wan.vae.WanVAE`): the causal video VAEs, Wan 2.1
  (``Wan2.1_VAE.pth``, 16 channels, 8x) and Wan 2.2 (``Wan2.2_VAE.pth``, 48 channels, 16x); the
  Wan 2.1 design also serves Qwen-Image's VAE.

Converters (:mod:`.convert`): the ``-Diffusers`` repositories' ``transformer/`` and ``vae/``.
Wan-AI's ``.pth`` files load through the core's safe ``torch.load(weights_only=True)``; ComfyUI's
(``model.diffusion_model.`` + Wan-AI keys) through the core's generic prefix stripping. The text
encoder and tokenizer (umT5-XXL) come from difforge-text-encoders.

LoRA converters (:mod:`.lora`, ``kind="lora"``) of the DiT: ``comfyui`` (Wan-AI module names,
``diffusion_model.`` optional), ``kohya`` (musubi-tuner's ``lora_unet_blocks_0_self_attn_q``) and
``diffusers`` (``transformer.blocks.0.attn1.to_q``, PEFT).

Pipeline ``wan`` (:mod:`.pipeline`): text-to-video, video-to-video, image-to-video (TI2V-5B).

The fingerprints below are recomputed from the released configs by :mod:`.releases` (and checked
by the tests); the diffusers layouts of a release carry the same variant name as Wan-AI's files.
"""

from __future__ import annotations

from collections.abc import Iterator

from difforge import BlockGroup, BlockLayout, ConverterSpec, ModelSpec, PipelineSpec, SlotSpec, SourceSpec, hookimpl

difforge_api = ">=1,<2"

DIT = "difforge_wan.dit"
VAE = "difforge_wan.vae"
CONVERT = "difforge_wan.convert"
LORA = "difforge_wan.lora"

DIT_FINGERPRINTS = {
    "30ac5a0bfd934f400f3718cea971a42a": "Wan2.1-T2V-1.3B",  # diffusion_pytorch_model.safetensors (Wan-AI)
    "a45f186e77818bd5197948f39b6f390b": "Wan2.1-T2V-1.3B",  # transformer/ (-Diffusers)
    "51cb30520b12d0d0e5bb55f5c56b278f": "Wan2.1-T2V-14B",  # diffusion_pytorch_model-0000N-of-00006 (Wan-AI)
    "90466b068b65cf4c65fcf11f0ca92aa0": "Wan2.1-T2V-14B",  # transformer/ (-Diffusers)
    "e6088a353576dee0801188e93ab7bb4a": "Wan2.2-TI2V-5B",  # diffusion_pytorch_model-0000N-of-00003 (Wan-AI)
    "04153d12a1c9d925629bbf8b6d76e7dc": "Wan2.2-TI2V-5B",  # transformer/ (-Diffusers)
}

VAE_FINGERPRINTS = {
    "00afa3b97b4c90a04726206c5c9c2291": "Wan2.1-VAE",  # Wan2.1_VAE.pth (Wan-AI)
    "b2b7c70320ae6614f5057e553dd55ed2": "Wan2.1-VAE",  # vae/ of the Wan2.1 -Diffusers repositories
    "a48071c03c30b4251dc9108c6e8e75a3": "Wan2.2-VAE",  # Wan2.2_VAE.pth (Wan-AI)
    "1c951839d5760c605847a4ce78469443": "Wan2.2-VAE",  # vae/ of Wan2.2-TI2V-5B-Diffusers
}

BLOCK_LAYOUT = BlockLayout((BlockGroup("blocks", ("x",)),))
"""Every block is called ``block(x, context=..., e=..., rope=...)`` and returns ``x``."""

# as each release's scheduler/scheduler_config.json says (UniPC, flow prediction, static shift)
VARIANT_SCHEDULERS = {
    "Wan2.1-T2V-1.3B": {"name": "flow-unipc", "shift": 3.0},
    "Wan2.1-T2V-14B": {"name": "flow-unipc", "shift": 3.0},
    "Wan2.2-TI2V-5B": {"name": "flow-unipc", "shift": 5.0},
}


def _sources(repo: str, dit: str, vae: str) -> tuple[SourceSpec, ...]:
    """The files of a Wan-AI release repository (same layout on ModelScope and HuggingFace)."""
    return (
        SourceSpec("dit", repo, dit),
        SourceSpec("vae", repo, vae),
        SourceSpec("text_encoder", repo, "models_t5_umt5-xxl-enc-bf16.pth"),
        SourceSpec("tokenizer", repo, "google/umt5-xxl/"),
    )


SOURCES = {
    "Wan2.1-T2V-1.3B": _sources("Wan-AI/Wan2.1-T2V-1.3B", "diffusion_pytorch_model*.safetensors", "Wan2.1_VAE.pth"),
    "Wan2.1-T2V-14B": _sources("Wan-AI/Wan2.1-T2V-14B", "diffusion_pytorch_model*.safetensors", "Wan2.1_VAE.pth"),
    "Wan2.2-TI2V-5B": _sources("Wan-AI/Wan2.2-TI2V-5B", "diffusion_pytorch_model*.safetensors", "Wan2.2_VAE.pth"),
}


@hookimpl
def difforge_register_models() -> Iterator[ModelSpec | PipelineSpec]:
    yield ModelSpec(
        name="wan-dit",
        family="wan",
        role="dit",
        module=f"{DIT}:WanDiT",
        config_from_shapes=f"{DIT}:wan_dit_config_from_shapes",
        config_from_json=f"{DIT}:wan_dit_config_from_json",
        format="wan",
        identifying_keys=(
            "patch_embedding.weight",
            "text_embedding.0.weight",
            "time_projection.1.weight",
            "blocks.*.self_attn.q.weight",
            "head.head.weight",
        ),
        fingerprints=DIT_FINGERPRINTS,
        layout=BLOCK_LAYOUT,
        keep_high_precision=(
            "*norm*", "*modulation", "patch_embedding.*", "text_embedding.*", "time_embedding.*", "time_projection.*",
            "head.*",
        ),  # fmt: skip
        released_configs={
            "Wan2.1-T2V-1.3B": f"{DIT}:WAN21_T2V_1_3B",
            "Wan2.1-T2V-14B": f"{DIT}:WAN21_T2V_14B",
            "Wan2.2-TI2V-5B": f"{DIT}:WAN22_TI2V_5B",
        },
        description="Wan DiT: Wan2.1 T2V 1.3B (dim 1536, 30 blocks) / 14B (5120, 40), Wan2.2 TI2V-5B (3072, 30)",
    )
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
        keep_high_precision=("*.gamma", "conv1.*", "conv2.*", "encoder.conv1.*", "decoder.conv1.*", "*.head.*"),
        released_configs={"Wan2.1-VAE": f"{VAE}:WAN21_VAE", "Wan2.2-VAE": f"{VAE}:WAN22_VAE"},
        description="Wan causal video VAE: 2.1 (16 channels, 8x, 4x in time), 2.2 (48 channels, 16x)",
    )
    yield PipelineSpec(
        name="wan",
        family="wan",
        slots=(
            SlotSpec("dit", ("wan-dit",), diffusers_subfolder="transformer"),
            SlotSpec("vae", ("wan-vae",), diffusers_subfolder="vae"),
            SlotSpec("text_encoder", ("umt5-encoder",), diffusers_subfolder="text_encoder"),
            SlotSpec("tokenizer", ("t5-tokenizer",), kind="tokenizer", diffusers_subfolder="tokenizer"),
        ),
        pipeline="difforge_wan.pipeline:WanPipeline",
        default_scheduler=VARIANT_SCHEDULERS["Wan2.1-T2V-1.3B"],
        variant_schedulers=VARIANT_SCHEDULERS,
        sources=SOURCES,
        component_order=("text_encoder", "dit", "vae"),
        description="Wan text-to-video, video-to-video and (Wan2.2-TI2V-5B) image-to-video",
    )


@hookimpl
def difforge_register_converters() -> Iterator[ConverterSpec]:
    yield ConverterSpec(
        name="wan-dit-diffusers",
        source_format="diffusers",
        target_model="wan-dit",
        detect=f"{CONVERT}:is_wan_dit_diffusers",
        rename=f"{CONVERT}:dit_from_diffusers",
        inverse_rename=f"{CONVERT}:dit_to_diffusers",
        description="diffusers WanTransformer3DModel (transformer/) -> Wan-AI layout (a pure rename)",
    )
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
    for fmt, inverse, example in (
        ("comfyui", None, "diffusion_model.blocks.0.self_attn.q.lora_A.weight (prefix optional; lora_down/up, alpha)"),
        ("kohya", "kohya_export", "lora_unet_blocks_0_self_attn_q.lora_down.weight + .alpha (musubi-tuner)"),
        ("diffusers", "diffusers_export", "transformer.blocks.0.attn1.to_q.lora_A.weight (PEFT, .default optional)"),
    ):
        yield ConverterSpec(
            name=f"wan-dit-lora-{fmt}",
            source_format=fmt,
            target_model="wan-dit",
            detect=f"{LORA}:is_{fmt}",
            rename=f"{LORA}:rename_{fmt}",
            inverse_rename=f"{LORA}:inverse_{fmt}",
            inverse_transform=None if inverse is None else f"{LORA}:{inverse}",
            kind="lora",
            description=f"Wan DiT LoRA, {fmt}: {example}",
        )

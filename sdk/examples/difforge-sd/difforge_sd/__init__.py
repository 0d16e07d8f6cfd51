"""difforge-sd: Stable Diffusion 1.x and SDXL, an example third-party family plugin.

Written only against difforge's public API (``difforge``, ``difforge.ops``, ``difforge.lora``) and
difforge-sdk; CLIP and its tokenizer come from the first-party difforge-text-encoders plugin
(models ``clip-text`` and ``clip-tokenizer``). This entry module is light: torch modules are named
by lazy ``"module:attr"`` strings.

Models: ``sd-unet`` / ``sdxl-unet`` (:mod:`.unet`, role ``unet``, one module class, told apart by
SDXL's added-condition embedding) and ``sd-vae`` (:mod:`.vae`, shared by both pipelines).
Converters (:mod:`.convert`): diffusers folders and the original single-file (``ldm``) layouts;
LoRA converters (:mod:`.lora`): kohya and diffusers/PEFT for the U-Net, kohya ``lora_te_`` for CLIP-L.
Pipelines ``sd`` and ``sdxl`` (:mod:`.pipeline`). Schedulers ``ddim``, ``euler``, ``dpmpp-2m``
(:mod:`.schedulers`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from difforge import BlockGroup, BlockLayout, ConverterSpec, ModelSpec, PipelineSpec, SlotSpec, SourceSpec, hookimpl

difforge_api = ">=1,<2"

UNET = "difforge_sd.unet"
VAE = "difforge_sd.vae"
CONVERT = "difforge_sd.convert"
LORA = "difforge_sd.lora"

SD15 = "stable-diffusion-v1-5"
SDXL = "stable-diffusion-xl-base-1.0"

UNET_LAYOUT = BlockLayout(
    (BlockGroup("down_blocks"), BlockGroup("mid_blocks"), BlockGroup("up_blocks")), skip_connections=True
)
"""Every block is called ``block(hidden_states, temb=, encoder_hidden_states=, skips=)`` and returns
``hidden_states``; skip connections travel on the ``skips`` list (down blocks push, up blocks pop)."""

#: difforge.fingerprint() of the released configs built on the meta device, per format (tests/test_releases.py)
SD15_UNET_FINGERPRINTS = {
    "bcc8f9d85c433aad2be933441fcd003b": SD15,  # own layout (also: what a full single file converts to)
    "15576c288e64c99dc15cefbaba5fbbe9": SD15,  # unet/ (diffusers)
    "5440e5ee45fc9982a07b2e50e9d45fa0": SD15,  # model.diffusion_model.* alone (ldm)
}
SDXL_UNET_FINGERPRINTS = {
    "d59eff3c773a7065c47058fa23560b6c": SDXL,
    "ac0c7e44db3da0625074a3bc5ee41b77": SDXL,
    "19c31fb39731512889f4373b1e3a730e": SDXL,
}
VAE_FINGERPRINTS = {  # one architecture: SD 1.x's VAE and SDXL's differ only in their weights
    "ac3b2bf6b3f520a3c581e17b639f9d90": "sd-vae",  # vae/ (diffusers)
    "ae005f2ea72fc5e4f2f1737d6545211f": "sd-vae",  # first_stage_model.* alone (ldm)
}

_UNET_KEYS = (
    "conv_in.weight",
    "time_embedding.linear_1.weight",
    "down_blocks.*.resnets.*.conv1.weight",
    "mid_blocks.0.attentions.0.proj_in.weight",
    "up_blocks.*.resnets.*.conv1.weight",
)
_UNET_HIGH_PRECISION = ("*norm*", "conv_in.*", "conv_out.*", "time_embedding.*", "add_embedding.*")


def _sources(repo: str, sdxl: bool) -> tuple[SourceSpec, ...]:
    """A diffusers-layout release repository on ModelScope (AI-ModelScope mirrors)."""
    files = [("unet", "unet/diffusion_pytorch_model.safetensors"), ("vae", "vae/diffusion_pytorch_model.safetensors"),
             ("text_encoder", "text_encoder/model.safetensors"), ("tokenizer", "tokenizer/")]
    if sdxl:
        files += [("text_encoder_2", "text_encoder_2/model.safetensors"), ("tokenizer_2", "tokenizer_2/")]
    return tuple(SourceSpec(slot, repo, pattern, download_source="modelscope") for slot, pattern in files)


@hookimpl
def difforge_register_models() -> Iterator[Any]:
    for name, family, fingerprints, variant, infer, desc in (
        ("sd-unet", "sd", SD15_UNET_FINGERPRINTS, SD15, "sd_unet_config", "SD 1.x/2.x U-Net (no added conditions)"),
        ("sdxl-unet", "sdxl", SDXL_UNET_FINGERPRINTS, SDXL, "sdxl_unet_config", "SDXL U-Net (pooled text + size conditioning)"),
    ):
        yield ModelSpec(
            name=name,
            family=family,
            role="unet",
            module=f"{UNET}:SDUNet",
            config_from_shapes=f"{UNET}:{infer}",
            config_from_json=f"{UNET}:{infer}_from_json",
            format="difforge",
            identifying_keys=_UNET_KEYS,
            fingerprints=fingerprints,
            layout=UNET_LAYOUT,
            keep_high_precision=_UNET_HIGH_PRECISION,
            released_configs={variant: f"{UNET}:{'SD15_UNET' if family == 'sd' else 'SDXL_BASE_UNET'}"},
            description=desc,
        )
    yield ModelSpec(
        name="sd-vae",
        family="sd",
        role="vae",
        module=f"{VAE}:SDVAE",
        config_from_shapes=f"{VAE}:vae_config_from_shapes",
        config_from_json=f"{VAE}:vae_config_from_json",
        format="diffusers",
        identifying_keys=("encoder.down_blocks.*.resnets.*.conv1.weight", "quant_conv.weight", "post_quant_conv.weight"),
        fingerprints=VAE_FINGERPRINTS,
        keep_high_precision=("*norm*",),
        released_configs={"sd-vae": f"{VAE}:SD_VAE"},
        description="SD 1.x / SDXL autoencoder: 4 latent channels, 8x (scale 0.18215 / 0.13025, applied by the pipeline)",
    )
    common = dict(component_order=("text_encoder", "text_encoder_2", "unet", "vae"))
    yield PipelineSpec(
        name="sd",
        family="sd",
        slots=(
            SlotSpec("unet", ("sd-unet",), diffusers_subfolder="unet"),
            SlotSpec("vae", ("sd-vae",), diffusers_subfolder="vae"),
            SlotSpec("text_encoder", ("clip-text",), diffusers_subfolder="text_encoder"),
            SlotSpec("tokenizer", ("clip-tokenizer",), kind="tokenizer", diffusers_subfolder="tokenizer"),
        ),
        pipeline="difforge_sd.pipeline:SDPipeline",
        # SD 1.5 ships PNDM, which difforge does not have; DDIM on the same betas (as DiffSynth-Studio uses)
        default_scheduler="ddim",
        sources={SD15: _sources("AI-ModelScope/stable-diffusion-v1-5", False)},
        description="Stable Diffusion 1.x (and 2.x) text-to-image and image-to-image",
        **common,
    )
    yield PipelineSpec(
        name="sdxl",
        family="sdxl",
        slots=(
            SlotSpec("unet", ("sdxl-unet",), diffusers_subfolder="unet"),
            SlotSpec("vae", ("sd-vae",), diffusers_subfolder="vae"),
            SlotSpec("text_encoder", ("clip-text",), diffusers_subfolder="text_encoder"),
            SlotSpec("text_encoder_2", ("clip-text",), diffusers_subfolder="text_encoder_2"),
            SlotSpec("tokenizer", ("clip-tokenizer",), kind="tokenizer", diffusers_subfolder="tokenizer"),
            SlotSpec("tokenizer_2", ("clip-tokenizer",), kind="tokenizer", diffusers_subfolder="tokenizer_2"),
        ),
        pipeline="difforge_sd.pipeline:SDXLPipeline",
        default_scheduler="euler",  # stable-diffusion-xl-base-1.0 ships EulerDiscreteScheduler
        variant_schedulers={SDXL: "euler"},
        sources={SDXL: _sources("AI-ModelScope/stable-diffusion-xl-base-1.0", True)},
        description="Stable Diffusion XL text-to-image and image-to-image",
        **common,
    )


@hookimpl
def difforge_register_converters() -> Iterator[ConverterSpec]:
    for model in ("sd-unet", "sdxl-unet"):
        yield ConverterSpec(
            name=f"{model}-diffusers",
            source_format="diffusers",
            target_model=model,
            detect=f"{CONVERT}:is_unet_diffusers",
            rename=f"{CONVERT}:unet_from_diffusers",
            inverse_rename=f"{CONVERT}:unet_to_diffusers",
            description="diffusers UNet2DConditionModel (unet/): mid_block. -> mid_blocks.0.",
        )
        yield ConverterSpec(
            name=f"{model}-ldm",
            source_format="ldm",
            target_model=model,
            detect=f"{CONVERT}:is_unet_ldm",
            rename=f"{CONVERT}:unet_from_ldm",
            inverse_rename=f"{CONVERT}:unet_to_ldm",
            inverse_transform=f"{CONVERT}:unet_ldm_upsampler_slots",
            description="original single file: model.diffusion_model.input_blocks.N.M... (other components dropped)",
        )
    yield ConverterSpec(
        name="sd-vae-ldm",
        source_format="ldm",
        target_model="sd-vae",
        detect=f"{CONVERT}:is_vae_ldm",
        rename=f"{CONVERT}:vae_from_ldm",
        transform=f"{CONVERT}:vae_reverse_decoder",
        inverse_rename=f"{CONVERT}:vae_to_ldm",
        inverse_transform=f"{CONVERT}:vae_to_ldm_transform",
        description="original single file or standalone VAE: (first_stage_model.)encoder.down.N.block.M...",
    )
    yield ConverterSpec(
        name="sd-clip-ldm",
        source_format="ldm",
        target_model="clip-text",
        detect=f"{CONVERT}:is_clip_ldm",
        rename=f"{CONVERT}:clip_from_ldm",
        inverse_rename=f"{CONVERT}:clip_to_ldm",
        description="CLIP-L inside an original single file: cond_stage_model.transformer. / conditioner.embedders.0.transformer.",
    )
    yield ConverterSpec(
        name="sdxl-clip-g-openclip",
        source_format="openclip",
        target_model="clip-text",
        detect=f"{CONVERT}:is_openclip_ldm",
        rename=f"{CONVERT}:openclip_from_ldm",
        transform=f"{CONVERT}:openclip_split",
        inverse_rename=f"{CONVERT}:openclip_to_ldm",
        inverse_transform=f"{CONVERT}:openclip_fuse",
        description="SDXL's OpenCLIP-G in an original single file: conditioner.embedders.1.model. (fused in_proj)",
    )
    for model in ("sd-unet", "sdxl-unet"):
        for fmt, example in (
            ("diffusers", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight (PEFT)"),
            ("kohya", "lora_unet_down_blocks_0_attentions_0_..._to_q.lora_down.weight, or ldm names (lora_unet_input_blocks_4_1_...)"),
        ):
            yield ConverterSpec(
                name=f"{model}-lora-{fmt}",
                source_format=fmt,
                target_model=model,
                detect=f"{LORA}:is_unet_{fmt}",
                rename=f"{LORA}:rename_unet_{fmt}",
                inverse_rename=f"{LORA}:inverse_unet_{fmt}",
                kind="lora",
                description=f"SD U-Net LoRA, {fmt}: {example}",
            )


@hookimpl
def difforge_register_schedulers() -> Any:
    from ._scheduler_specs import SCHEDULERS

    return list(SCHEDULERS)

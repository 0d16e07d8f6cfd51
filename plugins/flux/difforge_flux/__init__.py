"""difforge-flux: the FLUX.1 family (dev, schnell and their fine-tunes).

This entry module is light: it imports no torch. Models and converters are named by lazy
``"module:attr"`` references. Models: ``flux-dit`` (:mod:`.dit`, own format BFL, as in
``flux1-dev.safetensors``) and ``flux-ae`` (:mod:`.ae`, own format BFL, as in ``ae.safetensors``).
Converters (:mod:`.convert`): the diffusers folders (``transformer/``, ``vae/``). ComfyUI/civitai
files (``model.diffusion_model.`` + BFL keys) load through the core's generic prefix stripping.
LoRA converters (:mod:`.lora`, ``kind="lora"``): the diffusers/PEFT, kohya, ComfyUI, XLabs and
DiffSynth-Studio layouts of the DiT, and the CLIP/T5 parts of LoRA files.

The fingerprints below are recomputed from the released configs by :mod:`.releases` (and checked
by the tests); the diffusers layouts of a release carry the same variant name as the BFL files.
"""

from __future__ import annotations

from collections.abc import Iterator

from difforge import BlockGroup, BlockLayout, ConverterSpec, ModelSpec, PipelineSpec, SlotSpec, SourceSpec, hookimpl

difforge_api = ">=1,<2"

DIT = "difforge_flux.dit"
AE = "difforge_flux.ae"
CONVERT = "difforge_flux.convert"
LORA = "difforge_flux.lora"

DIT_FINGERPRINTS = {
    "54f41176ae5ce6f91fdfafdc5e0ca4c9": "FLUX.1-dev",  # flux1-dev.safetensors (BFL)
    "0f61dca335b3d46fcac330f0b3f19978": "FLUX.1-dev",  # transformer/ (diffusers)
    "c07962851a81b0ba4b346d2da9f68f10": "FLUX.1-schnell",  # flux1-schnell.safetensors (BFL)
    "699b2d640563ec7ac00991a4d913db1f": "FLUX.1-schnell",  # transformer/ (diffusers)
}
AE_FINGERPRINTS = {
    "312604292a540d82be39ff82ab2bf3dd": "FLUX.1",  # ae.safetensors (BFL), shared by all FLUX.1 models
    "58c28b377ec3c5190fc3d7dd74fb8531": "FLUX.1",  # vae/ (diffusers)
}

BLOCK_LAYOUT = BlockLayout((BlockGroup("double_blocks", ("img", "txt")), BlockGroup("single_blocks", ("img", "txt"))))
"""Every block is called ``block(img, txt, vec=..., pe=...)`` and returns ``(img, txt)``."""


FLUX_DEV_SCHEDULER = {
    "name": "flow-euler",
    "shift": 3.0,
    "dynamic_shift": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
RELEASES = {
    "FLUX.1-dev": ("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors"),
    "FLUX.1-schnell": ("black-forest-labs/FLUX.1-schnell", "flux1-schnell.safetensors"),
}


def _sources(repo: str, single_file: str) -> tuple[SourceSpec, ...]:
    """The files of a release repository (same layout on ModelScope and HuggingFace)."""
    return (
        SourceSpec("dit", repo, single_file),
        SourceSpec("vae", repo, "ae.safetensors"),
        SourceSpec("text_encoder", repo, "text_encoder/model.safetensors"),
        SourceSpec("text_encoder_2", repo, "text_encoder_2/"),
        SourceSpec("tokenizer", repo, "tokenizer/"),
        SourceSpec("tokenizer_2", repo, "tokenizer_2/"),
    )


@hookimpl
def difforge_register_models() -> Iterator[ModelSpec | PipelineSpec]:
    yield ModelSpec(
        name="flux-dit",
        family="flux",
        role="dit",
        module=f"{DIT}:FluxDiT",
        config_from_shapes=f"{DIT}:flux_dit_config_from_shapes",
        config_from_json=f"{DIT}:flux_dit_config_from_json",
        format="bfl",
        identifying_keys=(
            "img_in.weight",
            "double_blocks.*.img_attn.qkv.weight",
            "single_blocks.*.linear1.weight",
            "final_layer.linear.weight",
        ),
        fingerprints=DIT_FINGERPRINTS,
        layout=BLOCK_LAYOUT,
        keep_high_precision=(
            "*norm*", "img_in.*", "txt_in.*", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.*"
        ),
        released_configs={"FLUX.1-dev": f"{DIT}:FLUX1_DEV", "FLUX.1-schnell": f"{DIT}:FLUX1_SCHNELL"},
        description="FLUX.1 DiT: 19 double- and 38 single-stream blocks, hidden 3072, guidance embedding on dev",
    )
    yield ModelSpec(
        name="flux-ae",
        family="flux",
        role="vae",
        module=f"{AE}:FluxAE",
        config_from_shapes=f"{AE}:flux_ae_config_from_shapes",
        config_from_json=f"{AE}:flux_ae_config_from_json",
        format="bfl",
        identifying_keys=(
            "encoder.down.*.block.*.conv1.weight",
            "decoder.up.*.block.*.conv1.weight",
            "encoder.mid.attn_1.q.weight",
        ),
        fingerprints=AE_FINGERPRINTS,
        keep_high_precision=("*norm*",),
        released_configs={"FLUX.1": f"{AE}:FLUX1_AE"},
        description="FLUX.1 autoencoder: 16 latent channels, 8x, scale 0.3611, shift 0.1159",
    )
    yield PipelineSpec(
        name="flux",
        family="flux",
        slots=(
            SlotSpec("dit", ("flux-dit",), diffusers_subfolder="transformer"),
            SlotSpec("vae", ("flux-ae",), diffusers_subfolder="vae"),
            SlotSpec("text_encoder", ("clip-text",), diffusers_subfolder="text_encoder"),
            SlotSpec("text_encoder_2", ("t5-encoder",), diffusers_subfolder="text_encoder_2"),
            SlotSpec("tokenizer", ("clip-tokenizer",), kind="tokenizer", diffusers_subfolder="tokenizer"),
            SlotSpec("tokenizer_2", ("t5-tokenizer",), kind="tokenizer", diffusers_subfolder="tokenizer_2"),
        ),
        pipeline="difforge_flux.pipeline:FluxPipeline",
        default_scheduler=FLUX_DEV_SCHEDULER,
        # as each release's scheduler/scheduler_config.json says
        variant_schedulers={"FLUX.1-dev": FLUX_DEV_SCHEDULER, "FLUX.1-schnell": {"name": "flow-euler", "shift": 1.0}},
        sources={variant: _sources(repo, single) for variant, (repo, single) in RELEASES.items()},
        component_order=("text_encoder", "text_encoder_2", "dit", "vae"),
        description="FLUX.1 text-to-image and image-to-image (dev, schnell, fine-tunes)",
    )


@hookimpl
def difforge_register_converters() -> Iterator[ConverterSpec]:
    yield ConverterSpec(
        name="flux-dit-diffusers",
        source_format="diffusers",
        target_model="flux-dit",
        detect=f"{CONVERT}:is_flux_diffusers",
        rename=f"{CONVERT}:dit_from_diffusers",
        transform=f"{CONVERT}:dit_fuse",
        inverse_rename=f"{CONVERT}:dit_to_diffusers",
        inverse_transform=f"{CONVERT}:dit_split",
        description="diffusers FluxTransformer2DModel (transformer/) -> BFL: fuse q/k/v, swap the final shift/scale",
    )
    yield ConverterSpec(
        name="flux-ae-diffusers",
        source_format="diffusers",
        target_model="flux-ae",
        detect=f"{CONVERT}:is_flux_ae_diffusers",
        rename=f"{CONVERT}:ae_from_diffusers",
        transform=f"{CONVERT}:ae_reshape",
        inverse_rename=f"{CONVERT}:ae_to_diffusers",
        inverse_transform=f"{CONVERT}:ae_unreshape",
        description="diffusers AutoencoderKL (Flux vae/) -> BFL ae.safetensors: decoder level order, 1x1 attention",
    )
    yield from _lora_converters()


#: LoRA formats: (format, DiT inverse_transform, what it looks like); see :mod:`difforge_flux.lora`
_DIT_LORA_FORMATS = (
    ("diffusers", "split_lora", "transformer.transformer_blocks.0.attn.to_q.lora_A.weight (PEFT, .default optional)"),
    ("kohya", "bfl_export", "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight / lora_up / alpha"),
    ("comfyui", "bfl_export", "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"),
    ("xlabs", "xlabs_export", "double_blocks.0.processor.qkv_lora1.down.weight"),
    ("diffsynth", "diffsynth_export", "blocks.0.attn.a_to_qkv.lora_A.default.weight (DiffSynth-Studio)"),
)


def _lora_converters() -> Iterator[ConverterSpec]:
    for fmt, inverse, example in _DIT_LORA_FORMATS:
        yield ConverterSpec(
            name=f"flux-dit-lora-{fmt}",
            source_format=fmt,
            target_model="flux-dit",
            detect=f"{LORA}:is_{fmt}",
            rename=f"{LORA}:rename_{fmt}",
            transform=f"{LORA}:fuse_lora",
            inverse_rename=f"{LORA}:inverse_{fmt}",
            inverse_transform=f"{LORA}:{inverse}",
            kind="lora",
            description=f"Flux DiT LoRA, {fmt}: {example}",
        )
    for encoder, model in (("clip", "clip-text"), ("t5", "t5-encoder")):
        for fmt in ("diffusers", "kohya", "comfyui"):
            yield ConverterSpec(
                name=f"flux-{encoder}-lora-{fmt}",
                source_format=fmt,
                target_model=model,
                detect=f"{LORA}:is_{encoder}_{fmt}",
                rename=f"{LORA}:rename_{encoder}_{fmt}",
                inverse_rename=f"{LORA}:inverse_{encoder}_{fmt}",
                kind="lora",
                description=f"Flux {encoder.upper()} text-encoder LoRA, {fmt} names (lora_te*, text_encoder*, text_encoders.*)",
            )

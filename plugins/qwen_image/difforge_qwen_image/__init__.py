"""difforge-qwen-image: Qwen-Image (Qwen/Qwen-Image) text-to-image and image-to-image.

This entry module is light: it imports no torch. Models are named by lazy ``"module:attr"``
references:

- ``qwen-image-dit`` (:mod:`.dit`): the 20B MMDiT, own format ``diffusers`` (the released
  ``transformer/`` layout, 9 shards); ComfyUI's repackaged single files are the same keys behind
  ``model.diffusion_model.``, which the core strips.

LoRA converters (:mod:`.lora`, ``kind="lora"``) of the DiT: ``diffusers`` (diffusers/PEFT, ComfyUI,
DiffSynth-Studio: diffusers module names behind any prefix), ``kohya`` (``lora_unet_transformer_blocks_0_...``)
and ``comfyui`` (export only: ``diffusion_model.`` + diffusers names).

The VAE is difforge-wan's ``wan-vae`` (:class:`difforge_wan.vae.WanVAE`): Qwen-Image's VAE is the
Wan 2.1 causal-3D VAE used on single frames, with the same keys, shapes and per-channel latent
statistics, so its ``vae/`` (diffusers ``AutoencoderKLQwenImage``, through the ``wan-vae-diffusers``
converter) and ComfyUI's ``qwen_image_vae.safetensors`` (Wan-AI layout) are detected as ``wan-vae``,
variant ``Wan2.1-VAE`` (:data:`VAE_FINGERPRINT`); no header can tell the two sets of weights apart,
which is why no second VAE model (that would make every such file ambiguous) is registered here.
The text encoder (``qwen2.5-vl-text``) and tokenizer (``qwen2-tokenizer``) come from
difforge-text-encoders. The fingerprints below are recomputed from the released configs by
:mod:`.releases` (and checked by the tests).
"""

from __future__ import annotations

from collections.abc import Iterator

from difforge import BlockGroup, BlockLayout, ConverterSpec, ModelSpec, PipelineSpec, SlotSpec, SourceSpec, hookimpl

difforge_api = ">=1,<2"

DIT = "difforge_qwen_image.dit"
LORA = "difforge_qwen_image.lora"

DIT_FINGERPRINTS = {
    "412483348226e61c4081c07f33b20ad3": "Qwen-Image",  # transformer/ (9 shards); ComfyUI qwen_image_*.safetensors
}

VAE_FINGERPRINT = "b2b7c70320ae6614f5057e553dd55ed2"
"""Qwen-Image's ``vae/diffusion_pytorch_model.safetensors``: difforge-wan's ``Wan2.1-VAE`` in diffusers' layout."""

BLOCK_LAYOUT = BlockLayout((BlockGroup("transformer_blocks", ("img", "txt")),))
"""Every block is called ``block(img, txt, temb=..., rope=..., mask=...)`` and returns ``(img, txt)``."""

QWEN_IMAGE_SCHEDULER = {
    "name": "flow-euler",
    "shift": 1.0,
    "dynamic_shift": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "num_train_timesteps": 1000,
}
"""Qwen/Qwen-Image's ``scheduler/scheduler_config.json`` as a difforge scheduler choice."""

REPO = "Qwen/Qwen-Image"
SOURCES = (
    SourceSpec("dit", REPO, "transformer/diffusion_pytorch_model*.safetensors"),
    SourceSpec("text_encoder", REPO, "text_encoder/model*.safetensors"),
    SourceSpec("vae", REPO, "vae/diffusion_pytorch_model.safetensors"),
    SourceSpec("tokenizer", REPO, "tokenizer/"),
)
"""The files of the release (the same layout on ModelScope and HuggingFace)."""


@hookimpl
def difforge_register_models() -> Iterator[ModelSpec | PipelineSpec]:
    yield ModelSpec(
        name="qwen-image-dit",
        family="qwen-image",
        role="dit",
        module=f"{DIT}:QwenImageDiT",
        config_from_shapes=f"{DIT}:qwen_image_dit_config_from_shapes",
        config_from_json=f"{DIT}:qwen_image_dit_config_from_json",
        format="diffusers",
        identifying_keys=(
            "img_in.weight",
            "txt_norm.weight",
            "transformer_blocks.*.attn.add_q_proj.weight",
            "transformer_blocks.*.img_mod.1.weight",
            "proj_out.weight",
        ),
        fingerprints=DIT_FINGERPRINTS,
        layout=BLOCK_LAYOUT,
        keep_high_precision=("*norm*", "img_in.*", "txt_in.*", "time_text_embed.*", "proj_out.*"),
        released_configs={"Qwen-Image": f"{DIT}:QWEN_IMAGE"},
        description="Qwen-Image MMDiT: 60 dual-stream blocks, hidden 3072, 24 heads x 128, text dim 3584, MSRoPE",
    )
    yield PipelineSpec(
        name="qwen-image",
        family="qwen-image",
        slots=(
            SlotSpec("dit", ("qwen-image-dit",), diffusers_subfolder="transformer"),
            SlotSpec("vae", ("wan-vae",), diffusers_subfolder="vae"),
            SlotSpec("text_encoder", ("qwen2.5-vl-text",), diffusers_subfolder="text_encoder"),
            SlotSpec("tokenizer", ("qwen2-tokenizer",), kind="tokenizer", diffusers_subfolder="tokenizer"),
        ),
        pipeline="difforge_qwen_image.pipeline:QwenImagePipeline",
        default_scheduler=QWEN_IMAGE_SCHEDULER,
        variant_schedulers={"Qwen-Image": QWEN_IMAGE_SCHEDULER},
        sources={"Qwen-Image": SOURCES},
        component_order=("text_encoder", "dit", "vae"),
        description="Qwen-Image text-to-image and image-to-image (true CFG, recommended sizes 1328x1328 ... 1664x928)",
    )


@hookimpl
def difforge_register_converters() -> Iterator[ConverterSpec]:
    for fmt, example in (
        ("diffusers", "transformer.transformer_blocks.0.attn.to_q.lora_A.weight; diffusion_model. (ComfyUI) or no "
                      "prefix (DiffSynth-Studio), lora_A/lora_down"),
        ("kohya", "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight + .alpha"),
        ("comfyui", "written only: diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight (read as diffusers)"),
    ):
        yield ConverterSpec(
            name=f"qwen-image-dit-lora-{fmt}",
            source_format=fmt,
            target_model="qwen-image-dit",
            detect=f"{LORA}:is_{fmt}",
            rename=f"{LORA}:rename_{fmt}",
            inverse_rename=f"{LORA}:inverse_{fmt}",
            kind="lora",
            description=f"Qwen-Image DiT LoRA, {fmt}: {example}",
        )

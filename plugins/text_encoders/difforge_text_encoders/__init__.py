"""difforge-text-encoders: the text encoders and tokenizers the diffusion families share.

Models (own format ``transformers``: the key layout of transformers' checkpoints):

- ``clip-text``: CLIP's text transformer (FLUX.1's CLIP ViT-L/14), :mod:`.clip`;
- ``t5-encoder``: the T5 v1.1 encoder (FLUX.1's T5-XXL), :mod:`.t5`;
- ``umt5-encoder``: the umT5 encoder (Wan's umT5-XXL), :mod:`.t5`; also loads Wan-AI's ``.pth``;
- ``qwen2.5-vl-text``: the Qwen2.5-VL language model (Qwen-Image's text encoder), :mod:`.qwen2_5_vl`.

Tokenizers (role ``tokenizer``, recognised from a folder's files), :mod:`.tokenization`:
``clip-tokenizer`` (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``), ``t5-tokenizer``
(``tokenizer.json`` or ``spiece.model``; T5 and umT5), ``qwen2-tokenizer`` (Qwen2.5-VL, Qwen-Image).

Prompt helpers the family pipelines share (FLUX.1's pooled CLIP and padded T5, Wan's masked umT5,
Qwen-Image's gathered hidden states): :mod:`.prompts`.

This module is the plugin's entry point and stays light: everything heavy is named lazily.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from difforge import BlockGroup, BlockLayout, ConverterSpec, ModelSpec, hookimpl

difforge_api = ">=1,<2"

CLIP = "difforge_text_encoders.clip"
T5 = "difforge_text_encoders.t5"
QWEN = "difforge_text_encoders.qwen2_5_vl"
TOK = "difforge_text_encoders.tokenization"

# Fingerprints (:func:`difforge.loading.fingerprint.fingerprint_shapes`) of released checkpoints, computed
# from their published configs on the meta device; tests/plugins/text_encoders/test_released.py recomputes them.
#: FLUX.1's text_encoder/model.safetensors; ComfyUI's clip_l.safetensors (196 tensors, no text_projection)
CLIP_VIT_L_14_FINGERPRINT = "2bf08036a32f04685551ab6415405cc5"
#: FLUX.1's text_encoder_2/ shards (219 tensors: shared.weight, no tied encoder.embed_tokens copy)
T5_V1_1_XXL_FINGERPRINT = "22eeda6401f40673b570bd325bd3536b"
#: umT5-XXL encoder in transformers' layout (UMT5EncoderModel.save_pretrained; ComfyUI's umt5_xxl files use these names)
UMT5_XXL_FINGERPRINT = "359df014fd80737d670c5575fc853cf4"
#: Wan-AI's models_t5_umt5-xxl-enc-bf16.pth (blocks.N.attn.q.weight, ...)
UMT5_XXL_WAN_FINGERPRINT = "f5ceed6c110fadbd92a8c402cb48a38f"
#: Qwen-Image's text_encoder/ shards: the whole Qwen2.5-VL-7B-Instruct (model.layers, visual, lm_head)
QWEN2_5_VL_7B_FINGERPRINT = "e86717e77c5c291da95504e4c41ed1c8"

_T5_HIGH_PRECISION = ("shared.*", "*layer_norm*", "*relative_attention_bias*")


@hookimpl
def difforge_register_models() -> Iterator[Any]:
    yield ModelSpec(
        name="clip-text",
        family="clip",
        role="text_encoder",
        module=f"{CLIP}:CLIPTextEncoder",
        config_from_shapes=f"{CLIP}:clip_config_from_shapes",
        config_from_json=f"{CLIP}:clip_config_from_json",
        format="transformers",
        identifying_keys=(
            "text_model.embeddings.token_embedding.weight",
            "text_model.encoder.layers.*.self_attn.q_proj.weight",
            "text_model.final_layer_norm.weight",
        ),
        fingerprints={CLIP_VIT_L_14_FINGERPRINT: "clip-vit-large-patch14"},
        layout=BlockLayout((BlockGroup("text_model.encoder.layers"),)),
        keep_high_precision=("*embeddings*", "*layer_norm*", "text_projection.*"),
        released_configs={"clip-vit-large-patch14": f"{CLIP}:CLIP_VIT_L_14"},
        description="CLIP text encoder (transformers CLIPTextModel; FLUX.1's CLIP-L)",
    )
    yield ModelSpec(
        name="t5-encoder",
        family="t5",
        role="text_encoder",
        module=f"{T5}:T5Encoder",
        config_from_shapes=f"{T5}:t5_config_from_shapes",
        config_from_json=f"{T5}:t5_config_from_json",
        format="transformers",
        identifying_keys=(
            "shared.weight",
            "encoder.block.*.layer.0.SelfAttention.q.weight",
            "encoder.final_layer_norm.weight",
        ),
        fingerprints={T5_V1_1_XXL_FINGERPRINT: "t5-v1_1-xxl"},
        layout=BlockLayout((BlockGroup("encoder.block"),)),
        keep_high_precision=_T5_HIGH_PRECISION,
        released_configs={"t5-v1_1-xxl": f"{T5}:T5_V1_1_XXL"},
        description="T5 v1.1 encoder (transformers T5EncoderModel; FLUX.1's T5-XXL)",
    )
    yield ModelSpec(
        name="umt5-encoder",
        family="umt5",
        role="text_encoder",
        module=f"{T5}:T5Encoder",
        config_from_shapes=f"{T5}:umt5_config_from_shapes",
        config_from_json=f"{T5}:umt5_config_from_json",
        format="transformers",
        identifying_keys=(
            "shared.weight",
            "encoder.block.*.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.final_layer_norm.weight",
        ),
        fingerprints={UMT5_XXL_FINGERPRINT: "umt5-xxl", UMT5_XXL_WAN_FINGERPRINT: "umt5-xxl"},
        layout=BlockLayout((BlockGroup("encoder.block"),)),
        keep_high_precision=_T5_HIGH_PRECISION,
        released_configs={"umt5-xxl": f"{T5}:UMT5_XXL"},
        description="umT5 encoder (transformers UMT5EncoderModel; Wan's umT5-XXL)",
    )
    yield ModelSpec(
        name="qwen2.5-vl-text",
        family="qwen2.5-vl",
        role="text_encoder",
        module=f"{QWEN}:Qwen25VLTextEncoder",
        config_from_shapes=f"{QWEN}:qwen_config_from_shapes",
        config_from_json=f"{QWEN}:qwen_config_from_json",
        format="transformers",
        identifying_keys=("embed_tokens.weight", "layers.*.self_attn.q_proj.bias", "norm.weight"),
        fingerprints={QWEN2_5_VL_7B_FINGERPRINT: "Qwen2.5-VL-7B-Instruct"},
        layout=BlockLayout((BlockGroup("layers"),)),
        keep_high_precision=("embed_tokens.*", "*norm*"),
        released_configs={"Qwen2.5-VL-7B-Instruct": f"{QWEN}:QWEN2_5_VL_7B"},
        description="Qwen2.5-VL language model as a text encoder (Qwen-Image's text_encoder; no vision tower yet)",
    )
    for kind, cls, what in (
        ("clip", "CLIPTokenizer", "CLIP BPE tokenizer (vocab.json + merges.txt or tokenizer.json)"),
        ("t5", "T5Tokenizer", "T5 / umT5 SentencePiece tokenizer (tokenizer.json or spiece.model)"),
        ("qwen2", "Qwen2Tokenizer", "Qwen2 byte-level BPE tokenizer (Qwen2.5-VL, Qwen-Image)"),
    ):
        yield ModelSpec(
            name=f"{kind}-tokenizer",
            family=kind,
            role="tokenizer",
            module=f"{TOK}:{cls}",
            config_from_shapes=None,
            format="folder",
            detect_folder=f"{TOK}:detect_{kind}_folder",
            description=what,
        )


@hookimpl
def difforge_register_converters() -> Iterator[ConverterSpec]:
    yield ConverterSpec(
        name="clip-text-extras",
        source_format="transformers-full",
        target_model="clip-text",
        detect=f"{CLIP}:is_clip_with_extras",
        rename=f"{CLIP}:clip_drop_extras",
        description="CLIP checkpoints with a position_ids buffer or a vision tower: keep the text model",
    )
    yield ConverterSpec(
        name="clip-text-flat",
        source_format="transformers5",
        target_model="clip-text",
        detect=f"{CLIP}:is_clip_flat",
        rename=f"{CLIP}:clip_flat_rename",
        inverse_rename=f"{CLIP}:clip_flat_inverse_rename",
        description="CLIPTextModel saved by transformers 5 from scratch (no text_model. prefix)",
    )
    yield ConverterSpec(
        name="t5-encoder-extras",
        source_format="transformers-full",
        target_model="t5-encoder",
        detect=f"{T5}:is_t5_with_extras",
        rename=f"{T5}:t5_drop_unused",
        transform=f"{T5}:t5_untie_embeddings",
        description="T5 checkpoints with a tied encoder.embed_tokens copy, a decoder or an LM head",
    )
    yield ConverterSpec(
        name="umt5-encoder-extras",
        source_format="transformers-full",
        target_model="umt5-encoder",
        detect=f"{T5}:is_umt5_with_extras",
        rename=f"{T5}:t5_drop_unused",
        transform=f"{T5}:t5_untie_embeddings",
        description="umT5 checkpoints with a tied encoder.embed_tokens copy, a decoder or an LM head",
    )
    yield ConverterSpec(
        name="qwen2.5-vl-text-full",
        source_format="transformers-full",
        target_model="qwen2.5-vl-text",
        detect=f"{QWEN}:is_qwen_full",
        rename=f"{QWEN}:qwen_full_rename",
        description="whole Qwen2.5-VL checkpoints (model.layers / model.language_model.layers, visual.*, lm_head): "
        "keep the language model",
    )
    yield ConverterSpec(
        name="umt5-encoder-wan",
        source_format="wan",
        target_model="umt5-encoder",
        detect=f"{T5}:is_wan_umt5",
        rename=f"{T5}:wan_umt5_rename",
        inverse_rename=f"{T5}:wan_umt5_inverse_rename",
        description="Wan-AI's umT5 encoder (models_t5_umt5-xxl-enc-bf16.pth)",
    )

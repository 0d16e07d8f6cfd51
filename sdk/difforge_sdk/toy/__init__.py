"""The toy model family: a tiny but complete difforge family plugin.

Everything heavy is named lazily, as in a real family plugin. Models (in :mod:`.models`):
``toy-dit`` (a patchified joint-attention DiT, own format ``toy``, and a diffusers-like format
``toy-diffusers`` converted with a key rename plus a q/k/v fuse), ``toy-vae`` (8x conv autoencoder)
and ``toy-text-encoder`` (a byte-level embedding + MLP). Pipeline ``toy``: text-to-image with
flow matching (:mod:`.pipeline`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from difforge import (
    BlockGroup,
    BlockLayout,
    ConverterSpec,
    ModelSpec,
    PipelineSpec,
    SlotSpec,
    SourceSpec,
    hookimpl,
)

difforge_api = ">=1,<2"

#: fingerprint of the "Toy-1" release: ToyDiTConfig() in the own format (see tests)
TOY1_FINGERPRINT = "d9f8d89e285cdafc8d6821faaae5f5cf"

M = "difforge_sdk.toy.models"


@hookimpl
def difforge_register_models() -> Iterator[Any]:
    yield ModelSpec(
        name="toy-dit",
        family="toy",
        role="dit",
        module=f"{M}:ToyDiT",
        config_from_shapes=f"{M}:toy_dit_config_from_shapes",
        format="toy",
        identifying_keys=("x_embedder.weight", "blocks.*.attn.qkv.weight", "final.linear.weight"),
        fingerprints={TOY1_FINGERPRINT: "Toy-1"},
        layout=BlockLayout((BlockGroup("blocks", ("hidden_states",)),)),
        keep_high_precision=("*norm*", "time_embed.*", "x_embedder.*", "final.*"),
        released_configs={"Toy-1": f"{M}:TOY1_CONFIG"},
        description="tiny joint-attention DiT for tests",
    )
    yield ModelSpec(
        name="toy-vae",
        family="toy",
        role="vae",
        module=f"{M}:ToyVAE",
        config_from_shapes=f"{M}:toy_vae_config_from_shapes",
        format="toy",
        identifying_keys=("encoder.conv.weight", "decoder.conv.weight"),
    )
    yield ModelSpec(
        name="toy-text-encoder",
        family="toy",
        role="text_encoder",
        module=f"{M}:ToyTextEncoder",
        config_from_shapes=f"{M}:toy_text_config_from_shapes",
        format="toy",
        identifying_keys=("token_embedding.weight", "mlp.fc1.weight"),
    )
    yield PipelineSpec(
        name="toy",
        family="toy",
        slots=(
            SlotSpec("dit", ("toy-dit",), diffusers_subfolder="transformer"),
            SlotSpec("vae", ("toy-vae",), diffusers_subfolder="vae"),
            SlotSpec("text_encoder", ("toy-text-encoder",), diffusers_subfolder="text_encoder"),
        ),
        pipeline="difforge_sdk.toy.pipeline:ToyPipeline",
        default_scheduler={"name": "flow-euler", "shift": 3.0},
        variant_schedulers={"Toy-1": {"name": "flow-euler", "shift": 2.0}},
        sources={
            "Toy-1": (
                SourceSpec("dit", "difforge/Toy-1", "dit.safetensors"),
                SourceSpec("vae", "difforge/Toy-1", "vae.safetensors"),
                SourceSpec("text_encoder", "difforge/Toy-1", "text_encoder.safetensors"),
            )
        },
        component_order=("text_encoder", "dit", "vae"),
        description="toy text-to-image pipeline for tests",
    )


@hookimpl
def difforge_register_converters() -> Iterator[ConverterSpec]:
    yield ConverterSpec(
        name="toy-dit-diffusers",
        source_format="toy-diffusers",
        target_model="toy-dit",
        detect=f"{M}:is_toy_diffusers",
        rename=f"{M}:toy_diffusers_rename",
        transform=f"{M}:toy_diffusers_fuse_qkv",
        inverse_rename=f"{M}:toy_diffusers_inverse_rename",
        inverse_transform=f"{M}:toy_diffusers_split_qkv",
    )

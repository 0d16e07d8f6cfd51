"""LoRA converters for the SD / SDXL U-Net (``ConverterSpec(kind="lora")``).

- ``diffusers``: diffusers/PEFT names, ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``
  (the ``unet.`` prefix optional, ``lora_A.default`` adapter names accepted);
- ``kohya``: sd-scripts names, ``lora_unet_`` + the module path with ``_`` for ``.``, either diffusers'
  module names (SD 1.x LoRAs: ``lora_unet_down_blocks_0_attentions_0_proj_in``) or the original ones
  (SDXL LoRAs: ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), ``lora_down`` /
  ``lora_up`` / ``alpha``.

Text-encoder parts (``lora_te_``, ``lora_te1_``/``lora_te2_``, ``text_encoder.``) are left to CLIP LoRA
converters; load such a file with ``target="unet"`` and ``strict=False`` when none is installed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from difforge.lora import KOHYA_SUFFIXES, PEFT_SUFFIXES, claims_any, lora_inverse_renamer, lora_renamer

from .convert import unet_from_diffusers, unet_from_ldm, unet_to_diffusers

__all__ = [
    "is_unet_diffusers", "rename_unet_diffusers", "inverse_unet_diffusers",
    "is_unet_kohya", "rename_unet_kohya", "inverse_unet_kohya",
]

_MODULE = re.compile(
    r"^((down_blocks|up_blocks)\.\d+\.(attentions|resnets|downsamplers|upsamplers)\.\d+\.[\w.]+"
    r"|mid_block\.(attentions|resnets)\.\d+\.[\w.]+"
    r"|conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12])$"
)


def _from_diffusers(module: str) -> str | None:
    return unet_from_diffusers(module) if _MODULE.match(module) else None


def _to_diffusers(module: str) -> str | None:
    return unet_to_diffusers(module)


rename_unet_diffusers = lora_renamer(_from_diffusers, ("unet.", "base_model.model.", ""))
inverse_unet_diffusers = lora_inverse_renamer(_to_diffusers, "unet.", PEFT_SUFFIXES)


def is_unet_diffusers(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    return not any(k.startswith("lora_unet_") for k in keys) and claims_any(rename_unet_diffusers, keys)


# ---------------------------------------------------------------- kohya

_TOKENS = sorted(
    (
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
        "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
        "add_embedding", "linear_1", "linear_2", "input_blocks", "middle_block", "output_blocks", "in_layers",
        "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb",
    ),
    key=len,
    reverse=True,
)


def _dotted(name: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``."""
    for token in _TOKENS:
        name = re.sub(rf"(?<![A-Za-z0-9]){token}(?![A-Za-z])", token.replace("_", "\x00"), name)
    return name.replace("_", ".").replace("\x00", "_")


def _from_kohya(module: str) -> str | None:
    dotted = _dotted(module)
    if re.match(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)\.", dotted):
        own = unet_from_ldm(dotted + ".weight")
        return None if own is None else own[: -len(".weight")]
    return _from_diffusers(dotted)


def _to_kohya(module: str) -> str | None:
    return unet_to_diffusers(module).replace(".", "_")


rename_unet_kohya = lora_renamer(_from_kohya, ("lora_unet_",))
inverse_unet_kohya = lora_inverse_renamer(_to_kohya, "lora_unet_", KOHYA_SUFFIXES)


def is_unet_kohya(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    return claims_any(rename_unet_kohya, keys)

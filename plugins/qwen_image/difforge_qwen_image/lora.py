"""LoRA converters of Qwen-Image's DiT: the LoRA layouts Qwen-Image users have, to and from our modules.

Our module names are diffusers' (the DiT's own layout), so the layouts differ only in prefixes and
in how the down/up projections are spelt; no tensor is edited. Formats, detected from keys:

- ``diffusers``: diffusers/PEFT and everything that names diffusers modules: ``transformer.`` +
  module (``QwenImagePipeline.save_lora_weights``), ``diffusion_model.`` + module (ComfyUI,
  musubi-tuner's ComfyUI export; stripped by the core when every key has it), the bare module
  (DiffSynth-Studio: ``transformer_blocks.0.attn.to_q.lora_A.default.weight``, Qwen-Image-Lightning),
  ``base_model.model.`` (PEFT adapters); any of ``lora_A``/``lora_B``, ``lora_down``/``lora_up`` with
  or without an adapter name, ``alpha`` keys or the PEFT config in the file's metadata.
- ``comfyui`` (written only): diffusers module names behind ``diffusion_model.``, as ComfyUI's Qwen-Image
  LoRAs are; such files are read by ``diffusers`` above (the core strips the common prefix), so this
  converter claims no file and exists for ``export_lora(..., format="comfyui")`` and
  ``difforge convert --lora --to comfyui``.
- ``kohya``: sd-scripts / musubi-tuner / ai-toolkit's underscored names
  (``lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight``, ``.lora_up.weight``, ``.alpha``),
  also spelt ``lora_transformer_...``.

The text encoder takes no LoRA here (no released Qwen-Image LoRA trains it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from difforge.lora import KOHYA_SUFFIXES, claims_any, lora_inverse_renamer, lora_renamer

MODULES = (
    "img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    *(f"transformer_blocks.{{n}}.{m}" for m in (
        "img_mod.1", "txt_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    )),
    "norm_out.linear", "proj_out",
)  # fmt: skip
"""Every linear layer of :class:`~difforge_qwen_image.dit.QwenImageDiT` (``{n}``: a block index)."""


def _pattern(template: str, dot: str) -> re.Pattern[str]:
    parts = [re.escape(p.replace(".", dot)) for p in template.split("{n}")]
    return re.compile("^" + r"(\d+)".join(parts) + "$")


_OWN = [(_pattern(t, "."), t) for t in MODULES]
_UNDERSCORED = [(_pattern(t, "_"), t) for t in MODULES]
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")


def own_module(name: str) -> str | None:
    """``name`` if it is one of our modules (diffusers spelling), else None."""
    return name if any(p.match(name) for p, _ in _OWN) else None


def kohya_module(name: str) -> str | None:
    """``lora_unet_transformer_blocks_0_attn_to_q`` -> ``transformer_blocks.0.attn.to_q``."""
    for prefix in KOHYA_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            for pattern, template in _UNDERSCORED:
                if m := pattern.match(rest):
                    return template.replace("{n}", m.group(1)) if m.groups() else template
    return None


def kohya_name(module: str) -> str | None:
    return f"lora_unet_{module.replace('.', '_')}" if own_module(module) else None


rename_diffusers = lora_renamer(own_module, ("transformer.", "base_model.model.", "diffusion_model.", ""))
rename_kohya = lora_renamer(kohya_module)
inverse_diffusers = lora_inverse_renamer(own_module, "transformer.")
inverse_kohya = lora_inverse_renamer(kohya_name, "", KOHYA_SUFFIXES)
rename_comfyui = rename_diffusers
inverse_comfyui = lora_inverse_renamer(own_module, "diffusion_model.")

SHARED = ("img_in", "txt_in", "proj_out", "norm_out.linear")
"""Modules other families spell alike: they alone do not make a file Qwen-Image's."""


def is_diffusers(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    return claims_any(rename_diffusers, keys, SHARED)


def is_kohya(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    return claims_any(rename_kohya, keys, SHARED)


def is_comfyui(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """Never: ComfyUI's files are diffusers names behind ``diffusion_model.``, read by the ``diffusers``
    converter (one converter per file); this one only writes them."""
    return False

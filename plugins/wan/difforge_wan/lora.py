"""LoRA converters of Wan's DiT: the LoRA layouts Wan users have, to and from our modules.

Our modules carry Wan-AI's original names (``blocks.0.self_attn.q``, ``ffn.0``, ``head.head``), the
own layout of ``wan-dit``. No Wan format fuses or splits a weight, so every converter is a rename;
formats, detected from keys:

- ``comfyui``: Wan-AI's module names, as ComfyUI, musubi-tuner's ComfyUI export, DiffSynth-Studio and
  lightx2v write them: ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` (the prefix optional,
  ``model.diffusion_model.`` too), any of ``lora_A``/``lora_B`` (with or without an adapter name such
  as ``.default``) or ``lora_down``/``lora_up``, with or without ``.alpha``. Written as
  ``diffusion_model.{module}.lora_A.weight`` / ``lora_B.weight`` / ``alpha``.
- ``kohya``: sd-scripts / musubi-tuner names, the module's dots spelt as underscores behind
  ``lora_unet_`` (``lora_unet_blocks_0_self_attn_q.lora_down.weight``, ``.lora_up.weight``,
  ``.alpha``). Written with an ``alpha`` for every module (musubi-tuner's readers expect one).
- ``diffusers``: diffusers/PEFT names of ``WanTransformer3DModel``
  (``transformer.blocks.0.attn1.to_q.lora_A.weight``, ``.default`` optional, ``base_model.model.`` or
  no prefix; alphas from ``.alpha`` keys or the PEFT config in the file's metadata). Written with the
  alpha folded into ``lora_B`` (scale 1): diffusers' Wan loader accepts no ``alpha`` keys.

Modules a LoRA may target: self- and cross-attention q/k/v/o of every block, the image-to-video
cross-attention's ``k_img``/``v_img`` (diffusers: ``attn2.add_k_proj``/``add_v_proj``), the
feed-forward ``ffn.0``/``ffn.2``, the text and time embeddings (``text_embedding.0/2``,
``time_embedding.0/2``, ``time_projection.1``), the patch embedding (a ``Conv3d``), the output
``head.head`` and the image-to-video ``img_emb.proj.1/3``. The image-to-video modules are understood
(``difforge convert --lora`` rewrites them) but our DiT (text-to-video and TI2V-5B) has none: loading
one is reported as a module that does not fit the model (``strict=False`` skips them).

Not LoRA weights, hence not read: the full-difference ``diff``/``diff_b`` tensors some distilled
LoRAs (lightx2v) add for norms and biases; ``strict=False`` loads the rest of such a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from difforge.lora import KOHYA_SUFFIXES, bake_alpha, claims_any, group_by_module, lora_inverse_renamer, lora_renamer, ungroup

from .convert import KeyMap

__all__ = ["DIFFUSERS", "KOHYA", "MODULES", "is_comfyui", "is_diffusers", "is_kohya"]

_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}

#: (diffusers module, Wan-AI module): every layer a Wan LoRA may name (``{n}``: a block index)
_PAIRS: list[tuple[str, str]] = [
    ("patch_embedding", "patch_embedding"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    *((f"blocks.{{n}}.attn1.{d}", f"blocks.{{n}}.self_attn.{w}") for w, d in _ATTENTION.items()),
    *((f"blocks.{{n}}.attn2.{d}", f"blocks.{{n}}.cross_attn.{w}") for w, d in _ATTENTION.items()),
    ("blocks.{n}.attn2.add_k_proj", "blocks.{n}.cross_attn.k_img"),
    ("blocks.{n}.attn2.add_v_proj", "blocks.{n}.cross_attn.v_img"),
    ("blocks.{n}.ffn.net.0.proj", "blocks.{n}.ffn.0"),
    ("blocks.{n}.ffn.net.2", "blocks.{n}.ffn.2"),
    ("proj_out", "head.head"),
]

MODULES = tuple(wan for _, wan in _PAIRS)
"""Every module a Wan LoRA may name, in Wan-AI's spelling (our own layout)."""

DIFFUSERS = KeyMap(_PAIRS)
"""diffusers module name <-> ours."""
WAN = KeyMap([(m, m) for m in MODULES])
"""Our own module names (identity), for the ComfyUI / Wan-AI layout."""
KOHYA = KeyMap([("lora_unet_" + m.replace(".", "_"), m) for m in MODULES])
"""``lora_unet_blocks_{n}_self_attn_q`` <-> ``blocks.{n}.self_attn.q``."""

COMFY_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "")
DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.", "")

rename_comfyui = lora_renamer(WAN.forward, COMFY_PREFIXES)
rename_kohya = lora_renamer(KOHYA.forward)
rename_diffusers = lora_renamer(DIFFUSERS.forward, DIFFUSERS_PREFIXES)

inverse_comfyui = lora_inverse_renamer(WAN.inverse, "diffusion_model.")
inverse_kohya = lora_inverse_renamer(KOHYA.inverse, "", KOHYA_SUFFIXES)
inverse_diffusers = lora_inverse_renamer(DIFFUSERS.inverse, "transformer.")

#: own modules that both the diffusers and the Wan-AI layout spell alike (``patch_embedding``), or that
#: diffusers spells as other families do (``proj_out``): alone, they prove no format
_SHARED_COMFYUI = ("patch_embedding",)
_SHARED_DIFFUSERS = ("patch_embedding", "head.head")


def is_comfyui(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """Wan-AI module names (``blocks.0.self_attn.q``), ``diffusion_model.`` optional."""
    return claims_any(rename_comfyui, keys, _SHARED_COMFYUI)


def is_kohya(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """musubi-tuner / sd-scripts names (``lora_unet_blocks_0_self_attn_q``)."""
    return claims_any(rename_kohya, keys)


def is_diffusers(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """diffusers ``WanTransformer3DModel`` names (``transformer.blocks.0.attn1.to_q``)."""
    return claims_any(rename_diffusers, keys, _SHARED_DIFFUSERS)


# ---------------------------------------------------------------- export transforms


def diffusers_export(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Own layout -> diffusers: each module's ``alpha / r`` folded into ``lora_B`` (diffusers' Wan loader
    refuses ``alpha`` keys and would read the update at scale 1)."""
    return ungroup({m: bake_alpha(g) for m, g in group_by_module(sd, "Wan LoRA").items()})


def kohya_export(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Own layout -> kohya: an ``alpha`` for every module (``alpha = r``, scale 1, where it had none)."""
    groups = group_by_module(sd, "Wan LoRA")
    out = {}
    for module, group in groups.items():
        if group.get("alpha") is None and "A" in group:
            group = {**group, "alpha": torch.tensor(float(group["A"].shape[0]))}
        out[module] = group
    return ungroup(out)

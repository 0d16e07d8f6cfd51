"""LoRA converters of the Flux family: every LoRA layout Flux users have, to and from our BFL modules.

Formats of the DiT (``flux-dit``), all detected from keys:

- ``diffusers``: diffusers/PEFT (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, with or
  without the ``transformer.`` prefix and a ``.default`` adapter name; alphas from ``.alpha`` keys or
  the PEFT config in the file's metadata). Separate q/k/v (and the single blocks' ``proj_mlp``) land on
  our fused ``qkv``/``linear1`` as one block-structured update (:func:`difforge.lora.merge_parts`).
- ``kohya``: sd-scripts/civitai (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``), and the kohya spelling of diffusers names
  (``lora_transformer_transformer_blocks_0_attn_to_q``, also after ``lora_unet_``). Written BFL-style.
- ``comfyui``: BFL module names, with or without ``diffusion_model.``, any ``lora_A``/``lora_down``
  spelling; written as ``diffusion_model.{module}.lora_A.weight``.
- ``xlabs``: XLabs-AI's ``double_blocks.0.processor.qkv_lora1.down.weight`` (``qkv_lora1``/``proj_lora1``:
  image stream, ``...2``: text stream; single blocks ``qkv_lora``/``proj_lora``), no alpha.
- ``diffsynth``: DiffSynth-Studio's own model names (``blocks.0.attn.a_to_qkv.lora_A.default.weight``,
  ``single_blocks.0.to_qkv_mlp``, ``final_norm_out.linear``), scale 1 (its loader applies no alpha).

Text encoders (``clip-text``, ``t5-encoder``): ``text_encoder.``/``text_encoder_2.`` + transformers
names (diffusers), ``lora_te1_``/``lora_te_`` (CLIP) and ``lora_te3_``/``lora_te2_`` (T5) kohya names,
and ComfyUI's ``text_encoders.clip_l.transformer.``/``text_encoders.t5xxl.transformer.``.

The modulation of the final norm is (shift, scale) in BFL order and (scale, shift) in diffusers' and
DiffSynth's: the up-projection's halves are swapped between them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from difforge.errors import ConversionError
from difforge.lora import (
    KOHYA_SUFFIXES,
    bake_alpha,
    claims_any,
    group_by_module,
    lora_inverse_renamer,
    lora_renamer,
    merge_parts,
    own_key,
    require_whole_rows,
    split_parts,
    ungroup,
)

from .convert import KeyMap, swap_halves

# ---------------------------------------------------------------- module names

BFL_MODULES = (
    "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
    "guidance_in.in_layer", "guidance_in.out_layer",
    *(f"double_blocks.{{n}}.{s}_{m}" for s in ("img", "txt")
      for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")),
    "single_blocks.{n}.linear1", "single_blocks.{n}.linear2", "single_blocks.{n}.modulation.lin",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
)
"""Every linear layer of :class:`~difforge_flux.dit.FluxDiT` (``{n}``: a block index)."""

# Intermediate names (not modules) that :func:`fuse_lora` resolves: parts of fused weights, and the
# final modulation in diffusers' (scale, shift) order.
_FINAL = "final_layer.adaLN_modulation.1"
_FINAL_SCALE_SHIFT = "final_layer.norm_out_linear"

DIFFUSERS_MODULES = KeyMap([
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("transformer_blocks.{n}.norm1.linear", "double_blocks.{n}.img_mod.lin"),
    ("transformer_blocks.{n}.norm1_context.linear", "double_blocks.{n}.txt_mod.lin"),
    ("transformer_blocks.{n}.attn.to_{c}", "double_blocks.{n}.img_attn.to_{c}"),
    ("transformer_blocks.{n}.attn.add_{c}_proj", "double_blocks.{n}.txt_attn.to_{c}"),
    ("transformer_blocks.{n}.attn.to_out.0", "double_blocks.{n}.img_attn.proj"),
    ("transformer_blocks.{n}.attn.to_add_out", "double_blocks.{n}.txt_attn.proj"),
    ("transformer_blocks.{n}.ff.net.0.proj", "double_blocks.{n}.img_mlp.0"),
    ("transformer_blocks.{n}.ff.net.2", "double_blocks.{n}.img_mlp.2"),
    ("transformer_blocks.{n}.ff_context.net.0.proj", "double_blocks.{n}.txt_mlp.0"),
    ("transformer_blocks.{n}.ff_context.net.2", "double_blocks.{n}.txt_mlp.2"),
    ("single_transformer_blocks.{n}.norm.linear", "single_blocks.{n}.modulation.lin"),
    ("single_transformer_blocks.{n}.attn.to_{c}", "single_blocks.{n}.to_{c}"),
    ("single_transformer_blocks.{n}.proj_mlp", "single_blocks.{n}.proj_mlp"),
    ("single_transformer_blocks.{n}.proj_out", "single_blocks.{n}.linear2"),
    ("proj_out", "final_layer.linear"),
    ("norm_out.linear", _FINAL_SCALE_SHIFT),
])

DIFFSYNTH_MODULES = KeyMap([
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    ("time_embedder.timestep_embedder.0", "time_in.in_layer"),
    ("time_embedder.timestep_embedder.2", "time_in.out_layer"),
    ("pooled_text_embedder.0", "vector_in.in_layer"),
    ("pooled_text_embedder.2", "vector_in.out_layer"),
    ("guidance_embedder.timestep_embedder.0", "guidance_in.in_layer"),
    ("guidance_embedder.timestep_embedder.2", "guidance_in.out_layer"),
    ("blocks.{n}.norm1_a.linear", "double_blocks.{n}.img_mod.lin"),
    ("blocks.{n}.norm1_b.linear", "double_blocks.{n}.txt_mod.lin"),
    ("blocks.{n}.attn.a_to_qkv", "double_blocks.{n}.img_attn.qkv"),
    ("blocks.{n}.attn.b_to_qkv", "double_blocks.{n}.txt_attn.qkv"),
    ("blocks.{n}.attn.a_to_{c}", "double_blocks.{n}.img_attn.to_{c}"),
    ("blocks.{n}.attn.b_to_{c}", "double_blocks.{n}.txt_attn.to_{c}"),
    ("blocks.{n}.attn.a_to_out", "double_blocks.{n}.img_attn.proj"),
    ("blocks.{n}.attn.b_to_out", "double_blocks.{n}.txt_attn.proj"),
    ("blocks.{n}.ff_a.0", "double_blocks.{n}.img_mlp.0"),
    ("blocks.{n}.ff_a.2", "double_blocks.{n}.img_mlp.2"),
    ("blocks.{n}.ff_b.0", "double_blocks.{n}.txt_mlp.0"),
    ("blocks.{n}.ff_b.2", "double_blocks.{n}.txt_mlp.2"),
    ("single_blocks.{n}.to_qkv_mlp", "single_blocks.{n}.linear1"),
    ("single_blocks.{n}.a_to_{c}", "single_blocks.{n}.to_{c}"),
    ("single_blocks.{n}.proj_in_besides_attn", "single_blocks.{n}.proj_mlp"),
    ("single_blocks.{n}.proj_out", "single_blocks.{n}.linear2"),
    ("single_blocks.{n}.norm.linear", "single_blocks.{n}.modulation.lin"),
    ("final_proj_out", "final_layer.linear"),
    ("final_norm_out.linear", _FINAL_SCALE_SHIFT),
])

BFL = KeyMap([(m, m) for m in BFL_MODULES])


def _underscored(prefixes: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(p + src.replace(".", "_"), dst) for p in prefixes for src, dst in pairs]


# BFL spelling first: the inverse (export) writes sd-scripts' lora_unet_double_blocks_0_img_attn_qkv.
KOHYA = KeyMap(
    _underscored(("lora_unet_",), BFL.pairs)
    + _underscored(("lora_transformer_", "lora_unet_"), [p for p in DIFFUSERS_MODULES.pairs])
)

XLABS = KeyMap([
    ("double_blocks.{n}.processor.qkv_lora1", "double_blocks.{n}.img_attn.qkv"),
    ("double_blocks.{n}.processor.qkv_lora2", "double_blocks.{n}.txt_attn.qkv"),
    ("double_blocks.{n}.processor.proj_lora1", "double_blocks.{n}.img_attn.proj"),
    ("double_blocks.{n}.processor.proj_lora2", "double_blocks.{n}.txt_attn.proj"),
    ("single_blocks.{n}.processor.qkv_lora", "single_blocks.{n}.qkv"),
    ("single_blocks.{n}.processor.proj_lora", "single_blocks.{n}.linear2"),
])
_XLABS_KEY = re.compile(r"^(?:diffusion_model\.)?(?P<m>.+)\.(?P<r>down|up)\.weight$")

SHARED = ("img_in", "txt_in")
"""Own modules two formats spell alike (``x_embedder``, ``context_embedder``): they prove no format."""

COMFY_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "")

rename_diffusers = lora_renamer(DIFFUSERS_MODULES.forward, ("transformer.", "base_model.model.", ""))
rename_kohya = lora_renamer(KOHYA.forward)
rename_comfyui = lora_renamer(BFL.forward, COMFY_PREFIXES)
rename_diffsynth = lora_renamer(DIFFSYNTH_MODULES.forward, COMFY_PREFIXES)

inverse_diffusers = lora_inverse_renamer(DIFFUSERS_MODULES.inverse, "transformer.")
inverse_kohya = lora_inverse_renamer(KOHYA.inverse, "", KOHYA_SUFFIXES)
inverse_comfyui = lora_inverse_renamer(BFL.inverse, "diffusion_model.")
inverse_diffsynth = lora_inverse_renamer(
    DIFFSYNTH_MODULES.inverse, "", {"A": "lora_A.default.weight", "B": "lora_B.default.weight"}
)


def rename_xlabs(key: str) -> str | None:
    """``double_blocks.0.processor.qkv_lora1.down.weight`` -> ``double_blocks.0.img_attn.qkv.lora_A.weight``."""
    m = _XLABS_KEY.match(key)
    own = XLABS.forward(m["m"]) if m else None
    return None if own is None else own_key(own, "A" if m["r"] == "down" else "B")


def inverse_xlabs(key: str) -> str | None:
    m = re.match(r"^(?P<m>.+)\.lora_(?P<r>A|B)\.weight$", key)
    src = XLABS.inverse(m["m"]) if m else None
    return None if src is None else f"{src}.{'down' if m['r'] == 'A' else 'up'}.weight"


def is_diffusers(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    return claims_any(rename_diffusers, keys, SHARED) or any(
        k.startswith("transformer.") and rename_diffusers(k) for k in keys
    )


def is_kohya(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    return claims_any(rename_kohya, keys)


def is_comfyui(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    return claims_any(rename_comfyui, keys)


def is_xlabs(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    return claims_any(rename_xlabs, keys)


def is_diffsynth(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    return claims_any(rename_diffsynth, keys, SHARED)


# ---------------------------------------------------------------- transforms

_DOUBLE_PART = re.compile(r"^(double_blocks\.\d+\.(?:img|txt)_attn)\.to_([qkv])$")
_SINGLE_PART = re.compile(r"^(single_blocks\.\d+)\.(to_q|to_k|to_v|qkv|proj_mlp)$")
_DOUBLE_QKV = re.compile(r"^(double_blocks\.\d+\.(?:img|txt)_attn)\.qkv$")
_SINGLE_LINEAR1 = re.compile(r"^(single_blocks\.\d+)\.linear1$")
_SINGLE_OFFSETS = {"to_q": 0, "to_k": 1, "to_v": 2, "qkv": 0, "proj_mlp": 3}  # x hidden size


def _swap_final(group: Mapping[str, Any], module: str) -> dict[str, Any]:
    if group.get("rows") is not None:
        raise ConversionError(f"a LoRA on part of {module} cannot be converted")
    return {**group, "B": swap_halves(group["B"])}


def fuse_lora(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Finish any Flux format -> own layout: LoRAs on q/k/v (and ``proj_mlp``) become one update of the
    fused ``qkv``/``linear1`` (row offsets from the hidden size, the parts' input width); the final
    modulation's up-projection goes from (scale, shift) to (shift, scale)."""
    out: dict[str, Any] = {}
    parts: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
    whole: dict[str, int] = {}  # fused module -> its row count when every part's size is known
    for module, group in group_by_module(sd, "Flux LoRA").items():
        if "A" not in group:
            out[module] = group  # reported as incomplete by the manager
        elif m := _DOUBLE_PART.match(module):
            hidden = group["A"].shape[1]
            target = f"{m[1]}.qkv"
            parts.setdefault(target, []).append(("qkv".index(m[2]) * hidden, group))
            whole[target] = 3 * hidden
        elif m := _SINGLE_PART.match(module):
            target = f"{m[1]}.linear1"
            hidden = group["A"].shape[1]
            parts.setdefault(target, []).append((_SINGLE_OFFSETS[m[2]] * hidden, group))
            if m[2] == "proj_mlp":
                whole[target] = 3 * hidden + group["B"].shape[0]
        elif module == _FINAL_SCALE_SHIFT:
            out[_FINAL] = _swap_final(group, module)
        else:
            out[module] = group
    for target, pieces in parts.items():
        if target in out:
            pieces.append((0, out.pop(target)))
        merged = merge_parts(pieces)
        start, stop = (int(v) for v in merged["rows"])
        if start == 0 and stop == whole.get(target):
            del merged["rows"]
        out[target] = merged
    return ungroup(out)


def split_lora(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Start own layout -> diffusers names: fused ``qkv``/``linear1`` updates become q/k/v (and
    ``proj_mlp``) LoRAs, exactly (only the ranks each part uses), the final modulation back to (scale, shift)."""
    out: dict[str, Any] = {}
    for module, group in group_by_module(sd, "Flux LoRA").items():
        hidden = group["A"].shape[1] if "A" in group else 0
        if m := _DOUBLE_QKV.match(module):
            bounds = [(f"{m[1]}.to_{c}", i * hidden, (i + 1) * hidden) for i, c in enumerate("qkv")]
            out.update(split_parts(group, bounds))
        elif m := _SINGLE_LINEAR1.match(module):
            bounds = [(f"{m[1]}.to_{c}", i * hidden, (i + 1) * hidden) for i, c in enumerate("qkv")]
            out.update(split_parts(group, [*bounds, (f"{m[1]}.proj_mlp", 3 * hidden, None)]))
        elif module == _FINAL:
            out[_FINAL_SCALE_SHIFT] = _swap_final(group, module)
        else:
            out[module] = group
    return ungroup(out)


def bfl_export(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Own layout -> a BFL-named format (kohya, ComfyUI): the same modules, whole weights only."""
    require_whole_rows(group_by_module(sd, "Flux LoRA"), "BFL-named (kohya/ComfyUI)")
    return dict(sd)


def diffsynth_export(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Own layout -> DiffSynth-Studio: fused modules as they are, alpha folded in (its loader has none)."""
    groups = group_by_module(sd, "Flux LoRA")
    require_whole_rows(groups, "DiffSynth-Studio")
    out = {m: bake_alpha(g) for m, g in groups.items() if m != _FINAL}
    if _FINAL in groups:
        out[_FINAL_SCALE_SHIFT] = bake_alpha(_swap_final(groups[_FINAL], _FINAL))
    return ungroup(out)


def xlabs_export(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Own layout -> XLabs: the single blocks' ``linear1`` keeps only its q/k/v rows (``qkv_lora``),
    alpha folded in. A LoRA on the single blocks' MLP input has no XLabs spelling (an error)."""
    out: dict[str, Any] = {}
    for module, group in group_by_module(sd, "Flux LoRA").items():
        if m := _SINGLE_LINEAR1.match(module):
            hidden = group["A"].shape[1]
            pieces = split_parts(group, [(f"{m[1]}.qkv", 0, 3 * hidden), (f"{m[1]}.proj_mlp", 3 * hidden, None)])
            if f"{m[1]}.proj_mlp" in pieces:
                raise ConversionError(
                    f"the XLabs LoRA format cannot express a LoRA on {module}'s MLP rows (diffusers' proj_mlp)"
                )
            out.update(pieces)
        else:
            out[module] = group
    require_whole_rows(out, "XLabs")
    return ungroup({m: bake_alpha(g) for m, g in out.items()})


# ---------------------------------------------------------------- text encoders

CLIP_MODULES = [
    *(f"text_model.encoder.layers.{{n}}.self_attn.{p}_proj" for p in ("q", "k", "v", "out")),
    "text_model.encoder.layers.{n}.mlp.fc1", "text_model.encoder.layers.{n}.mlp.fc2",
]
T5_MODULES = [
    *(f"encoder.block.{{n}}.layer.0.SelfAttention.{p}" for p in "qkvo"),
    *(f"encoder.block.{{n}}.layer.1.DenseReluDense.{p}" for p in ("wi", "wi_0", "wi_1", "wo")),
]
# transformers 5 drops CLIPTextModel's ``text_model.`` level (PEFT files made with it lack it): read both
CLIP = KeyMap([(m, m) for m in CLIP_MODULES] + [(m.removeprefix("text_model."), m) for m in CLIP_MODULES])
T5 = KeyMap([(m, m) for m in T5_MODULES])
CLIP_KOHYA = KeyMap(_underscored(("lora_te1_", "lora_te_"), CLIP.pairs))
T5_KOHYA = KeyMap(_underscored(("lora_te3_", "lora_te2_"), T5.pairs))

rename_clip_diffusers = lora_renamer(CLIP.forward, ("text_encoder.",))
rename_clip_kohya = lora_renamer(CLIP_KOHYA.forward)
rename_clip_comfyui = lora_renamer(CLIP.forward, ("text_encoders.clip_l.transformer.",))
rename_t5_diffusers = lora_renamer(T5.forward, ("text_encoder_2.",))
rename_t5_kohya = lora_renamer(T5_KOHYA.forward)
rename_t5_comfyui = lora_renamer(T5.forward, ("text_encoders.t5xxl.transformer.",))

inverse_clip_diffusers = lora_inverse_renamer(CLIP.inverse, "text_encoder.")
inverse_clip_kohya = lora_inverse_renamer(CLIP_KOHYA.inverse, "", KOHYA_SUFFIXES)
inverse_clip_comfyui = lora_inverse_renamer(CLIP.inverse, "text_encoders.clip_l.transformer.")
inverse_t5_diffusers = lora_inverse_renamer(T5.inverse, "text_encoder_2.")
inverse_t5_kohya = lora_inverse_renamer(T5_KOHYA.inverse, "", KOHYA_SUFFIXES)
inverse_t5_comfyui = lora_inverse_renamer(T5.inverse, "text_encoders.t5xxl.transformer.")


def _detector(rename: Any) -> Any:
    def detect(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
        return claims_any(rename, keys)

    return detect


is_clip_diffusers = _detector(rename_clip_diffusers)
is_clip_kohya = _detector(rename_clip_kohya)
is_clip_comfyui = _detector(rename_clip_comfyui)
is_t5_diffusers = _detector(rename_t5_diffusers)
is_t5_kohya = _detector(rename_t5_kohya)
is_t5_comfyui = _detector(rename_t5_comfyui)

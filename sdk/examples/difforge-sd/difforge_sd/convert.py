"""Checkpoint converters: diffusers folders and the original (CompVis / Stability "ldm") single files.

- U-Net, ``diffusers``: ``unet/`` of a diffusers folder; only ``mid_block.`` -> ``mid_blocks.0.``.
- U-Net, ``ldm``: ``model.diffusion_model.input_blocks.N.M...`` (SD 1.x/2.x ``.ckpt``/``.safetensors``
  and SDXL's ``sd_xl_base_1.0.safetensors``). ``input_blocks`` / ``output_blocks`` are numbered
  flat; the renames assume 2 resnets per down block, as every released SD and SDXL U-Net has.
- VAE, ``ldm``: ``first_stage_model.encoder.down.N.block.M...`` (or the same keys without the
  prefix, as standalone VAE files such as ``vae-ft-mse-840000`` ship): attention weights are 1x1
  convolutions there, and the decoder's levels are numbered the other way round.
- CLIP-L, ``ldm``: ``cond_stage_model.transformer.`` (SD 1.x) or ``conditioner.embedders.0.transformer.``
  (SDXL) + transformers' own names: only the prefix goes.
- OpenCLIP ViT-bigG, ``openclip``: SDXL's ``conditioner.embedders.1.model.transformer.resblocks.N...``
  with fused ``in_proj`` q/k/v and a transposed ``text_projection``.

A full single-file checkpoint holds all of these: every converter claims it, so it is loaded once per
component with ``ModelConfig(path=..., model="sd-unet" | "sd-vae" | "clip-text")`` (the other keys
are dropped by each rename); SDXL's two text encoders are told apart by ``format="ldm"`` (CLIP-L) and
``format="openclip"`` (CLIP-G).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "is_unet_diffusers", "unet_from_diffusers", "unet_to_diffusers",
    "is_unet_ldm", "unet_from_ldm", "unet_to_ldm", "unet_ldm_upsampler_slots",
    "is_vae_ldm", "vae_from_ldm", "vae_to_ldm", "vae_reverse_decoder", "vae_to_ldm_transform",
    "is_clip_ldm", "clip_from_ldm", "clip_to_ldm",
    "is_openclip_ldm", "openclip_from_ldm", "openclip_to_ldm", "openclip_split", "openclip_fuse",
]

_LAYERS = 2  # resnets per down block in every released SD / SDXL U-Net (the ldm numbering depends on it)

# ---------------------------------------------------------------- U-Net: diffusers


def is_unet_diffusers(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    keyset = set(keys)
    return "conv_in.weight" in keyset and "mid_block.resnets.0.conv1.weight" in keyset and "time_embedding.linear_1.weight" in keyset


def unet_from_diffusers(key: str) -> str | None:
    return "mid_blocks.0." + key[len("mid_block.") :] if key.startswith("mid_block.") else key


def unet_to_diffusers(key: str) -> str | None:
    return "mid_block." + key[len("mid_blocks.0.") :] if key.startswith("mid_blocks.0.") else key


# ---------------------------------------------------------------- U-Net: ldm

_UNET_PREFIX = "model.diffusion_model."
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}
_FLAT = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
         "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
         "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_FLAT_BACK = {v: k for k, v in _FLAT.items()}


def is_unet_ldm(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    keyset = set(keys)
    return any(f"{p}input_blocks.0.0.weight" in keyset and f"{p}middle_block.1.proj_in.weight" in keyset for p in ("", _UNET_PREFIX))


def _resnet(rest: str) -> str | None:
    for theirs, ours in _RESNET.items():
        if rest.startswith(theirs + "."):
            return ours + rest[len(theirs) :]
    return None


def unet_from_ldm(key: str) -> str | None:
    if key.startswith(_UNET_PREFIX):
        key = key[len(_UNET_PREFIX) :]
    elif re.match(r"^(first_stage_model|cond_stage_model|conditioner|model_ema|model)\.", key):
        return None
    for theirs, ours in _FLAT.items():
        if key.startswith(theirs + "."):
            return ours + key[len(theirs) :]
    if m := re.match(r"^input_blocks\.(\d+)\.(\d)\.(.+)$", key):
        n, part, rest = int(m[1]) - 1, int(m[2]), m[3]
        i, j = divmod(n, _LAYERS + 1)
        if j == _LAYERS:
            return f"down_blocks.{i}.downsamplers.0.conv.{rest[3:]}" if rest.startswith("op.") else None
        if part == 0:
            r = _resnet(rest)
            return None if r is None else f"down_blocks.{i}.resnets.{j}.{r}"
        return f"down_blocks.{i}.attentions.{j}.{rest}"
    if m := re.match(r"^middle_block\.(\d)\.(.+)$", key):
        part, rest = int(m[1]), m[2]
        if part == 1:
            return f"mid_blocks.0.attentions.0.{rest}"
        r = _resnet(rest)
        return None if r is None else f"mid_blocks.0.resnets.{part // 2}.{r}"
    if m := re.match(r"^output_blocks\.(\d+)\.(\d)\.(.+)$", key):
        i, j = divmod(int(m[1]), _LAYERS + 1)
        part, rest = int(m[2]), m[3]
        if part == 0:
            r = _resnet(rest)
            return None if r is None else f"up_blocks.{i}.resnets.{j}.{r}"
        if re.match(r"^conv\.(weight|bias)$", rest):
            return f"up_blocks.{i}.upsamplers.0.{rest}"
        return f"up_blocks.{i}.attentions.{j}.{rest}" if part == 1 else None
    return None


def unet_ldm_upsampler_slots(sd: dict[str, Any]) -> dict[str, Any]:
    """Inverse transform: number each upsampler as its position in the ldm ``output_blocks`` entry
    (after the resnet and, where the block has attention, the transformer)."""
    out = {}
    for k, v in sd.items():
        if m := re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", k):
            slot = 2 if any(x.startswith(f"up_blocks.{m[1]}.attentions.") for x in sd) else 1
            k = f"up_blocks.{m[1]}.upsamplers.{slot}.{m[2]}"
        out[k] = v
    return out


def unet_to_ldm(key: str) -> str | None:
    if key in ("", None):
        return None
    stem, _, leaf = key.rpartition(".")
    if stem in _FLAT_BACK:
        return f"{_UNET_PREFIX}{_FLAT_BACK[stem]}.{leaf}"
    if m := re.match(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"{_UNET_PREFIX}input_blocks.{1 + i * (_LAYERS + 1) + _LAYERS}.0.op.{rest[len('conv.'):]}"
        n = 1 + i * (_LAYERS + 1) + j
        if kind == "resnets":
            return f"{_UNET_PREFIX}input_blocks.{n}.0.{_resnet_back(rest)}"
        return f"{_UNET_PREFIX}input_blocks.{n}.1.{rest}"
    if m := re.match(r"^mid_blocks\.0\.(resnets|attentions)\.(\d+)\.(.+)$", key):
        if m[1] == "attentions":
            return f"{_UNET_PREFIX}middle_block.1.{m[3]}"
        return f"{_UNET_PREFIX}middle_block.{2 * int(m[2])}.{_resnet_back(m[3])}"
    if m := re.match(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":  # j is the slot unet_ldm_upsampler_slots gave it
            return f"{_UNET_PREFIX}output_blocks.{i * (_LAYERS + 1) + _LAYERS}.{j}.{rest}"
        n = i * (_LAYERS + 1) + j
        if kind == "resnets":
            return f"{_UNET_PREFIX}output_blocks.{n}.0.{_resnet_back(rest)}"
        return f"{_UNET_PREFIX}output_blocks.{n}.1.{rest}"
    return None


def _resnet_back(rest: str) -> str:
    head, _, leaf = rest.partition(".")
    return f"{_RESNET_BACK[head]}.{leaf}"


# ---------------------------------------------------------------- VAE: ldm

_VAE_PREFIX = "first_stage_model."
_VAE_FLAT = {"nin_shortcut": "conv_shortcut", "norm_out": "conv_norm_out"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTN_BACK = {v: k for k, v in _VAE_ATTN.items()}


def is_vae_ldm(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    keyset = set(keys)
    return any(
        f"{p}encoder.down.0.block.0.conv1.weight" in keyset and f"{p}quant_conv.weight" in keyset for p in ("", _VAE_PREFIX)
    )


def vae_from_ldm(key: str) -> str | None:
    """Rename one ldm VAE key (the decoder's levels stay in ldm order until :func:`vae_reverse_decoder`)."""
    if key.startswith(_VAE_PREFIX):
        key = key[len(_VAE_PREFIX) :]
    if not re.match(r"^(encoder|decoder|quant_conv|post_quant_conv)\.", key):
        return None
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    key = re.sub(r"\.nin_shortcut\.", ".conv_shortcut.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.", key)
    if m := re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.+)$", key):
        key = f"{m[1]}.mid_block.attentions.0.{_VAE_ATTN[m[2]]}.{m[3]}"
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.", r"decoder.up_blocks.\1.resnets.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0.", key)
    return key


def _reverse(sd: Mapping[str, Any], squeeze: bool) -> dict[str, Any]:
    levels = {int(m[1]) for k in sd if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))}
    n = max(levels) + 1 if levels else 0
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up_blocks.{n - 1 - int(m[1])}.", k)
        if re.match(r"^(en|de)coder\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", k):
            v = v.reshape(v.shape[0], v.shape[1]) if squeeze else v.reshape(*v.shape, 1, 1)
        out[k] = v
    return out


def vae_reverse_decoder(sd: dict[str, Any]) -> dict[str, Any]:
    """Transform: the decoder's levels in diffusers' order (deepest first), attention 1x1 convs as linears."""
    return _reverse(sd, squeeze=True)


def vae_to_ldm_transform(sd: dict[str, Any]) -> dict[str, Any]:
    """Inverse transform: levels back in ldm order, attention linears as 1x1 convs."""
    return _reverse(sd, squeeze=False)


def vae_to_ldm(key: str) -> str | None:
    key = re.sub(r"\.conv_shortcut\.", ".nin_shortcut.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", key)
    if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)$", key):
        key = f"{m[1]}.mid.attn_1.{_VAE_ATTN_BACK[m[2]]}.{m[3]}"
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.up.\1.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.\1.upsample.", key)
    return _VAE_PREFIX + key


# ---------------------------------------------------------------- CLIP-L: ldm

_CLIP_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")


def is_clip_ldm(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    return any(k.startswith(p) and k.endswith("token_embedding.weight") for k in keys for p in _CLIP_PREFIXES)


def clip_from_ldm(key: str) -> str | None:
    for p in _CLIP_PREFIXES:
        if key.startswith(p):
            rest = key[len(p) :]
            if rest.endswith("position_ids"):
                return None
            return rest if rest.startswith("text_model.") else f"text_model.{rest}"
    return None


def clip_to_ldm(key: str) -> str | None:
    return _CLIP_PREFIXES[0] + key if key.startswith("text_model.") else None


# ---------------------------------------------------------------- OpenCLIP ViT-bigG (SDXL's second encoder): ldm

_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
_OPENCLIP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
}
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "attn.in_proj": "self_attn.in_proj"}
_OPENCLIP_BACK = {v: k for k, v in _OPENCLIP.items()}
_OPENCLIP_LAYER_BACK = {v: k for k, v in _OPENCLIP_LAYER.items()}


def is_openclip_ldm(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """SDXL's OpenCLIP ViT-bigG text tower in an original single file (fused ``in_proj`` q/k/v)."""
    return f"{_OPENCLIP_PREFIX}transformer.resblocks.0.attn.in_proj_weight" in set(keys)


def openclip_from_ldm(key: str) -> str | None:
    """Rename (q/k/v stay fused as ``self_attn.in_proj`` until :func:`openclip_split`)."""
    if not key.startswith(_OPENCLIP_PREFIX):
        return None
    key = key[len(_OPENCLIP_PREFIX) :]
    if key in _OPENCLIP:
        return _OPENCLIP[key]
    if m := re.match(r"^transformer\.resblocks\.(\d+)\.(ln_1|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)$", key):
        return f"text_model.encoder.layers.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}"
    if m := re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
        return f"text_model.encoder.layers.{m[1]}.self_attn.in_proj.{m[2]}"
    return None  # logit_scale, attn_mask


def openclip_split(sd: dict[str, Any]) -> dict[str, Any]:
    """Transform: fused ``in_proj`` -> ``q_proj``/``k_proj``/``v_proj``; ``text_projection`` is applied as
    ``x @ P`` in OpenCLIP, so transformers' linear weight is its transpose."""
    out = {}
    for k, v in sd.items():
        if m := re.match(r"^(.+)\.self_attn\.in_proj\.(weight|bias)$", k):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{m[1]}.self_attn.{name}.{m[2]}"] = part
        elif k == "text_projection.weight":
            out[k] = v.t()
        else:
            out[k] = v
    return out


def openclip_fuse(sd: dict[str, Any]) -> dict[str, Any]:
    """Inverse transform of :func:`openclip_split`."""
    import torch

    out = {}
    for k, v in sd.items():
        if m := re.match(r"^(.+)\.self_attn\.q_proj\.(weight|bias)$", k):
            parts = [sd[f"{m[1]}.self_attn.{n}.{m[2]}"] for n in ("q_proj", "k_proj", "v_proj")]
            out[f"{m[1]}.self_attn.in_proj.{m[2]}"] = torch.cat(parts, dim=0)
        elif re.match(r"^.+\.self_attn\.(k|v)_proj\.(weight|bias)$", k):
            continue
        elif k == "text_projection.weight":
            out[k] = v.t()
        else:
            out[k] = v
    return out


def openclip_to_ldm(key: str) -> str | None:
    if key in _OPENCLIP_BACK:
        return _OPENCLIP_PREFIX + _OPENCLIP_BACK[key]
    if m := re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
        theirs = _OPENCLIP_LAYER_BACK.get(m[2])
        if theirs is None:
            return None
        if theirs == "attn.in_proj":
            return f"{_OPENCLIP_PREFIX}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"
        return f"{_OPENCLIP_PREFIX}transformer.resblocks.{m[1]}.{theirs}.{m[3]}"
    return None

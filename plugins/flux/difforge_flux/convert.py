"""Converters between diffusers' Flux layouts and the BFL layouts our models own.

Each direction is a pure key ``rename`` (None drops a key) followed by a ``transform`` of the
renamed mapping for the few real tensor edits. Transforms only concatenate, split, slice and
reshape, so they work on meta tensors (detection learns shapes that way), and they pass every
tensor they do not edit through untouched (still memory-mapped).

DiT (diffusers ``FluxTransformer2DModel`` <-> BFL):
- the separate ``to_q/to_k/to_v`` (image) and ``add_{q,k,v}_proj`` (text) of double blocks are
  fused into ``img_attn.qkv`` / ``txt_attn.qkv``; in single blocks ``to_q/to_k/to_v`` and
  ``proj_mlp`` are fused into ``linear1``, in that order;
- the final norm's modulation is stored (scale, shift) by diffusers and (shift, scale) by BFL:
  its halves are swapped.

AE (diffusers ``AutoencoderKL`` with the Flux config <-> BFL ``ae.safetensors``):
- diffusers numbers decoder levels in the order they run (``up_blocks.0`` is the lowest
  resolution), BFL by width (``up.0`` is the highest): the transform renumbers them, because that
  needs the number of levels, which a per-key rename cannot know;
- diffusers stores the mid-block attention projections as linear ``[C, C]`` weights, BFL as 1x1
  convolutions ``[C, C, 1, 1]``.

ComfyUI/civitai files (``model.diffusion_model.`` + BFL keys) need no converter: the core strips
that generic prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

_FIELDS = {"n": r"\d+", "m": r"\d+", "c": "q|k|v", "p": "weight|bias"}


class KeyMap:
    """A two-way key map from ``(source template, target template)`` pairs.

    Templates are dotted names with fields: ``{n}``/``{m}`` (an index), ``{c}`` (q, k or v),
    ``{p}`` (weight or bias). A key matching one side is rewritten to the other; keys matching no
    pair map to None.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = list(pairs)
        self._forward = [(self._compile(src), dst) for src, dst in self.pairs]
        self._inverse = [(self._compile(dst), src) for src, dst in self.pairs]

    @staticmethod
    def _compile(template: str) -> re.Pattern[str]:
        parts = re.split(r"\{(\w)\}", template)  # literal, field, literal, field, ...
        regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for i, p in enumerate(parts))
        return re.compile(f"^{regex}$")

    @staticmethod
    def _apply(rules: list[tuple[re.Pattern[str], str]], key: str) -> str | None:
        for pattern, template in rules:
            if m := pattern.match(key):
                return template.format(**m.groupdict())
        return None

    def forward(self, key: str) -> str | None:
        return self._apply(self._forward, key)

    def inverse(self, key: str) -> str | None:
        return self._apply(self._inverse, key)


def _pop_many(sd: dict[str, Any], keys: Sequence[str]) -> list[Any] | None:
    """Remove and return ``keys`` from ``sd`` when all are present (else leave ``sd`` as it is)."""
    if not all(k in sd for k in keys):
        return None
    return [sd.pop(k) for k in keys]


# ---------------------------------------------------------------- DiT: diffusers <-> BFL

DIT_KEYS = KeyMap(
    [
        ("time_text_embed.timestep_embedder.linear_1.{p}", "time_in.in_layer.{p}"),
        ("time_text_embed.timestep_embedder.linear_2.{p}", "time_in.out_layer.{p}"),
        ("time_text_embed.guidance_embedder.linear_1.{p}", "guidance_in.in_layer.{p}"),
        ("time_text_embed.guidance_embedder.linear_2.{p}", "guidance_in.out_layer.{p}"),
        ("time_text_embed.text_embedder.linear_1.{p}", "vector_in.in_layer.{p}"),
        ("time_text_embed.text_embedder.linear_2.{p}", "vector_in.out_layer.{p}"),
        ("context_embedder.{p}", "txt_in.{p}"),
        ("x_embedder.{p}", "img_in.{p}"),
        ("transformer_blocks.{n}.norm1.linear.{p}", "double_blocks.{n}.img_mod.lin.{p}"),
        ("transformer_blocks.{n}.norm1_context.linear.{p}", "double_blocks.{n}.txt_mod.lin.{p}"),
        # to_{q,k,v} are fused into qkv by the transform
        ("transformer_blocks.{n}.attn.to_{c}.{p}", "double_blocks.{n}.img_attn.to_{c}.{p}"),
        ("transformer_blocks.{n}.attn.add_{c}_proj.{p}", "double_blocks.{n}.txt_attn.to_{c}.{p}"),
        ("transformer_blocks.{n}.attn.norm_q.weight", "double_blocks.{n}.img_attn.norm.query_norm.scale"),
        ("transformer_blocks.{n}.attn.norm_k.weight", "double_blocks.{n}.img_attn.norm.key_norm.scale"),
        ("transformer_blocks.{n}.attn.norm_added_q.weight", "double_blocks.{n}.txt_attn.norm.query_norm.scale"),
        ("transformer_blocks.{n}.attn.norm_added_k.weight", "double_blocks.{n}.txt_attn.norm.key_norm.scale"),
        ("transformer_blocks.{n}.attn.to_out.0.{p}", "double_blocks.{n}.img_attn.proj.{p}"),
        ("transformer_blocks.{n}.attn.to_add_out.{p}", "double_blocks.{n}.txt_attn.proj.{p}"),
        ("transformer_blocks.{n}.ff.net.0.proj.{p}", "double_blocks.{n}.img_mlp.0.{p}"),
        ("transformer_blocks.{n}.ff.net.2.{p}", "double_blocks.{n}.img_mlp.2.{p}"),
        ("transformer_blocks.{n}.ff_context.net.0.proj.{p}", "double_blocks.{n}.txt_mlp.0.{p}"),
        ("transformer_blocks.{n}.ff_context.net.2.{p}", "double_blocks.{n}.txt_mlp.2.{p}"),
        ("single_transformer_blocks.{n}.norm.linear.{p}", "single_blocks.{n}.modulation.lin.{p}"),
        # to_{q,k,v} and proj_mlp are fused into linear1 by the transform
        ("single_transformer_blocks.{n}.attn.to_{c}.{p}", "single_blocks.{n}.to_{c}.{p}"),
        ("single_transformer_blocks.{n}.proj_mlp.{p}", "single_blocks.{n}.proj_mlp.{p}"),
        ("single_transformer_blocks.{n}.attn.norm_q.weight", "single_blocks.{n}.norm.query_norm.scale"),
        ("single_transformer_blocks.{n}.attn.norm_k.weight", "single_blocks.{n}.norm.key_norm.scale"),
        ("single_transformer_blocks.{n}.proj_out.{p}", "single_blocks.{n}.linear2.{p}"),
        ("proj_out.{p}", "final_layer.linear.{p}"),
        # (scale, shift) -> (shift, scale) by the transform
        ("norm_out.linear.{p}", "final_layer.adaLN_modulation.1.{p}"),
    ]
)

_FINAL_MOD = "final_layer.adaLN_modulation.1."
_DOUBLE_QKV = re.compile(r"^(double_blocks\.\d+\.(?:img|txt)_attn\.)to_q\.(weight|bias)$")
_SINGLE_QKV = re.compile(r"^(single_blocks\.\d+\.)to_q\.(weight|bias)$")
_DOUBLE_FUSED = re.compile(r"^(double_blocks\.\d+\.(?:img|txt)_attn\.)qkv\.(weight|bias)$")
_SINGLE_FUSED = re.compile(r"^(single_blocks\.\d+\.)linear1\.(weight|bias)$")


def is_flux_diffusers(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """A diffusers ``FluxTransformer2DModel`` state dict (FLUX.1, not FLUX.2 or Chroma)."""
    keyset = set(keys)
    return (
        "x_embedder.weight" in keyset
        and "time_text_embed.timestep_embedder.linear_1.weight" in keyset
        and any(re.match(r"^single_transformer_blocks\.\d+\.proj_mlp\.weight$", k) for k in keyset)
    )


def dit_from_diffusers(key: str) -> str | None:
    """Rename one diffusers key to BFL (q/k/v and ``proj_mlp`` stay separate until :func:`dit_fuse`)."""
    return DIT_KEYS.forward(key)


def dit_to_diffusers(key: str) -> str | None:
    """Rename one key (after :func:`dit_split`) back to diffusers' layout."""
    return DIT_KEYS.inverse(key)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """``[a; b]`` -> ``[b; a]`` along dim 0 (shift/scale order of the final norm)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


def dit_fuse(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Finish diffusers -> BFL: fuse q/k/v (and the single blocks' MLP input), swap the final modulation."""
    out = dict(sd)
    for key in list(out):
        if m := _DOUBLE_QKV.match(key):
            base, kind = m.groups()
            parts = _pop_many(out, [f"{base}to_{c}.{kind}" for c in "qkv"])
            if parts is not None:
                out[f"{base}qkv.{kind}"] = torch.cat(parts, dim=0)
        elif m := _SINGLE_QKV.match(key):
            base, kind = m.groups()
            parts = _pop_many(out, [f"{base}to_{c}.{kind}" for c in "qkv"] + [f"{base}proj_mlp.{kind}"])
            if parts is not None:
                out[f"{base}linear1.{kind}"] = torch.cat(parts, dim=0)
    for kind in ("weight", "bias"):
        if (key := f"{_FINAL_MOD}{kind}") in out:
            out[key] = swap_halves(out[key])
    return out


def dit_split(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Start BFL -> diffusers: split ``qkv`` and ``linear1``, swap the final modulation back."""
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if m := _DOUBLE_FUSED.match(key):
            base, kind = m.groups()
            for c, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{base}to_{c}.{kind}"] = part
        elif m := _SINGLE_FUSED.match(key):
            base, kind = m.groups()
            hidden = sd[f"{base}linear2.weight"].shape[0]
            q, k, v, mlp_in = value.split((hidden, hidden, hidden, value.shape[0] - 3 * hidden), dim=0)
            out.update({f"{base}to_q.{kind}": q, f"{base}to_k.{kind}": k, f"{base}to_v.{kind}": v})
            out[f"{base}proj_mlp.{kind}"] = mlp_in
        elif key.startswith(_FINAL_MOD):
            out[key] = swap_halves(value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------- AE: diffusers <-> BFL

_RESNET = [(name, name) for name in ("norm1", "conv1", "norm2", "conv2")] + [("conv_shortcut", "nin_shortcut")]
_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _ae_pairs() -> list[tuple[str, str]]:
    def each(src: str, dst: str, names: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(f"{src}.{a}.{{p}}", f"{dst}.{b}.{{p}}") for a, b in names]

    pairs = []
    for s in ("encoder", "decoder"):
        pairs += each(s, s, [("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out")])
        pairs += each(f"{s}.mid_block.resnets.0", f"{s}.mid.block_1", _RESNET)
        pairs += each(f"{s}.mid_block.resnets.1", f"{s}.mid.block_2", _RESNET)
        pairs += each(f"{s}.mid_block.attentions.0", f"{s}.mid.attn_1", _ATTN)
    pairs += each("encoder.down_blocks.{n}.resnets.{m}", "encoder.down.{n}.block.{m}", _RESNET)
    pairs += each("encoder.down_blocks.{n}.downsamplers.0", "encoder.down.{n}.downsample", [("conv", "conv")])
    # decoder levels keep diffusers' numbering here; the transform renumbers them
    pairs += each("decoder.up_blocks.{n}.resnets.{m}", "decoder.up.{n}.block.{m}", _RESNET)
    pairs += each("decoder.up_blocks.{n}.upsamplers.0", "decoder.up.{n}.upsample", [("conv", "conv")])
    return pairs


AE_KEYS = KeyMap(_ae_pairs())
_AE_LEVEL = re.compile(r"^decoder\.up\.(\d+)\.")
_AE_ATTN_WEIGHT = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def is_flux_ae_diffusers(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """A diffusers ``AutoencoderKL`` state dict without quant convs (the Flux design)."""
    keyset = set(keys)
    return (
        "encoder.mid_block.attentions.0.to_q.weight" in keyset
        and "decoder.up_blocks.0.resnets.0.conv1.weight" in keyset
        and "quant_conv.weight" not in keyset
        and "post_quant_conv.weight" not in keyset
    )


def ae_from_diffusers(key: str) -> str | None:
    """Rename one diffusers key to BFL (decoder levels still in diffusers' order until :func:`ae_reshape`)."""
    return AE_KEYS.forward(key)


def ae_to_diffusers(key: str) -> str | None:
    """Rename one key (after :func:`ae_unreshape`) back to diffusers' layout."""
    return AE_KEYS.inverse(key)


def _reverse_decoder_levels(sd: Mapping[str, Any]) -> dict[str, Any]:
    last = max((int(m.group(1)) for k in sd if (m := _AE_LEVEL.match(k))), default=0)
    return {_AE_LEVEL.sub(lambda m: f"decoder.up.{last - int(m.group(1))}.", k): v for k, v in sd.items()}


def ae_reshape(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Finish diffusers -> BFL: renumber decoder levels, linear attention weights -> 1x1 convs."""
    out = _reverse_decoder_levels(sd)
    for key, value in out.items():
        if _AE_ATTN_WEIGHT.match(key) and value.dim() == 2:
            out[key] = value[:, :, None, None]
    return out


def ae_unreshape(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Start BFL -> diffusers: 1x1 conv attention weights -> linear, decoder levels in running order."""
    out = _reverse_decoder_levels(sd)
    for key, value in out.items():
        if _AE_ATTN_WEIGHT.match(key) and value.dim() == 4:
            out[key] = value[:, :, 0, 0]
    return out

"""Converters between diffusers' Wan layouts (the ``-Diffusers`` repositories) and Wan-AI's own.

Each direction is a pure key ``rename`` (None drops a key) followed, where needed, by a
``transform`` of the renamed mapping. Here the transforms only re-key (no tensor is edited), so
every tensor stays memory-mapped, and they work on meta tensors (detection learns shapes that way).

VAE (diffusers ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage`` <-> ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth``):
the rename maps every leaf (``norm1.gamma`` -> ``residual.0.gamma``, ``conv_in`` -> ``conv1``, ...);
the block paths that need counts a per-key rename cannot know are finished by the transform:

- Wan 2.1's decoder is one flat list (``decoder.upsamples.K``) where diffusers has levels
  (``up_blocks.N.resnets.M``, ``up_blocks.N.upsamplers.0``);
- Wan 2.2's samplers sit after the residual blocks of their level (``downsamples.N.downsamples.J``,
  ``J`` = number of residual blocks), where diffusers names them ``downsampler`` / ``upsampler``.

DiT (diffusers ``WanTransformer3DModel`` <-> Wan-AI's ``blocks.N.self_attn.q``, ...): a pure rename.
diffusers' ``norm2`` (the cross-attention norm) is Wan's ``norm3``; the modulation tables are
``scale_shift_table`` in diffusers and ``modulation`` in Wan.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_FIELDS = {"n": r"\d+", "m": r"\d+", "p": "weight|bias", "c": "q|k|v|o"}


class KeyMap:
    """A two-way key map from ``(source template, target template)`` pairs.

    Templates are dotted names with fields ``{n}``/``{m}`` (an index), ``{p}`` (weight or bias) and
    ``{c}`` (an attention projection). A key matching one side is rewritten to the other; keys
    matching no pair map to None.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self._forward = [(self._compile(src), dst) for src, dst in pairs]
        self._inverse = [(self._compile(dst), src) for src, dst in pairs]

    @staticmethod
    def _compile(template: str) -> re.Pattern[str]:
        parts = re.split(r"\{(\w)\}", template)
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


# ---------------------------------------------------------------- VAE: diffusers <-> Wan-AI

_RES = [("norm1.gamma", "residual.0.gamma"), ("conv1.{p}", "residual.2.{p}"), ("norm2.gamma", "residual.3.gamma"),
        ("conv2.{p}", "residual.6.{p}"), ("conv_shortcut.{p}", "shortcut.{p}")]  # fmt: skip
_RESAMPLE = [("resample.1.{p}", "resample.1.{p}"), ("time_conv.{p}", "time_conv.{p}")]
_ATTN = [("norm.gamma", "norm.gamma"), ("to_qkv.{p}", "to_qkv.{p}"), ("proj.{p}", "proj.{p}")]


def _vae_pairs() -> list[tuple[str, str]]:
    def each(src: str, dst: str, leaves: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(f"{src}.{a}", f"{dst}.{b}") for a, b in leaves]

    pairs = [("quant_conv.{p}", "conv1.{p}"), ("post_quant_conv.{p}", "conv2.{p}")]
    for s in ("encoder", "decoder"):
        pairs += [(f"{s}.conv_in.{{p}}", f"{s}.conv1.{{p}}"), (f"{s}.norm_out.gamma", f"{s}.head.0.gamma"),
                  (f"{s}.conv_out.{{p}}", f"{s}.head.2.{{p}}")]  # fmt: skip
        pairs += each(f"{s}.mid_block.resnets.0", f"{s}.middle.0", _RES)
        pairs += each(f"{s}.mid_block.attentions.0", f"{s}.middle.1", _ATTN)
        pairs += each(f"{s}.mid_block.resnets.1", f"{s}.middle.2", _RES)
    # encoder, Wan 2.1: one flat list in both layouts
    pairs += each("encoder.down_blocks.{n}", "encoder.downsamples.{n}", _RES + _RESAMPLE)
    # encoder, Wan 2.2: the downsampler's index is set by the transform
    pairs += each("encoder.down_blocks.{n}.resnets.{m}", "encoder.downsamples.{n}.downsamples.{m}", _RES)
    pairs += each("encoder.down_blocks.{n}.downsampler", "encoder.down_blocks.{n}.downsampler", _RESAMPLE)
    # decoder (both): leaves renamed here, block paths by the transform
    pairs += each("decoder.up_blocks.{n}.resnets.{m}", "decoder.up_blocks.{n}.resnets.{m}", _RES)
    pairs += each("decoder.up_blocks.{n}.upsamplers.0", "decoder.up_blocks.{n}.upsamplers.0", _RESAMPLE)
    pairs += each("decoder.up_blocks.{n}.upsampler", "decoder.up_blocks.{n}.upsampler", _RESAMPLE)
    return pairs


VAE_KEYS = KeyMap(_vae_pairs())

_DOWNSAMPLER = re.compile(r"^encoder\.down_blocks\.(\d+)\.downsampler\.(.+)$")
_UP_RESNET = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_UP_SAMPLER = re.compile(r"^decoder\.up_blocks\.(\d+)\.(?:upsamplers\.0|upsampler)\.(.+)$")
_OWN_LEVEL_BLOCK = re.compile(r"^(encoder|decoder)\.(?:down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.+)$")
_OWN_FLAT_BLOCK = re.compile(r"^decoder\.upsamples\.(\d+)\.(.+)$")
_SAMPLER_LEAF = re.compile(r"^(?:resample|time_conv)\.")


def is_wan_vae_diffusers(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """A diffusers ``AutoencoderKLWan`` (or ``AutoencoderKLQwenImage``) state dict."""
    keyset = set(keys)
    return {"encoder.conv_in.weight", "post_quant_conv.weight", "decoder.mid_block.attentions.0.to_qkv.weight",
            "encoder.norm_out.gamma"} <= keyset  # fmt: skip


def vae_from_diffusers(key: str) -> str | None:
    """Rename one diffusers key (decoder and Wan 2.2 sampler paths are finished by :func:`vae_restructure`)."""
    return VAE_KEYS.forward(key)


def vae_to_diffusers(key: str) -> str | None:
    """Rename one key (after :func:`vae_unstructure`) back to diffusers' layout."""
    return VAE_KEYS.inverse(key)


def _is_residual_design(keys: Sequence[str]) -> bool:
    return any(
        ".downsampler." in k or ".upsampler." in k or re.match(r"^encoder\.downsamples\.\d+\.downsamples\.", k)
        for k in keys
    )


def vae_restructure(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Finish diffusers -> Wan-AI: place the decoder blocks and the Wan 2.2 samplers by counting."""
    residual = _is_residual_design(list(sd))
    resnets: dict[int, set[int]] = {}
    for key in sd:
        if m := re.match(r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.", key):
            resnets.setdefault(-1 - int(m.group(1)), set()).add(int(m.group(2)))  # encoder levels as -1 - n
        elif m := _UP_RESNET.match(key):
            resnets.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    up_levels = sorted({int(m.group(1)) for k in sd if (m := _UP_RESNET.match(k) or _UP_SAMPLER.match(k))})
    has_sampler = {int(m.group(1)) for k in sd if (m := _UP_SAMPLER.match(k))}
    offsets, offset = {}, 0  # Wan 2.1: first flat index of each decoder level
    for n in up_levels:
        offsets[n] = offset
        offset += len(resnets.get(n, ())) + (n in has_sampler)

    out: dict[str, Any] = {}
    for key, value in sd.items():
        if m := _DOWNSAMPLER.match(key):
            n = int(m.group(1))
            key = f"encoder.downsamples.{n}.downsamples.{len(resnets.get(-1 - n, ()))}.{m.group(2)}"
        elif m := _UP_RESNET.match(key):
            n, j, leaf = int(m.group(1)), int(m.group(2)), m.group(3)
            key = f"decoder.upsamples.{n}.upsamples.{j}.{leaf}" if residual else f"decoder.upsamples.{offsets[n] + j}.{leaf}"
        elif m := _UP_SAMPLER.match(key):
            n, leaf = int(m.group(1)), m.group(2)
            j = len(resnets.get(n, ()))
            key = f"decoder.upsamples.{n}.upsamples.{j}.{leaf}" if residual else f"decoder.upsamples.{offsets[n] + j}.{leaf}"
        out[key] = value
    return out


def vae_unstructure(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Start Wan-AI -> diffusers: decoder blocks and Wan 2.2 samplers back under diffusers' block paths."""
    residual = _is_residual_design(list(sd))
    flat_level: dict[int, tuple[int, int, bool]] = {}  # Wan 2.1: flat index -> (level, index in level, sampler)
    if not residual:
        samplers = {int(m.group(1)) for k in sd if (m := _OWN_FLAT_BLOCK.match(k)) and _SAMPLER_LEAF.match(m.group(2))}
        level = j = 0
        for k in sorted({int(m.group(1)) for key in sd if (m := _OWN_FLAT_BLOCK.match(key))}):
            flat_level[k] = (level, j, k in samplers)
            level, j = (level + 1, 0) if k in samplers else (level, j + 1)

    out: dict[str, Any] = {}
    for key, value in sd.items():
        if residual and (m := _OWN_LEVEL_BLOCK.match(key)):
            side, n, j, leaf = m.group(1), m.group(2), m.group(3), m.group(4)
            if side == "encoder":
                if _SAMPLER_LEAF.match(leaf):
                    key = f"encoder.down_blocks.{n}.downsampler.{leaf}"
            else:
                key = (f"decoder.up_blocks.{n}.upsampler.{leaf}" if _SAMPLER_LEAF.match(leaf)
                       else f"decoder.up_blocks.{n}.resnets.{j}.{leaf}")  # fmt: skip
        elif not residual and (m := _OWN_FLAT_BLOCK.match(key)):
            n, j, sampler = flat_level[int(m.group(1))]
            leaf = m.group(2)
            key = f"decoder.up_blocks.{n}.upsamplers.0.{leaf}" if sampler else f"decoder.up_blocks.{n}.resnets.{j}.{leaf}"
        out[key] = value
    return out


# ---------------------------------------------------------------- DiT: diffusers <-> Wan-AI


def _dit_pairs() -> list[tuple[str, str]]:
    pairs = [
        ("patch_embedding.{p}", "patch_embedding.{p}"),
        ("condition_embedder.time_embedder.linear_1.{p}", "time_embedding.0.{p}"),
        ("condition_embedder.time_embedder.linear_2.{p}", "time_embedding.2.{p}"),
        ("condition_embedder.time_proj.{p}", "time_projection.1.{p}"),
        ("condition_embedder.text_embedder.linear_1.{p}", "text_embedding.0.{p}"),
        ("condition_embedder.text_embedder.linear_2.{p}", "text_embedding.2.{p}"),
        ("blocks.{n}.norm2.{p}", "blocks.{n}.norm3.{p}"),  # the cross-attention norm
        ("blocks.{n}.ffn.net.0.proj.{p}", "blocks.{n}.ffn.0.{p}"),
        ("blocks.{n}.ffn.net.2.{p}", "blocks.{n}.ffn.2.{p}"),
        ("blocks.{n}.scale_shift_table", "blocks.{n}.modulation"),
        ("scale_shift_table", "head.modulation"),
        ("proj_out.{p}", "head.head.{p}"),
    ]
    for ours, wan in (("attn1", "self_attn"), ("attn2", "cross_attn")):
        pairs += [(f"blocks.{{n}}.{ours}.to_{c}.{{p}}", f"blocks.{{n}}.{wan}.{c}.{{p}}") for c in "qkv"]
        pairs += [
            (f"blocks.{{n}}.{ours}.to_out.0.{{p}}", f"blocks.{{n}}.{wan}.o.{{p}}"),
            (f"blocks.{{n}}.{ours}.norm_q.weight", f"blocks.{{n}}.{wan}.norm_q.weight"),
            (f"blocks.{{n}}.{ours}.norm_k.weight", f"blocks.{{n}}.{wan}.norm_k.weight"),
        ]
    return pairs


DIT_KEYS = KeyMap(_dit_pairs())


def is_wan_dit_diffusers(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """A diffusers ``WanTransformer3DModel`` state dict of a text-to-video or TI2V model: every key known
    (image-to-video, VACE and Animate variants carry more and are not claimed)."""
    keyset = set(keys)
    required = {"condition_embedder.time_embedder.linear_1.weight", "blocks.0.attn1.to_q.weight", "scale_shift_table",
                "proj_out.weight"}  # fmt: skip
    return required <= keyset and all(DIT_KEYS.forward(k) is not None for k in keyset)


def dit_from_diffusers(key: str) -> str | None:
    """Rename one diffusers ``WanTransformer3DModel`` key to Wan-AI's layout."""
    return DIT_KEYS.forward(key)


def dit_to_diffusers(key: str) -> str | None:
    """Rename one Wan-AI key to diffusers' layout."""
    return DIT_KEYS.inverse(key)

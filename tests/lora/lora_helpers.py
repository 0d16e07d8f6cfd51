"""A throwaway LoRA plugin for the toy family (a pytester-style plugin, passed to ``reload_plugins``), and
random LoRA files for it.

Two DiT formats: ``toy`` (``toy.{module}.lora_A.weight``, own module names, ``alpha`` keys) and
``toy-parts`` (``parts.blocks.N.attn.to_q.lora_down.weight``: separate q/k/v LoRAs that land on the
fused ``qkv`` through :func:`difforge.lora.merge_parts`); the text encoder's ``te.{module}`` keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from difforge import ConverterSpec, hookimpl
from difforge.lora import (
    KOHYA_SUFFIXES,
    claims_any,
    group_by_module,
    lora_inverse_renamer,
    lora_renamer,
    merge_parts,
    split_parts,
    ungroup,
)

difforge_api = ">=1,<2"

_PART = re.compile(r"^blocks\.(\d+)\.attn\.to_([qkv])$")
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv$")


def _own(module: str) -> str | None:
    return module


def _parts_map(module: str) -> str | None:
    return module if _PART.match(module) else None


rename_toy = lora_renamer(_own, ("toy.",))
inverse_toy = lora_inverse_renamer(_own, "toy.")
rename_parts = lora_renamer(_parts_map, ("parts.",))
inverse_parts = lora_inverse_renamer(_parts_map, "parts.", KOHYA_SUFFIXES)
rename_te = lora_renamer(_own, ("te.",))
inverse_te = lora_inverse_renamer(_own, "te.")


def fuse_parts(sd: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    parts: dict[str, list[tuple[int, Any]]] = {}
    for module, group in group_by_module(sd).items():
        m = _PART.match(module)
        if m is None:
            out[module] = group
        else:
            hidden = group["A"].shape[1]
            parts.setdefault(f"blocks.{m[1]}.attn.qkv", []).append(("qkv".index(m[2]) * hidden, group))
    out.update({target: merge_parts(p) for target, p in parts.items()})
    return ungroup(out)


def split_qkv(sd: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for module, group in group_by_module(sd).items():
        if m := _QKV.match(module):
            h = group["A"].shape[1]
            out.update(split_parts(group, [(f"blocks.{m[1]}.attn.to_{c}", i * h, (i + 1) * h) for i, c in enumerate("qkv")]))
        else:
            out[module] = group
    return ungroup(out)


def _detect(rename: Any) -> Any:
    return lambda keys, metadata=None: claims_any(rename, keys)


@hookimpl
def difforge_register_converters() -> Iterator[ConverterSpec]:
    yield ConverterSpec(name="toy-lora", source_format="toy", target_model="toy-dit", detect=_detect(rename_toy),
                        rename=rename_toy, inverse_rename=inverse_toy, kind="lora")
    yield ConverterSpec(name="toy-lora-parts", source_format="toy-parts", target_model="toy-dit",
                        detect=_detect(rename_parts), rename=rename_parts, transform=fuse_parts,
                        inverse_rename=inverse_parts, inverse_transform=split_qkv, kind="lora")
    yield ConverterSpec(name="toy-te-lora", source_format="toy", target_model="toy-text-encoder",
                        detect=_detect(rename_te), rename=rename_te, inverse_rename=inverse_te, kind="lora")


DIT_MODULES = ("x_embedder", "time_embed.0", "blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.2.mlp.0", "final.linear")


def random_lora(
    model: torch.nn.Module, modules: Sequence[str], prefix: str, seed: int, rank: int = 2, alpha: float | None = 3.0
) -> dict[str, torch.Tensor]:
    """A random LoRA on ``modules`` of ``model`` in the ``toy`` spelling (``prefix`` + module)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name in modules:
        layer = model.get_submodule(name)
        sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.3
        sd[f"{prefix}{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.3
        if alpha is not None:
            sd[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    return sd


def write(sd: Mapping[str, torch.Tensor], path: Path) -> Path:
    save_file(dict(sd), str(path))
    return path

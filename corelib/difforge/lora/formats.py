"""LoRA files: reading them, recognising their format, converting them to and from own layouts.

- :func:`read_lora` reads a file (safetensors, or a pickle through ``torch.load(weights_only=True)``)
  and turns PEFT adapter metadata (diffusers' ``lora_adapter_metadata``, a PEFT
  ``adapter_config.json`` beside the file) into per-module ``alpha`` keys.
- :func:`match_converters` finds the ``kind="lora"`` converters that claim the file's keys, per target
  model; two converters claiming one file for one model are an error, never a guess.
- :func:`to_own` applies one converter (rename, then transform) and groups the result by module.
- :func:`from_own` applies a converter's inverse, for export.
- :func:`convert_lora` converts a LoRA file to another format without loading any model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._names import normalize_name, resolve
from ..errors import ConversionError, LoadError
from ..loading.fingerprint import strip_prefix
from ..specs import ConverterSpec
from .keys import Group, group_by_module, split_lora_key

log = logging.getLogger(__name__)

__all__ = ["CALL_DEFAULTS_KEY", "SCHEDULER_KEY", "LoraFile", "read_lora", "lora_converters", "match_converters", "to_own", "from_own", "convert_lora"]

METADATA_KEY = "lora_adapter_metadata"
"""The safetensors metadata entry in which diffusers stores the PEFT ``LoraConfig`` (JSON)."""

SCHEDULER_KEY = "difforge.scheduler"
"""The safetensors metadata entry of a LoRA that needs its own sampler (distilled "Lightning" LoRAs):
JSON, a scheduler name (``"flow-euler"``) or ``{"name": ..., **options}`` (``{"name": "flow-euler",
"shift": 3.0}``), as the ``scheduler=`` argument of every pipeline takes it."""

CALL_DEFAULTS_KEY = "difforge.call_defaults"
"""The safetensors metadata entry of a LoRA's call defaults: a JSON object of pipeline call arguments
(``{"num_inference_steps": 8, "cfg_scale": 1.0}``) that apply while the LoRA is loaded, unless a call
gives them."""

CARRIED_KEYS = (SCHEDULER_KEY, CALL_DEFAULTS_KEY)
"""Metadata entries that export and conversion copy to the new file."""


@dataclass
class LoraFile:
    """A LoRA read into memory: its tensors (generic prefix stripped), metadata and files."""

    tensors: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    files: tuple[Path, ...] = ()

    @property
    def label(self) -> str:
        return ", ".join(str(f) for f in self.files) or "<state dict>"


# ---------------------------------------------------------------- reading


def read_lora(source: Any) -> LoraFile:
    """Read a LoRA from a path, a list of paths, a ``ModelConfig`` or a ``{key: tensor}`` mapping."""
    from ..loading.state_dict import read_checkpoint_header, resolve_checkpoint_files

    if isinstance(source, Mapping):
        tensors, metadata, files = dict(source), {}, ()
    else:
        if hasattr(source, "paths") and callable(source.paths):  # a ModelConfig: download if needed
            source = source.paths()
        files = tuple(resolve_checkpoint_files(source))
        header = read_checkpoint_header(list(files))
        from ..loading.state_dict import open_checkpoint

        with open_checkpoint(header) as ckpt:  # LoRAs are small: copy them out of the file map
            tensors = {k: ckpt[k].clone() for k in ckpt}
        metadata = dict(header.metadata)
    if not tensors:
        raise LoadError(f"LoRA {', '.join(map(str, files)) or '<state dict>'} holds no tensors")
    _add_peft_alphas(tensors, metadata, files)
    prefix = strip_prefix(list(tensors))
    if prefix:
        tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return LoraFile(tensors, metadata, files)


def _peft_configs(metadata: Mapping[str, str], files: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """PEFT ``LoraConfig`` dicts by key prefix (``"transformer"``, ``"text_encoder"``; ``""``: every key)."""
    configs: dict[str, dict[str, Any]] = {}
    raw = metadata.get(METADATA_KEY)
    if raw:
        try:
            doc = json.loads(raw)
        except ValueError:
            log.warning("LoRA metadata %r is not JSON; ignoring it", METADATA_KEY)
            doc = {}
        for key, value in doc.items():
            prefix, _, name = key.rpartition(".")
            configs.setdefault(prefix, {})[name] = value
    for f in files[:1]:
        adapter = f.parent / "adapter_config.json"
        if f.name.startswith("adapter_model") and adapter.is_file():
            try:
                configs.setdefault("", json.loads(adapter.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                log.warning("cannot read %s (%s); LoRA alphas default to the rank", adapter, exc)
    return configs


def _add_peft_alphas(tensors: dict[str, Any], metadata: Mapping[str, str], files: Sequence[Path]) -> None:
    """Give every ``lora_A`` without an ``alpha`` key the alpha its PEFT config says (``lora_alpha``,
    ``alpha_pattern``, ``use_rslora``), as diffusers and PEFT compute the scale."""
    import torch

    configs = _peft_configs(metadata, files)
    if not configs:
        return
    for key in list(tensors):
        parsed = split_lora_key(key)
        if parsed is None or parsed[1] != "A" or f"{parsed[0]}.alpha" in tensors:
            continue
        module = parsed[0]
        prefix = module.split(".", 1)[0] if module.split(".", 1)[0] in configs else ""
        config = configs.get(prefix)
        if config is None or config.get("lora_alpha") is None:
            continue
        local = module[len(prefix) + 1 :] if prefix else module
        alpha = float(config["lora_alpha"])
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", local):
                alpha = float(value)
                break
        rank = tensors[key].shape[0]
        if config.get("use_rslora"):
            alpha = alpha * math.sqrt(rank)  # scale alpha / sqrt(r), written as alpha' / r
        tensors[f"{module}.alpha"] = torch.tensor(alpha)


# ---------------------------------------------------------------- converters


def lora_converters(registry: Any = None) -> list[ConverterSpec]:
    """Every registered converter of ``kind="lora"``."""
    if registry is None:
        from ..plugins import get_registry

        registry = get_registry()
    return [c for c in registry.converters if c.kind == "lora"]


def _claimed(converter: ConverterSpec, keys: Iterable[str]) -> list[str]:
    rename = resolve(converter.rename)
    return [k for k in keys if rename(k) is not None]


def match_converters(
    lora: LoraFile, models: Iterable[str], registry: Any = None, *, narrowest: bool = False
) -> dict[str, ConverterSpec]:
    """``{target model: converter}`` for the converters of ``models`` whose ``detect`` accepts the file.

    Two converters accepting the file for one model is a :class:`ConversionError`; so is a key
    claimed for two models. No match at all names the models the file looks like it is for.
    ``narrowest`` (for files read without a pipeline, where every installed model is a candidate):
    a model whose claimed keys are a strict subset of another model's is dropped first -- a Wan
    LoRA's ``transformer.proj_out`` is a Flux module name too, but Flux claims nothing else of it.
    """
    keys = list(lora.tensors)
    wanted = {normalize_name(m) for m in models}
    every = lora_converters(registry)
    found: dict[str, list[ConverterSpec]] = {}
    for conv in every:
        target = normalize_name(conv.target_model)
        if target in wanted and resolve(conv.detect)(keys, lora.metadata):
            found.setdefault(target, []).append(conv)
    for target, convs in found.items():
        if len(convs) > 1:
            raise ConversionError(
                f"LoRA {lora.label}: converters {', '.join(repr(c.name) for c in convs)} all accept it for "
                f"{target}; a file in one format must be recognised by one converter. Report this to the plugins' "
                "authors."
            )
    chosen = {t: convs[0] for t, convs in found.items()}
    if not chosen:
        others = sorted(
            {f"{c.target_model} ({c.source_format})" for c in every if resolve(c.detect)(keys, lora.metadata)}
        )
        sample = ", ".join(keys[:4])
        raise ConversionError(
            f"LoRA {lora.label}: no LoRA converter for {', '.join(sorted(wanted)) or 'these models'} recognises "
            "its keys "
            f"({sample}{', ...' if len(keys) > 4 else ''})."
            + (f" It looks like a LoRA for {', '.join(others)}." if others else
               " Is it a LoRA for another model family, or in a format no installed plugin reads (LoKr, LoHa, DoRA)?")
        )
    if narrowest and len(chosen) > 1:
        claims = {t: set(_claimed(c, keys)) for t, c in chosen.items()}
        dropped = [t for t in claims if any(claims[t] < claims[o] for o in claims if o != t)]
        for t in dropped:
            log.debug("LoRA %s: not for %s (its keys are all claimed for another model too)", lora.label, t)
            del chosen[t]
    owner: dict[str, str] = {}
    for target, conv in chosen.items():
        for key in _claimed(conv, keys):
            if key in owner and owner[key] != target:
                raise ConversionError(f"LoRA {lora.label}: key {key!r} is claimed for both {owner[key]} and {target}")
            owner[key] = target
    return chosen


def to_own(lora: LoraFile, converter: ConverterSpec) -> tuple[dict[str, Group], list[str]]:
    """``({module: group}, claimed source keys)``: the file's tensors for ``converter``'s target in its own layout."""
    rename = resolve(converter.rename)
    renamed: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, value in lora.tensors.items():
        new = rename(key)
        if new is None:
            continue
        if new in renamed:
            raise ConversionError(
                f"LoRA {lora.label}: converter {converter.name!r} renames both {sources[new]!r} and {key!r} to {new!r}"
            )
        renamed[new], sources[new] = value, key
    if converter.transform is not None:
        try:
            renamed = resolve(converter.transform)(renamed)
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(
                f"LoRA {lora.label}: converter {converter.name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
    return group_by_module(renamed, f"converter {converter.name!r}"), list(sources.values())


def export_converter(target_model: str, fmt: str, registry: Any = None) -> ConverterSpec:
    """The LoRA converter writing format ``fmt`` for ``target_model`` (it must have an inverse)."""
    options = [
        c for c in lora_converters(registry)
        if normalize_name(c.target_model) == normalize_name(target_model) and c.inverse_rename is not None
    ]
    for conv in options:
        if normalize_name(conv.source_format) == normalize_name(fmt):
            return conv
    raise ConversionError(
        f"no LoRA converter writes format {fmt!r} for {target_model}; formats available for it: "
        f"{', '.join(sorted(c.source_format for c in options)) or '(none)'}"
    )


def from_own(groups: Mapping[str, Group], converter: ConverterSpec, what: str = "LoRA") -> dict[str, Any]:
    """Own-layout groups -> ``converter``'s source format (its ``inverse_transform``, then ``inverse_rename``).
    Tensors the format cannot express are a :class:`ConversionError` listing them."""
    from .keys import ungroup

    sd = ungroup(groups)
    if converter.inverse_transform is not None:
        sd = resolve(converter.inverse_transform)(sd)
    inverse = resolve(converter.inverse_rename)
    out: dict[str, Any] = {}
    lost: list[str] = []
    for key, value in sd.items():
        new = inverse(key)
        if new is None:
            lost.append(key)
        elif new in out:
            raise ConversionError(f"{what}: converter {converter.name!r} writes two tensors to {new!r}")
        else:
            out[new] = value
    if lost:
        raise ConversionError(
            f"{what}: format {converter.source_format!r} ({converter.name}) cannot express {len(lost)} tensor(s): "
            f"{', '.join(lost[:8])}{' ...' if len(lost) > 8 else ''}; choose another format"
        )
    return out


def save_lora(
    tensors: Mapping[str, Any], path: str | os.PathLike[str], fmt: str, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a LoRA safetensors file (``format: pt``, the layout name and ``metadata`` in its metadata)."""
    from ..loading.state_dict import save_safetensors

    meta = {**(metadata or {}), "format": "pt", "difforge_lora_format": fmt}
    return save_safetensors({k: v.detach().contiguous() for k, v in tensors.items()}, path, meta)


def convert_lora(
    source: Any, to_format: str, output: str | os.PathLike[str], models: Sequence[str] | None = None
) -> Path:
    """Write the LoRA ``source`` in format ``to_format`` (``diffusers``, ``kohya``, ``comfyui``, ...) without
    loading a model. ``models``: the target models to consider (default: every model with LoRA converters).

    LoRAs on part of a fused weight may need the model's sizes; ``pipe.export_lora`` has them.
    """
    lora = read_lora(source)
    targets = models or sorted({c.target_model for c in lora_converters()})
    out: dict[str, Any] = {}
    claimed: set[str] = set()
    for target, conv in match_converters(lora, targets, narrowest=not models).items():
        groups, keys = to_own(lora, conv)
        claimed.update(keys)
        for key, value in from_own(groups, export_converter(target, to_format), f"LoRA {lora.label}").items():
            if key in out:
                raise ConversionError(
                    f"LoRA {lora.label}: two models' tensors are written to {key!r} in format {to_format!r}"
                )
            out[key] = value
    unknown = [k for k in lora.tensors if k not in claimed]
    if unknown:
        raise ConversionError(
            f"LoRA {lora.label}: {len(unknown)} key(s) no converter understands ({', '.join(unknown[:8])}"
            f"{' ...' if len(unknown) > 8 else ''}); nothing was written"
        )
    carried = {k: lora.metadata[k] for k in CARRIED_KEYS if k in lora.metadata}
    path = save_lora(out, output, to_format, carried)
    log.info("wrote %s (%s LoRA, %d tensors)", path, to_format, len(out))
    return path

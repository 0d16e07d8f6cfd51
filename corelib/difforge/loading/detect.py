"""Detection: which registered model a checkpoint is, in which format, with which config.

Only headers are read. After the generic prefix is stripped:

1. exact fingerprint: the hash of key names and shapes against every ``ModelSpec.fingerprints``
   (the released variant; its config is ``released_configs[variant]``);
2. structural: the model's own layout (``identifying_keys`` present and ``config_from_shapes`` not
   None), and every checkpoint converter whose ``detect(keys, metadata)`` accepts the file (its rename
   and transform run on meta tensors to get own-layout shapes for the target's config inference).
   A ``config.json`` beside the weights goes through ``config_from_json`` when the spec has one.

Exactly one candidate is the answer; none, or several, is a :class:`DetectionError` that says what
the file looked like and which models are nearest (or which candidates compete). Never a guess.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Union

from .._names import normalize_name, resolve
from ..errors import DetectionError, DifforgeError
from ..specs import ConverterSpec, ModelSpec
from .convert import checkpoint_converters, convert_shapes
from .fingerprint import fingerprint_shapes, strip_prefix
from .state_dict import CheckpointHeader, folder_files, read_checkpoint_header

log = logging.getLogger(__name__)

__all__ = ["DetectionResult", "detect", "detect_header"]

PathArg = Union[str, "PathLike[str]"]


@dataclass(frozen=True)
class DetectionResult:
    """What a checkpoint is. ``model`` is the ModelSpec name, ``format`` the layout of the file
    (the spec's own format, or the converter's source format), ``variant`` the release matched by
    fingerprint (None for anything else), ``config`` the model config to build, ``converter`` the
    converter that turns the file into the own layout (None for own-layout files), ``prefix`` the
    generic wrapper prefix stripped from every key."""

    model: str
    family: str
    role: str
    format: str
    variant: str | None
    config: Any
    fingerprint: str
    paths: tuple[str, ...]
    converter: str | None = None
    prefix: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (the config as a dict when it is a dataclass)."""
        config = self.config
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = dataclasses.asdict(config)
        return {
            "paths": list(self.paths),
            "model": self.model,
            "family": self.family,
            "role": self.role,
            "format": self.format,
            "variant": self.variant,
            "fingerprint": self.fingerprint,
            "config": config,
            "converter": self.converter,
            "prefix": self.prefix,
        }


@dataclass
class _Candidate:
    spec: ModelSpec
    format: str
    converter: ConverterSpec | None
    config: Any
    shapes: dict[str, tuple[int, ...]]

    def describe(self) -> str:
        via = f" via converter {self.converter.name!r}" if self.converter else " (its own layout)"
        return f"{self.spec.name} in format {self.format!r}{via}"


# ---------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=1024)
def _pattern(pattern: str) -> re.Pattern[str]:
    """``blocks.*.attn.qkv.weight``: ``*`` matches one or more dotted name parts."""
    parts = [r"[^.]+(?:\.[^.]+)*" if p == "*" else re.escape(p) for p in pattern.split(".")]
    return re.compile(r"\.".join(parts))


def _has_keys(patterns: Sequence[str], keys: Mapping[str, Any]) -> bool:
    for pattern in patterns:
        if "*" in pattern:
            rx = _pattern(pattern)
            if not any(rx.fullmatch(k) for k in keys):
                return False
        elif pattern not in keys:
            return False
    return True


def _template(key: str) -> str:
    return ".".join("N" if p.isdigit() else p for p in key.split("."))


def _config_json(files: Sequence[Path]) -> dict[str, Any] | None:
    """The ``config.json`` beside the weights (all files in one folder), if any."""
    folders = {f.parent for f in files}
    if len(folders) != 1:
        return None
    path = next(iter(folders)) / "config.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


def _infer(
    spec: ModelSpec, shapes: dict[str, tuple[int, ...]], config_json: dict[str, Any] | None, notes: list[str]
) -> Any:
    """The spec's config for own-layout ``shapes`` (``config.json`` first), None if not this model."""
    try:
        if config_json is not None and spec.config_from_json is not None:
            config = resolve(spec.config_from_json)(config_json, shapes)
            if config is not None:
                return config
        return spec.infer_config(shapes)
    except DifforgeError:
        raise
    except Exception as exc:  # a plugin's inference choking on foreign or partial keys
        notes.append(f"{spec.name}: config inference failed ({type(exc).__name__}: {exc})")
        log.debug("config inference of %s failed", spec.name, exc_info=True)
        return None


def _registry() -> Any:
    from ..plugins import get_registry

    return get_registry()


# ---------------------------------------------------------------- candidates


def _candidates(
    header: CheckpointHeader, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], notes: list[str]
) -> list[_Candidate]:
    registry = _registry()
    config_json = _config_json(header.files)
    found: list[_Candidate] = []
    for spec in registry.models:
        if spec.identifying_keys and _has_keys(spec.identifying_keys, shapes):
            config = _infer(spec, shapes, config_json, notes)
            if config is not None:
                found.append(_Candidate(spec, spec.format, None, config, shapes))
    keys = list(shapes)
    for conv in checkpoint_converters(registry):
        try:
            if not resolve(conv.detect)(keys, header.metadata):
                continue
            spec = registry.models.get(conv.target_model)
            own = convert_shapes(conv, shapes, dtypes)
        except DifforgeError as exc:
            notes.append(f"converter {conv.name}: {exc}")
            continue
        except Exception as exc:
            notes.append(f"converter {conv.name} failed on this file ({type(exc).__name__}: {exc})")
            log.debug("converter %s failed", conv.name, exc_info=True)
            continue
        if spec.identifying_keys and not _has_keys(spec.identifying_keys, own):
            notes.append(f"converter {conv.name} claimed the file but its output lacks {spec.name}'s identifying keys")
            continue
        config = _infer(spec, own, config_json, notes)
        if config is None:
            notes.append(
                f"converter {conv.name} claimed the file but {spec.name} cannot infer a config from its output"
            )
            continue
        found.append(_Candidate(spec, conv.source_format, conv, config, own))
    return found


def _released_config(spec: ModelSpec, variant: str, fallback: Any) -> Any:
    config = spec.released_configs.get(variant)
    return fallback if config is None else resolve(config)


# ---------------------------------------------------------------- error messages


def _looked_like(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> str:
    keys = sorted(shapes)
    sample = ", ".join(f"{k} {list(shapes[k])}" for k in keys[:5])
    tops = Counter(k.split(".", 1)[0] for k in keys).most_common(8)
    text = f"It holds {len(keys)} tensors"
    if prefix:
        text += f" (after stripping the prefix {prefix!r})"
    text += f", e.g. {sample}" if keys else ""
    if tops:
        text += "; top-level prefixes: " + ", ".join(f"{t} ({n})" for t, n in tops)
    return text + "."


_REFERENCE_CACHE: dict[int, tuple[ModelSpec, frozenset[str]]] = {}


def _reference_templates(spec: ModelSpec) -> frozenset[str]:
    """Key templates (digits as ``N``) of a spec: its released model built on the meta device, or
    its identifying keys. Cached per spec object."""
    cached = _REFERENCE_CACHE.get(id(spec))
    if cached is not None and cached[0] is spec:
        return cached[1]
    templates = _build_templates(spec)
    _REFERENCE_CACHE[id(spec)] = (spec, templates)
    return templates


def _build_templates(spec: ModelSpec) -> frozenset[str]:
    for config in spec.released_configs.values():
        try:
            import torch

            with torch.device("meta"):
                module = spec.build(resolve(config))
            return frozenset(_template(k) for k in module.state_dict())
        except Exception:  # the error path must not fail on a plugin's build
            log.debug("cannot build %s for key comparison", spec.name, exc_info=True)
            break
    return frozenset(_template(k.replace("*", "0")) for k in spec.identifying_keys)


def _nearest(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str], limit: int = 3) -> list[str]:
    registry = _registry()
    mine = {_template(k) for k in shapes}
    views: dict[str, list[tuple[str, set[str]]]] = {}
    for spec in registry.models:
        views.setdefault(spec.name, []).append((spec.format, mine))
    for conv in checkpoint_converters(registry):
        try:
            own = convert_shapes(conv, shapes, dtypes)
        except Exception:
            continue
        views.setdefault(conv.target_model, []).append((conv.source_format, {_template(k) for k in own}))
    scored = []
    for spec in registry.models:
        ref = _reference_templates(spec)
        if not ref:
            continue
        best = max(((len(ref & keys) / len(ref), fmt) for fmt, keys in views.get(spec.name, [])), default=(0.0, ""))
        if best[0] > 0:
            scored.append((best[0], spec.name, best[1]))
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [f"{name} (format {fmt!r}: {score:.0%} of its key patterns present)" for score, name, fmt in scored[:limit]]


def _miss(
    paths: Sequence[str],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, str],
    prefix: str,
    notes: list[str],
    what: str = "",
) -> DetectionError:
    msg = f"{', '.join(paths)}: not recognised as any registered model{what}. {_looked_like(shapes, prefix)}"
    nearest = _nearest(shapes, dtypes)
    if nearest:
        msg += " Nearest known models: " + "; ".join(nearest) + "."
    else:
        msg += " No registered model shares key names with it."
    if notes:
        msg += " Notes: " + "; ".join(notes) + "."
    msg += " Is the plugin for this model installed? `difforge list models` shows what is registered."
    return DetectionError(msg)


def _ambiguous(paths: Sequence[str], found: Sequence[_Candidate]) -> DetectionError:
    registry = _registry()
    parts = []
    for c in found:
        table, name = (registry.converters, c.converter.name) if c.converter else (registry.models, c.spec.name)
        entries = table.entries(name)
        plugin = ", ".join(e.distribution or e.plugin for e in entries) or "?"
        parts.append(f"{c.describe()} [plugin {plugin}]")
    return DetectionError(
        f"{', '.join(paths)} matches {len(found)} candidates: " + "; ".join(parts) + ". difforge does not guess: "
        "pass model=... and/or format=... (a ModelSpec name and a format), or block one of the plugins "
        "with DIFFORGE_PLUGINS=no:<plugin>."
    )


# ---------------------------------------------------------------- detection


def detect_header(header: CheckpointHeader, *, model: str | None = None, format: str | None = None) -> DetectionResult:
    """Detect from an already read :class:`CheckpointHeader` (see :func:`detect`)."""
    paths = tuple(str(f) for f in header.files)
    prefix = strip_prefix(list(header.shapes))
    n = len(prefix)
    shapes = {k[n:]: v for k, v in header.shapes.items()}
    dtypes = {k[n:]: v for k, v in header.dtypes.items()}
    fp = fingerprint_shapes(header.shapes)
    notes: list[str] = []
    found = _candidates(header, shapes, dtypes, notes)
    if model is not None:
        want = normalize_name(model)
        _registry().models.get(model)  # unknown name -> UnknownNameError with suggestions
        found = [c for c in found if normalize_name(c.spec.name) == want]
    if format is not None:
        found = [c for c in found if normalize_name(c.format) == normalize_name(format)]
    filt = "".join(f" as {w} {v!r}" for w, v in (("model", model), ("format", format)) if v)

    registry = _registry()
    hits = [(s, v) for s in registry.models for f, v in s.fingerprints.items() if f == fp]
    if model is not None:
        hits = [(s, v) for s, v in hits if normalize_name(s.name) == normalize_name(model)]
    variant: str | None = None
    if hits:
        by_spec = [(s, v) for s, v in hits if any(c.spec is s for c in found)] or hits
        if len({s.name for s, _ in by_spec}) > 1:
            raise DetectionError(
                f"{', '.join(paths)}: fingerprint {fp} is registered by several models: "
                + ", ".join(f"{s.name} ({v})" for s, v in by_spec)
                + ". Pass model=... to choose."
            )
        spec, variant = by_spec[0]
        found = [c for c in found if c.spec is spec]
        if not found and format is None:
            if _has_keys(spec.identifying_keys, shapes):  # a release in the own layout: trust the fingerprint
                found = [_Candidate(spec, spec.format, None, _infer(spec, shapes, None, notes), shapes)]
            else:
                notes.append(f"its fingerprint is {spec.name} {variant!r}, but no installed converter reads its layout")
    if not found:
        raise _miss(paths, shapes, dtypes, prefix, notes, filt)
    if len(found) > 1:
        raise _ambiguous(paths, found)
    cand = found[0]
    if variant is None and cand.converter is not None:  # a release in another format
        variant = cand.spec.fingerprints.get(fingerprint_shapes(cand.shapes))
    config = _released_config(cand.spec, variant, cand.config) if variant else cand.config
    if config is None:
        raise DetectionError(f"{', '.join(paths)}: matched {cand.describe()} but no config could be inferred.")
    result = DetectionResult(
        model=cand.spec.name,
        family=cand.spec.family,
        role=cand.spec.role,
        format=cand.format,
        variant=variant,
        config=config,
        fingerprint=fp,
        paths=paths,
        converter=cand.converter.name if cand.converter else None,
        prefix=prefix,
    )
    log.debug("detected %s: %s", paths, result)
    return result


def is_weightless_folder(path: PathArg) -> bool:
    """Whether ``path`` is a folder without weight files (a tokenizer folder, say)."""
    p = Path(os.fspath(path)).expanduser()
    return p.is_dir() and not folder_files(p) and not any(p.glob("*.index.json"))


def detect_folder(folder: Path) -> DetectionResult:
    """Detect a weightless component folder (a tokenizer) through ``ModelSpec.detect_folder``."""
    found = []
    for spec in _registry().models:
        if spec.detect_folder is None:
            continue
        try:
            config = resolve(spec.detect_folder)(folder)
        except Exception as exc:
            log.debug("detect_folder of %s failed: %s", spec.name, exc)
            continue
        if config is not None:
            found.append((spec, config))
    names = sorted(p.name for p in folder.iterdir())[:10]
    if not found:
        raise DetectionError(
            f"{folder}: a folder without weight files that no registered model recognises (it holds: "
            f"{', '.join(names) or 'nothing'}). Pass a checkpoint file or a model component folder."
        )
    if len(found) > 1:
        raise DetectionError(f"{folder} is recognised by several models: {', '.join(s.name for s, _ in found)}.")
    spec, config = found[0]
    return DetectionResult(spec.name, spec.family, spec.role, "folder", None, config, "", (str(folder),))


def detect(
    path_or_paths: PathArg | Sequence[PathArg], *, model: str | None = None, format: str | None = None
) -> DetectionResult:
    """What the checkpoint ``path_or_paths`` is (a file, shards, a glob, or a model folder).

    Reads headers only. ``model`` / ``format`` restrict the candidates (to settle an ambiguity).
    Raises :class:`DetectionError` when the file matches no model or several, and
    :class:`~difforge.errors.LoadError` when it is unreadable or an incomplete set of shards.
    """
    if isinstance(path_or_paths, (str, PathLike)) and is_weightless_folder(path_or_paths):
        return detect_folder(Path(os.fspath(path_or_paths)).expanduser())
    return detect_header(read_checkpoint_header(path_or_paths), model=model, format=format)

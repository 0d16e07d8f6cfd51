"""From ``model_configs`` to filled pipeline slots: detection routing, diffusers folders, sources.

Everything here reads headers and folder listings only; weights are loaded after every required
slot is known to be filled, so a missing component fails before any heavy work.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._names import normalize_name, resolve
from ..errors import ConfigError, DetectionError
from ..specs import ModelSpec, PipelineSpec, SlotSpec

log = logging.getLogger(__name__)


@dataclass
class Component:
    """One detected component, routed to a slot."""

    slot: str
    spec: ModelSpec
    paths: list[str]
    detection: Any = None  # DetectionResult for weights; the tokenizer config for tokenizer folders
    model_config: Any = None

    @property
    def variant(self) -> str | None:
        return getattr(self.detection, "variant", None)


@dataclass
class Assembly:
    """What :func:`assemble` found: components by slot, plus a scheduler config from a diffusers folder."""

    pipeline: PipelineSpec
    components: dict[str, Component] = field(default_factory=dict)
    scheduler_from_folder: dict[str, Any] | None = None
    folder: str | None = None


def _model_config_cls() -> Any:
    from ..loading.model_config import ModelConfig

    return ModelConfig


def as_model_config(item: Any) -> Any:
    """A ``ModelConfig`` from a ModelConfig, a path string/Path, or a list of shard paths."""
    ModelConfig = _model_config_cls()
    if isinstance(item, ModelConfig):
        return item
    if isinstance(item, (str, os.PathLike)):
        return ModelConfig(path=str(item))
    if isinstance(item, Sequence) and item and all(isinstance(p, (str, os.PathLike)) for p in item):
        return ModelConfig(path=[str(p) for p in item])
    if isinstance(item, Mapping):
        return ModelConfig(**item)
    raise ConfigError(
        f"model_configs: cannot use {item!r}; give difforge.ModelConfig objects, paths, or lists of shard paths"
    )


def _local_folder(mc: Any) -> str | None:
    """The local folder a ModelConfig names, if it names exactly one folder."""
    path = getattr(mc, "path", None)
    if isinstance(path, (str, os.PathLike)) and Path(path).is_dir():
        return str(path)
    folder = getattr(mc, "folder", None)
    return str(folder) if folder else None


def is_diffusers_folder(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path) / "model_index.json").is_file()


def diffusers_folder_configs(spec: PipelineSpec, folder: str) -> list[Any]:
    """One ModelConfig per slot whose ``diffusers_subfolder`` exists in ``folder``."""
    ModelConfig = _model_config_cls()
    configs = []
    for slot in spec.slots:
        if slot.kind == "model" and slot.diffusers_subfolder and (Path(folder) / slot.diffusers_subfolder).is_dir():
            configs.append(ModelConfig(path=str(Path(folder) / slot.diffusers_subfolder)))
    if not configs:
        subs = sorted(p.name for p in Path(folder).iterdir() if p.is_dir())
        raise ConfigError(
            f"{folder} is a diffusers folder, but none of its subfolders ({', '.join(subs)}) is a component of "
            f"pipeline {spec.name!r} (expected {', '.join(s.diffusers_subfolder or s.name for s in spec.slots)})"
        )
    return configs


def scheduler_from_diffusers(folder: str, translate: Any = None) -> dict[str, Any] | None:
    """Translate ``scheduler/scheduler_config.json`` of a diffusers folder to a difforge scheduler choice
    (with ``translate(config, source=...)``, default :func:`translate_scheduler_config`)."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the scheduler config: {exc}") from exc
    return (translate or translate_scheduler_config)(cfg, source=str(path))


def translate_scheduler_config(cfg: Mapping[str, Any], source: str = "scheduler_config.json") -> dict[str, Any]:
    """Map a diffusers scheduler config to ``{"name": ..., **options}`` of a difforge scheduler."""
    cls = cfg.get("_class_name", "")
    if cls == "FlowMatchEulerDiscreteScheduler":
        out: dict[str, Any] = {"name": "flow-euler", "shift": float(cfg.get("shift", 1.0))}
        if cfg.get("use_dynamic_shifting"):
            out["dynamic_shift"] = True
            for ours, theirs in (
                ("base_shift", "base_shift"),
                ("max_shift", "max_shift"),
                ("base_image_seq_len", "base_image_seq_len"),
                ("max_image_seq_len", "max_image_seq_len"),
            ):
                if cfg.get(theirs) is not None:
                    out[ours] = cfg[theirs]
        if cfg.get("shift_terminal"):
            out["shift_terminal"] = float(cfg["shift_terminal"])
        if cfg.get("time_shift_type"):
            out["time_shift_type"] = cfg["time_shift_type"]
        if cfg.get("num_train_timesteps"):
            out["num_train_timesteps"] = int(cfg["num_train_timesteps"])
        return out
    if cls == "UniPCMultistepScheduler" and cfg.get("prediction_type") == "flow_prediction":
        out = {"name": "flow-unipc", "shift": float(cfg.get("flow_shift") or 1.0)}
        if cfg.get("solver_order"):
            out["solver_order"] = int(cfg["solver_order"])
        if cfg.get("num_train_timesteps"):
            out["num_train_timesteps"] = int(cfg["num_train_timesteps"])
        return out
    raise ConfigError(
        f"{source}: difforge has no equivalent of diffusers' {cls or 'unknown'} scheduler with this config; "
        f"pass scheduler='flow-euler' or 'flow-unipc' explicitly"
    )


def source_configs(spec: PipelineSpec, model_id: str | None = None, **overrides: Any) -> list[Any]:
    """ModelConfigs for a pipeline's default download sources (the variant whose model id matches
    ``model_id``, or the first variant listed)."""
    ModelConfig = _model_config_cls()
    if not spec.sources:
        raise ConfigError(f"pipeline {spec.name!r} declares no default download sources; pass model_configs")
    chosen = None
    if model_id is None:
        chosen = next(iter(spec.sources.values()))
    else:
        for sources in spec.sources.values():
            if any(s.model_id == model_id for s in sources):
                chosen = tuple(s for s in sources if s.model_id == model_id)
                break
    if chosen is None:
        return []
    configs = []
    for s in chosen:
        kw = dict(model_id=s.model_id, origin_file_pattern=s.origin_file_pattern)
        if s.download_source:
            kw["download_source"] = s.download_source
        kw.update(overrides)
        configs.append(ModelConfig(**kw))
    return configs


def _tokenizer_specs(registry: Any) -> list[ModelSpec]:
    return [s for s in registry.models if s.role == "tokenizer" and s.detect_folder is not None]


def detect_tokenizer(registry: Any, folder: str) -> tuple[ModelSpec, Any]:
    """The tokenizer ModelSpec recognising ``folder`` from its files (exactly one must)."""
    hits = []
    for spec in _tokenizer_specs(registry):
        config = resolve(spec.detect_folder)(folder)
        if config is not None:
            hits.append((spec, config))
    if len(hits) == 1:
        return hits[0]
    files = sorted(p.name for p in Path(folder).iterdir())[:12] if Path(folder).is_dir() else []
    if not hits:
        raise DetectionError(
            f"{folder}: not recognised as any known tokenizer (files: {', '.join(files) or 'none'}); "
            f"known tokenizers: {', '.join(s.name for s in _tokenizer_specs(registry)) or '(none installed)'}"
        )
    raise DetectionError(f"{folder}: recognised as several tokenizers ({', '.join(s.name for s, _ in hits)})")


def route(
    registry: Any,
    spec: PipelineSpec,
    model_configs: Sequence[Any],
    tokenizer_configs: Sequence[Any],
) -> dict[str, Component]:
    """Detect every config and put it in the slot that accepts its model (in the order given).

    Raises ConfigError for a component no slot takes, two components for one slot, or missing
    required slots, listing what was found.
    """
    from ..loading.detect import detect

    found: list[Component] = []
    for mc in model_configs:
        paths = [str(p) for p in mc.paths()]  # downloads if necessary
        if not paths and _local_folder(mc):  # a folder without weights: a tokenizer
            tokenizer_configs = [*tokenizer_configs, mc]
            continue
        forced = getattr(mc, "model", None)
        # ModelConfig.model also settles which component of a multi-component file is meant
        # (an SD single-file checkpoint holds the U-Net, the VAE and the text encoder)
        result = detect(_local_folder(mc) or paths, model=forced, format=getattr(mc, "format", None))
        if forced and normalize_name(result.model) != normalize_name(forced):
            log.info("ModelConfig.model=%r overrides the detected %r", forced, result.model)
        model_spec = registry.models.get(forced or result.model)
        found.append(Component(slot="", spec=model_spec, paths=paths, detection=result, model_config=mc))
    for tc in tokenizer_configs:
        if _local_folder(tc) is None:
            tc.paths()  # downloads if necessary
        folder = _local_folder(tc) or _download_folder(tc)
        tok_spec, tok_config = detect_tokenizer(registry, folder)
        found.append(Component(slot="", spec=tok_spec, paths=[folder], detection=tok_config, model_config=tc))

    slots: dict[str, Component] = {}
    unplaced: list[Component] = []
    for comp in found:
        target = _free_slot(spec.slots, comp.spec.name, slots)
        if target is None:
            unplaced.append(comp)
            continue
        comp.slot = target.name
        slots[target.name] = comp
    if unplaced:
        desc = ", ".join(f"{c.spec.name} ({c.paths[0]})" for c in unplaced)
        taken = ", ".join(f"{k}: {v.spec.name}" for k, v in slots.items()) or "none"
        raise ConfigError(
            f"pipeline {spec.name!r} has no free slot for {desc}. Its slots: "
            + "; ".join(f"{s.name} <- {'/'.join(s.models)}" for s in spec.slots)
            + f". Already filled: {taken}. Remove the extra file or use a pipeline that takes it."
        )
    missing = [s for s in spec.slots if s.required and s.name not in slots]
    if missing:
        have = "; ".join(f"{k}: {v.spec.name} from {v.paths[0]}" for k, v in slots.items()) or "nothing"
        need = "; ".join(f"{s.name} ({' or '.join(s.models)})" for s in missing)
        raise ConfigError(
            f"pipeline {spec.name!r} is missing required components: {need}. Found: {have}. "
            f"Add a ModelConfig (path=... or model_id=... + origin_file_pattern=...) for each; "
            f"tokenizers go in tokenizer_config."
        )
    return slots


def _free_slot(slots: Sequence[SlotSpec], model_name: str, taken: Mapping[str, Component]) -> SlotSpec | None:
    key = normalize_name(model_name)
    for slot in slots:
        if slot.name not in taken and key in {normalize_name(m) for m in slot.models}:
            return slot
    return None


def _download_folder(mc: Any) -> str:
    paths = [Path(p) for p in mc.paths()]
    if not paths:
        raise ConfigError(f"tokenizer_config {mc!r} resolved to no files")
    return os.path.commonpath([str(p if p.is_dir() else p.parent) for p in paths])

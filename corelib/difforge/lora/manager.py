"""The LoRA manager of a pipeline: ``pipe.load_lora`` / ``clear_lora`` / ``set_lora_scale`` / ``export_lora``.

One :class:`LoraManager` per pipeline (made on first use) tracks the loaded LoRAs by name. Each LoRA
is either fused (merged into the weights, no run-time cost, cleared exactly) or hot (forward hooks);
both kinds can be active together, and several LoRAs may touch one layer.

Settings a LoRA carries. A LoRA may set the pipeline's scheduler (``scheduler=`` of ``load_lora``, or
the file's ``difforge.scheduler`` metadata: a scheduler name or ``{"name": ..., **options}`` as JSON)
and call defaults (``difforge.call_defaults`` metadata: a JSON object such as
``{"num_inference_steps": 8, "cfg_scale": 1.0}``). The argument wins over the metadata
(``scheduler=False`` ignores the metadata's). Clearing the LoRA puts back what the pipeline had
before it -- unless the setting was changed since (``set_scheduler``), which is then left alone.

Offload changes. ``pipe.set_offload`` runs inside :func:`offload_change`: fused LoRAs are taken out
of the weights first, so the offload backends see (and restore) the original weights, and are put
back afterwards -- fused where the new backends leave the weights fusable, else hot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .._names import normalize_name
from ..errors import ConfigError, ConversionError
from .formats import (
    CALL_DEFAULTS_KEY,
    SCHEDULER_KEY,
    LoraFile,
    export_converter,
    from_own,
    match_converters,
    read_lora,
    save_lora,
    to_own,
)
from .layers import FusedWeight, HotLayer, LoraDelta, fuse_problem, make_delta

log = logging.getLogger(__name__)

__all__ = ["LoadedLora", "LoraManager", "lora_manager", "offload_change"]

_SHOWN = 12


@dataclass
class LoadedLora:
    """A LoRA active on a pipeline: its deltas per component slot, scale and mode."""

    name: str
    source: str
    formats: dict[str, str]  # slot -> source format
    deltas: dict[str, dict[str, LoraDelta]]  # slot -> module -> delta
    scale: float
    fused: bool
    fuse_request: bool | None = None  # the fuse= it was loaded with (re-decided when offload changes)
    scheduler: str | dict[str, Any] | None = None  # the scheduler it set, as an argument
    call_defaults: dict[str, Any] | None = None  # the call defaults it set
    _restore: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False)  # kind -> (before, ours)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "scale": self.scale, "fused": self.fused,
            "modules": {slot: len(d) for slot, d in self.deltas.items()}, "formats": dict(self.formats),
            "scheduler": self.scheduler, "call_defaults": self.call_defaults,
        }


def lora_manager(pipe: Any) -> LoraManager:
    """The pipeline's LoRA manager (made on first use)."""
    manager = pipe.__dict__.get("_lora_manager")
    if manager is None:
        manager = pipe.__dict__["_lora_manager"] = LoraManager(pipe)
    return manager


@contextlib.contextmanager
def offload_change(pipe: Any) -> Iterator[None]:
    """Around a change of ``pipe``'s offload backends (``Pipeline.set_offload``): fused LoRAs are lifted
    out of the weights and put back afterwards, fused or hot as the new backends allow (see the module
    docstring). Does nothing for a pipeline without LoRAs."""
    manager = pipe.__dict__.get("_lora_manager")
    if manager is None or not manager.loras:
        yield
        return
    with manager.offload_change():
        yield


_UNSET = object()  # "the pipeline had no call_defaults of its own" (it used the class's)


def _listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_SHOWN])
    return shown + (f"; ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


class LoraManager:
    """LoRAs on one pipeline's components (see the module docstring)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.loras: dict[str, LoadedLora] = {}
        self._fused: dict[tuple[str, str], FusedWeight] = {}
        self._hot: dict[tuple[str, str], HotLayer] = {}

    # ------------------------------------------------------------ what the pipeline holds

    def _models(self) -> dict[str, tuple[nn.Module, str]]:
        """``{slot: (module, ModelSpec name)}`` of the detected torch components."""
        out = {}
        for slot, module in self.pipe.components.items():
            model = getattr(self.pipe.detections.get(slot), "model", None)
            if isinstance(module, nn.Module) and model is not None:
                out[slot] = (module, model)
        return out

    def _targets(self, target: str | Sequence[str] | None, models: dict[str, Any]) -> list[str] | None:
        if target is None or target == "all":
            return None
        slots = [target] if isinstance(target, str) else list(target)
        if slots == ["dit"] and "dit" not in models:  # the default names the denoiser, whatever its slot (a U-Net's "unet")
            slots = [s for s in self.pipe.denoiser_slots() if s in models] or slots
        unknown = [s for s in slots if s not in models]
        if unknown:
            raise ConfigError(
                f"load_lora: target {', '.join(map(repr, unknown))} is not a model component of pipeline "
                f"{self.pipe.spec.name!r}; choose from {', '.join(models)}, or 'all'"
            )
        return slots

    # ------------------------------------------------------------ load

    def load(
        self,
        source: Any,
        scale: float = 1.0,
        fuse: bool | None = None,
        target: str | Sequence[str] | None = "dit",
        name: str | None = None,
        strict: bool = True,
        scheduler: Any = None,
    ) -> str:
        """Load a LoRA (path, list of paths, ``ModelConfig`` or state dict); returns its name.

        ``target``: component slot(s) to apply it to (``"dit"``; ``"all"``/None: every component the
        file has weights for). ``fuse``: True merges into the weights, False adds hooks, None fuses
        unless an offload backend is active. ``strict``: unknown or mismatched keys are an error;
        with False they are skipped with a warning giving the counts. ``scheduler``: a scheduler name
        or ``{"name": ..., **options}`` the pipeline uses while the LoRA is loaded; None takes the
        file's ``difforge.scheduler`` metadata if it has one, False ignores that metadata.
        """
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ConfigError(f"load_lora: scale must be a number, got {scale!r}")
        if not (scheduler is None or scheduler is False or isinstance(scheduler, (str, Mapping))):
            raise ConfigError(
                f"load_lora: scheduler must be a scheduler name, a dict {{'name': ..., **options}}, None (the "
                f"LoRA's metadata decides) or False (ignore it), got {scheduler!r}"
            )
        models = self._models()
        slots = self._targets(target, models)
        lora = read_lora(source)
        name = self._name(name, lora)
        carried_scheduler, carried_defaults = self._carried(lora, scheduler)
        converters = match_converters(lora, sorted({m for _, m in models.values()}))

        deltas: dict[str, dict[str, LoraDelta]] = {}
        formats: dict[str, str] = {}
        problems: list[str] = []
        claimed: set[str] = set()
        skipped_slots: dict[str, int] = {}
        for model_name, conv in converters.items():
            groups, keys = to_own(lora, conv)
            claimed.update(keys)
            for slot in (s for s, (_, m) in models.items() if normalize_name(m) == normalize_name(model_name)):
                if slots is not None and slot not in slots:
                    skipped_slots[slot] = len(keys)
                    continue
                module = models[slot][0]
                for mod_name, group in groups.items():
                    delta = make_delta(module, mod_name, group)
                    if isinstance(delta, str):
                        problems.append(f"{slot}: {delta}")
                    else:
                        deltas.setdefault(slot, {})[mod_name] = delta
                formats[slot] = conv.source_format
        unknown = [k for k in lora.tensors if k not in claimed]
        self._report(lora, name, deltas, problems, unknown, skipped_slots, strict, slots)

        fused = self._decide_fuse(fuse, deltas, models)
        entry = LoadedLora(name, lora.label, formats, deltas, float(scale), fused, fuse)
        self._set_settings(entry, carried_scheduler, carried_defaults)  # a bad scheduler fails before the weights change
        try:
            self._apply(entry, models)
        except BaseException:
            self._restore_settings(entry)
            raise
        self.loras[name] = entry
        log.info(
            "LoRA %r (%s) loaded %s at scale %g: %s", name, ", ".join(sorted(set(formats.values()))),
            "fused" if fused else "hot", scale, ", ".join(f"{len(d)} modules of {s}" for s, d in deltas.items()),
        )
        return name

    def _name(self, name: str | None, lora: LoraFile) -> str:
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"load_lora: name must be a non-empty string, got {name!r}")
            if name in self.loras:
                raise ConfigError(
                    f"load_lora: a LoRA named {name!r} is loaded already; clear_lora({name!r}) first or pick another name"
                )
            return name
        base = Path(lora.files[0]).stem if lora.files else "lora"
        name, i = base, 1
        while name in self.loras:
            i += 1
            name = f"{base}-{i}"
        return name

    def _carried(self, lora: LoraFile, scheduler: Any) -> tuple[Any, dict[str, Any] | None]:
        """The scheduler (argument over metadata) and call defaults (metadata) the LoRA sets."""

        def meta(key: str) -> Any:
            raw = lora.metadata.get(key)
            if raw is None:
                return None
            try:
                return json.loads(raw)
            except ValueError as exc:
                if key == SCHEDULER_KEY and re.fullmatch(r"[\w.@-]+", raw.strip()):
                    return raw.strip()  # a bare scheduler name, written without JSON quotes
                raise ConfigError(
                    f"LoRA {lora.label}: its metadata {key!r} is not JSON ({exc}): {raw[:80]!r}; fix the file's "
                    "metadata (or pass scheduler=False to ignore a scheduler entry)"
                ) from None

        from_meta = None if scheduler is False else meta(SCHEDULER_KEY)
        if from_meta is not None and not isinstance(from_meta, (str, Mapping)):
            raise ConfigError(
                f"LoRA {lora.label}: metadata {SCHEDULER_KEY!r} must be a scheduler name or an object "
                f"{{\"name\": ..., ...}}, got {from_meta!r}; pass scheduler=False to ignore it"
            )
        if isinstance(scheduler, (str, Mapping)):
            if from_meta is not None and from_meta != scheduler:
                log.info("LoRA %s: scheduler=%r given; its metadata's %r is not used", lora.label, scheduler, from_meta)
            chosen = scheduler
        else:
            chosen = from_meta
        defaults = meta(CALL_DEFAULTS_KEY)
        if defaults is not None and not (isinstance(defaults, Mapping) and all(isinstance(k, str) for k in defaults)):
            raise ConfigError(
                f"LoRA {lora.label}: metadata {CALL_DEFAULTS_KEY!r} must be a JSON object of call arguments, got {defaults!r}"
            )
        return chosen, (dict(defaults) if defaults is not None else None)

    # ------------------------------------------------------------ settings carried by LoRAs

    def _current(self, kind: str) -> Any:
        if kind == "scheduler":
            return (self.pipe.scheduler, self.pipe.scheduler_choice)
        return self.pipe.__dict__.get("call_defaults", _UNSET)

    @staticmethod
    def _token(kind: str, state: Any) -> Any:
        """The object whose identity says which setting is in force (the scheduler object, the dict)."""
        return state[0] if kind == "scheduler" else state

    def _put(self, kind: str, state: Any) -> None:
        if kind == "scheduler":
            self.pipe.scheduler, self.pipe.scheduler_choice = state
        elif state is _UNSET:
            self.pipe.__dict__.pop("call_defaults", None)
        else:
            self.pipe.call_defaults = state

    def _set_settings(self, entry: LoadedLora, scheduler: Any, defaults: dict[str, Any] | None) -> None:
        if scheduler is not None:
            before = self._current("scheduler")
            self.pipe.set_scheduler(scheduler)
            entry.scheduler = dict(scheduler) if isinstance(scheduler, Mapping) else scheduler  # as given: export writes it
            entry._restore["scheduler"] = (before, self._current("scheduler"))
            log.info("LoRA %r sets the scheduler to %r (cleared with it)", entry.name, entry.scheduler)
        if defaults is not None:
            before = self._current("call_defaults")
            ours = {**(self.pipe.call_defaults or {}), **defaults}
            self.pipe.call_defaults = ours
            entry.call_defaults = dict(defaults)
            entry._restore["call_defaults"] = (before, ours)
            log.info("LoRA %r sets call defaults %s (cleared with it)", entry.name, defaults)

    def _restore_settings(self, entry: LoadedLora) -> None:
        """Undo ``entry``'s settings: in force -> what was before it; under a later LoRA's -> that LoRA
        restores to what was before ``entry``; changed by hand since -> left alone."""
        for kind, (before, ours) in entry._restore.items():
            mine = self._token(kind, ours)
            above = next(
                (e for e in self.loras.values() if e is not entry and kind in e._restore
                 and self._token(kind, e._restore[kind][0]) is mine),
                None,
            )  # fmt: skip
            if above is not None:
                above._restore[kind] = (before, above._restore[kind][1])
            elif self._token(kind, self._current(kind)) is mine:
                self._put(kind, before)
                log.info("LoRA %r cleared: the pipeline's %s restored", entry.name, kind.replace("_", " "))
            else:
                log.info(
                    "LoRA %r cleared: the pipeline's %s was changed after it was loaded and is left as it is",
                    entry.name, kind.replace("_", " "),
                )
        entry._restore.clear()

    def _report(
        self,
        lora: LoraFile,
        name: str,
        deltas: dict[str, dict[str, LoraDelta]],
        problems: list[str],
        unknown: list[str],
        skipped_slots: dict[str, int],
        strict: bool,
        slots: list[str] | None,
    ) -> None:
        if skipped_slots:
            log.warning(
                "LoRA %r also has weights for %s, which target=%s leaves out; pass target='all' (or a list of "
                "slots) to apply them", name, ", ".join(f"{s} ({n} tensors)" for s, n in skipped_slots.items()),
                "+".join(slots or ()),
            )
        if slots is not None and not deltas and not problems:
            raise ConversionError(
                f"LoRA {lora.label} has no weights for {', '.join(slots)}"
                + (f"; it has weights for {', '.join(skipped_slots)}: pass target='all'" if skipped_slots else "")
            )
        applied = sum(len(d) for d in deltas.values())
        if strict and (unknown or problems):
            lines = ([f"{len(unknown)} key(s) no converter understands: {_listing(unknown)}"] if unknown else []) + (
                [f"{len(problems)} module(s) that do not fit the model: {_listing(problems)}"] if problems else []
            )
            raise ConversionError(
                f"LoRA {lora.label}: " + ". ".join(lines)
                + ". Is it a LoRA for another model or variant? load_lora(..., strict=False) skips these and "
                "applies the rest."
            )
        if not applied:
            raise ConversionError(
                f"LoRA {lora.label}: nothing to apply ({len(unknown)} unknown keys, {len(problems)} mismatched modules)"
            )
        if unknown or problems:
            log.warning(
                "LoRA %r: applied %d module(s); skipped %d unknown key(s) and %d mismatched module(s): %s",
                name, applied, len(unknown), len(problems), _listing(unknown + problems),
            )

    def _decide_fuse(self, fuse: bool | None, deltas: dict[str, dict[str, LoraDelta]], models: dict[str, Any]) -> bool:
        reasons = [r for slot, d in deltas.items() for m in d if (r := fuse_problem(models[slot][0], m))]
        if fuse is None:
            return not self.pipe.offload_choices and not reasons
        if fuse and reasons:
            raise ConfigError(
                f"load_lora(fuse=True): {reasons[0]}{f' (and {len(reasons) - 1} more)' if len(reasons) > 1 else ''}; "
                "a fused LoRA needs the weights in memory in a floating dtype of at least 16 bits. Use fuse=False "
                "(hot: the LoRA runs beside the layer, the default when offload backends are active)"
            )
        return bool(fuse)

    def _apply(self, entry: LoadedLora, models: dict[str, tuple[nn.Module, str]]) -> None:
        done: list[tuple[str, str]] = []
        try:
            for slot, deltas in entry.deltas.items():
                module = models[slot][0]
                for mod_name, delta in deltas.items():
                    key = (slot, mod_name)
                    table, kind = (self._fused, FusedWeight) if entry.fused else (self._hot, HotLayer)
                    holder = table.get(key) or kind(module.get_submodule(mod_name), f"{slot}.{mod_name}")
                    table[key] = holder
                    holder.set(entry.name, delta, entry.scale)
                    done.append(key)
        except BaseException:
            self._unapply(entry, done)
            raise

    def _unapply(self, entry: LoadedLora, keys: Sequence[tuple[str, str]]) -> None:
        table = self._fused if entry.fused else self._hot
        for key in keys:
            holder = table.get(key)
            if holder is None:
                continue
            holder.set(entry.name, None)
            if not holder.deltas:
                del table[key]
                if isinstance(holder, HotLayer):
                    holder.remove()

    # ------------------------------------------------------------ change and clear

    def _get(self, name: str) -> LoadedLora:
        if name not in self.loras:
            raise ConfigError(f"no LoRA named {name!r} is loaded; loaded: {', '.join(self.loras) or '(none)'}")
        return self.loras[name]

    def set_scale(self, name: str, scale: float) -> None:
        """Change a loaded LoRA's scale (a fused one is re-merged from the original weights)."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ConfigError(f"set_lora_scale: scale must be a number, got {scale!r}")
        entry = self._get(name)
        entry.scale = float(scale)
        table = self._fused if entry.fused else self._hot
        for slot, deltas in entry.deltas.items():
            for mod_name, delta in deltas.items():
                table[(slot, mod_name)].set(name, delta, entry.scale)

    def clear(self, name: str | None = None) -> None:
        """Remove one LoRA (``name``) or all; fused weights get their original bits back."""
        names = list(self.loras) if name is None else [self._get(name).name]
        for n in reversed(names):
            entry = self.loras[n]
            self._unapply(entry, [(slot, m) for slot, d in entry.deltas.items() for m in d])
            self._restore_settings(entry)
            del self.loras[n]
            log.info("LoRA %r cleared", n)

    # ------------------------------------------------------------ offload changes

    def _mode(self, entry: LoadedLora, models: dict[str, tuple[nn.Module, str]]) -> bool:
        """Whether ``entry`` should be fused under the pipeline's current offload backends."""
        if entry.fuse_request is False:
            return False
        reasons = [r for slot, d in entry.deltas.items() for m in d if (r := fuse_problem(models[slot][0], m))]
        if reasons:
            if entry.fuse_request:
                log.warning(
                    "LoRA %r (loaded with fuse=True) runs hot now: %s%s", entry.name, reasons[0],
                    f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else "",
                )
            return False
        return bool(entry.fuse_request) or not self.pipe.offload_choices

    @contextlib.contextmanager
    def offload_change(self) -> Iterator[None]:
        """Fused LoRAs out of the weights for the body (an offload change), then back, fused or hot."""
        lifted = [e for e in self.loras.values() if e.fused]
        for entry in reversed(lifted):
            self._unapply(entry, [(slot, m) for slot, d in entry.deltas.items() for m in d])
        try:
            yield
        finally:
            models = self._models()
            for entry in self.loras.values():  # load order: fused weights are summed as before
                want = self._mode(entry, models)
                was_lifted = entry in lifted
                if not was_lifted and (entry.fused or not want):
                    continue  # hot and staying hot
                if not was_lifted:  # hot -> fused
                    self._unapply(entry, [(slot, m) for slot, d in entry.deltas.items() for m in d])
                if want != entry.fused:
                    log.info("LoRA %r is %s now (offload: %s)", entry.name, "fused" if want else "hot",
                             ", ".join(c.name for c in self.pipe.offload_choices) or "none")  # fmt: skip
                entry.fused = want
                self._apply(entry, models)

    # ------------------------------------------------------------ export

    def export(self, name: str, path: str | os.PathLike[str], format: str = "diffusers") -> Path:  # noqa: A002
        """Write LoRA ``name`` (as loaded: scale 1) in ``format`` to ``path``; returns the path."""
        entry = self._get(name)
        models = self._models()
        out: dict[str, Any] = {}
        with_alpha = any(d.alpha is not None for deltas in entry.deltas.values() for d in deltas.values())
        for slot, deltas in entry.deltas.items():
            converter = export_converter(models[slot][1], format)
            groups = {m: d.own_group(with_alpha) for m, d in deltas.items()}
            for key, value in from_own(groups, converter, f"LoRA {name!r} ({slot})").items():
                if key in out:
                    raise ConversionError(f"export_lora: two components write {key!r} in format {format!r}")
                out[key] = value
        carried = {}
        if entry.scheduler is not None:
            carried[SCHEDULER_KEY] = json.dumps(entry.scheduler)
        if entry.call_defaults is not None:
            carried[CALL_DEFAULTS_KEY] = json.dumps(entry.call_defaults)
        written = save_lora(out, path, format, carried)
        log.info("LoRA %r exported to %s (%s, %d tensors)", name, written, format, len(out))
        return written

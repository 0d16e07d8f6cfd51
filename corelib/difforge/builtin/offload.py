"""The core's location offload backends: ``cpu``, ``sequential`` and ``disk``.

Each is an :class:`~difforge.specs.OffloadSpec` ``apply(pipeline, options) -> handle``; the handle's
``remove()`` puts every tensor object back where it was. Nothing is patched globally: the backends
work with removable forward hooks on the pipeline's own modules.

- ``cpu`` (model level): every component lives on ``offload_device`` and moves to the compute device
  when one of its modules runs, moving the previously active component out (one component on the
  compute device at a time, in ``PipelineSpec.component_order``).
- ``sequential``: the tensors are kept on ``offload_device`` (pinned on CUDA) and each *unit* -- a
  transformer block of the ``ModelSpec.layout``, or any other module's own tensors -- is copied to the
  compute device for its forward and dropped after it. On CUDA the next block is prefetched on a
  side stream while the current one computes.
- ``disk``: tensors are not kept in memory at all; each unit is read from the checkpoint files
  (plain reads, no memory map, so resident memory is about one block plus activations) for its forward.
  A tensor that is not its checkpoint tensor (an fp8 weight, a scale, a non-persistent buffer) is
  written once to a scratch safetensors file in ``offload_dir`` and read from there, unless it carries
  a :data:`SOURCE_ATTR` reader (``fp8`` followed by ``disk`` spills its weights to a file of its own
  as it casts them, so the fp8 weights are never all in memory at once).

Between forwards, the modules of ``sequential``/``disk`` hold meta placeholders (shapes and dtypes
kept); the handles' :meth:`_StreamingOffload.materialised` says which units hold real tensors.
``vram_limit``/``vram_buffer`` (GiB) keep as many units resident on the compute device (for ``disk``
on a CPU: in RAM) as ``vram_limit - vram_buffer`` allows (non-block units first, then blocks in
forward order), and stream only the rest.
A forward that raises leaves nothing materialised (the release hooks are ``always_call``).

:func:`checkpoint_loaders` (which tensors of a loaded module can be re-read from its checkpoint,
and how) is public: dtype backends such as ``fp8`` use it to avoid faulting in memory-mapped weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, LoadError
from ..loading.safetensors_header import SafetensorsHeader, read_header
from ..loading.safetensors_header import torch_dtype as _st_dtype
from ..loading.state_dict import SAFETENSORS_SUFFIXES, Checkpoint, read_checkpoint_header, save_safetensors
from ..specs import BlockLayout

log = logging.getLogger(__name__)

__all__ = [
    "LOCATION_MARK", "SOURCE_ATTR", "FileReader", "apply_cpu", "apply_sequential", "apply_disk", "checkpoint_loaders",
    "located_slots",
    "offload_from_model_configs", "offload_units",
]

_GIB = 1 << 30
LOCATION_MARK = "_difforge_location_offload"
"""Set in the ``__dict__`` of every component a location backend holds (its value: the backend's name)."""
SOURCE_ATTR = "_difforge_source"
"""A tensor attribute: a callable returning the tensor's values as a new CPU tensor. ``disk`` re-reads such a
tensor through it instead of writing it to its scratch file (dtype backends set it on weights they already
spilled to a file of their own)."""


# ---------------------------------------------------------------- units: what moves together


@dataclass(eq=False)
class _Slot:
    """One parameter or buffer entry of a module: ``owner._parameters[name]`` (or ``_buffers``)."""

    owner: nn.Module
    name: str
    key: str  # dotted name inside the component (its state-dict key)
    is_param: bool
    original: torch.Tensor
    placeholder: torch.Tensor = field(init=False)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        meta = torch.empty_like(self.original, device="meta")
        self.placeholder = nn.Parameter(meta, requires_grad=False) if self.is_param else meta
        self.nbytes = self.original.numel() * self.original.element_size()

    def put(self, value: torch.Tensor) -> None:
        if self.is_param:
            if not isinstance(value, nn.Parameter):
                value = nn.Parameter(value, requires_grad=False)
            self.owner._parameters[self.name] = value
        else:
            self.owner._buffers[self.name] = value


@dataclass(eq=False)
class _Unit:
    """Tensors materialised together: a transformer block, or one module's own tensors."""

    name: str
    module: nn.Module
    slots: list[_Slot]
    is_block: bool
    resident: bool = False
    live: bool = False

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in _unique(self.slots).values())


def _unique(slots: Iterable[_Slot]) -> dict[int, _Slot]:
    """The first slot of every distinct tensor object (tied weights are handled once)."""
    seen: dict[int, _Slot] = {}
    for s in slots:
        seen.setdefault(id(s.original), s)
    return seen


def _slots(module: nn.Module, prefix: str, recurse: bool) -> list[_Slot]:
    out = []
    for sub_name, sub in module.named_modules() if recurse else [("", module)]:
        base = ".".join(p for p in (prefix, sub_name) if p)
        for store, is_param in ((sub._parameters, True), (sub._buffers, False)):
            for name, tensor in store.items():
                if tensor is not None:
                    out.append(_Slot(sub, name, f"{base}.{name}" if base else name, is_param, tensor))
    return out


def offload_units(component: nn.Module, layout: BlockLayout | None) -> list[_Unit]:
    """The units of ``component``: every module outside the blocks that owns tensors (its own only:
    layer by layer), then the blocks of ``layout`` in forward order (everything inside each)."""
    blocks: list[tuple[str, nn.Module]] = []
    for group in layout.groups if layout is not None else ():
        try:
            container = component.get_submodule(group.path)
        except AttributeError:
            raise ConfigError(
                f"block layout path {group.path!r} does not exist in {type(component).__name__}; "
                "the model plugin's ModelSpec.layout names a module list that is not there"
            ) from None
        blocks.extend((f"{group.path}.{i}", block) for i, block in enumerate(container))
    inside = {id(m) for _, block in blocks for m in block.modules()}
    units = []
    for name, module in component.named_modules():
        if id(module) not in inside and (slots := _slots(module, name, recurse=False)):
            units.append(_Unit(name or "<root>", module, slots, is_block=False))
    units.extend(_Unit(name, block, _slots(block, name, recurse=True), is_block=True) for name, block in blocks)
    return units


# ---------------------------------------------------------------- options and pipeline helpers


def _device(value: Any, option: str, backend: str) -> torch.device:
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(f"offload backend {backend!r}: option {option}={value!r} is not a device; use e.g. 'cpu' or 'cuda:0'") from None


def _bool(options: dict[str, Any], name: str, backend: str) -> bool:
    value = options[name]
    if not isinstance(value, bool):
        raise ConfigError(f"offload backend {backend!r}: option {name} must be true or false, got {value!r}")
    return value


def _budget(options: dict[str, Any], backend: str) -> int | None:
    """Bytes that may stay resident (``vram_limit - vram_buffer`` GiB); None for no limit."""
    limit, buffer = options.get("vram_limit"), options.get("vram_buffer") or 0.0
    for name, value in (("vram_limit", limit), ("vram_buffer", buffer)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"offload backend {backend!r}: option {name} must be a number of GiB >= 0, got {value!r}")
    return None if limit is None else max(0, int((limit - buffer) * _GIB))


def _components(pipe: Any, backend: str, wanted: Any = None) -> dict[str, nn.Module]:
    """The pipeline's torch components in ``component_order`` (then the rest), only those named in ``wanted``
    (the ``components`` option) when it is given; none may be offloaded yet."""
    models = {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}
    if wanted is not None:
        if isinstance(wanted, str) or not all(isinstance(w, str) for w in wanted):
            raise ConfigError(f"offload backend {backend!r}: option components must be a list of component names, got {wanted!r}")
        unknown = sorted(set(wanted) - set(models))
        if unknown:
            raise ConfigError(
                f"offload backend {backend!r}: no model component {', '.join(map(repr, unknown))}; "
                f"the components are {', '.join(models)}"
            )
        models = {k: v for k, v in models.items() if k in wanted}
    order = [s for s in getattr(pipe.spec, "component_order", ()) if s in models]
    order += [s for s in models if s not in order]
    for slot in order:
        other = models[slot].__dict__.get(LOCATION_MARK)
        if other is not None:
            raise ConfigError(
                f"offload backend {backend!r}: component {slot!r} is already offloaded by {other!r}; use one "
                "location backend (cpu, sequential or disk) per pipeline, after dtype backends: offload=['fp8', 'disk']"
            )
    return {s: models[s] for s in order}


def _layout(pipe: Any, slot: str) -> BlockLayout | None:
    spec = pipe._model_spec(slot) if hasattr(pipe, "_model_spec") else None
    return getattr(spec, "layout", None)


def _has_tensors(module: nn.Module) -> bool:
    return any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))


# ---------------------------------------------------------------- cpu: model-level offload


class ModelOffload:
    """``cpu``: one component on the compute device at a time, moved in when one of its modules runs
    (whatever the entry point: ``forward``, ``encode``, ``decode``) and moved out when another's does.

    A component that raised stays on the compute device until another one runs, as after a normal
    forward; ``remove()`` puts every tensor back on the device it had before.
    """

    def __init__(self, pipe: Any, options: dict[str, Any]) -> None:
        self.device = torch.device(pipe.device)
        self.offload_device = _device(options["offload_device"], "offload_device", "cpu")
        self.components = _components(pipe, "cpu", options.get("components"))
        self.active: str | None = None
        self._devices = {slot: [(t, t.device) for t in _tensors(m)] for slot, m in self.components.items()}
        self._hooks: list[Any] = []
        for slot, module in self.components.items():
            module.to(self.offload_device)
            module.__dict__[LOCATION_MARK] = "cpu"
            for sub in module.modules():
                if _has_tensors(sub):
                    self._hooks.append(sub.register_forward_pre_hook(self._enter_hook(slot), prepend=True))
        log.info("cpu offload: %s live on %s, each moved to %s for its turn", ", ".join(self.components), self.offload_device, self.device)

    def _enter_hook(self, slot: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if self.active != slot:
                self.activate(slot)

        return hook

    def activate(self, slot: str | None) -> None:
        """Move the active component out and ``slot`` (None: nothing) in."""
        if self.active is not None:
            self.components[self.active].to(self.offload_device)
            self.active = None
        if slot is not None:
            self.components[slot].to(self.device)
            self.active = slot

    def stats(self) -> dict[str, Any]:
        return {"active": self.active, "order": list(self.components)}

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.active = None
        for slot, module in self.components.items():
            for tensor, device in self._devices[slot]:
                if tensor.device != device:
                    tensor.data = tensor.data.to(device)
            module.__dict__.pop(LOCATION_MARK, None)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


# ---------------------------------------------------------------- streaming: sequential and disk


class _StreamingOffload:
    """Units materialised on the compute device by a forward pre-hook and released by an
    ``always_call`` forward hook. Subclasses say where a unit's tensors come from (:meth:`_fetch`)."""

    backend = ""

    def __init__(self, pipe: Any, options: dict[str, Any]) -> None:
        self.device = torch.device(pipe.device)
        self.budget = _budget(options, self.backend)
        self.components = _components(pipe, self.backend, options.get("components"))
        self.units: dict[str, list[_Unit]] = {}
        self._next: dict[int, _Unit | None] = {}  # id(block unit) -> the block that runs after it
        self._hooks: list[Any] = []
        try:
            for slot, module in self.components.items():
                units = offload_units(module, _layout(pipe, slot))
                self._prepare(slot, module, units)
                self.units[slot] = units
                module.__dict__[LOCATION_MARK] = self.backend
                for unit in units:
                    for s in unit.slots:
                        s.put(s.placeholder)
                blocks = [u for u in units if u.is_block]
                self._next.update({id(u): nxt for u, nxt in zip(blocks, [*blocks[1:], None])})
            self._place_residents()
            for unit in self.all_units():
                if not unit.resident:
                    self._hooks.append(unit.module.register_forward_pre_hook(self._pre_hook(unit), prepend=True))
                    self._hooks.append(unit.module.register_forward_hook(self._post_hook(unit), always_call=True))
        except BaseException:
            self.remove()
            raise
        stats = self.stats()
        log.info(
            "%s offload: %d units, %.3f GiB, %.3f GiB resident on %s",
            self.backend, stats["units"], stats["bytes"] / _GIB, stats["resident_bytes"] / _GIB, self.device,
        )

    # -- what a backend implements

    def _prepare(self, slot: str, module: nn.Module, units: list[_Unit]) -> None:
        """Record where the tensors of ``units`` will come from (called before placeholders go in)."""

    def _fetch(self, unit: _Unit) -> list[torch.Tensor]:
        """The unit's tensors on the compute device, in ``unit.slots`` order."""
        raise NotImplementedError

    def _restore(self, slot: _Slot) -> None:
        """Make ``slot.original`` hold its values on its original device again (for ``remove``)."""

    # -- the machinery

    def all_units(self) -> list[_Unit]:
        return [u for units in self.units.values() for u in units]

    def _place_residents(self) -> None:
        if self.budget is None:
            return
        left = self.budget
        for unit in sorted(self.all_units(), key=lambda u: u.is_block):  # stable: non-block units, then blocks in order
            if unit.nbytes <= left:
                left -= unit.nbytes
                self._materialise(unit)
                unit.resident = True

    def _materialise(self, unit: _Unit) -> None:
        if unit.live:
            return
        values = self._fetch(unit)  # all or nothing: nothing is assigned when a read fails
        for s, value in zip(unit.slots, values):
            s.put(value)
        unit.live = True

    def _release(self, unit: _Unit) -> None:
        if unit.live and not unit.resident:
            for s in unit.slots:
                s.put(s.placeholder)
            unit.live = False

    def _pre_hook(self, unit: _Unit) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._materialise(unit)

        return hook

    def _post_hook(self, unit: _Unit) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._release(unit)

        return hook

    def materialised(self) -> list[str]:
        """``"component:unit"`` of every unit holding real tensors now (resident ones included)."""
        return [f"{slot}:{u.name}" for slot, units in self.units.items() for u in units if u.live]

    def stats(self) -> dict[str, Any]:
        units = self.all_units()
        return {
            "units": len(units),
            "bytes": sum(u.nbytes for u in units),
            "resident_units": sum(u.resident for u in units),
            "resident_bytes": sum(u.nbytes for u in units if u.resident),
            "materialised": self.materialised(),
        }

    def remove(self) -> None:
        """Drop the hooks and put every original tensor object back, holding its values."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for unit in self.all_units():
            unit.live = unit.resident = False
        for s in _unique(s for u in self.all_units() for s in u.slots).values():
            self._restore(s)
        for unit in self.all_units():
            for s in unit.slots:
                s.put(s.original)
        for module in self.components.values():
            module.__dict__.pop(LOCATION_MARK, None)
        self.units.clear()
        self._close()

    def _close(self) -> None:
        """Free what the backend holds besides the modules (files, streams)."""


class SequentialOffload(_StreamingOffload):
    """``sequential``: tensors kept on ``offload_device`` (pinned for CUDA), copied unit by unit."""

    backend = "sequential"

    def __init__(self, pipe: Any, options: dict[str, Any]) -> None:
        device = torch.device(pipe.device)
        self.offload_device = _device(options["offload_device"], "offload_device", self.backend)
        cuda = device.type == "cuda"
        self.pin = _bool(options, "pin_memory", self.backend) and cuda and self.offload_device.type == "cpu"
        self.prefetch = _bool(options, "prefetch", self.backend) and cuda
        self._stream = torch.cuda.Stream(device) if self.prefetch else None
        self._pending: dict[int, tuple[Any, list[torch.Tensor]]] = {}
        self._moved: dict[int, torch.device] = {}
        super().__init__(pipe, options)

    def _prepare(self, slot: str, module: nn.Module, units: list[_Unit]) -> None:
        for s in _unique(s for u in units for s in u.slots).values():
            t = s.original
            if t.device != self.offload_device or (self.pin and not t.is_pinned()):
                self._moved[id(t)] = t.device
                data = t.data.to(self.offload_device)
                t.data = data.pin_memory() if self.pin else data

    def _copy(self, unit: _Unit) -> list[torch.Tensor]:
        done: dict[int, torch.Tensor] = {}
        for s in unit.slots:
            if id(s.original) not in done:
                done[id(s.original)] = s.original.detach().to(self.device, non_blocking=self.pin)
        return [done[id(s.original)] for s in unit.slots]

    def _fetch(self, unit: _Unit) -> list[torch.Tensor]:
        pending = self._pending.pop(id(unit), None)
        if pending is None:
            values = self._copy(unit)
        else:
            event, values = pending
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for v in values:
                v.record_stream(stream)
        nxt = self._next.get(id(unit))
        if self._stream is not None and nxt is not None and not nxt.live and id(nxt) not in self._pending:
            with torch.cuda.stream(self._stream):
                upcoming = self._copy(nxt)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._pending[id(nxt)] = (event, upcoming)
        return values

    def _release(self, unit: _Unit) -> None:
        super()._release(unit)
        if self._next.get(id(unit), unit) is None:  # the last block: drop a prefetch nobody will use
            self._pending.clear()

    def _restore(self, slot: _Slot) -> None:
        device = self._moved.get(id(slot.original))
        if device is not None:
            slot.original.data = slot.original.data.to(device)

    def _close(self) -> None:
        self._pending.clear()


# ---------------------------------------------------------------- disk


class FileReader:
    """Reads byte ranges of files with plain reads (no memory map), refusing files changed since opened."""

    def __init__(self) -> None:
        self._open: dict[Path, tuple[Any, tuple[int, int]]] = {}
        self._headers: dict[Path, SafetensorsHeader] = {}

    def header(self, path: Path) -> SafetensorsHeader:
        if path not in self._headers:
            self._headers[path] = read_header(path)
        return self._headers[path]

    def _file(self, path: Path) -> Any:
        if path not in self._open:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 -- kept open for the handle's lifetime
            st = os.fstat(f.fileno())
            self._open[path] = (f, (st.st_size, st.st_mtime_ns))
        f, stamp = self._open[path]
        st = os.fstat(f.fileno())
        if (st.st_size, st.st_mtime_ns) != stamp:
            raise LoadError(
                f"{path} changed on disk while its weights were offloaded to it; disk offload reads weights "
                "from the checkpoint at every step: leave the file untouched while the pipeline is in use"
            )
        return f

    def read(self, path: Path, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        f = self._file(path)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        f.seek(offset)
        done = 0
        while done < nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise LoadError(f"{path} ended after {offset + done} bytes while reading weights; is the file truncated?")
            done += n
        return buf.view(dtype).view(shape)

    def reader_at(self, path: Path, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
        """A callable reading ``nbytes`` at ``offset`` of ``path`` as a new ``dtype`` tensor of ``shape``."""
        return lambda: self.read(path, offset, nbytes, dtype, shape)

    def reader(self, path: Path, key: str) -> Callable[[], torch.Tensor]:
        header = self.header(path)
        entry = header.tensors[key]
        start, dtype = header.data_start + entry.begin, _st_dtype(entry.dtype)
        return lambda: self.read(path, start, entry.nbytes, dtype, entry.shape)

    def close(self) -> None:
        for f, _ in self._open.values():
            f.close()
        self._open.clear()


class _UnmappedCheckpoint(Checkpoint):
    """A :class:`Checkpoint` whose safetensors tensors are read into fresh memory instead of mapped."""

    def __init__(self, header: Any, files: FileReader) -> None:
        super().__init__(header)
        self._files = files

    def get_tensor(self, key: str) -> Any:
        path = Path(self.header.key_files[key])
        if path.suffix not in SAFETENSORS_SUFFIXES:
            return super().get_tensor(key)  # pickles: torch.load(mmap=True)
        return self._files.reader(path, key)()


def checkpoint_loaders(module: nn.Module, torch_dtype: torch.dtype | None = None, *, files: FileReader | None = None) -> dict[str, Callable[[], torch.Tensor]]:
    """``{state-dict key: loader}`` for the tensors of a module loaded by :func:`difforge.load_model`
    that can be read again from its checkpoint files (``module.difforge_detection.paths``).

    A tensor qualifies when its checkpoint tensor (in the model's own layout: prefix stripped, the
    converter's rename and transform applied) has its shape and the dtype loading gives
    (``torch_dtype`` for floating tensors), so a loader returns exactly what ``load_model`` assigned,
    provided the weights were not edited in place since (dtype backends change the dtype, so their
    tensors never qualify). Loaders read with plain file reads, never a memory map, and return
    CPU tensors; a module without a detection gets ``{}``.
    """
    from ..loading.convert import own_state_dict

    detection = getattr(module, "difforge_detection", None)
    if detection is None or getattr(detection, "format", None) == "folder":
        return {}
    files = files or FileReader()
    own = own_state_dict(_UnmappedCheckpoint(read_checkpoint_header(list(detection.paths)), files), detection)
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if key not in own.shapes or tuple(own.shapes[key]) != tuple(tensor.shape):
            continue
        stored = _st_dtype(own.dtypes[key])
        want = torch_dtype if torch_dtype is not None and stored.is_floating_point else stored
        if tensor.dtype == want:
            loaders[key] = _cast_loader(own, key, want)
    return loaders


def _cast_loader(own: Any, key: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: own[key].to(dtype=dtype)


class DiskOffload(_StreamingOffload):
    """``disk``: nothing kept in memory; each unit is read from the checkpoint (or the scratch file)."""

    backend = "disk"

    def __init__(self, pipe: Any, options: dict[str, Any]) -> None:
        self.torch_dtype = getattr(pipe, "torch_dtype", None)
        self.verify = _bool(options, "verify", self.backend)
        folder = options["offload_dir"]
        if folder is not None and not isinstance(folder, (str, os.PathLike)):
            raise ConfigError(f"offload backend 'disk': option offload_dir must be a folder path, got {folder!r}")
        self._folder = None if folder is None else Path(folder)
        self.dir: Path | None = None  # made when the first scratch file is needed
        self._files = FileReader()
        self._sources: dict[int, Callable[[], torch.Tensor]] = {}  # id(original tensor) -> CPU reader
        self._devices: dict[int, torch.device] = {}
        self.scratch_bytes = 0
        super().__init__(pipe, options)

    def _prepare(self, slot: str, module: nn.Module, units: list[_Unit]) -> None:
        loaders = checkpoint_loaders(module, self.torch_dtype, files=self._files)
        unique = _unique(s for u in units for s in u.slots)
        scratch: dict[str, _Slot] = {}
        for s in unique.values():
            load = loaders.get(s.key) or getattr(s.original, SOURCE_ATTR, None)
            if load is not None and self.verify and not torch.equal(load(), s.original.detach().cpu()):
                log.info("disk offload: %s.%s differs from its checkpoint; writing it to the scratch file", slot, s.key)
                load = None
            if load is None:
                scratch[s.key] = s
            else:
                self._sources[id(s.original)] = load
        if scratch:
            if self.dir is None:  # a folder of our own (inside offload_dir if given), deleted by remove()
                if self._folder is not None:
                    self._folder.mkdir(parents=True, exist_ok=True)
                self.dir = Path(tempfile.mkdtemp(prefix="difforge-disk-", dir=self._folder))
            path = save_safetensors({k: s.original.detach() for k, s in scratch.items()}, self.dir / f"{slot}.safetensors")
            for key, s in scratch.items():
                self._sources[id(s.original)] = self._files.reader(path, key)
                self.scratch_bytes += s.nbytes
            log.info("disk offload: %d tensors of %s (%.1f MiB) written to %s", len(scratch), slot, sum(s.nbytes for s in scratch.values()) / 2**20, path)
        for s in unique.values():  # nothing can fail past this point: let the memory go
            self._devices[id(s.original)] = s.original.device
            s.original.data = torch.empty(0, dtype=s.original.dtype, device=s.original.device)

    def _fetch(self, unit: _Unit) -> list[torch.Tensor]:
        done: dict[int, torch.Tensor] = {}
        for s in unit.slots:
            if id(s.original) not in done:
                done[id(s.original)] = self._sources[id(s.original)]().to(self.device)
        return [done[id(s.original)] for s in unit.slots]

    def _restore(self, slot: _Slot) -> None:
        source = self._sources.get(id(slot.original))
        if source is not None:
            slot.original.data = source().to(self._devices[id(slot.original)])

    def _close(self) -> None:
        self._files.close()
        self._sources.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "scratch_bytes": self.scratch_bytes, "offload_dir": self.dir and str(self.dir)}


# ---------------------------------------------------------------- ModelConfig offload_device / offload_dtype

_FP8_FORMATS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
_LOCATION_OF = {"cpu": "cpu", "sequential": "cpu", "disk": "disk"}  # what a backend keeps weights on (by default)


def _config_dtype(value: Any, slot: str) -> torch.dtype | str | None:
    """``offload_dtype`` as a torch dtype (a dtype, or its name with or without ``torch.``), or ``"disk"``."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.strip().removeprefix("torch.")
        if name == "disk":
            return "disk"
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ConfigError(
        f"ModelConfig(offload_dtype={value!r}) of component {slot!r} is not a dtype; use torch.float8_e4m3fn or "
        "torch.float8_e5m2 (fp8 storage), the pipeline's torch_dtype (no change), or 'disk'"
    )


def _location_request(device: Any, dtype: Any, slot: str, compute: torch.device) -> tuple[str, str] | None:
    """``(backend, offload_device)`` that ``offload_device``/``offload_dtype="disk"`` ask for; None for nothing."""
    if device is None and dtype != "disk":
        return None
    if dtype == "disk" or (isinstance(device, str) and device.strip() == "disk"):
        if device is not None and not (isinstance(device, str) and device.strip() == "disk"):
            raise ConfigError(
                f"ModelConfig of component {slot!r} asks for offload_dtype='disk' with offload_device={device!r}; "
                "weights offloaded to disk stay in their files: set offload_device='disk' too, or neither"
            )
        return ("disk", "disk")
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"ModelConfig(offload_device={device!r}) of component {slot!r} is not a device; use 'cpu', 'disk' or e.g. 'cuda:1'"
        ) from None
    if where.type == compute.type and (where.index is None or compute.index is None or where.index == compute.index):
        log.info("ModelConfig of %s: offload_device=%r is the compute device; nothing to offload", slot, device)
        return None
    return ("cpu", str(where))


def offload_from_model_configs(
    registry: Any,
    configs: Mapping[str, Any],
    explicit: Sequence[Any],
    *,
    device: str | torch.device,
    torch_dtype: torch.dtype,
) -> list[Any]:
    """The offload choices of a pipeline: ``explicit`` (``offload=``) plus what the ``offload_device`` /
    ``offload_dtype`` fields of each slot's ``ModelConfig`` (``configs``: slot -> config or None) ask for.

    - ``offload_dtype`` ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` -> ``fp8`` (``format`` e4m3 / e5m2)
      restricted to that component; the pipeline's ``torch_dtype`` -> nothing; another dtype (e.g. bfloat16
      on a float32 pipeline) is refused: weights are stored in ``torch_dtype`` or in fp8.
    - ``offload_device`` ``"cpu"`` (any device other than the compute device) -> the ``cpu`` backend with that
      ``offload_device`` for that component; ``"disk"`` (or ``offload_dtype="disk"``) -> ``disk``; the compute
      device itself -> nothing.
    - Combining: mapped backends are added for the components the explicit ones do not cover. Where an
      explicit backend of the same kind covers a component (no ``components`` option, or one naming it), it
      must give what the config asks for -- the same fp8 format (``fp8`` or ``fp8-scaled``), the same place
      (``cpu``/``sequential`` keep weights on their ``offload_device``, ``disk`` in the files) -- and then
      nothing is added; otherwise a :class:`ConfigError` names both.

    Components asking for the same thing share one backend (``components`` lists them all). Every mapping
    is logged. The other VRAM fields (``onload_*``, ``preparing_*``, ``computation_*``) are not used.
    """
    from ..runtime.options import PluginChoice

    compute = torch.device(device)
    explicit = list(explicit)
    specs = [(c, registry.offload.get(c.name)) for c in explicit]

    def covering(kind: str, slot: str) -> list[Any]:
        return [(c, s) for c, s in specs if s.kind == kind and (c.options.get("components") is None or slot in c.options["components"])]

    fp8: dict[str, list[str]] = {}  # format -> slots
    where: dict[tuple[str, str], list[str]] = {}  # (backend, offload_device) -> slots
    for slot, mc in configs.items():
        if mc is None:
            continue
        unused = [f for f in ("onload_device", "onload_dtype", "preparing_device", "preparing_dtype", "computation_device",
                              "computation_dtype") if getattr(mc, f, None) is not None]  # fmt: skip
        if unused:
            log.info("ModelConfig of %s: %s not used (difforge computes on the pipeline's device and torch_dtype)", slot, ", ".join(unused))
        dtype = _config_dtype(getattr(mc, "offload_dtype", None), slot)
        if isinstance(dtype, torch.dtype) and dtype != torch_dtype:
            fmt = _FP8_FORMATS.get(dtype)
            if fmt is None:
                raise ConfigError(
                    f"ModelConfig(offload_dtype={dtype}) of component {slot!r}: difforge stores weights in the pipeline's "
                    f"torch_dtype ({torch_dtype}) or in fp8; pass torch_dtype={dtype} to from_pretrained for the whole "
                    "pipeline, or offload_dtype=torch.float8_e4m3fn / torch.float8_e5m2 for fp8 storage of this component"
                )
            given = covering("dtype", slot)
            if not given:
                fp8.setdefault(fmt, []).append(slot)
            for choice, spec in given:
                have = choice.options.get("format", spec.options.get("format"))
                if have != fmt:
                    raise ConfigError(
                        f"component {slot!r}: its ModelConfig asks for offload_dtype={dtype} but offload= gives it "
                        f"{choice.as_arg()!r} (format {have!r}); drop one, or make them agree"
                    )
                log.info("ModelConfig of %s: offload_dtype=%s is given by offload=%r already", slot, dtype, choice.as_arg())
        request = _location_request(getattr(mc, "offload_device", None), dtype, slot, compute)
        if request is None:
            continue
        given = covering("location", slot)
        if not given:
            where.setdefault(request, []).append(slot)
        for choice, spec in given:
            options = {**spec.options, **choice.options}
            keeps = "disk" if spec.name == "disk" else str(_device(options.get("offload_device", "cpu"), "offload_device", spec.name))
            if _LOCATION_OF.get(spec.name) is None or keeps != request[1]:
                raise ConfigError(
                    f"component {slot!r}: its ModelConfig asks for offload_device={request[1]!r} but offload= gives it "
                    f"{choice.as_arg()!r}, which keeps weights on {keeps!r}; drop one, or restrict the backend with "
                    "its components option"
                )
            log.info("ModelConfig of %s: offload_device=%r is given by offload=%r already", slot, request[1], choice.as_arg())
    mapped = [PluginChoice("fp8", {"format": fmt, "components": slots}) for fmt, slots in fp8.items()]
    for (backend, place), slots in where.items():
        mapped.append(PluginChoice(backend, {"components": slots} if backend == "disk" else {"offload_device": place, "components": slots}))
    for choice in mapped:
        log.info("ModelConfig offload fields -> offload backend %r", choice.as_arg())
    return explicit + mapped


def located_slots(registry: Any, choices: Sequence[Any], slots: Iterable[str]) -> set[str]:
    """The ``slots`` a location backend among ``choices`` will hold (they are loaded on the CPU first)."""
    held: set[str] = set()
    for choice in choices:
        if registry.offload.get(choice.name).kind == "location":
            wanted = choice.options.get("components")
            held.update(s for s in slots if wanted is None or s in wanted)
    return held


# ---------------------------------------------------------------- OffloadSpec.apply entry points


def apply_cpu(pipe: Any, options: dict[str, Any]) -> ModelOffload:
    """``offload="cpu"``: model-level offload (options: ``offload_device``)."""
    return ModelOffload(pipe, options)


def apply_sequential(pipe: Any, options: dict[str, Any]) -> SequentialOffload:
    """``offload="sequential"``: stream blocks (options: ``offload_device``, ``pin_memory``, ``prefetch``,
    ``vram_limit``, ``vram_buffer``)."""
    return SequentialOffload(pipe, options)


def apply_disk(pipe: Any, options: dict[str, Any]) -> DiskOffload:
    """``offload="disk"``: stream blocks from the checkpoint files (options: ``offload_dir``, ``verify``,
    ``vram_limit``, ``vram_buffer``)."""
    return DiskOffload(pipe, options)

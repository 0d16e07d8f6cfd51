"""Reading checkpoints: which files make one, their headers, and lazy, memory-mapped tensors.

- :func:`resolve_checkpoint_files` turns a file, a list of shards, a glob, an ``*.index.json`` or a
  folder into the list of weight files, and checks a sharded checkpoint for completeness against
  its index (or its ``-0000k-of-0000n`` names) before anything is read.
- :func:`read_checkpoint_header` / :func:`read_shapes` read safetensors headers only.
- :func:`open_checkpoint` gives a lazy mapping: safetensors tensors are zero-copy views of a
  private memory map of the file, created on access, so nothing is read until it is used.
- Pickled checkpoints (``.pth .pt .bin .ckpt``) are read only by
  ``torch.load(weights_only=True, mmap=True)``; a pickle that needs arbitrary code is refused.
"""

from __future__ import annotations

import glob as _glob
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Union

from ..errors import LoadError
from .safetensors_header import DTYPE_SIZES, _TORCH_DTYPES, read_header, torch_dtype

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointHeader",
    "Checkpoint",
    "resolve_checkpoint_files",
    "read_checkpoint_header",
    "read_shapes",
    "open_checkpoint",
    "load_state_dict",
    "load_pickle",
    "save_safetensors",
    "cast_tensor",
]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "rng_state.pth"}
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)(?P<ext>\.[^-]+)$")
_STATE_DICT_KEYS = ("state_dict", "model", "module", "model_state_dict", "ema", "params_ema")

PathArg = Union[str, "PathLike[str]"]
Source = Union[PathArg, Sequence[PathArg]]


# ---------------------------------------------------------------- which files


def _is_weights(p: Path) -> bool:
    return p.suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES and p.name not in _NOT_WEIGHTS


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``*.index.json`` (tensor name -> shard file name), validated."""
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LoadError(f"{index}: cannot read the shard index ({exc}); download it again.") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise LoadError(f"{index}: not a shard index (no 'weight_map' object of strings).")
    for shard in set(wm.values()):
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise LoadError(f"{index}: shard name {shard!r} points outside the index's folder; refusing it.")
    return wm


def _pick(names: list[str], what: str, folder: Path) -> str:
    """``model.safetensors`` over ``model.fp16.safetensors``; a tie is an error listing the names."""
    best = min(n.count(".") for n in names)
    chosen = sorted(n for n in names if n.count(".") == best)
    if len(chosen) > 1:
        raise LoadError(f"{folder} holds several {what} ({', '.join(chosen)}); pass the file(s) to load explicitly.")
    return chosen[0]


def folder_files(folder: Path) -> list[Path]:
    """The weight files of a model folder (a diffusers component or transformers folder):
    the shards of its index, else its one checkpoint (a set of ``-of-N`` shards or a single file)."""
    entries = sorted(p for p in folder.iterdir() if p.is_file())
    for suffixes in (SAFETENSORS_SUFFIXES, PICKLE_SUFFIXES):
        indexes = {
            p.name: p for p in entries if p.name.endswith(".index.json") and Path(p.name[:-11]).suffix in suffixes
        }
        if indexes:
            index = indexes[_pick(list(indexes), "shard indexes", folder)]
            return [folder / s for s in sorted(set(_read_index(index).values()))]
        candidates: dict[str, list[Path]] = {}
        for f in entries:
            if _is_weights(f) and f.suffix in suffixes:
                m = _SHARD.match(f.name)
                candidates.setdefault(f"{m['stem']}{m['ext']}" if m else f.name, []).append(f)
        if candidates:
            return candidates[_pick(list(candidates), "checkpoints", folder)]
    return []


def _expand(item: PathArg) -> list[Path]:
    p = Path(os.fspath(item)).expanduser()
    if p.exists():
        if p.is_dir():
            files = folder_files(p)
            if not files:
                raise LoadError(f"{p} is a folder without weight files (.safetensors, .pth, .pt, .bin, .ckpt).")
            return files
        if p.name.endswith(".index.json"):
            return [p.parent / s for s in sorted(set(_read_index(p).values()))]
        return [p]
    if any(c in str(p) for c in "*?["):
        matches = sorted(Path(m) for m in _glob.glob(str(p)))
        if not matches:
            raise LoadError(f"no file matches {str(p)!r}.")
        return [m for m in matches if m.is_file()]
    raise LoadError(f"checkpoint file {str(p)!r} does not exist.")


def _check_complete(files: list[Path]) -> Path | None:
    """Check shards against the ``*.index.json`` beside them (or their ``-of-N`` names).

    Returns the index used, if any. Raises :class:`LoadError` naming each missing shard.
    """
    names_by_dir: dict[Path, set[str]] = {}
    for f in files:
        names_by_dir.setdefault(f.parent, set()).add(f.name)
    found: Path | None = None
    for folder, names in names_by_dir.items():
        try:
            indexes = sorted(folder.glob("*.index.json"))
        except OSError:
            indexes = []
        for index in indexes:
            wm = _read_index(index)
            listed = set(wm.values())
            if not names & listed:
                continue
            found = index
            missing = sorted(s for s in listed if not (folder / s).is_file())
            if missing:
                raise LoadError(
                    f"incomplete sharded checkpoint: {index.name} lists shard(s) missing from {folder}: "
                    f"{', '.join(missing)}. Download the missing shard(s) (an interrupted download?)."
                )
            not_given = sorted(listed - names)
            if not_given:
                raise LoadError(
                    f"{index.name} in {folder} lists shard(s) that were not given: {', '.join(not_given)}. "
                    "Pass every shard, or the folder."
                )
            stray = sorted(names - listed)
            if stray:
                raise LoadError(f"file(s) {', '.join(stray)} are not listed in {index} although other shards are.")
    if found is None:  # no index: use the -0000k-of-0000n names
        groups: dict[tuple[Path, str, str, str], set[int]] = {}
        width: dict[tuple[Path, str, str, str], int] = {}
        for f in files:
            m = _SHARD.match(f.name)
            if m:
                key = (f.parent, m["stem"], m["n"], m["ext"])
                groups.setdefault(key, set()).add(int(m["i"]))
                width[key] = len(m["i"])
        for key, have in groups.items():
            folder, stem, n, ext = key
            missing = [f"{stem}-{i:0{width[key]}d}-of-{n}{ext}" for i in range(1, int(n) + 1) if i not in have]
            if missing:
                raise LoadError(
                    f"incomplete sharded checkpoint in {folder}: missing shard(s) {', '.join(missing)}. "
                    "Download them too, or pass the folder."
                )
    return found


def resolve_checkpoint_files(source: Source) -> list[Path]:
    """The weight files a checkpoint argument names: a file, a list of shards, a glob, an
    ``*.index.json``, or a folder. Sharded checkpoints are checked for completeness (against their
    index) here, before any weight file is opened."""
    return _resolve(source)[0]


def _resolve(source: Source) -> tuple[list[Path], Path | None]:
    items = [source] if isinstance(source, (str, PathLike)) else list(source)
    if not items:
        raise LoadError("no checkpoint files given.")
    files: list[Path] = []
    for item in items:
        for f in _expand(item):
            if f not in files:
                files.append(f)
    for f in files:
        if not _is_weights(f):
            raise LoadError(
                f"{f}: unsupported checkpoint file type {f.suffix!r}; difforge reads "
                f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}."
            )
    return files, _check_complete(files)


# ---------------------------------------------------------------- headers


@dataclass(frozen=True)
class CheckpointHeader:
    """What a checkpoint holds, read from headers only: tensor names, shapes, dtype names
    (safetensors spelling, ``"BF16"``), the safetensors ``__metadata__`` and the file of each key."""

    files: tuple[Path, ...]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    key_files: dict[str, Path]
    metadata: dict[str, str] = field(default_factory=dict)
    index: Path | None = None

    @property
    def total_bytes(self) -> int:
        total = 0
        for k, shape in self.shapes.items():
            n = DTYPE_SIZES.get(self.dtypes[k], 1)
            for d in shape:
                n *= d
            total += n
        return total


_DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


def dtype_name(dtype: Any) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    name = _DTYPE_NAMES.get(str(dtype).removeprefix("torch."))
    if name is None:
        raise LoadError(f"dtype {dtype} cannot be stored in safetensors")
    return name


def read_checkpoint_header(source: Source) -> CheckpointHeader:
    """Names, shapes and dtypes of every tensor of a checkpoint, without reading tensor data
    (pickled files are memory-mapped through ``torch.load``). Shards are a union; a name in two
    shards, or a name the index puts in a shard that lacks it, is a :class:`LoadError`."""
    files, index = _resolve(source)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    key_files: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for f in files:
        if f.suffix in SAFETENSORS_SUFFIXES:
            header = read_header(f)
            entries = {k: (t.shape, t.dtype) for k, t in header.tensors.items()}
            for k, v in header.metadata.items():
                metadata.setdefault(k, v)
        else:
            entries = {k: (tuple(t.shape), dtype_name(t.dtype)) for k, t in load_pickle(f).items()}
        for key, (shape, dtype) in entries.items():
            if key in key_files:
                raise LoadError(
                    f"tensor {key!r} is in two files, {key_files[key]} and {f}; these are not shards of one checkpoint."
                )
            shapes[key], dtypes[key], key_files[key] = shape, dtype, f
    if index is not None:
        for key, shard in _read_index(index).items():
            if key not in key_files or key_files[key].name != shard:
                raise LoadError(
                    f"{index}: tensor {key!r} should be in {shard} but is not; the shard is incomplete or "
                    "does not belong to this index. Download it again."
                )
    return CheckpointHeader(tuple(files), shapes, dtypes, key_files, metadata, index)


def read_shapes(source: Source) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a file, a list of shards or a folder (headers only)."""
    return read_checkpoint_header(source).shapes


# ---------------------------------------------------------------- pickles


def _tensors_of(obj: Any, path: Path) -> dict[str, Any]:
    import torch

    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in _STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                log.debug("%s: using the tensors under %r", path, key)
                return _tensors_of(inner, path)
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            dropped = [k for k in obj if k not in tensors]
            log.debug("%s: ignoring %d non-tensor entries (%s)", path, len(dropped), ", ".join(map(str, dropped[:5])))
            return tensors
    raise LoadError(f"{path} holds no state dict (a {type(obj).__name__} without tensors).")


def load_pickle(path: PathArg) -> dict[str, Any]:
    """The tensors of a pickled checkpoint, loaded only with ``torch.load(weights_only=True)``
    (memory-mapped where the file is a zip archive). A pickle that needs anything but tensors and
    plain containers is refused with a :class:`LoadError`; no code from the file ever runs."""
    import pickle

    import torch

    p = Path(os.fspath(path))
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(p, map_location="cpu", weights_only=True)  # legacy non-zip file
    except pickle.UnpicklingError as exc:
        reason = next((ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error" in ln), "")
        raise LoadError(
            f"{p} cannot be loaded safely: torch.load(weights_only=True) refused it"
            + (f" ({reason})" if reason else "")
            + ". The file is corrupt, or it is a pickle that needs arbitrary code (classes or functions "
            "besides tensors) to load, and difforge never runs code from a model file. If you trust its "
            "source, convert it to .safetensors (torch.load it yourself and save the state dict with "
            "safetensors.torch.save_file) and load that instead."
        ) from None
    except Exception as exc:  # any parser failure on a corrupt file (IndexError, EOFError, zip errors, ...)
        raise LoadError(
            f"cannot read {p} as a torch checkpoint ({type(exc).__name__}: {exc}); is it corrupt?"
        ) from None
    return _tensors_of(obj, p)


# ---------------------------------------------------------------- lazy access


class _SafetensorsFile:
    """Zero-copy tensors of one safetensors file, backed by a private (copy-on-write) memory map."""

    def __init__(self, path: Path) -> None:
        import torch

        self.header = read_header(path)
        self.storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=self.header.file_size)

    def get(self, key: str) -> Any:
        import torch

        entry = self.header.tensors[key]
        dtype = torch_dtype(entry.dtype)
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        start = self.header.data_start + entry.begin
        raw = torch.empty(0, dtype=torch.uint8).set_(self.storage, start, (entry.nbytes,))
        if start % DTYPE_SIZES[entry.dtype]:
            raw = raw.clone()  # misaligned for a zero-copy view: copy this one tensor
        return raw.view(dtype).view(entry.shape)


class Checkpoint(Mapping[str, Any]):
    """A lazy, read-only ``{name: tensor}`` mapping over a checkpoint's files.

    Tensors are created when accessed (memory-mapped views for safetensors), so iterating and
    converting one tensor at a time never holds a second copy of the checkpoint.
    """

    def __init__(self, header: CheckpointHeader) -> None:
        self.header = header
        self._sources: dict[Path, Any] = {}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.header.shapes

    @property
    def dtypes(self) -> dict[str, str]:
        return self.header.dtypes

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    @property
    def files(self) -> tuple[Path, ...]:
        return self.header.files

    def _source(self, path: Path) -> Any:
        src = self._sources.get(path)
        if src is None:
            src = _SafetensorsFile(path) if path.suffix in SAFETENSORS_SUFFIXES else load_pickle(path)
            self._sources[path] = src
        return src

    def get_tensor(self, key: str) -> Any:
        """The tensor ``key`` (KeyError if absent)."""
        path = self.header.key_files[key]
        src = self._source(path)
        return src.get(key) if isinstance(src, _SafetensorsFile) else src[key]

    def __getitem__(self, key: str) -> Any:
        return self.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.shapes)

    def __len__(self) -> int:
        return len(self.header.shapes)

    def __contains__(self, key: object) -> bool:
        return key in self.header.shapes

    def close(self) -> None:
        """Drop the file maps (tensors already handed out stay valid)."""
        self._sources.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_checkpoint(source: Source | CheckpointHeader) -> Checkpoint:
    """Open a checkpoint (file, shards, folder) for lazy tensor access; reads headers only."""
    header = source if isinstance(source, CheckpointHeader) else read_checkpoint_header(source)
    return Checkpoint(header)


def cast_tensor(tensor: Any, device: Any = "cpu", torch_dtype: Any = None) -> Any:
    """``tensor`` on ``device``; floating tensors also in ``torch_dtype`` (when given).
    Returns the tensor itself when nothing changes (no copy)."""
    dtype = torch_dtype if torch_dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=dtype)


def load_state_dict(source: Source, device: Any = "cpu", torch_dtype: Any = None) -> dict[str, Any]:
    """The raw ``{name: tensor}`` of a checkpoint (file, shards, folder), keys as stored.

    Safetensors tensors on the CPU in their stored dtype are memory-mapped views (no copy);
    otherwise each tensor is converted on its own (floating tensors to ``torch_dtype``).
    """
    with open_checkpoint(source) as ckpt:
        return {k: cast_tensor(ckpt[k], device, torch_dtype) for k in ckpt}


# ---------------------------------------------------------------- writing


def save_safetensors(tensors: Mapping[str, Any], path: PathArg, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` to a safetensors file, streaming one tensor at a time.

    Tensors may share storage (views of one memory map). Data is laid out largest element size
    first, so every tensor is aligned for zero-copy reading. The file appears atomically.
    """
    import torch

    out = Path(os.fspath(path))
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key in order:
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for key in order:
                t = tensors[key]
                if t.numel():
                    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                    f.write(memoryview(data.numpy()))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out

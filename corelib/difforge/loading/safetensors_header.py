"""A strict reader of safetensors headers that never touches tensor data.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``), then the
data; offsets are relative to the first data byte. :func:`read_header` validates all of it against
the file size and raises only :class:`~difforge.errors.LoadError` (naming the file) on a malformed
or truncated file. Importing this module does not import torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Union

from ..errors import LoadError

__all__ = ["DTYPE_SIZES", "MAX_HEADER_SIZE", "SafetensorsHeader", "TensorEntry", "read_header", "torch_dtype"]

MAX_HEADER_SIZE = 100 * 1024 * 1024
"""Headers above 100 MB are refused as corrupt (real ones are a few MB at most)."""

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
"""Bytes per element of every safetensors dtype this reader accepts."""

_TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu", "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64",
    "C64": "complex64",
}  # fmt: skip

PathArg = Union[str, "PathLike[str]"]


def torch_dtype(name: str) -> Any:
    """The torch dtype of a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    import torch

    attr = _TORCH_DTYPES.get(name)
    dtype = getattr(torch, attr, None) if attr else None
    if dtype is None:
        raise LoadError(f"safetensors dtype {name!r} is not supported by this torch {torch.__version__}")
    return dtype


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype name, shape, byte range relative to the data start."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file."""

    path: Path
    header_size: int
    file_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        """Absolute file offset of the first data byte."""
        return 8 + self.header_size

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(name: str, raw: Any, data_size: int) -> TensorEntry:
    """Validate one tensor entry; raises ValueError with the reason."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"entry of tensor {name!r} is not an object")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise ValueError(f"tensor {name!r} has a shape that is not a list of integers: {shape!r}")
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor {name!r} has a negative dimension: {shape}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise ValueError(f"tensor {name!r} has data_offsets that are not two integers: {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise ValueError(
            f"tensor {name!r} has data_offsets [{begin}, {end}] outside the {data_size} data bytes of the file"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise ValueError(
            f"tensor {name!r} ({dtype} {shape}) needs {expected} bytes but data_offsets span {end - begin}"
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def read_header(path: PathArg) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file ``path`` (never its tensor data).

    Raises :class:`LoadError` naming the file when it is missing, truncated, or its header is
    malformed: length past the end or above :data:`MAX_HEADER_SIZE`, invalid UTF-8 or JSON, not an
    object, unknown dtypes, negative dimensions, byte ranges out of the file, overlapping, or not
    matching dtype x shape.
    """
    p = Path(os.fspath(path))
    hint = "The file is corrupt or was not completely downloaded; download it again."
    try:
        with open(p, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise LoadError(
                    f"{p}: truncated safetensors file ({file_size} bytes, shorter than the 8-byte length). {hint}"
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_SIZE:
                raise LoadError(
                    f"{p}: safetensors header length {n} is absurd (limit {MAX_HEADER_SIZE}); not safetensors? {hint}"
                )
            if 8 + n > file_size:
                raise LoadError(
                    f"{p}: safetensors header length {n} runs past the end of the {file_size}-byte file. {hint}"
                )
            raw = f.read(n)
    except LoadError:
        raise
    except OSError as exc:
        raise LoadError(f"cannot read {p}: {exc}") from exc
    if len(raw) < n:  # the file shrank while we read it
        raise LoadError(f"{p}: truncated safetensors header. {hint}")
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LoadError(f"{p}: safetensors header is not valid UTF-8 JSON ({exc}). {hint}") from None
    if not isinstance(doc, dict):
        raise LoadError(f"{p}: safetensors header is a JSON {type(doc).__name__}, not an object. {hint}")
    data_size = file_size - 8 - n
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoadError(f"{p}: safetensors __metadata__ must be an object of strings. {hint}")
    try:
        tensors = {name: _entry(name, entry, data_size) for name, entry in doc.items()}
        spans = sorted((t.begin, t.end, name) for name, t in tensors.items() if t.end > t.begin)
        for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
            if begin_b < end_a:
                raise ValueError(f"the data of tensors {a!r} and {b!r} overlap")
    except ValueError as exc:
        raise LoadError(f"{p}: malformed safetensors header: {exc}. {hint}") from None
    return SafetensorsHeader(p, n, file_size, tensors, dict(metadata))

"""Real-size checkpoints without the data: safetensors headers over sparse files.

A header with a release's real tensor names and shapes, followed by a hole of the full data size
(``truncate``), lets tests check detection, fingerprints and config inference of multi-GB
checkpoints in milliseconds and no disk space.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "F8_E5M2": 1, "F64": 8, "I64": 8, "I32": 4}


def write_sparse_safetensors(
    path: str | Path, shapes: Mapping[str, Sequence[int]], dtype: str = "BF16", metadata: Mapping[str, str] | None = None
) -> Path:
    """A safetensors file with these names and shapes whose data is a hole (tensors in sorted order)."""
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for key in sorted(shapes):
        size = ITEMSIZE[dtype]
        for d in shapes[key]:
            size *= int(d)
        header[key] = {"dtype": dtype, "shape": [int(d) for d in shapes[key]], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def write_sharded_sparse(
    folder: str | Path,
    shapes: Mapping[str, Sequence[int]],
    shards: int,
    config: Mapping[str, Any] | None = None,
    stem: str = "diffusion_pytorch_model",
    dtype: str = "BF16",
) -> Path:
    """A diffusers/transformers component folder: sparse shards, their ``*.index.json`` and
    (when given) ``config.json``. ``stem`` is ``diffusion_pytorch_model`` or ``model``."""
    folder = Path(folder)
    keys = sorted(shapes)
    names = [f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map: dict[str, str] = {}
    for i, name in enumerate(names):
        part = keys[i * len(keys) // shards : (i + 1) * len(keys) // shards]
        write_sparse_safetensors(folder / name, {k: shapes[k] for k in part}, dtype)
        weight_map.update(dict.fromkeys(part, name))
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(dict(config)))
    return folder

"""Toy checkpoints for the loading tests, written by hand (independent of the code under test)."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from difforge_sdk.toy.models import ToyDiT, ToyDiTConfig, toy_diffusers_inverse_rename, toy_diffusers_split_qkv

DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.uint8: "U8",
}


def toy_state_dict(config: ToyDiTConfig | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a toy DiT (default: the Toy-1 config) in the own (``toy``) layout."""
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in ToyDiT(config or ToyDiTConfig()).state_dict().items()}


def to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The toy-diffusers layout of an own-layout state dict (split q/k/v, renamed keys)."""
    split = toy_diffusers_split_qkv(dict(sd))
    return {toy_diffusers_inverse_rename(k): v.clone() for k, v in split.items()}


def write_safetensors(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    order: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    align: int = 8,
) -> Path:
    """Write a safetensors file by hand, header entries and data in ``order`` (default: as given).

    ``align`` pads the header to that many bytes (1: no padding, data may be misaligned).
    """
    order = list(order or tensors)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for key in order:
        t = tensors[key].contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % align)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


def write_sparse_header(
    path: Path, shapes: Mapping[str, Sequence[int]], dtype: str = "BF16", itemsize: int = 2
) -> Path:
    """A safetensors file of the full size whose data is a hole: only the header is written."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = itemsize
        for d in shape:
            n *= d
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path

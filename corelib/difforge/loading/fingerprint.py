"""Fingerprints: a hash of a checkpoint's key names and shapes, never its data.

The fingerprint is order-independent, ignores dtypes (a bf16 and an fp16 copy of a release are the
same checkpoint), and is taken after the generic prefix stripping, so the ComfyUI repackaging of a
release matches the release. A sharded checkpoint's fingerprint is that of the union of its shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Union

GENERIC_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
"""Prefixes wrappers add in front of a model's own keys (ComfyUI, civitai, Lightning), stripped
once, generically, when *every* key carries the prefix."""

Shapes = Mapping[str, Sequence[int]]
PathArg = Union[str, PathLike, Sequence[Union[str, PathLike]]]


def strip_prefix(keys: Sequence[str]) -> str:
    """The generic prefix that every key in ``keys`` carries ('' when none does)."""
    keys = list(keys)
    if not keys:
        return ""
    for prefix in GENERIC_PREFIXES:
        if all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def strip_shapes(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    """``shapes`` with the generic prefix removed from every key."""
    prefix = strip_prefix(list(shapes))
    n = len(prefix)
    return {k[n:]: tuple(int(d) for d in v) for k, v in shapes.items()}


def fingerprint_shapes(shapes: Shapes) -> str:
    """The fingerprint of a mapping of tensor names to shapes (see module docs)."""
    stripped = strip_shapes(shapes)
    h = hashlib.sha256()
    for key in sorted(stripped):
        h.update(f"{key}\t{','.join(str(d) for d in stripped[key])}\n".encode())
    return h.hexdigest()[:32]


def fingerprint(source: PathArg | Shapes) -> str:
    """The fingerprint of a checkpoint file, a list of shards, or a ``{name: shape}`` mapping.

    For safetensors files only the header is read.
    """
    if isinstance(source, Mapping):
        return fingerprint_shapes(source)
    from .state_dict import read_shapes

    return fingerprint_shapes(read_shapes(source))

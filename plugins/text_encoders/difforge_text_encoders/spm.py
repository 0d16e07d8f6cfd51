"""Read a SentencePiece ``.model`` file without the sentencepiece or protobuf packages.

A ``spiece.model`` is a serialized ``ModelProto`` (sentencepiece_model.proto). Building a
``tokenizers`` Unigram model needs only a few of its fields, so this module decodes the protobuf
wire format directly (about forty lines) rather than making sentencepiece a runtime dependency.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from os import PathLike
from typing import Union

from difforge.errors import LoadError

__all__ = ["SentencePieceModel", "read_sentencepiece_model", "NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED"]

# SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2  # TrainerSpec.ModelType


@dataclass
class SentencePieceModel:
    """The fields of a ``ModelProto`` a tokenizer needs (proto2 defaults where a field is absent)."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)
    """``(piece, score, type)`` in id order."""
    model_type: int = UNIGRAM
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes | float]]:
    """``(field number, value)`` pairs of one message: ints, bytes, or floats (32-bit fields)."""
    out: list[tuple[int, int | bytes | float]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, value - (1 << 64) if value >= 1 << 63 else value))
        elif wire == 2:
            n, pos = _varint(buf, pos)
            out.append((number, buf[pos : pos + n]))
            pos += n
        elif wire == 5:
            out.append((number, struct.unpack_from("<f", buf, pos)[0]))
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def read_sentencepiece_model(path: Union[str, "PathLike[str]"]) -> SentencePieceModel:
    """Parse ``path`` (a SentencePiece model file)."""
    with open(path, "rb") as f:
        data = f.read()
    model = SentencePieceModel()
    try:
        for number, value in _fields(data):
            if number == 1:  # SentencePiece
                piece, score, kind = "", 0.0, NORMAL
                for n, v in _fields(value):  # type: ignore[arg-type]
                    if n == 1:
                        piece = v.decode("utf-8")  # type: ignore[union-attr]
                    elif n == 2:
                        score = float(v)  # type: ignore[arg-type]
                    elif n == 3:
                        kind = int(v)  # type: ignore[arg-type]
                model.pieces.append((piece, score, kind))
            elif number == 2:  # TrainerSpec
                names = {3: "model_type", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
                for n, v in _fields(value):  # type: ignore[arg-type]
                    if n in names:
                        setattr(model, names[n], int(v))  # type: ignore[arg-type]
            elif number == 3:  # NormalizerSpec
                for n, v in _fields(value):  # type: ignore[arg-type]
                    if n == 2:
                        model.precompiled_charsmap = bytes(v)  # type: ignore[arg-type]
                    elif n == 3:
                        model.add_dummy_prefix = bool(v)
    except (IndexError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise LoadError(f"{path}: not a readable SentencePiece model ({exc}); download it again.") from exc
    if not model.pieces:
        raise LoadError(f"{path}: a SentencePiece model without pieces; download it again.")
    return model

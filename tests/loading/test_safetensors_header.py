"""The safetensors header reader: valid files, every rejection, and a property test."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from .loading_helpers import write_safetensors
from safetensors.torch import save, save_file

from difforge.errors import LoadError
from difforge.loading.safetensors_header import read_header


def _raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def test_reads_a_file_written_by_safetensors(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.ones(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16), "c": torch.tensor(7)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    h = read_header(tmp_path / "x.safetensors")
    assert h.shapes == {"a.weight": (3, 4), "b": (2,), "c": ()}
    assert {k: t.dtype for k, t in h.tensors.items()} == {"a.weight": "F32", "b": "BF16", "c": "I64"}
    assert h.metadata == {"format": "pt"}
    assert h.tensors["a.weight"].nbytes == 48
    assert h.data_start == 8 + h.header_size
    assert h.file_size == (tmp_path / "x.safetensors").stat().st_size


def test_empty_and_zero_size_tensors(tmp_path: Path) -> None:
    assert read_header(_raw(tmp_path / "e.safetensors", {})).tensors == {}
    h = read_header(_raw(tmp_path / "z.safetensors", {"z": {"dtype": "F16", "shape": [0, 5], "data_offsets": [0, 0]}}))
    assert h.shapes == {"z": (0, 5)}


GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    ("header", "data", "length", "needle"),
    [
        (b"", b"", None, "8-byte"),  # file shorter than 8 bytes (handled below)
        (GOOD, b"\0" * 8, 10**12, "absurd"),
        (GOOD, b"\0" * 8, 5000, "past the end"),
        (b"\xff\xfe{}", b"", None, "UTF-8 JSON"),
        (b"{not json", b"", None, "UTF-8 JSON"),
        (b"[1, 2]", b"", None, "not an object"),
        (b'{"a": 1, "a": 2}', b"", None, "duplicate"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8, None, "outside"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, None, "needs 8 bytes"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "negative"),
        ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, b"\0" * 8, None, "shape"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, None, "data_offsets"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [True, 8]}}, b"\0" * 8, None, "data_offsets"),
        ({"t": [1]}, b"", None, "not an object"),
        ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
    ],
)
def test_rejects_malformed_headers(
    tmp_path: Path, header: object, data: bytes, length: int | None, needle: str
) -> None:
    path = tmp_path / "bad.safetensors"
    if header == b"" and length is None:
        path.write_bytes(b"\x05\0\0")
    else:
        _raw(path, header, data, length)
    with pytest.raises(LoadError, match=needle) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="cannot read"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(LoadError):
        read_header(tmp_path)


def test_truncated_download_is_caught_by_offsets(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "x.safetensors", {"a": torch.ones(100), "b": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(LoadError, match="outside the"):
        read_header(path)


def _check(path: Path, blob: bytes) -> None:
    """read_header returns or raises LoadError (nothing else), quickly."""
    path.write_bytes(blob)
    start = time.perf_counter()
    try:
        read_header(path)
    except LoadError:
        pass
    assert time.perf_counter() - start < 1.0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "U8", "I64", "F8_E4M3", "X", ""]),
        "shape": st.lists(st.integers(-2, 6), max_size=3),
        "data_offsets": st.lists(st.integers(-4, 300), min_size=0, max_size=3),
    }
)
headers = st.dictionaries(st.text(max_size=10), entries | json_values, max_size=6)
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(blob=st.binary(max_size=200))
def test_property_random_bytes(tmp_path: Path, blob: bytes) -> None:
    _check(tmp_path / "r.safetensors", blob)


@SETTINGS
@given(header=headers, data=st.binary(max_size=300), fudge=st.integers(-3, 3))
def test_property_random_headers(tmp_path: Path, header: dict, data: bytes, fudge: int) -> None:
    raw = json.dumps(header).encode()
    _check(tmp_path / "h.safetensors", struct.pack("<Q", max(0, len(raw) + fudge)) + raw + data)


def _valid_file() -> bytes:
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    blob = save(tensors, metadata={"format": "pt"})
    return blob


VALID = _valid_file()


@SETTINGS
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 10**6),
    deep=st.integers(0, 3000),
)
def test_property_mutated_valid_file(tmp_path: Path, flips: list[tuple[int, int]], cut: int, deep: int) -> None:
    path = tmp_path / "m.safetensors"
    blob = bytearray(VALID)
    for pos, value in flips:
        blob[pos % len(blob)] = value
    blob = blob[: max(0, len(blob) - cut % 40)] if cut % 3 == 0 else blob
    _check(path, bytes(blob))
    nested = b"[" * deep + b"]" * deep  # deep nesting must not escape as RecursionError
    _check(path, struct.pack("<Q", len(nested)) + nested)

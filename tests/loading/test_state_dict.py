"""Reading checkpoints: shards and their index, folders, lazy mmapped tensors, safe pickles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from difforge.errors import LoadError
from difforge.loading.state_dict import (
    load_pickle,
    load_state_dict,
    open_checkpoint,
    read_checkpoint_header,
    read_shapes,
    resolve_checkpoint_files,
    save_safetensors,
)

from .loading_helpers import toy_state_dict, write_safetensors


def _shard(
    tmp_path: Path, sd: dict[str, torch.Tensor], n: int = 2, index: bool = True, stem: str = "model"
) -> list[Path]:
    """Split ``sd`` into ``n`` safetensors shards with a transformers/diffusers-style index."""
    keys = sorted(sd)
    files, weight_map = [], {}
    for i in range(n):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        files.append(write_safetensors(tmp_path / name, part))
        weight_map.update({k: name for k in part})
    if index:
        (tmp_path / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def test_single_file_shapes_and_lazy_values(tmp_path: Path) -> None:
    sd = toy_state_dict()
    path = write_safetensors(tmp_path / "m.safetensors", sd, metadata={"format": "toy"})
    assert read_shapes(path) == {k: tuple(v.shape) for k, v in sd.items()}
    with open_checkpoint(path) as ckpt:
        assert ckpt.metadata == {"format": "toy"}
        assert set(ckpt) == set(sd) and len(ckpt) == len(sd)
        for key in sd:
            assert torch.equal(ckpt[key], sd[key])
        # zero-copy: every tensor is a view of one memory map of the file
        a, b = ckpt["x_embedder.weight"], ckpt["final.linear.weight"]
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        assert a.untyped_storage().nbytes() == path.stat().st_size


def test_load_state_dict_dtype_and_device(tmp_path: Path) -> None:
    sd = {"w": torch.randn(4, 4), "step": torch.tensor([3], dtype=torch.int64)}
    path = write_safetensors(tmp_path / "m.safetensors", sd)
    out = load_state_dict(path, device="cpu", torch_dtype=torch.bfloat16)
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], sd["w"].bfloat16())
    assert out["step"].dtype == torch.int64 and torch.equal(out["step"], sd["step"])  # only floats are cast


def test_misaligned_data_is_copied_correctly(tmp_path: Path) -> None:
    sd = {"a": torch.arange(3, dtype=torch.uint8), "b": torch.randn(5), "c": torch.randn(2, 3).bfloat16()}
    path = write_safetensors(tmp_path / "odd.safetensors", sd, align=1)
    out = load_state_dict(path)
    assert all(torch.equal(out[k], v) for k, v in sd.items())


def test_shards_with_index(tmp_path: Path) -> None:
    sd = toy_state_dict()
    files = _shard(tmp_path, sd, n=3)
    expected = {k: tuple(v.shape) for k, v in sd.items()}
    assert read_shapes(files) == expected
    assert read_shapes(tmp_path) == expected  # the folder
    assert read_shapes(tmp_path / "model.safetensors.index.json") == expected
    header = read_checkpoint_header(tmp_path)
    assert header.index == tmp_path / "model.safetensors.index.json"
    assert len(header.files) == 3
    out = load_state_dict(files)
    assert all(torch.equal(out[k], v) for k, v in sd.items())


def test_missing_shard_is_named_before_anything_is_read(tmp_path: Path) -> None:
    files = _shard(tmp_path, toy_state_dict(), n=3)
    files[0].write_bytes(b"garbage")  # would fail header validation if it were read
    files[2].unlink()
    for source in (tmp_path, files[:2], [files[0]]):
        with pytest.raises(LoadError, match="model-00003-of-00003.safetensors") as info:
            read_shapes(source)
        assert "missing" in str(info.value)


def test_shard_not_given_and_stray_file(tmp_path: Path) -> None:
    files = _shard(tmp_path, toy_state_dict(), n=2)
    with pytest.raises(LoadError, match="not given: model-00002-of-00002"):
        read_shapes(files[0])
    stray = write_safetensors(tmp_path / "other.safetensors", {"z": torch.ones(1)})
    with pytest.raises(LoadError, match="not listed"):
        read_shapes([*files, stray])


def test_index_key_absent_from_its_shard(tmp_path: Path) -> None:
    sd = toy_state_dict()
    files = _shard(tmp_path, sd, n=2)
    index = tmp_path / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["ghost.weight"] = files[0].name
    index.write_text(json.dumps(doc))
    with pytest.raises(LoadError, match="ghost.weight"):
        read_shapes(tmp_path)


def test_shards_without_index_use_their_names(tmp_path: Path) -> None:
    files = _shard(tmp_path, toy_state_dict(), n=3, index=False)
    assert len(read_shapes(files)) == 32
    with pytest.raises(LoadError, match="model-00002-of-00003.safetensors"):
        read_shapes([files[0], files[2]])


def test_duplicate_key_across_shards(tmp_path: Path) -> None:
    a = write_safetensors(tmp_path / "a.safetensors", {"x": torch.ones(2), "y": torch.ones(1)})
    b = write_safetensors(tmp_path / "b.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(LoadError, match="'x' is in two files"):
        read_shapes([a, b])


def test_folder_prefers_the_plain_file_over_variants(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", {"a": torch.ones(2)})
    write_safetensors(tmp_path / "diffusion_pytorch_model.fp16.safetensors", {"a": torch.ones(2).half()})
    assert resolve_checkpoint_files(tmp_path) == [tmp_path / "diffusion_pytorch_model.safetensors"]
    write_safetensors(tmp_path / "other.safetensors", {"b": torch.ones(2)})
    with pytest.raises(LoadError, match="several checkpoints"):
        resolve_checkpoint_files(tmp_path)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="does not exist"):
        read_shapes(tmp_path / "nope.safetensors")
    with pytest.raises(LoadError, match="no file matches"):
        read_shapes(str(tmp_path / "*.safetensors"))
    with pytest.raises(LoadError, match="without weight files"):
        read_shapes(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(LoadError, match="unsupported checkpoint file type"):
        read_shapes(tmp_path / "m.gguf")
    with pytest.raises(LoadError):
        read_shapes([])


def test_glob(tmp_path: Path) -> None:
    _shard(tmp_path, toy_state_dict(), n=2, index=False)
    assert len(read_shapes(str(tmp_path / "model-*.safetensors"))) == 32


def test_save_safetensors_round_trip_and_alignment(tmp_path: Path) -> None:
    base = torch.randn(6, 4)
    sd = {
        "view_a": base[:3],
        "view_b": base[3:],
        "h": torch.randn(3).half(),
        "i": torch.arange(5),
        "s": torch.tensor(2.0),
    }
    path = save_safetensors(sd, tmp_path / "out" / "x.safetensors", {"format": "toy"})
    from safetensors.torch import load_file

    ref = load_file(path)  # the reference reader agrees
    assert all(torch.equal(ref[k], v) for k, v in sd.items())
    header = read_checkpoint_header(path)
    assert header.metadata == {"format": "toy"}
    with open_checkpoint(path) as ckpt:  # every tensor aligned: all zero-copy views
        ptr = {ckpt[k].untyped_storage().data_ptr() for k in ckpt}
    assert len(ptr) == 1
    assert not list((tmp_path / "out").glob("*.partial"))


# ---------------------------------------------------------------- pickles


def test_pickle_formats(tmp_path: Path) -> None:
    sd = toy_state_dict()
    torch.save(sd, tmp_path / "a.pth")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "b.ckpt")
    torch.save(sd, tmp_path / "c.pt", _use_new_zipfile_serialization=False)  # legacy: no mmap
    for name in ("a.pth", "b.ckpt", "c.pt"):
        out = load_state_dict(tmp_path / name)
        assert set(out) == set(sd) and all(torch.equal(out[k], v) for k, v in sd.items()), name
        assert read_shapes(tmp_path / name) == {k: tuple(v.shape) for k, v in sd.items()}


class _Evil:
    """Unpickling this creates a file (the classic pickle exploit)."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self) -> tuple:
        return (open, (self.target, "w"))


class _EvilShell:
    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("payload", [_Evil, _EvilShell])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, legacy: bool, payload: type) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    torch.save({"weight": torch.ones(2), "x": payload(target)}, path, _use_new_zipfile_serialization=not legacy)
    assert not target.exists()
    for load in (load_state_dict, read_shapes, load_pickle):
        with pytest.raises(LoadError, match="arbitrary code") as info:
            load(path)
        assert "safetensors" in str(info.value) and str(path) in str(info.value)
    assert not target.exists()


def test_corrupt_pickle(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(os.urandom(64))
    with pytest.raises(LoadError):
        load_state_dict(tmp_path / "x.bin")
    torch.save({"a": 1}, tmp_path / "y.pt")
    with pytest.raises(LoadError, match="no state dict"):
        load_state_dict(tmp_path / "y.pt")


def test_in_place_edits_never_reach_the_file(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "m.safetensors", {"a": torch.ones(64)})
    before = path.read_bytes()
    load_state_dict(path)["a"].add_(1)  # copy-on-write map: the process gets its own page
    assert path.read_bytes() == before
    assert torch.equal(load_state_dict(path)["a"], torch.ones(64))

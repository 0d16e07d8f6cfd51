"""ModelConfig on local files: validation, globs, shard lists, folders, shard completeness, lightness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import difforge
from difforge.errors import ConfigError, LoadError
from difforge.loading.model_config import ModelConfig, check_shards


def touch(root: Path, *names: str) -> list[str]:
    paths = []
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
        paths.append(str(root / name))
    return paths


# ---------------------------------------------------------------- validation


def test_needs_path_or_model_id() -> None:
    with pytest.raises(ConfigError, match=r"path=.*model_id="):
        ModelConfig()
    with pytest.raises(ConfigError, match="at least one"):
        ModelConfig(path=[])


def test_pattern_without_model_id() -> None:
    with pytest.raises(ConfigError, match="needs model_id"):
        ModelConfig(origin_file_pattern="*.safetensors")


def test_bad_model_name_and_source() -> None:
    with pytest.raises(ConfigError, match="model="):
        ModelConfig(path="x.safetensors", model="")
    with pytest.raises(ConfigError, match="'modelscope'"):
        ModelConfig(model_id="a/b", download_source="s3")


def test_lazy_export_and_fields(tmp_path: Path) -> None:
    assert difforge.ModelConfig is ModelConfig
    assert difforge.fetch_model.__module__ == "difforge.loading.model_config"
    config = ModelConfig(path=tmp_path / "w.safetensors", model="flux-dit", offload_device="cpu",
                         offload_dtype="float8_e4m3fn", computation_device="cuda")
    assert config.path == str(tmp_path / "w.safetensors")  # PathLike accepted, stored as str
    assert config.vram_config() == {"offload_device": "cpu", "offload_dtype": "float8_e4m3fn",
                                    "computation_device": "cuda"}
    assert "flux-dit" in repr(config) and "preparing_device" not in repr(config)


# ---------------------------------------------------------------- local paths


def test_single_file_and_missing_file(tmp_path: Path) -> None:
    (path,) = touch(tmp_path, "w.safetensors")
    assert ModelConfig(path=path).paths() == [path]
    with pytest.raises(LoadError, match="does not exist"):
        ModelConfig(path=str(tmp_path / "nope.safetensors")).paths()


def test_glob_is_expanded_and_sorted(tmp_path: Path) -> None:
    shards = touch(tmp_path, "t5/model-00002-of-00002.safetensors", "t5/model-00001-of-00002.safetensors")
    touch(tmp_path, "t5/model-00003-of-00002.safetensors.incomplete")
    assert ModelConfig(path=str(tmp_path / "t5/model-*.safetensors*")).paths() == sorted(shards)
    with pytest.raises(LoadError, match="no file matches"):
        ModelConfig(path=str(tmp_path / "t5/*.bin")).paths()


def test_list_of_shards_keeps_its_order(tmp_path: Path) -> None:
    a, b = touch(tmp_path, "model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors")
    assert ModelConfig(path=[a, b]).paths() == [a, b]


def test_folder_gives_weight_files_and_keeps_folder(tmp_path: Path) -> None:
    touch(tmp_path, "te/config.json", "te/model.safetensors", "te/pytorch_model.bin", "te/.hidden.safetensors")
    config = ModelConfig(path=str(tmp_path / "te"))
    assert config.paths() == [str(tmp_path / "te/model.safetensors")]  # safetensors preferred over .bin
    assert config.folder == str(tmp_path / "te")
    touch(tmp_path, "old/a.pth", "old/b.ckpt", "old/notes.txt")
    assert ModelConfig(path=str(tmp_path / "old")).paths() == [str(tmp_path / "old/a.pth"), str(tmp_path / "old/b.ckpt")]
    touch(tmp_path, "tok/vocab.json")
    tok = ModelConfig(path=str(tmp_path / "tok"))
    assert tok.paths() == [] and tok.folder == str(tmp_path / "tok")
    assert ModelConfig(path=str(tmp_path / "te/model.safetensors")).folder is None


# ---------------------------------------------------------------- shard completeness


def test_missing_shard_by_name_pattern(tmp_path: Path) -> None:
    a, c = touch(tmp_path, "m-00001-of-00003.safetensors", "m-00003-of-00003.safetensors")
    with pytest.raises(LoadError, match=r"m-00002-of-00003\.safetensors \(shard 2 of 3\)"):
        ModelConfig(path=[a, c]).paths()


def test_missing_shard_by_index(tmp_path: Path) -> None:
    (shard,) = touch(tmp_path, "tr/part-a.safetensors")
    index = {"weight_map": {"x": "part-a.safetensors", "y": "part-b.safetensors"}}
    (tmp_path / "tr/model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match=r"part-b\.safetensors \(listed in model\.safetensors\.index\.json\)"):
        ModelConfig(path=shard).paths()
    with pytest.raises(LoadError, match="part-b"):
        ModelConfig(path=str(tmp_path / "tr")).paths()
    touch(tmp_path, "tr/part-b.safetensors")
    assert len(ModelConfig(path=str(tmp_path / "tr")).paths()) == 2


def test_unrelated_or_broken_index(tmp_path: Path) -> None:
    (single,) = touch(tmp_path, "single.safetensors")
    (tmp_path / "other.index.json").write_text(json.dumps({"weight_map": {"k": "elsewhere.safetensors"}}))
    check_shards([single])  # an index that names none of the files is not this checkpoint's
    (tmp_path / "bad.index.json").write_text("{not json")
    check_shards([single])  # an unreadable index beside the file is only warned about
    with pytest.raises(LoadError, match=r"bad\.index\.json is unreadable"):
        check_shards([single, str(tmp_path / "bad.index.json")])


# ---------------------------------------------------------------- lightness


def test_import_difforge_imports_no_hub_library() -> None:
    code = (
        "import sys, difforge\n"
        "difforge.ModelConfig, difforge.fetch_model\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'modelscope', 'huggingface_hub'})\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFORGE_")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)

"""fetch_model / ModelConfig downloads against a fake hub client at the library boundary.

Fake ``modelscope`` and ``huggingface_hub`` modules are put into ``sys.modules``, so the tests
neither touch the network nor pay modelscope's import time; their ``snapshot_download`` writes the
files of an in-memory repository that match ``allow_patterns`` into ``local_dir``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from difforge.errors import ConfigError, LoadError
from difforge.loading.model_config import ModelConfig, fetch_model

ENV_NAMES = [
    f"{prefix}_{name}"
    for prefix in ("DIFFORGE", "DIFFSYNTH")
    for name in ("MODEL_BASE_PATH", "SKIP_DOWNLOAD", "DOWNLOAD_SOURCE")
]

REPO = "org/repo"
FILES = {
    "model.safetensors": b"weights",
    "vae/diffusion_pytorch_model.safetensors": b"vae",
    "tokenizer/vocab.json": b"{}",
    "tokenizer/merges.txt": b"",
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": b"s1",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors": b"s2",
    "transformer/diffusion_pytorch_model.safetensors.index.json": json.dumps(
        {
            "weight_map": {
                "a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                "b": "diffusion_pytorch_model-00002-of-00002.safetensors",
            }
        }
    ).encode(),
}


@dataclass
class FakeHub:
    """One fake hub library: records calls and writes matching repository files."""

    library: str
    repos: dict[str, dict[str, bytes]] = field(default_factory=lambda: {REPO: dict(FILES)})
    calls: list[dict[str, Any]] = field(default_factory=list)
    #: called instead of a normal download when set (to simulate failures)
    behaviour: Callable[[str, dict[str, bytes], Path, list[str] | None], None] | None = None

    def snapshot_download(self, model_id: str | None = None, *, repo_id: str | None = None, **kw: Any) -> str:
        repo = model_id if self.library == "modelscope" else repo_id
        assert repo is not None
        self.calls.append({"repo": repo, **kw})
        local_dir, patterns = Path(kw["local_dir"]), kw.get("allow_patterns")
        files = {
            name: data
            for name, data in self.repos[repo].items()
            if patterns is None or any(fnmatch.fnmatch(name, p) for p in patterns)
        }
        if self.behaviour is not None:
            self.behaviour(repo, files, local_dir, patterns)
        else:
            write(local_dir, files)
        return str(local_dir)


def write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


@pytest.fixture
def hubs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, FakeHub]:
    """Both fake hub libraries installed; a clean environment with the base path in tmp_path."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    fakes = {}
    for library in ("modelscope", "huggingface_hub"):
        fake = FakeHub(library)
        module = types.ModuleType(library)
        module.snapshot_download = fake.snapshot_download  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, library, module)
        fakes[library] = fake
    return fakes


def _only(hubs: dict[str, FakeHub], library: str) -> dict[str, Any]:
    other = "huggingface_hub" if library == "modelscope" else "modelscope"
    assert hubs[other].calls == []
    assert len(hubs[library].calls) == 1
    return hubs[library].calls[0]


# ---------------------------------------------------------------- sources


def test_default_source_is_modelscope_under_models(hubs: dict[str, FakeHub], tmp_path: Path) -> None:
    result = fetch_model(REPO, "model.safetensors")
    assert result == os.path.join(".", "models", "org", "repo", "model.safetensors")
    assert (tmp_path / "models/org/repo/model.safetensors").read_bytes() == b"weights"
    call = _only(hubs, "modelscope")
    assert call["repo"] == REPO and call["allow_patterns"] == ["model.safetensors"]
    assert call["local_dir"] == os.path.join(".", "models", "org", "repo") and call["revision"] is None


def test_huggingface_by_argument(hubs: dict[str, FakeHub]) -> None:
    fetch_model(REPO, "model.safetensors", download_source="huggingface", revision="v2")
    call = _only(hubs, "huggingface_hub")
    assert call["repo"] == REPO and call["revision"] == "v2"


@pytest.mark.parametrize("var", ["DIFFORGE_DOWNLOAD_SOURCE", "DIFFSYNTH_DOWNLOAD_SOURCE"])
def test_huggingface_by_environment(hubs: dict[str, FakeHub], monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    monkeypatch.setenv(var, "HuggingFace")
    ModelConfig(model_id=REPO, origin_file_pattern="model.safetensors").download_if_necessary()
    _only(hubs, "huggingface_hub")


def test_difforge_variable_wins_over_alias_and_argument_over_both(
    hubs: dict[str, FakeHub], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIFFORGE_DOWNLOAD_SOURCE", "modelscope")
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "huggingface")
    fetch_model(REPO, "model.safetensors")
    _only(hubs, "modelscope")
    fetch_model(REPO, "model.safetensors", download_source="hf")
    assert len(hubs["huggingface_hub"].calls) == 1


def test_unknown_source_is_a_config_error(hubs: dict[str, FakeHub], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="download_source"):
        ModelConfig(model_id=REPO, download_source="civitai")
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "civitai")
    with pytest.raises(ConfigError, match="DIFFSYNTH_DOWNLOAD_SOURCE"):
        fetch_model(REPO, "model.safetensors")


# ---------------------------------------------------------------- base path


@pytest.mark.parametrize("var", ["DIFFORGE_MODEL_BASE_PATH", "DIFFSYNTH_MODEL_BASE_PATH"])
def test_base_path_from_environment(
    hubs: dict[str, FakeHub], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, var: str
) -> None:
    monkeypatch.setenv(var, str(tmp_path / "store"))
    result = fetch_model(REPO, "model.safetensors")
    assert result == str(tmp_path / "store/org/repo/model.safetensors")
    assert hubs["modelscope"].calls[0]["local_dir"] == str(tmp_path / "store/org/repo")


def test_base_path_precedence(hubs: dict[str, FakeHub], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIFFORGE_MODEL_BASE_PATH", str(tmp_path / "a"))
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "b"))
    assert fetch_model(REPO, "model.safetensors") == str(tmp_path / "a/org/repo/model.safetensors")
    explicit = fetch_model(REPO, "model.safetensors", local_model_path=str(tmp_path / "c"))
    assert explicit == str(tmp_path / "c/org/repo/model.safetensors")


# ---------------------------------------------------------------- skip download


def test_download_is_attempted_even_when_files_exist(hubs: dict[str, FakeHub], tmp_path: Path) -> None:
    write(tmp_path / "models" / REPO, {"model.safetensors": b"old"})
    fetch_model(REPO, "model.safetensors")
    assert len(hubs["modelscope"].calls) == 1  # the client completes / checks the local files


@pytest.mark.parametrize(("var", "value"), [("DIFFORGE_SKIP_DOWNLOAD", "1"), ("DIFFSYNTH_SKIP_DOWNLOAD", "True")])
def test_skip_download_uses_local_files_without_client(
    hubs: dict[str, FakeHub], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, var: str, value: str
) -> None:
    write(tmp_path / "models" / REPO, {"model.safetensors": b"local"})
    monkeypatch.setenv(var, value)
    assert Path(fetch_model(REPO, "model.safetensors")).read_bytes() == b"local"
    assert hubs["modelscope"].calls == [] and hubs["huggingface_hub"].calls == []


def test_skip_download_without_files_explains(hubs: dict[str, FakeHub], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFORGE_SKIP_DOWNLOAD", "true")
    with pytest.raises(LoadError, match="DIFFORGE_SKIP_DOWNLOAD") as info:
        fetch_model(REPO, "model.safetensors")
    assert REPO in str(info.value)
    assert hubs["modelscope"].calls == []


def test_skip_download_argument_overrides_environment(hubs: dict[str, FakeHub], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFORGE_SKIP_DOWNLOAD", "1")
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "0")  # the DIFFORGE_ name wins
    fetch_model(REPO, "model.safetensors", skip_download=False)
    assert len(hubs["modelscope"].calls) == 1
    monkeypatch.setenv("DIFFORGE_SKIP_DOWNLOAD", "maybe")
    with pytest.raises(ConfigError, match="DIFFORGE_SKIP_DOWNLOAD"):
        fetch_model(REPO, "model.safetensors")


def test_model_config_with_path_never_downloads(hubs: dict[str, FakeHub], tmp_path: Path) -> None:
    write(tmp_path, {"w.safetensors": b"x"})
    config = ModelConfig(path=str(tmp_path / "w.safetensors"), model_id=REPO)
    assert config.paths() == [str(tmp_path / "w.safetensors")]
    assert hubs["modelscope"].calls == []


# ---------------------------------------------------------------- incomplete downloads


def _interrupted(repo: str, files: dict[str, bytes], local_dir: Path, patterns: list[str] | None) -> None:
    """Writes the first file, leaves the second half-written under a temporary name, then fails."""
    names = sorted(files)
    write(local_dir, {names[0]: files[names[0]]})
    write(local_dir, {names[1] + ".incomplete": files[names[1]][:1]})
    write(local_dir, {".cache/huggingface/download/" + names[1] + ".part": b""})
    raise ConnectionError("connection reset by peer")


def test_interrupted_download_is_an_error_and_never_used(
    hubs: dict[str, FakeHub], monkeypatch: pytest.MonkeyPatch
) -> None:
    hubs["modelscope"].behaviour = _interrupted
    with pytest.raises(LoadError) as info:
        fetch_model(REPO, "transformer/*")
    message = str(info.value)
    assert REPO in message and "ConnectionError" in message and "Run again" in message

    # offline afterwards: the half-finished pattern is refused, not taken as complete
    monkeypatch.setenv("DIFFORGE_SKIP_DOWNLOAD", "1")
    with pytest.raises(LoadError, match="interrupted"):
        fetch_model(REPO, "transformer/*")

    # a retry that succeeds completes it; no leftover is returned
    monkeypatch.delenv("DIFFORGE_SKIP_DOWNLOAD")
    hubs["modelscope"].behaviour = None
    result = fetch_model(REPO, "transformer/*")
    assert [os.path.basename(p) for p in result] == sorted(n.split("/")[1] for n in FILES if n.startswith("transformer/"))
    monkeypatch.setenv("DIFFORGE_SKIP_DOWNLOAD", "1")
    assert fetch_model(REPO, "transformer/*") == result


def test_leftover_temporaries_are_not_returned(hubs: dict[str, FakeHub], tmp_path: Path) -> None:
    def download_with_leftovers(repo: str, files: dict[str, bytes], local_dir: Path, patterns: Any) -> None:
        write(local_dir, files)
        write(local_dir, {"vae/other.safetensors.part": b"", "vae/x.tmp": b"", "vae/._____temp/y.safetensors": b""})

    hubs["modelscope"].behaviour = download_with_leftovers
    config = ModelConfig(model_id=REPO, origin_file_pattern="vae/*")
    assert config.paths() == [os.path.join(".", "models", "org", "repo", "vae", "diffusion_pytorch_model.safetensors")]


def test_nothing_matching_after_download(hubs: dict[str, FakeHub]) -> None:
    with pytest.raises(LoadError, match=r"org/repo.*'missing\*\.safetensors'"):
        fetch_model(REPO, "missing*.safetensors")


def test_missing_shard_is_named(hubs: dict[str, FakeHub]) -> None:
    del hubs["modelscope"].repos[REPO]["transformer/diffusion_pytorch_model-00002-of-00002.safetensors"]
    with pytest.raises(LoadError, match="diffusion_pytorch_model-00002-of-00002.safetensors"):
        fetch_model(REPO, "transformer/*.safetensors")


def test_missing_shard_when_the_index_is_matched(hubs: dict[str, FakeHub]) -> None:
    del hubs["modelscope"].repos[REPO]["transformer/diffusion_pytorch_model-00001-of-00002.safetensors"]
    with pytest.raises(LoadError, match=r"00001-of-00002\.safetensors \(listed in"):
        ModelConfig(model_id=REPO, origin_file_pattern="transformer/").paths()


# ---------------------------------------------------------------- patterns and results


def test_glob_pattern_returns_sorted_list(hubs: dict[str, FakeHub]) -> None:
    result = fetch_model(REPO, "transformer/diffusion_pytorch_model*.safetensors")
    assert isinstance(result, list) and [os.path.basename(p) for p in result] == [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ]


def test_engine_spelling_path_list_keeps_order(hubs: dict[str, FakeHub]) -> None:
    names = ["vae/diffusion_pytorch_model.safetensors", "model.safetensors"]
    result = fetch_model(REPO, path=names)
    assert [p.split(os.sep + "repo" + os.sep)[1].replace(os.sep, "/") for p in result] == names
    assert hubs["modelscope"].calls[0]["allow_patterns"] == names
    with pytest.raises(ConfigError, match="give one"):
        fetch_model(REPO, "model.safetensors", path="model.safetensors")


def test_subfolder_pattern_gives_the_folder(hubs: dict[str, FakeHub]) -> None:
    config = ModelConfig(model_id=REPO, origin_file_pattern="tokenizer/")
    assert config.paths() == []  # no weights in a tokenizer folder
    assert config.folder == os.path.join(".", "models", "org", "repo", "tokenizer") == config.path
    assert hubs["modelscope"].calls[0]["allow_patterns"] == ["tokenizer/*"]
    assert fetch_model(REPO, "tokenizer/") == config.folder


def test_no_pattern_fetches_the_whole_repository(hubs: dict[str, FakeHub]) -> None:
    config = ModelConfig(model_id=REPO)
    config.download_if_necessary()
    assert hubs["modelscope"].calls[0]["allow_patterns"] is None
    assert config.folder == os.path.join(".", "models", "org", "repo")
    assert [os.path.basename(p) for p in config.paths()] == ["model.safetensors"]


def test_download_if_necessary_sets_path_once(hubs: dict[str, FakeHub]) -> None:
    config = ModelConfig(model_id=REPO, origin_file_pattern="model.safetensors")
    path = config.download_if_necessary()
    assert config.path == path and config.download_if_necessary() == path
    assert len(hubs["modelscope"].calls) == 1

"""difforge_sdk.tiny (tiny configs, seeded random checkpoints in every format) and difforge_sdk.parity."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

import difforge
import difforge_sdk.toy
from difforge import ConfigError
from difforge.plugins import PluginSettings
from difforge_sdk import parity, tiny
from difforge_sdk.toy.models import ToyDiTConfig


@pytest.fixture(autouse=True)
def toy_registry() -> Iterator[Any]:
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_sdk.toy])
    yield host.registry
    difforge.reload_plugins()


def test_formats_of_a_model() -> None:
    formats = tiny.formats("toy-dit")
    assert list(formats) == ["toy", "toy-diffusers"] and formats["toy"] is None
    assert formats["toy-diffusers"].name == "toy-dit-diffusers"


@pytest.mark.parametrize("fmt", ["toy", "toy-diffusers"])
def test_written_checkpoints_are_detected_and_load(tmp_path: Path, fmt: str) -> None:
    path = tiny.write_checkpoint("toy-dit", tmp_path, format=fmt, seed=3)
    assert path.name == f"toy-dit.{fmt}.safetensors"
    det = difforge.detect(path)
    assert (det.model, det.format, det.config) == ("toy-dit", fmt, tiny.tiny_config("toy-dit"))
    loaded = difforge.load_model(path)
    want = tiny.random_model("toy-dit", seed=3).state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in want.items())


def test_random_models_are_seeded_and_fully_random() -> None:
    a, b, c = (tiny.random_model("toy-dit", seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.blocks[0].modulation.weight, c.blocks[0].modulation.weight)
    assert all(p.abs().sum() > 0 for p in a.parameters())  # nothing left zero-initialised
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_tiny_configs_registered_and_first_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny, "_TINY", {})
    assert tiny.tiny_config("toy_dit") == ToyDiTConfig(depth=2)  # first-party default
    tiny.register_tiny("toy-dit", ToyDiTConfig(depth=1))
    assert tiny.tiny_config("toy-dit").depth == 1
    with pytest.raises(ConfigError, match="register_tiny"):
        tiny.tiny_config("my-new-dit")
    with pytest.raises(ConfigError, match="its formats: toy, toy-diffusers"):
        tiny.write_checkpoint("toy-dit", tmp_path, format="nope")


def test_tokenizers(tmp_path: Path) -> None:
    pytest.importorskip("difforge_text_encoders")
    folder = tiny.write_tokenizer("clip-tokenizer", tmp_path / "tok")
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    with pytest.raises(ConfigError, match="known: clip-tokenizer, t5-tokenizer"):
        tiny.write_tokenizer("gpt-tokenizer", tmp_path / "x")


class Out(NamedTuple):
    hidden: torch.Tensor
    pooled: torch.Tensor | None


def test_parity_reports_every_output() -> None:
    ref = Out(torch.ones(2, 3), torch.zeros(2))
    report = parity.compare(Out(torch.ones(2, 3) + 1e-6, torch.zeros(2)), ref, atol=1e-5, name="ours vs ref")
    assert report.ok and report.max_abs == pytest.approx(1e-6, rel=0.1)
    bad = parity.compare({"hidden": torch.ones(2, 3)}, {"hidden": torch.ones(2, 3) * 2, "extra": torch.ones(1)})
    assert not bad.ok and "missing output output['extra']" in str(bad)
    with pytest.raises(AssertionError, match=r"output\.hidden \[2, 3\]: max abs diff 0\.5"):
        parity.assert_close(Out(torch.ones(2, 3) * 1.5, None), Out(torch.ones(2, 3), None), name="x")
    shape = parity.compare(torch.ones(2), torch.ones(3))
    assert not shape.ok and "shape [2], reference [3]" in str(shape)
    nan = parity.compare(torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, 1.0]))
    assert not nan.ok and "non-finite" in str(nan)

"""`make demo`: the trained shapes model by default (files detected as FLUX.1 components, a picture of what
the prompt says), real models through ``Pipeline.from_pretrained`` with default sources (routing checked
with a mock), and the tiny random checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import difforge
from difforge import ModelConfig
from difforge_sdk import demo
from difforge_sdk.shapes import MODEL_DIR
from difforge_sdk.shapes.data import classify, prompt_colors
from difforge_sdk.shapes.train_demo_model import model_files


@pytest.fixture(scope="module", autouse=True)
def _threads() -> Any:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _plugins() -> Any:
    difforge.reload_plugins()
    yield
    difforge.reload_plugins()


def test_shapes_model_files_are_detected_as_flux_components():
    files = model_files(MODEL_DIR)
    expected = {"dit": ("flux-dit", "bfl"), "vae": ("flux-ae", "bfl"), "text_encoder": ("clip-text", "transformers"),
                "text_encoder_2": ("t5-encoder", "transformers")}
    for slot, (model, fmt) in expected.items():
        r = difforge.detect(str(files[slot]))
        assert (r.model, r.format, r.variant) == (model, fmt, None), slot
    assert (MODEL_DIR / "MODEL_CARD.md").is_file() and (MODEL_DIR / "loss.png").is_file()


@pytest.mark.parametrize("prompt", ["a yellow triangle on a purple background", "a white circle on a green background"])
def test_demo_draws_what_the_prompt_says(tmp_path, capsys, prompt):
    assert demo.main(["--out", str(tmp_path), "--prompt", prompt]) == 0
    image = Image.open(tmp_path / "demo.png")
    assert image.size == (64, 64)
    assert classify(image) == prompt_colors(prompt)
    assert "read back from the pixels" in capsys.readouterr().out


def test_model_id_goes_to_from_pretrained_with_default_sources(tmp_path, monkeypatch, capsys):
    calls: dict[str, Any] = {}

    class FakePipe:
        def __call__(self, prompt: str, **kw: Any) -> Image.Image:
            calls["call"] = (prompt, kw)
            return Image.new("RGB", (16, 16))

    def fake(name: str, model_configs: Any = None, **kw: Any) -> FakePipe:
        calls["from_pretrained"] = (name, model_configs, kw)
        return FakePipe()

    monkeypatch.setattr(difforge.Pipeline, "from_pretrained", staticmethod(fake))
    argv = ["--out", str(tmp_path), "--model", "black-forest-labs/FLUX.1-dev", "--prompt", "a cat", "--steps", "28"]
    assert demo.main(argv) == 0
    name, configs, kw = calls["from_pretrained"]
    assert name == "flux" and len(configs) == 1 and isinstance(configs[0], ModelConfig)
    assert configs[0].model_id == "black-forest-labs/FLUX.1-dev" and not configs[0].origin_file_pattern
    assert calls["call"] == ("a cat", {"seed": 0, "num_inference_steps": 28})
    assert (tmp_path / "demo.png").is_file()
    # a folder goes in as a path
    folder = tmp_path / "FLUX.1-dev"
    folder.mkdir()
    assert demo.main(["--out", str(tmp_path), "--model", str(folder), "--pipeline", "flux"]) == 0
    assert calls["from_pretrained"][1] == [str(folder)]


def test_tiny_random_checkpoints_still_run(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--model", "tiny-random"]) == 0
    assert Image.open(tmp_path / "demo.png").size == (256, 256)
    out = capsys.readouterr().out
    assert "wrote" in out and "noise" in out


def test_shapes_model_ships_with_the_sdk():
    text = (Path(demo.__file__).parent.parent / "pyproject.toml").read_text()
    assert "shapes/model/" in text

"""`make demo` keeps working: tiny FLUX.1 files in real layouts are detected, assembled and run."""

from __future__ import annotations

from PIL import Image

import difforge
from difforge_sdk import demo


def test_demo_writes_an_image(tmp_path, capsys):
    try:
        assert demo.main(["--out", str(tmp_path)]) == 0
    finally:
        difforge.reload_plugins()
    image = Image.open(tmp_path / "demo.png")
    assert image.size == (256, 256)
    out = capsys.readouterr().out
    assert "wrote" in out and "noise" in out

"""convert_checkpoint and the `difforge detect` / `difforge convert` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import difforge
from difforge.cli import main
from difforge.errors import ConversionError
from difforge.loading.convert import convert_checkpoint
from difforge.loading.state_dict import load_state_dict, read_checkpoint_header

from .loading_helpers import to_diffusers, toy_state_dict, write_safetensors

pytestmark = pytest.mark.usefixtures("toy_registry")


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_round_trip_own_diffusers_own_is_bit_identical(tmp_path: Path) -> None:
    sd = {k: v.bfloat16() for k, v in toy_state_dict().items()}
    own = write_safetensors(tmp_path / "own.safetensors", sd)
    diff = convert_checkpoint(own, to_format="toy-diffusers", output=tmp_path / "diff.safetensors")
    assert diff == tmp_path / "diff.safetensors"
    assert _equal(load_state_dict(diff), to_diffusers(sd))
    header = read_checkpoint_header(diff)
    assert header.metadata["difforge_format"] == "toy-diffusers" and header.metadata["format"] == "pt"
    assert difforge.detect(diff).format == "toy-diffusers"
    back = convert_checkpoint([diff], to_format="toy", output=tmp_path / "back.safetensors")
    assert _equal(load_state_dict(back), sd)
    assert difforge.fingerprint(back) == difforge.fingerprint(own)


def test_prefix_is_dropped_and_same_format_is_a_copy(tmp_path: Path) -> None:
    sd = toy_state_dict()
    comfy = write_safetensors(tmp_path / "comfy.safetensors", {"model.diffusion_model." + k: v for k, v in sd.items()})
    out = convert_checkpoint(comfy, to_format="toy", output=tmp_path)  # a folder: a name is chosen
    assert out.parent == tmp_path and out.suffix == ".safetensors"
    assert _equal(load_state_dict(out), sd)


def test_unknown_format_lists_the_available_ones(own_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="formats available for it: toy, toy-diffusers"):
        convert_checkpoint(own_file, to_format="bfl", output=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- CLI


def test_cli_detect(own_file: Path, diffusers_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["detect", str(own_file), str(diffusers_file), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["format"], r["variant"]) for r in rows] == [
        ("toy-dit", "toy", "Toy-1"),
        ("toy-dit", "toy-diffusers", "Toy-1"),
    ]
    assert rows[0]["config"]["hidden_size"] == 32 and rows[0]["seconds"] < 5
    assert main(["detect", str(own_file)]) == 0
    out = capsys.readouterr().out
    assert "toy-dit" in out and "Toy-1" in out and "seconds" in out


def test_cli_detect_shards_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd = toy_state_dict()
    keys = sorted(sd)
    a = write_safetensors(tmp_path / "a.safetensors", {k: sd[k] for k in keys[:10]})
    b = write_safetensors(tmp_path / "b.safetensors", {k: sd[k] for k in keys[10:]})
    assert main(["detect", "--together", "--json", str(a), str(b)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["variant"] == "Toy-1" and len(row["paths"]) == 2


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = write_safetensors(tmp_path / "junk.safetensors", {"foo.weight": torch.zeros(2)})
    assert main(["detect", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("difforge: error: ") and "not recognised" in err
    assert main(["convert", str(junk), "--to", "toy", "-o", str(tmp_path / "o.safetensors")]) == 2


def test_cli_convert(own_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-diff.safetensors"
    assert main(["convert", str(own_file), "--to", "toy-diffusers", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert difforge.detect(out).format == "toy-diffusers"
    assert main(["convert", str(own_file), "--to", "nope", "-o", str(tmp_path / "n.safetensors")]) == 2
    assert "toy-diffusers" in capsys.readouterr().err


def test_meta_shape_tracing_does_not_import_dynamo(tmp_path):
    """Detecting a converted-layout file must not pay torch's meta `cat` (which imports torch._dynamo)."""
    import subprocess
    import sys

    from difforge_sdk.toy.checkpoints import write_toy_checkpoints

    files = write_toy_checkpoints(tmp_path, dit_format="toy-diffusers")
    code = (
        "import sys, difforge, difforge_sdk.toy\n"
        "difforge.reload_plugins(plugins=[difforge_sdk.toy])\n"
        f"r = difforge.detect({str(files['dit'])!r})\n"
        "m = difforge.load_model(r.paths, detection=r)\n"
        "assert r.converter == 'toy-dit-diffusers', r\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

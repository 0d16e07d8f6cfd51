"""LoRA-carried settings (scheduler, call defaults) and fused LoRAs across offload changes, on the toy pipeline.

- ``load_lora(scheduler=...)`` and the ``difforge.scheduler`` / ``difforge.call_defaults`` metadata set the
  pipeline's sampler and call defaults while the LoRA is loaded; clearing restores what was there
  (in any order, several LoRAs, unless changed by hand since); export and ``convert_lora`` keep the metadata.
- ``set_offload`` with a fused LoRA: the LoRA leaves the weights while the backends change and comes back
  fused or hot; clearing afterwards restores the original weights bit for bit (fp8: after ``set_offload(None)``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import difforge
from difforge import ConfigError
from difforge.lora import convert_lora, lora_manager, read_lora

from .conftest import CALL
from .lora_helpers import DIT_MODULES, random_lora, write

LIGHTNING = {"name": "flow-euler", "shift": 5.0}


def _weights(pipe: difforge.Pipeline) -> dict[tuple[str, str], torch.Tensor]:
    return {(s, k): t.detach().clone() for s, m in pipe.models().items() for k, t in m.state_dict().items()}


def _same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _with_metadata(sd: dict[str, torch.Tensor], path: Path, **metadata: Any) -> Path:
    save_file(sd, str(path), {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return path


@pytest.fixture
def sd(build: Any) -> dict[str, torch.Tensor]:
    return random_lora(build().components["dit"], DIT_MODULES, "toy.", seed=1)


def test_scheduler_argument_and_metadata(build, sd, tmp_path, caplog):
    pipe = build()
    default_sched, default_choice = pipe.scheduler, pipe.scheduler_choice
    base = pipe(**CALL)
    caplog.set_level(logging.INFO, logger="difforge.lora")
    pipe.load_lora(write(sd, tmp_path / "plain.safetensors"), scheduler=LIGHTNING)
    assert pipe.scheduler_choice.as_arg() == LIGHTNING and pipe.scheduler.shift == 5.0
    assert "sets the scheduler to {'name': 'flow-euler', 'shift': 5.0}" in caplog.text
    lightning = pipe(**CALL)
    pipe.clear_lora()
    assert pipe.scheduler is default_sched and pipe.scheduler_choice is default_choice
    assert torch.equal(pipe(**CALL), base)

    # the same setting from the file's metadata; the export keeps it, convert_lora too
    carried = _with_metadata(sd, tmp_path / "lightning.safetensors", **{"difforge.scheduler": LIGHTNING})
    pipe.load_lora(carried, name="l")
    assert pipe.scheduler.shift == 5.0 and torch.equal(pipe(**CALL), lightning)
    exported = pipe.export_lora("l", tmp_path / "exported.safetensors", format="toy")
    assert json.loads(read_lora(exported).metadata["difforge.scheduler"]) == LIGHTNING
    converted = convert_lora(carried, "toy", tmp_path / "converted.safetensors")
    assert json.loads(read_lora(converted).metadata["difforge.scheduler"]) == LIGHTNING
    pipe.clear_lora()
    assert pipe.scheduler is default_sched

    # an explicit argument wins; False ignores the metadata; a bare name without JSON quotes is read
    pipe.load_lora(carried, scheduler={"name": "flow-unipc", "shift": 3.0})
    assert pipe.scheduler_choice.name == "flow-unipc"
    pipe.clear_lora()
    pipe.load_lora(carried, scheduler=False)
    assert pipe.scheduler is default_sched
    pipe.clear_lora()
    pipe.load_lora(_with_metadata(sd, tmp_path / "bare.safetensors", **{"difforge.scheduler": "flow-unipc"}))
    assert pipe.scheduler_choice.name == "flow-unipc"
    pipe.clear_lora()
    assert pipe.scheduler is default_sched

    # bad values fail before any weight changes
    before = _weights(pipe)
    with pytest.raises(ConfigError, match="scheduler"):
        pipe.load_lora(carried, scheduler={"name": "flow-euler", "bogus": 1})
    with pytest.raises(ConfigError, match="not JSON"):
        pipe.load_lora(_with_metadata(sd, tmp_path / "bad.safetensors", **{"difforge.scheduler": "{oops"}))
    with pytest.raises(ConfigError, match="scheduler must be"):
        pipe.load_lora(carried, scheduler=3)
    assert _same_bits(_weights(pipe), before) and not lora_manager(pipe).loras
    assert pipe.scheduler is default_sched


def test_several_scheduler_loras_restore_in_any_order(build, sd, tmp_path):
    pipe = build()
    default_sched = pipe.scheduler
    path = write(sd, tmp_path / "x.safetensors")
    pipe.load_lora(path, name="a", scheduler={"name": "flow-euler", "shift": 4.0})
    a_sched = pipe.scheduler
    pipe.load_lora(path, name="b", scheduler={"name": "flow-euler", "shift": 6.0})
    pipe.clear_lora("a")  # not in force: b stays, and will restore what was before a
    assert pipe.scheduler.shift == 6.0
    pipe.clear_lora("b")
    assert pipe.scheduler is default_sched and a_sched is not default_sched
    # changed by hand after loading: clearing leaves the user's choice alone
    pipe.load_lora(path, name="c", scheduler=LIGHTNING)
    pipe.set_scheduler({"name": "flow-unipc", "shift": 2.0})
    pipe.clear_lora("c")
    assert pipe.scheduler_choice.name == "flow-unipc"


def test_call_defaults_metadata(build, sd, tmp_path):
    pipe = build()
    steps2 = pipe(**CALL)  # num_inference_steps=2 given explicitly
    default = pipe(**{k: v for k, v in CALL.items() if k != "num_inference_steps"})  # the toy's 4
    path = _with_metadata(sd, tmp_path / "fast.safetensors", **{"difforge.call_defaults": {"num_inference_steps": 2}})
    pipe.load_lora(path, fuse=False, scale=0.0)  # scale 0: only the defaults matter
    assert pipe.call_defaults == {"num_inference_steps": 2}
    assert torch.equal(pipe(**{k: v for k, v in CALL.items() if k != "num_inference_steps"}), steps2)
    exported = pipe.export_lora("fast", tmp_path / "again.safetensors", format="toy")
    assert json.loads(read_lora(exported).metadata["difforge.call_defaults"]) == {"num_inference_steps": 2}
    pipe.clear_lora()
    assert "call_defaults" not in pipe.__dict__
    assert torch.equal(pipe(**{k: v for k, v in CALL.items() if k != "num_inference_steps"}), default)


@pytest.mark.parametrize("offload", [["fp8"], ["sequential"], ["fp8", "sequential"], ["disk"], ["cpu"]])
def test_fused_lora_survives_set_offload_and_clears_exactly(build, sd, tmp_path, offload):
    """The reported bug: fuse -> set_offload(...) -> clear raised (the fused weight was replaced by the
    backend). Now the LoRA runs hot under the backend, clearing restores the original weights bit for bit,
    and the offload's own removal gives back the original (not the fused) high-precision weights."""
    if "fp8" in offload:
        pytest.importorskip("difforge_fp8")
    path = write(sd, tmp_path / "style.safetensors")
    pipe = build()
    original = _weights(pipe)
    base = pipe(**CALL)
    pipe.load_lora(path, fuse=True)
    fused_weights = _weights(pipe)
    fused_out = pipe(**CALL)

    pipe.set_offload(offload)
    entry = lora_manager(pipe).loras["style"]
    fusable = offload == ["cpu"]  # model-level offload keeps real weights; fp8 and streamed ones cannot take it
    assert entry.fused is fusable
    reference = build(offload=offload)
    want = reference(**CALL)
    reference.load_lora(path, fuse=fusable)
    assert torch.equal(pipe(**CALL), reference(**CALL))  # as if loaded under this offload
    assert not torch.equal(pipe(**CALL), want)

    pipe.set_offload(None)  # back to plain weights: fused again, the same bits as before
    assert lora_manager(pipe).loras["style"].fused
    assert _same_bits(_weights(pipe), fused_weights)
    assert torch.equal(pipe(**CALL), fused_out)

    pipe.set_offload(offload)
    pipe.clear_lora()  # cleared while the backend holds the weights
    assert torch.equal(pipe(**CALL), want)
    pipe.set_offload(None)
    assert _same_bits(_weights(pipe), original)
    assert torch.equal(pipe(**CALL), base)


def test_fuse_request_false_stays_hot_and_none_follows_offload(build, sd, tmp_path):
    pytest.importorskip("difforge_fp8")
    path = write(sd, tmp_path / "style.safetensors")
    pipe = build(offload="fp8")
    pipe.load_lora(path, name="auto")  # fuse=None under fp8: hot
    pipe.load_lora(path, name="hot", fuse=False, scale=0.5)
    loras = lora_manager(pipe).loras
    assert not loras["auto"].fused and not loras["hot"].fused
    pipe.set_offload(None)
    assert loras["auto"].fused and not loras["hot"].fused
    plain = build()
    plain.load_lora(path, name="auto", fuse=True)
    plain.load_lora(path, name="hot", fuse=False, scale=0.5)
    assert torch.equal(pipe(**CALL), plain(**CALL))
    pipe.clear_lora()
    plain.clear_lora()
    assert _same_bits(_weights(pipe), _weights(plain))

"""``ModelConfig(offload_device=..., offload_dtype=...)`` (DiffSynth's names) mapped onto the offload backends by
``Pipeline.from_pretrained``, per component, combined with an explicit ``offload=``.

On this CPU-only machine the compute device is the CPU, so ``offload_device="cpu"`` is a no-op there; the mapping
itself is checked through :func:`offload_from_model_configs` with a CUDA compute device (it only computes
choices), and the real effects through ``"disk"`` and fp8 on the toy pipeline (handles, tensors, outputs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import difforge
import difforge_fp8
import difforge_sdk.toy
from difforge import ConfigError, ModelConfig
from difforge.builtin.offload import located_slots, offload_from_model_configs
from difforge.plugins import PluginSettings
from difforge.runtime.options import PluginChoice, parse_choices

from .offload_helpers import CALL, assert_state_equal

SLOTS = ("text_encoder", "dit", "vae")  # write_toy_checkpoints' order: dit, vae, text_encoder


@pytest.fixture(autouse=True, scope="module")
def toy_registry() -> Iterator[Any]:
    """The toy family and difforge-fp8 (this module's own registry: it overrides the folder's toy-only one)."""
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_sdk.toy, difforge_fp8])
    yield host.registry
    difforge.reload_plugins()


def configs(checkpoints: list[Path], **by_slot: dict[str, Any]) -> list[ModelConfig]:
    """A ModelConfig per toy file, with the fields given for its slot."""
    dit, vae, text_encoder = checkpoints
    paths = {"dit": dit, "vae": vae, "text_encoder": text_encoder}
    return [ModelConfig(path=str(paths[slot]), **by_slot.get(slot, {})) for slot in ("dit", "vae", "text_encoder")]


def mapped(registry: Any, offload: Any = None, device: str = "cuda", **by_slot: dict[str, Any]) -> list[Any]:
    """What from_pretrained would apply for these ModelConfig fields (no file read, no GPU needed)."""
    cfgs = {slot: ModelConfig(path=f"{slot}.safetensors", **by_slot.get(slot, {})) for slot in SLOTS}
    choices = offload_from_model_configs(registry, cfgs, parse_choices(offload, "offload"), device=device, torch_dtype=torch.float32)
    return [c.as_arg() for c in choices]


def test_mapping_per_component(toy_registry: Any) -> None:
    got = mapped(
        toy_registry,
        text_encoder={"offload_device": "cpu"},
        dit={"offload_device": "disk", "offload_dtype": torch.float8_e5m2},
        vae={"offload_dtype": "float8_e4m3fn", "offload_device": "cuda:0"},  # by name; the compute device: no move
    )
    assert got == [
        {"name": "fp8", "format": "e5m2", "components": ["dit"]},
        {"name": "fp8", "format": "e4m3", "components": ["vae"]},
        {"name": "cpu", "offload_device": "cpu", "components": ["text_encoder"]},
        {"name": "disk", "components": ["dit"]},
    ]
    # components asking for the same thing share one backend; the pipeline's own dtype is no request
    both = mapped(toy_registry, text_encoder={"offload_device": "cpu"}, vae={"offload_device": "cpu", "offload_dtype": torch.float32})
    assert both == [{"name": "cpu", "offload_device": "cpu", "components": ["text_encoder", "vae"]}]
    assert mapped(toy_registry, dit={"offload_dtype": "disk", "offload_device": "disk"}) == [{"name": "disk", "components": ["dit"]}]
    assert mapped(toy_registry, device="cpu", dit={"offload_device": "cpu"}) == []  # the compute device itself
    held = located_slots(toy_registry, [PluginChoice("cpu", {"components": ["vae"]}), PluginChoice("fp8")], SLOTS)
    assert held == {"vae"}  # only they are loaded on the CPU first; the rest goes straight to the compute device


def test_mapping_combines_with_explicit_offload(toy_registry: Any) -> None:
    # an explicit backend covering the component and giving the same thing: nothing added
    assert mapped(toy_registry, "fp8", dit={"offload_dtype": torch.float8_e4m3fn}) == ["fp8"]
    assert mapped(toy_registry, "fp8-scaled", dit={"offload_dtype": torch.float8_e4m3fn}) == ["fp8-scaled"]
    assert mapped(toy_registry, "sequential", vae={"offload_device": "cpu"}) == ["sequential"]
    # explicit backends restricted to other components: the config's component gets its own
    got = mapped(toy_registry, [{"name": "fp8", "components": ["dit"]}, {"name": "disk", "components": ["dit"]}],
                 vae={"offload_dtype": torch.float8_e5m2, "offload_device": "cpu"})  # fmt: skip
    assert got[2:] == [{"name": "fp8", "format": "e5m2", "components": ["vae"]},
                       {"name": "cpu", "offload_device": "cpu", "components": ["vae"]}]  # fmt: skip


@pytest.mark.parametrize(
    ("offload", "fields", "message"),
    [
        (None, {"offload_dtype": torch.bfloat16}, r"stores weights in the pipeline's torch_dtype \(torch.float32\) or in fp8"),
        (None, {"offload_dtype": "float99"}, "is not a dtype"),
        (None, {"offload_device": "floppy"}, "is not a device"),
        (None, {"offload_dtype": "disk", "offload_device": "cpu"}, "set offload_device='disk' too"),
        ({"name": "fp8", "format": "e5m2"}, {"offload_dtype": torch.float8_e4m3fn}, "format 'e5m2'"),
        ("disk", {"offload_device": "cpu"}, "keeps weights on 'disk'"),
        ("cpu", {"offload_device": "disk"}, "keeps weights on 'cpu'"),
        ({"name": "sequential", "offload_device": "cuda:1"}, {"offload_device": "cpu"}, "keeps weights on 'cuda:1'"),
    ],
)
def test_conflicts_and_bad_values(toy_registry: Any, offload: Any, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        mapped(toy_registry, offload, dit=fields)


def test_from_pretrained_applies_disk_and_fp8_to_one_component(
    checkpoints: list[Path], reference: Any, caplog: pytest.LogCaptureFixture
) -> None:
    out, states = reference
    with caplog.at_level(logging.INFO, logger="difforge.builtin.offload"):
        pipe = difforge.Pipeline.from_pretrained(
            "toy", configs(checkpoints, dit={"offload_device": "disk", "offload_dtype": torch.float8_e4m3fn},
                           text_encoder={"offload_device": "cpu"}), device="cpu",
        )  # fmt: skip
    assert [c.as_arg() for c in pipe.offload_choices] == [
        {"name": "fp8", "format": "e4m3", "components": ["dit"]},
        {"name": "disk", "components": ["dit"]},
    ]
    assert "offload_device='cpu' is the compute device" in caplog.text
    assert "-> offload backend {'name': 'disk', 'components': ['dit']}" in caplog.text
    fp8, disk = pipe._offload_handles
    assert fp8.roots == [pipe.dit] and list(disk.components) == ["dit"]
    assert all(t.is_meta for t in pipe.dit.parameters()) and disk.materialised() == []
    assert not any(t.is_meta for m in (pipe.vae, pipe.text_encoder) for t in m.parameters())
    assert pipe.text_encoder.mlp.fc1.weight.dtype == torch.float32
    got = pipe(**CALL)
    same = difforge.Pipeline.from_pretrained(
        "toy", checkpoints, device="cpu", offload=[{"name": "fp8", "components": ["dit"]}, {"name": "disk", "components": ["dit"]}]
    )
    assert torch.equal(got, same(**CALL))  # exactly what the explicit backends give
    assert 0 < ((got - out).norm() / out.norm()).item() < 1e-2
    pipe.set_offload(None)
    assert_state_equal(pipe, states)
    assert torch.equal(pipe(**CALL), out)


def test_from_pretrained_refuses_a_conflict_before_loading(checkpoints: list[Path]) -> None:
    with pytest.raises(ConfigError, match="drop one, or make them agree"):
        difforge.Pipeline.from_pretrained(
            "toy", configs(checkpoints, vae={"offload_dtype": torch.float8_e5m2}), device="cpu", offload="fp8"
        )

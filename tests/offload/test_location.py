"""The built-in location backends (cpu, sequential, disk) on the toy pipeline: bit-exact outputs,
nothing materialised between forwards (checked through the handles' bookkeeping and the tensors'
storage), exception safety, resident budgets, and ``remove()`` restoring every tensor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import difforge
from difforge import ConfigError, LoadError
from difforge.builtin.offload import apply_disk, checkpoint_loaders

from .offload_helpers import CALL, assert_state_equal, build

LOCATION = [
    "cpu",
    "sequential",
    "disk",
    {"name": "disk", "verify": True},
    {"name": "sequential", "vram_limit": 0.0002, "vram_buffer": 0.0},
    {"name": "disk", "vram_limit": 0.0002, "vram_buffer": 0.0},
]


def _id(choice: Any) -> str:
    return choice if isinstance(choice, str) else "-".join(f"{v}" for v in choice.values())


def _params(pipe: difforge.Pipeline) -> list[torch.Tensor]:
    return [t for m in pipe.models().values() for t in (*m.parameters(), *m.buffers())]


@pytest.mark.parametrize("offload", LOCATION, ids=_id)
def test_bit_exact_and_remove_restores(checkpoints: list[Path], reference: Any, offload: Any) -> None:
    out, states = reference
    pipe = build(checkpoints, offload)
    assert torch.equal(pipe(**CALL), out)
    assert torch.equal(pipe(**CALL), out)  # and again: nothing drifts between calls
    (handle,) = pipe._offload_handles
    kept = {id(s.original) for u in handle.all_units() for s in u.slots} if hasattr(handle, "all_units") else None
    handle.remove()
    assert_state_equal(pipe, states)
    for module in pipe.models().values():
        if kept is not None:  # the very tensor objects the modules had before are back
            assert all(id(t) in kept for t in (*module.parameters(), *module.buffers()))
        assert "_difforge_location_offload" not in module.__dict__
    assert all(not m._forward_pre_hooks and not m._forward_hooks for c in pipe.models().values() for m in c.modules())
    assert torch.equal(pipe(**CALL), out)


@pytest.mark.parametrize("backend", ["sequential", "disk"])
def test_not_materialised_between_forwards(checkpoints: list[Path], reference: Any, backend: str) -> None:
    pipe = build(checkpoints, backend)
    (handle,) = pipe._offload_handles
    seen: list[list[str]] = []

    def probe(module: torch.nn.Module, args: Any) -> None:  # runs after the backend's (prepended) pre-hook
        seen.append(handle.materialised())
        assert all(not p.is_meta for p in module.parameters())
        assert all(p.is_meta for p in pipe.dit.blocks[0].parameters())  # the previous block is gone again

    pipe.dit.blocks[1].register_forward_pre_hook(probe)
    for _ in range(2):
        pipe(**CALL)
        # bookkeeping: no unit holds real tensors; storage: the modules hold meta placeholders only
        assert handle.materialised() == []
        assert all(t.is_meta for t in _params(pipe))
        slots = [s for u in handle.all_units() for s in u.slots]
        if backend == "disk":  # the original tensors hold no memory at all
            assert all(s.original.untyped_storage().nbytes() == 0 for s in slots)
        else:  # they stay on the offload device (the CPU), outside the modules
            assert all(s.original.device.type == "cpu" and not s.original.is_meta for s in slots)
    assert seen and all(m == ["dit:blocks.1"] for m in seen)


@pytest.mark.parametrize("backend", ["sequential", "disk"])
def test_forward_that_raises_leaves_nothing_materialised(checkpoints: list[Path], reference: Any, backend: str) -> None:
    pipe = build(checkpoints, backend)
    (handle,) = pipe._offload_handles

    def boom(module: torch.nn.Module, args: Any) -> None:
        raise RuntimeError("boom")

    hook = pipe.dit.blocks[1].mlp.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        pipe(**CALL)
    assert handle.materialised() == []
    assert all(t.is_meta for t in _params(pipe))
    hook.remove()
    assert torch.equal(pipe(**CALL), reference[0])


def test_resident_budget(checkpoints: list[Path], reference: Any) -> None:
    """vram_limit keeps the non-block units and then whole blocks in forward order resident."""
    probe = build(checkpoints, "sequential")
    units = probe._offload_handles[0].units["dit"]
    small = sum(u.nbytes for us in probe._offload_handles[0].units.values() for u in us if not u.is_block)
    block = next(u.nbytes for u in units if u.is_block)
    limit = (small + block + block // 2) / 2**30  # room for one block, not two
    pipe = build(checkpoints, {"name": "sequential", "vram_limit": limit, "vram_buffer": 0})
    handle = pipe._offload_handles[0]
    assert torch.equal(pipe(**CALL), reference[0])
    live = handle.materialised()
    assert "dit:blocks.0" in live and "dit:blocks.1" not in live and "dit:blocks.2" not in live
    assert not any(p.is_meta for p in pipe.dit.blocks[0].parameters())
    assert all(p.is_meta for p in pipe.dit.blocks[1].parameters())
    assert handle.stats()["resident_bytes"] == small + block


def test_cpu_moves_components_in_turn(checkpoints: list[Path], reference: Any) -> None:
    pipe = build(checkpoints, "cpu")
    handle = pipe._offload_handles[0]
    turns: list[str] = []
    original = handle.activate

    def record(slot: str | None) -> None:
        turns.append(slot)
        original(slot)

    handle.activate = record
    pipe(**{**CALL, "output_type": "pt"})
    assert turns == ["text_encoder", "dit", "vae"]  # PipelineSpec.component_order, each moved in once
    assert handle.stats() == {"active": "vae", "order": ["text_encoder", "dit", "vae"]}


@pytest.mark.parametrize("backend", ["cpu", "sequential", "disk"])
def test_components_option(checkpoints: list[Path], reference: Any, backend: str) -> None:
    """``components`` restricts a location backend to some slots; the others are left as they are, and another
    location backend may hold them."""
    out, states = reference
    pipe = build(checkpoints, [{"name": backend, "components": ["dit"]}, {"name": "disk", "components": ["vae"]}])
    mine, disk = pipe._offload_handles
    assert list(mine.components) == ["dit"] and list(disk.components) == ["vae"]
    assert torch.equal(pipe(**CALL), out)
    assert pipe.dit.__dict__["_difforge_location_offload"] == backend
    assert "_difforge_location_offload" not in pipe.text_encoder.__dict__
    assert not any(t.is_meta for t in pipe.text_encoder.parameters())
    assert all(t.is_meta for t in pipe.vae.parameters())
    if backend != "cpu":
        assert all(t.is_meta for t in pipe.dit.parameters()) and mine.materialised() == []
    pipe.set_offload(None)
    assert_state_equal(pipe, states)
    assert torch.equal(pipe(**CALL), out)


def test_disk_verify_catches_edited_weights(checkpoints: list[Path], tmp_path: Path) -> None:
    """Weights edited in place no longer equal their checkpoint: verify=True sends them to the scratch file."""
    pipe = build(checkpoints)
    with torch.no_grad():
        pipe.dit.blocks[0].mlp[0].weight.mul_(2)
    want = pipe(**CALL)
    handle = apply_disk(pipe, {"offload_dir": tmp_path / "scratch", "verify": True, "vram_limit": None, "vram_buffer": 0})
    assert handle.stats()["scratch_bytes"] == pipe.dit.blocks[0].mlp[0].weight.shape.numel() * 4
    assert torch.equal(pipe(**CALL), want)
    folder = Path(handle.stats()["offload_dir"])
    assert folder.parent == tmp_path / "scratch" and (folder / "dit.safetensors").is_file()
    handle.remove()
    assert not folder.exists() and (tmp_path / "scratch").is_dir()  # its own folder inside offload_dir is deleted
    assert torch.equal(pipe(**CALL), want)


def test_disk_refuses_a_checkpoint_changed_underneath(checkpoints: list[Path], reference: Any) -> None:
    pipe = build(checkpoints, "disk")
    dit_file = Path(pipe.dit.difforge_detection.paths[0])
    pipe(**CALL)
    stat = dit_file.stat()
    os.utime(dit_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        with pytest.raises(LoadError, match="changed on disk"):
            pipe(**CALL)
        assert pipe._offload_handles[0].materialised() == []
    finally:
        os.utime(dit_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_checkpoint_loaders_rebuild_loaded_tensors(checkpoints: list[Path]) -> None:
    pipe = build(checkpoints)
    loaders = checkpoint_loaders(pipe.dit, torch.float32)
    state = pipe.dit.state_dict()
    assert loaders.keys() == state.keys()
    for key, load in loaders.items():
        assert torch.equal(load(), state[key])
    assert checkpoint_loaders(pipe.dit, torch.bfloat16) == {}  # loaded in fp32: a bf16 read would not be these


@pytest.mark.parametrize(
    ("offload", "message"),
    [
        ({"name": "sequential", "vram_limit": "8GB"}, "vram_limit must be a number of GiB"),
        ({"name": "disk", "vram_buffer": -1}, "vram_buffer must be a number of GiB"),
        ({"name": "disk", "verify": "yes"}, "verify must be true or false"),
        ({"name": "cpu", "offload_device": "floppy"}, "is not a device"),
        ({"name": "disk", "offload_dir": 3}, "offload_dir must be a folder path"),
        (["sequential", "disk"], "already offloaded by 'sequential'"),
        ({"name": "disk", "prefetch": True}, "has no option 'prefetch'"),
        ({"name": "cpu", "components": ["unet"]}, "no model component 'unet'"),
        ({"name": "sequential", "components": "dit"}, "components must be a list of component names"),
        ([{"name": "disk", "components": ["dit"]}, "cpu"], "already offloaded by 'disk'"),
    ],
)
def test_bad_options(checkpoints: list[Path], offload: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(checkpoints, offload)

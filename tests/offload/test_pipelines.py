"""Every offload backend, and every pair of a dtype and a location backend, on whole tiny Flux, Qwen-Image and
Wan pipelines (text encoders, DiT and VAE; 2 steps; Qwen-Image and Wan with true CFG) assembled from diffusers
folders (``tiny_families``).

- ``cpu``, ``sequential`` and ``disk`` (and ``sequential``/``disk`` with a ``vram_limit`` that keeps some DiT
  blocks resident and streams the others) give the plain run's image bit for bit;
- ``fp8`` and ``fp8-scaled`` stay within :data:`LATENT_TOLERANCE` / :data:`IMAGE_TOLERANCE` of it, and with
  each location backend on top give exactly what the dtype backend alone gives;
- on DiT weights of a trained model's spread, ``fp8-scaled`` is more accurate than plain ``fp8``;
- ``set_offload(None)`` (the handles' ``remove()``) brings back every tensor and the plain image bit for bit;
- between two forwards nothing of a real family DiT is materialised under ``sequential``/``disk`` (the
  handle's bookkeeping and the tensors' storage), and inside one only the running block is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import difforge
from difforge import Pipeline
from difforge.plugins import PluginSettings

from .tiny_families import CALLS, WRITERS

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
log = logging.getLogger(__name__)

LATENT_TOLERANCE = 0.01
"""fp8 storage, relative L2 error of the final latents (text encoders and DiT cast): below 1%.

e4m3 keeps 3 mantissa bits, so each cast weight is rounded by at most 2^-4 (about 6%, 2-3% RMS) and each cast
layer's output moves by about that much relative to the layer's own contribution; the DiT's velocity is a small
part of the latents after 2 steps and its errors average over many weights. Measured: 1e-4 to 2e-4."""
IMAGE_TOLERANCE = 0.15
"""fp8 storage, relative L2 error of the decoded image (VAE convolutions cast too): below 15%.

The VAE decoder chains about 20 cast convolutions (with normalisations between them, which do not undo a
relative error): independent errors of 2-3% per layer add up to sqrt(20) * 2.5% ~ 11% in the worst tiny VAE.
Measured: 0.13% (Flux's AE), 4% and 6% (the Qwen-Image and Wan 3D-causal VAEs). A wrong cast (a missing
scale, transposed or unscaled weights) is an O(1) error."""

LOCATION = ["cpu", "sequential", "disk", "sequential-budget", "disk-budget"]
DTYPES = ["fp8", "fp8-scaled"]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.fixture(autouse=True, scope="module")
def registry() -> Iterator[Any]:
    """The three families, the text encoders and difforge-fp8 (with the core's built-in location backends)."""
    names = ("difforge_text_encoders", "difforge_flux", "difforge_wan", "difforge_qwen_image", "difforge_fp8")
    modules = [pytest.importorskip(m) for m in names]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: threads only add contention
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=modules)
    yield host.registry
    difforge.reload_plugins()
    torch.set_num_threads(threads)


@dataclass
class Family:
    """A tiny pipeline and its plain run: the image, the latents and every component's state dict (copies)."""

    name: str
    pipe: Pipeline
    image: torch.Tensor
    latents: torch.Tensor
    states: dict[str, dict[str, torch.Tensor]]

    def run(self, output_type: str = "pt") -> torch.Tensor:
        return self.pipe(**CALLS[self.name], output_type=output_type, progress_bar_cmd=lambda x: x)

    def assert_plain(self) -> None:
        """No backend left: every tensor back (same object layout, device, dtype and bits), and the plain image."""
        assert self.pipe._offload_handles == []
        for slot, module in self.pipe.models().items():
            got = module.state_dict()
            assert got.keys() == self.states[slot].keys()
            for key, value in got.items():
                want = self.states[slot][key]
                assert value.device == want.device and value.dtype == want.dtype and torch.equal(value, want), (slot, key)
            assert all(not m._forward_pre_hooks and not m._forward_hooks and "forward" not in m.__dict__ for m in module.modules())
        assert torch.equal(self.run(), self.image)


@pytest.fixture(scope="module", params=list(WRITERS))
def family(request: Any, registry: Any, tmp_path_factory: Any) -> Family:
    name = request.param
    folder = WRITERS[name](tmp_path_factory.mktemp(name))
    pipe = Pipeline.from_pretrained(name, str(folder), device="cpu")
    fam = Family(name, pipe, torch.empty(0), torch.empty(0), {})
    fam.image, fam.latents = fam.run(), fam.run("latent")
    assert fam.image.std() > 0.01  # an image, not a constant
    fam.states = {slot: {k: v.clone() for k, v in m.state_dict().items()} for slot, m in pipe.models().items()}
    return fam


def dit_blocks(handle: Any) -> list[Any]:
    return [u for u in handle.units["dit"] if u.is_block]


def location_choice(family: Family, name: str) -> Any:
    """A location backend; ``*-budget``: a ``vram_limit`` with room for what is placed before the DiT's blocks
    (every non-block unit, then the encoders' blocks) and 1.5 DiT blocks."""
    if not name.endswith("-budget"):
        return name
    backend = name.removesuffix("-budget")
    family.pipe.set_offload(backend)
    (probe,) = family.pipe._offload_handles
    dit = dit_blocks(probe)
    before = sum(u.nbytes for u in probe.all_units() if not u.is_block or (u.is_block and u not in dit))
    family.pipe.set_offload(None)
    return {"name": backend, "vram_limit": (before + dit[0].nbytes * 1.5) / 2**30, "vram_buffer": 0.0}


@pytest.mark.parametrize("location", LOCATION)
def test_location_backend_is_bit_exact(family: Family, location: str) -> None:
    pipe = family.pipe
    try:
        pipe.set_offload(location_choice(family, location))
        (handle,) = pipe._offload_handles
        assert torch.equal(family.run(), family.image)
        assert torch.equal(family.run(), family.image)  # and again: nothing drifts between calls
        if location.endswith("-budget"):  # some DiT blocks resident, the others streamed
            resident = [u.resident for u in dit_blocks(handle)]
            assert resident[0] and not resident[-1], resident
            assert handle.materialised() == [f"{slot}:{u.name}" for slot, us in handle.units.items() for u in us if u.resident]
        elif location != "cpu":
            assert handle.materialised() == []
        if location.startswith("disk"):  # every tensor is re-read from the diffusers folder's own files
            assert handle.stats()["scratch_bytes"] == 0
    finally:
        pipe.set_offload(None)
    family.assert_plain()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_alone_and_with_every_location_backend(family: Family, dtype: str) -> None:
    pipe = family.pipe
    try:
        pipe.set_offload(dtype)
        latents, image = family.run("latent"), family.run()
        errors = rel_err(latents, family.latents), rel_err(image, family.image)
        log.info("%s %s: relative error latents %.2e, image %.2e", family.name, dtype, *errors)
        assert 0 < errors[0] < LATENT_TOLERANCE and 0 < errors[1] < IMAGE_TOLERANCE, errors
        for location in LOCATION:
            pipe.set_offload([dtype, location_choice(family, location)])
            fp8, where = pipe._offload_handles
            assert torch.equal(family.run(), image), location
            if location.startswith("disk"):  # fp8 spilled its weights and scales as it cast them; disk reads them there
                assert where.stats()["scratch_bytes"] == 0
                assert fp8.stats()["spilled_bytes"] >= fp8.stats()["weight_bytes_after"] > 0
    finally:
        pipe.set_offload(None)
    family.assert_plain()


def test_fp8_scaled_is_more_accurate_on_small_weights(family: Family) -> None:
    """The DiTs' weights have a trained model's spread (std 0.02): most of them lie below e4m3's smallest normal
    value (2^-6), where plain casting keeps few significant bits; scaled per output channel they do not."""
    pipe = family.pipe
    errors = {}
    try:
        for dtype in DTYPES:
            pipe.set_offload({"name": dtype, "components": ["dit"]})
            errors[dtype] = rel_err(family.run("latent"), family.latents)
    finally:
        pipe.set_offload(None)
    log.info("%s DiT only: relative error of the latents %s", family.name, errors)
    assert 0 < errors["fp8-scaled"] < errors["fp8"]


@pytest.mark.parametrize("offload", ["sequential", "disk", ["fp8", "disk"]], ids=["sequential", "disk", "fp8-disk"])
def test_dit_not_materialised_between_forwards(family: Family, offload: Any) -> None:
    pipe = family.pipe
    seen: list[list[str]] = []
    try:
        pipe.set_offload(offload)
        handle = pipe._offload_handles[-1]
        blocks = dit_blocks(handle)
        assert len(blocks) == 3

        def probe(module: torch.nn.Module, args: Any) -> None:  # runs after the backend's (prepended) pre-hook
            live = handle.materialised()
            seen.append([name for name in live if name in {f"dit:{b.name}" for b in blocks}])
            assert all(not p.is_meta for p in module.parameters())
            assert all(p.is_meta for p in blocks[0].module.parameters())  # the previous block is gone again
            assert all(name.startswith("dit:") for name in live)  # the encoders are not held either

        hook = blocks[1].module.register_forward_pre_hook(probe)
        try:
            for _ in range(2):
                family.run()
                # bookkeeping: no unit holds real tensors; storage: the modules hold meta placeholders only
                assert handle.materialised() == []
                assert all(t.is_meta for m in pipe.models().values() for t in (*m.parameters(), *m.buffers()))
                originals = [s.original for u in handle.all_units() for s in u.slots]
                if "disk" in offload:  # the original tensor objects hold no memory at all
                    assert all(t.untyped_storage().nbytes() == 0 for t in originals)
                else:  # they stay on the offload device (the CPU), outside the modules
                    assert all(t.device.type == "cpu" and not t.is_meta for t in originals)
        finally:
            hook.remove()
    finally:
        pipe.set_offload(None)
    cfg = 2 if family.name != "flux" else 1  # Qwen-Image and Wan run the DiT for both CFG branches
    assert seen == [[f"dit:{blocks[1].name}"]] * (2 * 2 * cfg)  # 2 calls x 2 steps (x 2 branches)
    family.assert_plain()

"""The Wan VAEs (2.1 and 2.2 designs) against diffusers' AutoencoderKLWan on tiny random weights, the
converter in both directions, config inference, time chunks and tiles, and loading through the core."""

from __future__ import annotations

import dataclasses
import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import difforge
from difforge_wan.convert import vae_to_diffusers, vae_unstructure
from difforge_wan.vae import WAN21_VAE, WanVAE, WanVAEConfig, wan_vae_config_from_json, wan_vae_config_from_shapes

from .conftest import TINY_VAE, build_from, make_vae_pair

ATOL = 1e-4


def _video(frames: int, size: int = 32, seed: int = 2) -> torch.Tensor:
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _ref_latents(ref, video: torch.Tensor) -> torch.Tensor:
    """diffusers' encode + the normalisation diffusers' Wan pipelines apply."""
    c = ref.config
    mu = ref.encode(video).latent_dist.mode()
    mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)
    return (mu - mean) * (1.0 / torch.tensor(c.latents_std).view(1, -1, 1, 1, 1))


def _ref_decode(ref, latents: torch.Tensor) -> torch.Tensor:
    c = ref.config
    mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)
    return ref.decode(latents / (1.0 / torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)) + mean).sample


@torch.no_grad()
def test_encode_matches_diffusers(vae_pair) -> None:
    video = _video(9)
    expected = _ref_latents(vae_pair.ref, video)
    ours = vae_pair.ours.encode(video)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() < ATOL
    assert (vae_pair.ours.encode(video, time_chunk=None) - expected).abs().max() < ATOL  # one pass
    assert (vae_pair.ours.encode(video, time_chunk=2) - expected).abs().max() < ATOL


@torch.no_grad()
def test_decode_matches_diffusers(vae_pair) -> None:
    latents = torch.randn(1, vae_pair.ours.config.z_dim, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    expected = _ref_decode(vae_pair.ref, latents)
    ours = vae_pair.ours.decode(latents)
    assert ours.shape == expected.shape == (1, 3, 9, 4 * vae_pair.ours.spatial_ratio, 4 * vae_pair.ours.spatial_ratio)
    assert (ours - expected).abs().max() < ATOL
    assert (vae_pair.ours.decode(latents, time_chunk=None) - expected).abs().max() < ATOL
    assert (vae_pair.ours.decode(latents, time_chunk=2) - expected).abs().max() < ATOL


@torch.no_grad()
def test_single_frames_are_images(vae_pair) -> None:
    """``[B, 3, H, W]`` in, ``[B, z, h, w]`` out (Qwen-Image's use of the Wan 2.1 design)."""
    image = _video(1)[:, :, 0]
    latent = vae_pair.ours.encode(image)
    assert latent.dim() == 4
    assert (latent - vae_pair.ours.encode(image[:, :, None])[:, :, 0]).abs().max() == 0
    assert vae_pair.ours.decode(latent).shape == image.shape


@torch.no_grad()
def test_sampling_draws_from_the_generator(vae_pair) -> None:
    video = _video(5)
    a = vae_pair.ours.encode(video, generator=torch.Generator().manual_seed(0))
    b = vae_pair.ours.encode(video, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, vae_pair.ours.encode(video))


def test_converter_round_trip_and_config(vae_pair) -> None:
    ours_sd = vae_pair.ours.state_dict()
    back = {vae_to_diffusers(k): v for k, v in vae_unstructure(ours_sd).items()}
    assert set(back) == set(vae_pair.ref.state_dict())
    for key, value in vae_pair.ref.state_dict().items():
        assert torch.equal(back[key], value), key
    shapes = {k: v.shape for k, v in ours_sd.items()}
    from_json = wan_vae_config_from_json(dict(vae_pair.ref.config, _class_name="AutoencoderKLWan"))
    assert from_json == wan_vae_config_from_shapes(shapes) == vae_pair.ours.config


def test_released_config_from_shapes() -> None:
    with torch.device("meta"):
        sd = WanVAE(WAN21_VAE).state_dict()
    assert wan_vae_config_from_shapes({k: v.shape for k, v in sd.items()}) == WAN21_VAE
    assert wan_vae_config_from_shapes({"encoder.conv1.weight": (8, 3, 3, 3, 3)}) is None


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops create while active; a storage counts until the
    last tensor object an op returned on it is gone (cheaper than the profiler's memory events)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [live tensor objects, bytes]
        self.current = self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[0] -= 1
        if not entry[0]:
            del self.refs[ptr]
            self.current -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                entry = self.refs.setdefault(storage.data_ptr(), [0, storage.nbytes()])
                if not entry[0]:
                    self.current += entry[1]
                    self.peak = max(self.peak, self.current)
                entry[0] += 1
                weakref.finalize(t, self._release, storage.data_ptr())
        return out


@torch.no_grad()
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_time_chunks_equal_one_pass_and_peak_lower(version) -> None:
    """A 33-frame latent (129 video frames) decoded one latent frame at a time equals one pass, and
    (Wan 2.1 design) peaks at under half its memory."""
    vae = make_vae_pair(version).ours
    latents = torch.randn(1, vae.config.z_dim, 33, 2, 2, generator=torch.Generator().manual_seed(4))
    with PeakMemory() as whole_memory:
        whole = vae.decode(latents, time_chunk=None)
    assert whole.shape[2] == 129
    if version == "2.1":
        with PeakMemory() as chunked_memory:
            chunked = vae.decode(latents, time_chunk=1)
        assert chunked_memory.peak < 0.5 * whole_memory.peak, (chunked_memory.peak, whole_memory.peak)
    else:
        chunked = vae.decode(latents, time_chunk=3)
    assert (whole - chunked).abs().max() < 1e-4


@torch.no_grad()
def test_tiled_decode_is_close_to_plain() -> None:
    vae = make_vae_pair("2.1").ours
    latents = torch.randn(1, 16, 2, 10, 12, generator=torch.Generator().manual_seed(5))
    plain = vae.decode(latents)
    tiled = vae.tiled_decode(latents, tile_size=8, tile_stride=4)
    assert tiled.shape == plain.shape
    # each tile sees only its latents (the receptive field is wider than the overlap): close, not equal
    assert (tiled - plain).abs().mean() < 0.05
    assert torch.equal(vae.tiled_decode(latents, tile_size=16, tile_stride=8), plain)  # one tile: a plain decode
    with pytest.raises(difforge.ConfigError, match="tile_stride"):
        vae.tiled_decode(latents, tile_size=8, tile_stride=9)


def test_bad_inputs_are_refused() -> None:
    vae = make_vae_pair("2.1").ours
    with pytest.raises(difforge.ConfigError, match="1 \\+ 4k"):
        vae.encode(_video(4))
    with pytest.raises(difforge.ConfigError, match="multiples of 8"):
        vae.encode(_video(1, size=12))
    with pytest.raises(difforge.ConfigError, match="latents_mean"):
        WanVAE(dataclasses.replace(WAN21_VAE, z_dim=4))


# ---------------------------------------------------------------- through the core


@torch.no_grad()
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_core_loads_diffusers_folder_and_wan_pth(tmp_path, version) -> None:
    """The diffusers ``vae/`` folder and the same weights as Wan-AI's ``.pth`` load to the same model."""
    pair = make_vae_pair(version)
    pair.ref.save_pretrained(tmp_path / "vae")
    det = difforge.detect(tmp_path / "vae")
    assert (det.model, det.format, det.converter) == ("wan-vae", "diffusers", "wan-vae-diffusers")
    assert det.config == pair.ours.config
    from_folder = difforge.load_model(str(tmp_path / "vae"))
    torch.save(pair.ours.state_dict(), tmp_path / "Wan_VAE.pth")
    det_pth = difforge.detect(tmp_path / "Wan_VAE.pth")
    assert (det_pth.model, det_pth.format, det_pth.converter) == ("wan-vae", "wan", None)
    from_pth = difforge.load_model(str(tmp_path / "Wan_VAE.pth"))
    latents = torch.randn(1, pair.ours.config.z_dim, 2, 2, 2, generator=torch.Generator().manual_seed(6))
    expected = pair.ours.decode(latents)
    assert torch.equal(from_folder.decode(latents), expected) and torch.equal(from_pth.decode(latents), expected)


def test_config_json_of_qwen_image_design() -> None:
    config = json.loads(json.dumps(dict(_class_name="AutoencoderKLQwenImage", **TINY_VAE["2.1"])))
    assert wan_vae_config_from_json(config) == WanVAEConfig(
        z_dim=16, base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1
    )
    assert wan_vae_config_from_json({"_class_name": "AutoencoderKL"}) is None
    assert build_from  # the conftest helper is shared with the other test modules

"""Fixtures of the difforge-wan tests: tiny diffusers Wan models with random weights, the same weights in
our models (Wan-AI layout), and a writer for header-only sparse safetensors files."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from difforge_sdk.parity import build_from  # noqa: F401  (used by this folder's tests)
from difforge_sdk.sparse import write_sharded_sparse, write_sparse_safetensors

import difforge
import difforge_wan
from difforge.plugins import PluginSettings
from difforge_wan.convert import vae_from_diffusers, vae_restructure
from difforge_wan.vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, WanVAE, wan_vae_config_from_shapes

diffusers = pytest.importorskip("diffusers")

#: tiny AutoencoderKLWan configs: the Wan 2.1 design and the Wan 2.2 one (residual blocks, 2x2 patches, 48 channels)
TINY_VAE = {
    "2.1": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]),
    "2.2": dict(
        base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
        scale_factor_spatial=16, latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD),
    ),
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """One thread: tiny models on a shared machine only lose by more (several times slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def wan_registry() -> Any:
    """The built-in plugin and difforge-wan alone in the registry (restored afterwards)."""
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_wan])
    yield host.registry
    difforge.reload_plugins()


def randomize(module: torch.nn.Module, seed: int, std: float) -> None:
    """Replace every weight with N(0, std) noise (diffusers zero-initialises some projections)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def own_from_diffusers(
    sd: Mapping[str, torch.Tensor], rename: Callable[[str], str | None], transform: Callable[[dict], dict] | None
) -> dict:
    """Apply a converter: rename every key (none may be dropped), then transform."""
    renamed = {rename(k): v for k, v in sd.items()}
    assert None not in renamed, [k for k in sd if rename(k) is None]
    return transform(renamed) if transform else renamed


@dataclass
class VAEPair:
    version: str
    ref: Any
    ours: WanVAE


def make_vae_pair(version: str, seed: int = 0) -> VAEPair:
    ref = diffusers.AutoencoderKLWan(**TINY_VAE[version]).eval()
    randomize(ref, seed=seed, std=0.2)
    sd = own_from_diffusers(ref.state_dict(), vae_from_diffusers, vae_restructure)
    config = wan_vae_config_from_shapes({k: v.shape for k, v in sd.items()})
    return VAEPair(version, ref, build_from(sd, WanVAE, config))


@pytest.fixture(params=["2.1", "2.2"])
def vae_pair(request: pytest.FixtureRequest) -> VAEPair:
    return make_vae_pair(request.param)


# ---------------------------------------------------------------- files


write_sparse = write_sparse_safetensors


@pytest.fixture
def sparse_writer() -> Callable[..., Path]:
    return write_sparse


@pytest.fixture
def sharded_sparse_writer() -> Callable[..., Path]:
    return write_sharded_sparse

"""Fixtures of the difforge-flux tests: tiny diffusers models with random weights, the same weights in
our models, and writers for safetensors files (real ones and header-only sparse ones)."""

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
import difforge_flux
from difforge.plugins import PluginSettings
from difforge_flux.ae import FluxAE, flux_ae_config_from_shapes
from difforge_flux.convert import ae_from_diffusers, ae_reshape, dit_fuse, dit_from_diffusers
from difforge_flux.dit import FluxDiT, flux_dit_config_from_shapes

diffusers = pytest.importorskip("diffusers")

TINY_DIT = dict(
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),  # what flux_dit_config_from_shapes assumes for head dim 16
)
TINY_AE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 32, 64, 64],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


@pytest.fixture(autouse=True)
def flux_registry() -> Any:
    """The built-in plugin and difforge-flux alone in the registry (restored afterwards)."""
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=[difforge_flux])
    yield host.registry
    difforge.reload_plugins()


def randomize(module: torch.nn.Module, seed: int, std: float) -> None:
    """Replace every weight with N(0, std) noise (diffusers zero-initialises some projections)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def bfl_from_diffusers(
    sd: Mapping[str, torch.Tensor], rename: Callable[[str], str | None], transform: Callable[[dict], dict]
) -> dict:
    """Apply a converter: rename every key (none may be dropped), then transform."""
    renamed = {rename(k): v for k, v in sd.items()}
    assert None not in renamed, [k for k in sd if rename(k) is None]
    return transform(renamed)


@dataclass
class DiTPair:
    """A tiny diffusers ``FluxTransformer2DModel``, our ``FluxDiT`` with the same weights, and inputs."""

    guidance: bool
    ref: Any
    ours: FluxDiT
    inputs: dict[str, torch.Tensor | None]

    def ref_forward(self, **overrides: Any) -> torch.Tensor:
        x = {**self.inputs, **overrides}
        return self.ref(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
        ).sample


def dit_inputs(guidance: bool, batch: int = 2, height: int = 4, width: int = 6, text: int = 7) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    n = height * width
    img_ids = torch.zeros(n, 3)
    img_ids[:, 1] = torch.arange(n) // width
    img_ids[:, 2] = torch.arange(n) % width
    return {
        "img": torch.randn(batch, n, TINY_DIT["in_channels"], generator=gen),
        "img_ids": img_ids,
        "txt": torch.randn(batch, text, TINY_DIT["joint_attention_dim"], generator=gen),
        "txt_ids": torch.zeros(text, 3),
        "timesteps": torch.tensor([0.25, 0.9])[:batch],
        "y": torch.randn(batch, TINY_DIT["pooled_projection_dim"], generator=gen),
        "guidance": torch.full((batch,), 3.5) if guidance else None,
    }


@pytest.fixture(params=[True, False], ids=["dev", "schnell"])
def dit_pair(request: pytest.FixtureRequest) -> DiTPair:
    guidance = request.param
    ref = diffusers.FluxTransformer2DModel(**TINY_DIT, guidance_embeds=guidance).eval()
    randomize(ref, seed=0, std=0.2)
    sd = bfl_from_diffusers(ref.state_dict(), dit_from_diffusers, dit_fuse)
    ours = build_from(sd, FluxDiT, flux_dit_config_from_shapes({k: v.shape for k, v in sd.items()}))
    return DiTPair(guidance, ref, ours, dit_inputs(guidance))


@dataclass
class AEPair:
    ref: Any
    ours: FluxAE
    image: torch.Tensor


@pytest.fixture
def ae_pair() -> AEPair:
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY_AE).eval()
    randomize(ref, seed=0, std=0.05)
    sd = bfl_from_diffusers(ref.state_dict(), ae_from_diffusers, ae_reshape)
    config = flux_ae_config_from_shapes({k: v.shape for k, v in sd.items()})
    image = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return AEPair(ref, build_from(sd, FluxAE, config), image)


# ---------------------------------------------------------------- files


write_sparse = write_sparse_safetensors


@pytest.fixture
def sparse_writer() -> Callable[..., Path]:
    return write_sparse


@pytest.fixture
def sharded_sparse_writer() -> Callable[..., Path]:
    return write_sharded_sparse

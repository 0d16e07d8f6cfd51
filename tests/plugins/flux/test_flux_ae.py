"""FluxAE: parity with diffusers' AutoencoderKL (Flux config), config inference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from difforge_flux.ae import FLUX1_AE, FluxAE, FluxAEConfig, flux_ae_config_from_json, flux_ae_config_from_shapes
from difforge_flux.releases import released_shapes
from difforge_sdk.parity import MODULE_ATOL, assert_close


def test_encode_matches_diffusers_mode(ae_pair) -> None:
    """Without a generator we encode to the distribution mean (diffusers' ``latent_dist.mode()``)."""
    cfg = ae_pair.ref.config
    with torch.no_grad():
        expected = (ae_pair.ref.encode(ae_pair.image).latent_dist.mode() - cfg.shift_factor) * cfg.scaling_factor
        got = ae_pair.ours.encode(ae_pair.image)
    assert got.shape == (2, 16, 4, 6)
    assert (got - expected).abs().max().item() <= 1e-4


def test_encode_with_generator_matches_diffusers_sample(ae_pair) -> None:
    """With a generator we sample as diffusers' Flux img2img pipeline does (``retrieve_latents``)."""
    cfg = ae_pair.ref.config
    with torch.no_grad():
        dist = ae_pair.ref.encode(ae_pair.image).latent_dist
        expected = (dist.sample(torch.Generator().manual_seed(7)) - cfg.shift_factor) * cfg.scaling_factor
        got = ae_pair.ours.encode(ae_pair.image, generator=torch.Generator().manual_seed(7))
        mean = ae_pair.ours.encode(ae_pair.image)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got - mean).abs().max().item() > 1e-3  # it did sample


def test_decode_matches_diffusers(ae_pair) -> None:
    cfg = ae_pair.ref.config
    latents = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ae_pair.ref.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample
        got = ae_pair.ours.decode(latents)
    assert got.shape == (2, 3, 32, 48)
    assert_close(got, expected, atol=MODULE_ATOL, name="FluxAE.decode vs diffusers AutoencoderKL.decode")


def test_released_config_and_meta_build() -> None:
    with torch.device("meta"):
        model = FluxAE(FLUX1_AE)
    assert not list(model.buffers())
    assert model.downscale == 8
    assert flux_ae_config_from_shapes(released_shapes("flux-ae", "FLUX.1", "bfl")) == FLUX1_AE


@pytest.mark.parametrize(
    "change",
    [
        {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "z_channels": 4},
        {"ch": 8, "ch_mult": (1, 1, 2), "norm_groups": 8},
    ],
)
def test_config_from_shapes_variants(change: dict) -> None:
    config = dataclasses.replace(FLUX1_AE, **change)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FluxAE(config).state_dict().items()}
    assert flux_ae_config_from_shapes(shapes) == config


def test_config_from_shapes_rejects_quant_conv_vaes() -> None:
    shapes = dict(released_shapes("flux-ae", "FLUX.1", "bfl"), **{"quant_conv.weight": (32, 32, 1, 1)})
    assert flux_ae_config_from_shapes(shapes) is None


def test_config_from_json(ae_pair) -> None:
    config = dict(ae_pair.ref.config, _class_name="AutoencoderKL")
    assert flux_ae_config_from_json(config) == ae_pair.ours.config
    released = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [128, 256, 512, 512],
        "in_channels": 3,
        "latent_channels": 16,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }
    assert flux_ae_config_from_json(released) == FLUX1_AE
    assert flux_ae_config_from_json({**released, "use_quant_conv": True}) is None  # an SD VAE
    assert flux_ae_config_from_json({**released, "_class_name": "AutoencoderKLQwenImage"}) is None
    assert isinstance(flux_ae_config_from_json(released), FluxAEConfig)

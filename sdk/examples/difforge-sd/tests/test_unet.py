"""The U-Net against diffusers' UNet2DConditionModel (SD 1.x-like and SDXL-like tiny configs), 1e-4."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from difforge_sdk.parity import MODULE_ATOL, assert_close

from difforge.errors import ConfigError
from difforge_sd.unet import SD15_UNET, SDXL_BASE_UNET, SDUNet, sd_unet_config, sdxl_unet_config, unet_config_from_shapes

from .sd_helpers import diffusers_unet, own_unet, shapes_of, unet_inputs


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_unet_matches_diffusers(kind):
    ref = diffusers_unet(kind)
    ours = own_unet(ref)
    inputs = unet_inputs(kind)
    with torch.no_grad():
        extra = {}
        if kind == "sdxl":
            extra = {"added_cond_kwargs": {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}}
        want = ref(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], **extra).sample
        got = ours(**inputs)
    assert want.abs().max() > 0.05  # a meaningful comparison, not two near-zero outputs
    assert_close(got, want, atol=MODULE_ATOL, name=f"{kind} U-Net vs diffusers")


def test_odd_latent_sizes_match_diffusers():
    """A latent not divisible by the downscaling: the up blocks upsample to the skip's size, as diffusers."""
    ref = diffusers_unet("sd")
    ours = own_unet(ref)
    inputs = unet_inputs("sd", batch=1, h=7, w=9)
    with torch.no_grad():
        want = ref(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
        got = ours(**inputs)
    assert_close(got, want, atol=MODULE_ATOL, name="odd size")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_config_from_shapes_recovers_the_tiny_configs(kind):
    ours = own_unet(diffusers_unet(kind))
    shapes = shapes_of(ours.state_dict())
    assert unet_config_from_shapes(shapes) == ours.config
    assert (sd_unet_config(shapes) is None) == (kind == "sdxl")
    assert (sdxl_unet_config(shapes) is None) == (kind == "sd")


@pytest.mark.parametrize("config", [SD15_UNET, SDXL_BASE_UNET], ids=["sd15", "sdxl"])
def test_released_configs_round_trip_on_meta(config):
    with torch.device("meta"):
        model = SDUNet(config)
    shapes = shapes_of(model.state_dict())
    assert unet_config_from_shapes(shapes) == config
    n = sum(v.numel() for v in model.state_dict().values())
    # the released parameter counts: SD 1.5 859.5M, SDXL base 2567.5M
    assert round(n / 1e6, 1) == (859.5 if config is SD15_UNET else 2567.5)


def test_sdxl_unet_requires_added_conditions():
    ours = own_unet(diffusers_unet("sdxl"))
    inputs = unet_inputs("sdxl")
    del inputs["time_ids"]
    with pytest.raises(ConfigError, match="time_ids"):
        ours(**inputs)


def test_bad_head_count_is_a_config_error():
    with pytest.raises(ConfigError, match="heads"):
        SDUNet(dataclasses.replace(SD15_UNET, block_out_channels=(32, 64), transformer_layers=(1, 0), attention_heads=(3, 3)))

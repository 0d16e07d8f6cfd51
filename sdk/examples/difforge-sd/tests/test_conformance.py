"""difforge-sd passes the SDK's model conformance suite (sd-unet, sdxl-unet, sd-vae): meta construction,
config inference, every checkpoint and LoRA format it registers, every installed attention backend,
offload backend and cache strategy (deepcache, fbcache, dbcache at their exact settings)."""

from __future__ import annotations

from typing import Any

import torch
from difforge_sdk.testing import ModelConformance

from difforge_sd.unet import SDUNetConfig
from difforge_sd.vae import SDVAEConfig

from .sd_helpers import unet_inputs

TINY_SD_UNET = SDUNetConfig(
    block_out_channels=(32, 64), transformer_layers=(1, 0), attention_heads=(8, 8), cross_attention_dim=64
)
TINY_SDXL_UNET = SDUNetConfig(
    block_out_channels=(64, 128), transformer_layers=(0, 1), mid_transformer_layers=1, attention_heads=(1, 2),
    cross_attention_dim=128, use_linear_projection=True, addition_embed_dim=32 + 6 * 256,
)


class TestSDUNet(ModelConformance):
    model = "sd-unet"
    tiny_config = TINY_SD_UNET
    # a U-Net is deep (every path crosses ~20 weight layers): fp8's ~3.6% per-weight rounding compounds to
    # about 10% on tiny random weights; a broken cast is off by 100%
    dtype_offload_tolerance = 0.15

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        return unet_inputs("sd")


class TestSDXLUNet(ModelConformance):
    model = "sdxl-unet"
    tiny_config = TINY_SDXL_UNET
    dtype_offload_tolerance = 0.15  # as TestSDUNet

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        return unet_inputs("sdxl")


class TestSDVAE(ModelConformance):
    model = "sd-vae"
    tiny_config = SDVAEConfig(block_out_channels=(32, 32), layers_per_block=1)
    method = "decode"

    def forward_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        return {"latents": torch.randn(1, 4, 4, 6)}

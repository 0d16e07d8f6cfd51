"""The VAE against diffusers' AutoencoderKL, 1e-4."""

from __future__ import annotations

import torch
from difforge_sdk.parity import MODULE_ATOL, assert_close

from difforge_sd.vae import SD_VAE, SDVAE, vae_config_from_json, vae_config_from_shapes

from .sd_helpers import diffusers_vae, shapes_of


def _pair():
    ref = diffusers_vae()
    sd = ref.state_dict()
    ours = SDVAE(vae_config_from_json(dict(ref.config), shapes_of(sd))).eval()
    ours.load_state_dict(sd, strict=True)
    return ref, ours


def test_vae_encode_decode_match_diffusers():
    ref, ours = _pair()
    g = torch.Generator().manual_seed(0)
    image, latents = torch.randn(1, 3, 32, 48, generator=g), torch.randn(1, 4, 4, 6, generator=g)
    with torch.no_grad():
        assert_close(ours.encode(image), ref.encode(image).latent_dist.mean, atol=MODULE_ATOL, name="encode")
        assert_close(ours.decode(latents), ref.decode(latents).sample, atol=MODULE_ATOL, name="decode")


def test_vae_config_from_shapes():
    _, ours = _pair()
    assert vae_config_from_shapes(shapes_of(ours.state_dict())) == ours.config
    with torch.device("meta"):
        released = SDVAE(SD_VAE)
    assert vae_config_from_shapes(shapes_of(released.state_dict())) == SD_VAE
    assert round(sum(v.numel() for v in released.state_dict().values()) / 1e6, 1) == 83.7  # the released 83.65M

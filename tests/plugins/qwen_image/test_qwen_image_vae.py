"""Qwen-Image's VAE through difforge-wan's WanVAE: parity with diffusers' AutoencoderKLQwenImage on tiny
random weights (single frames), loading its folder and files, and the released VAE's header."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import difforge
import difforge_qwen_image
import difforge_wan
from difforge_qwen_image.releases import QWEN_IMAGE_VAE_JSON, qwen_image_vae_config, qwen_image_vae_shapes
from difforge_wan.vae import WAN21_VAE

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-4
TINY = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)  # Qwen-Image's statistics (z_dim 16)


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLQwenImage(**TINY).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith("gamma")
                    else 0.15 * torch.randn(p.shape, generator=gen))  # fmt: skip
    return model


def _stats(ref) -> tuple[torch.Tensor, torch.Tensor]:
    c = ref.config
    return torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1), 1.0 / torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)


@pytest.fixture(scope="module")
def folder(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen-image-vae") / "vae"
    ref.save_pretrained(path)
    return path


@torch.no_grad()
def test_encode_and_decode_match_diffusers(ref, folder) -> None:
    vae = difforge.load_model(folder)
    det = vae.difforge_detection
    assert (det.model, det.format, det.converter) == ("wan-vae", "diffusers", "wan-vae-diffusers")
    assert vae.config.latents_mean == pytest.approx(tuple(ref.config.latents_mean))
    mean, inv_std = _stats(ref)

    image = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    expected = ((ref.encode(image[:, :, None]).latent_dist.mode() - mean) * inv_std)[:, :, 0]  # the pipelines' normalisation
    latents = vae.encode(image)
    assert latents.shape == expected.shape == (2, 16, 4, 6)
    assert (latents - expected).abs().max().item() <= ATOL

    z = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(3))
    expected = ref.decode((z[:, :, None] / inv_std + mean)).sample[:, :, 0]
    decoded = vae.decode(z)
    assert decoded.shape == expected.shape == (2, 3, 32, 48)
    assert expected.std() > 0.1  # not a flat or saturated image
    assert (decoded - expected).abs().max().item() <= ATOL


@torch.no_grad()
def test_tiled_decode_is_close_to_plain(folder) -> None:
    """Each tile sees only its own latents (and a random tiny VAE's mid-block attention sees the whole
    tile), so tiles are close to, not equal to, a plain decode; larger tiles come closer."""
    vae = difforge.load_model(folder)
    z = torch.randn(1, 16, 16, 24, generator=torch.Generator().manual_seed(4))
    plain = vae.decode(z)
    spread = (plain - plain.mean()).abs().mean().item()
    errors = {}
    for size, stride in ((8, 6), (12, 8)):
        tiled = vae.tiled_decode(z, tile_size=size, tile_stride=stride)
        assert tiled.shape == plain.shape == (1, 3, 128, 192)
        errors[size] = (tiled - plain).abs().mean().item() / spread
    assert errors[12] < 0.2 and errors[12] < errors[8]
    assert torch.equal(vae.tiled_decode(z, tile_size=24, tile_stride=8), plain)  # one tile: the plain decode


def test_single_file_without_config_takes_qwen_image_statistics(ref, tmp_path) -> None:
    """A bare vae file (no config.json): the statistics of the 16-channel release, which are Qwen-Image's."""
    path = tmp_path / "qwen_image_vae.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    det = difforge.detect(path)
    assert det.model == "wan-vae" and det.config.latents_mean == pytest.approx(tuple(QWEN_IMAGE_VAE_JSON["latents_mean"]))


def test_released_vae_is_the_wan21_vae() -> None:
    """Qwen/Qwen-Image's vae/config.json is the Wan 2.1 VAE, statistics included; its header is
    diffusers' AutoencoderKLQwenImage() and carries difforge-wan's Wan2.1-VAE fingerprint."""
    assert qwen_image_vae_config() == WAN21_VAE
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLQwenImage(**{k: v for k, v in QWEN_IMAGE_VAE_JSON.items() if not k.startswith("_")})
    shapes = qwen_image_vae_shapes()
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert difforge.fingerprint(shapes) == difforge_qwen_image.VAE_FINGERPRINT
    assert difforge_wan.VAE_FINGERPRINTS[difforge_qwen_image.VAE_FINGERPRINT] == "Wan2.1-VAE"


@pytest.mark.parametrize("with_config", [True, False], ids=["folder", "file"])
def test_detect_released_vae_header(tmp_path, sparse_writer, with_config) -> None:
    path = sparse_writer(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", qwen_image_vae_shapes(), dtype="BF16")
    if with_config:
        (path.parent / "config.json").write_text(json.dumps(QWEN_IMAGE_VAE_JSON))
    det = difforge.detect(path.parent if with_config else path)
    assert (det.model, det.role, det.format, det.variant) == ("wan-vae", "vae", "diffusers", "Wan2.1-VAE")
    assert det.config == WAN21_VAE

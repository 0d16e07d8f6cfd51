"""Fingerprints of the released Wan checkpoints, registration, and detection of real-size headers
(sparse files: the real names and shapes over a hole)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import difforge
import difforge_wan
from difforge_wan.releases import released_fingerprints, released_shapes
from difforge_wan.vae import WAN21_VAE, WAN22_VAE

VAE_RELEASES = [("Wan2.1-VAE", WAN21_VAE), ("Wan2.2-VAE", WAN22_VAE)]
DIFFUSERS_VAE_CONFIG = {
    "Wan2.1-VAE": {"_class_name": "AutoencoderKLWan", "base_dim": 96, "z_dim": 16},
    "Wan2.2-VAE": {
        "_class_name": "AutoencoderKLWan", "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True,
        "patch_size": 2, "in_channels": 12, "out_channels": 12, "scale_factor_spatial": 16,
        "latents_mean": list(WAN22_VAE.latents_mean), "latents_std": list(WAN22_VAE.latents_std),
    },
}  # fmt: skip


def test_stored_fingerprints_are_the_recomputed_ones() -> None:
    computed = released_fingerprints()
    assert difforge_wan.VAE_FINGERPRINTS == {fp: v for (m, v, _), fp in computed.items() if m == "wan-vae"}
    assert len(set(computed.values())) == len(computed)


def test_diffusers_layout_is_diffusers_own() -> None:
    """The diffusers-layout shapes we fingerprint are those diffusers itself builds from the released configs."""
    import torch

    diffusers = pytest.importorskip("diffusers")
    for variant, _ in VAE_RELEASES:
        config = {k: v for k, v in DIFFUSERS_VAE_CONFIG[variant].items() if not k.startswith("_")}
        with torch.device("meta"):
            ref = diffusers.AutoencoderKLWan(**config)
        assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == released_shapes("wan-vae", variant, "diffusers")


def test_entry_module_is_light() -> None:
    code = "import sys, difforge_wan; list(difforge_wan.difforge_register_models()); "
    code += "list(difforge_wan.difforge_register_converters()); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("variant", "config"), VAE_RELEASES, ids=["2.1", "2.2"])
def test_detect_wan_vae(tmp_path, sparse_writer, variant, config) -> None:
    """Wan-AI's VAE names (as ComfyUI's ``wan_2.1_vae.safetensors`` also uses them)."""
    path = sparse_writer(tmp_path / "vae.safetensors", released_shapes("wan-vae", variant, "wan"))
    result = difforge.detect(path)
    assert (result.model, result.format, result.variant, result.converter) == ("wan-vae", "wan", variant, None)
    assert result.config == config


@pytest.mark.parametrize(("variant", "config"), VAE_RELEASES, ids=["2.1", "2.2"])
def test_detect_diffusers_vae_folder(tmp_path, sharded_sparse_writer, variant, config) -> None:
    shapes = released_shapes("wan-vae", variant, "diffusers")
    folder = sharded_sparse_writer(tmp_path / "vae", shapes, shards=1, config=DIFFUSERS_VAE_CONFIG[variant])
    result = difforge.detect(folder)
    assert (result.model, result.format, result.variant) == ("wan-vae", "diffusers", variant)
    assert result.config == config and result.converter == "wan-vae-diffusers"

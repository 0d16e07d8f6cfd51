"""Fingerprints of the released checkpoints, registration, and detection of real-size headers
(sparse files: the real names and shapes over a hole)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import difforge
import difforge_flux
from difforge_flux.ae import FLUX1_AE
from difforge_flux.dit import FLUX1_DEV, FLUX1_SCHNELL
from difforge_flux.releases import released_fingerprints, released_shapes

DIFFUSERS_DIT_CONFIG = {
    "_class_name": "FluxTransformer2DModel",
    "_diffusers_version": "0.30.0.dev0",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}


def test_stored_fingerprints_are_the_recomputed_ones() -> None:
    computed = released_fingerprints()
    assert difforge_flux.DIT_FINGERPRINTS == {fp: v for (m, v, _), fp in computed.items() if m == "flux-dit"}
    assert difforge_flux.AE_FINGERPRINTS == {fp: v for (m, v, _), fp in computed.items() if m == "flux-ae"}
    assert len(set(computed.values())) == len(computed)  # six distinct fingerprints


def test_registered(flux_registry) -> None:
    dit, ae = flux_registry.models.get("flux-dit"), flux_registry.models.get("flux-ae")
    assert (dit.family, dit.role, dit.format) == ("flux", "dit", "bfl")
    assert (ae.family, ae.role, ae.format) == ("flux", "vae", "bfl")
    assert flux_registry.converters.get("flux-dit-diffusers").target_model == "flux-dit"
    assert flux_registry.converters.get("flux-ae-diffusers").target_model == "flux-ae"
    assert dit.infer_config(released_shapes("flux-dit", "FLUX.1-dev", "bfl")) == FLUX1_DEV


def test_entry_module_is_light() -> None:
    code = "import sys, difforge_flux; list(difforge_flux.difforge_register_models()); "
    code += "list(difforge_flux.difforge_register_converters()); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- real-size headers


@pytest.mark.parametrize(
    ("variant", "config"), [("FLUX.1-dev", FLUX1_DEV), ("FLUX.1-schnell", FLUX1_SCHNELL)], ids=["dev", "schnell"]
)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfyui"])
def test_detect_bfl_dit(tmp_path, sparse_writer, variant, config, prefix) -> None:
    shapes = {prefix + k: v for k, v in released_shapes("flux-dit", variant, "bfl").items()}
    path = sparse_writer(tmp_path / "flux1.safetensors", shapes)
    result = difforge.detect(path)
    assert (result.model, result.family, result.format, result.variant) == ("flux-dit", "flux", "bfl", variant)
    assert result.config == config and result.prefix == prefix and result.converter is None


@pytest.mark.parametrize(
    ("variant", "config"), [("FLUX.1-dev", FLUX1_DEV), ("FLUX.1-schnell", FLUX1_SCHNELL)], ids=["dev", "schnell"]
)
def test_detect_diffusers_dit_folder(tmp_path, sharded_sparse_writer, variant, config) -> None:
    """The diffusers ``transformer/`` folder: three shards with their index and config.json."""
    shapes = released_shapes("flux-dit", variant, "diffusers")
    json_config = dict(DIFFUSERS_DIT_CONFIG, guidance_embeds=config.guidance_embed)
    folder = sharded_sparse_writer(tmp_path / "transformer", shapes, shards=3, config=json_config)
    result = difforge.detect(folder)
    assert (result.model, result.format, result.variant) == ("flux-dit", "diffusers", variant)
    assert result.config == config and result.converter == "flux-dit-diffusers"


def test_detect_diffusers_dit_single_file(tmp_path, sparse_writer) -> None:
    shapes = released_shapes("flux-dit", "FLUX.1-dev", "diffusers")
    result = difforge.detect(sparse_writer(tmp_path / "flux1-dev-diffusers.safetensors", shapes))
    assert (result.model, result.format, result.variant) == ("flux-dit", "diffusers", "FLUX.1-dev")
    assert result.config == FLUX1_DEV


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_detect_ae(tmp_path, sparse_writer, layout) -> None:
    path = sparse_writer(tmp_path / "ae.safetensors", released_shapes("flux-ae", "FLUX.1", layout), dtype="F32")
    result = difforge.detect(path)
    assert (result.model, result.role, result.format, result.variant) == ("flux-ae", "vae", layout, "FLUX.1")
    assert result.config == FLUX1_AE


def test_detect_pruned_fine_tune(tmp_path, sparse_writer) -> None:
    """Not a release (fewer single blocks): structural detection, no variant, the config inferred."""
    schnell = released_shapes("flux-dit", "FLUX.1-schnell", "bfl")
    shapes = {k: v for k, v in schnell.items() if not k.startswith("single_blocks.37.")}
    result = difforge.detect(sparse_writer(tmp_path / "pruned.safetensors", shapes))
    assert (result.model, result.variant) == ("flux-dit", None)
    assert result.config.depth_single_blocks == 37 and not result.config.guidance_embed

"""Fingerprints of the released Wan checkpoints, registration, and detection of real-size headers
(sparse files: the real names and shapes over a hole)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import difforge
import difforge_wan
from difforge_wan.dit import WAN21_T2V_1_3B, WAN21_T2V_14B, WAN22_TI2V_5B
from difforge_wan.releases import released_fingerprints, released_shapes
from difforge_wan.vae import WAN21_VAE, WAN22_VAE

DIT_RELEASES = [("Wan2.1-T2V-1.3B", WAN21_T2V_1_3B, 1), ("Wan2.1-T2V-14B", WAN21_T2V_14B, 6),
                ("Wan2.2-TI2V-5B", WAN22_TI2V_5B, 3)]  # (variant, config, Wan-AI shards)
DIT_IDS = ["1.3B", "14B", "TI2V-5B"]


def diffusers_dit_config(config) -> dict:
    """A release's transformer/config.json (the fields that matter)."""
    return {
        "_class_name": "WanTransformer3DModel", "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-6,
        "ffn_dim": config.ffn_dim, "freq_dim": 256, "in_channels": config.in_dim, "out_channels": config.out_dim,
        "num_attention_heads": config.num_heads, "num_layers": config.num_layers, "patch_size": [1, 2, 2],
        "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096, "image_dim": None,
        "added_kv_proj_dim": None,
    }  # fmt: skip


def wan_ai_config(config) -> dict:
    """Wan-AI's config.json beside the DiT shards."""
    return {
        "_class_name": "WanModel", "model_type": "ti2v" if config.in_dim == 48 else "t2v", "dim": config.dim,
        "ffn_dim": config.ffn_dim, "freq_dim": 256, "in_dim": config.in_dim, "out_dim": config.out_dim,
        "num_heads": config.num_heads, "num_layers": config.num_layers, "text_len": 512, "eps": 1e-6,
    }  # fmt: skip

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
    assert difforge_wan.DIT_FINGERPRINTS == {fp: v for (m, v, _), fp in computed.items() if m == "wan-dit"}
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
    for variant, config, _ in DIT_RELEASES:
        kwargs = {k: v for k, v in diffusers_dit_config(config).items() if not k.startswith("_")}
        with torch.device("meta"):
            ref = diffusers.WanTransformer3DModel(**kwargs)
        assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == released_shapes("wan-dit", variant, "diffusers")


def test_registered(wan_registry) -> None:
    dit, vae = wan_registry.models.get("wan-dit"), wan_registry.models.get("wan-vae")
    assert (dit.family, dit.role, dit.format) == ("wan", "dit", "wan")
    assert (vae.family, vae.role, vae.format) == ("wan", "vae", "wan")
    pipe = wan_registry.pipelines.get("wan")
    assert [s.name for s in pipe.slots] == ["dit", "vae", "text_encoder", "tokenizer"]
    assert set(pipe.sources) == set(pipe.variant_schedulers) == {v for v, _, _ in DIT_RELEASES}
    assert pipe.variant_schedulers["Wan2.2-TI2V-5B"] == {"name": "flow-unipc", "shift": 5.0}


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


@pytest.mark.parametrize(("variant", "config", "shards"), DIT_RELEASES, ids=DIT_IDS)
def test_detect_wan_ai_dit(tmp_path, sparse_writer, sharded_sparse_writer, variant, config, shards) -> None:
    """Wan-AI's files: one safetensors (1.3B) or shards with their index, and Wan-AI's config.json."""
    shapes = released_shapes("wan-dit", variant, "wan")
    if shards == 1:
        path = sparse_writer(tmp_path / "diffusion_pytorch_model.safetensors", shapes)
    else:
        path = sharded_sparse_writer(tmp_path / "release", shapes, shards=shards, config=wan_ai_config(config))
    result = difforge.detect(path)
    assert (result.model, result.format, result.variant, result.converter) == ("wan-dit", "wan", variant, None)
    assert result.config == config


@pytest.mark.parametrize(("variant", "config", "shards"), DIT_RELEASES[:1], ids=DIT_IDS[:1])
def test_detect_comfyui_dit(tmp_path, sparse_writer, variant, config, shards) -> None:
    shapes = {"model.diffusion_model." + k: v for k, v in released_shapes("wan-dit", variant, "wan").items()}
    result = difforge.detect(sparse_writer(tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors", shapes))
    assert (result.model, result.variant, result.prefix) == ("wan-dit", variant, "model.diffusion_model.")


@pytest.mark.parametrize(("variant", "config", "shards"), DIT_RELEASES, ids=DIT_IDS)
def test_detect_diffusers_dit_folder(tmp_path, sharded_sparse_writer, variant, config, shards) -> None:
    shapes = released_shapes("wan-dit", variant, "diffusers")
    folder = sharded_sparse_writer(tmp_path / "transformer", shapes, shards=2, config=diffusers_dit_config(config))
    result = difforge.detect(folder)
    assert (result.model, result.format, result.variant) == ("wan-dit", "diffusers", variant)
    assert result.config == config and result.converter == "wan-dit-diffusers"


def test_unknown_heads_fall_back_to_128() -> None:
    """Without a config.json the head count is not in the weights: heads of 128, as every release."""
    from difforge_wan.dit import wan_dit_config_from_shapes

    shapes = released_shapes("wan-dit", "Wan2.1-T2V-14B", "wan")
    shapes = {k: v for k, v in shapes.items() if not k.startswith("blocks.39.")}  # a pruned fine-tune
    inferred = wan_dit_config_from_shapes(shapes)
    assert inferred.num_layers == 39 and inferred.num_heads == 40

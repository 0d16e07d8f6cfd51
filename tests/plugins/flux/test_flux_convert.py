"""The diffusers <-> BFL converters: exact round trips, real key sets, meta tensors, detection."""

from __future__ import annotations

import pytest
import torch

from difforge_flux.convert import (
    ae_from_diffusers,
    ae_reshape,
    ae_to_diffusers,
    ae_unreshape,
    dit_from_diffusers,
    dit_fuse,
    dit_split,
    dit_to_diffusers,
    is_flux_ae_diffusers,
    is_flux_diffusers,
)
from difforge_flux.releases import released_shapes

diffusers = pytest.importorskip("diffusers")

RELEASED_DIT = dict(
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)
RELEASED_AE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def inverse(sd, split, rename) -> dict:
    out = {}
    for key, value in split(sd).items():
        new = rename(key)
        assert new is not None, key
        out[new] = value
    return out


def shapes(sd) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_dit_round_trip_is_exact(dit_pair) -> None:
    back = inverse(dit_pair.ours.state_dict(), dit_split, dit_to_diffusers)
    ref = dit_pair.ref.state_dict()
    assert back.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(back[key], value), key


def test_ae_round_trip_is_exact(ae_pair) -> None:
    back = inverse(ae_pair.ours.state_dict(), ae_unreshape, ae_to_diffusers)
    ref = ae_pair.ref.state_dict()
    assert back.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_released_dit_layouts(guidance: bool) -> None:
    """Our inverse map gives exactly diffusers' key set and shapes, and the forward map (run on meta
    tensors) exactly BFL's."""
    variant = "FLUX.1-dev" if guidance else "FLUX.1-schnell"
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(**RELEASED_DIT, guidance_embeds=guidance).state_dict()
    assert released_shapes("flux-dit", variant, "diffusers") == shapes(ref)
    bfl = dit_fuse({dit_from_diffusers(k): v for k, v in ref.items()})
    assert all(v.is_meta for v in bfl.values())
    assert shapes(bfl) == released_shapes("flux-dit", variant, "bfl")
    assert len(bfl) == (780 if guidance else 776)  # the key count of flux1-dev / flux1-schnell.safetensors


def test_released_ae_layouts() -> None:
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**RELEASED_AE).state_dict()
    assert released_shapes("flux-ae", "FLUX.1", "diffusers") == shapes(ref)
    bfl = ae_reshape({ae_from_diffusers(k): v for k, v in ref.items()})
    assert shapes(bfl) == released_shapes("flux-ae", "FLUX.1", "bfl")
    assert bfl["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "decoder.up.0.block.0.nin_shortcut.weight" in bfl  # 256 -> 128 at the highest resolution
    assert "decoder.up.0.upsample.conv.weight" not in bfl and "decoder.up.3.upsample.conv.weight" in bfl


def test_final_modulation_halves_are_swapped() -> None:
    scale, shift = torch.ones(4, 2), torch.zeros(4, 2)
    out = dit_fuse({"final_layer.adaLN_modulation.1.weight": torch.cat((scale, shift))})
    assert torch.equal(out["final_layer.adaLN_modulation.1.weight"], torch.cat((shift, scale)))


def test_detect_functions() -> None:
    dit_diffusers = list(released_shapes("flux-dit", "FLUX.1-dev", "diffusers"))
    dit_bfl = list(released_shapes("flux-dit", "FLUX.1-dev", "bfl"))
    ae_diffusers = list(released_shapes("flux-ae", "FLUX.1", "diffusers"))
    assert is_flux_diffusers(dit_diffusers, {})
    assert not is_flux_diffusers(dit_bfl, {})
    assert not is_flux_diffusers(ae_diffusers, {})
    assert is_flux_ae_diffusers(ae_diffusers, {})
    assert not is_flux_ae_diffusers(list(released_shapes("flux-ae", "FLUX.1", "bfl")), {})
    assert not is_flux_ae_diffusers(ae_diffusers + ["quant_conv.weight", "post_quant_conv.weight"], {})  # SD VAEs
    # a FLUX.2-style transformer (fused single-block projection) is not a FLUX.1 one
    flux2 = [k for k in dit_diffusers if ".proj_mlp." not in k]
    flux2.append("single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight")
    assert not is_flux_diffusers(flux2, {})


def test_renames_drop_foreign_keys() -> None:
    assert dit_from_diffusers("pos_embed.freqs") is None
    assert dit_to_diffusers("not.a.flux.key") is None
    assert ae_from_diffusers("quant_conv.weight") is None

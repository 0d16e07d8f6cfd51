"""FluxDiT: parity with diffusers' FluxTransformer2DModel, config inference, block streams."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from difforge.errors import ConfigError
from difforge_flux import BLOCK_LAYOUT
from difforge_flux.dit import (
    FLUX1_DEV,
    FLUX1_SCHNELL,
    FluxDiT,
    FluxDiTConfig,
    flux_dit_config_from_json,
    flux_dit_config_from_shapes,
    rope_axes,
)
from difforge_flux.releases import released_shapes


def test_forward_matches_diffusers(dit_pair) -> None:
    x = dit_pair.inputs
    with torch.no_grad():
        expected = dit_pair.ref_forward()
        got = dit_pair.ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"])
    assert got.shape == expected.shape == x["img"].shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_batched_ids_match_shared_ids(dit_pair) -> None:
    """BFL passes ids as [B, N, 3], diffusers as [N, 3]: both give the same result."""
    x = dit_pair.inputs
    b = x["img"].shape[0]
    with torch.no_grad():
        shared = dit_pair.ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"])
        batched = dit_pair.ours(
            x["img"], x["img_ids"].expand(b, -1, -1), x["txt"], x["txt_ids"].expand(b, -1, -1),
            x["timesteps"], x["y"], x["guidance"],
        )  # fmt: skip
    torch.testing.assert_close(batched, shared)


def test_guidance_must_match_the_model(dit_pair) -> None:
    x = dit_pair.inputs
    wrong = None if dit_pair.guidance else torch.full((2,), 3.5)
    with pytest.raises(ConfigError, match="guidance"):
        dit_pair.ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], guidance=wrong)


def test_blocks_follow_the_layout(dit_pair) -> None:
    """Every block of both groups takes (img, txt, vec=, pe=) and returns (img, txt) of the same shapes."""
    from difforge_flux.dit import rope_rotations

    model = dit_pair.ours
    x = dit_pair.inputs
    img, txt = model.img_in(x["img"]), model.txt_in(x["txt"])
    vec = torch.randn(img.shape[0], model.config.hidden_size)
    pe = rope_rotations(torch.cat((x["txt_ids"], x["img_ids"])), model.config.axes_dim, model.config.theta)
    assert [g.path for g in BLOCK_LAYOUT.groups] == ["double_blocks", "single_blocks"]
    with torch.no_grad():
        for group in BLOCK_LAYOUT.groups:
            assert group.streams == ("img", "txt")
            for block in getattr(model, group.path):
                out = block(img, txt, vec=vec, pe=pe)
                assert isinstance(out, tuple) and [t.shape for t in out] == [img.shape, txt.shape]
                img, txt = out


def test_no_buffers_and_meta_build() -> None:
    """Built on meta and loaded with assign=True: no buffer may be left behind."""
    with torch.device("meta"):
        model = FluxDiT(FLUX1_DEV)
    assert not list(model.buffers())
    assert sum(p.numel() for p in model.parameters()) == 11_901_408_320  # FLUX.1-dev's parameter count


@pytest.mark.parametrize("config", [FLUX1_DEV, FLUX1_SCHNELL], ids=["dev", "schnell"])
def test_config_from_released_shapes(config: FluxDiTConfig) -> None:
    variant = "FLUX.1-dev" if config.guidance_embed else "FLUX.1-schnell"
    assert flux_dit_config_from_shapes(released_shapes("flux-dit", variant, "bfl")) == config


@pytest.mark.parametrize(
    "change",
    [
        {"in_channels": 384},  # FLUX.1-Fill
        {"in_channels": 128},  # FLUX.1-Canny / Depth
        {"depth": 5, "depth_single_blocks": 10, "guidance_embed": False},  # a pruned schnell
        {"hidden_size": 64, "num_heads": 2, "axes_dim": rope_axes(32), "vec_in_dim": 16, "context_in_dim": 24},
        {"mlp_ratio": 2.0, "qkv_bias": False},
    ],
)
def test_config_from_shapes_variants(change: dict) -> None:
    config = dataclasses.replace(FluxDiTConfig(depth=2, depth_single_blocks=3), **change)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FluxDiT(config).state_dict().items()}
    assert flux_dit_config_from_shapes(shapes) == config


def test_config_from_shapes_rejects_other_models() -> None:
    assert flux_dit_config_from_shapes({"x_embedder.weight": (3072, 64)}) is None
    assert flux_dit_config_from_shapes({}) is None


def test_rope_axes() -> None:
    assert rope_axes(128) == (16, 56, 56)
    assert rope_axes(16) == (4, 6, 6)


def test_config_from_json() -> None:
    released = {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": True,
        "in_channels": 64,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 19,
        "num_single_layers": 38,
        "out_channels": None,
        "patch_size": 1,
        "pooled_projection_dim": 768,
    }
    assert flux_dit_config_from_json(released) == FLUX1_DEV
    assert flux_dit_config_from_json({**released, "guidance_embeds": False}) == FLUX1_SCHNELL
    assert flux_dit_config_from_json({**released, "_class_name": "QwenImageTransformer2DModel"}) is None


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ConfigError, match="axes"):
        FluxDiT(FluxDiTConfig(hidden_size=64, num_heads=2, depth=0, depth_single_blocks=0))
    with pytest.raises(ConfigError, match="multiple"):
        FluxDiT(FluxDiTConfig(hidden_size=100, num_heads=3, depth=0, depth_single_blocks=0))

"""QwenImageDiT: parity with diffusers' QwenImageTransformer2DModel (padding masks included), config
inference, block streams, and loading in every published layout."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

import difforge
from difforge.errors import ConfigError
from difforge_qwen_image import BLOCK_LAYOUT
from difforge_qwen_image.dit import (
    QWEN_IMAGE,
    QwenImageDiT,
    QwenImageDiTConfig,
    msrope,
    qwen_image_dit_config_from_json,
    qwen_image_dit_config_from_shapes,
    rope_axes,
)
from difforge_qwen_image.releases import released_shapes

IN_CHANNELS, TEXT_DIM, OUT_CHANNELS = 16, 32, 4  # conftest.TINY_DIT


def _inputs(batch: int = 2, grid: tuple[int, int] = (4, 6), text: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, grid[0] * grid[1], IN_CHANNELS, generator=gen)
    txt = torch.randn(batch, text, TEXT_DIM, generator=gen)
    timesteps = torch.tensor([0.25, 0.9, 0.5])[:batch]
    return img, txt, timesteps


@pytest.mark.parametrize("grid", [(4, 6), (5, 3)], ids=["even", "odd"])
def test_forward_matches_diffusers(dit_pair, grid) -> None:
    img, txt, t = _inputs(grid=grid)
    with torch.no_grad():
        expected = dit_pair.ref_forward(img, txt, t, grid)
        got = dit_pair.ours(img, txt, t, grid)
    assert got.shape == expected.shape == (2, grid[0] * grid[1], 4 * OUT_CHANNELS)
    assert (got - expected).abs().max().item() <= 1e-4


def test_prompts_of_different_lengths_in_one_batch(dit_pair) -> None:
    """Three prompts of 7, 4 and 2 tokens right-padded to 7 with a mask: as diffusers, and every padded
    row equals the same prompt run alone without padding."""
    img, txt, t = _inputs(batch=3)
    lengths = [7, 4, 2]
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        txt[i, n:] = 0  # as the pipeline pads
    with torch.no_grad():
        expected = dit_pair.ref_forward(img, txt, t, (4, 6), mask)
        got = dit_pair.ours(img, txt, t, (4, 6), mask)
        assert (got - expected).abs().max().item() <= 1e-4
        for i, n in enumerate(lengths):
            alone = dit_pair.ours(img[i : i + 1], txt[i : i + 1, :n], t[i : i + 1], (4, 6))
            assert (got[i : i + 1] - alone).abs().max().item() <= 1e-4
        unmasked = dit_pair.ours(img, txt, t, (4, 6))
    assert (unmasked[1:] - got[1:]).abs().max().item() > 1e-3  # the mask matters
    assert torch.equal(dit_pair.ours(img, txt, t, (4, 6), torch.ones(3, 7)), unmasked)  # all-ones mask = none


def test_msrope_positions() -> None:
    """Centred image rows/columns, frame 0; text on the diagonal after max(h//2, w//2)."""
    img, txt = msrope(3, 4, 2, (2, 2, 2), 10_000, torch.device("cpu"))
    angles = torch.angle(img[0, :, 0])  # [12, 3]: frequency 1 for the first pair of every axis
    assert torch.allclose(angles[:, 0], torch.zeros(12))
    assert angles[:, 1].round().tolist() == [-2.0] * 4 + [-1.0] * 4 + [0.0] * 4  # rows -2..0 (3 rows)
    assert angles[:4, 2].round().tolist() == [-2.0, -1.0, 0.0, 1.0]  # columns -2..1
    assert torch.angle(txt[0, :, 0]).round().tolist() == [[2.0] * 3, [3.0] * 3]  # max(3 // 2, 4 // 2) = 2


def test_blocks_follow_the_layout(dit_pair) -> None:
    """Every block takes (img, txt, temb=, rope=, mask=) and returns (img, txt) of the same shapes."""
    model = dit_pair.ours
    img, txt, t = _inputs()
    img, txt = model.img_in(img), model.txt_in(txt)
    temb = torch.randn(2, model.config.hidden_size)
    rope = msrope(4, 6, 7, model.config.axes_dim, 10_000, img.device)
    assert [(g.path, g.streams) for g in BLOCK_LAYOUT.groups] == [("transformer_blocks", ("img", "txt"))]
    with torch.no_grad():
        for block in model.transformer_blocks:
            out = block(img, txt, temb=temb, rope=rope, mask=None)
            assert isinstance(out, tuple) and [o.shape for o in out] == [img.shape, txt.shape]
            img, txt = out


def test_no_buffers_and_meta_build() -> None:
    with torch.device("meta"):
        model = QwenImageDiT(QWEN_IMAGE)
    assert not list(model.buffers())
    assert sum(p.numel() for p in model.parameters()) == 20_430_401_088  # Qwen-Image's parameter count


def test_config_from_released_shapes() -> None:
    assert qwen_image_dit_config_from_shapes(released_shapes("qwen-image-dit", "Qwen-Image")) == QWEN_IMAGE


@pytest.mark.parametrize(
    "change",
    [
        {"num_layers": 5},  # pruned
        {"num_heads": 2, "head_dim": 32, "axes_dim": rope_axes(32), "text_dim": 24},
        {"mlp_ratio": 2.0, "in_channels": 128, "out_channels": 32},
    ],
)
def test_config_from_shapes_variants(change: dict) -> None:
    config = dataclasses.replace(QwenImageDiTConfig(num_layers=2, num_heads=2, head_dim=16, axes_dim=rope_axes(16),
                                                    text_dim=32), **change)  # fmt: skip
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in QwenImageDiT(config).state_dict().items()}
    assert qwen_image_dit_config_from_shapes(shapes) == config


def test_config_from_shapes_rejects_other_models() -> None:
    assert qwen_image_dit_config_from_shapes({"img_in.weight": (3072, 64)}) is None
    shapes = released_shapes("qwen-image-dit", "Qwen-Image")
    assert qwen_image_dit_config_from_shapes({**shapes, "time_text_embed.addition_t_embedding.weight": (2, 3072)}) is None
    assert rope_axes(128) == (16, 56, 56) and rope_axes(16) == (4, 6, 6)


def test_config_from_json() -> None:
    released = {
        "_class_name": "QwenImageTransformer2DModel",
        "_diffusers_version": "0.35.0.dev0",
        "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": False,
        "in_channels": 64,
        "joint_attention_dim": 3584,
        "num_attention_heads": 24,
        "num_layers": 60,
        "out_channels": 16,
        "patch_size": 2,
    }
    assert qwen_image_dit_config_from_json(released) == QWEN_IMAGE
    assert qwen_image_dit_config_from_json({**released, "_class_name": "FluxTransformer2DModel"}) is None
    with pytest.raises(ConfigError, match="zero_cond_t"):
        qwen_image_dit_config_from_json({**released, "zero_cond_t": True})


def test_bad_inputs_are_refused(dit_pair) -> None:
    img, txt, t = _inputs()
    with pytest.raises(ConfigError, match="grid"):
        dit_pair.ours(img, txt, t, (5, 5))
    with pytest.raises(ConfigError, match="txt_mask"):
        dit_pair.ours(img, txt, t, (4, 6), torch.ones(2, 3))
    with pytest.raises(ConfigError, match="axes"):
        QwenImageDiT(QwenImageDiTConfig(num_layers=0, num_heads=2, head_dim=16))


@pytest.mark.parametrize("layout", ["diffusers", "comfyui", "diffusers-folder"])
def test_loads_in_every_layout(tmp_path, dit_pair, layout) -> None:
    sd = {k: v.contiguous() for k, v in dit_pair.ref.state_dict().items()}
    if layout == "diffusers-folder":
        path = tmp_path / "transformer"
        path.mkdir()
        save_file(sd, str(path / "diffusion_pytorch_model.safetensors"))
        (path / "config.json").write_text(json.dumps(dict(dit_pair.ref.config, _class_name="QwenImageTransformer2DModel")))
    else:
        prefix = "model.diffusion_model." if layout == "comfyui" else ""
        path = tmp_path / "qwen_image.safetensors"
        save_file({prefix + k: v for k, v in sd.items()}, str(path))
    model = difforge.load_model(path)
    assert (model.difforge_detection.model, model.difforge_detection.format) == ("qwen-image-dit", "diffusers")
    assert model.config == dit_pair.ours.config
    img, txt, t = _inputs()
    with torch.no_grad():
        assert (model(img, txt, t, (4, 6)) - dit_pair.ref_forward(img, txt, t, (4, 6))).abs().max().item() <= 1e-4

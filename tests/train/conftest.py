"""Fixtures of the training tests: a tiny random FLUX.1 pipeline saved by diffusers (so the same weights
run on both sides), and tiny shapes data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import difforge
from difforge_sdk.shapes.data import write_dataset
from difforge_sdk.tiny_tokenizers import write_clip_tokenizer, write_t5_tokenizer

SIZE = 32


@pytest.fixture(autouse=True)
def _registry() -> Any:
    difforge.reload_plugins()
    yield


@pytest.fixture(scope="package", autouse=True)
def _threads() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(module: torch.nn.Module, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (std if p.dim() > 1 else std / 3))


def _tiny_diffusers_flux(folder: Path) -> Path:
    """A tiny FLUX.1-dev-like diffusers FluxPipeline with random weights, saved to ``folder/diffusers``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok"))
    tok2 = T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder / "_tok2"))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    clip = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2, vocab_size=len(tok),
        max_position_embeddings=77, projection_dim=32, bos_token_id=tok.bos_token_id, eos_token_id=2,
        pad_token_id=tok.pad_token_id, hidden_act="quick_gelu",
    ))
    t5 = T5EncoderModel(T5Config(
        d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, vocab_size=len(tok2), relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, decoder_start_token_id=0,
    ))
    for i, module in enumerate((transformer, vae, clip, t5)):
        _randomize(module, i, 0.3)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2,
                 transformer=transformer).save_pretrained(folder / "diffusers")
    return folder / "diffusers"


@pytest.fixture(scope="package")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    return _tiny_diffusers_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="package")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 32x32 shapes images with their captions."""
    folder = tmp_path_factory.mktemp("shapes")
    write_dataset(folder, 4, seed=3, size=SIZE)
    return folder


@pytest.fixture(scope="package")
def shapes_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 32x32 shapes images (one batch of 2, or two batches of 1)."""
    folder = tmp_path_factory.mktemp("shapes2")
    write_dataset(folder, 2, seed=5, size=SIZE)
    return folder

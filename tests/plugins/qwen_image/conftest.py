"""Fixtures of the difforge-qwen-image tests: a tiny diffusers transformer with random weights and the
same weights in our DiT, a whole tiny diffusers Qwen-Image pipeline saved with ``save_pretrained``,
and writers of header-only (sparse) safetensors files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from difforge_sdk.parity import build_from  # noqa: F401  (used by this folder's tests)
from difforge_sdk.sparse import write_sharded_sparse, write_sparse_safetensors

import difforge
import difforge_qwen_image
import difforge_text_encoders
import difforge_wan
from difforge.plugins import PluginSettings
from difforge_qwen_image.dit import QwenImageDiT, qwen_image_dit_config_from_shapes

diffusers = pytest.importorskip("diffusers")

Z = 16
"""Latent channels of the tiny pipeline's VAE: Qwen-Image's 16, so its statistics are the release's."""

TINY_DIT = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=(4, 6, 6),  # what qwen_image_dit_config_from_shapes assumes for head dim 16
)


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Any:
    """Tiny models on a shared machine: more threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def qwen_registry() -> Any:
    """The built-in plugin and difforge-qwen-image with its dependencies (difforge-text-encoders, difforge-wan)
    alone in the registry (restored afterwards)."""
    plugins = [difforge_text_encoders, difforge_wan, difforge_qwen_image]
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=plugins)
    yield host.registry
    difforge.reload_plugins()


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Replace every weight with noise (diffusers zero-initialises some projections)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1))


@dataclass
class DiTPair:
    """A tiny diffusers ``QwenImageTransformer2DModel`` and our ``QwenImageDiT`` with the same weights."""

    ref: Any
    ours: QwenImageDiT

    def ref_forward(self, img, txt, timesteps, grid, txt_mask=None) -> torch.Tensor:
        shapes = [[(1, *grid)]] * img.shape[0]
        return self.ref(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=txt_mask,
                        timestep=timesteps, img_shapes=shapes).sample  # fmt: skip


@pytest.fixture(scope="session")
def dit_pair() -> DiTPair:
    torch.manual_seed(0)
    ref = diffusers.QwenImageTransformer2DModel(**TINY_DIT).eval()
    randomize(ref, seed=0)
    sd = ref.state_dict()
    ours = build_from(sd, QwenImageDiT, qwen_image_dit_config_from_shapes({k: v.shape for k, v in sd.items()}))
    return DiTPair(ref, ours)


def _randomize_pipeline_part(module: torch.nn.Module, std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):  # the VAE's RMS norm scales: around 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (std if p.dim() > 1 else 0.1))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny diffusers ``QwenImagePipeline`` folder: random transformer (hidden 32, 2 blocks), VAE (base 8,
    16 latent channels), Qwen2.5-VL (hidden 128, with a vision tower), a locally trained Qwen2 tokenizer,
    and Qwen-Image's scheduler config."""
    transformers = pytest.importorskip("transformers")
    from difforge_sdk.tiny_tokenizers import write_qwen2_tokenizer

    folder = tmp_path_factory.mktemp("qwen-image")
    tok = transformers.AutoTokenizer.from_pretrained(write_qwen2_tokenizer(folder / "_tok"))
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * Z, out_channels=Z, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=128, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=Z, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
    text_encoder = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, bos_token_id=None,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>")),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=128),
    ))  # fmt: skip
    _randomize_pipeline_part(transformer, 0.3, 0)
    _randomize_pipeline_part(vae, 0.15, 1)
    _randomize_pipeline_part(text_encoder, 0.05, 2)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0, shift_terminal=0.02,
        time_shift_type="exponential", use_dynamic_shifting=True,
    )  # fmt: skip
    pipe = diffusers.QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    )
    pipe.save_pretrained(folder / "diffusers")
    return folder / "diffusers"


# ---------------------------------------------------------------- files


write_sparse = write_sparse_safetensors


@pytest.fixture
def sparse_writer() -> Callable[..., Path]:
    return write_sparse


@pytest.fixture
def sharded_sparse_writer() -> Callable[..., Path]:
    return write_sharded_sparse

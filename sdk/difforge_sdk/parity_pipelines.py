"""Tiny diffusers-layout Flux, Qwen-Image and Wan releases with seeded random weights, built by the
reference implementations (diffusers, transformers) for parity and whole-pipeline tests.

Each writer saves a diffusers ``save_pretrained`` pipeline folder (``<folder>/diffusers``) with
locally trained tokenizers (:mod:`difforge_sdk.tiny_tokenizers`) and random weights; difforge
assembles its pipelines from such folders (``Pipeline.from_pretrained(family, folder)``), so every
DiT goes through its converter (Flux's q/k/v fuse, Qwen-Image's and Wan's renames)::

    from difforge_sdk.parity_pipelines import write_tiny_diffusers

    folder = write_tiny_diffusers("wan", tmp_path, dit_layers=4, std={"dit": 0.1, "vae": 0.2, "text": 0.3}, seed=1)

diffusers and transformers are test-only dependencies: they are imported inside the functions,
never at import time, so importing this module costs nothing where they are not installed.

The weights are drawn component by component (DiT, VAE, text encoder(s), in that order), each from
its own generator seeded ``seed``, ``seed + 1``, ...: N(0, ``std[kind]``) matrices, N(0, 0.1)
vectors (no zero-initialised layers), Wan VAE RMS-norm scales (``gamma``) N(1, 0.1). The same
arguments always give bit-identical folders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difforge import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["FAMILIES", "randomize", "write_flux", "write_peft_lora", "write_qwen_image", "write_tiny_diffusers", "write_wan"]

DEFAULT_STD: dict[str, float] = {"dit": 0.1, "vae": 0.1, "text": 0.1}
"""Spread of the random matrices by component kind: ``dit``, ``vae``, ``text`` (every text encoder)."""


def randomize(module: nn.Module, std: float, seed: int) -> None:
    """Overwrite every parameter of ``module`` in place: N(0, std) matrices, N(0, 0.1) vectors (no
    zero-initialised output layers), and Wan VAE RMS-norm scales (names ending ``gamma``) near 1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (std if p.dim() > 1 else 0.1))


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes (frame, height, width) summing to the head dim, as the families' own tiny tests use."""
    axes = {16: (4, 6, 6), 64: (8, 28, 28)}
    if head_dim not in axes:
        raise ConfigError(f"no default RoPE axes for head dim {head_dim}; pass rope_axes=(t, h, w) summing to it")
    return axes[head_dim]


def _stds(std: Mapping[str, float] | None) -> dict[str, float]:
    return {**DEFAULT_STD, **(std or {})}


def _save(pipeline: Any, folder: Path) -> Path:
    pipeline.save_pretrained(folder / "diffusers")
    return folder / "diffusers"


def write_flux(
    folder: str | Path, *, dit_layers: int = 2, heads: int = 2, head_dim: int = 16,
    rope_axes: Sequence[int] | None = None, vae_base_dim: int = 8, vae_dim_mult: Sequence[int] = (1, 2, 2, 2),
    text_hidden: int = 32, text_heads: int = 2, text_layers: int = 2, std: Mapping[str, float] | None = None,
    seed: int = 0,
) -> Path:  # fmt: skip
    """A FLUX.1-dev-like ``FluxPipeline`` folder.

    DiT: 1 double block + ``dit_layers - 1`` single blocks of ``heads`` x ``head_dim``, guidance
    embedding, RoPE ``rope_axes`` (default by head dim: (4, 6, 6) for 16, (8, 28, 28) for 64).
    AE: block channels ``vae_base_dim * vae_dim_mult`` (the last is the mid block's single-head
    attention width). CLIP: hidden and projection ``text_hidden`` with ``text_heads`` heads (its pooled
    output is the DiT's pooled projection); T5: d_model 32; both ``text_layers`` layers.
    Seeds: DiT ``seed``, AE ``seed + 1``, CLIP ``seed + 2``, T5 ``seed + 3``.
    """
    import diffusers
    import torch
    import transformers

    from difforge_sdk.tiny_tokenizers import write_clip_tokenizer, write_t5_tokenizer

    folder, stds = Path(folder), _stds(std)
    tok = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok"))
    tok2 = transformers.T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder / "_tok2"))
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=dit_layers - 1, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=text_hidden, guidance_embeds=True,
        axes_dims_rope=tuple(rope_axes or _rope_axes(head_dim)),
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=tuple(vae_base_dim * m for m in vae_dim_mult),
        layers_per_block=1, latent_channels=4, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611, down_block_types=("DownEncoderBlock2D",) * len(vae_dim_mult),
        up_block_types=("UpDecoderBlock2D",) * len(vae_dim_mult),
    )  # fmt: skip
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=text_hidden, intermediate_size=37, num_attention_heads=text_heads, num_hidden_layers=text_layers,
        vocab_size=len(tok), max_position_embeddings=77, projection_dim=text_hidden, bos_token_id=tok.bos_token_id,
        eos_token_id=2, pad_token_id=tok.pad_token_id, hidden_act="quick_gelu",
    ))  # fmt: skip
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        d_model=32, d_kv=8, d_ff=37, num_layers=text_layers, num_heads=4, vocab_size=len(tok2),
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        decoder_start_token_id=0,
    ))  # fmt: skip
    for i, (module, kind) in enumerate(((transformer, "dit"), (vae, "vae"), (clip, "text"), (t5, "text"))):
        randomize(module, stds[kind], seed + i)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )  # fmt: skip
    return _save(diffusers.FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2,
        transformer=transformer,
    ), folder)  # fmt: skip


def write_qwen_image(
    folder: str | Path, *, dit_layers: int = 2, heads: int = 2, head_dim: int = 16,
    rope_axes: Sequence[int] | None = None, vae_base_dim: int = 8, vae_dim_mult: Sequence[int] = (1, 2, 4, 4),
    text_hidden: int = 128, text_heads: int = 1, text_layers: int = 2, mrope_section: Sequence[int] | None = None,
    time_embed_scale: float = 1.0, std: Mapping[str, float] | None = None, seed: int = 0,
) -> Path:  # fmt: skip
    """A Qwen-Image-like ``QwenImagePipeline`` folder.

    DiT: ``dit_layers`` blocks of ``heads`` x ``head_dim``, MSRoPE ``rope_axes`` (default by head dim),
    text width ``text_hidden``. VAE: Wan-style, 16 latent channels, ``vae_base_dim`` x ``vae_dim_mult``.
    Text encoder: Qwen2.5-VL with a text model of hidden ``text_hidden``, ``text_heads`` query heads and one
    key/value head (``text_heads`` > 1: grouped-query attention), ``text_layers`` layers, and a one-block
    vision tower. ``mrope_section``: the text model's multimodal RoPE sections, summing to half its head
    dim (``(8, 12, 12)`` for a 64-wide head); None keeps transformers' default config (no sections).

    ``time_embed_scale`` multiplies the DiT's timestep-embedding output layer (weight and bias) after the
    random draw. With plain random weights the first block's residual changes by 0.6-2 from one step to
    the next, so every step looks new to a residual-threshold cache; scaled by 0.1 it changes by a few
    tenths, the range where a threshold decides (benchmarks/cache.py scales the FLUX embedders for the
    same reason). Seeds: DiT ``seed``, VAE ``seed + 1``, text encoder ``seed + 2``.
    """
    import diffusers
    import torch
    import transformers

    from difforge_sdk.tiny_tokenizers import write_qwen2_tokenizer

    folder, stds = Path(folder), _stds(std)
    tok = transformers.AutoTokenizer.from_pretrained(write_qwen2_tokenizer(folder / "_tok"))
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=dit_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=text_hidden,
        axes_dims_rope=tuple(rope_axes or _rope_axes(head_dim)),
    )  # fmt: skip
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=vae_base_dim, z_dim=16, dim_mult=list(vae_dim_mult), num_res_blocks=1
    )
    text_config: dict[str, Any] = dict(
        vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=64, num_hidden_layers=text_layers,
        num_attention_heads=text_heads, num_key_value_heads=1, bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )  # fmt: skip
    if mrope_section is not None:
        text_config["rope_parameters"] = {
            "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(mrope_section)
        }  # fmt: skip
    text_encoder = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=text_hidden),
    ))  # fmt: skip
    randomize(transformer, stds["dit"], seed)
    if time_embed_scale != 1.0:
        with torch.no_grad():
            for p in transformer.time_text_embed.timestep_embedder.linear_2.parameters():
                p.mul_(time_embed_scale)
    randomize(vae, stds["vae"], seed + 1)
    randomize(text_encoder, stds["text"], seed + 2)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0, shift_terminal=0.02,
        time_shift_type="exponential", use_dynamic_shifting=True,
    )  # fmt: skip
    return _save(diffusers.QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    ), folder)  # fmt: skip


def write_wan(
    folder: str | Path, *, dit_layers: int = 2, heads: int = 2, head_dim: int = 16, vae_base_dim: int = 8,
    text_layers: int = 2, std: Mapping[str, float] | None = None, seed: int = 0,
) -> Path:  # fmt: skip
    """A Wan2.1-T2V-like ``WanPipeline`` folder.

    DiT: ``dit_layers`` blocks of ``heads`` x ``head_dim`` (text dim 32, FFN 40, RMS q/k norm across
    heads, cross-attention norm). VAE: 16 latent channels, ``vae_base_dim`` x (1, 2, 2, 2) (the mid block's
    single-head attention is ``2 * vae_base_dim`` wide). umT5: d_model 32, ``text_layers`` layers.
    UniPC with flow shift 3. Seeds: DiT ``seed``, VAE ``seed + 1``, umT5 ``seed + 2``.
    """
    import diffusers
    import torch
    import transformers

    from difforge_sdk.tiny_tokenizers import write_t5_tokenizer

    folder, stds = Path(folder), _stds(std)
    tok = transformers.T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder / "_tok"))
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=40, num_layers=dit_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    )  # fmt: skip
    vae = diffusers.AutoencoderKLWan(
        base_dim=vae_base_dim, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    umt5 = transformers.UMT5EncoderModel(transformers.UMT5Config(
        d_model=32, d_kv=8, d_ff=37, num_layers=text_layers, num_heads=4, vocab_size=len(tok),
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        decoder_start_token_id=0,
    ))  # fmt: skip
    randomize(transformer, stds["dit"], seed)
    randomize(vae, stds["vae"], seed + 1)
    randomize(umt5, stds["text"], seed + 2)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return _save(diffusers.WanPipeline(
        tokenizer=tok, text_encoder=umt5, vae=vae, scheduler=scheduler, transformer=transformer
    ), folder)  # fmt: skip


FAMILIES: dict[str, Callable[..., Path]] = {"flux": write_flux, "qwen-image": write_qwen_image, "wan": write_wan}
"""The writer of each family, by difforge pipeline name."""


def write_tiny_diffusers(family: str, folder: str | Path, **options: Any) -> Path:
    """The tiny diffusers folder of ``family`` ("flux", "qwen-image" or "wan") under ``folder``; ``options``
    are the family writer's keyword arguments. Returns the pipeline folder (``folder / "diffusers"``)."""
    if family not in FAMILIES:
        raise ConfigError(f"no tiny diffusers writer for {family!r}; families: {', '.join(FAMILIES)}")
    return FAMILIES[family](folder, **options)


def write_peft_lora(
    reference: Any, folder: str | Path, targets: Sequence[str], *, rank: int = 4, alpha: float = 8,
    alpha_pattern: Mapping[str, float] | None = None, std: float = 0.2, seed: int = 10,
) -> Path:  # fmt: skip
    """A random PEFT LoRA on the denoiser (``reference.transformer``) of a diffusers pipeline, saved by
    diffusers' ``save_lora_weights`` with its adapter metadata as ``<folder>/lora.safetensors``.

    ``init_lora_weights=False`` and then every ``lora_`` parameter N(0, ``std``) from a generator seeded
    ``seed``, so that the LoRA changes the output (PEFT's default leaves ``lora_B`` at zero). The adapter
    stays on ``reference.transformer``.
    """
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, alpha_pattern=dict(alpha_pattern or {}), target_modules=list(targets),
                        init_lora_weights=False)  # fmt: skip
    reference.transformer.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in reference.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    folder = Path(folder)
    type(reference).save_lora_weights(
        folder, weight_name="lora.safetensors", transformer_lora_layers=get_peft_model_state_dict(reference.transformer),
        transformer_lora_adapter_metadata=reference.transformer.peft_config["default"].to_dict(),
    )  # fmt: skip
    return folder / "lora.safetensors"

"""Tiny diffusers-layout Flux, Qwen-Image and Wan folders for the parallel tests.

Each DiT has 2 attention heads (so Ulysses 2 splits them) and two blocks; the weights are random.
diffusers and transformers only build and save them; difforge assembles its pipelines from the folders.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _randomize(module: nn.Module, std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (std if p.dim() > 1 else 0.1))


def write_flux(folder: Path) -> Path:
    """FLUX.1-dev-like: DiT 1 double + 1 single block (2 heads x 16), AE, CLIP and T5 (hidden 32)."""
    import diffusers
    import transformers
    from difforge_sdk.tiny_tokenizers import write_clip_tokenizer, write_t5_tokenizer

    tok = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok"))
    tok2 = transformers.T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder / "_tok2"))
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )  # fmt: skip
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=2, num_hidden_layers=1, vocab_size=len(tok),
        max_position_embeddings=77, projection_dim=32, bos_token_id=tok.bos_token_id, eos_token_id=2,
        pad_token_id=tok.pad_token_id, hidden_act="quick_gelu",
    ))  # fmt: skip
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, vocab_size=len(tok2), relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, decoder_start_token_id=0,
    ))  # fmt: skip
    for i, m in enumerate((transformer, vae, clip, t5)):
        _randomize(m, 0.1, i)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )  # fmt: skip
    diffusers.FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2,
        transformer=transformer,
    ).save_pretrained(folder / "diffusers")  # fmt: skip
    return folder / "diffusers"


def write_qwen_image(folder: Path) -> Path:
    """Qwen-Image-like: DiT 2 blocks (2 heads x 16), Wan-style VAE (16 latent channels), Qwen2.5-VL (hidden 128, one head of 128)."""
    import diffusers
    import transformers
    from difforge_sdk.tiny_tokenizers import write_qwen2_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(write_qwen2_tokenizer(folder / "_tok"))
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=128, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
    text_encoder = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, bos_token_id=None,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>")),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=128),
    ))  # fmt: skip
    _randomize(transformer, 0.15, 0)
    _randomize(vae, 0.15, 1)
    _randomize(text_encoder, 0.05, 2)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0, shift_terminal=0.02,
        time_shift_type="exponential", use_dynamic_shifting=True,
    )  # fmt: skip
    diffusers.QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    ).save_pretrained(folder / "diffusers")
    return folder / "diffusers"


def write_wan(folder: Path) -> Path:
    """Wan2.1-T2V-like: DiT 2 blocks (2 heads x 16), 16-channel VAE, umT5 (d_model 32), UniPC with flow shift 3."""
    import diffusers
    import transformers
    from difforge_sdk.tiny_tokenizers import write_t5_tokenizer

    tok = transformers.T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder / "_tok"))
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=40, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    )  # fmt: skip
    vae = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    umt5 = transformers.UMT5EncoderModel(transformers.UMT5Config(
        d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=len(tok), relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, decoder_start_token_id=0,
    ))  # fmt: skip
    _randomize(transformer, 0.1, 1)
    _randomize(vae, 0.2, 2)
    _randomize(umt5, 0.3, 3)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    diffusers.WanPipeline(
        tokenizer=tok, text_encoder=umt5, vae=vae, scheduler=scheduler, transformer=transformer
    ).save_pretrained(folder / "diffusers")
    return folder / "diffusers"

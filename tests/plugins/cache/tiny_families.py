"""Tiny Qwen-Image and Wan releases for the difforge-cache pipeline tests, and the helpers those tests share.

The folders are diffusers ``save_pretrained`` folders with random weights, built as the families' own
tests build theirs (tests/plugins/qwen_image/conftest.py, tests/plugins/wan/test_wan_pipeline.py), with
four DiT blocks instead of two, so that dbcache has front, middle and back blocks. difforge assembles
its pipelines from them (``Pipeline.from_pretrained(family, folder)``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difforge import Pipeline
from difforge.runtime import current_cfg_branch

DIT_LAYERS = 4
TIME_SCALE = 0.1
"""Scale of the Qwen-Image DiT's timestep embedding output. With plain random weights the first block's
residual changes by 0.6-2 from one step to the next (every step looks new, no threshold near the
recommended ones would ever skip); scaled, it changes by a few tenths, the range where a threshold decides
(benchmarks/cache.py scales the FLUX embedders for the same reason)."""

#: presets with a threshold of 0 / an interval of 1: nothing may be skipped, outputs must be identical
EXACT_CACHES: list[dict[str, Any]] = [
    {"name": "fbcache", "threshold": 0.0},
    {"name": "dbcache", "threshold": 0.0, "front_blocks": 1, "back_blocks": 1},
    {"name": "dbcache", "threshold": 0.0, "front_blocks": 2, "back_blocks": 1},
    {"name": "deepcache", "cache_interval": 1, "cache_branch_id": 1},
]
EXACT_IDS = ["fbcache", "dbcache-F1B1", "dbcache-F2B1", "deepcache"]


def _randomize(module: nn.Module, std: float, seed: int) -> None:
    """N(0, std) matrices, N(0, 0.1) vectors (no zero-initialised output layers); Wan VAE RMS scales near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (std if p.dim() > 1 else 0.1))


def write_tiny_qwen_image(folder: Path, layers: int = DIT_LAYERS) -> Path:
    """A tiny diffusers ``QwenImagePipeline`` folder: DiT 2 heads x 16 with ``layers`` blocks, Wan-style VAE
    (16 latent channels), Qwen2.5-VL (hidden 128), a locally trained Qwen2 tokenizer, Qwen-Image's scheduler."""
    import diffusers
    import transformers

    from difforge_sdk.tiny_tokenizers import write_qwen2_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(write_qwen2_tokenizer(folder / "_tok"))
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=128, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
    text_encoder = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, bos_token_id=None,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>")),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=128),
    ))  # fmt: skip
    _randomize(transformer, 0.15, 0)
    with torch.no_grad():  # a calmer timestep embedding: see TIME_SCALE
        for p in transformer.time_text_embed.timestep_embedder.linear_2.parameters():
            p.mul_(TIME_SCALE)
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


def write_tiny_wan(folder: Path, layers: int = DIT_LAYERS) -> Path:
    """A tiny diffusers ``WanPipeline`` folder of the Wan2.1 T2V design: DiT 2 heads x 16 with ``layers`` blocks,
    16-channel VAE, umT5 (d_model 32), a locally trained T5 tokenizer, UniPC with flow shift 3."""
    import diffusers
    import transformers

    from difforge_sdk.tiny_tokenizers import write_t5_tokenizer

    tok = transformers.T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder / "_tok"))
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=40, num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
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


def dit_stats(pipe: Pipeline) -> dict[str, Any]:
    """The statistics of the cache on the pipeline's DiT (the only component a cache is applied to)."""
    (stats,) = pipe.cache_stats()
    return stats


class PerBranchDiT(nn.Module):
    """A stand-in for a pipeline's DiT that sends each call to the copy of the current CFG branch.

    The reference for "separate state per branch": one DiT per branch, each with a cache of its own.
    Attributes the pipeline reads (``config``, ...) come from the conditional copy.
    """

    def __init__(self, dits: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.dits = nn.ModuleDict(dict(dits))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.dits[current_cfg_branch()](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["dits"]["cond"], name)


@contextmanager
def one_dit_per_branch(pipe: Pipeline, apply: Any, layout: Any, options: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Within the block: the pipeline's DiT replaced by one copy per CFG branch, each with its own cache
    (``apply(copy, layout, options)``); yields the handles by branch. Everything is restored on exit."""
    pipe.set_cache(None)
    original = pipe.components["dit"]
    dits = {branch: copy.deepcopy(original) for branch in ("cond", "uncond")}
    handles = {branch: apply(dit, layout, dict(options)) for branch, dit in dits.items()}
    pipe.components["dit"] = PerBranchDiT(dits)
    try:
        yield handles
    finally:
        pipe.components["dit"] = original
        for handle in handles.values():
            handle.remove()

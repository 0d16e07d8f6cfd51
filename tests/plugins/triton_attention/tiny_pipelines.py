"""Tiny Flux, Qwen-Image and Wan releases whose every attention has head dim 64, the kernel's smallest.

``attention="triton"`` on a pipeline applies to every component that calls ``difforge.ops.attention``
(DiT, VAE mid-block attention, CLIP, Qwen2.5-VL), and a backend asked for by name is strict: one call
with a head dim other than 64 or 128 is an error, not a fallback. So each component gets 64-wide
heads here: DiTs with 1-2 heads x 64; CLIP hidden 64 (one head); Qwen2.5-VL hidden 128 with 2 query
heads and 1 key/value head (grouped-query attention through the kernel, mrope sections 8/12/12 for
the 64-wide head); VAEs whose mid block has 64 channels (the single-head attention there is 64 wide).
T5/umT5 attend with a relative position bias through torch SDPA directly, not through difforge.ops.

The folders are diffusers ``save_pretrained`` folders with random weights from
:mod:`difforge_sdk.parity_pipelines` (diffusers and transformers only build them); difforge assembles
its pipelines from them.
"""

from __future__ import annotations

from functools import partial

from difforge_sdk import parity_pipelines

HEAD_DIM = 64

#: FLUX.1-dev-like: DiT 1 double + 1 single block, 2 heads x 64, RoPE axes (8, 28, 28); AE with a
#: 64-channel mid block; CLIP hidden 64 (1 head); T5 d_model 32
write_flux = partial(
    parity_pipelines.write_flux, head_dim=HEAD_DIM, vae_base_dim=16, vae_dim_mult=(1, 2, 4, 4), text_hidden=HEAD_DIM,
    text_heads=1, std={"dit": 0.3, "vae": 0.15, "text": 0.3},
)  # fmt: skip
#: Qwen-Image-like: DiT 2 blocks, 2 heads x 64 (MSRoPE axes 8/28/28); Wan-style VAE with a 64-channel
#: mid block; Qwen2.5-VL text model hidden 128 with 2 query heads and 1 key/value head of 64
write_qwen_image = partial(
    parity_pipelines.write_qwen_image, head_dim=HEAD_DIM, vae_base_dim=16, text_heads=2, mrope_section=(8, 12, 12),
    std={"dit": 0.3, "vae": 0.15, "text": 0.05},
)  # fmt: skip
#: Wan2.1-T2V-like: DiT 2 blocks, 2 heads x 64; VAE with a 64-channel mid block; umT5 d_model 32
write_wan = partial(
    parity_pipelines.write_wan, head_dim=HEAD_DIM, vae_base_dim=32, std={"dit": 0.2, "vae": 0.1, "text": 0.3}, seed=1
)

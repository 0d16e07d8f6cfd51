"""Tiny diffusers-layout Flux, Qwen-Image and Wan folders for the parallel tests.

Each DiT has 2 attention heads (so Ulysses 2 splits them) and two blocks; the weights are random
(:mod:`difforge_sdk.parity_pipelines`). diffusers and transformers only build and save them; difforge
assembles its pipelines from the folders.
"""

from __future__ import annotations

from functools import partial

from difforge_sdk import parity_pipelines

HEADS = 2
"""Divisible by the Ulysses degree (2)."""

#: FLUX.1-dev-like: DiT 1 double + 1 single block (2 heads x 16), AE, CLIP and T5 (hidden 32, one layer)
write_flux = partial(parity_pipelines.write_flux, heads=HEADS, text_layers=1, std={"dit": 0.1, "vae": 0.1, "text": 0.1})
#: Qwen-Image-like: DiT 2 blocks (2 heads x 16), Wan-style VAE (16 latent channels), Qwen2.5-VL
#: (hidden 128, one head of 128, one layer)
write_qwen_image = partial(
    parity_pipelines.write_qwen_image, heads=HEADS, text_layers=1, std={"dit": 0.15, "vae": 0.15, "text": 0.05}
)
#: Wan2.1-T2V-like: DiT 2 blocks (2 heads x 16), 16-channel VAE, umT5 (d_model 32), UniPC with flow shift 3
write_wan = partial(parity_pipelines.write_wan, heads=HEADS, std={"dit": 0.1, "vae": 0.2, "text": 0.3}, seed=1)

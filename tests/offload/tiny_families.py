"""Tiny Flux, Qwen-Image and Wan releases for the whole-pipeline offload tests.

The folders come from :mod:`difforge_sdk.parity_pipelines` (diffusers and transformers only build them;
difforge assembles its pipeline from the folder, so every DiT goes through its converter: Flux's q/k/v
fuse, Qwen-Image's and Wan's renames). The DiTs have three blocks, so that a small ``vram_limit`` keeps
some resident and streams the rest.

``STD`` is the spread of the random matrices: about what trained checkpoints have (0.02-0.05 for
linear weights), where much of an fp8 e4m3 weight falls below its smallest normal value (2^-6) and
loses precision unless it is scaled first: the regime ``fp8-scaled`` is for.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from difforge_sdk import parity_pipelines

DIT_LAYERS = 3
STD = {"dit": 0.02, "vae": 0.08, "text": 0.02}
CALLS: dict[str, dict[str, Any]] = {
    "flux": dict(prompt="a cat holding a sign", seed=0, height=32, width=32, num_inference_steps=2, max_sequence_length=16),
    "qwen-image": dict(prompt="a cat holding a sign", seed=0, height=32, width=32, num_inference_steps=2),
    "wan": dict(prompt="a cat holding a sign", seed=0, height=32, width=32, num_frames=5, num_inference_steps=2,
                max_sequence_length=16),
}  # fmt: skip
"""One call per family: 2 steps, tiny images (Qwen-Image and Wan with true CFG, their default)."""

#: FLUX.1-dev-like: DiT 1 double + 2 single blocks (2 heads x 16), AE, CLIP (hidden 32), T5 (d_model 32)
write_flux = partial(parity_pipelines.write_flux, dit_layers=DIT_LAYERS, std=STD)
#: Qwen-Image-like: DiT 3 blocks (2 heads x 16), Wan-style VAE (16 latent channels), Qwen2.5-VL (hidden 64,
#: one 64-wide head, hence mrope sections 8/12/12)
write_qwen_image = partial(
    parity_pipelines.write_qwen_image, dit_layers=DIT_LAYERS, vae_dim_mult=(1, 2, 2, 2), text_hidden=64,
    mrope_section=(8, 12, 12), std=STD,
)  # fmt: skip
#: Wan2.1-T2V-like: DiT 3 blocks (2 heads x 16), 16-channel VAE, umT5 (d_model 32)
write_wan = partial(parity_pipelines.write_wan, dit_layers=DIT_LAYERS, std=STD)

WRITERS = {"flux": write_flux, "qwen-image": write_qwen_image, "wan": write_wan}

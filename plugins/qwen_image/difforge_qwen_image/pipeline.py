"""The Qwen-Image pipeline: text-to-image and image-to-image.

Only what is Qwen-Image's own lives here; the loop, seeds, img2img noising and outputs are the
runtime's. Prompt handling follows diffusers' ``QwenImagePipeline`` to the token: the prompt goes
into Qwen-Image's chat template, Qwen2.5-VL encodes it (padding to the longest prompt, at most
1024 + 34 tokens), the first 34 positions (the template's system part) are dropped from every
prompt's valid tokens, the rest is right-padded with zeros to the longest and cut at
``max_sequence_length`` (512) tokens; the DiT hides the padding with the key mask.

True classifier-free guidance (``cfg_scale``, default 4) is Qwen-Image's own: the guided velocity
is rescaled, token by token, to the norm of the conditional one, as the reference pipeline does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from difforge import ConfigError, Pipeline

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_DROP = 34
"""Tokens of the template before the prompt; their hidden states are dropped."""
MAX_SEQUENCE_LENGTH = 1024
"""The most prompt tokens Qwen-Image takes (diffusers' ``tokenizer_max_length``); 512 by default."""
RECOMMENDED_SIZES = ((1328, 1328), (1664, 928), (928, 1664), (1472, 1104), (1104, 1472))
"""(width, height) of the aspect ratios Qwen-Image was trained at: 1:1, 16:9, 9:16, 4:3, 3:4."""


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H/2 * W/2, C * 4]``: 2x2 patches as tokens (row-major)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height`` x ``width``."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


class QwenImagePipeline(Pipeline):
    """Qwen-Image text-to-image and image-to-image.

    Call arguments beyond the runtime's (DiffSynth's names): ``negative_prompt`` (default ``" "``),
    ``cfg_scale`` (true CFG, default 4.0; 1.0 turns it off), ``max_sequence_length`` (prompt tokens
    after the template, 512, at most 1024), ``tiled`` / ``tile_size`` / ``tile_stride`` (VAE
    decoding in overlapping tiles of ``tile_size`` latent pixels every ``tile_stride``, 128 / 64 as
    DiffSynth, by ``WanVAE.tiled_decode``; ``input_image`` is encoded whole). Height and width are
    multiples of 16; Qwen-Image was trained at the :data:`RECOMMENDED_SIZES` (1328x1328, 1664x928,
    928x1664, 1472x1104, 1104x1472).

    ``prompt_embeds=`` / ``negative_prompt_embeds=`` take what :meth:`encode_prompt` returns:
    ``{"txt": [B, L, 3584], "txt_mask": [B, L]}`` (the mask may be left out when nothing is padded).
    """

    spatial_multiple = 16
    defaults = {
        "num_inference_steps": 30,
        "height": 1328,
        "width": 1328,
        "cfg_scale": 4.0,
        "negative_prompt": " ",
        "max_sequence_length": 512,
        "tiled": False,
        "tile_size": 128,
        "tile_stride": 64,
    }

    def check_call(self, kw: dict[str, Any]) -> None:
        if kw.get("tiled") and not (0 < int(kw["tile_stride"]) <= int(kw["tile_size"])):
            raise ConfigError(f"tile_stride must be in (0, tile_size], got {kw['tile_stride']} and {kw['tile_size']}")
        length = kw.get("max_sequence_length", 512)
        if not isinstance(length, int) or not 0 < length <= MAX_SEQUENCE_LENGTH:
            raise ConfigError(f"max_sequence_length must be an integer in 1..{MAX_SEQUENCE_LENGTH}, got {length!r}")

    # -- the family's part

    def encode_prompt(
        self, prompt: Sequence[str], max_sequence_length: int = 512, **kw: Any
    ) -> dict[str, torch.Tensor]:
        from difforge_text_encoders.prompts import masked_embeddings

        texts = [PROMPT_TEMPLATE.format(p) for p in prompt]
        embeds, mask = masked_embeddings(
            self.tokenizer, self.text_encoder, texts, max_length=MAX_SEQUENCE_LENGTH + TEMPLATE_DROP,
            padding="longest", drop=TEMPLATE_DROP, device=self.device,
        )
        lengths = mask.sum(dim=1).tolist()
        if max(lengths) > max_sequence_length:
            log.warning(
                "Qwen-Image: a prompt has %d tokens after the template; only the first %d (max_sequence_length) "
                "are used, the rest is dropped. Qwen-Image was trained on prompts up to 512 tokens.",
                max(lengths), max_sequence_length,
            )
        return {"txt": embeds[:, :max_sequence_length].to(self.torch_dtype), "txt_mask": mask[:, :max_sequence_length]}

    def latent_shape(self, batch: int, height: int, width: int, **kw: Any) -> tuple[int, ...]:
        return (batch, self.dit.config.in_channels // 4, height // 8, width // 8)

    def image_seq_len(self, shape: Sequence[int]) -> int:
        return (shape[-2] // 2) * (shape[-1] // 2)

    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor], **kw: Any
    ) -> torch.Tensor:
        b, _, h, w = latents.shape
        txt, mask = cond["txt"], cond.get("txt_mask")
        if txt.shape[0] != b:
            txt = txt.expand(b, -1, -1)
            mask = None if mask is None else mask.expand(b, -1)
        velocity = self.dit(
            img=pack_latents(latents),
            txt=txt,
            timesteps=timestep.expand(b).to(latents.dtype) / 1000,
            grid=(h // 2, w // 2),
            txt_mask=mask,
        )
        return unpack_latents(velocity, h, w)

    def guide(self, positive: torch.Tensor, negative: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """True CFG with Qwen-Image's rescale: every 2x2 patch (token) of the guided velocity takes the
        norm of the conditional one."""
        guided = pack_latents(negative + cfg_scale * (positive - negative))
        norm = torch.linalg.vector_norm(pack_latents(positive), dim=-1, keepdim=True)
        guided = guided * (norm / torch.linalg.vector_norm(guided, dim=-1, keepdim=True))
        return unpack_latents(guided, positive.shape[-2], positive.shape[-1])

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image)

    def decode(
        self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 128, tile_stride: int = 64, **kw: Any
    ) -> torch.Tensor:
        if tiled:
            return self.vae.tiled_decode(latents, tile_size=int(tile_size), tile_stride=int(tile_stride))
        return self.vae.decode(latents)

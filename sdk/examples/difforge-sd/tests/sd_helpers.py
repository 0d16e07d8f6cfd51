"""Helpers of the difforge-sd tests: tiny diffusers models with random weights (the reference), the
same weights in our modules, and tiny diffusers pipelines saved as folders.

Tiny configs keep every convention the config inference relies on (32-group norms, 8 heads with
1x1-conv projections / 64-wide heads with linear projections, a 256-wide size embedding on SDXL,
2 resnets per down block as the original layout's numbering assumes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch


diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SD_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=128, attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=32 + 6 * 256,
    norm_num_groups=32,
)
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=32,
)
PROMPT = "a cat holding a sign that says hello world"
QUIET = {"progress_bar_cmd": lambda x: x}


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Every weight N(0, std) (diffusers zero-initialises some output projections)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def diffusers_unet(kind: str, seed: int = 0) -> Any:
    from diffusers import UNet2DConditionModel

    return randomize(UNet2DConditionModel(**(SD_UNET if kind == "sd" else SDXL_UNET)), seed)


def diffusers_vae(seed: int = 0, scaling_factor: float = 0.18215) -> Any:
    """A random AutoencoderKL whose latent distribution is (numerically) a point: diffusers' img2img
    samples it, difforge takes its mean, and with a log-variance of -30 the two agree to 3e-7."""
    from diffusers import AutoencoderKL

    vae = randomize(AutoencoderKL(**VAE, scaling_factor=scaling_factor), seed)
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = -100.0
    return vae


def shapes_of(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def own_unet(ref: Any) -> Any:
    """Our SDUNet with the weights of diffusers' ``ref`` (through the diffusers converter's rename)."""
    from difforge_sd.convert import unet_from_diffusers
    from difforge_sd.unet import SDUNet, unet_config_from_json

    sd = {unet_from_diffusers(k): v for k, v in ref.state_dict().items()}
    config = unet_config_from_json(dict(ref.config), shapes_of(sd))
    model = SDUNet(config).eval()
    model.load_state_dict(sd, strict=True)
    return model


def unet_inputs(kind: str, batch: int = 2, h: int = 8, w: int = 12, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    cfg = SD_UNET if kind == "sd" else SDXL_UNET
    out: dict[str, Any] = {
        "sample": torch.randn(batch, 4, h, w, generator=g),
        "timestep": torch.tensor([999.0, 321.0][:batch]),
        "encoder_hidden_states": torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g),
    }
    if kind == "sdxl":
        out["text_embeds"] = torch.randn(batch, 32, generator=g)
        out["time_ids"] = torch.tensor([[h * 8.0, w * 8.0, 0.0, 0.0, h * 8.0, w * 8.0]] * batch)
    return out


# ---------------------------------------------------------------- whole tiny pipelines


def _tokenizer(folder: Path, pad: str | None = None) -> Path:
    from difforge_sdk.tiny_tokenizers import write_clip_tokenizer

    write_clip_tokenizer(folder)
    if pad is not None:  # SDXL's tokenizer_2 pads with "!" instead of <|endoftext|>
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["pad_token"] = pad
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _clip(tok: Any, hidden: int, act: str, projection: int | None, seed: int, heads: int = 2) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=hidden * 2, num_attention_heads=heads, num_hidden_layers=2, vocab_size=len(tok),
        max_position_embeddings=77, projection_dim=projection or hidden, bos_token_id=tok.bos_token_id, eos_token_id=2,
        pad_token_id=tok.pad_token_id, hidden_act=act,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return randomize(model, seed, 0.3)


def write_pipeline(folder: Path, kind: str, scheduler: Any) -> Path:
    """A tiny diffusers StableDiffusionPipeline / StableDiffusionXLPipeline saved in ``folder``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(_tokenizer(folder / "_tok"))
    unet, vae = diffusers_unet(kind, seed=1), diffusers_vae(seed=2, scaling_factor=0.18215 if kind == "sd" else 0.13025)
    # CLIP-L at width 64 with one head and exact gelu: what config inference assumes at that width (the
    # original single file carries no config.json), so both loading paths build the same encoder
    clip = _clip(tok, 64, "gelu", None, 3, heads=1)
    if kind == "sd":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=tok, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        tok2 = CLIPTokenizer.from_pretrained(_tokenizer(folder / "_tok2", pad="!"))
        clip2 = _clip(tok2, 64, "gelu", 32, 4, heads=1)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip, text_encoder_2=clip2, tokenizer=tok, tokenizer_2=tok2,
                                         unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder / "diffusers")
    return folder / "diffusers"

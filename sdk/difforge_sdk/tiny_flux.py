"""Tiny random FLUX.1 checkpoints in the real on-disk layouts (no diffusers/transformers needed).

``write_tiny_flux(folder)`` writes what a FLUX.1 repository holds, at toy size:
``flux1-tiny.safetensors`` (BFL DiT), ``ae.safetensors`` (BFL AE), ``text_encoder/`` (CLIP,
transformers layout + config.json), ``text_encoder_2/`` (T5 encoder), ``tokenizer/`` and
``tokenizer_2/``. The weights are random: images are noise, but every loading path is real.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from .tiny_tokenizers import write_clip_tokenizer, write_t5_tokenizer


def _save(module: torch.nn.Module, path: Path, config: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path), metadata={"format": "pt"})
    if config is not None:
        (path.parent / "config.json").write_text(json.dumps(config, indent=2))
    return path


def write_tiny_flux(folder: str | Path, *, seed: int = 0, guidance: bool = True, scale: float = 0.3) -> dict[str, Path]:
    """Write a tiny FLUX.1-dev-like (``guidance=True``) or schnell-like release into ``folder``."""
    from difforge_flux.ae import FluxAE, FluxAEConfig
    from difforge_flux.dit import FluxDiT, FluxDiTConfig
    from difforge_text_encoders.clip import CLIPTextConfig, CLIPTextEncoder
    from difforge_text_encoders.t5 import T5Encoder, T5EncoderConfig

    folder = Path(folder)
    clip_tok = write_clip_tokenizer(folder / "tokenizer")
    t5_tok = write_t5_tokenizer(folder / "tokenizer_2")
    clip_vocab = len(json.loads((clip_tok / "vocab.json").read_text()))
    clip_cfg = CLIPTextConfig(vocab_size=clip_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2)
    t5_cfg = T5EncoderConfig(vocab_size=320, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                             relative_attention_num_buckets=8)
    dit_cfg = FluxDiTConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=64,
                            num_heads=4, depth=1, depth_single_blocks=2, axes_dim=(4, 6, 6), guidance_embed=guidance)
    ae_cfg = FluxAEConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16, norm_groups=8)

    torch.manual_seed(seed)
    models = {"dit": FluxDiT(dit_cfg), "vae": FluxAE(ae_cfg), "clip": CLIPTextEncoder(clip_cfg), "t5": T5Encoder(t5_cfg)}
    for module in models.values():  # random everywhere (no zero-initialised layers)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, scale if p.dim() > 1 else scale / 3)
    clip_json = {**asdict(clip_cfg), "model_type": "clip_text_model", "architectures": ["CLIPTextModel"]}
    t5_json = {**asdict(t5_cfg), "model_type": "t5", "architectures": ["T5EncoderModel"]}
    t5_json.pop("position_bias_per_layer")
    return {
        "dit": _save(models["dit"], folder / "flux1-tiny.safetensors"),
        "vae": _save(models["vae"], folder / "ae.safetensors"),
        "text_encoder": _save(models["clip"], folder / "text_encoder" / "model.safetensors", clip_json),
        "text_encoder_2": _save(models["t5"], folder / "text_encoder_2" / "model.safetensors", t5_json),
        "tokenizer": clip_tok,
        "tokenizer_2": t5_tok,
    }

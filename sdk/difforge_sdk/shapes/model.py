"""The tiny FLUX.1-architecture "shapes" model: configurations, initial files and the AE training.

The files are written in FLUX.1's real layouts (BFL DiT and AE, transformers CLIP and T5 folders,
CLIP BPE and T5 unigram tokenizers), so difforge detects them as ``flux-dit``, ``flux-ae``,
``clip-text`` and ``t5-encoder`` like any FLUX.1 release. The tokenizers are trained on the data
set's captions (every word is in their vocabulary); the text encoders are random and stay frozen:
random embeddings of different words still differ, which is all the DiT needs to learn from.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..tiny_tokenizers import write_clip_tokenizer
from .data import all_prompts, samples, draw

log = logging.getLogger(__name__)

#: T5 tokens the model is trained and run with (the captions need at most 11; pass it as
#: ``max_sequence_length`` when generating)
MAX_SEQUENCE_LENGTH = 16
IMAGE_SIZE = 64

DIT_FILE = "flux-shapes.safetensors"
AE_FILE = "ae.safetensors"


def configs() -> dict[str, Any]:
    from difforge_flux.ae import FluxAEConfig
    from difforge_flux.dit import FluxDiTConfig
    from difforge_text_encoders.clip import CLIPTextConfig
    from difforge_text_encoders.t5 import T5EncoderConfig

    return {
        "dit": FluxDiTConfig(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=64, hidden_size=96,
                             num_heads=4, depth=2, depth_single_blocks=3, axes_dim=(4, 10, 10), guidance_embed=False),
        "vae": FluxAEConfig(ch=8, ch_mult=(1, 2, 4, 4), num_res_blocks=1, z_channels=16, norm_groups=8),
        "clip": CLIPTextConfig(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=2),
        "t5": T5EncoderConfig(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                              relative_attention_num_buckets=8),
    }


def _save(module: torch.nn.Module, path: Path, config: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path), metadata={"format": "pt"})
    if config is not None:
        (path.parent / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _init_encoder(module: torch.nn.Module) -> None:
    """Random weights that keep activations near unit scale (the encoders are never trained)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.0 if "embed" in name or "shared" in name else 1.0 / math.sqrt(p.shape[-1]))
            elif "norm" in name or "layer_norm" in name:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            else:
                p.zero_()


def write_shapes_t5_tokenizer(folder: Path) -> Path:
    """A T5 unigram ``spiece.model`` with every caption word as one piece.

    SentencePiece's unigram trainer keeps only ~30 pieces on 168 near-identical captions (it spells the
    words letter by letter), so the 14 words are given as user-defined pieces (``▁yellow``) and the
    rest of the vocabulary is learnt from the captions and :data:`~difforge_sdk.tiny_tokenizers.CORPUS`.
    """
    import sentencepiece as spm

    from ..tiny_tokenizers import CORPUS
    from .data import PALETTE, SHAPES

    folder.mkdir(parents=True, exist_ok=True)
    words = ["a", "on", "background", *PALETTE, *SHAPES]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(all_prompts() * 2 + list(CORPUS) * 4), model_prefix=str(folder / "spiece"),
        vocab_size=120, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2, user_defined_symbols=["\u2581" + w for w in words],
    )
    (folder / "spiece.vocab").unlink()
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 100, "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def write_encoders(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Tokenizers trained on the captions and random frozen CLIP and T5 encoders."""
    from difforge_text_encoders.clip import CLIPTextEncoder
    from difforge_text_encoders.t5 import T5Encoder

    corpus = all_prompts()
    clip_tok = write_clip_tokenizer(folder / "tokenizer", corpus=corpus, vocab_size=500)
    t5_tok = write_shapes_t5_tokenizer(folder / "tokenizer_2")
    cfg = configs()
    clip_vocab = len(json.loads((clip_tok / "vocab.json").read_text()))
    clip_cfg = type(cfg["clip"])(**{**asdict(cfg["clip"]), "vocab_size": clip_vocab})
    torch.manual_seed(seed)
    clip, t5 = CLIPTextEncoder(clip_cfg), T5Encoder(cfg["t5"])
    _init_encoder(clip)
    _init_encoder(t5)
    clip_json = {**asdict(clip_cfg), "model_type": "clip_text_model", "architectures": ["CLIPTextModel"]}
    t5_json = {**asdict(cfg["t5"]), "model_type": "t5", "architectures": ["T5EncoderModel"]}
    t5_json.pop("position_bias_per_layer")
    return {
        "text_encoder": _save(clip, folder / "text_encoder" / "model.safetensors", clip_json),
        "text_encoder_2": _save(t5, folder / "text_encoder_2" / "model.safetensors", t5_json),
        "tokenizer": clip_tok,
        "tokenizer_2": t5_tok,
    }


def write_initial_dit(path: Path, seed: int = 0) -> Path:
    """The untrained DiT: PyTorch's default initialisation, the output projection zeroed."""
    from difforge_flux.dit import FluxDiT

    torch.manual_seed(seed)
    dit = FluxDiT(configs()["dit"])
    with torch.no_grad():
        dit.final_layer.linear.weight.zero_()
        dit.final_layer.linear.bias.zero_()
    return _save(dit, path)


def _image_batch(n: int, seed: int) -> torch.Tensor:
    import numpy as np

    arrays = [np.asarray(draw(s, IMAGE_SIZE), dtype=np.float32) for s in samples(n, seed, IMAGE_SIZE)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_autoencoder(path: Path, steps: int = 2000, full_size_steps: int = 200, batch: int = 16, seed: int = 0,
                      lr: float = 3e-3, save_every: int = 200) -> dict[str, Any]:
    """Train the tiny Flux AE as an autoencoder on shapes images and save it (BFL layout).

    ``steps`` steps on random 32x32 crops (4x cheaper than whole images; the AE is convolutional), then
    ``full_size_steps`` on whole 64x64 images; the file is rewritten every ``save_every`` steps. Loss: L1 + MSE reconstruction of the decoded latent, with
    Gaussian noise (std 0.1 in the DiT's scaled latent space) added before decoding so that the decoder
    is robust to imperfect latents, plus a small penalty keeping each scaled latent channel near mean 0
    and standard deviation 1 (what the DiT's noise expects; the released AE's scale and shift are kept).
    """
    from difforge_flux.ae import FluxAE

    torch.manual_seed(seed)
    ae = FluxAE(configs()["vae"])
    total = steps + full_size_steps
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.05)
    data = _image_batch(4096, seed + 1)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    losses = []
    for step in range(total):
        x = data[torch.randint(0, data.shape[0], (batch,), generator=gen)]
        if step < steps:  # a random 32x32 window (multiple of 8) of each image
            oy, ox = (int(v) * 8 for v in torch.randint(0, 5, (2,), generator=gen))
            x = x[:, :, oy : oy + 32, ox : ox + 32]
        z = ae.encode(x)
        rec = ae.decode(z + 0.1 * torch.randn(z.shape, generator=gen))
        rec_loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean()
        mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
        reg = (mean**2).mean() + ((std - 1.0) ** 2).mean()
        loss = rec_loss + 0.1 * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(rec_loss.item())
        if save_every and step and step % save_every == 0:
            _save(ae, path)  # a usable AE at any time
        if step % 100 == 0 or step == total - 1:
            log.info("AE step %d/%d: L1+MSE %.4f, latent mean %.3f std %.3f", step, total, rec_loss.item(),
                     mean.mean().item(), std.mean().item())
    wall = time.perf_counter() - start
    ae.eval()
    with torch.no_grad():
        x = _image_batch(256, seed + 2)
        z = ae.encode(x)
        rec = ae.decode(z).clamp(-1, 1)
        err = (rec - x).abs().mean().item() * 127.5
    _save(ae, path)
    info = {"steps_32px_crops": steps, "steps_64px": full_size_steps, "batch": batch, "wall_s": round(wall, 1),
            "final_loss": round(losses[-1], 4), "heldout_mean_abs_error_0_255": round(err, 2),
            "latent_mean": round(z.mean().item(), 3), "latent_std": round(z.std().item(), 3)}
    log.info("AE trained: %s", info)
    return info

"""Write tiny random toy-family checkpoints to disk (own or diffusers-like layouts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .models import (
    ToyDiT,
    ToyDiTConfig,
    ToyTextConfig,
    ToyTextEncoder,
    ToyVAE,
    ToyVAEConfig,
    toy_diffusers_inverse_rename,
    toy_diffusers_split_qkv,
)


def toy_models(seed: int = 0, dit_config: ToyDiTConfig | None = None) -> dict[str, torch.nn.Module]:
    """Random toy models (deterministic for a seed)."""
    torch.manual_seed(seed)
    return {
        "dit": ToyDiT(dit_config or ToyDiTConfig()),
        "vae": ToyVAE(ToyVAEConfig()),
        "text_encoder": ToyTextEncoder(ToyTextConfig()),
    }


def _save(sd: dict[str, torch.Tensor], path: Path, prefix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous().clone() for k, v in sd.items()}, str(path))
    return path


def write_toy_checkpoints(
    folder: str | Path,
    *,
    seed: int = 0,
    dit_format: str = "toy",
    prefix: str = "",
    dit_config: ToyDiTConfig | None = None,
) -> dict[str, Path]:
    """Write ``dit.safetensors``, ``vae.safetensors``, ``text_encoder.safetensors`` into ``folder``.

    ``dit_format``: ``"toy"`` (own layout) or ``"toy-diffusers"``; ``prefix`` is prepended to every
    DiT key (e.g. ``"model.diffusion_model."`` as ComfyUI does).
    """
    folder = Path(folder)
    models = toy_models(seed, dit_config)
    dit_sd: dict[str, Any] = models["dit"].state_dict()
    if dit_format == "toy-diffusers":
        dit_sd = {toy_diffusers_inverse_rename(k): v for k, v in toy_diffusers_split_qkv(dit_sd).items()}
    elif dit_format != "toy":
        raise ValueError(f"unknown toy format {dit_format!r}")
    return {
        "dit": _save(dit_sd, folder / "dit.safetensors", prefix),
        "vae": _save(models["vae"].state_dict(), folder / "vae.safetensors"),
        "text_encoder": _save(models["text_encoder"].state_dict(), folder / "text_encoder.safetensors"),
    }


def write_toy_diffusers_folder(folder: str | Path, *, seed: int = 0, scheduler_config: dict[str, Any] | None = None) -> Path:
    """A diffusers-layout folder: ``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``scheduler/``."""
    folder = Path(folder)
    models = toy_models(seed)
    dit_sd = {toy_diffusers_inverse_rename(k): v for k, v in toy_diffusers_split_qkv(models["dit"].state_dict()).items()}
    _save(dit_sd, folder / "transformer" / "diffusion_pytorch_model.safetensors")
    _save(models["vae"].state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors")
    _save(models["text_encoder"].state_dict(), folder / "text_encoder" / "model.safetensors")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipeline", "transformer": ["toy", "ToyDiT"]}))
    sched = scheduler_config or {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.5, "num_train_timesteps": 1000}
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    return folder

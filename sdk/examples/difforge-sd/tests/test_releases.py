"""Real-size checkpoints at the header level: the released SD 1.5 and SDXL single files (every component's
real names and shapes over a sparse file) are detected per component, by fingerprint, with their configs."""

from __future__ import annotations

import pytest
import torch
from difforge_sdk.sparse import write_sparse_safetensors

import difforge
from difforge.loading.convert import to_foreign_layout
from difforge_sd.unet import SD15_UNET, SDXL_BASE_UNET, SDUNet
from difforge_sd.vae import SD_VAE, SDVAE
from difforge_text_encoders.clip import CLIPTextConfig, CLIPTextEncoder

CLIP_L = CLIPTextConfig()
CLIP_G = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                        hidden_act="gelu", projection_dim=1280)


def _meta(module_cls, config) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return module_cls(config).state_dict()


def _shapes(kind: str) -> dict[str, tuple[int, ...]]:
    conv = difforge.get_registry().converters.get
    unet = conv(f"{kind}-unet-ldm")
    out = to_foreign_layout(_meta(SDUNet, SD15_UNET if kind == "sd" else SDXL_BASE_UNET), unet.inverse_rename,
                            unet.inverse_transform, strict=True)
    vae = conv("sd-vae-ldm")
    out |= to_foreign_layout(_meta(SDVAE, SD_VAE), vae.inverse_rename, vae.inverse_transform, strict=True)
    clip = to_foreign_layout(_meta(CLIPTextEncoder, CLIP_L), conv("sd-clip-ldm").inverse_rename, strict=True)
    if kind == "sd":
        out |= clip
    else:
        out |= {k.replace("cond_stage_model.", "conditioner.embedders.0."): v for k, v in clip.items()}
        g = conv("sdxl-clip-g-openclip")
        out |= to_foreign_layout(_meta(CLIPTextEncoder, CLIP_G), g.inverse_rename, g.inverse_transform, strict=True)
    return {k: tuple(v.shape) for k, v in out.items()}


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_released_single_file_is_detected_per_component(kind, registry, tmp_path):
    path = write_sparse_safetensors(tmp_path / f"{kind}.safetensors", _shapes(kind), dtype="F16")
    unet = difforge.detect(path, model=f"{kind}-unet")
    assert unet.format == "ldm"
    assert unet.variant == ("stable-diffusion-v1-5" if kind == "sd" else "stable-diffusion-xl-base-1.0")
    assert unet.config == (SD15_UNET if kind == "sd" else SDXL_BASE_UNET)
    vae = difforge.detect(path, model="sd-vae")
    assert (vae.format, vae.config) == ("ldm", SD_VAE)
    clip = difforge.detect(path, model="clip-text", format="ldm")
    assert clip.config == CLIP_L
    if kind == "sdxl":
        g = difforge.detect(path, model="clip-text", format="openclip")
        assert g.config == CLIP_G
    with pytest.raises(difforge.DetectionError):  # several components claim the file: ask which
        difforge.detect(path)

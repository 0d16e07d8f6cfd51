"""A tiny FLUX.1 DiT (joint text + image attention with RoPE, head dim 64) gives the same output with
``triton`` (under the interpreter) as with ``sdpa``. The whole Flux, Qwen-Image and Wan pipelines
are in test_family_pipelines.py."""

from __future__ import annotations

import pytest
import torch

import difforge_triton.kernel
from difforge.ops import use_attention

flux_dit = pytest.importorskip("difforge_flux.dit")
pytestmark = pytest.mark.usefixtures("interpreted")

CONFIG = dict(
    in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=128, num_heads=2,
    depth=1, depth_single_blocks=2, axes_dim=(8, 28, 28), guidance_embed=True,
)


def test_flux_dit_matches_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    kernel = difforge_triton.kernel.flash_attention
    monkeypatch.setattr(difforge_triton.kernel, "flash_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    torch.manual_seed(0)
    model = flux_dit.FluxDiT(flux_dit.FluxDiTConfig(**CONFIG)).eval()
    h, w, text = 3, 5, 7  # 15 image + 7 text tokens: neither a multiple of the tile
    ids = torch.zeros(h * w, 3)
    ids[:, 1], ids[:, 2] = torch.arange(h * w) // w, torch.arange(h * w) % w
    inputs = dict(
        img=torch.randn(1, h * w, 16), img_ids=ids, txt=torch.randn(1, text, 32), txt_ids=torch.zeros(text, 3),
        timesteps=torch.tensor([0.7]), y=torch.randn(1, 32), guidance=torch.tensor([3.5]),
    )
    with torch.no_grad():
        with use_attention("sdpa"):
            ref = model(**inputs)
        with use_attention("triton"):
            out = model(**inputs)
    assert len(calls) == CONFIG["depth"] + CONFIG["depth_single_blocks"]
    assert (out - ref).abs().max().item() <= 1e-4

"""Whole tiny Flux, Qwen-Image and Wan pipelines with ``attention="triton"`` (under the interpreter) give the
image ``sdpa`` gives, within 1e-3 (issue 11).

Every component that attends through ``difforge.ops.attention`` has 64-wide heads (``tiny_pipelines``), so the
strict ``triton`` choice serves the whole call: the DiT (joint text+image attention for Flux and Qwen-Image,
with Qwen-Image's text padding mask; self- and cross-attention for Wan), the VAE's mid-block attention, CLIP
(causal mask) and the Qwen2.5-VL text encoder (grouped-query: 2 query heads, 1 key/value head). Each test
records the kernel's calls and checks that each kind was served by it. Reduced size, 2 steps, CFG at the
family default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import difforge
import difforge_triton
import difforge_triton.kernel
from difforge import Pipeline
from difforge.ops import use_attention
from difforge.plugins import PluginSettings

from .tiny_pipelines import HEAD_DIM, write_flux, write_qwen_image, write_wan

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("interpreted")

QUIET = {"progress_bar_cmd": lambda x: x}
log = logging.getLogger(__name__)


@pytest.fixture(autouse=True, scope="module")
def families_and_triton(triton_registry: Any) -> Iterator[None]:
    """The three families, the text encoders and difforge-triton (the folder's conftest restores its own)."""
    modules = [pytest.importorskip(m) for m in ("difforge_text_encoders", "difforge_flux", "difforge_wan",
                                                "difforge_qwen_image")]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    difforge.reload_plugins(PluginSettings(autoload=False), plugins=[*modules, difforge_triton])
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every call of the kernel: the shapes of q and k, and whether a mask came along."""
    calls: list[dict[str, Any]] = []
    kernel = difforge_triton.kernel.flash_attention

    def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "mask": kw.get("mask") is not None})
        return kernel(q, k, v, **kw)

    monkeypatch.setattr(difforge_triton.kernel, "flash_attention", recording)
    return calls


def compare(pipe: Pipeline, calls: list[dict[str, Any]], **run: Any) -> np.ndarray:
    """The pipeline's output with ``sdpa`` and with ``triton``: within 1e-3, and ``sdpa`` never reaches the kernel."""
    pipe.set_attention("sdpa")
    ref = pipe(output_type="np", **run, **QUIET)
    assert not calls
    pipe.set_attention("triton")
    out = pipe(output_type="np", **run, **QUIET)
    assert out.shape == ref.shape and np.isfinite(out).all()
    err = float(np.abs(out - ref).max())
    log.info("%s: max abs difference triton vs sdpa %.2e over %d kernel calls", pipe.spec.name, err, len(calls))
    assert err <= 1e-3, err
    assert ref.std() > 0.01  # an image, not a constant
    assert all(c["q"][-1] == HEAD_DIM for c in calls)
    return out


def count(calls: list[dict[str, Any]], where: Callable[[dict[str, Any]], bool]) -> int:
    return sum(map(where, calls))


def test_flux_pipeline_matches_sdpa(tmp_path: Path, kernel_calls: list[dict[str, Any]]) -> None:
    pipe = Pipeline.from_pretrained("flux", str(write_flux(tmp_path)), device="cpu")
    compare(pipe, kernel_calls, prompt="a cat holding a sign", seed=0, height=64, width=64, num_inference_steps=2,
            max_sequence_length=32)  # fmt: skip
    # CLIP: 2 layers, 77 tokens, causal mask; DiT: (1 double + 1 single) x 2 steps over 32 + 16 tokens;
    # AE decoder mid block over the 8 x 8 latent
    assert count(kernel_calls, lambda c: c["q"][2] == 77 and c["mask"]) == 2
    assert count(kernel_calls, lambda c: c["q"][2] == 32 + 16 and c["q"][1] == 2) == 2 * 2
    assert count(kernel_calls, lambda c: c["q"][1:3] == (1, 64)) == 1
    assert len(kernel_calls) == 2 + 4 + 1


def test_qwen_image_pipeline_matches_sdpa(tmp_path: Path, kernel_calls: list[dict[str, Any]]) -> None:
    pipe = Pipeline.from_pretrained("qwen-image", str(write_qwen_image(tmp_path)), device="cpu")
    # two prompts of different lengths: the DiT gets a text padding mask; true CFG (default cfg_scale 4)
    compare(pipe, kernel_calls, prompt=["a cat holding a sign that says hello", "a red fox"], seed=0, height=64,
            width=64, num_inference_steps=2)  # fmt: skip
    encoder = [c for c in kernel_calls if c["k"][1] == 1 and c["q"][1] == 2]  # GQA: 2 query heads, 1 kv head
    assert len(encoder) == 2 * 2  # 2 layers, prompt and negative prompt
    dit = [c for c in kernel_calls if c["q"][1] == 2 and c["k"][1] == 2]
    assert len(dit) == 2 * 2 * 2  # 2 blocks x 2 steps x 2 CFG branches
    # the prompts' branch has padding (a mask); the negative prompts (" " twice) have none
    assert sum(c["mask"] for c in dit) == 2 * 2
    assert len(kernel_calls) == len(encoder) + len(dit) + 1  # + the VAE decoder's mid block

    # the Qwen2.5-VL text encoder alone (grouped-query attention, padding + causal mask): module tolerance
    prompts = ["a cat holding a sign that says hello", "a red fox"]
    with torch.inference_mode():
        with use_attention("sdpa"):
            ref = pipe.encode_prompt(prompts)
        calls = len(kernel_calls)
        with use_attention("triton"):
            out = pipe.encode_prompt(prompts)
    assert len(kernel_calls) == calls + 2
    assert torch.equal(out["txt_mask"], ref["txt_mask"])
    assert (out["txt"] - ref["txt"]).abs().max().item() <= 1e-4


def test_wan_pipeline_matches_sdpa(tmp_path: Path, kernel_calls: list[dict[str, Any]]) -> None:
    pipe = Pipeline.from_pretrained("wan", str(write_wan(tmp_path)), device="cpu")
    compare(pipe, kernel_calls, prompt="a cat holding a sign", seed=0, height=32, width=32, num_frames=5,
            num_inference_steps=2, max_sequence_length=32)  # fmt: skip
    # DiT over 2 latent frames x 2 x 2 tokens: self-attention (Nq = Nk = 8) and cross-attention to the 32
    # text tokens, 2 blocks x 2 steps x 2 CFG branches each; the VAE decoder's mid block, once per latent frame
    dit_self = count(kernel_calls, lambda c: c["q"][1:3] == (2, 8) and c["k"][2] == 8)
    dit_cross = count(kernel_calls, lambda c: c["q"][1:3] == (2, 8) and c["k"][2] == 32)
    assert dit_self == dit_cross == 2 * 2 * 2
    assert len(kernel_calls) - dit_self - dit_cross == 2  # the VAE decoder's mid block, per latent frame

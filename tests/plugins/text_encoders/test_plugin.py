"""The plugin as the core sees it: a light entry point, its specs, and the block contract that
cache and offload plugins rely on."""

from __future__ import annotations

import fnmatch
import subprocess
import sys

import pytest
import torch

import difforge
from difforge._names import resolve

MODELS = ["clip-text", "t5-encoder", "umt5-encoder", "qwen2.5-vl-text"]
TOKENIZERS = ["clip-tokenizer", "t5-tokenizer", "qwen2-tokenizer"]


def test_entry_point_is_discovered_and_light() -> None:
    code = (
        "import sys, difforge; host = difforge.reload_plugins();"
        "rec = [r for r in host.plugin_rows() if r.distribution == 'difforge-text-encoders'];"
        "assert rec and rec[0].status == 'ok', rec;"
        "names = set(rec[0].provides['models']);"
        f"assert names >= {set(MODELS + TOKENIZERS)!r}, names;"
        "assert 'torch' not in sys.modules and 'tokenizers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _tiny(name: str) -> object:
    from difforge_text_encoders import clip, qwen2_5_vl, t5

    return {
        "clip-text": clip.CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=8, projection_dim=16),
        "t5-encoder": t5.T5EncoderConfig(vocab_size=50, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
        "umt5-encoder": t5.T5EncoderConfig(vocab_size=50, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, position_bias_per_layer=True),
        "qwen2.5-vl-text": qwen2_5_vl.Qwen25VLTextConfig(vocab_size=50, hidden_size=64, intermediate_size=40, num_hidden_layers=2,
                                                          num_attention_heads=2, num_key_value_heads=1, mrope_section=(4, 6, 6)),
    }[name]


@pytest.mark.parametrize("name", MODELS)
def test_specs_layout_and_high_precision_patterns(registry, name: str) -> None:
    """Every block of the layout takes ``hidden_states`` first and returns it, same shape;
    keep_high_precision patterns name real parameters; a model built on the meta device has no
    buffers (nothing is lost when weights are assigned)."""
    spec = registry.models.get(name)
    assert spec.role == "text_encoder" and spec.format == "transformers"
    with torch.device("meta"):
        meta = spec.build(_tiny(name))
    assert not list(meta.buffers())
    torch.manual_seed(0)
    model = spec.build(_tiny(name)).eval()
    params = [n for n, _ in model.named_parameters()]
    for pattern in spec.keep_high_precision:
        assert any(fnmatch.fnmatch(p, pattern) for p in params), pattern
    (group,) = spec.layout.groups
    blocks = model.get_submodule(group.path)
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((args[0].shape, out.shape))) for b in blocks]
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids))
    for h in hooks:
        h.remove()
    assert len(seen) == len(blocks) and all(a == b == (2, 8, out.last_hidden_state.shape[-1]) for a, b in seen)


@pytest.mark.parametrize("name", MODELS)
def test_low_precision_runs_close_to_fp32(registry, name: str) -> None:
    """bf16 weights and activations (how pipelines run encoders) stay close to fp32; fp16 T5 stays finite."""
    torch.manual_seed(0)
    model = registry.models.get(name).build(_tiny(name)).eval()
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
        low = model.to(torch.bfloat16)(ids).last_hidden_state
        assert low.dtype == torch.bfloat16 and (low.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()
        if name.endswith("t5-encoder"):
            assert torch.isfinite(model.to(torch.float16)(ids).last_hidden_state).all()


def test_tokenizer_specs(registry, tmp_path) -> None:
    for name in TOKENIZERS:
        spec = registry.models.get(name)
        assert spec.role == "tokenizer" and spec.config_from_shapes is None
        assert callable(resolve(spec.detect_folder)) and hasattr(resolve(spec.module), "from_folder")
    with pytest.raises(difforge.DifforgeError, match="not a t5 tokenizer folder"):
        resolve(registry.models.get("t5-tokenizer").module).from_folder(tmp_path)


@pytest.mark.parametrize("name", MODELS)
def test_runs_under_sequential_offload(registry, name: str) -> None:
    """With the core's ``sequential`` backend every block holds meta placeholders between forwards and
    gets its weights only inside its own forward: nothing may read a block's weights from outside
    (T5's shared position bias is made inside block 0)."""
    from types import SimpleNamespace

    spec = registry.models.get(name)
    torch.manual_seed(0)
    model = spec.build(_tiny(name)).eval()
    ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        want = model(ids, mask).last_hidden_state
    offload = registry.offload.get("sequential")
    pipe = SimpleNamespace(device="cpu", components={"text_encoder": model}, spec=SimpleNamespace(component_order=()),
                           _model_spec=lambda slot: spec)
    handle = resolve(offload.apply)(pipe, dict(offload.options))
    try:
        assert next(model.get_submodule(spec.layout.groups[0].path).parameters()).is_meta
        with torch.no_grad():
            got = model(ids, mask).last_hidden_state
    finally:
        handle.remove()
    assert torch.equal(got, want)

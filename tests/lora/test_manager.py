"""The core LoRA manager on the toy pipeline (with the throwaway converters of ``lora_helpers``): fused
and hot modes against a manual merge, exact clearing, scales, several LoRAs, strictness, offload and fp8,
export round trips, convolutions and partial (row-range) updates."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import difforge
from difforge import ConfigError, ConversionError
from difforge.lora import HotLayer, LoraDelta, convert_lora, lora_manager, read_lora
from difforge.lora.layers import FusedWeight, make_delta

from .conftest import CALL
from .lora_helpers import DIT_MODULES, random_lora, write


def _state(pipe: difforge.Pipeline) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    return {(s, k): (t, t.detach().clone()) for s, m in pipe.models().items() for k, t in m.state_dict(keep_vars=True).items()}


def _assert_restored(pipe: difforge.Pipeline, before: dict) -> None:
    after = {(s, k): t for s, m in pipe.models().items() for k, t in m.state_dict(keep_vars=True).items()}
    for key, (obj, copy_) in before.items():
        assert after[key] is obj and obj.dtype == copy_.dtype and torch.equal(obj, copy_), key


def _manual(pipe: difforge.Pipeline, sd: dict[str, torch.Tensor], prefix: str, slot: str, scale: float) -> difforge.Pipeline:
    """A copy of ``pipe`` with the toy-format LoRA ``sd`` merged by hand: W += scale * alpha / r * B @ A."""
    other = copy.deepcopy(pipe)
    model = other.components[slot]
    with torch.no_grad():
        for key in sd:
            if key.endswith(".lora_A.weight"):
                module = key[len(prefix) : -len(".lora_A.weight")]
                A, B = sd[key], sd[f"{prefix}{module}.lora_B.weight"]
                alpha = sd.get(f"{prefix}{module}.alpha")
                s = scale * (1.0 if alpha is None else float(alpha) / A.shape[0])
                model.get_submodule(module).weight += s * B @ A
    return other


@pytest.fixture
def dit_lora(build: Any, tmp_path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    sd = random_lora(build().components["dit"], DIT_MODULES, "toy.", seed=1)
    return sd, write(sd, tmp_path / "style.safetensors")


def test_fused_and_hot_match_a_manual_merge(build, dit_lora):
    sd, path = dit_lora
    pipe = build()
    base = pipe(**CALL)
    want = _manual(pipe, sd, "toy.", "dit", 0.7)(**CALL)
    for fuse in (True, False):
        name = pipe.load_lora(path, scale=0.7, fuse=fuse)
        assert name == "style" and lora_manager(pipe).loras[name].fused is fuse
        assert torch.allclose(pipe(**CALL), want, atol=1e-5)
        pipe.clear_lora()
        assert torch.equal(pipe(**CALL), base)
    assert pipe.load_lora(path) == "style"  # fuse=None without offload: fused
    assert lora_manager(pipe).loras["style"].fused


def test_clear_restores_bits_scales_and_several_loras(build, dit_lora, tmp_path):
    sd, path = dit_lora
    other = write(random_lora(build().components["dit"], DIT_MODULES[:3], "toy.", seed=2, alpha=None), tmp_path / "b.safetensors")
    pipe = build()
    before = _state(pipe)
    base = pipe(**CALL)
    pipe.load_lora(path, name="a", fuse=True)
    pipe.load_lora(other, name="b", fuse=True, scale=2.0)
    pipe.load_lora(path, name="c", fuse=False, scale=0.5)
    both = pipe(**CALL)
    pipe.set_lora_scale("a", 1.5)  # the same LoRA: fused a at 1.5 + hot c at 0 == a at 1 + c at 0.5
    pipe.set_lora_scale("c", 0.0)
    assert torch.allclose(pipe(**CALL), both, atol=1e-5)
    pipe.clear_lora("c")
    assert torch.allclose(pipe(**CALL), both, atol=1e-5)
    pipe.set_lora_scale("a", 1.0)
    assert not torch.allclose(pipe(**CALL), both, atol=1e-3)
    pipe.load_lora(path, name="c", fuse=False, scale=0.5)
    assert torch.allclose(pipe(**CALL), both, atol=1e-6)
    pipe.clear_lora("a")
    pipe.clear_lora()
    _assert_restored(pipe, before)
    assert torch.equal(pipe(**CALL), base)
    assert not any(m._forward_hooks for c in pipe.models().values() for m in c.modules())


def test_parts_format_lands_on_the_fused_qkv(build, tmp_path):
    """q and v LoRAs (no k) in the ``toy-parts`` spelling: one block-structured update of ``qkv``
    (rows 0:48 of 48, k's rows zero), the same as the equivalent LoRA written on ``qkv``."""
    pipe = build()
    dim = pipe.components["dit"].blocks[0].attn.proj.in_features
    gen = torch.Generator().manual_seed(5)
    q_a, q_b, v_a, v_b = (torch.randn(s, generator=gen) * 0.3 for s in [(2, dim), (dim, 2), (3, dim), (dim, 3)])
    parts = {"parts.blocks.0.attn.to_q.lora_down.weight": q_a, "parts.blocks.0.attn.to_q.lora_up.weight": q_b,
             "parts.blocks.0.attn.to_q.alpha": torch.tensor(4.0),
             "parts.blocks.0.attn.to_v.lora_down.weight": v_a, "parts.blocks.0.attn.to_v.lora_up.weight": v_b}
    B = torch.zeros(3 * dim, 5)
    B[:dim, :2], B[2 * dim :, 2:] = q_b * 2.0, v_b  # q's alpha 4 / rank 2 folded in
    fused = {"toy.blocks.0.attn.qkv.lora_A.weight": torch.cat([q_a, v_a]), "toy.blocks.0.attn.qkv.lora_B.weight": B}
    want = _manual(pipe, fused, "toy.", "dit", 1.0)(**CALL)
    for fuse in (True, False):
        pipe.load_lora(write(parts, tmp_path / "parts.safetensors"), fuse=fuse)
        assert lora_manager(pipe).loras["parts"].formats == {"dit": "toy-parts"}
        assert torch.allclose(pipe(**CALL), want, atol=1e-5)
        out = pipe.export_lora("parts", tmp_path / "again.safetensors", format="toy-parts")
        back = read_lora(out).tensors  # split back exactly (ranks 2 and 3); q's different scale folded in
        assert sorted(back) == sorted(k for k in parts if not k.endswith("alpha"))
        assert torch.equal(back["parts.blocks.0.attn.to_q.lora_up.weight"], q_b * 2.0)
        assert torch.equal(back["parts.blocks.0.attn.to_v.lora_down.weight"], v_a)
        pipe.clear_lora()
    # only q's rows: a row-range update (0:16 of 48)
    only_q = {k: v for k, v in parts.items() if ".to_q." in k}
    pipe.load_lora(write(only_q, tmp_path / "q.safetensors"), fuse=False)
    delta = lora_manager(pipe).loras["q"].deltas["dit"]["blocks.0.attn.qkv"]
    assert delta.rows == (0, dim)
    hot = pipe(**CALL)
    pipe.clear_lora()
    pipe.load_lora(tmp_path / "q.safetensors", fuse=True)
    assert torch.allclose(pipe(**CALL), hot, atol=1e-5)


def test_export_round_trip_and_convert(build, dit_lora, tmp_path):
    sd, path = dit_lora
    pipe = build()
    pipe.load_lora(path, fuse=False, name="x")
    te = random_lora(pipe.components["text_encoder"], ["mlp.fc1"], "te.", seed=3)
    pipe.load_lora(write({**sd, **te}, tmp_path / "both.safetensors"), fuse=False, target="all", name="both")
    pipe.set_lora_scale("x", 0.0)
    want = pipe(**CALL)
    out = pipe.export_lora("both", tmp_path / "out.safetensors", format="toy")
    got = read_lora(out).tensors
    assert got.keys() == {**sd, **te}.keys() and all(torch.equal(got[k], v) for k, v in {**sd, **te}.items())
    other = build()
    other.load_lora(out, target=["dit", "text_encoder"], fuse=True)
    assert torch.allclose(other(**CALL), want, atol=1e-5)
    mixed = {**random_lora(pipe.components["dit"], ["blocks.0.attn.proj"], "toy.", seed=5, alpha=None), **sd}
    pipe.load_lora(mixed, name="mixed", fuse=False)
    back = read_lora(pipe.export_lora("mixed", tmp_path / "mixed.safetensors", format="toy")).tensors
    assert float(back["toy.blocks.0.attn.proj.alpha"]) == 2.0  # alpha = rank (scale 1) beside modules with an alpha
    with pytest.raises(ConversionError, match="formats available for it: toy, toy-parts"):
        pipe.export_lora("both", tmp_path / "no.safetensors", format="kohya")
    qkv = write(random_lora(pipe.components["dit"], ["blocks.0.attn.qkv"], "toy.", seed=4), tmp_path / "qkv.safetensors")
    converted = convert_lora(qkv, "toy-parts", tmp_path / "conv.safetensors")  # qkv -> to_q/k/v, no model needed
    assert "parts.blocks.0.attn.to_k.lora_down.weight" in read_lora(converted).tensors
    with pytest.raises(ConversionError, match="cannot express 15 tensor"):
        convert_lora(path, "toy-parts", tmp_path / "no.safetensors")
    other.clear_lora()
    other.load_lora(converted, fuse=False, scale=0.5)
    ref = build()
    ref.load_lora(qkv, fuse=False, scale=0.5)
    assert torch.allclose(other(**CALL), ref(**CALL), atol=1e-5)


def test_targets_names_and_strictness(build, dit_lora, tmp_path, caplog):
    sd, path = dit_lora
    pipe = build()
    te = random_lora(pipe.components["text_encoder"], ["mlp.fc1", "mlp.fc2"], "te.", seed=3)
    both = write({**sd, **te}, tmp_path / "both.safetensors")
    with caplog.at_level(logging.WARNING, logger="difforge.lora"):
        pipe.load_lora(both)  # target="dit": the text encoder's part is left out, with a warning
    assert "text_encoder (6 tensors)" in caplog.text and set(lora_manager(pipe).loras["both"].deltas) == {"dit"}
    with pytest.raises(ConfigError, match="loaded already"):
        pipe.load_lora(both, name="both")
    assert pipe.load_lora(both, target="text_encoder") == "both-2"
    with pytest.raises(ConversionError, match="no weights for dit; it has weights for text_encoder"):
        pipe.load_lora(write(te, tmp_path / "te.safetensors"))
    with pytest.raises(ConfigError, match="not a model component"):
        pipe.load_lora(both, target="unet")
    with pytest.raises(ConfigError, match="no LoRA named 'nope'"):
        pipe.set_lora_scale("nope", 1.0)

    bad = dict(sd)
    bad["toy.blocks.9.attn.qkv.lora_A.weight"] = torch.zeros(2, 16)  # no block 9
    bad["toy.blocks.9.attn.qkv.lora_B.weight"] = torch.zeros(48, 2)
    bad["toy.final.linear.lora_A.weight"] = torch.zeros(2, 5)  # wrong width
    bad["toy.something.dora_scale"] = torch.zeros(3)
    bad_path = write(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError) as info:
        pipe.load_lora(bad_path)
    message = str(info.value)
    assert "toy.something.dora_scale" in message and "blocks.9.attn.qkv: no such module" in message
    assert "final.linear: lora_A has shape (2, 5)" in message and "strict=False" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="difforge.lora"):
        pipe.load_lora(bad_path, strict=False, name="bad")
    assert "applied 5 module(s); skipped 1 unknown key(s) and 2 mismatched module(s)" in caplog.text
    with pytest.raises(ConversionError, match="no LoRA converter for .* recognises"):
        pipe.load_lora({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(1, 1)})


def test_offload_and_fp8_use_hot_loras(build, dit_lora):
    pytest.importorskip("difforge_fp8")
    sd, path = dit_lora
    plain = build()
    plain.load_lora(path, fuse=False)
    want = plain(**CALL)
    pipe = build(offload="sequential")
    pipe.load_lora(path)  # fuse=None: hot under offload, bit-identical to hot without
    assert not lora_manager(pipe).loras["style"].fused
    assert torch.equal(pipe(**CALL), want)
    with pytest.raises(ConfigError, match="streaming offload"):
        pipe.load_lora(path, fuse=True, name="f")
    fp8 = build(offload="fp8")
    base = fp8(**CALL)
    with pytest.raises(ConfigError, match="float8"):
        fp8.load_lora(path, fuse=True)
    fp8.load_lora(path)
    hot = fp8(**CALL)
    assert not torch.allclose(hot, base)
    fp8.clear_lora()
    assert torch.equal(fp8(**CALL), base)
    streamed = build(offload=["fp8", "sequential"])
    streamed.load_lora(path)
    assert torch.equal(streamed(**CALL), hot)


def test_hot_layer_on_fp8_weights_is_the_upcast_layer_plus_the_branch():
    cast = pytest.importorskip("difforge_fp8.cast")
    torch.manual_seed(0)
    layer = nn.Linear(16, 24)
    handle = cast.cast_module(layer, scaled=True)
    group = {"A": torch.randn(3, 16), "B": torch.randn(24, 3), "alpha": torch.tensor(6.0)}
    delta = make_delta(nn.Sequential(layer), "0", group)
    assert isinstance(delta, LoraDelta)
    hot = HotLayer(layer, "layer")
    hot.set("l", delta, 0.5)
    x = torch.randn(5, 16)
    w = cast.dequantize(layer.weight, layer.weight_fp8_scale, torch.float32)
    want = nn.functional.linear(x, w, layer.bias) + 0.5 * 2.0 * (x @ group["A"].T @ group["B"].T)
    assert torch.allclose(layer(x), want, atol=1e-5)
    hot.remove()
    assert torch.equal(layer(x), nn.functional.linear(x, w, layer.bias))
    handle.remove()


def test_conv_lora_fused_and_hot_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, stride=2))
    x = torch.randn(2, 3, 9, 9)
    group = {"A": torch.randn(2, 3, 3, 3) * 0.3, "B": torch.randn(6, 2, 1, 1) * 0.3}
    delta = make_delta(model, "0", group)
    assert isinstance(delta, LoraDelta)
    base = model(x)
    hot = HotLayer(model[0], "0")
    hot.set("l", delta, 1.0)
    y_hot = model(x)
    hot.remove()
    fused = FusedWeight(model[0], "0")
    original = model[0].weight.detach().clone()
    fused.set("l", delta, 1.0)
    assert torch.allclose(model(x), y_hot, atol=1e-5) and not torch.allclose(y_hot, base)
    fused.set("l", None)
    assert torch.equal(model[0].weight, original)
    assert isinstance(make_delta(model, "0", {"A": torch.zeros(2, 3, 5, 5), "B": torch.zeros(6, 2)}), str)


def test_cli_converts_a_lora_file(build, tmp_path):
    """`difforge convert --lora` rewrites a LoRA in another registered layout without a model."""
    from difforge.cli import main

    pipe = build()
    qkv = write(random_lora(pipe.components["dit"], ["blocks.0.attn.qkv"], "toy.", seed=4), tmp_path / "qkv.safetensors")
    out = tmp_path / "parts.safetensors"
    assert main(["convert", "--lora", str(qkv), "--to", "toy-parts", "-o", str(out)]) == 0
    assert "parts.blocks.0.attn.to_k.lora_down.weight" in read_lora(out).tensors

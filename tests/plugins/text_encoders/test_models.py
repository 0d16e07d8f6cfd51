"""Parity with transformers on tiny random configs (fp32, the same weights, 1e-4 max abs).

Each reference model is written with ``save_pretrained`` and the file is loaded the way the core
loads checkpoints: detected (with and without its ``config.json``), built on the meta device,
weights assigned (through a converter where the layout is foreign).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from difforge.loading.state_dict import save_safetensors  # noqa: E402
from difforge_text_encoders import clip, t5  # noqa: E402, F401

TOL = 1e-4


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _write(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = save_safetensors(tensors, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------- CLIP


def _clip_reference(eos_token_id: int, projection: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=99, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, hidden_act="gelu", eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=1,
        projection_dim=24,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def _clip_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (3, 16), generator=g)
    ids[:, 0] = 0
    ids[0, 5:] = 98  # <eos>, then padding with <eos> (as FLUX.1's tokenizer pads)
    ids[1, 9], ids[1, 10:] = 97, 1  # a different end token id, padded with another id
    ids[2, -1] = 98
    mask = (torch.arange(16) < torch.tensor([6, 10, 16])[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("eos_token_id", [2, 97])
def test_clip_matches_transformers(tmp_path: Path, load_detected, save_transformers, eos_token_id: int) -> None:
    """``eos_token_id=2`` is transformers' legacy pooling (argmax of the ids), FLUX.1's config; 97 pools
    at the first occurrence of that id. The legacy ``text_model.`` layout loads as the own format."""
    ref = _clip_reference(eos_token_id)
    flat = save_transformers(ref, tmp_path / "v5")
    legacy = _write(tmp_path / "legacy", {f"text_model.{k}": v for k, v in flat.items()}, ref.config.to_dict())
    ours, det = load_detected(legacy.parent)
    assert (det.model, det.format, det.converter, det.variant) == ("clip-text", "transformers", None, None)
    assert det.config.eos_token_id == eos_token_id and det.config.num_attention_heads == 2
    ids, mask = _clip_inputs()
    with torch.no_grad():
        for m in (None, mask):
            r, o = ref(input_ids=ids, attention_mask=m), ours(ids, m)
            assert _diff(r.last_hidden_state, o.last_hidden_state) <= TOL
            assert _diff(r.pooler_output, o.pooled_output) <= TOL
        masked = ours(ids, mask).last_hidden_state
    assert _diff(masked[:, :6], ours(ids).last_hidden_state[:, :6]) <= TOL  # causal: padding changes nothing before it


def test_clip_transformers5_flat_layout(tmp_path: Path, load_detected, save_transformers) -> None:
    """transformers 5 writes a from-scratch ``CLIPTextModel`` without the ``text_model.`` prefix: a
    converter adds it. Without config.json the config is inferred from shapes (64-wide heads)."""
    ref = _clip_reference(2)
    save_transformers(ref, tmp_path)
    (tmp_path / "config.json").unlink()
    ours, det = load_detected(tmp_path / "model.safetensors")
    assert det.format == "transformers5" and det.converter == "clip-text-flat"
    assert det.config == clip.CLIPTextConfig(
        vocab_size=99, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, hidden_act="gelu",
    )
    ids, _ = _clip_inputs()
    with torch.no_grad():
        r, o = ref(input_ids=ids), ours(ids)
        assert _diff(r.last_hidden_state, o.last_hidden_state) <= TOL
        assert _diff(r.pooler_output, o.pooled_output) <= TOL


def test_clip_with_projection(tmp_path: Path, load_detected, save_transformers) -> None:
    """``CLIPTextModelWithProjection``: ``text_projection`` is kept and applied by ``project``."""
    ref = _clip_reference(2, projection=True)
    save_transformers(ref, tmp_path)
    ours, det = load_detected(tmp_path)
    assert det.converter is None and det.config.projection_dim == 24
    ids, _ = _clip_inputs()
    with torch.no_grad():
        r, o = ref(input_ids=ids), ours(ids)
        assert _diff(r.last_hidden_state, o.last_hidden_state) <= TOL
        assert _diff(r.text_embeds, ours.project(o.pooled_output)) <= TOL


def test_clip_full_model_keeps_the_text_tower(tmp_path: Path, load_detected) -> None:
    """A whole ``CLIPModel`` (vision tower, projections, ``logit_scale``, an old ``position_ids``
    buffer) detects as the text encoder through the extras converter; its config.json (model type
    ``clip``) gives the text config."""
    torch.manual_seed(0)
    text = dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                max_position_embeddings=16, hidden_act="quick_gelu", eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4)
    ref = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    tensors = dict(ref.state_dict())
    tensors["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    assert any(k.startswith("vision_model.") for k in tensors) and "logit_scale" in tensors
    ours, det = load_detected(_write(tmp_path, tensors, ref.config.to_dict()))
    assert det.converter == "clip-text-extras" and det.config.hidden_act == "quick_gelu" and det.config.projection_dim == 24
    ids, _ = _clip_inputs()
    with torch.no_grad():
        r, o = ref.text_model(input_ids=ids), ours(ids)
        assert _diff(r.pooler_output, o.pooled_output) <= TOL
        assert _diff(ref.get_text_features(input_ids=ids).pooler_output, ours.project(o.pooled_output)) <= TOL


# ---------------------------------------------------------------- T5 / umT5


def _t5_reference(umt5: bool, gated: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg_cls, model_cls = (transformers.UMT5Config, transformers.UMT5EncoderModel) if umt5 else (transformers.T5Config, transformers.T5EncoderModel)
    config = cfg_cls(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_heads=4,
        feed_forward_proj="gated-gelu" if gated else "relu",
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
    )
    return model_cls(config).eval()


def _t5_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 99, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    return ids, mask


@pytest.mark.parametrize("umt5", [False, True], ids=["t5", "umt5"])
def test_t5_matches_transformers(tmp_path: Path, load_detected, save_transformers, umt5: bool) -> None:
    """T5EncoderModel / UMT5EncoderModel with and without a padding mask; buckets and max distance
    from config.json (the max distance is not in the shapes)."""
    ref = _t5_reference(umt5)
    written = save_transformers(ref, tmp_path)
    assert "shared.weight" in written and "encoder.embed_tokens.weight" not in written  # tied copy not saved
    ours, det = load_detected(tmp_path)
    assert det.model == ("umt5-encoder" if umt5 else "t5-encoder") and det.converter is None
    assert det.config.relative_attention_max_distance == 20 and det.config.num_heads == 4
    ids, mask = _t5_inputs()
    with torch.no_grad():
        for m in (None, mask):
            r = ref(input_ids=ids, attention_mask=m).last_hidden_state
            assert _diff(r, ours(ids, m).last_hidden_state) <= TOL
        assert _diff(ours(ids, mask).last_hidden_state[1], ours(ids).last_hidden_state[1]) > 1e-3  # the mask matters


def test_t5_config_from_shapes_and_plain_relu(tmp_path: Path, load_detected, save_transformers) -> None:
    """Without config.json: heads and buckets come from the bias table, the max distance is T5's 128.
    Original T5 (``wi``/``wo``, relu) is the ungated variant."""
    ref = _t5_reference(umt5=False, gated=False)
    save_transformers(ref, tmp_path)
    (tmp_path / "config.json").unlink()
    _, det = load_detected(tmp_path / "model.safetensors")
    assert det.config == t5.T5EncoderConfig(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="relu",
    )
    ref.config.relative_attention_max_distance = 128
    for layer in ref.encoder.block[0].layer[:1]:
        layer.SelfAttention.relative_attention_max_distance = 128
    ours, _ = load_detected(tmp_path / "model.safetensors")
    ids, mask = _t5_inputs()
    with torch.no_grad():
        assert _diff(ref(input_ids=ids, attention_mask=mask).last_hidden_state, ours(ids, mask).last_hidden_state) <= TOL


@pytest.mark.parametrize("umt5", [False, True], ids=["t5", "umt5"])
def test_t5_whole_checkpoint_with_tied_embeddings(tmp_path: Path, load_detected, umt5: bool) -> None:
    """A state dict written as is (``encoder.embed_tokens.weight`` beside ``shared.weight``), only the
    tied copy (with a ComfyUI ``spiece_model`` tensor), and a whole encoder-decoder: the extras converter."""
    ref = _t5_reference(umt5)
    config = ref.config.to_dict()
    ours, det = load_detected(_write(tmp_path / "tied", dict(ref.state_dict()), config))
    assert det.converter == ("umt5-encoder-extras" if umt5 else "t5-encoder-extras")
    ids, mask = _t5_inputs()
    with torch.no_grad():
        assert _diff(ref(input_ids=ids, attention_mask=mask).last_hidden_state, ours(ids, mask).last_hidden_state) <= TOL
    only_tied = {k: v for k, v in ref.state_dict().items() if k != "shared.weight"}
    only_tied["spiece_model"] = torch.arange(16, dtype=torch.uint8)  # ComfyUI embeds the tokenizer so
    ours, _ = load_detected(_write(tmp_path / "only-tied", only_tied, config))
    with torch.no_grad():
        assert _diff(ref(input_ids=ids).last_hidden_state, ours(ids).last_hidden_state) <= TOL
    full_cls = transformers.UMT5ForConditionalGeneration if umt5 else transformers.T5ForConditionalGeneration
    full = full_cls(ref.config).eval()
    assert any(k.startswith("decoder.") for k in full.state_dict())
    ours, det = load_detected(_write(tmp_path / "full", dict(full.state_dict()), config))
    assert det.converter == ("umt5-encoder-extras" if umt5 else "t5-encoder-extras")
    with torch.no_grad():
        r = full.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        assert _diff(r, ours(ids, mask).last_hidden_state) <= TOL


def test_umt5_wan_pth_roundtrip(tmp_path: Path, load_detected) -> None:
    """Wan-AI's ``.pth`` layout (made from the reference by the inverse rename) loads to the same outputs."""
    ref = _t5_reference(umt5=True)
    wan = {t5.wan_umt5_inverse_rename(k): v.clone() for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert "blocks.1.pos_embedding.embedding.weight" in wan and "blocks.0.ffn.gate.0.weight" in wan
    torch.save(wan, tmp_path / "models_t5_umt5-tiny-enc.pth")
    ours, det = load_detected(tmp_path / "models_t5_umt5-tiny-enc.pth")
    assert (det.model, det.format, det.converter) == ("umt5-encoder", "wan", "umt5-encoder-wan")
    assert det.config.relative_attention_max_distance == 128  # Wan's T5 fixes it at 128
    ref.config.relative_attention_max_distance = 128
    for block in ref.encoder.block:
        block.layer[0].SelfAttention.relative_attention_max_distance = 128
    ids, mask = _t5_inputs()
    with torch.no_grad():
        assert _diff(ref(input_ids=ids, attention_mask=mask).last_hidden_state, ours(ids, mask).last_hidden_state) <= TOL


# ---------------------------------------------------------------- Qwen2.5-VL text path


def _qwen_reference() -> torch.nn.Module:
    """A tiny Qwen2.5-VL with 128-wide heads (as every release), GQA and a one-block vision tower."""
    torch.manual_seed(0)
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=99, hidden_size=256, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=256, fullatt_block_indexes=[0]),
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwen_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding, as Qwen-Image's tokenizer call pads
    return ids, mask


def _check_qwen(ref: torch.nn.Module, ours: torch.nn.Module) -> None:
    ids, mask = _qwen_inputs()
    with torch.no_grad():
        for m in (None, mask):
            r = ref.model(input_ids=ids, attention_mask=m, output_hidden_states=True)
            o = ours(ids, m, output_hidden_states=True)
            assert _diff(r.last_hidden_state, o.last_hidden_state) <= TOL
            assert len(r.hidden_states) == len(o.hidden_states)
            assert all(_diff(a, b) <= TOL for a, b in zip(r.hidden_states, o.hidden_states))
        left = torch.zeros_like(mask)
        left[:, 3:] = 1  # left padding: the tokens agree (padding rows are don't-care)
        r, o = ref.model(input_ids=ids, attention_mask=left).last_hidden_state, ours(ids, left).last_hidden_state
        assert _diff(r[:, 3:], o[:, 3:]) <= TOL


def test_qwen2_5_vl_text_matches_transformers(tmp_path: Path, load_detected, save_transformers) -> None:
    """The whole ``Qwen2_5_VLForConditionalGeneration`` as written (``model.layers``, ``visual.*``,
    ``lm_head``): the converter keeps the language model; config.json gives rope theta."""
    ref = _qwen_reference()
    written = save_transformers(ref, tmp_path)
    assert "lm_head.weight" in written and "model.layers.0.self_attn.q_proj.bias" in written
    ours, det = load_detected(tmp_path)
    assert (det.model, det.converter) == ("qwen2.5-vl-text", "qwen2.5-vl-text-full")
    assert det.config.rope_theta == 10000.0 and det.config.num_key_value_heads == 1
    _check_qwen(ref, ours)


def test_qwen2_5_vl_text_only_and_v5_layouts(tmp_path: Path, load_detected) -> None:
    """Only the language model under ``model.`` (the generic prefix is stripped: own layout), with a
    transformers-4 config.json (text fields at the top level); and the transformers-5 module names
    (``model.language_model.layers``, ``model.visual``)."""
    ref = _qwen_reference()
    state = ref.state_dict()
    text = {k.replace("model.language_model.", "model."): v for k, v in state.items() if k.startswith("model.language_model.")}
    v4_config = {"model_type": "qwen2_5_vl", **{k: v for k, v in ref.config.text_config.to_dict().items() if k != "rope_parameters"},
                 "rope_theta": 10000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
    ours, det = load_detected(_write(tmp_path / "text", text, v4_config))
    assert (det.converter, det.prefix, det.config.rope_theta) == (None, "model.", 10000.0)
    _check_qwen(ref, ours)
    ours, det = load_detected(_write(tmp_path / "v5", dict(state), ref.config.to_dict()))
    assert det.converter == "qwen2.5-vl-text-full"
    _check_qwen(ref, ours)

"""The released checkpoints: fingerprints recomputed from the published configs on the meta device,
and real-size files (a real safetensors header over a sparse file) detected by fingerprint."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from difforge_sdk.sparse import write_sparse_safetensors

import difforge
import difforge_text_encoders as te
from difforge.loading.detect import detect_header
from difforge.loading.fingerprint import fingerprint_shapes
from difforge.loading.state_dict import CheckpointHeader
from difforge_text_encoders import clip, qwen2_5_vl, t5

transformers = pytest.importorskip("transformers")

# The published configs (config.json of FLUX.1-dev's text_encoder/ and text_encoder_2/, google/umt5-xxl).
CLIP_L_JSON = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "torch_dtype": "bfloat16", "vocab_size": 49408,
}
T5_XXL_JSON = {
    "architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
    "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True,
    "pad_token_id": 0, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32128,
}
# Qwen-Image's text_encoder/config.json (Qwen2.5-VL-7B-Instruct, written by transformers 4.53).
_QWEN_TEXT = {
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}, "rope_theta": 1000000.0,
    "use_sliding_window": False, "vocab_size": 152064,
}
QWEN_IMAGE_TEXT_ENCODER_JSON = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **_QWEN_TEXT, "sliding_window": 32768,
    "text_config": {**_QWEN_TEXT, "model_type": "qwen2_5_vl_text", "sliding_window": None},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.53.1",
    "vision_config": {
        "depth": 32, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu", "hidden_size": 1280, "in_channels": 3,
        "in_chans": 3, "intermediate_size": 3420, "model_type": "qwen2_5_vl", "num_heads": 16, "out_hidden_size": 3584,
        "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
        "tokens_per_second": 2, "window_size": 112,
    },
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
}
UMT5_XXL_JSON = {
    "architectures": ["UMT5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096, "dense_act_fn": "gelu_new",
    "feed_forward_proj": "gated-gelu", "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "umt5",
    "num_heads": 64, "num_layers": 24, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False, "vocab_size": 256384,
}


def _own_shapes(config: object) -> dict[str, tuple[int, ...]]:
    classes = {clip.CLIPTextConfig: clip.CLIPTextEncoder, t5.T5EncoderConfig: t5.T5Encoder, qwen2_5_vl.Qwen25VLTextConfig: qwen2_5_vl.Qwen25VLTextEncoder}
    cls = classes[type(config)]
    with torch.device("meta"):
        model = cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _transformers_shapes(model_cls: type, config: Mapping, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """What ``save_pretrained`` writes for the published config: the state dict without the tied
    ``encoder.embed_tokens`` copy (see test_models: transformers saves ``shared.weight`` only)."""
    with torch.device("meta"):
        model = model_cls(model_cls.config_class.from_dict(dict(config)))
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


RELEASES = [
    ("clip-text", "clip-vit-large-patch14", clip.CLIP_VIT_L_14, te.CLIP_VIT_L_14_FINGERPRINT, transformers.CLIPTextModel, CLIP_L_JSON, "text_model."),
    ("t5-encoder", "t5-v1_1-xxl", t5.T5_V1_1_XXL, te.T5_V1_1_XXL_FINGERPRINT, transformers.T5EncoderModel, T5_XXL_JSON, ""),
    ("umt5-encoder", "umt5-xxl", t5.UMT5_XXL, te.UMT5_XXL_FINGERPRINT, transformers.UMT5EncoderModel, UMT5_XXL_JSON, ""),
]


@pytest.mark.parametrize("model, variant, config, fp, ref_cls, published, prefix", RELEASES, ids=[r[1] for r in RELEASES])
def test_fingerprints_and_released_configs(registry, model, variant, config, fp, ref_cls, published, prefix) -> None:
    """Stored constant == our module's keys == what transformers writes for the published config;
    the released config is what config.json and the shapes infer."""
    shapes = _own_shapes(config)
    assert fingerprint_shapes(shapes) == fp
    assert _transformers_shapes(ref_cls, published, prefix) == shapes
    spec = registry.models.get(model)
    assert spec.fingerprints[fp] == variant
    assert difforge._names.resolve(spec.released_configs[variant]) == config
    assert difforge._names.resolve(spec.config_from_json)(published, shapes) == config
    assert spec.infer_config(shapes) == config


def test_wan_umt5_fingerprint() -> None:
    wan = {t5.wan_umt5_inverse_rename(k): v for k, v in _own_shapes(t5.UMT5_XXL).items()}
    assert len(wan) == 242 and wan["token_embedding.weight"] == (256384, 4096)
    assert fingerprint_shapes(wan) == te.UMT5_XXL_WAN_FINGERPRINT


def _sparse_safetensors(path: Path, shapes: Mapping[str, Sequence[int]], dtype: str = "BF16") -> Path:
    return write_sparse_safetensors(path, shapes, dtype)


def test_flux_text_encoder_folders_detected_by_fingerprint(registry, tmp_path: Path) -> None:
    """FLUX.1's ``text_encoder/`` (one file) and ``text_encoder_2/`` (two shards and an index), real
    sizes, sparse: detected by fingerprint, with the released config."""
    te1 = tmp_path / "text_encoder"
    te1.mkdir()
    _sparse_safetensors(te1 / "model.safetensors", _own_shapes(clip.CLIP_VIT_L_14))
    (te1 / "config.json").write_text(json.dumps(CLIP_L_JSON))
    det = difforge.detect(te1)
    assert (det.model, det.variant, det.format, det.config) == ("clip-text", "clip-vit-large-patch14", "transformers", clip.CLIP_VIT_L_14)

    te2 = tmp_path / "text_encoder_2"
    te2.mkdir()
    shapes = _own_shapes(t5.T5_V1_1_XXL)
    first = {k: v for k, v in shapes.items() if k == "shared.weight" or k.startswith(tuple(f"encoder.block.{i}." for i in range(12)))}
    second = {k: v for k, v in shapes.items() if k not in first}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, part in zip(names, (first, second)):
        _sparse_safetensors(te2 / name, part)
    index = {"metadata": {"total_size": 9524621312}, "weight_map": {k: names[k in second] for k in shapes}}
    (te2 / "model.safetensors.index.json").write_text(json.dumps(index))
    det = difforge.detect(te2)
    assert (det.model, det.variant, det.config) == ("t5-encoder", "t5-v1_1-xxl", t5.T5_V1_1_XXL)
    assert sum(2 * torch.Size(s).numel() for s in shapes.values()) == index["metadata"]["total_size"]


def test_comfyui_single_files_detected_by_fingerprint(registry, tmp_path: Path) -> None:
    """ComfyUI's ``clip_l.safetensors`` (fp16, same keys as FLUX's) and ``umt5_xxl_fp16.safetensors``:
    no config.json beside them; the fingerprint names the release and its config."""
    det = difforge.detect(_sparse_safetensors(tmp_path / "clip_l.safetensors", _own_shapes(clip.CLIP_VIT_L_14), "F16"))
    assert (det.model, det.variant, det.config) == ("clip-text", "clip-vit-large-patch14", clip.CLIP_VIT_L_14)
    det = difforge.detect(_sparse_safetensors(tmp_path / "umt5_xxl_fp16.safetensors", _own_shapes(t5.UMT5_XXL), "F16"))
    assert (det.model, det.variant, det.config) == ("umt5-encoder", "umt5-xxl", t5.UMT5_XXL)


def test_wan_umt5_pth_header_detected_by_fingerprint(registry) -> None:
    """Wan-AI's ``models_t5_umt5-xxl-enc-bf16.pth`` (headers as the core reads them from the pickle)."""
    shapes = {t5.wan_umt5_inverse_rename(k): v for k, v in _own_shapes(t5.UMT5_XXL).items()}
    path = Path("models_t5_umt5-xxl-enc-bf16.pth")
    header = CheckpointHeader((path,), shapes, {k: "BF16" for k in shapes}, {k: path for k in shapes})
    det = detect_header(header)
    assert (det.model, det.format, det.converter, det.variant) == ("umt5-encoder", "wan", "umt5-encoder-wan", "umt5-xxl")
    assert det.config == t5.UMT5_XXL


def _qwen_release_shapes() -> dict[str, tuple[int, ...]]:
    """What Qwen-Image's ``text_encoder/`` shards hold: the whole Qwen2.5-VL-7B-Instruct, in the key
    names transformers 4 writes (``model.layers``, ``visual``, ``lm_head``)."""
    import re

    config = transformers.Qwen2_5_VLConfig.from_dict(dict(QWEN_IMAGE_TEXT_ENCODER_JSON))
    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    legacy = lambda k: re.sub(r"^model\.(language_model\.)?", "model.", re.sub(r"^model\.visual\.", "visual.", k))  # noqa: E731
    return {legacy(k): tuple(v.shape) for k, v in model.state_dict().items()}


def test_qwen2_5_vl_fingerprint_and_shards(registry, tmp_path: Path) -> None:
    """Qwen-Image's ``text_encoder/`` (4 shards, 16584333312 bytes of bf16, real size, sparse): detected
    by fingerprint through the converter that keeps the language model."""
    shapes = _qwen_release_shapes()
    assert fingerprint_shapes(shapes) == te.QWEN2_5_VL_7B_FINGERPRINT
    assert sum(2 * torch.Size(s).numel() for s in shapes.values()) == 16584333312
    own = {qwen2_5_vl.qwen_full_rename(k): v for k, v in shapes.items() if qwen2_5_vl.qwen_full_rename(k)}
    assert own == _own_shapes(qwen2_5_vl.QWEN2_5_VL_7B)
    spec = registry.models.get("qwen2.5-vl-text")
    assert spec.fingerprints[te.QWEN2_5_VL_7B_FINGERPRINT] == "Qwen2.5-VL-7B-Instruct"
    assert difforge._names.resolve(spec.config_from_json)(QWEN_IMAGE_TEXT_ENCODER_JSON, own) == qwen2_5_vl.QWEN2_5_VL_7B
    assert spec.infer_config(own) == qwen2_5_vl.QWEN2_5_VL_7B

    folder = tmp_path / "text_encoder"
    folder.mkdir()
    names = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    keys = sorted(shapes)
    parts = [keys[i::4] for i in range(4)]
    for name, part in zip(names, parts):
        _sparse_safetensors(folder / name, {k: shapes[k] for k in part})
    weight_map = {k: names[i] for i, part in enumerate(parts) for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 16584333312}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(QWEN_IMAGE_TEXT_ENCODER_JSON))
    det = difforge.detect(folder)
    assert (det.model, det.variant, det.converter) == ("qwen2.5-vl-text", "Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-text-full")
    assert det.config == qwen2_5_vl.QWEN2_5_VL_7B


def test_t5xxl_with_tied_copy_is_still_the_release(registry, tmp_path: Path) -> None:
    """A T5-XXL file that also carries the tied ``encoder.embed_tokens.weight`` (what the 9.79 GB size of
    ComfyUI's ``t5xxl_fp16.safetensors`` suggests): the extras converter's output is the release."""
    shapes = _own_shapes(t5.T5_V1_1_XXL)
    shapes["encoder.embed_tokens.weight"] = shapes["shared.weight"]
    det = difforge.detect(_sparse_safetensors(tmp_path / "t5xxl_fp16.safetensors", shapes, "F16"))
    assert (det.model, det.converter, det.variant, det.config) == ("t5-encoder", "t5-encoder-extras", "t5-v1_1-xxl", t5.T5_V1_1_XXL)

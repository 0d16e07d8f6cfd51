"""Tokenizer parity with transformers' CLIPTokenizer, T5TokenizerFast and Qwen2TokenizerFast.

Tiny vocabularies are trained here with the ``tokenizers`` library (and ``sentencepiece`` for
``spiece.model``), written in the files real repositories ship, and loaded by both sides.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

import difforge
from difforge_text_encoders import tokenization as tk

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a cat holding a sign that says hello world",
    "  A  CAT\tholding   a SIGN!!\n  ",
    "一只猫举着写有“你好世界”的牌子，赛博朋克风格",
    "a 🐱 with a 🌈 rainbow, ultra-detailed, 8k, f/1.8",
    "mixed 中文 and English with émojis 😀👍🏽 and numbers 12345",
    "it's a dog's life, isn't it? they'll see what we'd do",
    "",
    "a dog " + " ".join(f"with feature {i} and 特征{i} 🐕" for i in range(60)),  # far over every max_length
]
CORPUS = PROMPTS[:-1] + [
    "the quick brown fox jumps over the lazy dog " * 3,
    "photo of a woman in a red dress standing in the rain, cinematic lighting",
    "中国山水画，高山流水，云雾缭绕，一只仙鹤飞过",
    "emoji party 🎉🎈🎂 🐶🐱🐭 👍👎 ❤️💔",
    "Numbers 0123456789 and symbols !@#$%^&*()_+-=[]{};':\",./<>?",
]


def _compare(ours: tk.TextTokenizer, ref, max_length: int | None, padding="max_length", prompts=PROMPTS) -> None:
    kwargs = {} if max_length is None else {"max_length": max_length}
    want = ref(prompts, padding=padding, truncation=True, return_tensors="pt", **kwargs)
    got = ours(prompts, padding=padding, **kwargs)
    assert got.input_ids.tolist() == want["input_ids"].tolist()
    assert got.attention_mask.tolist() == want["attention_mask"].tolist()
    for text in prompts[:-1]:
        assert ours.encode(text) == ref(text)["input_ids"]


# ---------------------------------------------------------------- CLIP


def _train_clip(folder: Path, pad_token: str) -> Path:
    """A CLIP-style BPE (``</w>`` word ends, specials at the end of the vocabulary, as openai's)."""
    tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(tk._CLIP_SPLIT), behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trainer = BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir()
    tok.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    end = "<|endoftext|>"
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": end,
              "unk_token": end, "pad_token": pad_token, "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"], ids=["flux-pad", "sd-pad"])
def test_clip_tokenizer_matches_transformers(registry, tmp_path: Path, pad_token: str) -> None:
    folder = _train_clip(tmp_path / "tokenizer", pad_token)
    det = difforge.detect(folder)
    assert (det.model, det.role) == ("clip-tokenizer", "tokenizer")
    ours = registry.models.get("clip-tokenizer")
    tok = difforge._names.resolve(ours.module).from_folder(folder, det.config)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    _compare(tok, ref, None)  # model_max_length 77, as FLUX.1's pipeline pads
    _compare(tok, ref, 16, padding="longest")
    out = tok(PROMPTS)
    assert out.input_ids.shape == (len(PROMPTS), 77) and out.input_ids[-1, -1].item() == tok.eos_token_id
    assert tok.pad_token_id == ref.pad_token_id and tok.decode(tok.encode("a cat")) == ref.decode(ref("a cat")["input_ids"], skip_special_tokens=True)

    ref.save_pretrained(tmp_path / "fast")  # the same tokenizer as a tokenizer.json
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "fast" / name).unlink(missing_ok=True)
    assert tk.detect_clip_folder(tmp_path / "fast") is not None
    _compare(tk.CLIPTokenizer.from_folder(tmp_path / "fast"), ref, None)


# ---------------------------------------------------------------- T5 / umT5


def _train_t5(folder: Path) -> Path:
    spm = pytest.importorskip("sentencepiece")
    folder.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_prefix=str(folder / "spiece"), vocab_size=180, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    (folder / "spiece.vocab").unlink()
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 100, "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_t5_tokenizer_matches_transformers(registry, tmp_path: Path) -> None:
    """From ``spiece.model`` (read without sentencepiece) and from the ``tokenizer.json`` transformers writes."""
    folder = _train_t5(tmp_path / "tokenizer_2")
    det = difforge.detect(folder)
    assert det.model == "t5-tokenizer"
    tok = tk.T5Tokenizer.from_folder(folder, det.config)
    ref = transformers.T5TokenizerFast.from_pretrained(folder)
    assert tok.vocab_size == len(ref) and tok.encode("<extra_id_0>") == ref("<extra_id_0>")["input_ids"]
    _compare(tok, ref, None)  # 512, FLUX.1-dev's length
    _compare(tok, ref, 32)
    _compare(tok, ref, 16, padding="longest")
    out = tok(PROMPTS, max_length=32)
    assert out.input_ids[-1, -1].item() == tok.eos_token_id == 1 and out.attention_mask[-2].sum().item() == 1

    ref.save_pretrained(tmp_path / "fast")
    (tmp_path / "fast" / "spiece.model").unlink(missing_ok=True)
    det = difforge.detect(tmp_path / "fast")
    assert det.model == "t5-tokenizer" and det.config.has("tokenizer.json")
    _compare(tk.T5Tokenizer.from_folder(tmp_path / "fast", det.config), ref, 64)


# ---------------------------------------------------------------- Qwen2

QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


def _train_qwen2(folder: Path) -> Path:
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(tk._QWEN2_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS + [TEMPLATE], trainer)
    folder.mkdir()
    tok.model.save(str(folder))
    n = tok.get_vocab_size()
    added = {str(n + i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}
             for i, t in enumerate(QWEN_ADDED)}
    config = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None, "model_max_length": 131072}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_qwen2_tokenizer_matches_transformers(registry, tmp_path: Path) -> None:
    """Qwen-Image tokenizes its prompt template with padding to the longest and a 1024 + 34 limit."""
    folder = _train_qwen2(tmp_path / "tokenizer")
    det = difforge.detect(folder)
    assert det.model == "qwen2-tokenizer"
    tok = tk.Qwen2Tokenizer.from_folder(folder, det.config)
    ref = transformers.Qwen2TokenizerFast.from_pretrained(folder)
    prompts = [TEMPLATE.format(p) for p in PROMPTS]
    _compare(tok, ref, 1024 + 34, padding="longest", prompts=prompts)
    _compare(tok, ref, 48, padding="longest", prompts=prompts)
    assert tok.encode("<|im_start|>") == [tok.backend.token_to_id("<|im_start|>")]
    assert tok.eos_token_id == ref.eos_token_id and tok.pad_token_id == ref.pad_token_id

    ref.save_pretrained(tmp_path / "fast")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "fast" / name).unlink(missing_ok=True)
    _compare(tk.Qwen2Tokenizer.from_folder(tmp_path / "fast"), ref, 64, padding="longest", prompts=prompts)


# ---------------------------------------------------------------- API


def test_tokenizer_api_errors_and_options(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tok = tk.CLIPTokenizer.from_folder(_train_clip(tmp_path / "clip", "<|endoftext|>"))
    ids, mask = tok("a cat", max_length=8)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (1, 8) and mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]
    with caplog.at_level("WARNING"):
        ids, mask = tok("a cat holding a sign", max_length=5)
    assert ids[0, -1].item() == tok.eos_token_id and "truncated to 5 tokens" in caplog.text and "sign" in caplog.text
    ids, mask = tok(["a cat", "a cat"], padding=False, truncation=False)
    assert ids.shape == (2, 4) and bool(mask.all())
    with pytest.raises(difforge.ConfigError, match="padding"):
        tok(["a", "a longer prompt"], padding=False)
    with pytest.raises(difforge.ConfigError, match="prompts"):
        tok([])
    with pytest.raises(difforge.DifforgeError, match="not a clip tokenizer folder"):
        tk.CLIPTokenizer.from_folder(tmp_path)
    assert tk.detect_t5_folder(tmp_path / "clip") is None and tk.detect_qwen2_folder(tmp_path / "clip") is None


# ---------------------------------------------------------------- prompt helpers vs the diffusers pipelines


def _stub(**attrs):
    from types import SimpleNamespace

    return SimpleNamespace(_execution_device=torch.device("cpu"), **attrs)


def _saved(model, folder: Path):
    model.save_pretrained(folder)
    return difforge.load_model(folder)


def test_flux_prompt_helpers_match_diffusers(registry, tmp_path: Path) -> None:
    """FLUX.1's CLIP pooled output (77 tokens) and T5 embeddings (padded, no mask) as FluxPipeline computes them."""
    from diffusers import FluxPipeline

    from difforge_text_encoders import prompts

    clip_dir, t5_dir = _train_clip(tmp_path / "tokenizer", "<|endoftext|>"), _train_t5(tmp_path / "tokenizer_2")
    ref_tok, ref_tok2 = transformers.CLIPTokenizer.from_pretrained(clip_dir), transformers.T5TokenizerFast.from_pretrained(t5_dir)
    torch.manual_seed(0)
    ref_clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(ref_tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, eos_token_id=2)).eval()
    ref_t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(ref_tok2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")).eval()
    clip, t5 = _saved(ref_clip, tmp_path / "text_encoder"), _saved(ref_t5, tmp_path / "text_encoder_2")
    tok, tok2 = tk.CLIPTokenizer.from_folder(clip_dir), tk.T5Tokenizer.from_folder(t5_dir)
    pipe = _stub(tokenizer=ref_tok, text_encoder=ref_clip, tokenizer_2=ref_tok2, text_encoder_2=ref_t5, tokenizer_max_length=77)
    with torch.no_grad():
        want = FluxPipeline._get_clip_prompt_embeds(pipe, PROMPTS, device=torch.device("cpu"))
        assert (prompts.clip_pooled(tok, clip, PROMPTS) - want).abs().max().item() <= 1e-4
        want = FluxPipeline._get_t5_prompt_embeds(pipe, PROMPTS, max_sequence_length=64, device=torch.device("cpu"))
        assert (prompts.t5_embeddings(tok2, t5, PROMPTS, max_length=64) - want).abs().max().item() <= 1e-4


def test_wan_and_qwen_image_prompt_helpers_match_diffusers(registry, tmp_path: Path) -> None:
    """Wan's umT5 (mask, padding zeroed) and Qwen-Image's template with the first 34 tokens dropped."""
    from functools import partial

    from diffusers import QwenImagePipeline, WanPipeline
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    from difforge_text_encoders import prompts

    t5_dir, qwen_dir = _train_t5(tmp_path / "umt5-tokenizer"), _train_qwen2(tmp_path / "qwen-tokenizer")
    ref_tok, ref_qtok = transformers.T5TokenizerFast.from_pretrained(t5_dir), transformers.Qwen2TokenizerFast.from_pretrained(qwen_dir)
    torch.manual_seed(0)
    ref_umt5 = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(ref_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")).eval()
    ref_qwen = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(ref_qtok), hidden_size=256, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=256))).eval()
    umt5, qwen = _saved(ref_umt5, tmp_path / "umt5"), _saved(ref_qwen, tmp_path / "qwen")
    tok, qtok = tk.T5Tokenizer.from_folder(t5_dir), tk.Qwen2Tokenizer.from_folder(qwen_dir)
    cpu = torch.device("cpu")
    with torch.no_grad():
        wan = _stub(tokenizer=ref_tok, text_encoder=ref_umt5)
        want = WanPipeline._get_t5_prompt_embeds(wan, PROMPTS, max_sequence_length=48, device=cpu, dtype=torch.float32)
        got, _ = prompts.masked_embeddings(tok, umt5, [prompt_clean(p) for p in PROMPTS], max_length=48, pad_to=48)
        assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-4

        q = _stub(tokenizer=ref_qtok, text_encoder=ref_qwen, prompt_template_encode=TEMPLATE, prompt_template_encode_start_idx=34,
                  tokenizer_max_length=1024)
        q._extract_masked_hidden = partial(QwenImagePipeline._extract_masked_hidden, q)
        want, want_mask = QwenImagePipeline._get_qwen_prompt_embeds(q, PROMPTS, device=cpu, dtype=torch.float32)
        texts = [TEMPLATE.format(p) for p in PROMPTS]
        got, mask = prompts.masked_embeddings(qtok, qwen, texts, max_length=1024 + 34, padding="longest", drop=34)
        assert got.shape == want.shape and mask.tolist() == want_mask.tolist()
        assert (got - want).abs().max().item() <= 1e-4

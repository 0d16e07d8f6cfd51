"""Tiny tokenizers trained locally and written in the files real repositories ship.

Used by tests and the demo where no tokenizer can be downloaded: a CLIP BPE (``vocab.json`` +
``merges.txt``, ``</w>`` word ends, as openai/clip-vit-large-patch14) and a T5 unigram
(``spiece.model``, as google/t5-v1_1-xxl; needs ``sentencepiece``, a test dependency) and a Qwen2
byte-level BPE (``vocab.json`` + ``merges.txt`` with the chat tokens, as Qwen/Qwen-Image's ``tokenizer/``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

CORPUS = (
    "a cat holding a sign that says hello world",
    "a red fox in the snow, golden hour, photograph",
    "一只猫举着写有你好世界的牌子，赛博朋克风格",
    "a 🐱 with a 🌈 rainbow, ultra-detailed, 8k, f/1.8",
    "the quick brown fox jumps over the lazy dog " * 3,
    "photo of a woman in a red dress standing in the rain, cinematic lighting",
    "中国山水画，高山流水，云雾缭绕，一只仙鹤飞过",
    "Numbers 0123456789 and symbols !@#$%^&*()_+-=[]{};':\",./<>?",
)


def write_clip_tokenizer(folder: str | Path, corpus: Sequence[str] = CORPUS, vocab_size: int = 600) -> Path:
    """A CLIP-style byte-level BPE with ``</w>`` word ends, BOS/EOS at the end of the vocabulary,
    padded with ``<|endoftext|>`` to 77 tokens as FLUX.1's tokenizer is."""
    from difforge_text_encoders.tokenization import _CLIP_SPLIT
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    folder = Path(folder)
    tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trainer = BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>", show_progress=False
    )
    tok.train_from_iterator(list(corpus), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    end = "<|endoftext|>"
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": end, "unk_token": end, "pad_token": end, "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def write_t5_tokenizer(folder: str | Path, corpus: Sequence[str] = CORPUS, vocab_size: int = 180) -> Path:
    """A T5-style unigram ``spiece.model`` (pad 0, eos 1, unk 2, 100 extra ids)."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus) * 4), model_prefix=str(folder / "spiece"), vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2,
    )
    (folder / "spiece.vocab").unlink()
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 100, "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


def write_qwen2_tokenizer(folder: str | Path, corpus: Sequence[str] = CORPUS, vocab_size: int = 700) -> Path:
    """A Qwen2-style byte-level BPE (``vocab.json`` + ``merges.txt``) with the chat special tokens after the
    vocabulary, ``<|endoftext|>`` padding and ``<|im_end|>`` as end token, as Qwen2.5-VL's tokenizer; trained
    on ``corpus`` and Qwen-Image's prompt template."""
    from difforge_text_encoders.tokenization import _QWEN2_SPLIT
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    folder = Path(folder)
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([*corpus, QWEN_IMAGE_TEMPLATE], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))
    n = tok.get_vocab_size()
    added = {str(n + i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                          "special": True} for i, t in enumerate(QWEN2_SPECIAL_TOKENS)}  # fmt: skip
    config = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None, "model_max_length": 131072}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder

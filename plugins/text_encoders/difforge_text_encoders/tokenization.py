"""Tokenizers on the ``tokenizers`` library, loaded from the files real repositories ship.

- :class:`CLIPTokenizer`: ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``); lower-casing,
  whitespace cleanup, ``</w>`` word ends, ``<|startoftext|>`` ... ``<|endoftext|>``, 77 tokens.
- :class:`T5Tokenizer`: ``tokenizer.json`` or ``spiece.model`` (T5 v1.1 and umT5); ``</s>`` at the end.
- :class:`Qwen2Tokenizer`: byte-level BPE ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``)
  with the added tokens of ``tokenizer_config.json``; no special tokens added.

A ``tokenizer.json`` is used as written (it is the whole pipeline, as transformers' fast tokenizers
load it); without one, the pipeline is built as transformers builds it for that tokenizer class.
Every tokenizer is called the same way::

    input_ids, attention_mask = tokenizer(prompts, max_length=77, padding="max_length")

Each is a tokenizer "model" of the registry: ``detect_folder(path)`` recognises its folder and
returns a :class:`TokenizerFolder`; ``from_folder(path, folder)`` builds it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Union

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

from difforge.errors import ConfigError, LoadError

from .spm import CONTROL, UNIGRAM, USER_DEFINED, read_sentencepiece_model

log = logging.getLogger(__name__)

__all__ = [
    "TokenizerOutput",
    "TokenizerFolder",
    "TextTokenizer",
    "CLIPTokenizer",
    "T5Tokenizer",
    "Qwen2Tokenizer",
    "detect_clip_folder",
    "detect_t5_folder",
    "detect_qwen2_folder",
]

PathArg = Union[str, "PathLike[str]"]
Padding = Union[bool, Literal["max_length", "longest", "do_not_pad"]]

_UNBOUNDED = 10**9
"""``model_max_length`` values at or above this are transformers' "no limit" sentinel."""


class TokenizerOutput(NamedTuple):
    input_ids: Any
    """``[B, L]`` int64 tensor."""
    attention_mask: Any
    """``[B, L]`` int64 tensor, 1 for tokens (special tokens included), 0 for padding."""


@dataclass(frozen=True)
class TokenizerFolder:
    """What ``detect_folder`` found: the folder, its ``tokenizer_config.json`` merged with
    ``special_tokens_map.json``, and the files a tokenizer can be built from."""

    path: str
    kind: str
    files: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.files


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path}: unreadable JSON ({exc}); download the tokenizer again.") from exc


def _settings(folder: Path) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            doc = _read_json(folder / name)
            if isinstance(doc, dict):
                settings.update(doc)
    return settings


def _token(value: Any) -> str | None:
    """A special token as written in a config: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _class(settings: Mapping[str, Any]) -> str | None:
    name = settings.get("tokenizer_class")
    return name.removesuffix("Fast") if isinstance(name, str) else None


def _folder(path: PathArg, kind: str) -> tuple[Path, TokenizerFolder] | None:
    folder = Path(path)
    if not folder.is_dir():
        return None
    files = tuple(sorted(p.name for p in folder.iterdir() if p.is_file()))
    return folder, TokenizerFolder(str(folder), kind, files, _settings(folder))


def _tokenizer_json_model(folder: Path) -> dict[str, Any]:
    doc = _read_json(folder / "tokenizer.json")
    return doc.get("model", {}) if isinstance(doc, dict) else {}


def _read_vocab_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = _read_json(folder / "vocab.json")
    merges: list[tuple[str, str]] = []
    with open(folder / "merges.txt", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise LoadError(f"{folder / 'merges.txt'}: malformed merge {line!r}; download the tokenizer again.")
            merges.append((parts[0], parts[1]))
    return vocab, merges


# ---------------------------------------------------------------- the common tokenizer


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with padding, truncation and attention masks as pipelines need them.

    ``__call__(prompts, max_length=None, padding="max_length", truncation=True) -> TokenizerOutput``.
    ``max_length`` defaults to the folder's ``model_max_length``; ``padding`` is ``"max_length"``,
    ``"longest"`` (or True) or ``False``; truncation keeps the special tokens (CLIP's end token
    survives an over-long prompt, as in transformers).
    """

    kind: ClassVar[str] = ""

    def __init__(
        self,
        backend: Tokenizer,
        *,
        pad_token: str | None,
        eos_token: str | None = None,
        bos_token: str | None = None,
        model_max_length: int | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
    ) -> None:
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.pad_token, self.eos_token, self.bos_token = pad_token, eos_token, bos_token
        self.model_max_length = model_max_length if model_max_length and model_max_length < _UNBOUNDED else None
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.pad_token_id = self._id(pad_token)
        self.eos_token_id = self._id(eos_token)
        self.bos_token_id = self._id(bos_token)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of one text, neither truncated nor padded."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(
        self,
        prompts: str | Sequence[str],
        max_length: int | None = None,
        padding: Padding = "max_length",
        truncation: bool = True,
        add_special_tokens: bool = True,
    ) -> TokenizerOutput:
        import torch

        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ConfigError(f"{type(self).__name__}: prompts must be a string or a non-empty list of strings")
        max_length = max_length or self.model_max_length
        if max_length is None and (truncation or padding == "max_length"):
            raise ConfigError(
                f"{type(self).__name__}: this tokenizer has no model_max_length; pass max_length=... "
                "(or truncation=False with padding='longest')"
            )
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        rows, dropped = [], []
        for enc in encodings:
            if truncation:
                keep = max(max_length - (self.backend.num_special_tokens_to_add(False) if add_special_tokens else 0), 0)
                if len(enc.ids) > keep:
                    cut = enc.ids[keep:] if self.truncation_side == "right" else enc.ids[: len(enc.ids) - keep]
                    dropped.append(self.decode(cut))
                enc.truncate(keep, direction=self.truncation_side)
            rows.append(self.backend.post_process(enc, add_special_tokens=add_special_tokens).ids)
        if dropped:
            log.warning("%s: %d prompt(s) truncated to %d tokens; dropped: %s", type(self).__name__, len(dropped), max_length, dropped)
        if padding in (True, "longest"):
            width = max(len(r) for r in rows)
        elif padding == "max_length":
            width = max(max_length, max(len(r) for r in rows))  # type: ignore[type-var]
        elif padding in (False, "do_not_pad"):
            width = len(rows[0])
            if any(len(r) != width for r in rows):
                raise ConfigError(f"{type(self).__name__}: prompts of different lengths need padding='longest' or 'max_length'")
        else:
            raise ConfigError(f"{type(self).__name__}: padding must be 'max_length', 'longest', True or False, not {padding!r}")
        if any(len(r) < width for r in rows) and self.pad_token_id is None:
            raise ConfigError(f"{type(self).__name__}: this tokenizer has no pad token; pass padding=False")
        ids = torch.full((len(rows), width), self.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if self.padding_side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return TokenizerOutput(ids, mask)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_folder(cls, path: PathArg, folder: TokenizerFolder | None = None) -> TextTokenizer:
        """Build the tokenizer from ``path`` (``folder``: what ``detect_folder`` returned, if known)."""
        root = Path(path)
        if folder is None:
            found = cls._detect(root)
            if found is None:
                raise LoadError(f"{root}: not a {cls.kind} tokenizer folder (expected {cls._expected()}).")
            folder = found
        settings = folder.settings
        if folder.has("tokenizer.json"):
            backend = Tokenizer.from_file(str(root / "tokenizer.json"))
        else:
            backend = cls._build(root, folder)
        _add_config_tokens(backend, settings)
        defaults = cls._defaults()
        get = lambda name: _token(settings.get(name, defaults.get(name)))  # noqa: E731
        return cls(
            backend,
            pad_token=get("pad_token"),
            eos_token=get("eos_token"),
            bos_token=get("bos_token"),
            model_max_length=settings.get("model_max_length", defaults.get("model_max_length")),
            padding_side=settings.get("padding_side", "right"),
            truncation_side=settings.get("truncation_side", "right"),
        )

    @classmethod
    def _detect(cls, path: Path) -> TokenizerFolder | None:
        raise NotImplementedError

    @classmethod
    def _expected(cls) -> str:
        raise NotImplementedError

    @classmethod
    def _build(cls, root: Path, folder: TokenizerFolder) -> Tokenizer:
        raise NotImplementedError

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        return {}


def _add_config_tokens(backend: Tokenizer, settings: Mapping[str, Any]) -> None:
    """Add ``tokenizer_config.json``'s ``added_tokens_decoder`` entries the backend lacks, at their ids."""
    table = settings.get("added_tokens_decoder") or {}
    for token_id, spec in sorted(((int(i), s) for i, s in table.items()), key=lambda p: p[0]):
        content = _token(spec)
        if content is None or backend.token_to_id(content) is not None:
            continue
        opts = spec if isinstance(spec, dict) else {}
        token = AddedToken(
            content,
            single_word=opts.get("single_word", False),
            lstrip=opts.get("lstrip", False),
            rstrip=opts.get("rstrip", False),
            normalized=opts.get("normalized", not opts.get("special", True)),
            special=opts.get("special", True),
        )
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(content) != token_id:
            raise LoadError(
                f"tokenizer_config.json: added token {content!r} should have id {token_id} but got "
                f"{backend.token_to_id(content)}; the vocabulary and the config do not belong together."
            )


def _add_special(backend: Tokenizer, tokens: Sequence[str | None]) -> None:
    present = [t for t in tokens if t is not None]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(present)])


# ---------------------------------------------------------------- CLIP

_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class CLIPTokenizer(TextTokenizer):
    """CLIP's byte-level BPE with ``</w>`` word ends: ``<|startoftext|> ... <|endoftext|>``, padded with
    the folder's pad token (``<|endoftext|>`` for openai/clip-vit-large-patch14 as FLUX.1 ships it)."""

    kind = "clip"

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        end = "<|endoftext|>"
        return {"bos_token": "<|startoftext|>", "eos_token": end, "pad_token": end, "unk_token": end, "model_max_length": 77}

    @classmethod
    def _detect(cls, path: Path) -> TokenizerFolder | None:
        return detect_clip_folder(path)

    @classmethod
    def _expected(cls) -> str:
        return "vocab.json + merges.txt or tokenizer.json with '</w>' word ends"

    @classmethod
    def _build(cls, root: Path, folder: TokenizerFolder) -> Tokenizer:
        vocab, merges = _read_vocab_merges(root)
        d = {**cls._defaults(), **folder.settings}
        bos, eos, unk, pad = (_token(d[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token"))
        backend = Tokenizer(
            BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk)
        )
        backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        _add_special(backend, [bos, eos, unk, pad])
        backend.post_processor = processors.RobertaProcessing(
            (eos, backend.token_to_id(eos)), (bos, backend.token_to_id(bos)), trim_offsets=False, add_prefix_space=False
        )
        return backend

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return super().decode(ids, skip_special_tokens).replace("</w>", " ").strip()


def detect_clip_folder(path: PathArg) -> TokenizerFolder | None:
    """A CLIP tokenizer folder: ``tokenizer_class`` CLIPTokenizer, or (without a class) a BPE whose
    vocabulary has ``</w>`` word ends and ``<|startoftext|>``."""
    found = _folder(path, "clip")
    if found is None:
        return None
    root, folder = found
    name = _class(folder.settings)
    if name is not None:
        ok = name == "CLIPTokenizer" and (folder.has("tokenizer.json") or {"vocab.json", "merges.txt"} <= set(folder.files))
        return folder if ok else None
    if folder.has("tokenizer.json"):
        model = _tokenizer_json_model(root)
        return folder if model.get("type") == "BPE" and model.get("end_of_word_suffix") == "</w>" else None
    if {"vocab.json", "merges.txt"} <= set(folder.files):
        vocab = _read_json(root / "vocab.json")
        return folder if isinstance(vocab, dict) and "<|startoftext|>" in vocab else None
    return None


# ---------------------------------------------------------------- T5 / umT5


class T5Tokenizer(TextTokenizer):
    """T5's SentencePiece Unigram (T5 v1.1, umT5): ``... </s>``, padded with ``<pad>``."""

    kind = "t5"

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        return {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

    @classmethod
    def _detect(cls, path: Path) -> TokenizerFolder | None:
        return detect_t5_folder(path)

    @classmethod
    def _expected(cls) -> str:
        return "tokenizer.json (Unigram) or spiece.model"

    @classmethod
    def _build(cls, root: Path, folder: TokenizerFolder) -> Tokenizer:
        """From ``spiece.model``, as transformers does: the pieces, then ``extra_ids`` sentinels
        (``<extra_id_99>`` ... ``<extra_id_0>``) as vocabulary, control pieces and sentinels special."""
        spm = read_sentencepiece_model(root / "spiece.model")
        if spm.model_type != UNIGRAM:
            raise LoadError(f"{root / 'spiece.model'}: a SentencePiece model of type {spm.model_type}, not Unigram (T5).")
        extra_ids = int(folder.settings.get("extra_ids", 100))
        vocab = [(piece, score) for piece, score, _ in spm.pieces]
        vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
        backend = Tokenizer(Unigram(vocab, unk_id=spm.unk_id, byte_fallback=False))
        if spm.precompiled_charsmap:
            backend.normalizer = normalizers.Precompiled(spm.precompiled_charsmap)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
        )
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        d = {**cls._defaults(), **folder.settings}
        specials = [_token(d[k]) for k in ("eos_token", "unk_token", "pad_token")]
        specials += [p for p, _, kind in spm.pieces if kind == CONTROL]
        specials += [f"<extra_id_{i}>" for i in range(extra_ids)]
        specials += [_token(t) for t in folder.settings.get("additional_special_tokens") or []]
        _add_special(backend, specials)
        user = [p for p, _, kind in spm.pieces if kind == USER_DEFINED]
        backend.add_tokens([AddedToken(p, normalized=False) for p in user])
        eos = _token(d["eos_token"])
        backend.post_processor = processors.TemplateProcessing(
            single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, backend.token_to_id(eos))]
        )
        return backend


def detect_t5_folder(path: PathArg) -> TokenizerFolder | None:
    """A T5/umT5 tokenizer folder: ``tokenizer_class`` T5Tokenizer, or (without a class)
    ``spiece.model`` or a Unigram ``tokenizer.json`` ending sequences with ``</s>``."""
    found = _folder(path, "t5")
    if found is None:
        return None
    root, folder = found
    name = _class(folder.settings)
    if name is not None:
        ok = name == "T5Tokenizer" and (folder.has("tokenizer.json") or folder.has("spiece.model"))
        return folder if ok else None
    if folder.has("tokenizer.json"):
        model = _tokenizer_json_model(root)
        vocab = model.get("vocab") or []
        ok = model.get("type") == "Unigram" and any(isinstance(v, list) and v and v[0] == "</s>" for v in vocab[:8])
        return folder if ok else None
    return folder if folder.has("spiece.model") else None


# ---------------------------------------------------------------- Qwen2

_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class Qwen2Tokenizer(TextTokenizer):
    """Qwen2's byte-level BPE (Qwen2.5-VL, Qwen-Image): no special tokens added; ``<|endoftext|>`` pads."""

    kind = "qwen2"

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        return {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 32768}

    @classmethod
    def _detect(cls, path: Path) -> TokenizerFolder | None:
        return detect_qwen2_folder(path)

    @classmethod
    def _expected(cls) -> str:
        return "vocab.json + merges.txt or tokenizer.json of a Qwen2 tokenizer"

    @classmethod
    def _build(cls, root: Path, folder: TokenizerFolder) -> Tokenizer:
        vocab, merges = _read_vocab_merges(root)
        backend = Tokenizer(
            BPE(vocab=vocab, merges=merges, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
        )
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        return backend


def detect_qwen2_folder(path: PathArg) -> TokenizerFolder | None:
    """A Qwen2 tokenizer folder: ``tokenizer_class`` Qwen2Tokenizer (Qwen2.5-VL, Qwen-Image)."""
    found = _folder(path, "qwen2")
    if found is None:
        return None
    _, folder = found
    ok = _class(folder.settings) == "Qwen2Tokenizer" and (
        folder.has("tokenizer.json") or {"vocab.json", "merges.txt"} <= set(folder.files)
    )
    return folder if ok else None

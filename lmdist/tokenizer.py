"""Tokenizers: byte, char, word (as in the lesson), byte-level BPE, or a HuggingFace tokenizer folder.

The end-of-document token follows each document's last row (a text file is one document read in
several rows; a json/csv/parquet row is a document of its own), so packed sequences see where
documents end and nowhere else. Line breaks are text: `byte`, `char` and `bpe` encode every character
as written; `word` keeps each line break as a symbol of its own and folds the other whitespace between
two words into the one space `decode` puts back. `char` and `word` build their vocabulary from the
training split only; `bpe` trains there too. All of them save to and load from a folder
(`<output_dir>/tokenizer/`), so a run's tokenizer travels with its weights.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np

from lmdist.errors import DataError
from lmdist.files import atomic_path, write_json

UNK, EOS = "<unk>", "<eos>"
META_FILE = "lmdist_tokenizer.json"
WORDS_AND_LINE_BREAKS = re.compile(r"\n|[^\s]+")


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus <eos> = 256: nothing to train, never an unknown symbol."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, folder: str) -> None:
        _write_meta(folder, {"kind": self.kind})

    def for_transformers(self):
        """The same ids as a `tokenizers` Tokenizer: every character falls back to its UTF-8 bytes, tokens
        <0x00>..<0xFF> with ids 0..255 (sentencepiece's byte fallback), and no merges."""
        from tokenizers import Tokenizer, decoders, models

        vocab = {f"<0x{byte:02X}>": byte for byte in range(256)} | {EOS: self.eos_id}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        return tok


class VocabTokenizer:
    """Characters (`char`) or words and line breaks (`word`) from a fixed vocabulary; the rest is <unk>."""

    def __init__(self, kind: str, symbols: list[str]):
        self.kind = kind
        self.symbols = [UNK, EOS] + symbols
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.vocab_size = len(self.symbols)
        self.eos_id = 1

    @classmethod
    def train(cls, kind: str, texts: Iterable[str], min_freq: int) -> VocabTokenizer:
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(_split(kind, text))
        # Most frequent first, ties by symbol: the same corpus always gives the same ids.
        symbols = sorted((s for s, c in counts.items() if c >= min_freq and s not in (UNK, EOS)),
                         key=lambda s: (-counts[s], s))
        return cls(kind, symbols)

    def encode(self, text: str) -> list[int]:
        index = self.index
        return [index.get(s, 0) for s in _split(self.kind, text)]

    def decode(self, ids: Iterable[int]) -> str:
        symbols = [self.symbols[i] for i in ids]
        if self.kind == "char":
            return "".join(symbols)
        text = []  # words: one space between two words, none beside a line break
        for previous, symbol in zip([None, *symbols], symbols, strict=False):
            if previous not in (None, "\n") and symbol != "\n":
                text.append(" ")
            text.append(symbol)
        return "".join(text)

    def save(self, folder: str) -> None:
        _write_meta(folder, {"kind": self.kind, "symbols": self.symbols[2:]})

    def for_transformers(self):
        """The same ids as a `tokenizers` Tokenizer. char: BPE without merges, one token per character, each
        unknown one <unk>. word: a word-level model over the same split (Python's whitespace spelt out,
        as the Rust regex's \\s is narrower); its decode puts a space beside line breaks too."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        if self.kind == "char":
            tok = Tokenizer(models.BPE(vocab=self.index, merges=[], unk_token=UNK, fuse_unk=False))
            tok.decoder = decoders.Fuse()
            return tok
        tok = Tokenizer(models.WordLevel(vocab=self.index, unk_token=UNK))
        whitespace = "".join(f"\\x{{{ord(c):x}}}" for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"\\n|[^{whitespace}]+"), behavior="removed", invert=True)
        return tok


class HFTokenizer:
    """A `tokenizers` tokenizer: byte-level BPE trained here (`bpe`), or one loaded from a folder."""

    def __init__(self, kind: str, tok, eos_token: str | None):
        self.kind = kind
        self.tok = tok
        self.eos_token = eos_token
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train_bpe(cls, texts: Iterator[str], vocab_size: int) -> HFTokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls("bpe", tok, EOS)

    @classmethod
    def from_folder(cls, folder: str, kind: str = "folder") -> HFTokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        return cls(kind, tok, _eos_token(folder, tok))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # the same ids without character offsets, which cost more than the encoding on long texts (tokenizers >= 0.21)
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with atomic_path(os.path.join(folder, "tokenizer.json")) as tmp:  # a full disk: a StorageError for every rank
            self.tok.save(tmp)
        _write_meta(folder, {"kind": self.kind, "eos_token": self.eos_token})

    def for_transformers(self):
        return self.tok


Tokenizer = ByteTokenizer | VocabTokenizer | HFTokenizer


def build_tokenizer(name: str, train_texts, vocab_size: int, min_freq: int) -> Tokenizer:
    """Make the tokenizer `name` (a TOKENIZER_NAMES entry or a folder), training on `train_texts` if it learns."""
    if name == "byte":
        return ByteTokenizer()
    if name in ("char", "word"):
        tok = VocabTokenizer.train(name, train_texts(), min_freq)
        if tok.vocab_size <= 2:
            raise DataError(f"--tokenizer {name}: no symbol occurs at least min_freq={min_freq} times in the "
                            "training data")
        return tok
    if name == "bpe":
        return HFTokenizer.train_bpe(train_texts(), vocab_size)
    return HFTokenizer.from_folder(name)


def load_tokenizer(folder: str) -> Tokenizer:
    """Load a tokenizer saved by `save()`."""
    try:
        with open(os.path.join(folder, META_FILE)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"no tokenizer saved in {folder} ({META_FILE} missing)") from None
    if meta["kind"] == "byte":
        return ByteTokenizer()
    if meta["kind"] in ("char", "word"):
        return VocabTokenizer(meta["kind"], meta["symbols"])
    return HFTokenizer.from_folder(folder, meta["kind"])


def save_for_transformers(tokenizer: Tokenizer, folder: str, model_max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json, for `AutoTokenizer.from_pretrained(folder)`: the same ids as
    `tokenizer.encode` for any text (with add_special_tokens=False where the tokenizer adds some), its end of
    text as eos_token, and lmdist's own tokenizer file beside them for lmdist."""
    tokenizer.save(folder)
    with atomic_path(os.path.join(folder, "tokenizer.json")) as tmp:
        tokenizer.for_transformers().save(tmp)
    ours = not isinstance(tokenizer, HFTokenizer)  # byte, char, word: lmdist reads "<eos>" in a text as 5 characters
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS if ours else tokenizer.eos_token,
        "bos_token": None, "pad_token": None, "unk_token": UNK if isinstance(tokenizer, VocabTokenizer) else None,
        "model_max_length": model_max_length, "clean_up_tokenization_spaces": False, "split_special_tokens": ours})


def encode_rows(tokenizer: Tokenizer, texts: list[str], ends: list[bool] | None = None) -> list[list[int]]:
    """Token ids of each row, followed by the end-of-document token where `ends` says the row ends its document
    (every row when None) and the tokenizer has one."""
    if isinstance(tokenizer, HFTokenizer):
        batch = tokenizer.encode_batch(texts)  # parallel, in Rust
    else:
        batch = [tokenizer.encode(t) for t in texts]
    if tokenizer.eos_id is not None:
        for ids, ends_document in zip(batch, ends or [True] * len(batch), strict=True):
            if ends_document:
                ids.append(tokenizer.eos_id)
    return batch


def encode_arrays(tokenizer: Tokenizer, texts: list[str] | list[str | bytes], ends: list[bool], dtype
                  ) -> list[np.ndarray]:
    """`encode_rows` as one array of `dtype` per row: the byte tokenizer without a Python int per byte, and of a
    row given as bytes (valid UTF-8, checked by the caller) without decoding and encoding it again."""
    if not isinstance(tokenizer, ByteTokenizer):
        return [np.asarray(ids, dtype=dtype) for ids in encode_rows(tokenizer, texts, ends)]
    arrays = []
    for text, ends_document in zip(texts, ends, strict=True):
        ids = np.frombuffer(text if isinstance(text, bytes) else text.encode("utf-8"), dtype=np.uint8).astype(dtype)
        arrays.append(np.append(ids, np.asarray(tokenizer.eos_id, dtype)) if ends_document else ids)
    return arrays


def _split(kind: str, text: str) -> Iterable[str]:
    return WORDS_AND_LINE_BREAKS.findall(text) if kind == "word" else text


def _write_meta(folder: str, meta: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, META_FILE), meta, indent=None)


def _eos_token(folder: str, tok) -> str | None:
    """The end-of-text token a HuggingFace folder declares (tokenizer_config.json), else a common one it has."""
    meta_path = os.path.join(folder, META_FILE)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return json.load(f).get("eos_token")
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            eos = json.load(f).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos:
            return eos
    for candidate in ("<|endoftext|>", "</s>", EOS):
        if tok.token_to_id(candidate) is not None:
            return candidate
    return None

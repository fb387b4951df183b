"""A run's token streams: its prepared token shards (lmdist.shards) opened as one training and one validation
stream -- a mixture's also per source -- with the tokenizer that made them and the fingerprint checkpoints keep.

    load_corpus(cfg, main_process_first, is_main)   a training launch's corpus: prepared by the main process when
                                                    there is none, then opened by every rank
    open_corpus(cfg, say, is_main)                  the same without the launch (`lmdist prepare`, `lmdist eval`)

A TokenStream reads memory-mapped shards as one sequence of ids: opening one costs a manifest and a few mmaps,
whatever the corpus's size. This module does not import torch (lmdist.data packs the streams into batches), so
`lmdist prepare` starts in a fraction of a second, not in the seconds torch takes to import.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from lmdist import mixture, shards
from lmdist.config import TrainConfig
from lmdist.errors import DataError
from lmdist.sources import CONTINUES, as_text, check_source, rows_per_batch, warn
from lmdist.tokenizer import Tokenizer, encode_arrays, load_tokenizer


@dataclass
class MixedSource:
    """One source of a mixture, tokenized: its part of the training and validation tokens."""

    source: mixture.Source
    train: TokenStream
    val: TokenStream


@dataclass
class Corpus:
    """The tokenized training and validation streams, and what produced them. A mixture's `train` and `val` are
    its sources' streams one after the other; `sources` holds each on its own."""

    train: TokenStream | None  # None when streaming
    val: TokenStream
    tokenizer: Tokenizer
    fingerprint: str
    source: dict
    prepared: list[str] = field(default_factory=list)  # the folders of the prepared token shards
    made_now: list[str] = field(default_factory=list)  # those of them this process prepared (not found prepared)
    sources: list[MixedSource] | None = None  # a mixture's sources

    def describe(self) -> str:
        """One line for the console: where the text came from, the tokenizer, the sizes, the fingerprint."""
        source = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in self.source.items())
        train = "streamed" if self.train is None else f"{self.train.n_tokens:,}"
        return (f"{source}; tokenizer {self.tokenizer.kind} (vocab {self.tokenizer.vocab_size}); "
                f"{train} train / {self.val.n_tokens:,} val tokens; fingerprint {self.fingerprint}"
                + (f"; tokens in {', '.join(self.prepared)}" if self.prepared else ""))


def load_corpus(cfg: TrainConfig, main_process_first: Callable[[Callable], object], is_main: bool,
                reuse_tokenizer: bool = False) -> Corpus:
    """The prepared token shards of the data (lmdist.shards), prepared now by the main process when there are none,
    then opened by the others.

    With `reuse_tokenizer` (a resumed run) every rank tokenizes with the tokenizer saved in output_dir. Warnings
    about the data (bytes that are not UTF-8, rows without text, files left out) come from the main process only.
    """
    for spec in data_specs(cfg):
        check_source(spec)  # on every rank, before any collective: a bad path fails everywhere at once
    quiet_progress_bars(is_main)
    say = warn if is_main else _silent
    tokenizer_dir = os.path.join(cfg.output_dir, "tokenizer")
    saved = load_tokenizer(tokenizer_dir) if reuse_tokenizer and os.path.exists(
        os.path.join(tokenizer_dir, "lmdist_tokenizer.json")) else None

    def build() -> Corpus:
        corpus = open_corpus(cfg, say, is_main, saved)
        if is_main and saved is None:
            corpus.tokenizer.save(tokenizer_dir)
        return corpus

    return main_process_first(build)


def data_specs(cfg: TrainConfig) -> list[str]:
    """Every dataset spec the run reads."""
    if cfg.mixture:
        return [source.dataset for source in mixture.parse_mixture(cfg.mixture)]
    return list(filter(None, (cfg.dataset, cfg.val_dataset)))


def open_corpus(cfg: TrainConfig, say: Callable[[str], None], is_main: bool, tokenizer: Tokenizer | None = None
                ) -> Corpus:
    """The corpus of `cfg`, prepared first where it is not (`lmdist prepare` stops here)."""
    if cfg.mixture:
        return _open_mixture(cfg, say, is_main, tokenizer)
    prepared = shards.prepare(cfg, say, is_main, tokenizer=tokenizer, with_train=not cfg.streaming)
    train = TokenStream(prepared.streams["train"]) if "train" in prepared.streams else None
    val = TokenStream(prepared.streams["val"])
    _check_sizes(cfg.dataset, train, val)
    if prepared.tokenizer.eos_id is None:
        say(missing_eos_warning(cfg.tokenizer, prepared.tokenizer))
    source = prepared.manifest["source"]
    return Corpus(train, val, prepared.tokenizer, _fingerprint(source, prepared.tokenizer, train, val), source,
                  [prepared.path], [prepared.path] if prepared.made_now else [])


def _open_mixture(cfg: TrainConfig, say: Callable[[str], None], is_main: bool, tokenizer: Tokenizer | None) -> Corpus:
    sources = mixture.parse_mixture(cfg.mixture)
    configs = [mixture_source_config(cfg, source) for source in sources]
    if tokenizer is None:
        tokenizer = shards.mixture_tokenizer(cfg, configs, [s.weight for s in sources], say, is_main)
    parts, folders, made_now, digest = [], [], [], hashlib.sha256()
    for source, source_cfg in zip(sources, configs, strict=True):
        prepared = shards.prepare(source_cfg, say, is_main, tokenizer=tokenizer)
        tokenizer = prepared.tokenizer  # byte or a folder: the same for every source
        train, val = TokenStream(prepared.streams["train"]), TokenStream(prepared.streams["val"])
        _check_sizes(source.dataset, train, val)
        parts.append(MixedSource(source, train, val))
        folders.append(prepared.path)
        if prepared.made_now:
            made_now.append(prepared.path)
        fingerprint = _fingerprint(prepared.manifest["source"], tokenizer, train, val)
        digest.update(f"{source.name}:{source.weight!r}:{fingerprint};".encode())
    if tokenizer.eos_id is None:
        say(missing_eos_warning(cfg.tokenizer, tokenizer))
    train = TokenStream([p for part in parts for p in part.train.parts])
    val = TokenStream([p for part in parts for p in part.val.parts])
    source = {"mixture": cfg.mixture, "sources": ", ".join(f"{s.name} ({s.dataset}, weight {s.weight:g})"
                                                           for s in sources)}
    return Corpus(train, val, tokenizer, digest.hexdigest()[:16], source, folders, made_now, parts)


def mixture_source_config(cfg: TrainConfig, source: mixture.Source) -> TrainConfig:
    """The config that prepares one source of a mixture: the run's, with the source's dataset and columns."""
    return replace(cfg, mixture=None, dataset=source.dataset, val_dataset=None,
                   text_column=source.text_column or cfg.text_column,
                   dataset_config=source.dataset_config or cfg.dataset_config)


def _check_sizes(name: str, train: TokenStream | None, val: TokenStream) -> None:
    for split, stream in (("training", train), ("validation", val)):
        if stream is not None and stream.n_tokens < 2:
            raise DataError(f"the {split} split of {name!r} has {stream.n_tokens} tokens: not enough text")


def _silent(message: str) -> None:
    """What a rank other than the main one says about the data: nothing, the main process said it."""


def missing_eos_warning(name: str, tokenizer: Tokenizer) -> str:
    declared = getattr(tokenizer, "eos_token", None)
    why = (f"declares the end-of-text token {declared!r}, which is not in its vocabulary" if declared
           else "has no end-of-text token")
    return (f"warning: the tokenizer {name} {why}: documents run together in training, with nothing to mark "
            "where one ends. Add one: set \"eos_token\" in its tokenizer_config.json to a token of its "
            "vocabulary (e.g. \"<|endoftext|>\" or \"</s>\"; tokenizers' `add_special_tokens` adds a new one)")


def quiet_progress_bars(is_main: bool) -> None:
    """datasets' progress bars: one, on rank zero's terminal; none (no carriage returns) in logs. Through its
    documented variable when datasets is not imported yet: importing it costs a second that text files never need."""
    if is_main and sys.stderr.isatty():
        return
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def tokenize(rows, tokenizer: Tokenizer, column: str) -> TokenStream:
    """`rows` tokenized in memory (`lmdist eval` on another dataset; training reads prepared shards): the
    end-of-text token after each document's last row."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    parts = []
    for batch in rows.iter(batch_size=rows_per_batch(rows)):
        continues = batch.get(CONTINUES) or [False] * len(batch[column])
        texts, ends = [], []
        for value, goes_on in zip(batch[column], continues, strict=True):
            text = as_text(value)
            if text:  # a row without text has nothing to predict (check_text counted it)
                texts.append(text)
                ends.append(not goes_on)
        parts += encode_arrays(tokenizer, texts, ends, dtype)
    return TokenStream(parts)


class TokenStream:
    """Token ids held in parts (memory-mapped shards, or arrays) read as one stream."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.n_tokens = int(self.starts[-1])

    def slice(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), clipped at the end of the stream."""
        stop = min(start + length, self.n_tokens)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            part, offset = self.parts[first], start - self.starts[first]
            piece = part[offset: offset + (stop - start)]
            pieces.append(piece)
            start += len(piece)
            first += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def windows(self, starts: np.ndarray, length: int, last_start: int | None = None) -> np.ndarray:
        """Rows of `length` tokens from each start (int64), -1 past the end of the stream: one gather per
        Arrow chunk, a `slice` only for the rare row that straddles two chunks. `last_start`: the largest
        start when the caller knows it (training asks for a batch every step, and a numpy reduction costs
        tens of microseconds there)."""
        last_start = int(starts.max()) if last_start is None else last_start
        if len(self.parts) == 1 and last_start + length <= self.n_tokens:  # the common case: one gather
            return self.parts[0][starts[:, None] + np.arange(length)].astype(np.int64)
        rows = np.full((len(starts), length), -1, dtype=np.int64)
        part = np.searchsorted(self.starts, starts, side="right") - 1
        inside = starts + length <= self.starts[np.minimum(part + 1, len(self.parts))]
        for p in np.unique(part[inside]):
            chosen = np.flatnonzero(inside & (part == p))
            rows[chosen] = self.parts[p][starts[chosen, None] - self.starts[p] + np.arange(length)]
        for row in np.flatnonzero(~inside & (starts < self.n_tokens)):
            chunk = self.slice(int(starts[row]), length)
            rows[row, : len(chunk)] = chunk
        return rows

    def sample(self, n: int = 4096) -> np.ndarray:
        return np.concatenate([self.slice(0, n), self.slice(max(0, self.n_tokens - n), n)])


def _fingerprint(source: dict, tokenizer: Tokenizer, train: TokenStream | None, val: TokenStream) -> str:
    """Identifies data + tokenizer: the source, the vocabulary, the token counts and the streams' ends."""
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode())
    streams = [s for s in (train, val) if s is not None]
    digest.update(f"{tokenizer.kind}:{tokenizer.vocab_size}:{[s.n_tokens for s in streams]}".encode())
    for stream in streams:
        digest.update(stream.sample().astype(np.int64).tobytes())
    return digest.hexdigest()[:16]

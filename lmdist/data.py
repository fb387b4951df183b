"""Tokens in, batches out: open the prepared token shards, pack them into sequences, sample batches.

The shards come from lmdist.shards (tokenized once, content-addressed, memory-mapped), their text from
lmdist.sources. The end-of-text token follows each document's last row.

Packing keeps the whole token stream: sequence i is tokens[i*T : i*T + T + 1], its first T tokens
the input and its last T the targets (the lesson's batchify). Consecutive sequences share one token,
so every token after the first is a target exactly once. The stream is read straight out of the
memory-mapped shards, so a corpus larger than RAM works.

Batches are drawn the way one big process would draw them: one seeded permutation per epoch (lmdist.order's
Feistel bijection, computed a chunk of positions at a time: constant memory whatever the corpus, and a resumed
epoch starts at its position), cut into global batches of world_size * batch_size sequences, of which each
rank takes its contiguous slice. So 2 ranks x batch b see exactly the batches of 1 process x batch 2b.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from lmdist import mixture, order, shards, stopping
from lmdist.config import TrainConfig
from lmdist.errors import DataError
from lmdist.order import ORDER
from lmdist.sources import CONTINUES, as_text, check_source, rows_per_batch, warn
from lmdist.tokenizer import Tokenizer, encode_arrays, load_tokenizer

IGNORE_INDEX = -100  # target value for padding: no loss, no accuracy, not counted


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
                  [prepared.path])


def _open_mixture(cfg: TrainConfig, say: Callable[[str], None], is_main: bool, tokenizer: Tokenizer | None) -> Corpus:
    sources = mixture.parse_mixture(cfg.mixture)
    configs = [mixture_source_config(cfg, source) for source in sources]
    if tokenizer is None:
        tokenizer = shards.mixture_tokenizer(cfg, configs, [s.weight for s in sources], say, is_main)
    parts, folders, digest = [], [], hashlib.sha256()
    for source, source_cfg in zip(sources, configs, strict=True):
        prepared = shards.prepare(source_cfg, say, is_main, tokenizer=tokenizer)
        tokenizer = prepared.tokenizer  # byte or a folder: the same for every source
        train, val = TokenStream(prepared.streams["train"]), TokenStream(prepared.streams["val"])
        _check_sizes(source.dataset, train, val)
        parts.append(MixedSource(source, train, val))
        folders.append(prepared.path)
        fingerprint = _fingerprint(prepared.manifest["source"], tokenizer, train, val)
        digest.update(f"{source.name}:{source.weight!r}:{fingerprint};".encode())
    if tokenizer.eos_id is None:
        say(missing_eos_warning(cfg.tokenizer, tokenizer))
    train = TokenStream([p for part in parts for p in part.train.parts])
    val = TokenStream([p for part in parts for p in part.val.parts])
    source = {"mixture": cfg.mixture, "sources": ", ".join(f"{s.name} ({s.dataset}, weight {s.weight:g})"
                                                           for s in sources)}
    return Corpus(train, val, tokenizer, digest.hexdigest()[:16], source, folders, parts)


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
    """datasets' progress bars: one, on rank zero's terminal; none (no carriage returns) in logs."""
    import datasets

    if not (is_main and sys.stderr.isatty()):
        datasets.disable_progress_bars()


# ----------------------------------------------------------------------------- tokenizing and packing

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


class PackedSequences(Dataset):
    """Sequences of `block_size` (input, target) pairs cut from a token stream.

    With `keep_partial` the last, shorter sequence is kept and its missing targets are IGNORE_INDEX
    (validation: every token counts once). An index >= len() returns an all-ignored pad sequence,
    which the evaluation sampler uses to give every rank the same number of batches.
    """

    def __init__(self, stream: TokenStream, block_size: int, keep_partial: bool):
        self.stream, self.block_size = stream, block_size
        n_targets = stream.n_tokens - 1
        self.n_whole = n_targets // block_size
        self.n = self.n_whole + (1 if keep_partial and n_targets % block_size else 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = inputs_and_targets(*self.__getitems__([i]))
        return inputs[0], targets[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, bool]:
        """Sequences `indices` as rows of block_size + 1 tokens (-1 past the end of the stream), and whether
        all of them are whole; `inputs_and_targets` cuts them apart. One gather for the lot: the
        DataLoader calls this with a batch's indices, and a tensor per sequence costs far more."""
        T, index, last = self.block_size, np.asarray(indices, dtype=np.int64), max(indices)
        if last < self.n_whole:
            return torch.from_numpy(self.stream.windows(index * T, T + 1, last_start=last * T)), True
        # a partial or padding sequence (evaluation); a padding index starts past the end of the stream: all -1
        return torch.from_numpy(self.stream.windows(np.where(index < self.n, index * T, self.stream.n_tokens),
                                                    T + 1)), False


def inputs_and_targets(rows: torch.Tensor, whole: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of rows of block_size + 1 tokens: views of the rows when every sequence is whole,
    else with a missing target set to IGNORE_INDEX (and its input to 0)."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    if whole:
        return inputs, targets
    missing = targets < 0
    return inputs.masked_fill(missing, 0), targets.masked_fill(missing, IGNORE_INDEX)


class EpochPermutation(Sampler[int]):
    """The first `num_samples` indices of a permutation of range(n) seeded by (seed, epoch): the lmdist.order
    `data_order` -- ORDER, in constant memory; ORDER_LEGACY only to continue a checkpoint trained with it.

    The permutation depends only on the seed and the epoch -- not on the world size or on how many
    epochs ran in this process -- so any rank, any launch and any resume draws the same order.
    """

    def __init__(self, n: int, num_samples: int, seed: int, global_batch: int, data_order: str = ORDER):
        self.n, self.num_samples, self.seed, self.global_batch = n, num_samples, seed, global_batch
        self.data_order, self.epoch, self.skip = data_order, 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Draw `epoch`'s order, leaving out its first `skip_batches` global batches (a resumed run's)."""
        self.epoch, self.skip = epoch, skip_batches * self.global_batch

    def __iter__(self) -> Iterator[int]:
        for chunk in order.chunks(self.data_order, self.n, self.seed, self.epoch, self.skip, self.num_samples):
            yield from chunk.tolist()

    def __len__(self) -> int:
        return self.num_samples - self.skip


class PaddedRange(Sampler[int]):
    """range(n), then pad indices (== n) up to a multiple of `multiple`; only the first `limit` when set."""

    def __init__(self, n: int, multiple: int, limit: int = 0):
        self.n, self.padded = n, -(-n // multiple) * multiple
        self.total = min(self.padded, limit) if limit else self.padded

    def __iter__(self) -> Iterator[int]:
        real = min(self.n, self.total)
        yield from range(real)
        yield from itertools.repeat(self.n, self.total - real)

    def __len__(self) -> int:
        return self.total


class BatchLoader:
    """This rank's share of every global batch of `batch_sampler`, on the accelerator's device.

    The global batches are the same on every rank and at any world size; rank r takes their rows
    [r*b, (r+1)*b) (Accelerate's `split_batches`). Reading a batch costs tens of microseconds of Python and
    numpy whatever its size -- about 1% of a small model's step (LSTM S) -- so consecutive batches are read
    together with one gather (in worker processes with `num_workers`), copied to the device at once and
    handed out as views. A checkpoint records how many batches were trained on, so reading ahead never
    shifts a resume; the samplers run in this process, so resume positions stay exact.

    Not an Accelerate-prepared loader: that reads and places every batch on its own. What else it offers --
    sharding, ending gradient accumulation with the epoch, seeding -- the samplers here already do.
    """

    def __init__(self, sequences: PackedSequences, batch_sampler: BatchSampler, accelerator, num_workers: int = 0):
        self.batch_sampler, self.device = batch_sampler, accelerator.device
        self.batch_size = batch_sampler.batch_size // accelerator.num_processes
        batch_bytes = self.batch_size * (sequences.block_size + 1) * 8
        ahead = max(1, min(READ_AHEAD_BATCHES, READ_AHEAD_BYTES // batch_bytes))
        reads = _ReadAheadIndices(batch_sampler, accelerator.process_index, self.batch_size, ahead)
        # pinned host memory lets the copy to a GPU overlap compute
        self.loader = DataLoader(sequences, batch_sampler=reads, collate_fn=_already_read, num_workers=num_workers,
                                 persistent_workers=num_workers > 0, pin_memory=self.device.type == "cuda",
                                 generator=_private_generator(), worker_init_fn=_leave_stop_signals_to_the_trainer)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Begin `epoch`'s shuffle, leaving out its first `skip_batches` global batches (a resumed epoch)."""
        self.batch_sampler.sampler.set_epoch(epoch, skip_batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for rows, whole in self.loader:
            inputs, targets = inputs_and_targets(rows.to(self.device, non_blocking=True), whole)
            for start in range(0, len(inputs), self.batch_size):
                yield inputs[start: start + self.batch_size], targets[start: start + self.batch_size]

    def __len__(self) -> int:
        return len(self.batch_sampler)


READ_AHEAD_BATCHES, READ_AHEAD_BYTES = 16, 8 << 20  # a read: at most 16 batches and 8 MiB


class _ReadAheadIndices(Sampler[list[int]]):
    """The sequence indices of each read: this rank's rows of `ahead` consecutive global batches."""

    def __init__(self, batch_sampler: BatchSampler, rank: int, batch_size: int, ahead: int):
        self.batch_sampler, self.ahead = batch_sampler, ahead
        self.mine = slice(rank * batch_size, (rank + 1) * batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        read = []
        for n, batch in enumerate(self.batch_sampler, 1):
            read += batch[self.mine]
            if n % self.ahead == 0:
                yield read
                read = []
        if read:
            yield read

    def __len__(self) -> int:
        return -(-len(self.batch_sampler) // self.ahead)


def train_loader(sequences: PackedSequences, batch_size: int, grad_accum: int, seed: int, accelerator,
                 num_workers: int = 0, data_order: str = ORDER) -> BatchLoader:
    """Global batches in `data_order` (lmdist.order); each epoch's remainder that cannot fill an optimizer step
    is dropped."""
    global_batch = batch_size * accelerator.num_processes
    micro_batches = len(sequences) // global_batch // grad_accum * grad_accum
    sampler = EpochPermutation(len(sequences), micro_batches * global_batch, seed, global_batch, data_order)
    return BatchLoader(sequences, BatchSampler(sampler, global_batch, drop_last=True), accelerator, num_workers)


def mixture_train_loader(sequences: mixture.MixedSequences, sources: list[mixture.Source], batch_size: int,
                         grad_accum: int, seed: int, accelerator, num_workers: int = 0) -> BatchLoader:
    """A mixture's global batches (lmdist.mixture's order); an epoch is as many whole optimizer steps as all its
    sources' sequences fill."""
    global_batch = batch_size * accelerator.num_processes
    mixture.check_batch(sources, global_batch)
    micro_batches = len(sequences) // global_batch // grad_accum * grad_accum
    sampler = mixture.MixtureOrder(sequences, sources, seed, global_batch, micro_batches)
    return BatchLoader(sequences, BatchSampler(sampler, global_batch, drop_last=True), accelerator, num_workers)


def eval_loader(sequences: PackedSequences, batch_size: int, accelerator, max_batches: int = 0,
                num_workers: int = 0) -> BatchLoader:
    """Every sequence once, in order (the first `max_batches` global batches when set); padded so that
    every rank gets the same number of full batches."""
    global_batch = batch_size * accelerator.num_processes
    sampler = PaddedRange(len(sequences), global_batch, max_batches * global_batch)
    return BatchLoader(sequences, BatchSampler(sampler, global_batch, drop_last=False), accelerator, num_workers)


def _already_read(read: tuple[torch.Tensor, bool]) -> tuple[torch.Tensor, bool]:
    """`PackedSequences.__getitems__` returns the read's rows in one tensor: nothing left to collate."""
    return read


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Loader workers ignore the stop signals. scancel, a Slurm preemption or a Ctrl-C signals every process
    of the job, and a torch worker dies of a SIGTERM its parent did not send: the trainer would then fail with
    "DataLoader worker is killed" instead of saving a checkpoint. It takes the signal and ends its workers."""
    for sig in stopping.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _private_generator() -> torch.Generator:
    """Every new DataLoader iterator draws a seed from this; without it, it draws from the global RNG that
    dropout uses, and a resumed run (which starts one more iterator) would drift from the uninterrupted one."""
    return torch.Generator().manual_seed(0)


def _fingerprint(source: dict, tokenizer: Tokenizer, train: TokenStream | None, val: TokenStream) -> str:
    """Identifies data + tokenizer: the source, the vocabulary, the token counts and the streams' ends."""
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode())
    streams = [s for s in (train, val) if s is not None]
    digest.update(f"{tokenizer.kind}:{tokenizer.vocab_size}:{[s.n_tokens for s in streams]}".encode())
    for stream in streams:
        digest.update(stream.sample().astype(np.int64).tobytes())
    return digest.hexdigest()[:16]

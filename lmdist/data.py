"""Tokens in, batches out: pack a run's token streams (lmdist.token_streams) into sequences, sample batches.

Packing keeps the whole token stream: sequence i is tokens[i*T : i*T + T + 1], its first T tokens
the input and its last T the targets (the lesson's batchify). Consecutive sequences share one token,
so every token after the first is a target exactly once. The stream is read straight out of the
memory-mapped shards, so a corpus larger than RAM works.

Batches are drawn the way one big process would draw them: one seeded permutation per epoch (lmdist.order's
Feistel bijection, computed a chunk of positions at a time: constant memory whatever the corpus, and a resumed
epoch starts at its position), cut into global batches of world_size * batch_size sequences, of which each
rank takes its contiguous slice. So 2 ranks x batch b see exactly the batches of 1 process x batch 2b.
A mixture's batches follow lmdist.mixture's order instead, over its sources' sequences as one index space.
"""
from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from lmdist import mixture, order, stopping
from lmdist.order import ORDER
from lmdist.token_streams import TokenStream

IGNORE_INDEX = -100  # target value for padding: no loss, no accuracy, not counted


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


class MixedSequences(Dataset):
    """The sources' PackedSequences as one index space: source i's sequence j is index offsets[i] + j."""

    def __init__(self, parts: list):
        self.parts = parts
        self.sizes = np.array([len(p) for p in parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.block_size = parts[0].block_size

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, bool]:
        index = np.asarray(indices, dtype=np.int64)
        source = np.searchsorted(self.offsets, index, side="right") - 1
        rows = torch.empty((len(index), self.block_size + 1), dtype=torch.int64)
        whole = True
        for i in np.unique(source):
            chosen = np.flatnonzero(source == i)
            part_rows, part_whole = self.parts[i].__getitems__((index[chosen] - self.offsets[i]).tolist())
            rows[torch.from_numpy(chosen)] = part_rows
            whole = whole and part_whole
        return rows, whole


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


def mixture_train_loader(sequences: MixedSequences, sources: list[mixture.Source], batch_size: int,
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

"""Training data as a stream, for corpora too large for local disk (`--streaming true`).

The source is a HuggingFace `IterableDataset` (hub dataset, local files, or a saved dataset), split
across ranks with `split_dataset_by_node` -- whole shards per rank when the shard count allows, else
every world_size-th row -- so no row is read by two ranks. Rows are tokenized and packed on the fly into
the same overlapping block_size sequences as the map-style path, and the stream repeats (a new pass,
`set_epoch`) until max_steps. Text files are read as in the map-style path (lmdist.sources): one document
per file, in pieces, line breaks kept, the end-of-text token after the file's last piece only; each
file is a shard.

Its position is part of the checkpoint: the source's own `state_dict()` (which resumes without
replaying the stream where the source supports it: files skip to their shard and offset) plus the tokens
packed but not yet used. Streams are read in order: shuffle shards or rows before streaming them.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from lmdist.config import TrainConfig
from lmdist.errors import ConfigError, DataError
from lmdist.sources import (
    BAD_BYTES,
    CONTINUES,
    FILE,
    SAVED,
    TEXT,
    LocalFiles,
    as_text,
    locate,
    table_builder_options,
    text_features,
    text_rows,
    warn,
)
from lmdist.tokenizer import Tokenizer, encode_rows


def check_streaming_config(cfg: TrainConfig) -> None:
    """What streaming needs, checked before any data work."""
    if not cfg.streaming:
        return
    if cfg.max_steps is None:
        raise ConfigError("--streaming true: a stream has no known length; set --max_steps")
    if not cfg.val_dataset:
        raise ConfigError("--streaming true: set --val_dataset (validation is read in full, not streamed)")
    if cfg.tokenizer in ("char", "word", "bpe"):
        raise ConfigError(f"--streaming true: --tokenizer {cfg.tokenizer} learns its vocabulary from the whole "
                          "training split; use byte or a trained tokenizer folder")


def open_stream(cfg: TrainConfig, rank: int, world_size: int):
    """This rank's part of the training source, as a HuggingFace IterableDataset."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    spec = cfg.dataset
    found = locate(spec)
    if found == SAVED:
        saved = datasets.load_from_disk(spec)
        saved = saved["train"] if isinstance(saved, datasets.DatasetDict) else saved
        stream = saved.to_iterable_dataset(num_shards=max(world_size, min(64, saved.num_rows)))
    elif isinstance(found, LocalFiles):
        if found.kind == TEXT:  # a list in gen_kwargs makes each file a shard
            stream = datasets.IterableDataset.from_generator(
                text_rows, features=text_features(cfg.text_column),
                gen_kwargs={"parts": [(f, 0, os.path.getsize(f)) for f in found.files], "column": cfg.text_column})
        else:
            stream = datasets.load_dataset(found.kind, data_files={"train": found.files}, split="train",
                                           streaming=True, **table_builder_options(found.kind, cfg.text_column))
    else:
        try:
            stream = datasets.load_dataset(spec, cfg.dataset_config, split="train", streaming=True)
        except Exception as e:  # noqa: BLE001 -- the hub client raises many types
            raise DataError(f"could not stream the hub dataset {spec!r}: {type(e).__name__}: {e}") from None
    if cfg.text_column not in (stream.column_names or [cfg.text_column]):
        raise DataError(f"{spec!r} has no column {cfg.text_column!r} (columns: {stream.column_names}); "
                        "set --text_column")
    return split_dataset_by_node(stream, rank=rank, world_size=world_size)


class StreamedSequences(IterableDataset):
    """(input, target) pairs of block_size tokens packed on the fly from a row stream, with a resumable state."""

    def __init__(self, rows, tokenizer: Tokenizer, column: str, block_size: int):
        self.rows, self.tokenizer, self.column, self.block_size = rows, tokenizer, column, block_size
        self.passes, self.carry = 0, []  # completed passes over the stream; tokens packed but not yet used
        self._resume_rows_state = None
        self._files_with_bad_bytes: set[str] = set()  # each named once, by the rank that reads it

    def state(self) -> dict:
        """Where the stream is, after the last sequence handed out."""
        return {"passes": self.passes, "rows": self.rows.state_dict(), "carry": torch.tensor(self.carry)}

    def load_state(self, state: dict) -> None:
        self.passes, self.carry = int(state["passes"]), state["carry"].tolist()
        self._resume_rows_state = state["rows"]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        T = self.block_size
        while True:
            self.rows.set_epoch(self.passes)
            if self._resume_rows_state is not None:
                self.rows.load_state_dict(self._resume_rows_state)
                self._resume_rows_state = None
            for row in self.rows:
                text = as_text(row[self.column])
                if not text:  # a row without text has nothing to predict
                    continue
                if row.get(BAD_BYTES) and row[FILE] not in self._files_with_bad_bytes:
                    self._files_with_bad_bytes.add(row[FILE])
                    warn(f"warning: {row[FILE]} holds bytes that are not UTF-8 ({row[BAD_BYTES]} in its piece at "
                         "this point of the stream): they are read as U+FFFD; convert it to UTF-8 (e.g. `iconv -f "
                         "latin1 -t utf-8`) to keep those characters")
                self.carry.extend(encode_rows(self.tokenizer, [text], [not row.get(CONTINUES, False)])[0])
                while len(self.carry) > T:
                    chunk = torch.tensor(self.carry[: T + 1])
                    self.carry = self.carry[T:]  # the next sequence starts at this one's last target
                    yield chunk[:-1], chunk[1:]
            self.passes += 1


class StreamLoader:
    """Batches of this rank's stream, on the training device.

    Not an Accelerate-prepared loader: its look-ahead would read one batch past the position a checkpoint
    records.
    """

    def __init__(self, sequences: StreamedSequences, batch_size: int, device: torch.device):
        self.dataset, self.device = sequences, device
        self.loader = DataLoader(sequences, batch_size=batch_size, num_workers=0, pin_memory=device.type == "cuda")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for inputs, targets in self.loader:
            yield inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

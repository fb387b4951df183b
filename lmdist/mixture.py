"""Weighted mixtures of data sources (`--mixture`): what they are, and the order their sequences are drawn in.

    --mixture mix.yaml                    a YAML list of {dataset, weight, name, text_column, dataset_config}
    --mixture "wiki.txt:3,code/:1"        inline: SPEC:WEIGHT, comma-separated

Each source is prepared on its own (lmdist.shards, one tokenizer for all) with its own validation split (its
`validation` split or tail, as a lone dataset's), and evaluated on its own: `val/<name>/loss`, beside `val/loss`
over every source's validation tokens.

The order's contract. Weights are normalised to shares w_i. Global batch g (B sequences, counted from the
start of the run: g = epoch * batches_per_epoch + batch) holds c_i(g) = C_i(g+1) - C_i(g) sequences of source
i, where C_i(g) = floor(w_i * B * g) for every source but the one of largest share, which takes the rest (never
negative: `check_batch` refuses a global batch too small for that). So every prefix of batches holds each
source's share to within one sequence, and a batch's contents depend on g alone: any resume is exact, on any
number of processes. Source i's k-th drawn sequence is its sequence FeistelOrder(n_i, seed_i, k // n_i).at(k %
n_i): each source passes through its own sequences in a fresh order each time round, independently of the
others (a small heavy source repeats sooner: the plan line shows passes per epoch). Within a batch the sources'
slots are interleaved evenly, so every rank's slice holds every source. An "epoch" of a mixture is as many
batches as all its sources hold sequences together.
"""
from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lmdist.errors import ConfigError
from lmdist.order import FeistelOrder


@dataclass(frozen=True)
class Source:
    name: str
    dataset: str
    weight: float
    text_column: str | None = None  # default: the run's
    dataset_config: str | None = None


SOURCE_KEYS = {"dataset", "weight", "name", "text_column", "dataset_config"}


def parse_mixture(value: str) -> list[Source]:
    """The sources `--mixture` names: a YAML file's list, or inline SPEC:WEIGHT items; a ConfigError says what is
    wrong and how to write it."""
    if value.endswith((".yaml", ".yml")):
        entries = _read_entries(value)
    else:
        entries = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            spec, colon, weight = item.rpartition(":")
            if not colon or not spec:
                raise ConfigError(f"--mixture item {item!r} has no weight: write SPEC:WEIGHT, e.g. "
                                  "\"wiki.txt:3,code/:1\" (or a YAML file of {dataset, weight} entries)")
            entries.append({"dataset": spec, "weight": weight})
    sources = []
    for entry in entries:
        try:
            weight = float(entry["weight"])
        except (TypeError, ValueError):
            raise ConfigError(f"--mixture: the weight of {entry['dataset']!r} is {entry['weight']!r}, not a "
                              "number") from None
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"--mixture: the weight of {entry['dataset']!r} must be a positive number, "
                              f"not {entry['weight']!r}")
        name = str(entry.get("name") or default_name(str(entry["dataset"])))
        sources.append(Source(name, str(entry["dataset"]), weight, entry.get("text_column"),
                              entry.get("dataset_config")))
    if len(sources) < 2:
        raise ConfigError("--mixture needs two sources or more; for one, use --dataset")
    names = [s.name for s in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--mixture: two sources are named {', '.join(twice)}: give each a `name` in a YAML "
                          "mixture file")
    bad = [n for n in names if not n.replace("-", "").replace("_", "").replace(".", "").isalnum()]
    if bad:
        raise ConfigError(f"--mixture: source name(s) {', '.join(map(repr, bad))} must be letters, digits, '-', "
                          "'_' or '.' (they name metrics: val/<name>/loss); give a `name` in a YAML mixture file")
    return sources


def _read_entries(path: str) -> list[dict]:
    import yaml

    try:
        with open(path) as f:
            entries = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--mixture {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--mixture {path} is not valid YAML: {e}") from None
    example = "[{dataset: wiki.txt, weight: 3}, {dataset: code/, weight: 1, name: code}]"
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"--mixture {path} must be a YAML list of sources, e.g. {example}")
    for number, entry in enumerate(entries, 1):
        problems = [f"no {key}" for key in ("dataset", "weight") if key not in entry]
        for key in sorted(set(entry) - SOURCE_KEYS, key=str):
            close = difflib.get_close_matches(str(key), SOURCE_KEYS, n=1)
            problems.append(f"unknown key {key!r}" + (f" (did you mean {close[0]}?)" if close else ""))
        if problems:
            raise ConfigError(f"--mixture {path}: source {number} ({entry.get('dataset', 'no dataset')}) has "
                              f"{', '.join(problems)}: each source needs `dataset` and `weight` (and may have "
                              f"{', '.join(sorted(SOURCE_KEYS - {'dataset', 'weight'}))}), e.g. {example}")
    return entries


def default_name(spec: str) -> str:
    """A source's name from its spec: the file or folder name without an extension ("wiki.txt" -> "wiki"), where
    what follows the last dot is one ("Apache-2.0" and "v1.2" keep theirs)."""
    base = os.path.basename(spec.rstrip("/").replace("*", "")) or spec
    stem, extension = os.path.splitext(base)
    return (stem if extension[1:].isalpha() else base).replace(" ", "_") or "source"


def shares(sources: list[Source]) -> np.ndarray:
    weights = np.array([s.weight for s in sources], dtype=np.float64)
    return weights / weights.sum()


def check_batch(sources: list[Source], global_batch: int) -> None:
    """The largest source takes what the others' floors leave: that must not go below zero."""
    w = shares(sources)
    if global_batch * w.max() < len(sources) - 1:
        raise ConfigError(f"--mixture of {len(sources)} sources needs a global batch of at least "
                          f"{math.ceil((len(sources) - 1) / w.max())} sequences (now {global_batch}): raise "
                          "batch_size or use fewer sources")


class MixtureOrder:
    """The mixture's global batches (the module's contract), as indices of the sources' sequences in one index
    space (lmdist.data.MixedSequences: source i's sequence j is offsets[i] + j), batch after batch: a sampler."""

    def __init__(self, sequences, sources: list[Source], seed: int, global_batch: int,
                 batches_per_epoch: int):
        self.sequences, self.seed, self.global_batch = sequences, seed, global_batch
        self.batches_per_epoch = batches_per_epoch
        self.shares = shares(sources)
        self.largest = int(np.argmax(self.shares))
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def drawn_before(self, batch: int) -> np.ndarray:
        """C_i(batch): each source's sequences in the run's first `batch` global batches."""
        counts = np.floor(self.shares * (self.global_batch * batch)).astype(np.int64)
        counts[self.largest] = self.global_batch * batch - (counts.sum() - counts[self.largest])
        return counts

    def batch(self, g: int) -> np.ndarray:
        """The MixedSequences indices of global batch `g`, the sources interleaved evenly."""
        start, stop = self.drawn_before(g), self.drawn_before(g + 1)
        indices, slots = [], []
        for i, (first, last) in enumerate(zip(start, stop, strict=True)):
            if last == first:
                continue
            k = np.arange(first, last, dtype=np.int64)  # the source's k-th draws
            n = int(self.sequences.sizes[i])
            passes, position = k // n, k % n
            local = np.empty_like(k)
            for p in np.unique(passes):  # one order per pass of the source; a batch spans two at most
                here = passes == p
                local[here] = FeistelOrder(n, self.seed * 1_000_003 + i, int(p)).at(position[here])
            indices.append(local + self.sequences.offsets[i])
            slots.append((np.arange(last - first) + 0.5) / (last - first))  # spread over the batch
        order = np.argsort(np.concatenate(slots), kind="stable")
        return np.concatenate(indices)[order]

    def __iter__(self) -> Iterator[int]:
        first = self.epoch * self.batches_per_epoch
        for g in range(first + self.skip, first + self.batches_per_epoch):
            yield from self.batch(g).tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip) * self.global_batch


def describe(sources: list[Source], train_tokens: list[int], tokens_per_epoch: int) -> str:
    """The plan's line for a mixture: each source's share of the training tokens, its size, its passes per epoch."""
    parts = []
    for source, share, tokens in zip(sources, shares(sources), train_tokens, strict=True):
        parts.append(f"{source.name} {share:.0%} of tokens ({tokens:,} train tokens, "
                     f"{share * tokens_per_epoch / max(1, tokens):.2f} passes/epoch)")
    return "mixture: " + "; ".join(parts)

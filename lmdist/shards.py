"""Prepared token shards: a corpus tokenized once into flat token files, which every launch memory-maps.

Layout of one prepared corpus, `<tokens_dir>/<key>/`:

    manifest.json        FORMAT, the source's description, the tokenizer, the dtype, the warnings its reading
                         gave, and per split its token count, document count and shard files in order
    tokenizer/           the tokenizer that made the tokens (trained here for char/word/bpe)
    train-00000.bin ...  the split's token ids, flat little-endian uint16 (a vocabulary up to 65,536) or uint32
    train.docs.bin       uint64: the end of each document, as a token offset just after its end-of-text token
    val-00000.bin ...    the same for the validation split

`key` is a digest of what decides the tokens: FORMAT, the source's identity (local files: their paths, sizes
and modification times; a saved dataset: its files' likewise; a hub dataset: its name and configuration; the
builtin corpus: its text), how validation is split off, the text column, and the tokenizer (its spec and
training settings, or a given tokenizer's saved files). So the same data and tokenizer always find the same
folder: a relaunch, a resume, another rank, another node on a shared filesystem, or a new run. Opening one
reads its manifest and maps its shards: no text, no Arrow, whatever the corpus's size.

Invariants:
- A `<key>` folder is complete. It is written as `<key>.partial-<host>-<pid>` and renamed once its manifest
  is in; a killed preparation leaves only a partial folder, which the next preparer removes and redoes.
- One preparer per key at a time: `<key>.lock` (flock) is held while preparing; a second process waits on
  it, then opens the result.
- The tokens do not depend on how many processes made them, nor on how the work is cut: a unit is a run of whole
  rows, or of whole pieces of a text file -- the pieces lmdist.sources has always read it in, from the start of
  its byte range -- each unit tokenized on its own into its own shard, shards in order. Units hold a 64th of
  their split (within [PIECE_BYTES, UNIT_BYTES]), so that the cores share even a small corpus evenly.

Why not `datasets.map`: it keeps an Arrow copy of the text beside per-row offsets (5.35 bytes a BPE token
where the ids need 2), and opening its cache costs one Arrow record batch per thousand rows at every
launch. `datasets` stays the reader of the formats it owns (tables, saved datasets, the hub); the flat
shards are what training reads.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from lmdist import corpus, launch, sources
from lmdist.config import TrainConfig
from lmdist.errors import STORAGE_ERRNOS, DataError, LmdistError, StorageError, os_error_of, os_error_text
from lmdist.files import write_json
from lmdist.sources import (
    CONTINUES,
    EVAL_SPLITS,
    SAVED,
    TOKENIZE_BATCH_BYTES,
    LocalFiles,
    _char_start,
    as_text,
    check_text,
    decode_counting,
    load_dataset_dict,
    load_rows,
    locate,
    pick_split,
    piece_cuts,
    report_bad_bytes_of,
    rows_per_batch,
    say_left_out,
    split_text_bytes,
    text_source,
)
from lmdist.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer, encode_arrays, load_tokenizer

FORMAT = "lmdist-tokens-1"
UNIT_BYTES = 32 << 20  # text per unit of work (and per shard file) at most
UNITS_PER_SPLIT = 64  # a split's text is cut into this many units where they stay within [PIECE_BYTES, UNIT_BYTES]
SAMPLE_WINDOW_BYTES = 1 << 20  # a BPE training sample is read in windows of this much text
PIECES = "pieces"  # in a source description: the number of pieces the text was read in, known once tokenized
SAMPLE_SEED = 0  # the sample is the same for every run's seed: a seed sweep shares one preparation


@dataclass(frozen=True)
class TextRange:
    """Bytes [cuts[0], cuts[-1]) of a text file, read as the pieces between consecutive `cuts`; `ends_document`: its
    last token is followed by end-of-text."""

    path: str
    cuts: tuple[int, ...]
    ends_document: bool

    @property
    def start(self) -> int:
        return self.cuts[0]

    @property
    def stop(self) -> int:
        return self.cuts[-1]


@dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of one of the loaded datasets (by split name)."""

    split: str
    start: int
    stop: int


@dataclass
class Prepared:
    """An opened prepared corpus: its streams (a `train` of None when only validation was prepared)."""

    path: str
    manifest: dict
    tokenizer: Tokenizer
    streams: dict[str, list[np.ndarray]] = field(default_factory=dict)
    made_now: bool = False  # by this process, not found prepared


def tokens_root(cfg: TrainConfig) -> str:
    """`tokens_dir`, else `lmdist-tokens` in the datasets cache (cache_dir or the library's own), as an absolute path:
    it is printed for commands that may run in another folder."""
    if cfg.tokens_dir:
        return os.path.abspath(os.path.expanduser(cfg.tokens_dir))
    if cfg.cache_dir:
        return os.path.join(os.path.abspath(os.path.expanduser(cfg.cache_dir)), "lmdist-tokens")
    return os.path.join(os.path.abspath(datasets_cache()), "lmdist-tokens")


def datasets_cache() -> str:
    """The datasets library's cache folder (its `config.HF_DATASETS_CACHE`), found by its own rule without importing
    it: a launch that reads only prepared text files needs nothing else of datasets, and its import is about a
    second of every start. HF_DATASETS_CACHE, else HF_HOME/datasets, else $XDG_CACHE_HOME (~/.cache)/huggingface/
    datasets; tests/test_shards.py holds it to datasets' own value."""
    hf_home = os.path.expanduser(os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"),
                                                                    "huggingface")))
    return os.getenv("HF_DATASETS_CACHE", os.path.join(hf_home, "datasets"))


def prepare(cfg: TrainConfig, say: Callable[[str], None], is_main: bool, tokenizer: Tokenizer | None = None,
            with_train: bool = True) -> Prepared:
    """The prepared corpus of `cfg`'s data, made now when there is none (the tokenizer trained, or `tokenizer`
    used); `with_train` False prepares validation only (a streamed run's). Warnings of the reading are
    replayed from the manifest on every later opening, so a warm launch says what a cold one said."""
    root = tokens_root(cfg)
    identity = {"format": FORMAT, "source": source_identity(cfg), "with_train": with_train,
                "val_fraction": cfg.val_fraction, "text_column": cfg.text_column}
    spec_key = _digest({**identity, "tokenizer": tokenizer_identity(cfg)})
    key = spec_key
    if tokenizer is not None:  # a resumed run's own tokenizer: the spec's preparation when it made the same one
        found = _open(os.path.join(root, spec_key))
        if found is not None and _tokenizer_digest(found.tokenizer) == _tokenizer_digest(tokenizer):
            return _replayed(found, say)
        key = _digest({**identity, "tokenizer": {"saved": _tokenizer_digest(tokenizer)}})
    path = os.path.join(root, key)
    found = _open(path)
    if found is not None:
        return _replayed(found, say)
    with _writing_in(root), _locked(path + ".lock", say if is_main else _silent):
        found = _open(path)  # another process may have prepared it while this one waited
        if found is not None:
            return _replayed(found, say)
        _build(cfg, path, identity, tokenizer, with_train, say, is_main)  # says the warnings as it reads
        prepared = _open(path)
    if prepared is None:  # removed between its rename and this opening: by another job or a clean-up
        raise DataError(f"the prepared tokens at {path} were removed as soon as they were made: something else "
                        "deletes folders in the tokens_dir; give this run a --tokens_dir of its own and relaunch")
    prepared.made_now = True
    return prepared


def _silent(message: str) -> None:
    """Ranks other than the main one say nothing about the data: the main process said it."""


@contextmanager
def _writing_in(root: str) -> Iterator[None]:
    """Create `root` and write in it, with a failed write told as what to do about it: a folder this process may
    not write in is a setting to change (exit 2), a full or failing disk is storage's (exit 74; the partial
    preparation is removed, and a relaunch prepares again). The source's own errors and lmdist's pass through."""
    try:
        os.makedirs(root, exist_ok=True)
        yield
    except LmdistError:
        raise
    except Exception as error:
        cause = os_error_of(error)
        inside = os.path.join(os.path.abspath(root), "")
        written = cause is not None and (os.path.join(os.path.abspath(cause.filename), "").startswith(inside)
                                         if isinstance(cause.filename, str) else cause.errno in STORAGE_ERRNOS)
        if not written:
            raise
        if cause.errno in STORAGE_ERRNOS - {errno.EROFS}:
            raise StorageError(f"cannot write the prepared tokens in {root}: {os_error_text(cause)}; free space or "
                               "set --tokens_dir to a folder with room (2 bytes a token, 4 above 65,536 tokens in the "
                               "vocabulary), then relaunch: the preparation starts again") from None
        raise DataError(f"cannot write in the prepared-tokens folder {root} ({cause.strerror}): set --tokens_dir to a "
                        "folder this process may write in") from None


def _replayed(found: Prepared, say: Callable[[str], None]) -> Prepared:
    for message in found.manifest.get("warnings", []):
        say(message)
    return found


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:24]


def mixture_tokenizer(cfg: TrainConfig, configs: list[TrainConfig], weights: list[float],
                      say: Callable[[str], None], is_main: bool) -> Tokenizer | None:
    """The tokenizer a mixture's sources share, trained once on all of them when it learns (bpe: each source's
    share of bpe_sample_bytes by weight; char/word: every symbol) and kept in `tokens_dir/tokenizers/`; None for
    byte or a folder, which every source's preparation builds the same."""
    if cfg.tokenizer not in ("char", "word", "bpe"):
        return None
    total = sum(weights)
    key = _digest({"format": FORMAT, "tokenizer": tokenizer_identity(cfg),
                   "sources": [[source_identity(c), c.text_column, c.val_fraction, w / total]
                               for c, w in zip(configs, weights, strict=True)]})
    folder = os.path.join(tokens_root(cfg), "tokenizers", key)
    if not os.path.exists(os.path.join(folder, "lmdist_tokenizer.json")):
        with _writing_in(os.path.dirname(folder)), _locked(folder + ".lock", say if is_main else _silent):
            if not os.path.exists(os.path.join(folder, "lmdist_tokenizer.json")):
                def texts() -> Iterator[str]:
                    for source_cfg, weight in zip(configs, weights, strict=True):
                        splits, loaded, _ = _units(source_cfg, True, _silent)  # its preparation says the warnings
                        share = replace(source_cfg, bpe_sample_bytes=max(1, round(cfg.bpe_sample_bytes * weight
                                                                                  / total)))
                        yield from training_sample(splits["train"], loaded, share)

                tokenizer = build_tokenizer(cfg.tokenizer, texts, cfg.bpe_vocab_size, cfg.min_freq)
                partial = f"{folder}.partial-{socket.gethostname()}-{os.getpid()}"
                shutil.rmtree(partial, ignore_errors=True)
                tokenizer.save(partial)
                os.rename(partial, folder)
    return load_tokenizer(folder)


# ----------------------------------------------------------------------------- identities

def source_identity(cfg: TrainConfig) -> dict:
    """What names the data without reading it: local files by path, size and modification time."""
    return {"train": _spec_identity(cfg.dataset, cfg), "val": _spec_identity(cfg.val_dataset, cfg)
            if cfg.val_dataset else None}


def _spec_identity(spec: str, cfg: TrainConfig) -> dict:
    if spec == "builtin":
        return {"builtin": corpus.fingerprint(corpus.builtin_documents())}
    found = locate(spec)
    if found == SAVED:
        files = sorted(f for f in glob.glob(os.path.join(spec, "**", "*"), recursive=True) if os.path.isfile(f))
        return {"saved": _stamps(files)}
    if isinstance(found, LocalFiles):
        return {"kind": found.kind, "files": _stamps(found.files)}
    return {"hub": spec, "config": cfg.dataset_config}


def _stamps(files: list[str]) -> list:
    return [(os.path.realpath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]


def tokenizer_identity(cfg: TrainConfig) -> dict:
    """The tokenizer spec and what its training depends on; a folder by the digest of its files."""
    if cfg.tokenizer == "byte":
        return {"kind": "byte"}
    if cfg.tokenizer in ("char", "word"):
        return {"kind": cfg.tokenizer, "min_freq": cfg.min_freq}
    if cfg.tokenizer == "bpe":
        return {"kind": "bpe", "vocab_size": cfg.bpe_vocab_size, "sample_bytes": cfg.bpe_sample_bytes,
                "sample_seed": SAMPLE_SEED}
    return {"folder": _files_digest(cfg.tokenizer)}


def _files_digest(folder: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if os.path.isfile(os.path.join(folder, name)):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:24]


def _tokenizer_digest(tokenizer: Tokenizer) -> str:
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save(folder)
        return _files_digest(folder)


# ----------------------------------------------------------------------------- opening

def _open(path: str) -> Prepared | None:
    """The prepared corpus at `path`, or None when there is none (a partial one is never opened)."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if manifest.get("format") != FORMAT:
        return None
    dtype = np.dtype(manifest["dtype"])
    streams = {name: [np.memmap(os.path.join(path, shard["file"]), dtype=dtype, mode="r")
                      for shard in split["shards"]]
               for name, split in manifest["splits"].items()}
    return Prepared(path, manifest, load_tokenizer(os.path.join(path, "tokenizer")), streams)


@contextmanager
def _locked(path: str, say: Callable[[str], None]) -> Iterator[None]:
    """flock on `path`, saying so when another process holds it (it is preparing the same tokens)."""
    with open(path, "a") as lock:  # closing it releases the lock, also when this process dies
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process preparing the same tokens ({path} is locked)")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# ----------------------------------------------------------------------------- preparing

def _build(cfg: TrainConfig, path: str, identity: dict, tokenizer: Tokenizer | None, with_train: bool,
           say: Callable[[str], None], is_main: bool) -> None:
    """Read, (train the tokenizer,) tokenize in parallel, write under a partial name, rename into place."""
    for stale in glob.glob(glob.escape(path) + ".partial-*"):  # killed preparations: redone, never used
        shutil.rmtree(stale, ignore_errors=True)
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        say(message)

    started = time.perf_counter()
    splits, datasets_, source = _units(cfg, with_train, note)
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.tokenizer, lambda: training_sample(splits["train"], datasets_, cfg),
                                    cfg.bpe_vocab_size, cfg.min_freq)
    dtype = np.dtype("uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32")
    partial = f"{path}.partial-{socket.gethostname()}-{os.getpid()}"
    os.makedirs(partial)
    try:
        tokenizer.save(os.path.join(partial, "tokenizer"))
        work = [(name, i, unit) for name, units in splits.items() for i, unit in enumerate(units)]
        results = _tokenize_all(work, datasets_, tokenizer, cfg.text_column, dtype, partial, is_main)
        manifest = {"format": FORMAT, "identity": identity, "source": source, "dtype": dtype.name,
                    "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
                    "splits": {}, "warnings": warnings}
        bad_bytes: dict[str, int] = {}
        for name in splits:
            done = [r for r in results if r["split"] == name]
            offsets = np.cumsum([0] + [r["tokens"] for r in done])
            ends = np.concatenate([r["doc_ends"] + start for r, start in zip(done, offsets, strict=False)]
                                  or [np.zeros(0, np.uint64)]).astype(np.uint64)
            ends.tofile(os.path.join(partial, f"{name}.docs.bin"))
            manifest["splits"][name] = {"tokens": int(offsets[-1]), "documents": len(ends),
                                        "shards": [{"file": r["file"], "tokens": r["tokens"]} for r in done
                                                   if r["tokens"]]}
            for r in done:
                for file, n in r["bad_bytes"].items():
                    bad_bytes[file] = bad_bytes.get(file, 0) + n
        if bad_bytes:
            note(report_bad_bytes_of(bad_bytes))
        if source.get("splits") == {"train": PIECES}:
            source["splits"] = {"train": sum(r["rows"] for r in results if r["split"] == "train")}
        write_json(os.path.join(partial, "manifest.json"), manifest)
        os.rename(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if is_main:
        sizes = " + ".join(f"{split['tokens']:,} {name}" for name, split in manifest["splits"].items())
        say(f"prepared {sizes} tokens ({tokenizer.kind}) in {time.perf_counter() - started:.1f} s: {path}")


def _units(cfg: TrainConfig, with_train: bool, say: Callable[[str], None]):
    """(units per split, the loaded datasets the row units index, the source's description). Text files become
    byte ranges, read here; any other source becomes rows, read by `datasets` (lmdist.sources)."""
    found = text_source(cfg.dataset) if with_train and cfg.dataset != "builtin" else None
    if with_train and cfg.val_dataset is None:
        if found is None:
            train_rows, val_rows, source = load_rows(cfg, say)
            loaded = {"train": train_rows, "val": val_rows}
            return {name: row_units(name, rows) for name, rows in loaded.items()}, loaded, source
        say_left_out(found, say)
        train_parts, val_parts, source = split_text_bytes(found.files, cfg)
        return {"train": text_units(train_parts), "val": text_units(val_parts)}, {}, source
    # the source described as lmdist.sources describes it (its fingerprint carries over): a text file's rows are
    # its pieces, counted once tokenized (PIECES)
    splits, loaded = {}, {}
    source = {"dataset": cfg.dataset, "streaming": True} if not with_train else {"dataset": cfg.dataset}
    for name, spec, preferred in (("train", cfg.dataset, ("train",)), ("val", cfg.val_dataset, EVAL_SPLITS)):
        if name == "train" and not with_train:
            continue
        files = text_source(spec) if spec != "builtin" else None
        if files is not None:
            say_left_out(files, say)
            splits[name] = text_units([(f, 0, os.path.getsize(f)) for f in files.files])
            described = {"train": PIECES}
        else:
            every_split = load_dataset_dict(spec, cfg, say)
            loaded[name] = pick_split(every_split, preferred, spec)
            check_text(loaded[name], cfg.text_column, spec, say)
            splits[name] = row_units(name, loaded[name])
            described = {split: rows.num_rows for split, rows in every_split.items()}
        if name == "train":
            source["splits"] = described
    source["val_dataset"] = cfg.val_dataset
    return splits, loaded, source


def unit_bytes(total: int) -> int:
    """Text per unit of work for a split of `total` bytes: a UNITS_PER_SPLIT-th of it, so that many cores share even
    a small corpus, within [PIECE_BYTES, UNIT_BYTES] (fewer, larger shard files for a large one)."""
    return min(UNIT_BYTES, max(sources.PIECE_BYTES, total // UNITS_PER_SPLIT))


def text_units(parts: list[tuple[str, int, int]]) -> list[TextRange]:
    """Byte ranges (path, start, stop) grouped into units of about `unit_bytes` of whole pieces -- the pieces
    lmdist.sources reads a range in, from its start -- so the tokens are the same whatever the unit size; a range's
    last unit ends its document when the range ends its file."""
    size = unit_bytes(sum(stop - start for _, start, stop in parts))
    units = []
    for path, start, stop in parts:
        ends_file = stop >= os.path.getsize(path)
        cuts = piece_cuts(path, start, stop)
        group = [cuts[0]]
        for cut in cuts[1:]:
            group.append(cut)
            if cut - group[0] >= size or cut == stop:
                units.append(TextRange(path, tuple(group), ends_file and cut == stop))
                group = [cut]
    return units


def row_units(name: str, rows) -> list[RowRange]:
    """Runs of whole rows holding about `unit_bytes` of data each."""
    row_bytes = rows.data.nbytes / max(1, rows.num_rows)
    per_unit = max(1, int(unit_bytes(rows.data.nbytes) // max(1.0, row_bytes)))
    return [RowRange(name, a, min(a + per_unit, rows.num_rows)) for a in range(0, rows.num_rows, per_unit)]


def training_sample(units: list, datasets_: dict, cfg: TrainConfig) -> Iterator[str]:
    """The texts a tokenizer learns from: all of the training split, or for `bpe` on a larger one a seeded
    sample of about bpe_sample_bytes (windows of text spread over the split, in the split's order)."""
    limit = cfg.bpe_sample_bytes if cfg.tokenizer == "bpe" else None
    if units and isinstance(units[0], TextRange):
        total = sum(u.stop - u.start for u in units)
        if limit is None or total <= limit:
            for unit in units:
                for piece in _unit_pieces(unit):
                    yield decode_counting(piece)[0]
            return
        windows = [(u, a) for u in units for a in range(u.start, u.stop, SAMPLE_WINDOW_BYTES)]
        chosen = np.random.default_rng(SAMPLE_SEED).choice(len(windows), min(len(windows),
                                                           -(-limit // SAMPLE_WINDOW_BYTES)), replace=False)
        for index in sorted(chosen):
            unit, start = windows[index]
            start = _char_start(unit.path, start)
            with open(unit.path, "rb") as f:
                f.seek(start)
                yield decode_counting(f.read(min(SAMPLE_WINDOW_BYTES, unit.stop - start)))[0]
        return
    rows = datasets_["train"]
    batch = rows_per_batch(rows)
    batches = range(0, rows.num_rows, batch)
    if limit is not None and rows.data.nbytes > limit:
        share = limit / rows.data.nbytes
        keep = np.random.default_rng(SAMPLE_SEED).random(len(batches)) < share
        batches = [start for start, kept in zip(batches, keep, strict=True) if kept]
    texts = rows.select_columns([cfg.text_column])  # once, not a new Dataset view per batch
    for start in batches:
        yield from filter(None, map(as_text, texts[start: start + batch][cfg.text_column]))


# ----------------------------------------------------------------------------- tokenizing in parallel

_WORK: dict = {}  # a worker's part of the preparation: the loaded datasets, the tokenizer, the column, dtype, folder


def _tokenize_all(work: list, datasets_: dict, tokenizer: Tokenizer, column: str, dtype: np.dtype, folder: str,
                  is_main: bool) -> list[dict]:
    """Each unit through `_tokenize_unit`, on every core, with a progress bar on rank zero's terminal."""
    setting = (datasets_, tokenizer, column, dtype, folder)
    total = sum(_unit_size(unit, datasets_) for _, _, unit in work)
    # the byte tokenizer encodes less than 2 x UNIT_BYTES of text faster in this process than workers start
    # (0.3 s); the others encode 100x slower, and only a piece of text gains nothing from workers
    in_process = 2 * UNIT_BYTES if tokenizer.kind == "byte" else 2 * sources.PIECE_BYTES
    processes = min(launch.available_cores(), len(work)) if total >= in_process else 1
    results = []
    if processes <= 1:
        _start_worker(*setting, quiet=False)
        with _progress_bar(total, is_main) as bar:
            for item in work:
                results.append(_tokenize_unit(item))
                bar.update(results[-1]["size"])
    else:  # the workers start before the bar, whose monitor is a thread
        with _worker_context(datasets_).Pool(processes, initializer=_start_worker, initargs=setting) as pool, \
                _progress_bar(total, is_main) as bar:
            for result in pool.imap(_tokenize_unit, work):
                results.append(result)
                bar.update(result["size"])
    _WORK.clear()
    return results


def _worker_context(datasets_: dict):
    """Workers forked from this process when it has imported neither torch nor the rows of a table (`lmdist prepare`
    of text files): its threads are then OpenBLAS's and tokenizers', which both survive a fork, and the workers
    start at once. Else from a fork server, which costs a fresh interpreter's start and imports (0.4 s here): a
    trainer holds threads (gloo, OpenMP), and a child forked while one of them holds a lock waits on it forever;
    Arrow's thread pool holds rows of tables."""
    if "torch" not in sys.modules and not datasets_:
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lmdist.shards"])
    return context


def _start_worker(datasets_: dict, tokenizer: Tokenizer, column: str, dtype: np.dtype, folder: str,
                  quiet: bool = True) -> None:
    """What a worker tokenizes with. A worker process runs one tokenizer thread (one process per core), leaves
    Ctrl-C to the preparing process (the terminal sends it to every process) and dies quietly of the SIGTERM
    with which the pool ends it."""
    _WORK.update(datasets=datasets_, tokenizer=tokenizer, column=column, dtype=dtype, folder=folder)
    if quiet:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _progress_bar(total: int, is_main: bool):
    """tqdm's bar on rank zero's terminal; elsewhere (a log, a job's output) none, and no import of tqdm (0.05 s of
    the start-up that `lmdist prepare` of a small corpus is mostly made of)."""
    if not (is_main and sys.stderr.isatty()):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="preparing tokens", file=sys.stderr)


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _unit_size(unit, datasets_: dict) -> int:
    if isinstance(unit, TextRange):
        return unit.stop - unit.start
    rows = datasets_[unit.split]
    return int(rows.data.nbytes * (unit.stop - unit.start) / max(1, rows.num_rows))


def _tokenize_unit(item: tuple) -> dict:
    """Tokenize one unit into `<split>-<index>.bin`, a batch of text at a time (so a worker holds a few MiB, not
    the unit's token lists); its token count, document ends and bytes not UTF-8."""
    name, index, unit = item
    tokenizer, dtype, file = _WORK["tokenizer"], _WORK["dtype"], f"{name}-{index:05d}.bin"
    bad_bytes: dict[str, int] = {}
    tokens, doc_ends, rows = 0, [], 0
    path = os.path.join(_WORK["folder"], file)
    with open(path, "wb") as out:
        for texts, ends in _unit_batches(unit, bad_bytes):
            rows += len(texts)
            for ids, ends_document in zip(encode_arrays(tokenizer, texts, ends, dtype), ends, strict=True):
                out.write(ids.tobytes())
                tokens += len(ids)
                if ends_document:
                    doc_ends.append(tokens)
    if not tokens:
        os.remove(path)
    return {"split": name, "file": file, "tokens": tokens, "doc_ends": np.asarray(doc_ends, dtype=np.uint64),
            "bad_bytes": bad_bytes, "rows": rows, "size": _unit_size(unit, _WORK["datasets"])}


def _unit_batches(unit, bad_bytes: dict[str, int]) -> Iterator[tuple[list[str | bytes], list[bool]]]:
    """A unit's texts in batches of about TOKENIZE_BATCH_BYTES, with whether each ends its document. For the byte
    tokenizer a piece that is valid UTF-8 stays bytes: its ids are its bytes (encode_arrays)."""
    if isinstance(unit, TextRange):
        texts, size = [], 0
        as_bytes = isinstance(_WORK["tokenizer"], ByteTokenizer)
        for piece in _unit_pieces(unit):
            if size >= TOKENIZE_BATCH_BYTES:
                yield texts, [False] * len(texts)
                texts, size = [], 0
            text, bad = (piece, 0) if as_bytes and piece.isascii() else decode_counting(piece)
            texts.append(piece if as_bytes and not bad else text)
            size += len(piece)
            if bad:
                bad_bytes[unit.path] = bad_bytes.get(unit.path, 0) + bad
        if texts:
            yield texts, [False] * (len(texts) - 1) + [unit.ends_document]
        return
    rows = _WORK["datasets"][unit.split]
    column = _WORK["column"]
    per_batch = rows_per_batch(rows)
    rows = rows.select_columns([name for name in (column, CONTINUES) if name in rows.column_names])
    for start in range(unit.start, unit.stop, per_batch):
        batch = rows[start: min(start + per_batch, unit.stop)]  # decoded by the features: a Json column's lists
        values = batch[column]
        goes_on = batch.get(CONTINUES) or [False] * len(values)
        texts, ends = [], []
        for value, continues in zip(values, goes_on, strict=True):
            text = as_text(value)
            if text:  # a row without text has nothing to predict (check_text counted it)
                texts.append(text)
                ends.append(not continues)
        yield texts, ends


def _unit_pieces(unit: TextRange) -> Iterator[bytes]:
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        for start, stop in itertools.pairwise(unit.cuts):
            yield f.read(stop - start)

"""Text in, batches out: find the rows, tokenize them with `datasets.map`, pack them into sequences.

Text is read as written. A plain-text file (any file that is not .json/.jsonl/.csv/.parquet and holds no NUL
byte in its first 8 KiB) is one document: its line breaks are tokens, and the end-of-text token follows its
last character only. It is read in pieces of about PIECE_BYTES, cut after a line break where the piece has
one and never inside a UTF-8 character, so memory stays bounded whatever the file's size; a row of
(text, file, continues, bad_bytes) per piece, where `continues` says the next row goes on with the same
document. A row of a json/jsonl/csv/parquet source (or a saved or hub dataset) is one document.

Packing keeps the whole token stream: sequence i is tokens[i*T : i*T + T + 1], its first T tokens
the input and its last T the targets (the lesson's batchify). Consecutive sequences share one token,
so every token after the first is a target exactly once. The stream is read straight out of the
memory-mapped Arrow files `datasets` wrote, so a corpus larger than RAM works.

Batches are drawn the way one big process would draw them: one seeded permutation per epoch, cut
into global batches of world_size * batch_size sequences, of which each rank takes its contiguous
slice. So 2 ranks x batch b see exactly the batches of 1 process x batch 2b.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from lmdist import corpus, stopping
from lmdist.config import TrainConfig
from lmdist.errors import DataError
from lmdist.tokenizer import Tokenizer, build_tokenizer, encode_rows, load_tokenizer

IGNORE_INDEX = -100  # target value for padding: no loss, no accuracy, not counted
TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT = "text"  # the kind of a plain-text file: any file that is no table and holds no NUL byte in its first bytes
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")  # a path that does not exist but ends so is taken for a local file
BINARY_PROBE_BYTES = 8192
PIECE_BYTES = 1 << 20  # a text file is read in pieces of 0.5-2 MiB
TOKENIZE_BATCH_BYTES = 4 << 20  # text per `datasets.map` batch: bounds the token lists held at once
# Columns of a text file's rows besides the text: its path, whether the next row continues its document (no
# end-of-text token after this one), and how many bytes were not UTF-8 (each decoded as U+FFFD).
FILE, CONTINUES, BAD_BYTES = "lmdist_file", "lmdist_continues", "lmdist_bad_bytes"
TEXT_READER = "pieces-1"  # part of the text rows' cache key: change it when `text_rows` yields other rows
VAL_SPLITS = ("validation", "valid", "test")  # a source's held-out split, in order of preference
EVAL_SPLITS = (*VAL_SPLITS, "train")  # the split to evaluate on, in order of preference
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class Corpus:
    """The tokenized training and validation streams, and what produced them."""

    train: TokenStream | None  # None when streaming
    val: TokenStream
    tokenizer: Tokenizer
    fingerprint: str
    source: dict

    def describe(self) -> str:
        """One line for the console: where the text came from, the tokenizer, the sizes, the fingerprint."""
        source = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in self.source.items())
        train = "streamed" if self.train is None else f"{self.train.n_tokens:,}"
        return (f"{source}; tokenizer {self.tokenizer.kind} (vocab {self.tokenizer.vocab_size}); "
                f"{train} train / {self.val.n_tokens:,} val tokens; fingerprint {self.fingerprint}")


def load_corpus(cfg: TrainConfig, main_process_first: Callable[[Callable], object], is_main: bool,
                reuse_tokenizer: bool = False) -> Corpus:
    """Load, split and tokenize the data; the main process builds caches first, the others reuse them.

    With `reuse_tokenizer` (a resumed run) every rank loads the tokenizer saved in output_dir. Warnings about
    the data (bytes that are not UTF-8, rows without text, files left out) come from the main process only.
    """
    for spec in filter(None, (cfg.dataset, cfg.val_dataset)):
        check_source(spec)  # on every rank, before any collective: a bad path fails everywhere at once
    quiet_progress_bars(is_main)
    say = warn if is_main else _silent

    def build() -> Corpus:
        if cfg.streaming:  # the training rows arrive later, as a stream (lmdist.streaming)
            train_rows, source = None, {"dataset": cfg.dataset, "streaming": True, "val_dataset": cfg.val_dataset}
            val_rows = pick_split(load_dataset_dict(cfg.val_dataset, cfg, say), EVAL_SPLITS, cfg.val_dataset)
            check_text(val_rows, cfg.text_column, cfg.val_dataset, say)
        else:
            train_rows, val_rows, source = load_rows(cfg, say)
        tokenizer_dir = os.path.join(cfg.output_dir, "tokenizer")
        if (reuse_tokenizer or not is_main) and os.path.exists(os.path.join(tokenizer_dir, "lmdist_tokenizer.json")):
            tokenizer = load_tokenizer(tokenizer_dir)  # the one the main process just trained and saved
        else:
            tokenizer = build_tokenizer(cfg.tokenizer, lambda: _texts(train_rows, cfg.text_column),
                                        cfg.vocab_size, cfg.min_freq)
            if is_main:
                tokenizer.save(tokenizer_dir)
        if tokenizer.eos_id is None:
            say(missing_eos_warning(cfg.tokenizer, tokenizer))
        train = None if train_rows is None else TokenStream(tokenize(train_rows, tokenizer, cfg.text_column))
        val = TokenStream(tokenize(val_rows, tokenizer, cfg.text_column))
        for name, stream in (("training", train), ("validation", val)):
            if stream is not None and stream.n_tokens < 2:
                raise DataError(f"the {name} split of {cfg.dataset!r} has {stream.n_tokens} tokens: not enough text")
        return Corpus(train, val, tokenizer, _fingerprint(source, tokenizer, train, val), source)

    return main_process_first(build)


def warn(message: str) -> None:
    print(f"lmdist: {message}", file=sys.stderr, flush=True)


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


# ----------------------------------------------------------------------------- finding rows

def check_source(spec: str) -> None:
    """Fail fast on a local path that is missing, empty or holds no data file (hub names are checked when loaded)."""
    if spec == "builtin" or not looks_local(spec) or is_saved_dataset(spec):
        return
    found = local_files(spec)
    if len(found.files) == 1 and os.path.getsize(found.files[0]) == 0:
        raise DataError(f"dataset file {found.files[0]} is empty")


def load_rows(cfg: TrainConfig, say: Callable[[str], None] = warn):
    """(training rows, validation rows, source description) as `datasets.Dataset`s.

    Validation: `val_dataset`, else the source's validation (or valid, or test) split, else the tail of the
    training data -- of its text for text files and single documents, of its rows otherwise.
    """
    import datasets

    if cfg.dataset == "builtin":
        docs = corpus.builtin_documents()
        loaded = datasets.DatasetDict({"train": datasets.Dataset.from_dict({cfg.text_column: docs})})
        source = {"dataset": "builtin", "modules": len(docs), "corpus_fingerprint": corpus.fingerprint(docs)}
    elif not cfg.val_dataset and (found := text_source(cfg.dataset)):
        say_left_out(found, say)
        train, val, source = split_text_files(found.files, cfg)
        report_bad_bytes((train, val), say)
        return train, val, source
    else:
        loaded = load_dataset_dict(cfg.dataset, cfg, say)
        source = {"dataset": cfg.dataset, "splits": {k: v.num_rows for k, v in loaded.items()}}
    train = pick_split(loaded, ("train",), cfg.dataset)
    check_text(train, cfg.text_column, cfg.dataset, say)
    held_out = next((name for name in VAL_SPLITS if name in loaded and loaded[name] is not train), None)
    if cfg.val_dataset:
        val = pick_split(load_dataset_dict(cfg.val_dataset, cfg, say), EVAL_SPLITS, cfg.val_dataset)
        check_text(val, cfg.text_column, cfg.val_dataset, say)
        source["val_dataset"] = cfg.val_dataset
    elif held_out:
        val = loaded[held_out]
        check_text(val, cfg.text_column, f"{cfg.dataset} ({held_out})", say)
        source["val_split"] = held_out
    elif train.num_rows == 1:  # one long document: hold out the tail of its text
        text = as_text(train[0][cfg.text_column])
        cut = round(len(text) * (1 - cfg.val_fraction))
        train, val = (datasets.Dataset.from_dict({cfg.text_column: [part]}) for part in (text[:cut], text[cut:]))
        source["val_split"] = f"last {len(text) - cut} of {len(text)} characters"
    else:
        n_val = min(train.num_rows - 1, max(1, round(train.num_rows * cfg.val_fraction)))
        # The tail, not a random sample: neighbouring rows of one document stay on one side.
        cut = train.num_rows - n_val
        train, val = train.select(range(cut)), train.select(range(cut, train.num_rows))
        source["val_split"] = f"last {n_val} of {train.num_rows + n_val} rows"
    return train, val, source


def text_source(spec: str) -> LocalFiles | None:
    """The text files `spec` names, or None when it names a saved dataset, table files or a hub dataset."""
    if is_saved_dataset(spec) or not looks_local(spec):
        return None
    found = local_files(spec)
    return found if found.kind == TEXT else None


def is_saved_dataset(spec: str) -> bool:
    return os.path.isdir(spec) and any(os.path.exists(os.path.join(spec, m)) for m in SAVED_DATASET_MARKERS)


def load_dataset_dict(spec: str, cfg: TrainConfig, say: Callable[[str], None] = warn):
    """A DatasetDict from a local file/folder/glob, a save_to_disk folder or a hub name."""
    import datasets

    if is_saved_dataset(spec):
        loaded = datasets.load_from_disk(spec)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    if looks_local(spec):
        found = local_files(spec)
        say_left_out(found, say)
        if found.kind == TEXT:
            rows = text_dataset([(f, 0, os.path.getsize(f)) for f in found.files], cfg)
            report_bad_bytes((rows,), say)
            return datasets.DatasetDict({"train": rows})
        return load_table_files(found, cfg)
    try:
        return datasets.load_dataset(spec, cfg.dataset_config, cache_dir=cfg.cache_dir)
    except Exception as e:  # noqa: BLE001 -- the hub client raises many types: connection, not found, config
        raise DataError(f"could not load the hub dataset {spec!r} (config {cfg.dataset_config!r}): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} -- check the name and "
                        "network, or pass a local file or folder") from None


def table_builder_options(builder: str, column: str) -> dict:
    """CSV cells as written: pandas would read a column of digits as numbers and `NA`, `null` or `nan` as missing."""
    return {"converters": {column: str}, "keep_default_na": False} if builder == "csv" else {}


def load_table_files(found: LocalFiles, cfg: TrainConfig):
    """json/jsonl/csv/parquet files through their `datasets` builder; its failures, and strings that are not
    UTF-8, become a DataError naming the file (and the first byte that is not UTF-8, when that is the cause)."""
    import datasets

    try:
        loaded = datasets.load_dataset(found.kind, data_files={"train": found.files}, cache_dir=cfg.cache_dir,
                                       **table_builder_options(found.kind, cfg.text_column))
        for rows in loaded.values():  # pyarrow's json reader takes bytes that are not UTF-8 into its strings
            rows.data.table.validate(full=True)
        return loaded
    except Exception as e:  # noqa: BLE001 -- pyarrow, pandas and datasets raise many types for one bad file
        for path in found.files if found.kind != "parquet" else ():
            offset = first_invalid_utf8(path)
            if offset is not None:
                raise DataError(f"{path} is not UTF-8 text: byte {offset} (0x{_byte_at(path, offset):02x}) is "
                                "not part of a UTF-8 character; convert the file, e.g. `iconv -f latin1 -t utf-8 "
                                f"{path} > fixed{os.path.splitext(path)[1]}`") from None
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:  # the reader's error, not datasets'
            cause = cause.__cause__ or cause.__context__
        what = found.files[0] if len(found.files) == 1 else f"one of the {len(found.files)} {found.kind} files"
        raise DataError(f"could not read {what} as {found.kind}: {type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}") from None


def first_invalid_utf8(path: str) -> int | None:
    """The offset of the first byte of `path` that is not part of a UTF-8 character, or None."""
    offset = 0
    with open(path, "rb") as f:
        for piece in _pieces(f):
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError as e:
                return offset + e.start
            offset += len(piece)
    return None


def _byte_at(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(1)[0]


def looks_local(spec: str) -> bool:
    return (os.path.exists(spec) or glob.has_magic(spec) or spec.startswith((".", "/", "~"))
            or os.path.splitext(spec)[1].lower() in (*TABLE_BUILDERS, *TEXT_SUFFIXES))


@dataclass
class LocalFiles:
    """The data files a local spec names, of one kind (TEXT or a table builder), and those it leaves out."""

    kind: str
    files: list[str]
    left_out: dict[str, str] = field(default_factory=dict)  # path -> why


def file_kind(path: str) -> str | None:
    """A table builder by the file's extension, else TEXT, or None for a binary file (a NUL byte in its first
    BINARY_PROBE_BYTES, as `grep` and `git` tell text from binary)."""
    builder = TABLE_BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder:
        return builder
    with open(path, "rb") as f:
        return None if b"\0" in f.read(BINARY_PROBE_BYTES) else TEXT


def local_files(spec: str) -> LocalFiles:
    """The data files of one file, a folder's files (hidden ones aside) or a glob's matches (a folder's files).

    A folder or glob takes its json/jsonl/csv/parquet files when it has some (text files beside them, such as
    a README.md, are left out), else its text files; binary and empty files are left out.
    """
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        kind = file_kind(path)
        if kind is None:
            raise DataError(f"{path!r} is not a data file: it holds NUL bytes (binary) and is not "
                            f"{'/'.join(TABLE_BUILDERS)}")
        return LocalFiles(kind, [path])
    if not os.path.isdir(path) and not glob.has_magic(path):
        raise DataError(f"dataset path {spec!r} does not exist")
    matches = [path] if os.path.isdir(path) else sorted(glob.glob(path, recursive=True))
    candidates = [f for match in matches
                  for f in (sorted(glob.glob(os.path.join(match, "**", "*"), recursive=True))
                            if os.path.isdir(match) else [match])]
    kinds, left_out = {}, {}
    for candidate in filter(os.path.isfile, candidates):
        kind = file_kind(candidate) if os.path.getsize(candidate) else "empty"
        if kind in (None, "empty"):
            left_out[candidate] = kind or "binary"
        else:
            kinds[candidate] = kind
    tables = sorted(set(kinds.values()) - {TEXT})
    if len(tables) > 1:
        raise DataError(f"{spec!r} mixes file types ({', '.join(tables)}); use one type per dataset")
    kind = tables[0] if tables else TEXT
    files = [f for f, k in kinds.items() if k == kind]
    left_out.update((f, f"text beside the {kind} files") for f, k in kinds.items() if k != kind)
    if not files:
        raise DataError(f"{spec!r} holds no data file: no {'/'.join(TABLE_BUILDERS)} file and no text file (one "
                        f"without NUL bytes in its first {BINARY_PROBE_BYTES // 1024} KiB)"
                        + (f"; left out: {_list_left_out(left_out)}" if left_out else ""))
    return LocalFiles(kind, files, left_out)


def say_left_out(found: LocalFiles, say: Callable[[str], None]) -> None:
    if found.left_out:
        say(f"note: {len(found.left_out)} file(s) left out: {_list_left_out(found.left_out)}")


def _list_left_out(left_out: dict[str, str], shown: int = 5) -> str:
    listed = ", ".join(f"{path} ({why})" for path, why in itertools.islice(left_out.items(), shown))
    return listed + (f" and {len(left_out) - shown} more" if len(left_out) > shown else "")


def pick_split(loaded, preferred: tuple[str, ...], spec: str):
    for name in preferred:
        if name in loaded:
            return loaded[name]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise DataError(f"{spec!r} has splits {', '.join(loaded)}; none of them is {' or '.join(preferred)}")


# ----------------------------------------------------------------------------- text files

def split_text_files(files: list[str], cfg: TrainConfig):
    """(training rows, validation rows, source) of text files without a validation source: validation is their
    last val_fraction of bytes (moved to the start of a UTF-8 character), cutting the file it falls in."""
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    cut = round(total * (1 - cfg.val_fraction))
    ends = list(itertools.accumulate(sizes))
    k = min(next(i for i, end in enumerate(ends) if end >= cut), len(files) - 1)
    offset = _char_start(files[k], cut - (ends[k] - sizes[k]))
    train_parts = [(f, 0, size) for f, size in zip(files[:k], sizes[:k], strict=True)] + [(files[k], 0, offset)]
    val_parts = [(files[k], offset, sizes[k])] + [(f, 0, size) for f, size in zip(files[k + 1:], sizes[k + 1:],
                                                                                    strict=True)]
    val_bytes = sizes[k] - offset + sum(sizes[k + 1:])
    source = {"dataset": cfg.dataset, "text_files": len(files), "bytes": total,
              "val_split": f"last {val_bytes} of {total} bytes"}
    return text_dataset(train_parts, cfg), text_dataset(val_parts, cfg), source


def _char_start(path: str, offset: int) -> int:
    """`offset`, moved forward past UTF-8 continuation bytes to the start of a character."""
    with open(path, "rb") as f:
        f.seek(offset)
        following = f.read(4)
    return offset + next((i for i, b in enumerate(following) if not 0x80 <= b < 0xC0), len(following))


def text_dataset(parts: list[tuple[str, int, int]], cfg: TrainConfig):
    """The rows of byte ranges (path, start, stop) of text files, cached by `datasets` under a key made of the
    ranges and the files' sizes and modification times."""
    import datasets

    parts = [part for part in parts if part[2] > part[1]]
    if not parts:  # a split too small to hold a byte: it reports "not enough text" once tokenized
        return datasets.Dataset.from_dict({name: [] for name in text_features(cfg.text_column)},
                                          features=text_features(cfg.text_column))
    stamps = [(os.path.getsize(path), os.stat(path).st_mtime_ns) for path, _, _ in parts]
    key = hashlib.sha256(json.dumps([TEXT_READER, cfg.text_column, parts, stamps]).encode()).hexdigest()[:24]
    return datasets.Dataset.from_generator(
        text_rows, features=text_features(cfg.text_column), cache_dir=cfg.cache_dir, fingerprint=key,
        gen_kwargs={"parts": parts, "column": cfg.text_column}, writer_batch_size=8)  # 8 pieces in memory at most


def text_features(column: str):
    import datasets

    return datasets.Features({column: datasets.Value("string"), FILE: datasets.Value("string"),
                              CONTINUES: datasets.Value("bool"), BAD_BYTES: datasets.Value("int64")})


def text_rows(parts: list[tuple[str, int, int]], column: str) -> Iterator[dict]:
    """One row per piece of each byte range (path, start, stop) of a text file; its last piece continues the
    document (no end-of-text token after it) unless the range ends the file. Bytes that are not UTF-8 are
    decoded as U+FFFD and counted."""
    for path, start, stop in parts:
        ends_file = stop >= os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(start)
            pieces = _pieces(f, stop - start)
            piece = next(pieces, None)
            while piece is not None:
                following = next(pieces, None)
                text, bad = decode_counting(piece)
                yield {column: text, FILE: path, CONTINUES: following is not None or not ends_file, BAD_BYTES: bad}
                piece = following


def _pieces(f, size: int | None = None) -> Iterator[bytes]:
    """The next `size` bytes of `f` (all when None) in pieces of PIECE_BYTES / 2 to 2 * PIECE_BYTES, each cut
    after a line break in its second half where it has one, else at the start of a UTF-8 character."""
    rest, left = b"", math.inf if size is None else size
    while left > 0 and (block := f.read(int(min(PIECE_BYTES, left)))):
        left -= len(block)
        data = rest + block
        cut = data.rfind(b"\n", len(data) // 2) + 1 or _utf8_boundary(data) or len(data)
        rest = data[cut:]
        yield data[:cut]
    if rest:
        yield rest


def _utf8_boundary(data: bytes) -> int:
    """len(data), or the start of its last character when that character is incomplete."""
    start = len(data) - 1
    while start > 0 and len(data) - start < 4 and 0x80 <= data[start] < 0xC0:  # back over continuation bytes
        start -= 1
    lead = data[start]
    length = 4 if lead >= 0xF0 else 3 if lead >= 0xE0 else 2 if lead >= 0xC0 else 1
    return start if start + length > len(data) else len(data)


def decode_counting(piece: bytes) -> tuple[str, int]:
    """(text, number of bytes that are not UTF-8): each such byte becomes U+FFFD."""
    try:
        return piece.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = piece.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - piece.count("\ufffd".encode())


def report_bad_bytes(datasets_, say: Callable[[str], None]) -> None:
    """One warning for all text rows holding bytes that were not UTF-8: how many, and in which files."""
    per_file: dict[str, int] = {}
    for rows in datasets_:
        if BAD_BYTES not in rows.column_names:
            continue
        counts = rows.data.column(BAD_BYTES).to_numpy()
        for row in np.flatnonzero(counts):
            path = rows.data.column(FILE)[int(row)].as_py()
            per_file[path] = per_file.get(path, 0) + int(counts[row])
    if per_file:
        listed = ", ".join(f"{path} ({n} bytes)" for path, n in itertools.islice(per_file.items(), 5))
        say(f"warning: {sum(per_file.values())} bytes that are not UTF-8 were read as U+FFFD (the replacement "
            f"character) in {len(per_file)} file(s): {listed}; convert such files to UTF-8 (e.g. `iconv -f latin1 "
            "-t utf-8`) to keep those characters")


# ----------------------------------------------------------------------------- the text column

def as_text(value) -> str | None:
    """A row's text: a string as it is, a number as its decimal text, anything else (missing, null, NaN, a list,
    an object, a boolean) None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    return None


def check_text(rows, column: str, name: str, say: Callable[[str], None]) -> None:
    """Refuse `rows` without `column` or without a row of text; warn about rows left out (missing, null, empty or
    not text) and numbers read as text. Text files' rows are text by construction."""
    import datasets
    import pyarrow.compute as pc

    if column not in rows.column_names:
        raise DataError(f"{name!r} has no column {column!r} (columns: {', '.join(rows.column_names)}); "
                        "set --text_column")
    if CONTINUES in rows.column_names:
        return
    counts = {"missing or null": 0, "empty": 0, "not text": 0, "numbers": 0}
    feature = rows.features[column]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        values = rows.data.column(column)
        counts["missing or null"] = values.null_count
        counts["empty"] = int(pc.sum(pc.equal(values, "")).as_py() or 0)
    else:  # numbers, booleans, lists or a mix (datasets' Json feature): look at each value
        for batch in rows.select_columns([column]).iter(batch_size=10_000):
            for value in batch[column]:
                kind = _unusual(value)
                if kind:
                    counts[kind] += 1
    numbers = counts.pop("numbers")
    left_out = sum(counts.values())
    if left_out == rows.num_rows:
        raise DataError(f"{name!r}: none of its {rows.num_rows} rows has text in column {column!r} "
                        f"({_counted(counts)}); set --text_column (columns: {', '.join(rows.column_names)})")
    if left_out:
        say(f"warning: {name}: {left_out} of {rows.num_rows} rows have no text in column {column!r} and are left "
            f"out ({_counted(counts)})")
    if numbers:
        say(f"warning: {name}: column {column!r} holds numbers in {numbers} of {rows.num_rows} rows; they are read "
            "as their decimal text (set --text_column if this is not the text)")


def _unusual(value) -> str | None:
    """How check_text counts a value that is not a non-empty string: "missing or null", "not text", "empty" (all
    three left out) or "numbers" (read as text); None for a string with text."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "missing or null"
    text = as_text(value)
    if text is None:
        return "not text"
    if not text:
        return "empty"
    return None if isinstance(value, str) else "numbers"


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{why}: {n}" for why, n in counts.items() if n)


def _texts(rows, column: str) -> Iterator[str]:
    for batch in rows.select_columns([column]).iter(batch_size=rows_per_batch(rows)):
        yield from filter(None, map(as_text, batch[column]))


def rows_per_batch(rows) -> int:
    """Rows per batch so that a batch holds about TOKENIZE_BATCH_BYTES of text (1000 rows at most)."""
    row_bytes = rows.data.nbytes / max(1, len(rows.data))
    return max(1, min(1000, int(TOKENIZE_BATCH_BYTES // max(1.0, row_bytes))))


# ----------------------------------------------------------------------------- tokenizing and packing

def _tokenize_batch(batch: dict, tokenizer: Tokenizer, column: str, dtype: str) -> dict:
    texts, ends = [], []
    continues = batch.get(CONTINUES) or [False] * len(batch[column])
    for value, goes_on in zip(batch[column], continues, strict=True):
        text = as_text(value)
        if text:  # a row without text has nothing to predict (check_text counted it)
            texts.append(text)
            ends.append(not goes_on)
    # numpy arrays, not lists of ints: a list costs 8 bytes per token and more, this 2 or 4
    return {"ids": [np.asarray(ids, dtype=dtype) for ids in encode_rows(tokenizer, texts, ends)]}


def tokenize(rows, tokenizer: Tokenizer, column: str):
    """`rows` -> a dataset with one `ids` list per row with text (cached by `datasets` for file sources); the
    end-of-text token after each document's last row."""
    import datasets

    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "int32"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # processes pay off only on big data: 20,000 rows or 64 MiB each
    num_proc = min(cores, max(rows.num_rows // 20_000, rows.data.nbytes >> 26)) or None
    batch_size = rows_per_batch(rows)
    return rows.map(
        _tokenize_batch, batched=True, batch_size=batch_size, writer_batch_size=batch_size, num_proc=num_proc,
        remove_columns=rows.column_names, fn_kwargs={"tokenizer": tokenizer, "column": column, "dtype": dtype},
        features=datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype))}), desc="tokenizing",
    )


class TokenStream:
    """All token ids of a tokenized dataset as one stream, read zero-copy from its Arrow buffers."""

    def __init__(self, tokenized):
        column = tokenized.data.table.column("ids")
        self.parts = [chunk.flatten().to_numpy(zero_copy_only=True) for chunk in column.chunks]
        self.parts = [p for p in self.parts if len(p)]
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
        inputs, targets = pairs(*self.__getitems__([i]))
        return inputs[0], targets[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, bool]:
        """Sequences `indices` as rows of block_size + 1 tokens (-1 past the end of the stream), and whether
        all of them are whole; `pairs` cuts them into inputs and targets. One gather for the lot: the
        DataLoader calls this with a batch's indices, and a tensor per sequence costs far more."""
        T, index, last = self.block_size, np.asarray(indices, dtype=np.int64), max(indices)
        if last < self.n_whole:
            return torch.from_numpy(self.stream.windows(index * T, T + 1, last_start=last * T)), True
        # a partial or padding sequence (evaluation); a padding index starts past the end of the stream: all -1
        return torch.from_numpy(self.stream.windows(np.where(index < self.n, index * T, self.stream.n_tokens),
                                                    T + 1)), False


def pairs(rows: torch.Tensor, whole: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of rows of block_size + 1 tokens: views of the rows when every sequence is whole,
    else with a missing target set to IGNORE_INDEX (and its input to 0)."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    if whole:
        return inputs, targets
    missing = targets < 0
    return inputs.masked_fill(missing, 0), targets.masked_fill(missing, IGNORE_INDEX)


class EpochPermutation(Sampler[int]):
    """The first `num_samples` indices of a permutation of range(n) seeded by (seed, epoch).

    The permutation depends only on the seed and the epoch -- not on the world size or on how many
    epochs ran in this process -- so any rank, any launch and any resume draws the same order.
    """

    def __init__(self, n: int, num_samples: int, seed: int, global_batch: int):
        self.n, self.num_samples, self.seed, self.global_batch = n, num_samples, seed, global_batch
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Draw `epoch`'s order, leaving out its first `skip_batches` global batches (a resumed run's)."""
        self.epoch, self.skip = epoch, skip_batches * self.global_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        permutation = torch.randperm(self.n, generator=generator)[self.skip: self.num_samples]
        for chunk in permutation.split(1 << 16):  # never a Python list of every index
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
        reads = _Reads(batch_sampler, accelerator.process_index, self.batch_size, ahead)
        # pinned host memory lets the copy to a GPU overlap compute
        self.loader = DataLoader(sequences, batch_sampler=reads, collate_fn=_already_read, num_workers=num_workers,
                                 persistent_workers=num_workers > 0, pin_memory=self.device.type == "cuda",
                                 generator=_private_generator(), worker_init_fn=_leave_stop_signals_to_the_trainer)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Begin `epoch`'s shuffle, leaving out its first `skip_batches` global batches (a resumed epoch)."""
        self.batch_sampler.sampler.set_epoch(epoch, skip_batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for rows, whole in self.loader:
            inputs, targets = pairs(rows.to(self.device, non_blocking=True), whole)
            for start in range(0, len(inputs), self.batch_size):
                yield inputs[start: start + self.batch_size], targets[start: start + self.batch_size]

    def __len__(self) -> int:
        return len(self.batch_sampler)


READ_AHEAD_BATCHES, READ_AHEAD_BYTES = 16, 8 << 20  # a read: at most 16 batches and 8 MiB


class _Reads(Sampler[list[int]]):
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
                 num_workers: int = 0) -> BatchLoader:
    """Shuffled global batches; each epoch's remainder that cannot fill an optimizer step is dropped."""
    global_batch = batch_size * accelerator.num_processes
    micro_batches = len(sequences) // global_batch // grad_accum * grad_accum
    sampler = EpochPermutation(len(sequences), micro_batches * global_batch, seed, global_batch)
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

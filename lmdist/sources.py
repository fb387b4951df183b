"""Where the rows come from: a source spec in, `datasets.Dataset` rows of text out.

The contract: `check_source` fails fast on a local path that cannot be data; `load_rows` gives the training
rows, the validation rows and a description of a source that is not text files (lmdist.shards reads those as
byte ranges, `split_text_bytes` cutting off their validation part); `load_dataset_dict` gives one source's splits and
`pick_split` one of them; `check_text` refuses rows without text and warns about rows left out. Every row
holds its text in the text column; `as_text` is the text the tokenizer sees. Rows of text files also hold
FILE, CONTINUES and BAD_BYTES. A problem the user can fix is a DataError; warnings go to `say`. Nothing
here tokenizes (lmdist.shards does) or packs (lmdist.data does), and nothing here imports either.

A source is "builtin", a local file, folder or glob, a `save_to_disk` folder, or a hub dataset name. Text is
read as written. A plain-text file (any file that is not .json/.jsonl/.csv/.parquet and holds no NUL byte in
its first 8 KiB) is one document: its line breaks are tokens, and the end-of-text token follows its last
character only. It is read in pieces of about PIECE_BYTES, cut after a line break where the piece has one and
never inside a UTF-8 character, so memory stays bounded whatever the file's size; a row of
(text, file, continues, bad_bytes) per piece, where `continues` says the next row goes on with the same
document. A row of a json/jsonl/csv/parquet source (or a saved or hub dataset) is one document.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from lmdist import corpus
from lmdist.config import TrainConfig
from lmdist.errors import DataError, first_line

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


def warn(message: str) -> None:
    print(f"lmdist: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- finding rows

SAVED, HUB = "save_to_disk", "hub"  # what `locate` returns for a spec that is not local files


def locate(spec: str) -> LocalFiles | str:
    """Where a dataset spec's rows are -- SAVED (a `save_to_disk` folder), the LocalFiles it names, or HUB (a hub
    dataset name) -- the one place that tells them apart; a local path that is not data is a DataError."""
    if is_saved_dataset(spec):
        return SAVED
    return local_files(spec) if looks_local(spec) else HUB


def check_source(spec: str) -> None:
    """Fail fast on a local path that is missing, empty or holds no data file (hub names are checked when loaded)."""
    if spec == "builtin":
        return
    found = locate(spec)
    if isinstance(found, LocalFiles) and len(found.files) == 1 and os.path.getsize(found.files[0]) == 0:
        raise DataError(f"dataset file {found.files[0]} is empty")


def load_rows(cfg: TrainConfig, say: Callable[[str], None] = warn):
    """(training rows, validation rows, source description) as `datasets.Dataset`s, of a source that is not text
    files (lmdist.shards reads those) and has no `val_dataset`.

    Validation: the source's validation (or valid, or test) split, else the tail of the training data -- of its
    text for a single document, of its rows otherwise.
    """
    import datasets

    if cfg.dataset == "builtin":
        docs = corpus.builtin_documents()
        loaded = datasets.DatasetDict({"train": datasets.Dataset.from_dict({cfg.text_column: docs})})
        source = {"dataset": "builtin", "modules": len(docs), "corpus_fingerprint": corpus.fingerprint(docs)}
    else:
        loaded = load_dataset_dict(cfg.dataset, cfg, say)
        source = {"dataset": cfg.dataset, "splits": {k: v.num_rows for k, v in loaded.items()}}
    train = pick_split(loaded, ("train",), cfg.dataset)
    check_text(train, cfg.text_column, cfg.dataset, say)
    held_out = next((name for name in VAL_SPLITS if name in loaded and loaded[name] is not train), None)
    if held_out:
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
    found = locate(spec)
    return found if isinstance(found, LocalFiles) and found.kind == TEXT else None


def is_saved_dataset(spec: str) -> bool:
    return os.path.isdir(spec) and any(os.path.exists(os.path.join(spec, m)) for m in SAVED_DATASET_MARKERS)


def load_dataset_dict(spec: str, cfg: TrainConfig, say: Callable[[str], None] = warn):
    """A DatasetDict from a local file/folder/glob, a save_to_disk folder or a hub name."""
    import datasets

    found = locate(spec)
    if found == SAVED:
        loaded = datasets.load_from_disk(spec)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    if isinstance(found, LocalFiles):
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
                        f"{type(e).__name__}: {first_line(e)} -- check the name and "
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
                        f"{first_line(cause)}") from None


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
    candidates = list(filter(os.path.isfile, candidates))
    read_as = {}  # each file once, however many links name it (GPL -> GPL-3): by its own name where it has one
    for candidate in sorted(candidates, key=os.path.islink):
        read_as.setdefault(os.path.realpath(candidate), candidate)
    for candidate in candidates:
        if read_as[os.path.realpath(candidate)] != candidate:
            left_out[candidate] = f"the same file as {read_as[os.path.realpath(candidate)]}"
            continue
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

def split_text_bytes(files: list[str], cfg: TrainConfig):
    """(training byte ranges, validation byte ranges, source) of text files without a validation source, each range
    (path, start, stop): validation is their last val_fraction of bytes (moved to the start of a UTF-8 character),
    cutting the file it falls in."""
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
    return train_parts, val_parts, source


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


def piece_cuts(path: str, start: int, stop: int, window: int = 1 << 16) -> list[int]:
    """The offsets at which `_pieces` cuts bytes [start, stop) of `path`, `start` and `stop` included, found with
    small reads: each cut is the last line break in the second half of what `_pieces` holds there, read backwards
    from its end (a line or two), else where `_utf8_boundary` puts it. So a file's pieces -- and the tokens of
    tokenizers that learn across a cut -- are the same whatever groups of them are tokenized together."""
    cuts, read_to = [start], start  # _pieces holds bytes [cuts[-1], read_to) after each read
    with open(path, "rb") as f:
        while read_to < stop:
            read_to = min(read_to + PIECE_BYTES, stop)
            held_from = cuts[-1]
            half = held_from + (read_to - held_from) // 2
            cut, end = 0, read_to
            while not cut and end > half:  # the last line break at or after `half`
                f.seek(max(half, end - window))
                block = f.read(end - max(half, end - window))
                cut = max(half, end - window) + block.rfind(b"\n") + 1 if b"\n" in block else 0
                end -= len(block)
            if not cut:
                tail_from = max(held_from, read_to - 4)  # _utf8_boundary looks at the last 3 bytes at most
                f.seek(tail_from)
                cut = tail_from + _utf8_boundary(f.read(read_to - tail_from))
                cut = cut if cut > held_from else read_to
            cuts.append(cut)
        if cuts[-1] != stop:
            cuts.append(stop)
    return cuts


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
        say(report_bad_bytes_of(per_file))


def report_bad_bytes_of(per_file: dict[str, int]) -> str:
    """The warning about bytes that were not UTF-8, from their count per file."""
    listed = ", ".join(f"{path} ({n} bytes)" for path, n in itertools.islice(per_file.items(), 5))
    return (f"warning: {sum(per_file.values())} bytes that are not UTF-8 were read as U+FFFD (the replacement "
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


def rows_per_batch(rows) -> int:
    """Rows per batch so that a batch holds about TOKENIZE_BATCH_BYTES of text (1000 rows at most)."""
    row_bytes = rows.data.nbytes / max(1, len(rows.data))
    return max(1, min(1000, int(TOKENIZE_BATCH_BYTES // max(1.0, row_bytes))))

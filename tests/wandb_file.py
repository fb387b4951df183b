"""Minimal reader for W&B offline run files (``run-<id>.wandb``), checked against wandb 0.31.0.

File layout (a LevelDB-style log):

* 7-byte file header ``<4sHB``: ``b":W&B"``, magic ``0xBEE1``, version ``0``;
* then 32 KiB blocks (the file header counts towards the first block) holding chunks, each with
  a 7-byte header ``<IHB`` (crc32, payload length, chunk type) followed by the payload;
  types: 1 = full, 2 = first, 3 = middle, 4 = last; a block tail shorter than 7 bytes is zero padding;
* the reassembled payloads are serialized ``wandb.proto.wandb_internal_pb2.Record`` messages.

CRC: wandb uses the plain (unmasked) IEEE crc32 -- ``zlib.crc32`` -- of the type byte followed by the
payload, *not* LevelDB's masked crc32c. wandb 0.31 writes the file from its Go ``wandb-core`` binary, so
there is no Python writer left to read; this was established empirically on files written by 0.31.0
(every chunk matches) and agrees with the Python writer of older wandb releases (``wandb/sdk/internal/datastore.py``:
``zlib.crc32(data, crc_of_type_byte)``).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from wandb.proto.wandb_internal_pb2 import Record

FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
BLOCK_LEN = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunk_crc(chunk_type: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(bytes([chunk_type])))


def read_records(path: str | os.PathLike[str]) -> list[Record]:
    """Parse every record of a ``.wandb`` file, reassembling chunked records.

    Raises ValueError on a bad file header, broken framing, a crc mismatch or a truncated record.
    """
    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER.size:
        raise ValueError(f"{path}: too short for a W&B file header")
    ident, magic, version = FILE_HEADER.unpack_from(data)
    if (ident, magic, version) != (IDENT, MAGIC, VERSION):
        raise ValueError(f"{path}: bad file header {(ident, hex(magic), version)}")

    records: list[Record] = []
    pending: bytearray | None = None  # payload of a record whose FIRST chunk has been seen
    pos = FILE_HEADER.size
    while pos < len(data):
        block_left = BLOCK_LEN - pos % BLOCK_LEN
        if block_left < CHUNK_HEADER.size:
            if data[pos : pos + block_left].strip(b"\0"):
                raise ValueError(f"{path}: non-zero block padding at offset {pos}")
            pos += block_left
            continue
        if pos + CHUNK_HEADER.size > len(data):
            raise ValueError(f"{path}: truncated chunk header at offset {pos}")
        crc, length, chunk_type = CHUNK_HEADER.unpack_from(data, pos)
        start = pos + CHUNK_HEADER.size
        end = start + length
        if length > block_left - CHUNK_HEADER.size or end > len(data):
            raise ValueError(f"{path}: chunk at offset {pos} overruns its block or the file")
        payload = data[start:end]
        if _chunk_crc(chunk_type, payload) != crc:
            raise ValueError(f"{path}: crc mismatch in chunk at offset {pos}")

        complete: bytes | None = None
        if chunk_type == FULL and pending is None:
            complete = payload
        elif chunk_type == FIRST and pending is None:
            pending = bytearray(payload)
        elif chunk_type in (MIDDLE, LAST) and pending is not None:
            pending += payload
            if chunk_type == LAST:
                complete, pending = bytes(pending), None
        else:
            raise ValueError(f"{path}: unexpected chunk type {chunk_type} at offset {pos}")
        if complete is not None:
            record = Record()
            record.ParseFromString(complete)
            records.append(record)
        pos = end
    if pending is not None:
        raise ValueError(f"{path}: file ends inside a chunked record")
    return records


def _item_key(item: Any) -> str:
    # wandb-core writes history keys as nested_key (a flat "train/loss" becomes ["train/loss"], a logged
    # {"train": {"loss": ...}} becomes ["train", "loss"]); a flat item.key is honoured too.
    return item.key or "/".join(item.nested_key)


def history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One dict per history record: '/'-joined key -> decoded JSON value (incl. ``_step``)."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {_item_key(item): json.loads(item.value_json) for item in record.history.item}
        if "_step" not in row and record.history.HasField("step"):
            row["_step"] = record.history.step.num
        rows.append(row)
    return rows


def _unwrap(value: Any) -> Any:
    # config.yaml style {"desc": ..., "value": ...}; wandb 0.31 does not wrap values in the .wandb file.
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
        return value["value"]
    return value


def config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Merged run config: the run record's initial config, then every config record in order.

    Values are JSON-decoded and unwrapped from ``{"value": ...}``; items with a nested_key are set
    into nested dicts; removals are applied; top-level keys starting with "_" (e.g. ``_wandb``) are dropped.
    """
    merged: dict[str, Any] = {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            cfg = record.run.config  # wandb.init(config=...) lands here, not in a config record
        elif kind == "config":
            cfg = record.config
        else:
            continue
        for item in cfg.update:
            keys = [item.key] if item.key else list(item.nested_key)
            target = merged
            for k in keys[:-1]:
                target = target.setdefault(k, {})
            target[keys[-1]] = _unwrap(json.loads(item.value_json))
        for item in cfg.remove:
            keys = [item.key] if item.key else list(item.nested_key)
            target = merged
            for k in keys[:-1]:
                target = target.get(k, {})
            target.pop(keys[-1], None)
    return {k: v for k, v in merged.items() if not k.startswith("_")}


def find_offline_runs(folder: str | os.PathLike[str]) -> list[str]:
    """All ``offline-run-*`` directories below ``folder`` (recursive), sorted."""
    return sorted(str(p) for p in Path(folder).rglob("offline-run-*") if p.is_dir())


def run_file(run_dir: str | os.PathLike[str]) -> str:
    """The single ``run-<id>.wandb`` file inside a run directory."""
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb in {run_dir}, found {len(files)}")
    return str(files[0])


def records_of(path: str | os.PathLike[str], kind: str) -> list[Any]:
    """The messages of every record of type `kind` (``run``, ``metric``, ``artifact``, ...), in order."""
    return [getattr(r, kind) for r in read_records(path) if r.WhichOneof("record_type") == kind]


def summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The run summary as its summary records leave it: '/'-joined key -> decoded JSON value."""
    merged: dict[str, Any] = {}
    for record in records_of(path, "summary"):
        for item in record.update:
            merged[_item_key(item)] = json.loads(item.value_json)
    return merged

"""The baseline of bench/run.py's data section: nanoGPT-style token preparation of one text file.

    python bench/prepare_baseline.py TEXT_FILE OUT_DIR [--tokenizer byte|FOLDER] [--processes N] [--val_fraction F]

What nanoGPT's `data/*/prepare.py` does, written for speed rather than generality: the file's last `val_fraction`
of bytes is validation, the rest training, each split one flat uint16 memmap (`train.bin`, `val.bin`) with the
end-of-text id after the file's last token. Each split is cut after line breaks into one byte range per process,
and each process reads its range a piece of about 1 MiB at a time:
- the byte tokenizer: the bytes themselves, written straight into the split's memmap at their own offset (a byte
  is a token, so every offset is known beforehand: one pass, nothing copied);
- a `tokenizers` folder: `encode_batch_fast` of the pieces (ids without offsets), one thread per process as
  lmdist's workers run it, into a part file; the parts are then copied into the memmap once their counts are
  known (nanoGPT's openwebtext tokenizes first and writes the memmap after, likewise).
Nothing else: no manifest, no document index, no check that the text is UTF-8, no reuse, no lock, no progress
bar. Prints the token counts and seconds as one JSON line.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import time

import numpy as np

PIECE = 1 << 20  # bytes of text per piece
BATCH = 8  # pieces per encode_batch call
COPY = 1 << 26  # tokens per copy of a part into the memmap


def cut_after_line_break(f, offset: int, stop: int) -> int:
    f.seek(offset)
    found = f.read(min(PIECE, stop - offset)).find(b"\n")
    return offset + found + 1 if found >= 0 else offset


def ranges(path: str, start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    with open(path, "rb") as f:
        cuts = [start] + [cut_after_line_break(f, start + (stop - start) * i // parts, stop) for i in range(1, parts)]
    return [(a, b) for a, b in itertools.pairwise([*cuts, stop]) if b > a]


def pieces(path: str, start: int, stop: int):
    """Bytes [start, stop) in pieces of about PIECE, each ending after a line break where it has one (no UTF-8
    character or word is cut)."""
    with open(path, "rb") as f:
        f.seek(start)
        while start < stop:
            piece = f.read(min(PIECE, stop - start))
            cut = piece.rfind(b"\n") + 1 if start + len(piece) < stop else len(piece)
            piece = piece[:cut or len(piece)]
            start += len(piece)
            f.seek(start)
            yield piece


def tokenize_range(job: tuple) -> int:
    """Tokenize bytes [start, stop) of the file (the module's docstring says where to); the token count."""
    path, start, stop, tokenizer, out, at, eos = job
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the processes use the cores
    ids_after = [] if eos is None else [eos]
    if tokenizer == "byte":
        flat = np.memmap(out, dtype=np.uint16, mode="r+")
        count = 0
        for piece in pieces(path, start, stop):
            flat[at + count: at + count + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            count += len(piece)
        flat[at + count: at + count + len(ids_after)] = ids_after
        flat.flush()
        return count + len(ids_after)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer, "tokenizer.json"))
    count = 0
    with open(out, "wb") as f:
        texts = (piece.decode("utf-8", errors="replace") for piece in pieces(path, start, stop))
        while batch := list(itertools.islice(texts, BATCH)):
            for encoding in tok.encode_batch_fast(batch, add_special_tokens=False):
                np.asarray(encoding.ids, dtype=np.uint16).tofile(f)
                count += len(encoding.ids)
        np.asarray(ids_after, dtype=np.uint16).tofile(f)
    return count + len(ids_after)


def eos_id(tokenizer: str) -> int:
    if tokenizer == "byte":
        return 256
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer, "tokenizer.json"))
    return next(tok.token_to_id(t) for t in ("<eos>", "<|endoftext|>", "</s>") if tok.token_to_id(t) is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text_file")
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", default="byte", help="byte, or a folder holding a tokenizer.json")
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--val_fraction", type=float, default=0.05)
    args = parser.parse_args()
    began = time.perf_counter()
    size = os.path.getsize(args.text_file)
    with open(args.text_file, "rb") as f:
        val_start = cut_after_line_break(f, int(size * (1 - args.val_fraction)), size)
    os.makedirs(args.out_dir, exist_ok=True)
    eos, byte = eos_id(args.tokenizer), args.tokenizer == "byte"
    jobs, tokens = [], {}
    for split, (start, stop) in (("train", (0, val_start)), ("val", (val_start, size))):
        flat = os.path.join(args.out_dir, f"{split}.bin")
        if byte:  # every token's place is known: the memmap is made now and filled in place
            tokens[split] = stop - start + (split == "val")
            np.memmap(flat, dtype=np.uint16, mode="w+", shape=(tokens[split],)).flush()
        for i, (a, b) in enumerate(ranges(args.text_file, start, stop, args.processes)):
            jobs.append((args.text_file, a, b, args.tokenizer, flat if byte else f"{flat}.part{i}", a - start,
                         eos if b == size else None))
    with multiprocessing.get_context("fork").Pool(args.processes) as pool:
        counts = pool.map(tokenize_range, jobs, chunksize=1)
    if not byte:  # the parts, in order, into one memmap per split
        for split in ("train", "val"):
            parts = [(job[4], n) for job, n in zip(jobs, counts, strict=True) if job[4].startswith(
                os.path.join(args.out_dir, f"{split}.bin.part"))]
            tokens[split] = sum(n for _, n in parts)
            flat = np.memmap(os.path.join(args.out_dir, f"{split}.bin"), dtype=np.uint16, mode="w+",
                             shape=(tokens[split],))
            at = 0
            for part, n in parts:
                ids = np.memmap(part, dtype=np.uint16, mode="r") if n else np.zeros(0, np.uint16)
                for begin in range(0, n, COPY):
                    chunk = ids[begin: begin + COPY]
                    flat[at: at + len(chunk)] = chunk
                    at += len(chunk)
                del ids
                os.remove(part)
            flat.flush()
    print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - began}))


if __name__ == "__main__":
    main()

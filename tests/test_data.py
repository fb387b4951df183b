"""Data: sources, tokenizers, packing, sampling, and the errors a user meets."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmdist import corpus, data
from lmdist.config import TrainConfig
from lmdist.data import (
    IGNORE_INDEX,
    EpochPermutation,
    PackedSequences,
    eval_loader,
    inputs_and_targets,
    train_loader,
)
from lmdist.errors import DataError
from lmdist.sources import load_rows
from lmdist.token_streams import TokenStream, tokenize
from lmdist.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    VocabTokenizer,
    build_tokenizer,
    encode_rows,
    load_tokenizer,
)
from tests.conftest import TINY_GPT, launch

TEXT = ["the cat sat on the mat", "", "the dog sat", "a cat and a dog"]


def stream_of(rows: list[list[int]]) -> TokenStream:
    return TokenStream([np.asarray(row, dtype=np.uint16) for row in rows])


# ----------------------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("kind", ["byte", "char", "word", "bpe"])
def test_tokenizers_round_trip_and_save(kind, tmp_path):
    tok = build_tokenizer(kind, lambda: iter(TEXT * 50), vocab_size=300, min_freq=1)
    ids = tok.encode("the cat sat")
    assert tok.decode(ids) == "the cat sat"
    assert max(ids) < tok.vocab_size and tok.eos_id is not None and tok.eos_id not in ids
    tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.encode("a dog on the mat") == tok.encode("a dog on the mat") and again.vocab_size == tok.vocab_size


def test_word_vocabulary_is_from_training_text_with_unk_and_min_freq():
    tok = VocabTokenizer.train("word", ["a a a b b c"], min_freq=2)
    assert tok.symbols == ["<unk>", "<eos>", "a", "b"]  # most frequent first; c is rarer than min_freq
    assert tok.encode("a c zebra b") == [2, 0, 0, 3]
    assert encode_rows(tok, ["a b", "b"]) == [[2, 3, 1], [3, 1]]  # <eos> after every row


def test_char_and_byte_tokenizers():
    assert ByteTokenizer().encode("é") == [0xC3, 0xA9] and ByteTokenizer().vocab_size == 257
    tok = VocabTokenizer.train("char", ["abba"], min_freq=1)
    assert tok.decode(tok.encode("abz")) == "ab<unk>"


def test_tokenizer_folder(tmp_path):
    trained = HFTokenizer.train_bpe(iter(TEXT * 20), vocab_size=280)
    trained.tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    tok = build_tokenizer(str(tmp_path), lambda: iter(()), 0, 1)
    assert tok.kind == "folder" and tok.eos_id == trained.eos_id and tok.encode("the cat") == trained.encode("the cat")


# ----------------------------------------------------------------------------- packing and sampling

def test_token_stream_reads_across_parts():
    stream = stream_of([[1, 2, 3, 4], [], [5, 6, 7]])
    assert stream.n_tokens == 7 and len(stream.parts) == 2
    assert stream.slice(2, 4).tolist() == [3, 4, 5, 6] and stream.slice(5, 10).tolist() == [6, 7]


def test_batched_windows_equal_slices_across_parts_and_the_end():
    stream = stream_of([list(range(k * 10, k * 10 + 10)) for k in range(5)])  # 50 tokens in 5 parts
    assert len(stream.parts) == 5
    starts = np.array([0, 7, 10, 13, 38, 45, 47, 50, 60])  # inside, straddling, ending the stream, past it
    rows = stream.windows(starts, 4)
    for start, row in zip(starts, rows, strict=True):
        piece = stream.slice(int(start), 4).tolist() if start < 50 else []
        assert row.tolist() == piece + [-1] * (4 - len(piece))
    sequences = PackedSequences(stream, block_size=4, keep_partial=True)  # 13 sequences, the last one partial
    inputs, targets = inputs_and_targets(*sequences.__getitems__(list(range(14))))  # and one past the end
    for i in range(14):
        assert inputs[i].tolist() == sequences[i][0].tolist() and targets[i].tolist() == sequences[i][1].tolist()
    assert inputs[12].tolist() == [48, 0, 0, 0]
    assert targets[12].tolist() == [49, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_packing_targets_every_token_once():
    stream = stream_of([list(range(10))])  # 10 tokens: 9 targets
    full = PackedSequences(stream, block_size=4, keep_partial=False)
    assert len(full) == 2
    x, y = full[1]
    assert x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8]
    padded = PackedSequences(stream, block_size=4, keep_partial=True)
    assert len(padded) == 3
    x, y = padded[2]
    assert x.tolist()[:1] == [8] and y.tolist() == [9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    targets = torch.cat([padded[i][1] for i in range(len(padded))])
    assert sorted(targets[targets != IGNORE_INDEX].tolist()) == list(range(1, 10))
    assert (padded[3][1] == IGNORE_INDEX).all()  # past the end: an all-ignored pad sequence


def test_shuffle_depends_only_on_seed_and_epoch():
    a, b = EpochPermutation(100, 96, seed=5, global_batch=4), EpochPermutation(100, 96, seed=5, global_batch=4)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b) and len(set(a)) == 96
    b.set_epoch(4)
    assert list(a) != list(b)
    b.set_epoch(3, skip_batches=5)  # a resumed epoch: the same order without its first 5 global batches
    assert list(b) == list(a)[20:] and len(b) == 76


def place(rank: int = 0, world_size: int = 1) -> SimpleNamespace:
    """What the loaders use of an Accelerator."""
    return SimpleNamespace(process_index=rank, num_processes=world_size, device=torch.device("cpu"))


def test_train_loader_drops_the_remainder():
    seqs = PackedSequences(stream_of([list(range(330))]), block_size=8, keep_partial=False)  # 41 sequences
    loader = train_loader(seqs, batch_size=2, grad_accum=3, seed=0, accelerator=place(0, 2))
    batches = list(loader.batch_sampler)
    # 41 // 4 = 10 global batches, cut to 9 (a multiple of grad_accum): 36 sequences, none twice
    assert len(batches) == 9 and all(len(b) == 4 for b in batches) and len(loader) == 9
    assert len({i for b in batches for i in b}) == 36


@pytest.mark.parametrize("ahead", [1, 4, 16])  # reads of one batch, of several (the last one short), of all
def test_ranks_share_each_global_batch_in_order(ahead, monkeypatch):
    monkeypatch.setattr(data, "READ_AHEAD_BATCHES", ahead)
    seqs = PackedSequences(stream_of([list(range(330))]), block_size=8, keep_partial=False)  # 41 sequences
    one, *ranks = (train_loader(seqs, batch_size=b, grad_accum=1, seed=3, accelerator=place(r, w))
                   for b, r, w in ((4, 0, 1), (2, 0, 2), (2, 1, 2)))
    for loader in (one, *ranks):
        loader.set_epoch(2, skip_batches=1)
    expected = [inputs_and_targets(*seqs.__getitems__(batch)) for batch in one.batch_sampler]
    assert len(expected) == 9  # 10 global batches in the epoch, the first skipped
    for (inputs, targets), *shares in zip(one, *ranks, strict=True):
        want_inputs, want_targets = expected.pop(0)
        assert torch.equal(inputs, want_inputs) and torch.equal(targets, want_targets)
        assert torch.equal(torch.cat([share[0] for share in shares]), inputs)
        assert torch.equal(torch.cat([share[1] for share in shares]), targets)
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # each target is the next input


def test_eval_loader_pads_to_whole_batches_and_limits():
    seqs = PackedSequences(stream_of([list(range(50))]), block_size=4, keep_partial=True)  # 13 sequences
    batches = list(eval_loader(seqs, batch_size=3, accelerator=place(0, 2)).batch_sampler)
    assert [len(b) for b in batches] == [6, 6, 6]
    flat = [i for b in batches for i in b]
    assert flat[:13] == list(range(13)) and flat[13:] == [13] * 5
    assert len(list(eval_loader(seqs, batch_size=3, accelerator=place(0, 2), max_batches=1).batch_sampler)) == 1
    # rank 0's last batch: the partial sequence 12 and two pads; every target of the stream counted once
    targets = torch.cat([t for r in (0, 1) for _, t in eval_loader(seqs, batch_size=3, accelerator=place(r, 2))])
    assert sorted(targets[targets != IGNORE_INDEX].tolist()) == list(range(1, 50))
    last_inputs, last_targets = list(eval_loader(seqs, batch_size=3, accelerator=place(0, 2)))[-1]
    assert last_targets.tolist() == [[49, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 4,
                                     [IGNORE_INDEX] * 4]
    assert last_inputs.tolist() == [[48, 0, 0, 0], [0] * 4, [0] * 4]


# ----------------------------------------------------------------------------- sources

def cfg_for(dataset: str, **kw) -> TrainConfig:
    return TrainConfig(dataset=dataset, **kw)


def write_sources(folder) -> dict:
    import datasets

    lines = [f"line {i} of the text" for i in range(40)]
    (folder / "a.txt").write_text("\n".join(lines) + "\n")
    (folder / "b.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in lines))
    (folder / "c.csv").write_text("text\n" + "\n".join(lines) + "\n")
    datasets.Dataset.from_dict({"text": lines}).to_parquet(str(folder / "d.parquet"))
    datasets.Dataset.from_dict({"text": lines}).save_to_disk(str(folder / "saved"))
    (folder / "shards").mkdir()
    for i in range(2):
        (folder / "shards" / f"part{i}.txt").write_text("\n".join(lines[i * 20:(i + 1) * 20]) + "\n")
    return {"lines": lines}


@pytest.mark.parametrize("spec, extra", [("b.jsonl", {"text_column": "body"}), ("c.csv", {}), ("d.parquet", {}),
                                         ("saved", {})])
def test_local_sources_load_with_a_tail_validation_split(tmp_path, spec, extra):
    lines = write_sources(tmp_path)["lines"]
    cfg = cfg_for(str(tmp_path / spec), val_fraction=0.1, cache_dir=str(tmp_path / "c"), **extra)
    train, val, source = load_rows(cfg)
    column = extra.get("text_column", "text")
    assert train[column] == lines[:36] and val[column] == lines[36:]
    assert source["val_split"] == "last 4 of 40 rows"


@pytest.mark.parametrize("spec", ["a.txt", "shards", "shards/*.txt"])
def test_text_files_hold_out_the_tail_of_their_text(tmp_path, spec):
    lines = write_sources(tmp_path)["lines"]
    text = "\n".join(lines) + "\n"
    train, val, source = prepared_text(cfg_for(str(tmp_path / spec), val_fraction=0.1,
                                               tokens_dir=str(tmp_path / "t")))
    n_val = round(len(text) * 0.1)
    assert val == text[-n_val:] and train == text[:-n_val]
    assert source["val_split"] == f"last {n_val} of {len(text)} bytes"


def prepared_text(cfg: TrainConfig) -> tuple[str, str, dict]:
    """The training and validation text of `cfg`'s prepared byte tokens (end-of-text tokens left out)."""
    from lmdist import shards

    prepared = shards.prepare(cfg, print, True)
    train, val = (ByteTokenizer().decode(np.concatenate(prepared.streams[name]).tolist()) for name in ("train", "val"))
    return train, val, prepared.manifest["source"]


def test_a_saved_validation_split_is_used(tmp_path):
    import datasets

    splits = {"train": ["a b c"] * 5, "validation": ["held out"]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "saved"))
    train, val, source = load_rows(cfg_for(str(tmp_path / "saved")))
    assert train["text"] == splits["train"] and val["text"] == ["held out"] and source["val_split"] == "validation"


def test_val_dataset_and_single_document_split(tmp_path):
    (tmp_path / "one.txt").write_text("x" * 999 + "\n")
    train, val, _ = prepared_text(cfg_for(str(tmp_path / "one.txt"), val_fraction=0.25, tokens_dir=str(tmp_path / "t")))
    assert train == "x" * 750 and val == "x" * 249 + "\n"
    (tmp_path / "v.txt").write_text("held out\n")
    train, val, _ = prepared_text(cfg_for(str(tmp_path / "one.txt"), val_dataset=str(tmp_path / "v.txt"),
                                          tokens_dir=str(tmp_path / "t")))
    assert val == "held out\n" and train == "x" * 999 + "\n"


@pytest.mark.parametrize("make, spec, message", [
    (lambda d: None, "missing.txt", "does not exist"),
    (lambda d: (d / "empty.txt").write_text(""), "empty.txt", "is empty"),
    (lambda d: (d / "blob.bin").write_bytes(b"PK\0\3"), "blob.bin", "is not a data file: it holds NUL bytes"),
    (lambda d: (d / "e").mkdir(), "e", "holds no data file"),
])
def test_bad_local_sources(tmp_path, make, spec, message):
    from lmdist.sources import check_source

    make(tmp_path)
    with pytest.raises(DataError, match=message):
        check_source(str(tmp_path / spec))
        load_rows(cfg_for(str(tmp_path / spec)))


def test_missing_column_and_unreachable_hub(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x y"}) + "\n" + json.dumps({"body": "z"}) + "\n")
    with pytest.raises(DataError, match=r"has no column 'text'.*set --text_column"):
        load_rows(cfg_for(str(tmp_path / "b.jsonl"), cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match="could not load the hub dataset 'nobody-has/this-dataset-xyz'"):
        load_rows(cfg_for("nobody-has/this-dataset-xyz", cache_dir=str(tmp_path / "c")))


def test_builtin_corpus_is_fixed_and_fingerprinted():
    docs = corpus.builtin_documents()
    assert len(docs) == len(corpus.MODULES) and sum(map(len, docs)) > 1_000_000
    assert corpus.fingerprint(docs) == corpus.fingerprint(corpus.builtin_documents())
    assert corpus.fingerprint(docs) != corpus.fingerprint(docs[1:])


def test_tokenized_rows_skip_blank_lines_and_end_with_eos():
    import datasets

    tok = VocabTokenizer.train("word", TEXT, 1)
    stream = tokenize(datasets.Dataset.from_dict({"text": TEXT}), tok, "text")
    expected = [i for text in TEXT if text for i in [*tok.encode(text), tok.eos_id]]
    assert stream.slice(0, stream.n_tokens).tolist() == expected


# ----------------------------------------------------------------------------- errors reach the user

@pytest.mark.launch
@pytest.mark.parametrize("nproc", [1, 2])
def test_data_errors_exit_2_on_every_rank(tmp_path, nproc):
    """A missing path and a corpus too small for one batch: a clear message from every rank, no hang."""
    launcher = "torchrun" if nproc == 2 else "python"
    missing = launch([*TINY_GPT, "--dataset", str(tmp_path / "nope.txt"), "--output_dir", str(tmp_path / "a")],
                     cwd=tmp_path, nproc=nproc, launcher=launcher, timeout=120)
    (tmp_path / "small.txt").write_text("abcdefghij" * 10 + "\n")
    small = launch([*TINY_GPT, "--dataset", str(tmp_path / "small.txt"), "--output_dir", str(tmp_path / "b")],
                   cwd=tmp_path, nproc=nproc, launcher=launcher, timeout=120)
    for result, message in ((missing, "does not exist"), (small, "fewer than one optimizer step needs")):
        assert result.returncode == (2 if nproc == 1 else 1)  # launchers squash worker statuses to 1
        assert result.stderr.count(message) == nproc, result.stderr[-3000:]
        assert all(f"lmdist/{module}.py" not in result.stderr for module in ("data", "sources", "schedule"))

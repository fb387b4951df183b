"""Data is read as written: line breaks are tokens, end-of-text goes between documents, odd bytes and rows are
reported, any plain-text file trains, and a large file is read in bounded memory."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lmdist import sources, token_streams
from lmdist.config import TrainConfig
from lmdist.errors import DataError
from lmdist.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer
from tests.conftest import REPO, TINY_GPT, launch, run_ok, with_flags

EOS = ByteTokenizer.eos_id
WRITTEN = "first line\n\n  indented line\r\nno final line break: é € 😀"  # blank line, CRLF, UTF-8 of 2-4 bytes


def corpus_of(tmp_path, dataset: str, **fields) -> token_streams.Corpus:
    cfg = TrainConfig(dataset=dataset, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"), **fields)
    return token_streams.load_corpus(cfg, lambda build: build(), is_main=True)


def tokens(stream: token_streams.TokenStream) -> list[int]:
    return stream.slice(0, stream.n_tokens).tolist()


# ----------------------------------------------------------------------------- item 1: line breaks are text

@pytest.mark.parametrize("piece_bytes", [1 << 20, 7])  # one piece per file; many, cut between lines and characters
def test_text_files_decode_back_to_their_exact_text(tmp_path, monkeypatch, piece_bytes):
    monkeypatch.setattr(sources, "PIECE_BYTES", piece_bytes)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes(WRITTEN.encode())
    (tmp_path / "docs" / "b.txt").write_bytes(b"second file\n")
    (tmp_path / "val.txt").write_bytes(b"held\nout\n")
    loaded = corpus_of(tmp_path, str(tmp_path / "docs"), val_dataset=str(tmp_path / "val.txt"))
    ids = tokens(loaded.train)
    assert ids == [*WRITTEN.encode(), EOS, *b"second file\n", EOS]  # one end-of-text per file, after its last byte
    assert ByteTokenizer().decode(ids[:ids.index(EOS)]) == WRITTEN
    assert tokens(loaded.val) == [*b"held\nout\n", EOS]


def test_a_text_file_without_validation_split_holds_out_its_tail(tmp_path):
    text = "".join(f"line {i}\n" for i in range(100))
    (tmp_path / "a.txt").write_text(text)
    loaded = corpus_of(tmp_path, str(tmp_path / "a.txt"), val_fraction=0.1)
    n_val = round(len(text) * 0.1)
    assert tokens(loaded.train) == list(text[:-n_val].encode())  # the document goes on: no end-of-text yet
    assert tokens(loaded.val) == [*text[-n_val:].encode(), EOS]


def test_pieces_are_cut_after_line_breaks_and_never_inside_a_character(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 8)
    path = tmp_path / "a.txt"
    path.write_text("abc\nde\nfghijklmn" + "€😀" * 10)
    with open(path, "rb") as f:
        pieces = list(sources._pieces(f))
    assert b"".join(pieces) == path.read_bytes() and len(pieces) > 5
    assert pieces[0] == b"abc\nde\n"  # after the line break in its second half
    assert all(piece.decode("utf-8") for piece in pieces)  # each piece is whole characters


def test_piece_cuts_are_the_cuts_of_the_pieces_read_whole(tmp_path, monkeypatch):
    """lmdist.shards groups a file's pieces into units by `piece_cuts`, found with small reads instead of reading
    the file; they must be exactly where `_pieces` cuts: line breaks, none at all, characters of 1 to 4 bytes,
    bytes that are not UTF-8, ranges that start and stop anywhere, windows smaller than a line."""
    rng = np.random.default_rng(0)
    alphabet = [b"a", b" ", b"\n", "\u00e9".encode(), "\u2713".encode(), "\U0001d11e".encode(), b"\xe9", b"\xff"]
    path = tmp_path / "a.txt"
    for trial in range(400):
        weights = rng.random(len(alphabet))
        weights[2] *= trial % 3 != 0  # a third of the texts without a line break
        data = b"".join(rng.choice(alphabet, int(rng.integers(1, 300)), p=weights / weights.sum()))
        path.write_bytes(data)
        monkeypatch.setattr(sources, "PIECE_BYTES", int(rng.choice([1, 3, 4, 8, 32])))
        start = int(rng.integers(0, len(data)))
        stop = int(rng.integers(start + 1, len(data) + 1))
        with open(path, "rb") as f:
            f.seek(start)
            lengths = [len(piece) for piece in sources._pieces(f, stop - start)]
        window = int(rng.choice([2, 5, 1 << 16]))
        assert sources.piece_cuts(str(path), start, stop, window) == list(itertools.accumulate(lengths, initial=start))


@pytest.mark.parametrize("kind", ["char", "bpe", "folder"])
def test_tokenizers_keep_line_breaks(kind, tmp_path):
    text = "a cat\n\nsat on\tthe mat\n"
    if kind == "folder":
        HFTokenizer.train_bpe(iter([text] * 20), vocab_size=280).save(str(tmp_path))
        (tmp_path / "lmdist_tokenizer.json").unlink()  # a plain HuggingFace folder
        tok = build_tokenizer(str(tmp_path), lambda: iter(()), 0, 1)
    else:
        tok = build_tokenizer(kind, lambda: iter([text] * 20), vocab_size=280, min_freq=1)
    assert tok.decode(tok.encode(text)) == text


def test_word_tokenizer_keeps_each_line_break_and_folds_other_whitespace():
    tok = build_tokenizer("word", lambda: iter(["a b\n\nc  d\te\n"]), vocab_size=0, min_freq=1)
    assert "\n" in tok.symbols
    assert tok.decode(tok.encode("a b\n\nc  d\te\n")) == "a b\n\nc d e\n"


@pytest.mark.launch
def test_a_byte_gpt_learns_to_write_a_line_break(tmp_path):
    from lmdist.inference import generate

    (tmp_path / "lines.txt").write_text("abcd\n" * 400)
    run_ok(with_flags(TINY_GPT, "--tokenizer", "byte", "--block_size", "16", "--batch_size", "16", "--lr", "1e-2",
                      "--warmup_steps", "5", "--epochs", "30", "--max_steps", "80", "--eval_every", "80",
                      "--log_every", "20", "--dataset", str(tmp_path / "lines.txt"),
                      "--output_dir", str(tmp_path / "run")), cwd=tmp_path)
    continuation = generate(str(tmp_path / "run" / "final"), "abcd", max_new_tokens=10, temperature=1.0, top_k=1,
                            seed=0)
    assert continuation.startswith("\nabcd\nabcd"), repr(continuation)


# ----------------------------------------------------------------------------- item 2: bytes that are not UTF-8

def test_a_stray_latin1_byte_in_a_text_file_is_replaced_with_one_warning(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait\n" * 50)
    loaded = corpus_of(tmp_path, str(tmp_path / "a.txt"))
    err = capsys.readouterr().err
    assert err.count("not UTF-8") == 1 and f"{tmp_path / 'a.txt'} (50 bytes)" in err and "iconv" in err
    ids = tokens(loaded.train)  # the tokens of U+FFFD, not the stray byte (which decode would also show as U+FFFD)
    assert 0xE9 not in ids and bytes(i for i in ids if i < 256).startswith("caf\ufffd au lait\n".encode() * 40)


@pytest.mark.parametrize("name, content", [("a.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
                                           ("a.json", b'[{"text": "caf\xe9"}]'),
                                           ("a.csv", b"text\nok\ncaf\xe9\n")])
def test_a_stray_latin1_byte_in_a_table_names_the_file_and_offset(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    offset = content.index(b"\xe9")
    with pytest.raises(DataError, match=rf"{name} is not UTF-8 text: byte {offset} \(0xe9\).*iconv"):
        corpus_of(tmp_path, str(tmp_path / name))


@pytest.mark.launch
def test_a_bad_byte_exits_2_with_one_message(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "caf\xe9"}\n' * 20)
    result = launch([*TINY_GPT, "--dataset", str(tmp_path / "a.jsonl"), "--output_dir", str(tmp_path / "o")],
                    cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "a.jsonl is not UTF-8 text: byte 13" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- item 3: rows without text

def test_rows_without_text_are_counted_and_reported(tmp_path, capsys):
    rows = []
    for i in range(400):  # 58 rows without text: 20 missing, 20 null, 10 lists, 8 empty; 5 numbers
        rows.append({"other": i} if i < 20 else {"text": None} if i < 40 else {"text": ["x"]} if i < 50
                    else {"text": ""} if i < 58 else {"text": i} if i < 63 else {"text": f"row {i}"})
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = corpus_of(tmp_path, str(tmp_path / "a.jsonl"), val_fraction=0.1)
    err = capsys.readouterr().err
    assert "58 of 400 rows have no text in column 'text' and are left out (missing or null: 40, empty: 8, " \
           "not text: 10)" in err, err
    assert "holds numbers in 5 of 400 rows; they are read as their decimal text" in err
    assert ByteTokenizer().decode(tokens(loaded.train)).startswith("5859606162row 63")  # numbers read as text


def test_csv_cells_are_read_as_written(tmp_path):
    (tmp_path / "a.csv").write_text("id,text\n1,1984\n2,NA\n3,\n4,null\n5,words here\n")
    train, _, _ = sources.load_rows(TrainConfig(dataset=str(tmp_path / "a.csv"), cache_dir=str(tmp_path / "c"),
                                                  val_fraction=0.01))
    assert train["text"] == ["1984", "NA", "", "null", "words here"][:train.num_rows]
    ids = tokens(token_streams.tokenize(train, ByteTokenizer(), "text"))
    documents = ByteTokenizer().decode([i if i != ByteTokenizer.eos_id else ord("|") for i in ids])
    assert documents == "|".join(["1984", "NA", "null", "words here"][:train.num_rows - 1]) + "|"


def test_a_source_without_any_text_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": None, "body": "x"}) + "\n" for _ in range(10)))
    with pytest.raises(DataError, match=r"none of its 10 rows has text in column 'text' \(missing or null: 10\); "
                                        r"set --text_column \(columns: text, body\)"):
        corpus_of(tmp_path, str(tmp_path / "a.jsonl"))


# ----------------------------------------------------------------------------- item 4: any plain-text file

@pytest.mark.parametrize("name", ["notes.md", "doc.rst", "code.py", "paper.tex", "LICENSE", "Apache-2.0"])
def test_plain_text_with_any_extension_trains(tmp_path, name):
    (tmp_path / name).write_text("some text\nmore text\n" * 20)
    loaded = corpus_of(tmp_path, str(tmp_path / name), val_fraction=0.1)
    text = ByteTokenizer().decode(tokens(loaded.train) + tokens(loaded.val))
    assert text == "some text\nmore text\n" * 20


def test_a_folder_leaves_out_binary_files_and_text_beside_tables_with_a_note(tmp_path, capsys):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.md").write_text("markdown\n" * 20)
    (tmp_path / "texts" / "b").write_text("no extension\n" * 20)
    (tmp_path / "texts" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (tmp_path / "texts" / "__init__.py").write_text("")
    found = sources.local_files(str(tmp_path / "texts"))
    assert found.kind == sources.TEXT and [p.rsplit("/", 1)[1] for p in found.files] == ["a.md", "b"]
    assert sources.local_files(str(tmp_path / "tex*")).files == found.files  # a glob matching the folder
    corpus_of(tmp_path, str(tmp_path / "texts"))
    err = capsys.readouterr().err
    assert "2 file(s) left out" in err and "logo.png (binary)" in err and "__init__.py (empty)" in err
    # a file named twice -- a link beside its target (GPL -> GPL-3), another to it -- is read once, by its own name
    (tmp_path / "texts" / "a-link.md").symlink_to("a.md")
    (tmp_path / "texts" / "0-link").symlink_to(tmp_path / "texts" / "a-link.md")
    found = sources.local_files(str(tmp_path / "texts"))
    assert [p.rsplit("/", 1)[1] for p in found.files] == ["a.md", "b"]
    same = f"the same file as {tmp_path / 'texts' / 'a.md'}"
    assert {found.left_out[str(tmp_path / "texts" / name)] for name in ("a-link.md", "0-link")} == {same}
    loaded = corpus_of(tmp_path, str(tmp_path / "texts"), val_fraction=0.2)
    assert loaded.train.n_tokens + loaded.val.n_tokens == len("markdown\n" * 20 + "no extension\n" * 20) + 2
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "README.md").write_text("# a dataset card\n")
    (tmp_path / "hub" / "train.jsonl").write_text(json.dumps({"text": "a row"}) + "\n")
    found = sources.local_files(str(tmp_path / "hub"))
    assert found.kind == "json"
    assert found.left_out == {str(tmp_path / "hub" / "README.md"): "text beside the json files"}


# ----------------------------------------------------------------------------- item 5: a test split validates

def test_a_test_split_validates_when_there_is_no_validation_split(tmp_path):
    import datasets

    splits = {"train": ["a b c"] * 5, "test": ["held out"]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "saved"))
    train, val, source = sources.load_rows(TrainConfig(dataset=str(tmp_path / "saved")))
    assert train["text"] == splits["train"] and val["text"] == ["held out"] and source["val_split"] == "test"


# ----------------------------------------------------------------------------- item 6: no end-of-text token

def test_a_tokenizer_folder_without_end_of_text_warns_on_the_main_process(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["plain words only\n"] * 20, trainer=trainers.BpeTrainer(
        vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("plain words only\n" * 50)
    for is_main in (True, False):
        cfg = TrainConfig(dataset=str(tmp_path / "a.txt"), tokenizer=str(tmp_path / "tok"),
                          cache_dir=str(tmp_path / "c"), output_dir=str(tmp_path / f"out{is_main}"))
        token_streams.load_corpus(cfg, lambda build: build(), is_main=is_main)
        err = capsys.readouterr().err
        expected = 1 if is_main else 0
        assert err.count(f"the tokenizer {tmp_path / 'tok'} has no end-of-text token") == expected, err
        assert err.count('set "eos_token" in its tokenizer_config.json') == expected


# ----------------------------------------------------------------------------- streamed text files

def test_streamed_text_files_are_read_as_written(tmp_path, monkeypatch, capsys):
    from lmdist import streaming

    monkeypatch.setattr(sources, "PIECE_BYTES", 16)
    texts = ["one\n\ntwo é\n" * 5, "three\r\nfour 😀" * 5, "caf\ufffd\n" * 5]
    for i, text in enumerate(texts):
        (tmp_path / f"part{i}.txt").write_bytes(text.encode().replace("\ufffd".encode(), b"\xe9"))  # Latin-1 é
    cfg = TrainConfig(dataset=str(tmp_path / "part*.txt"), streaming=True, max_steps=1, val_dataset="x",
                      block_size=8)
    sequences = streaming.StreamedSequences(streaming.open_stream(cfg, 0, 1), ByteTokenizer(), "text", 8)
    expected = [*texts[0].encode(), EOS, *texts[1].encode(), EOS, *texts[2].encode(), EOS]
    targets = []
    for _, target in sequences:
        targets += target.tolist()
        if len(targets) >= len(expected) - 1:
            break
    assert targets[:len(expected) - 1] == expected[1:]
    err = capsys.readouterr().err
    assert err.count("holds bytes that are not UTF-8") == 1 and "part2.txt" in err


# ----------------------------------------------------------------------------- item 7: bounded memory

MEASURE = textwrap.dedent("""
    import resource, sys
    import datasets, pyarrow.compute, tokenizers  # what lmdist imports when it loads data
    from lmdist import token_streams
    from lmdist.config import TrainConfig
    if sys.argv[1:]:
        cfg = TrainConfig(dataset=sys.argv[1], cache_dir=sys.argv[2], output_dir=sys.argv[3])
        token_streams.load_corpus(cfg, lambda build: build(), is_main=True)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


def peak_rss(tmp_path, *args: str) -> int:
    result = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split()[-1])


def test_a_large_single_line_file_loads_in_bounded_memory(tmp_path):
    """Loading and tokenizing a 32 MB file without a line break costs at most 3x its size (+ 64 MiB of working
    memory). Before: one 32 MB row, tokenized as a Python list of ints: about 20x."""
    path = tmp_path / "one_line.txt"
    with open(path, "w") as f:
        for i in range(32):
            f.write(f"lorem ipsum dolor sit amet {i} " * (1_000_000 // 29))
    size = path.stat().st_size
    baseline = peak_rss(tmp_path)  # the interpreter and the libraries lmdist.data imports
    loaded = peak_rss(tmp_path, str(path), str(tmp_path / "cache"), str(tmp_path / "out"))
    assert loaded - baseline <= 3 * size + (64 << 20), f"{(loaded - baseline) / size:.1f}x the file's {size} bytes"

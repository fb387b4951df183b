"""Prepared token shards (lmdist.shards): exact text, same bytes, never a partial one, found again warm."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from lmdist import launch as lmdist_launch
from lmdist import shards, sources, token_streams
from lmdist.config import TrainConfig
from lmdist.errors import DataError
from lmdist.tokenizer import ByteTokenizer
from tests import faults
from tests.conftest import TINY_GPT, launch, run_on_terminal

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "one", "dog", "ran", "after", "ducks", "near", "old", "barns"]


def write_text(path, n_lines: int, seed: int = 0) -> str:
    """Lines of words, with a blank line, tabs, non-ASCII and no final line break: text to read as written."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, rng.integers(3, 12))) for _ in range(n_lines)]
    lines[3], lines[5] = "", "\tindented é ✓"
    text = "\n".join(lines)
    path.write_text(text, encoding="utf-8")
    return text


def cfg_for(tmp_path, dataset, **overrides) -> TrainConfig:
    return TrainConfig(**{"dataset": str(dataset), "tokens_dir": str(tmp_path / "tokens"),
                          "output_dir": str(tmp_path / "out"), **overrides})


def decoded(prepared: shards.Prepared, split: str) -> str:
    """The split's text, its ends of text left out (byte tokens: decoded strictly, not by the tokenizer)."""
    tokens = np.concatenate([np.asarray(part) for part in prepared.streams[split]])
    if prepared.tokenizer.kind != "byte":
        return prepared.tokenizer.decode(tokens[tokens != prepared.tokenizer.eos_id].tolist())
    return bytes(tokens[tokens < 256].astype(np.uint8)).decode("utf-8")


def folder_bytes(path) -> dict[str, bytes]:
    found = {}
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), path)] = f.read()
    return found


@pytest.fixture
def small_units(monkeypatch):
    """Units of 4 KiB (text read in pieces of 1 KiB), so that small files make many units and the forked pool
    runs."""
    monkeypatch.setattr(shards, "UNIT_BYTES", 4096)
    monkeypatch.setattr(sources, "PIECE_BYTES", 1024)


def test_shards_decode_back_to_the_text_with_documents_indexed(tmp_path, small_units):
    texts = [write_text(tmp_path / f"{name}.txt", n, seed) for name, n, seed in (("a", 900, 1), ("b", 40, 2))]
    prepared = shards.prepare(cfg_for(tmp_path, tmp_path / "*.txt", val_fraction=0.02), print, True)
    whole = "".join(texts)
    train, val = decoded(prepared, "train"), decoded(prepared, "val")
    assert train + val == whole and len(val) > 0  # every byte once, in order, line breaks and all
    splits = prepared.manifest["splits"]
    assert len(splits["train"]["shards"]) > 3  # a.txt alone is more than 4 units
    assert prepared.manifest["dtype"] == "uint16" and prepared.streams["train"][0].dtype == np.uint16
    # end-of-text after a.txt only: b.txt's end is in the validation split, b's training part continues
    train_tokens = np.concatenate(prepared.streams["train"])
    ends = np.fromfile(os.path.join(prepared.path, "train.docs.bin"), dtype=np.uint64)
    assert np.flatnonzero(train_tokens == ByteTokenizer.eos_id).tolist() == [len(texts[0].encode())]
    assert ends.tolist() == [len(texts[0].encode()) + 1] and splits["train"]["documents"] == 1
    assert isinstance(prepared.streams["train"][0], np.memmap)  # read in place: a corpus larger than RAM works


def test_table_rows_and_bpe_decode_back(tmp_path, small_units):
    rows = [{"text": line} for line in write_text(tmp_path / "x.txt", 400).split("\n")]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    cfg = cfg_for(tmp_path, tmp_path / "rows.jsonl", tokenizer="bpe", bpe_vocab_size=300,
                  cache_dir=str(tmp_path / "cache"))
    prepared = shards.prepare(cfg, print, True)
    kept = [row["text"] for row in rows if row["text"]]  # the blank row is left out
    tokens = np.concatenate([np.concatenate(prepared.streams[s]) for s in ("train", "val")])
    documents = np.split(tokens, np.flatnonzero(tokens == prepared.tokenizer.eos_id) + 1)[:-1]
    assert [prepared.tokenizer.decode(doc[:-1].tolist()) for doc in documents] == kept
    splits = prepared.manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(kept)


def test_the_tokens_do_not_depend_on_the_units_and_are_those_of_the_pieces_read_in_order(tmp_path, monkeypatch):
    """BPE learns across a cut (a run of whitespace, a line break beside spaces), so a unit boundary that is not a
    piece boundary would change tokens. Units of 4 KiB and units of the whole split give the same stream, which is
    the stream of the file's pieces read in order (lmdist.sources' rows of a text file: streaming's and eval's
    reading, and training's before the shards)."""
    lines = write_text(tmp_path / "x.txt", 1200, seed=3).split("\n")
    text = "".join(line + ("  \n\n  " if i % 7 == 0 else " \n" if i % 3 == 0 else "\n")
                   for i, line in enumerate(lines))
    (tmp_path / "a.txt").write_text(text)
    monkeypatch.setattr(sources, "PIECE_BYTES", 1024)
    streams = []
    for units, per_split, where in ((4096, 1 << 20, "small"), (1 << 30, 1, "whole")):
        monkeypatch.setattr(shards, "UNIT_BYTES", units)
        monkeypatch.setattr(shards, "UNITS_PER_SPLIT", per_split)
        cfg = cfg_for(tmp_path, tmp_path / "a.txt", tokenizer="bpe", bpe_vocab_size=400,
                      tokens_dir=str(tmp_path / where))
        prepared = shards.prepare(cfg, print, True)
        streams.append(np.concatenate([np.concatenate(prepared.streams[s]) for s in ("train", "val")]))
        assert (len(prepared.manifest["splits"]["train"]["shards"]) > 10) == (where == "small")
    assert np.array_equal(*streams)
    train_parts, val_parts, _ = sources.split_text_bytes([str(tmp_path / "a.txt")], cfg)
    read_in_order = [token_streams.tokenize(sources.text_dataset(parts, cfg), prepared.tokenizer, cfg.text_column)
                     for parts in (train_parts, val_parts)]
    assert np.array_equal(streams[0], np.concatenate([s.slice(0, s.n_tokens) for s in read_in_order]))


def test_two_preparations_give_the_same_bytes_on_any_number_of_cores(tmp_path, small_units, monkeypatch):
    write_text(tmp_path / "a.txt", 1500)
    made = []
    for cores, where in ((1, "one"), (2, "two")):
        monkeypatch.setattr(lmdist_launch, "available_cores", lambda cores=cores: cores)
        cfg = cfg_for(tmp_path, tmp_path / "a.txt", tokenizer="bpe", bpe_vocab_size=300,
                      tokens_dir=str(tmp_path / where))
        made.append(shards.prepare(cfg, print, True))
    assert os.path.basename(made[0].path) == os.path.basename(made[1].path)  # content-addressed: the same key
    first, second = folder_bytes(made[0].path), folder_bytes(made[1].path)
    assert len(first) > 6 and first == second


def test_the_key_follows_the_data_and_the_tokenizer(tmp_path):
    write_text(tmp_path / "a.txt", 200)
    base = shards.prepare(cfg_for(tmp_path, tmp_path / "a.txt"), print, True).path
    assert shards.prepare(cfg_for(tmp_path, tmp_path / "a.txt"), print, True).path == base
    changed = [cfg_for(tmp_path, tmp_path / "a.txt", tokenizer="bpe", bpe_vocab_size=300),
               cfg_for(tmp_path, tmp_path / "a.txt", val_fraction=0.2)]
    assert len({base, *(shards.prepare(cfg, print, True).path for cfg in changed)}) == 3
    time.sleep(0.01)
    write_text(tmp_path / "a.txt", 200, seed=5)  # new contents: a new modification time
    assert shards.prepare(cfg_for(tmp_path, tmp_path / "a.txt"), print, True).path != base


DATASETS_CACHE_CASES = textwrap.dedent("""
    import importlib, os, sys
    from lmdist import shards
    from lmdist.config import TrainConfig
    cases = [{}, {"XDG_CACHE_HOME": "/x/cache"}, {"HF_HOME": "~/hf", "XDG_CACHE_HOME": "/x/cache"},
             {"HF_DATASETS_CACHE": "/d/cache", "HF_HOME": "/h"}]
    ours = []
    for case in cases:
        os.environ.update(case)
        ours.append(shards.tokens_root(TrainConfig(dataset="a.txt")))
        for name in case:
            del os.environ[name]
    assert "datasets" not in sys.modules, "tokens_root imported datasets"
    import datasets.config
    for case, root in zip(cases, ours):
        os.environ.update(case)
        importlib.reload(datasets.config)  # its constants are read from the environment at import
        assert root == os.path.join(str(datasets.config.HF_DATASETS_CACHE), "lmdist-tokens"), (case, root)
        for name in case:
            del os.environ[name]
    print("same")
""")


def test_the_default_tokens_dir_is_in_datasets_cache_found_without_importing_datasets():
    """Importing datasets is about a second of every launch; a run on prepared text files needs nothing else of it."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_CACHE", "HF_HOME", "XDG_CACHE_HOME")}
    done = subprocess.run([sys.executable, "-c", DATASETS_CACHE_CASES], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.stdout.strip() == "same", done.stderr[-3000:]


def test_a_warm_opening_reads_no_text_and_repeats_the_warnings(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(b"caf\xe9 au lait\n" * 50)  # Latin-1: one warning
    cfg = cfg_for(tmp_path, tmp_path / "d")
    said = []
    first = shards.prepare(cfg, said.append, True)
    assert any("not UTF-8" in message for message in said)

    def no_reading(*args, **kwargs):
        raise AssertionError("a warm opening read the text")

    monkeypatch.setattr(shards, "_build", no_reading)
    again = []
    second = shards.prepare(cfg, again.append, True)
    assert second.path == first.path and again == [m for m in said if not m.startswith("prepared")]


def test_a_preparation_removed_as_soon_as_made_is_a_data_error(tmp_path, monkeypatch):
    """Another job cleaning the tokens_dir between the rename and the opening: an error naming the fix, not None."""
    write_text(tmp_path / "a.txt", 50)
    real_build = shards._build

    def build_then_lose(cfg, path, *args):
        real_build(cfg, path, *args)
        shutil.rmtree(path)

    monkeypatch.setattr(shards, "_build", build_then_lose)
    with pytest.raises(DataError, match="--tokens_dir of its own"):
        shards.prepare(cfg_for(tmp_path, tmp_path / "a.txt"), print, True)


def test_a_resumed_run_s_tokenizer_finds_the_spec_s_preparation(tmp_path):
    write_text(tmp_path / "a.txt", 300)
    cfg = cfg_for(tmp_path, tmp_path / "a.txt", tokenizer="bpe", bpe_vocab_size=300)
    fresh = shards.prepare(cfg, print, True)
    assert shards.prepare(cfg, print, True, tokenizer=fresh.tokenizer).path == fresh.path
    other = shards.prepare(cfg, print, True, tokenizer=ByteTokenizer())  # another tokenizer: another folder
    assert other.path != fresh.path and other.tokenizer.kind == "byte"


def test_bpe_learns_from_a_bounded_seeded_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SAMPLE_WINDOW_BYTES", 1024)
    text = write_text(tmp_path / "a.txt", 3000)  # about 100 KB
    cfg = cfg_for(tmp_path, tmp_path / "a.txt", tokenizer="bpe", bpe_sample_bytes=4096)
    units = shards.text_units([(str(tmp_path / "a.txt"), 0, len(text.encode()))])
    sample = list(shards.training_sample(units, {}, cfg))
    assert sample == list(shards.training_sample(units, {}, cfg))  # seeded
    assert len(sample) == 4 and 3 * 1024 < sum(len(t.encode()) for t in sample) <= 4 * 1024
    where = [text.index(window) for window in sample]  # each window is text as written, in order, spread out
    assert where == sorted(where) and where[-1] - where[0] > len(text) / 4
    whole = list(shards.training_sample(units, {}, cfg_for(tmp_path, tmp_path / "a.txt", tokenizer="bpe")))
    assert "".join(whole) == text  # under the bound: all of the text, in order
    trained = shards.prepare(cfg, print, True)
    assert trained.path != shards.prepare(cfg_for(tmp_path, tmp_path / "a.txt", tokenizer="bpe"), print, True).path


KILLED_PREPARATION = textwrap.dedent("""
    import os, sys, time
    from lmdist import shards, sources, token_streams
    from lmdist.config import TrainConfig
    shards.UNIT_BYTES = 4096
    sources.PIECE_BYTES = 1024
    tokenize = shards._tokenize_unit
    def slow(item):
        result = tokenize(item)
        if item[1] == 2:
            open(sys.argv[3], "w").close()
            time.sleep(600)
        return result
    shards._tokenize_unit = slow
    cfg = TrainConfig(dataset=sys.argv[1], tokens_dir=sys.argv[2])
    import lmdist.launch
    lmdist.launch.available_cores = lambda: 1  # the units run in this process, which is killed
    shards.prepare(cfg, print, True)
""")


def test_a_killed_preparation_is_never_used_and_is_redone(tmp_path, small_units):
    write_text(tmp_path / "a.txt", 600)
    marker = tmp_path / "marker"
    process = subprocess.Popen([sys.executable, "-c", KILLED_PREPARATION, str(tmp_path / "a.txt"),
                                str(tmp_path / "tokens"), str(marker)])
    try:
        for _ in range(600):
            if marker.exists() or process.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), "the preparation never reached its third unit"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    left = os.listdir(tmp_path / "tokens")
    assert any(".partial-" in name for name in left) and not any(len(name) == 24 for name in left)
    prepared = shards.prepare(cfg_for(tmp_path, tmp_path / "a.txt"), print, True)  # redone, whole
    assert decoded(prepared, "train") + decoded(prepared, "val") == (tmp_path / "a.txt").read_text()
    assert not any(".partial-" in name for name in os.listdir(tmp_path / "tokens"))


PREPARE_WITHOUT_TORCH = textwrap.dedent("""
    import multiprocessing, sys
    from lmdist import cli, shards, sources
    if sys.argv[1] == "small_units":  # many units: the worker pool runs
        shards.UNIT_BYTES, sources.PIECE_BYTES = 4096, 1024
    if sys.argv[1] == "small_pieces":  # text of many pieces, but fewer than 2 x UNIT_BYTES
        sources.PIECE_BYTES = 1024
    contexts, get_context = [], multiprocessing.get_context
    multiprocessing.get_context = lambda method=None: contexts.append(method) or get_context(method)
    try:
        cli.main(["prepare", *sys.argv[2:]])
    except SystemExit as done:
        assert not done.code, done.code
    print(contexts, sorted(name for name in ("torch", "datasets", "accelerate") if name in sys.modules))
""")


@pytest.mark.parametrize("units, tokenizer, forked", [
    ("small_units", "byte", True), ("default_units", "byte", False),
    # the byte tokenizer encodes up to 2 x UNIT_BYTES faster than workers start; char, word and bpe, 100x slower,
    # start them above two pieces of text
    ("small_pieces", "byte", False), ("small_pieces", "char", True)])
def test_lmdist_prepare_of_text_files_imports_neither_torch_nor_datasets_and_forks_its_workers(tmp_path, units,
                                                                                               tokenizer, forked):
    """Their imports cost seconds: more than preparing 100 MB of text with the byte tokenizer here (bench/). With
    neither, nor table rows, nothing can hold a lock at a fork: the workers are forked at once, not from a fork
    server's fresh interpreter (0.4 s)."""
    text = write_text(tmp_path / "a.txt", 1500)
    done = subprocess.run([sys.executable, "-c", PREPARE_WITHOUT_TORCH, units, "--dataset", str(tmp_path / "a.txt"),
                           "--tokens_dir", str(tmp_path / "tokens"), "--tokenizer", tokenizer],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "prepared: " in done.stdout
    assert done.stdout.strip().splitlines()[-1] == f"{['fork'] if forked else []} []"
    prepared = shards._open(done.stdout.splitlines()[0].removeprefix("prepared: "))
    assert decoded(prepared, "train") + decoded(prepared, "val") == text


def test_the_preparation_shows_a_bar_on_a_terminal_only(tmp_path):
    write_text(tmp_path / "a.txt", 3000)
    command = [sys.executable, "-m", "lmdist", "prepare", "--dataset", "a.txt"]
    on_terminal = run_on_terminal([*command, "--tokens_dir", "shown"], cwd=tmp_path, columns=80)
    assert "preparing tokens: 100%" in on_terminal
    piped = subprocess.run([*command, "--tokens_dir", "piped"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
    assert piped.returncode == 0 and "preparing tokens" not in piped.stdout + piped.stderr
    assert "tqdm" not in subprocess.run([sys.executable, "-c", "import sys; from lmdist import shards; "
                                         "shards._progress_bar(1, True); print(sorted(sys.modules))"],
                                        capture_output=True, text=True, timeout=60).stdout


def test_lmdist_prepare_says_per_source_what_it_made_and_what_it_found(tmp_path):
    """A text file is one document, whose end falls in the validation tail; a second command reuses every source."""
    write_text(tmp_path / "prose.txt", 3000)
    write_text(tmp_path / "notes.txt", 2000, seed=1)
    command = [sys.executable, "-m", "lmdist", "prepare", "--tokens_dir", "tokens", "--tokenizer", "byte"]
    first = subprocess.run([*command, "--dataset", "prose.txt"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == 0, first.stderr
    about = first.stdout.splitlines()[1]
    assert about.startswith("  prepared now; train ") and ", 0 documents ended, val " in about
    assert about.split("val ")[1].split(";")[0].endswith("tokens, 1 document ended")
    mixed = subprocess.run([*command, "--mixture", "prose.txt:3,notes.txt:1"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert mixed.returncode == 0, mixed.stderr
    lines = mixed.stdout.splitlines()
    assert lines[1].startswith("  source prose: found prepared (reused); train ")
    assert lines[3].startswith("  source notes: prepared now; train ")
    again = subprocess.run([*command, "--mixture", "prose.txt:3,notes.txt:1"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert [line.split(";")[0] for line in again.stdout.splitlines()[1:4:2]] == [
        "  source prose: found prepared (reused)", "  source notes: found prepared (reused)"]


@pytest.mark.launch
def test_lmdist_prepare_prints_the_flags_a_run_then_trains_on(tmp_path):
    """Given relative paths, it prints absolute ones: a job started in another folder trains on them."""
    write_text(tmp_path / "a.txt", 3000)
    prepared = subprocess.run([sys.executable, "-m", "lmdist", "prepare", "--dataset", "a.txt", "--tokens_dir",
                               "tokens", "--val_fraction", "0.1"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
    assert prepared.returncode == 0, prepared.stderr
    flags = prepared.stdout.strip().splitlines()[-1].split()
    assert flags[:2] == ["--dataset", str(tmp_path / "a.txt")] and "--val_fraction" in flags
    assert flags[flags.index("--tokens_dir") + 1] == str(tmp_path / "tokens")
    (tmp_path / "elsewhere").mkdir()
    run = launch([*TINY_GPT, *flags, "--output_dir", str(tmp_path / "run"), "--max_steps", "2"],
                 cwd=tmp_path / "elsewhere")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "prepared " not in run.stderr  # found, not made again
    folder = prepared.stdout.splitlines()[0].removeprefix("prepared: ")
    assert f"tokens in {folder}" in run.stdout + run.stderr


@pytest.mark.launch
def test_a_cold_preparation_in_a_two_rank_launch_uses_the_pool_and_trains(tmp_path):
    """Rank zero prepares with worker processes while the trainer's threads run (gloo, OpenMP): workers forked
    from it hung on a lock one of those threads held; they come from a fork server. The pool's SIGTERM to its
    workers must not reach the trainer's stop handler either (it printed "stopped: SIGTERM during start-up")."""
    write_text(tmp_path / "a.txt", 4000)
    args = [*TINY_GPT, "--dataset", str(tmp_path / "a.txt"), "--tokens_dir", str(tmp_path / "tokens"),
            "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--batch_size", "4"]
    run = launch(args, cwd=tmp_path, nproc=2, launcher="torchrun", script=faults.SCRIPT, timeout=240,
                 env=faults.inject(faults.small_prepare_units, unit_bytes=4096))
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads(next((tmp_path / "tokens").glob("*/manifest.json")).read_text())
    assert len(manifest["splits"]["train"]["shards"]) > 10  # many units: the pool ran
    assert "SIGTERM" not in run.stderr and "stopped" not in run.stderr

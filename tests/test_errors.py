"""Recovery and clean errors (issue 12, items 16-21): storage that refuses writes, impossible seeds and
block sizes, stop signals during start-up, file modes, printed shell commands, closed pipes, repeated flags."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmdist import files, shards
from lmdist.checkpoint import verify
from lmdist.config import TrainConfig, parse_args
from lmdist.errors import (
    EXIT_STOPPED,
    EXIT_STORAGE,
    ConfigError,
    DataError,
    StorageError,
    UnexpectedError,
    as_user_error,
    os_error_of,
)
from lmdist.models.memory import attention_bytes, check_attention_memory
from lmdist.tracking import JsonlTracker
from tests import faults
from tests.conftest import TINY_GPT, TRAIN, launch, launch_env, read_metrics, read_run, run_ok, with_flags


def error_of(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    return str(info.value)


def tiny_run(dataset: Path, output_dir: Path, *overrides: str) -> list[str]:
    """A run of 8 optimizer steps of a tiny GPT, a checkpoint every 2 (about 370 kB each)."""
    return [*with_flags([*TINY_GPT, "--batch_size", "4", "--max_steps", "8", "--save_every", "2", "--keep_last", "5"],
                        *overrides), "--dataset", str(dataset), "--output_dir", str(output_dir)]


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, options) -> a tmpfs mounted at tmp_path/name (skips where this process may not mount)."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                                text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


# ----------------------------------------------------------------------------- 16: storage that refuses writes

def test_a_dangling_output_dir_is_refused_at_start(markov_files, tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "scratch" / "not-mounted")
    result = launch(tiny_run(markov_files["short"], link), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"--output_dir {link} is a symbolic link to {tmp_path / 'scratch' / 'not-mounted'}, which does not exist" \
        in result.stderr
    no_traceback(result)
    assert not (tmp_path / "scratch").exists(), "the link's target is not created on the user's behalf"


def test_a_read_only_output_dir_is_refused_at_start(markov_files, tmp_path, tmpfs):
    read_only = tmpfs("ro", "ro,size=1m")
    for output_dir in (read_only, read_only / "run"):  # an existing folder, and one that cannot be created
        result = launch(tiny_run(markov_files["short"], output_dir), cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-3000:]
        assert f"--output_dir {output_dir} is not a writable folder ([Errno 30] Read-only file system)" in result.stderr
        no_traceback(result)


def test_a_tokens_dir_this_process_cannot_write_in_is_named_with_the_fix(tmp_path, tmpfs):
    """Exit 2 (a setting to change), not a traceback from the lock file nor storage's message about checkpoints;
    a read-only folder that holds the preparation already still serves it."""
    (tmp_path / "a.txt").write_text("some text to prepare\n" * 50)
    cfg = TrainConfig(dataset=str(tmp_path / "a.txt"))
    read_only = tmpfs("read-only", "size=1m,ro")
    for folder in ("/proc", str(read_only), str(tmp_path / "a.txt" / "tokens")):
        with pytest.raises(DataError, match=rf"cannot write in the prepared-tokens folder {re.escape(folder)} \(.*\): "
                                            "set --tokens_dir to a folder this process may write in") as refused:
            shards.prepare(replace(cfg, tokens_dir=folder), print, True)
        assert refused.value.exit_code == 2
    prepared = tmpfs("prepared", "size=1m")
    made = shards.prepare(replace(cfg, tokens_dir=str(prepared)), print, True)
    subprocess.run(["mount", "-o", "remount,ro", str(prepared)], check=True)
    assert shards.prepare(replace(cfg, tokens_dir=str(prepared)), print, True).path == made.path


def test_a_full_tokens_dir_says_what_to_free_and_leaves_no_partial_preparation(tmp_path, tmpfs):
    (tmp_path / "a.txt").write_text("a line of text that fills the disk\n" * 10_000)  # 350 KB: 700 KB of tokens
    disk = tmpfs("small", "size=128k")
    with pytest.raises(StorageError, match=rf"cannot write the prepared tokens in {re.escape(str(disk))}: \[Errno 28\] "
                                           "No space left on device; free space or set --tokens_dir") as refused:
        shards.prepare(TrainConfig(dataset=str(tmp_path / "a.txt"), tokens_dir=str(disk)), print, True)
    assert refused.value.exit_code == EXIT_STORAGE
    assert [p.suffix for p in disk.iterdir()] == [".lock"], "the partial preparation is removed"


def test_disk_full_mid_run_names_the_file_keeps_older_checkpoints_and_the_relaunch_continues(markov_files, tmp_path,
                                                                                           tmpfs):
    disk = tmpfs("disk", "size=600k")  # the start-up files and one checkpoint fit; a second does not
    output_dir = disk / "run"
    args = tiny_run(markov_files["short"], output_dir)
    result = launch(args, cwd=tmp_path)
    assert result.returncode == EXIT_STORAGE, result.stderr[-3000:]
    no_traceback(result)
    message = [line for line in result.stderr.splitlines() if line.startswith("lmdist: error: ")]
    assert len(message) == 1 and f"cannot write {output_dir / 'checkpoints' / 'step_00000004'}" in message[0]
    assert "[Errno 28] No space left on device" in message[0] and "relaunch the same command" in message[0]
    run = read_run(output_dir)
    assert (run["status"], run["exit_code"]) == ("failed", EXIT_STORAGE) and "No space left" in run["reason"]
    assert not [p for p in output_dir.rglob("*") if p.name.endswith(".tmp")], "no temp file is left behind"
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["step_00000002"], \
        "the failed save removed its own folder and nothing older"
    verify(str(output_dir / "checkpoints" / "step_00000002"))
    assert [row["step"] for row in read_metrics(output_dir)] == [1, 2, 3, 4], "every row whole"

    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # space freed: the same command
    again = run_ok(args, cwd=tmp_path)
    assert f"resumed from {output_dir / 'checkpoints' / 'step_00000002'}: step 2" in again.stdout
    assert read_run(output_dir)["status"] == "completed"
    assert [row["step"] for row in read_metrics(output_dir) if "train/loss" in row] == list(range(1, 9))


def test_a_save_one_rank_cannot_write_stops_every_rank_at_once(markov_files, tmp_path, tmpfs):
    """Rank zero's weights do not fit, rank one's own file did: neither waits for the other at the barrier."""
    disk = tmpfs("disk", "size=600k")
    output_dir = disk / "run"
    result = launch(tiny_run(markov_files["short"], output_dir, "--batch_size", "2"), cwd=tmp_path, nproc=2,
                    launcher="torchrun", timeout=240)
    assert result.returncode != 0
    step_4 = output_dir / "checkpoints" / "step_00000004"
    assert f"lmdist: error: [rank 0] cannot write {step_4}" in result.stderr, result.stderr[-3000:]
    assert f"lmdist: error: [rank 1] another rank could not write its part of {step_4}" in result.stderr, \
        result.stderr[-3000:]
    assert "Traceback" not in result.stdout
    assert read_run(output_dir)["exit_code"] == EXIT_STORAGE
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["step_00000002"]


def fill(disk: Path) -> None:
    """Fill a filesystem to its last block."""
    fd = os.open(disk / "ballast", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    assert full.value.errno == errno.ENOSPC


def test_a_metrics_row_the_disk_refuses_leaves_no_torn_line(tmpfs):
    disk = tmpfs("disk", "size=64k")
    tracker = JsonlTracker(str(disk / "metrics.jsonl"))
    tracker.start()
    tracker.log({"step": 1, "train/loss": 1.0})
    fill(disk)
    with pytest.raises(StorageError, match=r"cannot write .*metrics.jsonl: \[Errno 28\] No space left on device"):
        tracker.log({"step": 2, "train/loss": 0.5, "padding": "x" * 20000})
    tracker.finish()  # nothing buffered: closing cannot fail in turn
    assert (disk / "metrics.jsonl").read_text() == '{"step": 1, "train/loss": 1.0}\n'


def test_a_failure_is_recorded_in_run_json_over_the_old_file_when_the_disk_is_full(tmpfs):
    disk = tmpfs("disk", "size=64k")
    run_json = str(disk / "run.json")
    files.write_json(run_json, {"status": "running", "facts": "y" * 600})
    fill(disk)
    with pytest.raises(StorageError), files.atomic_open(str(disk / "other.json")) as f:
        f.write("z" * 100_000)
    assert not (disk / "other.json.tmp").exists() and not (disk / "other.json").exists()
    failed = {"status": "failed", "exit_code": 74, "facts": "y" * 600}
    with pytest.raises(StorageError):
        files.write_json(run_json, failed)
    assert files.write_json_in_place(run_json, failed)
    assert json.loads((disk / "run.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in disk.iterdir()) == ["ballast", "run.json"]


def test_storage_errors_buried_by_libraries_are_recognised():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from None
    except RuntimeError as torch_style:  # torch.save: the OSError is only the context
        assert os_error_of(torch_style).errno == errno.ENOSPC
    rust_style = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert isinstance(as_user_error(rust_style), StorageError)
    bug = ValueError("a bug")
    reported = as_user_error(bug)
    assert isinstance(reported, UnexpectedError) and reported.error is bug, "anything else keeps its traceback"
    assert (reported.status, reported.exit_code, str(reported)) == ("failed", 1, "a bug")


def test_a_full_disk_under_copytree_is_a_storage_error(tmp_path):
    """shutil.copytree gathers its files' OSErrors as text in one shutil.Error: the errno is read from it."""
    import shutil

    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")

    def full_disk(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", dst)

    with pytest.raises(shutil.Error) as raised:
        shutil.copytree(tmp_path / "tokenizer", tmp_path / "final" / "tokenizer", copy_function=full_disk)
    error = as_user_error(raised.value)
    assert isinstance(error, StorageError) and "[Errno 28] No space left on device" in str(error)


# ----------------------------------------------------------------------------- 17: refused on every rank at once

@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_outside_numpys_range_is_refused(seed):
    assert f"--seed {seed}: must be between 0 and 2**32 - 1" in error_of(["--seed", seed])


def test_the_largest_seed_seeds_every_rank():
    """seed + rank wraps around: rank 1 of a run with seed 2**32 - 1 once failed alone, in numpy."""
    import numpy as np

    from lmdist.engine import seed_everything

    assert parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1
    seed_everything(2**32 - 1, type("Rank1", (), {"process_index": 1})(), per_rank=True)
    first = np.random.rand()
    np.random.seed(0)
    assert first == np.random.rand()


def test_attention_that_cannot_fit_is_refused_before_the_model_exists():
    cfg = parse_args(["--model", "gpt", "--block_size", "65536", "--batch_size", "8"])
    assert attention_bytes(cfg) == 8 * 4 * 65536**2 * (12 * 4 + 8)
    with pytest.raises(ConfigError) as refused:
        check_attention_memory(cfg, torch.device("cpu"), "no", processes_on_node=2)
    message = str(refused.value)
    assert message.startswith("--block_size 65536: this GPT's attention would materialize 7,168.0 GiB")
    assert "each of the 2 processes on this machine" in message and "set --dropout 0" in message
    # without dropout PyTorch's CPU flash kernel runs, in memory linear in block_size; an LSTM has no attention
    check_attention_memory(parse_args(["--model", "gpt", "--block_size", "65536", "--dropout", "0"]),
                           torch.device("cpu"), "no", processes_on_node=1)
    check_attention_memory(TrainConfig(block_size=65536), torch.device("cpu"), "no", processes_on_node=1)


def test_every_rank_refuses_an_attention_that_cannot_fit(markov_files, tmp_path):
    result = launch(tiny_run(markov_files["short"], tmp_path / "out", "--block_size", "65536", "--dropout", "0.1"),
                    cwd=tmp_path, nproc=2, launcher="torchrun", timeout=240)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"lmdist: error: [rank {rank}] --block_size 65536: this GPT's attention would materialize" \
            in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stdout and "worker" not in result.stdout


SLOW_START = {  # where start-up is when the signal comes, held there by a fault
    "imports": faults.inject(faults.slow_import, module="lmdist.checkpoint"),
    "data": faults.inject(faults.slow_data_load),
}


@pytest.mark.parametrize("where", sorted(SLOW_START))
def test_a_stop_signal_during_start_up_says_nothing_was_trained(where, markov_files, tmp_path):
    output_dir = tmp_path / "out"
    args = tiny_run(markov_files["short"], output_dir, "--wandb_mode", "disabled")
    process = subprocess.Popen([sys.executable, str(faults.SCRIPT), *args], cwd=tmp_path,
                               env=launch_env(SLOW_START[where]), text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout.readline() == "starting\n"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_STOPPED, stderr[-3000:]
    assert stderr.strip() == ("lmdist: stopped: SIGTERM during start-up, before any training step of this launch: "
                              "nothing was trained or saved; relaunch the same command to continue")
    assert not (output_dir / "checkpoints").exists()


# ----------------------------------------------------------------------------- 18, 19: file modes, shell commands

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_follow_the_umask_and_the_printed_sync_command_survives_a_space(umask, markov_files, tmp_path):
    output_dir = tmp_path / "dir with space"
    command = [sys.executable, str(TRAIN), *tiny_run(markov_files["short"], output_dir, "--max_steps", "2",
                                                     "--tokenizer", "bpe", "--bpe_vocab_size", "300",
                                                     "--wandb_mode", "offline")]
    result = subprocess.run(command, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: os.umask(umask))
    assert result.returncode == 0, result.stderr[-3000:]
    written = [p for p in output_dir.rglob("*") if "wandb" not in p.relative_to(output_dir).parts]
    assert {"model.safetensors", "optimizer.pt", "tokenizer.json", "config.json", "run.json", "metrics.jsonl",
            "manifest.json", "config.yaml"} <= {p.name for p in written}
    wrong = {str(p.relative_to(output_dir)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written
             if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~umask}
    assert not wrong, f"under umask {umask:03o}: {wrong}"

    sync = result.stdout.split("as one run with: ", 1)[1].splitlines()[0]
    words = subprocess.run(["bash", "-c", f'printf "%s\\n" {sync}'], cwd=tmp_path, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    run_id = read_run(output_dir)["run_id"]
    assert words[:4] == ["wandb", "sync", "--id", run_id]
    assert len(words) == 5 and Path(words[4]).parent == output_dir / "wandb" and Path(words[4]).is_dir(), words


# ----------------------------------------------------------------------------- 20: a reader that closes early

@pytest.mark.parametrize("command", [[str(TRAIN), "--help"], ["-m", "lmdist", "fields"]],
                         ids=["train-help", "lmdist-fields"])
def test_a_closed_pipe_ends_the_command_quietly(command, tmp_path):
    gone_read, gone_write = os.pipe()
    subprocess.run(["true"], stdin=gone_read, check=True)  # a reader that has already gone
    os.close(gone_read)
    closed = subprocess.Popen([sys.executable, *command], stdout=gone_write, stderr=subprocess.PIPE, cwd=tmp_path,
                              env=launch_env(), text=True)
    os.close(gone_write)
    assert (closed.wait(timeout=60), closed.stderr.read()) == (141, "")

    writer = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=tmp_path, env=launch_env(), text=True)
    head = subprocess.run(["head", "-n", "1"], stdin=writer.stdout, capture_output=True, text=True, timeout=60)
    writer.stdout.close()
    assert head.stdout.startswith("usage: accelerate launch train.py")
    assert writer.wait(timeout=60) in (0, 141) and writer.stderr.read() == ""  # 0: it had written all in time


# ----------------------------------------------------------------------------- 21: repeated flags, repeated keys

def test_a_flag_given_again_wins():
    cfg = parse_args(["--lr", "1", "--batch-size", "4", "--tie_weights", "--lr", "2", "--batch_size", "8",
                      "--notie_weights", "--lr=3"])
    assert (cfg.lr, cfg.batch_size, cfg.tie_weights) == (3.0, 8, False)


def test_a_yaml_key_given_twice_is_refused_with_its_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.001\nbatch_size: 4\nlr: 0.002\n")
    assert error_of(["--config", str(path)]) == f"--config {path}: 'lr' is given twice (lines 1 and 3): keep one"
    result = subprocess.run([sys.executable, str(TRAIN), "--config", str(path)], capture_output=True, text=True,
                            env=launch_env(), timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "'lr' is given twice (lines 1 and 3)" in result.stderr
    no_traceback(result)
    path.write_text("lr: 0.001\nbatch_size: 4\n")
    assert parse_args(["--config", str(path), "--lr", "0.01"]).lr == 0.01, "a flag still overrides the file"

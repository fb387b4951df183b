"""Recovery from damage a crash or a full disk leaves: a torn metrics.jsonl, corrupted or torn checkpoint
folders; and a fork (--resume of another run's checkpoint) logging as a run of its own."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lmdist import checkpoint
from lmdist.config import TrainConfig
from lmdist.order import ORDER
from lmdist.resume import Progress, checkpoint_record, find_resume
from tests import wandb_file
from tests.conftest import TINY_GPT, read_metrics, read_run, run_ok

# ----------------------------------------------------------------------------- checkpoints, in process

@pytest.fixture(scope="module")
def training():
    """A tiny prepared model, optimizer and scheduler on a 1-process CPU Accelerator: real save() calls."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def save(training, folder: Path, step: int, keep_last: int = 10) -> str:
    accelerator, model, optimizer, scheduler = training
    record = checkpoint_record(TrainConfig(), Progress(step=step), run_id="run", forked_from=None,
                               data_fingerprint="data", data_order=ORDER, val_loss=None)
    path, _ = checkpoint.save(accelerator, str(folder), step, model=model, optimizer=optimizer, scheduler=scheduler,
                              rank_state={"meter": torch.zeros(3)}, record=record, keep_last=keep_last, keep_best=False)
    return path


def corrupt(path: str, name: str = "optimizer.pt") -> None:
    """Flip one byte in the middle of a file: same size, different content (bit rot, a bad copy)."""
    file = Path(path) / name
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def steps_in(folder: Path) -> list[int]:
    return sorted(int(name[5:]) for name in os.listdir(folder / "checkpoints"))


def test_retention_counts_only_checkpoints_that_verify(training, tmp_path):
    for step in (5, 10, 15, 20):
        save(training, tmp_path, step)
    corrupt(checkpoint.step_dir(str(tmp_path), 15))
    deleted = checkpoint.apply_retention(str(tmp_path / "checkpoints"), keep_last=2, keep_best=False)
    assert steps_in(tmp_path) == [10, 20], "the corrupt 15 is not among the newest two: the valid 10 is kept"
    assert sorted(deleted) == [checkpoint.step_dir(str(tmp_path), 5), checkpoint.step_dir(str(tmp_path), 15)]


def test_retention_hashes_what_this_process_wrote_or_verified_only_once(training, tmp_path, monkeypatch):
    for step in (5, 10):
        save(training, tmp_path, step)
    hashed = []
    sha256 = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda file: hashed.append(file) or sha256(file))
    save(training, tmp_path, 15)  # its retention verifies 10 and 5, both written here: no file is hashed again
    assert all(file.startswith(checkpoint.step_dir(str(tmp_path), 15)) for file in hashed)
    hashed.clear()
    checkpoint.apply_retention(str(tmp_path / "checkpoints"), keep_last=3, keep_best=False)
    assert hashed == []
    corrupt(checkpoint.step_dir(str(tmp_path), 10))  # a file changed since: hashed again, and found out
    checkpoint.apply_retention(str(tmp_path / "checkpoints"), keep_last=3, keep_best=False)
    assert any(file.endswith("optimizer.pt") for file in hashed) and steps_in(tmp_path) == [5, 15]


def test_save_writes_afresh_over_an_invalid_folder(training, tmp_path):
    path = save(training, tmp_path, 5)
    corrupt(path)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.verify(path)
    save(training, tmp_path, 5)  # training passes step 5 again (resumed from an older checkpoint)
    checkpoint.verify(path)


def test_a_manifest_lists_only_what_this_save_wrote(training, tmp_path):
    """A killed save's leftovers in the folder (a temp file, another world size's rank file) are never listed."""
    path = Path(checkpoint.step_dir(str(tmp_path), 7))
    path.mkdir(parents=True)
    for stale in ("optimizer.pt.tmp.12345", ".tmpk2x9", "rank_00003.pt"):
        (path / stale).write_bytes(b"left by a killed save")
    save(training, tmp_path, 7)
    listed = set(json.loads((path / checkpoint.MANIFEST).read_text())["files"])
    assert listed == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rank_00000.pt", checkpoint.STATE}
    checkpoint.verify(str(path))


def test_a_checkpoint_of_the_older_format_resumes(training, tmp_path):
    """trainer_state.json as lmdist wrote it before the data position was renamed `micro_batches_in_epoch`."""
    path = Path(save(training, tmp_path, 12))
    state = json.loads((path / checkpoint.STATE).read_text())
    state["progress"] = {"step": 12, "micro_step": 24, "epoch": 1, "batches_in_epoch": 6, "tokens_seen": 3072}
    (path / checkpoint.STATE).write_text(json.dumps(state, indent=1))
    checkpoint.write_manifest(str(path), sorted(json.loads((path / checkpoint.MANIFEST).read_text())["files"]), 12)
    resume = find_resume(TrainConfig(output_dir=str(tmp_path)), say=print)
    assert resume.progress == Progress(step=12, micro_step=24, epoch=1, micro_batches_in_epoch=6, tokens_seen=3072)
    accelerator, model, optimizer, scheduler = training
    assert checkpoint.load(accelerator, resume.path, model=model, optimizer=optimizer, scheduler=scheduler)


# ----------------------------------------------------------------------------- metrics.jsonl, in process

def cut_back(path: Path, step: int):
    from lmdist.tracking import JsonlTracker

    tracker = JsonlTracker(str(path), resume_step=step)
    tracker.start()
    tracker.finish()
    return tracker.repaired


@pytest.mark.parametrize("tail", ['{"step": 4, "train/lo', '{"step": 4, "train/loss": 2.5', "\0\0\0\0",
                                  '{"step": 4}{"step": 5}\n{"step": 5}\n'])
def test_resume_cuts_metrics_back_to_the_last_trusted_row(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": s, "train/loss": 3.0 - s / 10}) + "\n" for s in (1, 2, 3))
    path.write_text(rows + tail)
    warning = cut_back(path, step=2)
    assert path.read_text() == rows[:rows.index('{"step": 3')], "rows up to the checkpoint's step, each whole"
    assert "line 4 is not a complete row" in warning and f"({len(tail.encode())} bytes, " in warning


def test_a_last_row_without_its_newline_is_kept_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}')
    assert cut_back(path, step=2) is None
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


# ----------------------------------------------------------------------------- launches

@pytest.fixture(scope="module")
def source_run(markov_files, tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished 6-step run with a checkpoint every 3 steps, W&B offline; and its flags."""
    out = tmp_path_factory.mktemp("recovery") / "source"
    args = [*TINY_GPT, "--dataset", str(markov_files["short"]), "--val_dataset", str(markov_files["short_val"]),
            "--batch_size", "4", "--max_steps", "6", "--save_every", "3", "--keep_last", "2", "--wandb_mode",
            "offline"]
    run_ok([*args, "--output_dir", str(out)], cwd=out.parent)
    return out, args


def test_a_torn_metrics_line_does_not_block_the_relaunch(source_run, tmp_path):
    """A run killed while writing its metrics (or out of disk) after the checkpoint of step 3."""
    source, args = source_run
    out = tmp_path / "run"
    shutil.copytree(source / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000003")
    shutil.copytree(source / "tokenizer", out / "tokenizer")
    lines = (source / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:4]) + lines[4][:17])  # steps 1-4, then half of step 5
    result = run_ok([*args, "--output_dir", str(out)], cwd=tmp_path)
    assert f"warning: {out / 'metrics.jsonl'} line 5 is not a complete row" in result.stdout
    assert "(17 bytes, 1 lines); resuming from the checkpoint of step 3" in result.stdout
    rows = read_metrics(out)  # every line parses
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5, 6] and rows[3]["resumed_from"] == 3
    assert read_run(out)["status"] == "completed"
    assert read_run(out)["run_id"] == read_run(source)["run_id"], "a relaunch continues its checkpoints' run id"


def test_a_fork_logs_to_a_new_wandb_run_and_records_its_source(source_run, tmp_path):
    source, args = source_run
    fork = tmp_path / "fork"
    parent = source / "checkpoints" / "step_00000003"
    run_ok([*args, "--resume", str(parent), "--output_dir", str(fork)], cwd=tmp_path)
    run, source_id = read_run(fork), read_run(source)["run_id"]
    assert run["run_id"] != source_id and run["status"] == "completed"
    assert run["forked_from"] == {"checkpoint": str(parent), "run_id": source_id, "step": 3}
    pieces = wandb_file.find_offline_runs(fork)
    assert len(pieces) == 1 and pieces[0].endswith(f"-{run['run_id']}")
    ids = {r.run.run_id for r in wandb_file.read_records(wandb_file.run_file(pieces[0]))
           if r.WhichOneof("record_type") == "run"}
    assert ids == {run["run_id"]}
    state = json.loads((fork / "checkpoints" / "step_00000006" / checkpoint.STATE).read_text())
    assert state["run_id"] == run["run_id"], "the fork's own checkpoints carry its id: its relaunches continue it"
    assert read_run(source)["forked_from"] is None
    # The fork's first command again, run.json lost: it continues the fork from its own checkpoint (the end),
    # keeping its id and origin, instead of forking anew from the source
    (fork / "run.json").unlink()
    again = run_ok([*args, "--resume", str(parent), "--output_dir", str(fork)], cwd=tmp_path)
    own = fork / "checkpoints" / "step_00000006"
    assert f"continuing this run from its own newest checkpoint {own}" in again.stdout
    relaunched = read_run(fork)
    assert (relaunched["run_id"], relaunched["forked_from"], relaunched["status"]) == (run["run_id"],
                                                                                      run["forked_from"], "completed")
    assert [r["step"] for r in read_metrics(fork) if "train/loss" in r][-1] == 6, "nothing trained past the end"


def test_an_unreadable_checkpoint_file_is_a_checkpoint_to_skip(tmp_path, monkeypatch):
    """An I/O error while hashing (a bad disk block) makes the checkpoint one resume and retention pass over,
    not an OSError on rank zero alone while the other ranks wait for its verdict."""
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    names = [checkpoint.STATE, "model.safetensors", "optimizer.pt", "scheduler.pt"]
    for name in names:
        (folder / name).write_text("x")
    checkpoint.write_manifest(str(folder), names, 1)
    checkpoint._verified.clear()  # as a new process finds it

    def failing_read(path):
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(checkpoint, "_sha256", failing_read)
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot be read \(Input/output error\)"):
        checkpoint.verify(str(folder))

"""Tests for tests/wandb_file.py on a real offline W&B run (about a second)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("wandb")

# tests/ is on sys.path under pytest's default "prepend" import mode
from tests import wandb_file

BIG = "x" * 100_000  # config value spanning several 32 KiB blocks
N_STEPS = 40


def _row(step: int) -> dict:
    """What the test logs at ``step`` (steps 0, 2, 4, ...), flattened the way the reader reports it."""
    row = {"train/loss": 1.0 / (step + 1), "train/lr": 0.1 * 0.9**step, "eval/acc": step / 100}
    if step % 10 == 0:
        row["val/ppl"] = 100.0 - step
    if step % 16 == 0:
        row["text"] = f"{step}:" + "y" * 40_000  # history record larger than a block
    return row


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import wandb

    tmp_path = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(tmp_path / "home" / var.lower()))
        run = wandb.init(
            project="t",
            dir=str(tmp_path),
            mode="offline",
            config={"lr": 0.1, "model": "gpt", "big": BIG},
            settings=wandb.Settings(console="off"),
        )
        run.config.update({"batch": 8, "opt": {"name": "adam", "betas": [0.9, 0.95]}})
        for i in range(N_STEPS):
            step = 2 * i
            row = _row(step)
            logged = {k: v for k, v in row.items() if not k.startswith("eval/")}
            logged["eval"] = {"acc": row["eval/acc"]}  # nested dict -> nested_key ["eval", "acc"]
            run.log(logged, step=step)
        run.finish()
        wandb.teardown()  # wait for the W&B service to exit: only then is the .wandb file complete
    return tmp_path


@pytest.fixture(scope="module")
def wandb_path(offline_run: Path) -> str:
    runs = wandb_file.find_offline_runs(offline_run)
    assert len(runs) == 1 and os.path.basename(runs[0]).startswith("offline-run-")
    return wandb_file.run_file(runs[0])


def test_records_span_blocks(wandb_path: str) -> None:
    records = wandb_file.read_records(wandb_path)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "header" and "run" in kinds and "exit" in kinds
    assert os.path.getsize(wandb_path) > 6 * wandb_file.BLOCK_LEN
    # records bigger than a block can only have been read by reassembling FIRST/MIDDLE/LAST chunks
    big = [r for r in records if r.ByteSize() > wandb_file.BLOCK_LEN]
    assert {r.WhichOneof("record_type") for r in big} >= {"run", "history"}


def test_history(wandb_path: str) -> None:
    rows = wandb_file.history(wandb_path)
    assert [row["_step"] for row in rows] == [2 * i for i in range(N_STEPS)]
    for row in rows:
        assert isinstance(row.pop("_timestamp"), float) and isinstance(row.pop("_runtime"), float)
        step = row.pop("_step")
        assert row == _row(step), step


def test_config(wandb_path: str) -> None:
    assert wandb_file.config(wandb_path) == {
        "lr": 0.1,
        "model": "gpt",
        "big": BIG,
        "batch": 8,
        "opt": {"name": "adam", "betas": [0.9, 0.95]},
    }


def _corrupt_header(data: bytearray) -> None:
    data[0:4] = b"XXXX"


def _corrupt_magic(data: bytearray) -> None:
    data[4] ^= 0xFF


def _corrupt_payload(data: bytearray) -> None:
    data[wandb_file.BLOCK_LEN + 100] ^= 0x01  # inside a chunk payload -> crc mismatch


def _truncate(data: bytearray) -> None:
    del data[-5:]


@pytest.mark.parametrize("corrupt", [_corrupt_header, _corrupt_magic, _corrupt_payload, _truncate])
def test_corrupted_file_raises(wandb_path: str, tmp_path: Path, corrupt) -> None:
    data = bytearray(Path(wandb_path).read_bytes())
    corrupt(data)
    bad = tmp_path / "run-bad.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError):
        wandb_file.read_records(bad)


def test_run_file_requires_one_file(tmp_path: Path, wandb_path: str) -> None:
    run_dir = tmp_path / "wandb" / "offline-run-20000101_000000-abc"
    run_dir.mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        wandb_file.run_file(run_dir)
    shutil.copy(wandb_path, run_dir / "run-abc.wandb")
    assert wandb_file.find_offline_runs(tmp_path) == [str(run_dir)]
    assert wandb_file.run_file(run_dir) == str(run_dir / "run-abc.wandb")

"""--streaming: 2 ranks share a stream of local files without overlap or gaps, and resume where they stopped."""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmdist.tokenizer import ByteTokenizer
from tests import faults
from tests.conftest import TINY_GPT, final_weights, launch, launch_env, read_metrics, run_ok, with_flags

pytestmark = pytest.mark.launch

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stream")
    for f in range(4):  # 4 shards: each rank reads two whole files
        (folder / f"part{f}.txt").write_text("".join(f"file {f} line {i:04d} {'abcdefghij'[i % 10] * 6}\n"
                                                     for i in range(200)))
    (folder / "val.txt").write_text("file 9 line 0000 held out\n" * 20)
    return folder


def stream_args(shards: Path, output_dir: Path) -> list[str]:
    return with_flags(TINY_GPT, "--tokenizer", "byte", "--streaming", "true", "--dataset", str(shards / "part*.txt"),
                      "--val_dataset", str(shards / "val.txt"), "--batch_size", "4", "--max_steps", "30",
                      "--save_every", "5", "--eval_every", "10", "--output_dir", str(output_dir))


def trained_text(folder: Path, rank: int) -> str:
    """Everything rank `rank` trained on, as text (targets in order: each token once), as recorded in `folder`
    by faults.record_training_targets."""
    rows = [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]
    return ByteTokenizer().decode(token for batch in rows for sequence in batch for token in sequence)


def rows_read(text: str) -> list[tuple[int, int]]:
    return [(int(f), int(i)) for f, i in re.findall(r"file (\d) line (\d{4})", text)]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("straight")
    run_ok(stream_args(shards, folder / "run"), cwd=folder, nproc=2, launcher="torchrun", script=faults.SCRIPT,
           env=faults.inject(faults.record_training_targets, folder=str(folder)))
    return folder


def test_ranks_read_disjoint_gapless_parts_of_the_stream(uninterrupted):
    seen = [rows_read(trained_text(uninterrupted, rank)) for rank in (0, 1)]
    assert all(len(rows) > 50 for rows in seen)
    assert not set(seen[0]) & set(seen[1]), "no row is trained on by both ranks"
    for rows in seen:  # each rank reads its files in order, row after row: nothing skipped
        assert all(b == (a[0], a[1] + 1) or (b[0] != a[0] and b[1] == 0) for a, b in itertools.pairwise(rows))


def test_stream_resumes_where_it_stopped(shards, uninterrupted, tmp_path):
    recording = faults.inject(faults.record_training_targets, folder=str(tmp_path))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(faults.SCRIPT),
           *stream_args(shards, out), "--wandb_mode", "disabled"]
    process = subprocess.Popen(cmd, cwd=tmp_path, env=launch_env(recording), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and any(json.loads(line)["step"] >= 12 for line in metrics.read_text().splitlines())):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert "lmdist: stopped" in stderr, stderr[-3000:]
    result = launch(stream_args(shards, out), cwd=tmp_path, nproc=2, launcher="torchrun", script=faults.SCRIPT,
                    env=recording)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any("resumed_from" in row for row in read_metrics(out))
    for rank in (0, 1):  # the two launches together trained on exactly what the uninterrupted run did
        assert trained_text(tmp_path, rank) == trained_text(uninterrupted, rank)
    a, b = final_weights(out), final_weights(uninterrupted / "run")
    assert all((a[k] == b[k]).all() for k in a)


def test_streaming_needs_max_steps_val_dataset_and_a_fixed_tokenizer(shards, tmp_path):
    base = ["--streaming", "true", "--dataset", str(shards / "part0.txt"), "--output_dir", str(tmp_path / "o")]
    for extra, message in ((["--val_dataset", "x"], "set --max_steps"), (["--max_steps", "5"], "set --val_dataset"),
                           (["--max_steps", "5", "--val_dataset", "x", "--tokenizer", "word"], "use byte")):
        result = launch([*base, *extra], cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr

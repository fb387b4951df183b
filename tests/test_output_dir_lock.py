"""One live run per output_dir: a second launch is refused at once (exit 2, the holder named) and writes
nothing there; the lock dies with its holder, so a killed run's relaunch resumes."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_GPT, launch, launch_command, launch_env, read_metrics, read_run, wait_for_step

pytestmark = pytest.mark.launch


def run_args(markov_files, output_dir: Path, *extra: str) -> list[str]:
    """A run long enough to be caught training (60 steps of the long corpus), a checkpoint every 5 steps."""
    return [*TINY_GPT, "--dataset", str(markov_files["train"]), "--val_dataset", str(markov_files["short_val"]),
            "--batch_size", "4", "--max_steps", "60", "--save_every", "5", "--eval_every", "100",
            "--output_dir", str(output_dir), *extra]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """A 1-process launch in the background, in its own session so that signals reach only it (spawned: the tests
    stop it, kill it and name its pid)."""
    return subprocess.Popen(launch_command(args), cwd=cwd, env=launch_env(prewarmed=False), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with its content hash (folders: 'dir'), to compare before and after."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def test_a_second_launch_is_refused_while_the_first_trains_on(markov_files, tmp_path):
    out = tmp_path / "run"
    first = start(run_args(markov_files, out), tmp_path)
    try:
        wait_for_step(out, 2, first)
        first.send_signal(signal.SIGSTOP)  # caught training; held still so the second launch surely meets it
        second = launch(run_args(markov_files, out, "--lr", "1e-3"), cwd=tmp_path, timeout=240)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"host {platform.node()}, pid {first.pid}" in second.stderr and "held by a live run" in second.stderr
        assert "Traceback" not in second.stderr
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]
    # the first run alone: every step once, its own config, a final export and checkpoints of its run id
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 61))
    assert "lr: 0.003" in (out / "config.yaml").read_text()
    run = read_run(out)
    assert run["status"] == "completed" and (out / "final" / "model.safetensors").exists()
    state = json.loads((out / "checkpoints" / "step_00000060" / "trainer_state.json").read_text())
    assert state["run_id"] == run["run_id"] and state["config"]["lr"] == 0.003


def hold_lock(output_dir: Path, env: dict) -> subprocess.Popen:
    """Another process holding output_dir's lock (as a run's rank zero does), until its stdin closes."""
    code = ("import sys; from lmdist import rundir; assert rundir.acquire(sys.argv[1]) is None; print('held', "
            "flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(output_dir)], cwd=REPO, env=launch_env(env),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_refused_launch_names_the_holder_on_every_rank_and_writes_nothing(markov_files, tmp_path, nproc):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # a run's state, which the refused launch must not touch
    holder = hold_lock(out, {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": None})
    try:
        before = snapshot(out)
        result = launch(run_args(markov_files, out), cwd=tmp_path, nproc=nproc,
                        launcher="torchrun" if nproc > 1 else "python", timeout=240)
        assert snapshot(out) == before, "the refused launch wrote nothing in output_dir"
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    named = f"held by a live run (host {platform.node()}, pid {holder.pid}, Slurm job 4242, since "
    if nproc == 1:
        assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr
    else:  # torchrun reports a failed worker as 1; each rank said why and none hung
        assert result.returncode == 1
        assert all(f"[rank {r}] {out} is {named}" in result.stderr for r in range(nproc)), result.stderr[-3000:]
        # the first rank out exits 2; torchrun may SIGTERM the others once they have said why, before they exit
        codes = re.findall(r"exitcode  : (-?\d+)", result.stderr)
        assert "2" in codes and set(codes) <= {"2", "-15"}, result.stderr[-3000:]


def test_the_lock_dies_with_its_holder_and_a_relaunch_resumes(markov_files, tmp_path):
    out = tmp_path / "run"
    killed = start(run_args(markov_files, out), tmp_path)
    try:
        wait_for_step(out, 8, killed)  # past the checkpoint of step 5
    finally:
        os.kill(killed.pid, signal.SIGKILL)  # no handler runs: only the kernel releases the lock
        killed.communicate(timeout=60)
    assert read_run(out)["status"] == "running"
    relaunch = launch(run_args(markov_files, out), cwd=tmp_path, timeout=300)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    resumed = [r["resumed_from"] for r in read_metrics(out) if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0] >= 5 and f"resumed from {out}/checkpoints/" in relaunch.stdout
    assert read_run(out)["status"] == "completed"


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_died(tmp_path):
    """A DataLoader worker outliving its killed rank zero for a moment must not block the relaunch."""
    code = ("import os, sys, time; from lmdist import rundir; assert rundir.acquire(sys.argv[1]) is None\n"
            "if os.fork() == 0:\n    time.sleep(120)\nelse:\n    os._exit(0)")
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=launch_env(),
                              start_new_session=True)
    try:
        assert parent.wait(timeout=60) == 0
        relaunch = [sys.executable, "-c", "import sys; from lmdist import rundir; print(rundir.acquire(sys.argv[1]))",
                    str(tmp_path)]
        taken = subprocess.run(relaunch, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=60)
        assert taken.stdout == "None\n", taken.stdout + taken.stderr
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the child sleeping in the same session


def test_an_output_dir_that_cannot_be_written_is_one_message(markov_files, tmp_path):
    """The lock is the launch's first write into output_dir: a path it cannot create is a message, not a traceback."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    for output_dir, said in ((tmp_path / "a_file" / "run", f"--output_dir {tmp_path / 'a_file' / 'run'} is not a "
                                                           "writable folder ([Errno 20] Not a directory)"),
                             (tmp_path / "dangling", f"a symbolic link to {tmp_path / 'gone'}, which does not exist")):
        result = launch(run_args(markov_files, output_dir), cwd=tmp_path, timeout=120)
        assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr, result.stderr

"""tests/prewarmed.py: a forked launch is what a spawned one is (the suite's launches go through it)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from lmdist import rundir
from tests.conftest import (
    TINY_GPT,
    launch,
    launch_command,
    launch_env,
    prewarmed_server,
    read_metrics,
    wait_for_step,
)

pytestmark = pytest.mark.launch


def shape(output: str) -> list[str]:
    """The output's lines, with their numbers (speeds, times, pids: not the same twice) and run folders' suffixes
    masked, in order of their text (two ranks' lines interleave as they come)."""
    return sorted(re.sub(r"\d[\d,.e+-]*", "N", output.replace("-forked", "-spawned")).splitlines())


def folders(tmp_path, name: str, side: str) -> list[str]:
    """Each side prepares its own tokens, so that both say the same."""
    return ["--output_dir", str(tmp_path / f"{name}-{side}"), "--tokens_dir", str(tmp_path / f"tokens-{side}")]


def answers(name: str) -> list[str]:
    """The server's answers to the requests whose arguments hold `name`."""
    return [line.split("\t")[0] for line in prewarmed_server().log() if name in line]


@pytest.mark.parametrize("launcher, nproc", [("python", 1), ("torchrun", 2)])
def test_a_forked_launch_trains_prints_and_exits_as_a_spawned_one(markov_files, tmp_path, launcher, nproc):
    # a width the heads do not divide: exit 2 (one process only: torchrun may stop a slower rank, or not)
    for name, flags in (("ok", []), ("bad", ["--n_embd", "31"])) if launcher == "python" else (("ok", []),):
        args = [*TINY_GPT, "--dataset", str(markov_files["short"]), "--batch_size", "4", "--max_steps", "3", *flags]
        runs = {side: subprocess.run(launch_command([*args, *folders(tmp_path, name, side)], nproc, launcher),
                                     cwd=tmp_path, env=launch_env(prewarmed=side == "forked"), capture_output=True,
                                     text=True, timeout=300)
                for side in ("spawned", "forked")}
        spawned, forked = runs["spawned"], runs["forked"]
        assert forked.returncode == spawned.returncode, forked.stderr[-2000:]
        assert (forked.returncode == 0) == (name == "ok"), forked.stderr[-2000:]
        assert shape(forked.stdout) == shape(spawned.stdout) and shape(forked.stderr) == shape(spawned.stderr)
        # the launcher and each of its workers, none of the spawned side's
        assert answers(str(tmp_path / f"{name}-forked")) == ["served"] * (1 if launcher == "python" else 1 + nproc)
        assert answers(str(tmp_path / f"{name}-spawned")) == []
    losses = [[r["train/loss"] for r in read_metrics(tmp_path / f"ok-{side}") if "train/loss" in r]
              for side in ("spawned", "forked")]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_a_launch_the_server_cannot_give_what_a_fresh_interpreter_would_runs_itself(markov_files, tmp_path):
    args = [*TINY_GPT, "--dataset", str(markov_files["short"]), "--n_embd", "31", "--output_dir", str(tmp_path / "x")]
    result = launch(args, tmp_path, env={"TORCH_SHOW_CPP_STACKTRACES": "1"})  # read when torch loads
    assert result.returncode == 2 and "n_embd" in result.stderr, result.stderr[-2000:]
    assert answers(str(tmp_path / "x")) == [
        "declined: variables that may be read at import differ: ['TORCH_SHOW_CPP_STACKTRACES']"]


def test_what_torch_sets_in_the_test_process_still_forks(markov_files, tmp_path, monkeypatch):
    """Torch's inductor, compiling in pytest's process, sets these there; every later launch inherits them."""
    monkeypatch.setenv("KMP_DUPLICATE_LIB_OK", "TRUE")
    monkeypatch.setenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "94000000000000")
    args = [*TINY_GPT, "--dataset", str(markov_files["short"]), "--n_embd", "31", "--output_dir", str(tmp_path / "x")]
    result = launch(args, tmp_path)
    assert result.returncode == 2 and "n_embd" in result.stderr, result.stderr[-2000:]
    assert answers(str(tmp_path / "x")) == ["served"]


def test_signals_reach_the_forked_launch_and_it_dies_with_its_stand_in(markov_files, tmp_path):
    args = [*TINY_GPT, "--dataset", str(markov_files["train"]), "--max_steps", "100000"]
    for signum, out in ((signal.SIGTERM, tmp_path / "terminated"), (signal.SIGKILL, tmp_path / "killed")):
        stand_in = subprocess.Popen(launch_command([*args, "--output_dir", str(out)]), cwd=tmp_path, env=launch_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_step(out, 2, stand_in)
        launch_pid = json.loads((out / rundir.LOCK_FILE).read_text())["pid"]
        assert launch_pid != stand_in.pid, "the launch runs in a process forked from the server"
        stand_in.send_signal(signum)
        _, stderr = stand_in.communicate(timeout=120)
        if signum == signal.SIGTERM:  # forwarded: lmdist checkpoints and exits as it does for SIGTERM
            assert "lmdist: stopped: " in stderr and stand_in.returncode == 75, stderr[-2000:]
        else:
            assert stand_in.returncode == -signal.SIGKILL
        deadline = time.time() + 10
        while time.time() < deadline and os.path.exists(f"/proc/{launch_pid}"):
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{launch_pid}"), "the launch is gone with its stand-in"
    assert answers(str(tmp_path / "terminated")) == answers(str(tmp_path / "killed")) == ["served"]


def test_a_closed_server_leaves_no_folder_behind():
    from tests.prewarmed import Server

    server = Server(launch_env(prewarmed=False))
    assert (server.folder / "prewarmed.sock").exists()
    server.close()
    assert server.process.returncode is not None and not server.folder.exists()

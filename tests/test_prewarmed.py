"""tests/prewarmed.py: a forked launch is what a spawned one is (the suite's launches go through it)."""
from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import TINY_GPT, _prewarmed_server, launch_command, launch_env, read_metrics

pytestmark = pytest.mark.launch


def shape(output: str) -> str:
    """The output with its numbers (speeds, times: not the same twice) and run folders' suffixes masked."""
    return re.sub(r"\d[\d,.e+-]*", "N", output.replace("-forked", "-spawned"))


def folders(tmp_path, name: str, side: str) -> list[str]:
    """Each side prepares its own tokens, so that both say the same."""
    return ["--output_dir", str(tmp_path / f"{name}-{side}"), "--tokens_dir", str(tmp_path / f"tokens-{side}")]


def test_a_forked_launch_trains_prints_and_exits_as_a_spawned_one(markov_files, tmp_path):
    server = _prewarmed_server()
    for name, flags in (("ok", []), ("bad", ["--n_embd", "31"])):  # a width the heads do not divide: exit 2
        args = [*TINY_GPT, "--dataset", str(markov_files["short"]), "--max_steps", "3", *flags]
        spawned = subprocess.run(launch_command([*args, *folders(tmp_path, name, "spawned")]), cwd=tmp_path,
                                 env=launch_env(), capture_output=True, text=True, timeout=300)
        forked = server.run(launch_command([*args, *folders(tmp_path, name, "forked")]), tmp_path, launch_env(),
                            timeout=300)
        assert forked.returncode == spawned.returncode == (0 if name == "ok" else 2), forked.stderr[-2000:]
        assert shape(forked.stdout) == shape(spawned.stdout) and shape(forked.stderr) == shape(spawned.stderr)
    losses = [[r["train/loss"] for r in read_metrics(tmp_path / f"ok-{side}") if "train/loss" in r]
              for side in ("spawned", "forked")]
    assert losses[0] == losses[1] and len(losses[0]) == 3

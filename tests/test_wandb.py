"""W&B: one offline run per training run, holding exactly what metrics.jsonl holds; W&B never stops training."""
from __future__ import annotations

import math
import os

import pytest

from tests import wandb_file
from tests.conftest import TINY_GPT, read_metrics, read_run, run_ok

pytestmark = pytest.mark.launch


def test_two_rank_run_makes_one_offline_run_equal_to_metrics_jsonl(equivalence_runs):
    output_dir = equivalence_runs["torchrun_b4"]
    runs = wandb_file.find_offline_runs(output_dir)
    assert len(runs) == 1, f"one W&B run for 2 ranks, found {runs}"
    path = wandb_file.run_file(runs[0])

    config = wandb_file.config(path)
    assert config["model"] == "gpt" and config["n_embd"] == 32 and config["batch_size"] == 4
    assert config["run"]["world_size"] == 2 and config["run"]["distributed_type"] == "MULTI_CPU"

    rows = read_metrics(output_dir)
    history = {h["_step"]: h for h in wandb_file.history(path)}
    assert sorted(history) == [r["step"] for r in rows], "a history record for every logged step"
    for row in rows:
        logged = history[row["step"]]
        for key, value in row.items():
            assert math.isclose(logged[key], value, rel_tol=1e-12), f"step {row['step']} {key}"
    assert read_run(output_dir)["wandb_mode"] == "offline"


def test_unreachable_wandb_server_does_not_stop_training(markov_files, tmp_path):
    """Online mode, a key, and a server nobody answers: a warning, offline logging, a finished run."""
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_MODE": None}
    out = tmp_path / "out"
    result = run_ok([*TINY_GPT, "--dataset", str(markov_files["short"]), "--batch_size", "4", "--max_steps", "3",
                     "--wandb_mode", "online",
                     "--wandb_init_timeout", "5", "--output_dir", str(out)], cwd=tmp_path, env=env, timeout=240)
    assert "warning: W&B could not start online" in result.stdout and "logging offline instead" in result.stdout
    assert read_run(out)["status"] == "completed" and read_run(out)["wandb_mode"] == "offline"
    runs = wandb_file.find_offline_runs(out)
    assert len(runs) == 1
    steps = [h["_step"] for h in wandb_file.history(wandb_file.run_file(runs[0]))]
    assert steps == [1, 2, 3]


def test_auto_mode_without_credentials_is_offline(monkeypatch, tmp_path):
    from lmdist.config import TrainConfig
    from lmdist.tracking import wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode(TrainConfig()) == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    os.chmod(netrc, 0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode(TrainConfig()) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(TrainConfig()) == "disabled"
    assert wandb_mode(TrainConfig(wandb_mode="offline")) == "offline"


def test_broken_wandb_environment_does_not_stop_training(markov_files, tmp_path):
    """Even when W&B cannot start offline (here: an invalid WANDB_MODE in the environment), training finishes."""
    out = tmp_path / "out"
    result = run_ok([*TINY_GPT, "--dataset", str(markov_files["short"]), "--batch_size", "4", "--max_steps", "2",
                     "--wandb_mode", "offline",
                     "--output_dir", str(out)], cwd=tmp_path, env={"WANDB_MODE": "sideways"}, timeout=120)
    assert "training goes on without W&B" in result.stdout
    assert read_run(out)["status"] == "completed" and read_run(out)["wandb_mode"] == "disabled"
    assert [r["step"] for r in read_metrics(out)] == [1, 2]

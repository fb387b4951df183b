"""slurm/*.sbatch, unmodified, on a real two-node Slurm cluster started on this machine.

Under CI (CI=true) a cluster that cannot start fails these tests; elsewhere (no root, no apt) they skip.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_GPT, final_weights, read_metrics, read_run, run_ok, with_flags
from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.launch


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as e:  # noqa: BLE001 -- whatever stops the cluster, say it
        if os.environ.get("CI") == "true":
            pytest.fail(f"could not start the local Slurm cluster: {e}")
        pytest.skip(f"no local Slurm cluster here: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture
def submit_dir(markov_files, tmp_path) -> Path:
    """A folder to sbatch from, with relative data paths (they must resolve against $SLURM_SUBMIT_DIR)."""
    (tmp_path / "train.txt").write_text(markov_files["short"].read_text())
    (tmp_path / "val.txt").write_text(markov_files["short_val"].read_text())
    return tmp_path


# The equivalence runs' training (tests/conftest.py), with data paths relative to the submit folder.
ARGS = with_flags(TINY_GPT, "--dataset", "train.txt", "--val_dataset", "val.txt", "--batch_size", "4", "--epochs", "2",
                  "--eval_every", "5", "--warmup_steps", "3")
ENV = {"LMDIST_HOME": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def job_log(folder: Path, job_id: str) -> str:
    return next(folder.glob(f"*-{job_id}.out")).read_text()


def losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(output_dir) if "train/loss" in r}


def test_train_sbatch_one_node_two_ranks(cluster, submit_dir, equivalence_runs):
    job = cluster.sbatch(str(REPO / "slurm" / "train.sbatch"), *ARGS, "--wandb_mode", "offline", cwd=submit_dir,
                         env=ENV)
    info = cluster.wait(job)
    log = job_log(submit_dir, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    out = submit_dir / "runs" / f"lmdist-{job}"  # the default output_dir: runs/<job name>-<job id>
    assert read_run(out)["world_size"] == 2 and read_run(out)["slurm_job_id"] == job
    assert "preflight: host" in log and "node_rank 0" in log
    assert "were not passed to `accelerate launch`" not in log, "the launcher is given every value it needs"
    assert "wandb:" not in log and "W&B logged offline" in log, "W&B speaks through lmdist's lines only"
    rows = read_metrics(out)
    assert rows[-1]["val/loss"] < next(r["val/loss"] for r in rows if "val/loss" in r) - 0.05, "it learns"
    want = losses(equivalence_runs["torchrun_b4"])
    assert losses(out).keys() == want.keys()
    assert all(abs(losses(out)[s] - want[s]) <= 1e-5 * want[s] for s in want)


def test_multinode_sbatch_one_rank_per_node(cluster, submit_dir, equivalence_runs):
    env = {**ENV, "NPROC_PER_NODE": "1"}
    job = cluster.sbatch("--nodes=2", str(REPO / "slurm" / "train_multinode.sbatch"), *ARGS,
                         "--output_dir", "multi", cwd=submit_dir, env=env)
    info = cluster.wait(job)
    log = job_log(submit_dir, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["NodeList"] == "n[1-2]" and "node_rank 0" in log and "node_rank 1" in log
    facts = read_run(submit_dir / "multi")
    assert facts["world_size"] == 2 and facts["distributed_type"] == "MULTI_CPU"
    want = losses(equivalence_runs["torchrun_b4"])
    got = losses(submit_dir / "multi")
    assert got.keys() == want.keys() and all(abs(got[s] - want[s]) <= 1e-5 * want[s] for s in want)


def test_preemption_checkpoints_requeues_and_resumes_exactly(cluster, submit_dir, tmp_path_factory):
    """USR1 to the batch shell mid-training: checkpoint, requeue (one restart), resume, the same final weights."""
    args = with_flags(ARGS, "--epochs", "30", "--max_steps", "120", "--save_every", "10", "--wandb_mode", "offline")
    reference = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_ok(with_flags(args, "--output_dir", str(reference), "--wandb_mode", "disabled"), cwd=submit_dir, nproc=2,
           launcher="torchrun")
    job = cluster.sbatch(str(REPO / "slurm" / "train.sbatch"), *args, cwd=submit_dir, env=ENV)
    out = submit_dir / "runs" / f"lmdist-{job}"
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and any(
            json.loads(line)["step"] >= 30 for line in (out / "metrics.jsonl").read_text().splitlines() if line)):
        assert time.time() < deadline, job_log(submit_dir, job)[-3000:]
        time.sleep(0.2)
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    cluster.start_when_requeued(job)
    info = cluster.wait(job, timeout=300, states=("COMPLETED", "FAILED", "CANCELLED"))
    log = job_log(submit_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert "SIGUSR1" in log and "requeued Slurm job" in log
    resumed = [r["resumed_from"] for r in read_metrics(out) if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0] > 0
    a, b = final_weights(out), final_weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)
    pieces = list((out / "wandb").glob("offline-run-*"))
    assert len(pieces) == 2 and len({p.name.rsplit("-", 1)[1] for p in pieces}) == 1, "one W&B run id"


def test_bad_submission_fails_fast_with_the_reason_in_the_log(cluster, submit_dir):
    started = time.time()
    job = cluster.sbatch(str(REPO / "slurm" / "train.sbatch"), "--dataset", "missing.txt", cwd=submit_dir, env=ENV)
    info = cluster.wait(job, timeout=60)
    assert info["JobState"] == "FAILED" and time.time() - started < 60
    assert "dataset path 'missing.txt' does not exist" in job_log(submit_dir, job)
    job = cluster.sbatch(str(REPO / "slurm" / "train.sbatch"), "--n_embdd", "64", cwd=submit_dir, env=ENV)
    assert cluster.wait(job, timeout=60)["JobState"] == "FAILED"
    assert "did you mean --n_embd?" in job_log(submit_dir, job)

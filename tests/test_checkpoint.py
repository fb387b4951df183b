"""Checkpoints and stop requests: an interrupted run, relaunched, is the uninterrupted run.

Reference run A: 2 gloo ranks, dropout 0.1, 40 optimizer steps over two epochs (23 steps each), a
checkpoint every 5 steps. Every other run here is interrupted somehow, relaunched with the same
command, and must end with A's losses (bitwise) and A's parameters and optimizer state (torch.equal).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lmdist import checkpoint
from tests import faults, wandb_file
from tests.conftest import (
    TINY_GPT,
    equivalence_args,
    final_weights,
    launch,
    launch_command,
    launch_env,
    read_metrics,
    read_run,
    run_ok,
    wait_for_step,
    with_flags,
)

pytestmark = pytest.mark.launch

STEPS_PER_EPOCH = 23


@pytest.fixture(scope="session")
def resume_data(markov, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("resume_data")
    (folder / "train.txt").write_text(markov.sample(5_900, seed=11) + "\n")  # 184 sequences: 23 steps of 8
    (folder / "val.txt").write_text(markov.sample(300, seed=12) + "\n")
    return ["--dataset", str(folder / "train.txt"), "--val_dataset", str(folder / "val.txt")]


def args_for(resume_data, output_dir, *overrides) -> list[str]:
    """Run A's flags, with `overrides` (--flag value pairs) replacing or adding to them."""
    run_a = with_flags(TINY_GPT, "--dropout", "0.1",  # exact resume must hold with dropout's RNG in play
                       "--batch_size", "4", "--epochs", "2", "--max_steps", "40", "--save_every", "5",
                       "--keep_last", "3", "--eval_every", "10", "--output_dir", str(output_dir))
    return with_flags([*resume_data, *run_a], *overrides)


@pytest.fixture(scope="session")
def reference(resume_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    run_ok(args_for(resume_data, out), cwd=out.parent, nproc=2, launcher="torchrun")
    assert read_run(out)["steps_per_epoch"] == STEPS_PER_EPOCH
    return out


def start(args, cwd, env=None, prewarmed=True) -> subprocess.Popen:
    """A 2-rank torchrun launch in the background (its own process group, so tests can signal it); `prewarmed`
    False where the test looks into its process tree."""
    return subprocess.Popen(launch_command(args, 2, "torchrun"), cwd=cwd, env=launch_env(env, prewarmed),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def children(pid: int) -> list[int]:
    return [int(child) for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                   text=True).stdout.split()]


def forks(pid: int) -> list[int]:
    """The children of `pid` that run its own command line."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [child for child in children(pid) if Path(f"/proc/{child}/cmdline").read_bytes() == command]


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the launcher's workers."""
    ranks = {}
    for pid in children(launcher.pid):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK="))
        ranks[rank] = pid
    return ranks


def assert_same_as_reference(run: Path, reference: Path) -> int:
    """The relaunched run matches A exactly; returns the step it resumed from."""
    rows = read_metrics(run)
    resumed = [r["resumed_from"] for r in rows if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0] > 0
    steps = [r["step"] for r in rows if "resumed_from" not in r]
    assert steps == sorted(set(steps)), "rows logged after the checkpoint by the interrupted launch were cut"
    want = {r["step"]: r["train/loss"] for r in read_metrics(reference) if "train/loss" in r}
    got = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert got == want, "every train/loss, before and after the resume, bitwise equal to the uninterrupted run"
    a, b = final_weights(run), final_weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = checkpoint.step_dir(str(run), 40)
    opt_a = torch.load(Path(last) / "optimizer.pt", weights_only=True)
    opt_b = torch.load(Path(checkpoint.step_dir(str(reference), 40)) / "optimizer.pt", weights_only=True)
    for key, state in opt_b["state"].items():
        assert all(torch.equal(state[name], opt_a["state"][key][name]) for name in state)
    return resumed[0]


def fake_scontrol(folder: Path) -> dict:
    """A stand-in `scontrol` on PATH that records its arguments."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {folder / 'scontrol.calls'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}


def test_sigterm_mid_epoch_then_relaunch_is_exact(reference, resume_data, tmp_path):
    out = tmp_path / "run"
    env = fake_scontrol(tmp_path)
    process = start(args_for(resume_data, out, "--wandb_mode", "offline"), tmp_path, env)
    wait_for_step(out, 12, process)
    os.killpg(process.pid, signal.SIGTERM)  # what scancel does: the launcher forwards it to the workers
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and stderr.count("lmdist: stopped: ") == 2, stderr[-3000:]
    assert read_run(out)["status"] == "stopped" and read_run(out)["exit_code"] == 75
    assert not (tmp_path / "scontrol.calls").exists(), "SIGTERM checkpoints but does not requeue"
    run_ok(args_for(resume_data, out, "--wandb_mode", "offline"), cwd=tmp_path, nproc=2, launcher="torchrun")
    resumed = assert_same_as_reference(out, reference)
    assert resumed < STEPS_PER_EPOCH, "resumed mid-epoch, then crossed the epoch boundary"
    # W&B offline: one piece per launch, both under the run id, together covering every logged step;
    # `wandb sync` uploads pieces with one id into one run, in order.
    pieces = [wandb_file.run_file(d) for d in wandb_file.find_offline_runs(out)]
    assert len(pieces) == 2
    ids = {r.run.run_id for p in pieces for r in wandb_file.read_records(p) if r.WhichOneof("record_type") == "run"}
    assert ids == {read_run(out)["run_id"]}
    first, second = ([h["_step"] for h in wandb_file.history(p)] for p in pieces)
    assert min(second) == resumed + 1 and set(first) | set(second) == {r["step"] for r in read_metrics(out)
                                                                        if "resumed_from" not in r}


def test_sigterm_to_the_whole_job_with_loader_workers_is_exact(reference, resume_data, tmp_path):
    """scancel, preemption and Ctrl-C signal every process of the job, DataLoader workers too (2 per GPU by
    default): the workers must leave the stop to the trainer, not die and take the run down."""
    out = tmp_path / "run"
    args = args_for(resume_data, out, "--num_workers", "1")
    process = start(args, tmp_path, prewarmed=False)
    wait_for_step(out, 12, process)
    # Loader workers are running: each rank has forked children (a fork runs its parent's command line), which
    # the signal reaches too. A rank forks nothing else.
    ranks = worker_pids(process)
    assert sorted(ranks) == [0, 1] and all(forks(pid) for pid in ranks.values())
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert stderr.count("lmdist: stopped: ") == 2 and "killed by signal" not in stderr, stderr[-3000:]
    run_ok(args, cwd=tmp_path, nproc=2, launcher="torchrun")
    assert_same_as_reference(out, reference)


def test_sigusr1_to_one_worker_checkpoints_every_rank_and_requeues_once(reference, resume_data, tmp_path):
    out = tmp_path / "run"
    env = fake_scontrol(tmp_path)
    process = start(args_for(resume_data, out), tmp_path, env, prewarmed=False)
    wait_for_step(out, 8, process)
    os.kill(worker_pids(process)[1], signal.SIGUSR1)  # rank 1 only; rank 0 never hears of it
    _, stderr = process.communicate(timeout=120)
    stops = [line for line in stderr.splitlines() if "lmdist: stopped:" in line]
    assert len(stops) == 2 and "SIGUSR1" in stops[0], stderr[-3000:]
    step = read_run(out)["step"]
    saved = Path(checkpoint.step_dir(str(out), step))
    assert (saved / "rank_00000.pt").exists() and (saved / "rank_00001.pt").exists()
    assert all(f"at step {step}:" in line for line in stops), "both ranks stopped at the same step"
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    run_ok(args_for(resume_data, out), cwd=tmp_path, nproc=2, launcher="torchrun")
    assert assert_same_as_reference(out, reference) == step


def test_array_job_requeues_its_own_task(monkeypatch, tmp_path):
    from lmdist.stopping import requeue_slurm_job

    for key, value in {**fake_scontrol(tmp_path), "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}.items():
        monkeypatch.setenv(key, value)
    assert requeue_slurm_job() == "77_3"
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 77_3\n"


def test_torn_and_truncated_checkpoints_fall_back(reference, resume_data, tmp_path):
    """A save killed before its manifest (torn) and a file cut short (truncated): resume skips both, naming
    them, and continues from the previous complete checkpoint."""
    out = tmp_path / "run"
    process = start(args_for(resume_data, out), tmp_path)
    wait_for_step(out, 17, process)
    os.killpg(process.pid, signal.SIGTERM)
    process.communicate(timeout=120)
    saved = sorted(step for step, _ in checkpoint.step_folders(str(out / "checkpoints")))
    assert len(saved) == 3  # keep_last 3
    newest, second = (Path(checkpoint.step_dir(str(out), s)) for s in saved[:0:-1])
    (newest / "manifest.json").unlink()  # killed before rank zero wrote the manifest
    optimizer = second / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])  # killed mid-write
    result = run_ok(args_for(resume_data, out), cwd=tmp_path, nproc=2, launcher="torchrun")
    assert f"skipping checkpoint {newest}" in result.stdout and "manifest.json is missing" in result.stdout
    assert f"skipping checkpoint {second}" in result.stdout and "does not match the manifest" in result.stdout
    assert assert_same_as_reference(out, reference) == saved[0]


def test_torchrun_restarts_a_crashed_rank_from_the_newest_checkpoint(reference, resume_data, tmp_path):
    marker = tmp_path / "crashed-once"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", str(faults.SCRIPT), *args_for(resume_data, out), "--wandb_mode", "disabled"]
    env = launch_env(faults.inject(faults.crash_rank_once, rank=1, micro_step=13, marker=str(marker)))
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists()
    assert assert_same_as_reference(out, reference) == 10


def test_nan_on_one_rank_stops_every_rank_and_saves_nothing_non_finite(resume_data, tmp_path):
    out = tmp_path / "run"
    result = launch(args_for(resume_data, out), cwd=tmp_path, nproc=2, launcher="torchrun", script=faults.SCRIPT,
                    env=faults.inject(faults.nan_output_on_rank, rank=1, forward=7), timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("non-finite loss at optimizer step 7") == 2, result.stderr[-3000:]
    assert read_run(out)["status"] == "non-finite" and read_run(out)["exit_code"] == 3
    saved = sorted(step for step, _ in checkpoint.step_folders(str(out / "checkpoints")))
    assert saved == [5]
    weights = load_file(Path(checkpoint.step_dir(str(out), 5)) / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


class Payload:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("manifest", ["kept", "forged"])
def test_pickle_payloads_are_never_unpickled(reference, resume_data, tmp_path, manifest):
    source = Path(checkpoint.step_dir(str(reference), 40))
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    marker = tmp_path / "pwned"
    for file in target.iterdir():
        if file.suffix == ".pt":
            with open(file, "wb") as f:
                pickle.dump(Payload(marker), f)
    if manifest == "forged":  # an attacker who rewrites the manifest too still meets weights_only=True
        files = json.loads((target / "manifest.json").read_text())
        for name in files["files"]:
            data = (target / name).read_bytes()
            files["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (target / "manifest.json").write_text(json.dumps(files))
    result = launch(args_for(resume_data, tmp_path / "run", "--resume", str(target)), cwd=tmp_path, nproc=2,
                    launcher="torchrun")
    assert result.returncode != 0
    expected = "does not match the manifest" if manifest == "kept" else "refusing to load it"
    assert result.stderr.count(expected) == 2 and "checkpoint.py" not in result.stderr, result.stderr[-3000:]
    assert not marker.exists(), "the payload ran"


def test_relaunching_a_finished_run_does_nothing(reference, resume_data, tmp_path):
    finished = launch(args_for(resume_data, reference), cwd=tmp_path, nproc=1)
    assert finished.returncode == 0 and "has already finished; nothing to do" in finished.stdout


def test_a_finished_run_refuses_a_changed_setting(reference, resume_data, tmp_path):
    changed = launch(args_for(resume_data, reference, "--lr", "1e-3"), cwd=tmp_path, nproc=1)
    assert changed.returncode == 2 and "lr (finished run 0.003, now 0.001)" in changed.stderr


def test_resume_never_refuses_a_folder_that_holds_a_run(reference, resume_data, tmp_path):
    never = launch(args_for(resume_data, reference, "--resume", "never"), cwd=tmp_path, nproc=1)
    assert never.returncode == 2 and "--resume never" in never.stderr and "already holds a run" in never.stderr


@pytest.fixture
def unfinished(reference, tmp_path) -> Path:
    """The reference's checkpoints and tokenizer without its end: a run to resume from its step-40 checkpoint."""
    partial = tmp_path / "partial"
    shutil.copytree(reference / "checkpoints", partial / "checkpoints")
    shutil.copytree(reference / "tokenizer", partial / "tokenizer")
    return partial


def test_a_checkpoint_refuses_a_changed_setting_naming_the_field(unfinished, resume_data, tmp_path):
    refused = launch(args_for(resume_data, unfinished, "--lr", "1e-3"), cwd=tmp_path, nproc=1)
    assert refused.returncode == 2 and "differs from the checkpoint" in refused.stderr
    assert "lr (checkpoint 0.003, now 0.001)" in refused.stderr


def test_a_checkpoint_refuses_a_batch_no_grad_accum_keeps(unfinished, resume_data, tmp_path):
    other_world = launch(args_for(resume_data, unfinished, "--batch_size", "3"), cwd=tmp_path, nproc=1)
    assert other_world.returncode == 2 and "cannot keep it with a whole grad_accum" in other_world.stderr


def test_a_checkpoint_resumes_with_a_changed_logging_setting(unfinished, resume_data, tmp_path):
    allowed = launch(args_for(resume_data, unfinished, "--log_every", "7"), cwd=tmp_path, nproc=2,
                     launcher="torchrun")
    assert allowed.returncode == 0, allowed.stderr[-3000:]


def test_retention_keeps_the_newest_and_the_best(tmp_path):
    folder = tmp_path / "checkpoints"
    for step, val_loss in ((5, 3.0), (10, 1.5), (15, None), (20, 2.0), (25, 2.5)):
        path = folder / f"step_{step:08d}"
        path.mkdir(parents=True)
        for name in ("model.safetensors", "optimizer.pt", "scheduler.pt"):  # stand-ins: retention only hashes them
            (path / name).write_bytes(name.encode())
        (path / "trainer_state.json").write_text(json.dumps({"val_loss": val_loss}))
        checkpoint.write_manifest(str(path), [*os.listdir(path)], step)
    (folder / "step_00000030").mkdir()  # a save in progress (no manifest yet): never touched
    (folder / "step_00000003").mkdir()  # a torn leftover older than the newest complete one: removed
    assert len(checkpoint.apply_retention(str(folder), keep_last=4, keep_best=False)) == 2  # 3 and 5
    deleted = checkpoint.apply_retention(str(folder), keep_last=2, keep_best=True)
    assert sorted(os.listdir(folder)) == ["step_00000010", "step_00000020", "step_00000025", "step_00000030"]
    assert len(deleted) == 1  # 15: not among the newest two, and 10 has the lowest val/loss


def test_reference_run_kept_its_last_three_checkpoints(reference):
    assert sorted(os.listdir(reference / "checkpoints")) == ["step_00000030", "step_00000035", "step_00000040"]


def test_resume_exactly_at_an_epoch_boundary(reference, resume_data, tmp_path):
    """A checkpoint on the last step of epoch 0 resumes at the start of epoch 1 (save_every may change)."""
    out = tmp_path / "run"
    process = start(args_for(resume_data, out, "--save_every", str(STEPS_PER_EPOCH)), tmp_path)
    wait_for_step(out, STEPS_PER_EPOCH + 2, process)
    os.killpg(process.pid, signal.SIGTERM)
    process.communicate(timeout=120)
    for step, path in checkpoint.step_folders(str(out / "checkpoints")):
        if step != STEPS_PER_EPOCH:
            shutil.rmtree(path)  # as if the stop had come right after the epoch-end save
    state = json.loads((Path(checkpoint.step_dir(str(out), STEPS_PER_EPOCH)) / "trainer_state.json").read_text())
    assert (state["progress"]["epoch"], state["progress"]["micro_batches_in_epoch"]) == (1, 0)
    run_ok(args_for(resume_data, out), cwd=tmp_path, nproc=2, launcher="torchrun")
    assert assert_same_as_reference(out, reference) == STEPS_PER_EPOCH


def test_init_from_takes_weights_only(reference, resume_data, tmp_path):
    out = tmp_path / "run"
    run_ok(args_for(resume_data, out, "--init_from", str(reference / "final"), "--lr", "0", "--max_steps", "1"),
           cwd=tmp_path)
    first = read_metrics(out)
    assert [r["step"] for r in first] == [1] and "resumed_from" not in first[0]
    assert first[0]["val/loss"] == pytest.approx(read_metrics(reference)[-1]["val/loss"], rel=1e-6)
    assert read_run(out)["run_id"] != read_run(reference)["run_id"]


def lmdist_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmdist", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_eval_matches_the_runs_last_val_loss_and_sees_one_changed_token(reference, resume_data, tmp_path):
    last = read_metrics(reference)[-1]["val/loss"]
    for folder in (reference / "final", Path(checkpoint.step_dir(str(reference), 40))):
        result = lmdist_cli("eval", "--checkpoint", str(folder), "--output", str(tmp_path / "e.json"), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads((tmp_path / "e.json").read_text())["val/loss"] == pytest.approx(last, rel=1e-6)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lmdist", "eval", "--checkpoint", str(reference / "final"), "--batch_size", "3",
                          "--output", str(tmp_path / "two.json")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert two.returncode == 0, two.stderr[-8000:]  # long: a rank's own error comes before torchrun's summary
    assert json.loads((tmp_path / "two.json").read_text())["val/loss"] == pytest.approx(last, rel=1e-6)
    val = Path(resume_data[3]).read_text()
    changed = tmp_path / "changed.txt"
    changed.write_text(val[:100] + ("a" if val[100] != "a" else "b") + val[101:])
    result = lmdist_cli("eval", "--checkpoint", str(reference / "final"), "--dataset", str(changed),
                        "--split", "train", "--output", str(tmp_path / "c.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "c.json").read_text())["val/loss"] != pytest.approx(last, rel=1e-9)


def test_generate_is_reproducible_and_top_k_1_is_greedy(reference, tmp_path):
    def sample(*extra: str) -> str:
        result = lmdist_cli("generate", "--checkpoint", str(reference / "final"), "--prompt", "abcab",
                            "--max_new_tokens", "40", *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.strip()

    seeded = sample("--seed", "1")
    assert seeded == sample("--seed", "1") and len(seeded) >= 40
    assert seeded != sample("--seed", "2")
    greedy = sample("--temperature", "0")
    assert sample("--top_k", "1", "--seed", "1") == sample("--top_k", "1", "--seed", "2") == greedy


def test_padded_vocabulary_trains_exports_and_never_samples_padding(markov_files, tmp_path):
    """--vocab_multiple 64: the model has 64 output rows for a small char vocabulary; the export carries the
    setting, and hot sampling (nearly uniform over all 64 rows) only ever yields real tokens."""
    out = tmp_path / "run"
    run_ok([*TINY_GPT, "--dataset", str(markov_files["short"]), "--max_steps", "3", "--vocab_multiple", "64",
            "--output_dir", str(out)], cwd=tmp_path)
    weights = final_weights(out)
    assert weights["wte.weight"].shape[0] == 64 > read_run(out)["vocab_size"]
    assert json.loads((out / "final" / "lmdist.json").read_text())["vocab_multiple"] == 64
    alone = tmp_path / "alone"  # the export on its own: the model's settings come from its lmdist.json
    shutil.copytree(out / "final", alone)
    result = lmdist_cli("generate", "--checkpoint", str(alone), "--prompt", "ab", "--max_new_tokens", "300",
                        "--temperature", "50", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout.strip()
    sampled = set(text.replace("<unk>", "").replace("<eos>", ""))
    assert len(text) >= 250 and sampled <= set(markov_files["short"].read_text())


def test_a_signal_in_the_middle_of_a_save_does_not_corrupt_it(reference, resume_data, tmp_path):
    """Rank zero gets SIGINT while hashing files for a manifest: that save completes and verifies, the run
    stops at the next step with another checkpoint, and the relaunch is exact."""
    out = tmp_path / "run"
    result = launch(args_for(resume_data, out), cwd=tmp_path, nproc=2, launcher="torchrun", script=faults.SCRIPT,
                    env=faults.inject(faults.sigint_while_hashing, step=10))
    assert result.returncode != 0 and result.stderr.count("SIGINT at step 11: saved") == 2, result.stderr[-3000:]
    checkpoint.verify(checkpoint.step_dir(str(out), 10))
    checkpoint.verify(checkpoint.step_dir(str(out), 11))
    run_ok(args_for(resume_data, out), cwd=tmp_path, nproc=2, launcher="torchrun")
    assert assert_same_as_reference(out, reference) == 11


def test_the_step_check_names_a_non_finite_loss_or_gradient_norm(monkeypatch):
    from lmdist import stopping
    from lmdist.metrics import TokenMeter

    monkeypatch.setattr(stopping.signal, "signal", lambda *a: None)  # keep pytest's own handlers
    guard, finite = stopping.StopGuard(use_scaler=False), torch.tensor(1.5)

    def losses(*values: float) -> torch.Tensor:  # the training meter's sums after these micro-steps
        meter = TokenMeter(torch.device("cpu"))
        for value in values:  # a micro-step of 6 tokens whose mean loss is `value`, as next_token_loss sums it
            meter.add(torch.tensor([6 * value, 0.0, 6.0]))
        return meter.sums

    assert guard.check(finite, losses(1.5, 2.0)) == stopping.Verdict()
    assert guard.check(finite, losses(1.5, float("nan"), 2.0)).nonfinite == "loss"  # one bad micro-step
    assert guard.check(finite, losses(float("-inf"))).nonfinite == "loss"
    assert guard.check(torch.tensor(float("inf")), losses(1.5)).nonfinite == "gradient norm"
    guard._on_signal(signal.SIGTERM, None)
    assert guard.check(finite, losses(1.5)) == stopping.Verdict(stop_signal="SIGTERM")


def test_fp16_skipped_steps_stop_only_after_many_in_a_row(monkeypatch):
    from lmdist import stopping

    monkeypatch.setattr(stopping.signal, "signal", lambda *a: None)  # keep pytest's own handlers
    guard = stopping.StopGuard(use_scaler=True)
    overflow = torch.tensor([float("inf"), 0.0, 1.0], dtype=torch.float64)
    assert guard.check(torch.tensor(float("inf")), overflow).nonfinite is None, "an fp16 overflow is the scaler's"
    skipped, stepped = SimpleNamespace(step_was_skipped=True), SimpleNamespace(step_was_skipped=False)
    for _ in range(stopping.MAX_SKIPPED_STEPS - 1):
        guard.after_step(skipped)
    guard.after_step(stepped)  # a real step resets the count
    for _ in range(stopping.MAX_SKIPPED_STEPS - 1):
        guard.after_step(skipped)
    with pytest.raises(stopping.NonFiniteError, match="skipped 20 optimizer steps in a row"):
        guard.after_step(skipped)


FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block,LSTM"}


@pytest.mark.parametrize("before, after", [(("torchrun", 2, "1"), ("python", 1, "2")),
                                           (("python", 1, "2"), ("torchrun", 2, "1")),
                                           (("torchrun", 2, "1", FSDP), ("python", 1, "2")),
                                           (("python", 1, "2"), ("torchrun", 2, "1", FSDP))],
                         ids=["ddp-2-to-1", "1-to-ddp-2", "fsdp-2-to-1", "1-to-fsdp-2"])
def test_resume_on_another_world_size_keeps_the_global_batch(markov_files, tmp_path, before, after):
    """2 ranks -> 1 process and 1 -> 2, with DDP and FSDP: grad_accum absorbs the change, no sequence is
    repeated or skipped, and the run ends where the uninterrupted one did (the equivalence tolerance)."""
    (launcher, nproc, grad_accum, *env), (new_launcher, new_nproc, new_grad_accum, *new_env) = before, after
    args = with_flags(equivalence_args(markov_files), "--batch_size", "4", "--save_every", "5", "--keep_last", "5")
    source = tmp_path / "source"
    run_ok(with_flags(args, "--grad_accum", grad_accum, "--output_dir", str(source)), cwd=tmp_path, nproc=nproc,
           launcher=launcher, env=env[0] if env else None)
    moved = tmp_path / "moved"
    shutil.copytree(Path(checkpoint.step_dir(str(source), 10)), Path(checkpoint.step_dir(str(moved), 10)))
    shutil.copytree(source / "tokenizer", moved / "tokenizer")
    result = run_ok(with_flags(args, "--grad_accum", grad_accum, "--output_dir", str(moved)), cwd=tmp_path,
                    nproc=new_nproc, launcher=new_launcher, env=new_env[0] if new_env else None)
    assert f"grad_accum {grad_accum} -> {new_grad_accum} keeps the global batch of 8 sequences" in result.stdout
    state = json.loads((Path(checkpoint.step_dir(str(moved), 16)) / "trainer_state.json").read_text())
    assert state["world_size"] == new_nproc and state["config"]["grad_accum"] == int(new_grad_accum)
    want = {r["step"]: r["train/loss"] for r in read_metrics(source) if "train/loss" in r}
    got = {r["step"]: r["train/loss"] for r in read_metrics(moved) if "train/loss" in r}
    assert sorted(got) == list(range(11, 17))
    assert all(abs(got[s] - want[s]) <= 1e-5 * want[s] for s in got)
    a, b = final_weights(moved), final_weights(source)
    assert all((a[k] - b[k]).norm() <= 1e-5 * b[k].norm() for k in a)


def test_keep_best_evaluates_every_checkpoint_and_keeps_the_lowest(markov_files, tmp_path):
    out = tmp_path / "run"
    # A constant, too-high lr makes val/loss jump around: the best checkpoint is not the newest one (on the gpt2
    # style: the modern one's QK-norm keeps it stable at this lr).
    args = with_flags(equivalence_args(markov_files), "--gpt_style", "gpt2", "--batch_size", "4", "--max_steps", "6",
                      "--save_every", "2",
                      "--keep_last", "1", "--keep_best", "true", "--eval_every", "100", "--lr", "0.3",
                      "--warmup_steps", "0", "--lr_schedule", "constant", "--output_dir", str(out))
    run_ok(args, cwd=tmp_path)
    val = {r["step"]: r["val/loss"] for r in read_metrics(out) if "val/loss" in r}
    assert set(range(2, 7, 2)) <= set(val), "every save step was evaluated"
    best = min(range(2, 7, 2), key=lambda s: val[s])
    kept = {step for step, _ in checkpoint.step_folders(str(out / "checkpoints"))}
    assert best != 6, f"the test needs a run whose best checkpoint is not the newest: {val}"
    assert kept == {6, best}


def interrupted_and_straight(resume_data, tmp_path, *flags: str, env: dict | None = None) -> tuple[Path, Path]:
    """Run A with `flags` twice on 2 ranks: straight through, and stopped by SIGTERM at step 12 then relaunched."""
    straight = tmp_path / "straight"
    run_ok(args_for(resume_data, straight, *flags), cwd=tmp_path, nproc=2, launcher="torchrun", env=env)
    out = tmp_path / "run"
    process = start(args_for(resume_data, out, *flags), tmp_path, env)
    wait_for_step(out, 12, process)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert "lmdist: stopped" in stderr, stderr[-3000:]
    run_ok(args_for(resume_data, out, *flags), cwd=tmp_path, nproc=2, launcher="torchrun", env=env)
    return out, straight


def test_exact_resume_under_fsdp_on_cpu(resume_data, tmp_path):
    """The interrupted-and-relaunched FSDP run is the uninterrupted FSDP run, bitwise (dropout 0.1)."""
    out, straight = interrupted_and_straight(resume_data, tmp_path, env=FSDP)
    assert read_run(straight)["distributed_type"] == "FSDP"
    assert assert_same_as_reference(out, straight) > 0


def test_exact_resume_with_muon_and_wsd(resume_data, tmp_path):
    """Muon's momentum and AdamW's moments both come back: the relaunched run is the straight one, bitwise."""
    out, straight = interrupted_and_straight(resume_data, tmp_path, "--optimizer", "muon", "--lr_schedule", "wsd")
    assert assert_same_as_reference(out, straight) > 0
    saved = torch.load(Path(checkpoint.step_dir(str(out), 40)) / "optimizer.pt", weights_only=True)
    assert {"momentum_buffer", "exp_avg", "exp_avg_sq"} <= {name for state in saved["state"].values() for name in state}
    last = [r["muon_lr"] for r in read_metrics(out) if r.get("step") == 40]
    assert last == pytest.approx([0.002])  # wsd's end: min_lr is lr / 10, and muon_lr follows


def test_muon_under_fsdp_is_refused_on_every_rank_before_training(resume_data, tmp_path):
    out = tmp_path / "run"
    result = launch(args_for(resume_data, out, "--optimizer", "muon"), cwd=tmp_path, nproc=2, launcher="torchrun",
                    env=FSDP, timeout=240)
    assert result.returncode != 0
    for rank in (0, 1):
        assert (f"lmdist: error: [rank {rank}] --optimizer muon needs whole weight matrices on every rank, and FSDP "
                "shards them: train Muon with DDP") in result.stderr, result.stderr[-3000:]
    assert not (out / "checkpoints").exists() and "step 1/" not in result.stdout

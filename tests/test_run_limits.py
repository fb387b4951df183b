"""Run limits: how long a run is, and what a relaunch may do with a run that is done or moved.

Reference run R: one process, global batch 8 on the short Markov file (8 steps per epoch), `max_steps` 20
with the default `epochs` 1 -- two and a half epochs -- a warm-up longer than the run and a checkpoint
every 5 steps. Its output_dir has
a space in its name, so every command printed for the user has to be shell-quoted to work.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lmdist import checkpoint
from lmdist.checkpoint import CheckpointError
from lmdist.config import TrainConfig
from lmdist.errors import ConfigError
from lmdist.resume import Progress, Resume, adapt_to_world_size, check_compatible, check_within, relaunch_command
from lmdist.schedule import Plan
from tests import faults
from tests.conftest import (
    TINY_GPT,
    equivalence_args,
    final_weights,
    launch,
    launch_env,
    read_metrics,
    read_run,
    run_ok,
    with_flags,
)

pytestmark = pytest.mark.launch

STEPS_PER_EPOCH, MAX_STEPS = 8, 20


def limits_args(markov_files, output_dir, *overrides) -> list[str]:
    return with_flags([*TINY_GPT, "--dataset", str(markov_files["short"]), "--val_dataset",
                       str(markov_files["short_val"]), "--batch_size", "8", "--max_steps", str(MAX_STEPS),
                       "--save_every", "5", "--keep_last", "2", "--eval_every", "10", "--warmup_steps", "30",
                       "--lr_schedule", "constant",
                       "--output_dir", str(output_dir)], *overrides)


@pytest.fixture(scope="module")
def reference(markov_files, tmp_path_factory) -> tuple[Path, str]:
    """R, finished; returns its output_dir and its stdout."""
    out = tmp_path_factory.mktemp("limits") / "ref run"
    result = run_ok(limits_args(markov_files, out), cwd=out.parent)
    return out, result.stdout


def checkpoint_files(output_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every checkpoint file by path: its modification time and contents."""
    return {str(f.relative_to(output_dir)): (f.stat().st_mtime_ns, f.read_bytes())
            for f in sorted((output_dir / "checkpoints").rglob("*")) if f.is_file()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- item 8: max_steps and epochs

def test_max_steps_overrides_epochs(reference):
    out, stdout = reference
    assert read_run(out)["steps_per_epoch"] == STEPS_PER_EPOCH
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1)), "max_steps steps, not epochs' 8"
    assert rows[-1]["epoch"] == MAX_STEPS / STEPS_PER_EPOCH
    assert read_run(out)["total_steps"] == MAX_STEPS and read_run(out)["status"] == "completed"
    assert f"{STEPS_PER_EPOCH} steps/epoch, {MAX_STEPS} total steps over 3 epochs" in stdout
    assert f"warning: warmup_steps 30 is longer than the run ({MAX_STEPS} steps)" in stdout
    # the lr rose linearly all run long: never decayed, never reached lr
    lrs = [r["lr"] for r in rows]
    assert lrs == sorted(lrs) and lrs[-1] == pytest.approx(3e-3 * MAX_STEPS / 30)


def test_each_epoch_of_a_max_steps_run_is_the_epochs_run_s(markov_files, reference, tmp_path):
    """Steps 1-20 of R are steps 1-20 of the same training given as 3 epochs: each epoch its own seeded
    shuffle, the last one cut short. (R's warm-up-then-constant lr does not depend on the run's length.)"""
    epochs = tmp_path / "epochs"
    run_ok(limits_args(markov_files, epochs, "--max_steps", "none", "--epochs", "3"), cwd=tmp_path)
    assert read_run(epochs)["total_steps"] == 3 * STEPS_PER_EPOCH
    want = {r["step"]: r["train/loss"] for r in read_metrics(epochs) if r["step"] <= MAX_STEPS}
    assert {r["step"]: r["train/loss"] for r in read_metrics(reference[0])} == want


def test_plan_length():
    plan = Plan.make(TrainConfig(batch_size=4, max_steps=10), 50, world_size=2)  # 6 steps per epoch
    assert (plan.steps_per_epoch, plan.total_steps, plan.epochs) == (6, 10, 2)
    assert Plan.make(TrainConfig(batch_size=4, max_steps=4, epochs=3), 50, 2).epochs == 1, "max_steps overrides"
    assert Plan.make(TrainConfig(batch_size=4, epochs=3), 50, 2).total_steps == 18
    assert Plan.make(TrainConfig(batch_size=4, max_steps=12), 50, 2).epochs == 2
    fits, too_long = TrainConfig(max_steps=30, warmup_steps=30), TrainConfig(max_steps=29, warmup_steps=30)
    assert Plan.make(fits, 500, 1).warnings(fits) == []
    [warning] = Plan.make(too_long, 500, 1).warnings(too_long)
    assert "warmup_steps 30 is longer than the run (29 steps)" in warning


# ----------------------------------------------------------------------------- item 9: never past the end

def assert_completed_like(out: Path, reference: Path, saved_before: dict) -> None:
    """out completed at R's last step with R's final weights; its checkpoints untouched by the relaunch."""
    run = read_run(out)
    assert (run["status"], run["step"]) == ("completed", MAX_STEPS)
    assert run["final"]["val/loss"] == read_run(reference)["final"]["val/loss"]
    assert max(r["step"] for r in read_metrics(out)) == MAX_STEPS, "not one step past the end"
    assert checkpoint_files(out) == saved_before, "the last checkpoint was neither re-saved nor deleted"
    checkpoint.verify(checkpoint.step_dir(str(out), MAX_STEPS))
    assert_same_weights(final_weights(out), final_weights(reference))


def test_stopped_during_the_last_step_relaunch_only_completes(markov_files, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "run"
    args = limits_args(markov_files, out)
    # SIGTERM during the last step, just before its stop check: the step is completed and saved, exit 75
    stopped = launch(args, cwd=tmp_path, script=faults.SCRIPT,
                     env=faults.inject(faults.sigterm_before_stop_check, check=MAX_STEPS))
    assert stopped.returncode == 75 and f"SIGTERM at step {MAX_STEPS}" in stopped.stderr, stopped.stderr[-3000:]
    assert read_run(out)["status"] == "stopped" and not (out / "final").exists()
    saved = checkpoint_files(out)
    assert {Path(p).parent.name for p in saved} == {"step_00000015", "step_00000020"}
    relaunched = run_ok(args, cwd=tmp_path)
    assert_completed_like(out, ref, saved)
    assert f"the checkpoint is the run's last step ({MAX_STEPS}): nothing left to train" in relaunched.stdout
    again = run_ok(args, cwd=tmp_path)
    assert "has already finished; nothing to do" in again.stdout


def test_finished_run_without_run_json_and_with_a_torn_config_yaml(markov_files, reference, tmp_path):
    """A finished run whose config.yaml is not YAML any more is refused (exit 2, the file and the fix named);
    following the fix -- deleting run.json -- completes the run again without training past its end."""
    ref, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    args = limits_args(markov_files, out)
    saved = checkpoint_files(out)
    for torn in ("lr: [0.003\n", "- a list\n"):
        (out / "config.yaml").write_text(torn)
        refused = launch(args, cwd=tmp_path)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        [message] = refused.stderr.splitlines()
        assert f"{out / 'config.yaml'}" in message and f"delete {out / 'run.json'} and relaunch" in message
    (out / "run.json").unlink()
    relaunched = run_ok(args, cwd=tmp_path)
    assert_completed_like(out, ref, saved)
    assert "nothing left to train" in relaunched.stdout
    rewritten, original = (yaml.safe_load((d / "config.yaml").read_text()) for d in (out, ref))
    assert rewritten == {**original, "output_dir": str(out)}


def test_a_checkpoint_past_the_end_is_refused():
    resume = Resume("ckpt", Progress(step=21), "id", {}, "fp", 1)
    check_within(replace_step(resume, 20), 20)
    with pytest.raises(CheckpointError, match="at step 21, past this run's 20 total steps"):
        check_within(resume, 20)


def replace_step(resume: Resume, step: int) -> Resume:
    return Resume(resume.path, Progress(step=step), resume.run_id, resume.config, resume.data_fingerprint,
                  resume.world_size)


# ----------------------------------------------------------------------------- item 10: a longer run

def advised_command(stderr: str) -> str:
    # each rank says it, in one write; rank zero's line (or the only one)
    message = next(line for line in stderr.splitlines() if line.startswith("lmdist: error:") and "[rank 1]" not in line)
    assert "differs from the finished run" in message and "max_steps (finished run 20, now 26)" in message
    return message.split(" with: ", 1)[1]


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_a_finished_run_made_longer_gets_a_command_that_works(markov_files, reference, tmp_path, launcher):
    ref, _ = reference
    nproc = 2 if launcher == "torchrun" else 1
    refused = launch(limits_args(markov_files, ref, "--max_steps", "26"), cwd=tmp_path, nproc=nproc,
                     launcher=launcher, prewarmed=False)  # its ranks read their launcher's command line
    assert refused.returncode == (2 if nproc == 1 else 1), refused.stderr[-3000:]  # torchrun squashes it to 1
    command = advised_command(refused.stderr)
    words = shlex.split(command)
    new_dir = Path(f"{ref}-continued")
    assert words[-4:] == ["--init_from", str(ref / "final"), "--output_dir", str(new_dir)]
    if launcher == "torchrun":
        assert "torch.distributed.run" in command and words[words.index("--nproc_per_node") + 1] == "2"
    result = subprocess.run(command, shell=True, cwd=tmp_path, env=launch_env(), capture_output=True, text=True,
                            timeout=300)
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        source = read_run(ref)
        assert (f"init_from: loaded {len(final_weights(ref))} tensors ({source['parameters']:,} parameters) from "
                f"{ref / 'final' / 'model.safetensors'} (final weights of run {source['run_id']}, "
                f"completed at step {MAX_STEPS})") in result.stdout
        run = read_run(new_dir)
        assert (run["status"], run["step"], run["world_size"]) == ("completed", 26, nproc)
        # trained on from R's final weights, not from a fresh model's
        assert read_metrics(new_dir)[0]["train/loss"] < read_metrics(ref)[0]["train/loss"]
    finally:
        shutil.rmtree(new_dir, ignore_errors=True)


def test_relaunch_command_replaces_the_flags_it_sets(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--output_dir=a b", "--lr", "1e-3", "--init_from", "x"])
    for variable in ("TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND"):
        monkeypatch.delenv(variable, raising=False)
    command = relaunch_command(init_from="a b/final", output_dir="a b-continued")
    assert shlex.split(command) == [sys.executable, "train.py", "--lr", "1e-3", "--init_from", "a b/final",
                                    "--output_dir", "a b-continued"]


# ----------------------------------------------------------------------------- item 11: other world sizes

def saved_at(world_size: int, batch_size: int, grad_accum: int) -> Resume:
    config = {**TrainConfig(batch_size=batch_size, grad_accum=grad_accum).to_dict()}
    return Resume("ckpt", Progress(step=10, epoch=1, micro_batches_in_epoch=2 * grad_accum), "id", config, "fp",
                  world_size)


def advised_batch_sizes(error: ConfigError) -> list[int]:
    listed = str(error).split("that divides ", 1)[1].split("(", 1)[1].split(";", 1)[0]
    return [int(b) for b in listed.split(", ")]


@pytest.mark.parametrize("saved, world_size, expected", [((1, 8, 1), 2, [1, 2, 4]), ((2, 8, 1), 1, None),
                                                          ((2, 2, 3), 4, [1, 3]), ((4, 3, 1), 8, None)])
def test_every_batch_size_the_advice_offers_is_accepted(saved, world_size, expected):
    """The refusal lists batch sizes; each one keeps the global batch, is accepted, and keeps the position."""
    resume, said = saved_at(*saved), []
    global_batch = resume.global_batch
    try:
        adapt_to_world_size(resume, TrainConfig(batch_size=saved[1]), world_size, said.append)
        offered = [saved[1], global_batch // world_size]  # nothing refused (2 -> 1): grad_accum 2, or batch 16
    except ConfigError as error:
        if expected is None:  # 12 sequences cannot be split over 8 processes: no batch_size helps
            assert "relaunch on a number of processes that divides 12" in str(error)
            return
        offered = advised_batch_sizes(error)
        assert offered == expected
    for batch_size in offered:
        moved, cfg = adapt_to_world_size(resume, TrainConfig(batch_size=batch_size), world_size,
                                                    said.append)
        check_compatible(moved, cfg)
        assert world_size * cfg.batch_size * cfg.grad_accum == global_batch
        consumed = resume.progress.micro_batches_in_epoch * saved[0] * saved[1]
        assert moved.progress.micro_batches_in_epoch * world_size * batch_size == consumed, "the same sequences"


def test_a_changed_batch_size_that_changes_the_global_batch_is_refused():
    resume = saved_at(1, 8, 1)
    moved, cfg = adapt_to_world_size(resume, TrainConfig(batch_size=8, grad_accum=2), 1, print)
    with pytest.raises(ConfigError, match=r"grad_accum \(checkpoint 1, now 2\)"):
        check_compatible(moved, cfg)


@pytest.mark.parametrize("before, after", [(("python", 1, "8"), ("torchrun", 2, "4")),
                                           (("torchrun", 2, "8"), ("python", 1, "16"))],
                         ids=["1-to-2-ranks-batch-4", "2-ranks-to-1-batch-16"])
def test_resume_on_another_world_size_with_the_advised_batch_size(markov_files, tmp_path, before, after):
    """grad_accum 1 throughout: the relaunch takes the batch_size the refusal advised, continues at the same
    sequence and ends where the uninterrupted run did (the equivalence tolerance)."""
    (launcher, nproc, batch), (new_launcher, new_nproc, new_batch) = before, after
    args = with_flags(equivalence_args(markov_files), "--grad_accum", "1", "--save_every", "2", "--keep_last", "9")
    source = tmp_path / "source"
    run_ok(with_flags(args, "--batch_size", batch, "--output_dir", str(source)), cwd=tmp_path, nproc=nproc,
           launcher=launcher)
    resume_step = read_run(source)["total_steps"] // 2 + 2  # a saved step in the middle of epoch 1
    moved = tmp_path / "moved"
    shutil.copytree(Path(checkpoint.step_dir(str(source), resume_step)),
                    Path(checkpoint.step_dir(str(moved), resume_step)))
    shutil.copytree(source / "tokenizer", moved / "tokenizer")
    result = run_ok(with_flags(args, "--batch_size", new_batch, "--output_dir", str(moved)), cwd=tmp_path,
                    nproc=new_nproc, launcher=new_launcher)
    global_batch = nproc * int(batch)
    assert f"grad_accum 1 -> 1 keeps the global batch of {global_batch} sequences" in result.stdout
    want = {r["step"]: r["train/loss"] for r in read_metrics(source) if "train/loss" in r}
    got = {r["step"]: r["train/loss"] for r in read_metrics(moved) if "train/loss" in r}
    assert sorted(got) == list(range(resume_step + 1, read_run(source)["total_steps"] + 1))
    assert all(abs(got[s] - want[s]) <= 1e-5 * want[s] for s in got)
    a, b = final_weights(moved), final_weights(source)
    assert all((a[k] - b[k]).norm() <= 1e-5 * b[k].norm() for k in a)


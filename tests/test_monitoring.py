"""Monitoring: a run's W&B dashboard (metric definitions, summary, samples Table, config, grouping, tags, the
model artifact), samples.jsonl, and the console a person reads, in a log file and on an 80-column terminal."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import faults, wandb_file
from tests.conftest import (
    REPO,
    TINY_GPT,
    launch,
    launch_env,
    read_metrics,
    read_run,
    run_ok,
    run_on_terminal,
    with_flags,
)

pytestmark = pytest.mark.launch

STEPS, STOP_AT = 6, 4
PROMPTS = ["ab", ""]  # the empty prompt starts from end-of-text


def dashboard_args(markov_files) -> list[str]:
    """6 steps with evaluations at 3 and 6, samples every 2 steps, dropout on (it draws from torch's RNG, which
    sampling must leave alone), W&B offline with tags and the model artifact."""
    return with_flags([*TINY_GPT, "--dataset", str(markov_files["short"]), "--val_dataset",
                       str(markov_files["short_val"]), "--batch_size", "4", "--max_steps", str(STEPS),
                       "--eval_every", "3", "--warmup_steps", "2", "--sample_prompts", "|".join(PROMPTS),
                       "--sample_tokens", "8", "--sample_every", "2", "--wandb_mode", "offline",
                       "--wandb_tags", "baseline,tiny", "--wandb_artifact", "true"], "--dropout", "0.1")


@pytest.fixture(scope="module")
def dashboard(markov_files, tmp_path_factory) -> dict:
    """The same run whole, stopped by SIGTERM after step 4 and relaunched, and whole without samples."""
    root = tmp_path_factory.mktemp("dashboard")
    # W&B as a user gets it (the suite's launches silence it otherwise); artifacts staged inside the test's folder
    env = {"WANDB_SILENT": None, "WANDB_DATA_DIR": str(root / "wandb-data"), "WANDB_CACHE_DIR": str(root / "cache")}
    args = dashboard_args(markov_files)
    logs = {"whole": run_ok([*args, "--output_dir", str(root / "whole")], cwd=root, env=env)}
    logs["stopped"] = launch([*args, "--output_dir", str(root / "stopped")], cwd=root, script=faults.SCRIPT,
                             env={**env, **faults.inject(faults.sigterm_before_stop_check, check=STOP_AT)})
    assert logs["stopped"].returncode == 75, logs["stopped"].stderr[-3000:]
    logs["resumed"] = run_ok([*args, "--output_dir", str(root / "stopped")], cwd=root, env=env)
    run_ok([*with_flags(args, "--sample_tokens", "0"), "--output_dir", str(root / "unsampled")], cwd=root, env=env)
    return {"root": root, "logs": logs}


def wandb_pieces(output_dir: Path) -> list[str]:
    """The .wandb file of each launch of a run, in launch order."""
    return [wandb_file.run_file(run) for run in wandb_file.find_offline_runs(output_dir / "wandb")]


def read_samples(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]


def test_wandb_plots_every_metric_against_step_and_keeps_the_best_validation(dashboard):
    path, = wandb_pieces(dashboard["root"] / "whole")
    metrics = {m.name or m.glob_name: m for m in wandb_file.records_of(path, "metric")}
    assert metrics["step"].options.hidden and metrics["micro_step"].options.hidden  # x-axes, not charts
    assert metrics["*"].step_metric == "step"  # train/*, val/*, lr, tokens_seen (the other x-axis), ...
    for key, best in (("val/loss", "min"), ("val/ppl", "min"), ("val/acc", "max")):
        assert metrics[key].step_metric == "step" and getattr(metrics[key].summary, best), key
        assert metrics[key].summary.last, f"{key}: the last value stays in the summary beside the best"
    rows = [r for r in read_metrics(dashboard["root"] / "whole") if "val/loss" in r]
    best = min(rows, key=lambda r: r["val/loss"])
    summary = wandb_file.summary(path)
    assert summary["best/val_loss"] == best["val/loss"] and summary["best/val_loss_step"] == best["step"]
    assert [h["_step"] for h in wandb_file.history(path)] == list(range(1, STEPS + 1))
    assert "tokens_seen" in wandb_file.history(path)[0]


def test_samples_go_to_samples_jsonl_and_a_wandb_table_and_never_change_training(dashboard):
    root = dashboard["root"]
    rows = read_samples(root / "whole")
    assert [(r["step"], r["prompt"]) for r in rows] == [(step, p) for step in (2, 4, 6) for p in PROMPTS]
    assert all(isinstance(r["text"], str) and r["text"] for r in rows)
    assert any(a["text"] != b["text"] for a, b in zip(rows[:2], rows[-2:], strict=True)), "its text changes"
    # stopped after step 4 and resumed: the same text at the same steps (its own generator, reseeded per prompt)
    assert read_samples(root / "stopped") == rows
    # sampling draws nothing from the training's RNG: with dropout on, the run without samples trains the same
    strip = ("tokens_per_sec", "mfu", "data_wait", "peak_rss_mb")
    metrics = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(root / "whole")]
    assert metrics == [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(root / "unsampled")]
    assert not (root / "unsampled" / "samples.jsonl").exists()
    assert all("samples" not in r for r in read_metrics(root / "whole"))
    # W&B: the resumed launch's Table holds every sample of the run, the first launch's too
    _, second = wandb_pieces(root / "stopped")
    last = [h for h in wandb_file.history(second) if "samples/path" in h][-1]
    assert last["_step"] == STEPS
    table = json.loads((Path(second).parent / "files" / last["samples/path"]).read_text())
    assert table["columns"] == ["step", "prompt", "text"]
    assert table["data"] == [[r["step"], r["prompt"], r["text"]] for r in rows]


def test_wandb_config_group_and_tags_describe_every_piece_of_a_resumed_run(dashboard):
    output_dir = dashboard["root"] / "stopped"
    run = read_run(output_dir)
    pieces = wandb_pieces(output_dir)
    assert len(pieces) == 2, "one offline folder per launch"
    for number, path in enumerate(pieces):
        record, = wandb_file.records_of(path, "run")
        assert record.run_id == run["run_id"] and record.run_group == run["run_id"]
        assert list(record.tags) == ["baseline", "tiny"] and record.job_type == "train"
        config = wandb_file.config(path)
        assert config["max_steps"] == STEPS and config["sample_tokens"] == 8 and config["wandb_artifact"] is True
        assert config["run"]["resumed_from"] == (None, STOP_AT)[number]
        assert config["run"]["total_steps"] == STEPS and config["run"]["data_fingerprint"] == run["data_fingerprint"]
        assert config["run"]["git_commit"] == run["git_commit"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # the code's commit, marked when the checkout has changes
        assert run["git_commit"].removesuffix("-dirty") == head.stdout.strip()
    else:
        assert run["git_commit"] is None


def test_the_final_model_is_a_wandb_artifact(dashboard):
    output_dir = dashboard["root"] / "stopped"
    run = read_run(output_dir)
    first, second = wandb_pieces(output_dir)
    assert not [a for a in wandb_file.records_of(first, "artifact") if a.type == "model"], "only at the end"
    artifact, = [a for a in wandb_file.records_of(second, "artifact") if a.type == "model"]
    assert artifact.name == f"model-{run['run_id']}" and {"latest", f"step-{STEPS}"} <= set(artifact.aliases)
    final = output_dir / "final"
    assert sorted(c.path for c in artifact.manifest.contents) == sorted(
        str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    assert f"W&B: final/ is the model artifact model-{run['run_id']}" in dashboard["logs"]["resumed"].stdout


def test_a_log_file_reads_as_lines_a_person_reads(dashboard):
    result = dashboard["logs"]["whole"]
    output_dir = dashboard["root"] / "whole"
    lines = result.stdout.splitlines()
    rows = {r["step"]: r for r in read_metrics(output_dir)}
    logged = [line for line in lines if line.startswith("step ")]
    assert len(logged) == STEPS and "\r" not in result.stdout
    three = rows[3]
    assert logged[2] == (
        f"step 3/{STEPS} | epoch {three['epoch']:.3g} | loss {three['train/loss']:.4g} | "
        f"val loss {three['val/loss']:.4g} ppl {three['val/ppl']:.4g} acc {three['val/acc']:.1%} | "
        f"lr {three['lr']:.2e} | {three['tokens_per_sec']:,.0f} tok/s | MFU {three['mfu']:.1%} | ETA ") + \
        logged[2].rsplit("ETA ", 1)[1]
    assert re.fullmatch(r"\d+s|\d+m\d\ds", logged[2].rsplit("ETA ", 1)[1])
    assert "ETA" not in logged[-1], "nothing left at the last step"
    for hidden in ("grad_norm", "data_wait", "peak_rss_mb", "tokens_seen", "micro_step", "train/"):
        assert hidden not in result.stdout, f"{hidden} stays in metrics.jsonl and the trackers"
    # W&B in lmdist's lines only: where the run is, and one command to upload it
    run_id = read_run(output_dir)["run_id"]
    assert "wandb:" not in result.stdout + result.stderr
    assert lines[0] == f"W&B: offline run {run_id} in project lmdist: {wandb_file.find_offline_runs(output_dir)[0]}"
    assert any(line.startswith(f"W&B logged offline under {output_dir / 'wandb'}") and
               f"wandb sync --id {run_id} " in line for line in lines)
    last = rows[STEPS]
    final = (f" | loss {last['train/loss']:.4g} | val loss {last['val/loss']:.4g} ppl {last['val/ppl']:.4g} "
             f"acc {last['val/acc']:.1%}")
    assert re.fullmatch(re.escape(f"done: step {STEPS} in ") + r"(\d+m)?\d+s" + re.escape(final), lines[-1]), lines[-1]


def test_the_progress_bar_keeps_its_width_on_80_columns(markov_files, tmp_path):
    cmd = [sys.executable, str(REPO / "train.py"), *TINY_GPT, "--dataset", str(markov_files["short"]),
           "--batch_size", "4", "--max_steps", "3", "--eval_every", "3", "--wandb_mode", "disabled",
           "--output_dir", str(tmp_path / "o")]
    text = run_on_terminal(cmd, tmp_path, columns=80)
    frames = [frame for frame in re.split(r"[\r\n]", text) if "| 3/3 [" in frame]
    assert frames, text[-2000:]
    bar = frames[-1].strip()
    assert len(bar) <= 80, bar
    assert re.search(r"\|(.{20,})\| 3/3 \[", bar), f"a bar of 20 characters or more: {bar!r}"
    assert re.search(r"loss [0-9.]+\]$", bar), "the training loss in the postfix"
    assert any(line.startswith("step 3/3 | ") and "val loss" in line for line in text.splitlines())


def test_accelerate_config_default_silences_accelerates_defaults_block(markov_files, tmp_path):
    """A bare `accelerate launch train.py` lists the values it defaulted; after `accelerate config default` (and,
    without GPUs, OMP_NUM_THREADS: lmdist sets its own threads either way) it does not, and trains the same."""
    args = [*TINY_GPT, "--dataset", str(markov_files["short"]), "--batch_size", "4", "--max_steps", "2",
            "--wandb_mode", "disabled"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", str(REPO / "train.py")]
    bare = subprocess.run([*launcher, *args, "--output_dir", str(tmp_path / "bare")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180, env=launch_env_for(tmp_path / "hf-bare"))
    assert bare.returncode == 0 and "were not passed to `accelerate launch`" in bare.stderr, bare.stderr[-2000:]
    home = tmp_path / "hf-home"
    env = {**launch_env_for(home), "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "config", "default"], env=env,
                   check=True, capture_output=True, timeout=60)
    quiet = subprocess.run([*launcher, *args, "--output_dir", str(tmp_path / "quiet")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=180, env=env)
    assert quiet.returncode == 0 and "were not passed" not in quiet.stderr, quiet.stderr[-2000:]
    assert "To avoid this warning" not in quiet.stderr + quiet.stdout
    losses = [[r["train/loss"] for r in read_metrics(tmp_path / name)] for name in ("bare", "quiet")]
    assert losses[0] == losses[1]
    assert read_run(tmp_path / "bare")["threads"] == read_run(tmp_path / "quiet")["threads"]


def launch_env_for(hf_home: Path) -> dict:
    """The suite's launch environment with its own HF_HOME, where accelerate keeps its default config."""
    return launch_env({"HF_HOME": str(hf_home), "OMP_NUM_THREADS": None})

"""report_to's other trackers against the real things: TensorBoard event files read back with tensorboard's own
reader, and a real `mlflow server` on 127.0.0.1 read back with MlflowClient. Each holds what metrics.jsonl holds,
step for step, and a resumed run continues the same tracker run; a dead server never stops training; unknown
names and missing packages are refused before training."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lmdist.config import parse_args
from lmdist.errors import ConfigError
from lmdist.trackers import check_available
from tests import faults
from tests.conftest import TINY_GPT, free_port, launch, read_metrics, read_run, run_ok


def tiny_args(markov_files, out, steps: int, *extra: str) -> list[str]:
    return [*TINY_GPT, "--dataset", str(markov_files["short"]), "--batch_size", "4", "--max_steps", str(steps),
            "--warmup_steps", "2", "--output_dir", str(out), *extra]


def assert_same_series(series: dict[str, list[tuple[int, float]]], rows: list[dict], rel_tol: float) -> None:
    """Every key of every row of metrics.jsonl (but resume markers) is a series with exactly the rows' steps, once
    each, and their values."""
    rows = [row for row in rows if "resumed_from" not in row]
    for key in {key for row in rows for key in row}:
        expected = [(row["step"], row[key]) for row in rows if key in row]
        assert [step for step, _ in series[key]] == [step for step, _ in expected], key
        for (step, value), (_, logged) in zip(expected, series[key], strict=True):
            assert math.isclose(logged, value, rel_tol=rel_tol), f"{key} at step {step}: {logged} != {value}"


# ----------------------------------------------------------------------------- TensorBoard

def tensorboard_series(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: every point, not a sample
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.launch
def test_tensorboard_holds_metrics_jsonl_and_a_crashed_run_resumed_reads_as_one(markov_files, tmp_path):
    """The first launch dies at once (no checkpoint, no goodbye) in step 6, after logging steps 4 and 5 past its
    checkpoint of step 3; the relaunch logs steps 4-6 again. The reader must see each step once, the new values."""
    out = tmp_path / "run"
    args = tiny_args(markov_files, out, 6, "--save_every", "3", "--report_to", "tensorboard")
    crash = faults.inject(faults.crash_rank_once, rank=0, micro_step=6, marker=str(tmp_path / "crashed"))
    assert launch(args, cwd=tmp_path, script=faults.SCRIPT, env=crash).returncode == 1
    assert [step for step, _ in tensorboard_series(out / "tensorboard")["train/loss"]] == [1, 2, 3, 4, 5]
    run_ok(args, cwd=tmp_path, script=faults.SCRIPT, env=crash)
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3, 3, 4, 5, 6]
    assert_same_series(tensorboard_series(out / "tensorboard"), rows, rel_tol=1e-6)  # stored as float32


# ----------------------------------------------------------------------------- MLflow

@contextlib.contextmanager
def mlflow_server(folder: Path):
    """A real MLflow tracking server on 127.0.0.1 with a SQLite store in `folder`: its URL and process, once it
    answers."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                   "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--default-artifact-root",
                                   str(folder / "artifacts"), "--workers", "1"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner
        try:
            deadline = time.time() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                assert server.poll() is None and time.time() < deadline, (folder / "server.log").read_text()[-3000:]
                time.sleep(0.5)
            yield url, server
        finally:
            with contextlib.suppress(ProcessLookupError):  # a test may have killed it
                os.killpg(server.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
            server.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    """One server for the module's tests that keep it running."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as (url, _):
        yield url


def mlflow_series(client, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in keys}


@pytest.mark.launch
def test_mlflow_gets_metrics_params_and_a_stopped_run_continues_its_mlflow_run(mlflow_url, markov_files, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "mlrun"
    args = tiny_args(markov_files, out, 6, "--report_to", "mlflow", "--wandb_project", "trackers-test",
                     "--eval_every", "2")
    env = {"MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_EXPERIMENT_NAME": None, "MLFLOW_RUN_ID": None}
    stopped = launch(args, cwd=tmp_path, script=faults.SCRIPT,
                     env={**env, **faults.inject(faults.sigterm_before_stop_check, check=3)})
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    run_ok(args, cwd=tmp_path, env=env)
    rows, run_id = read_metrics(out), read_run(out)["run_id"]
    assert [row["step"] for row in rows] == [1, 2, 3, 3, 4, 5, 6]

    client = MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name("trackers-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "the relaunch logs into the MLflow run of the first launch"
    run = runs[0]
    assert run.data.tags["lmdist.run_id"] == run_id and run.info.run_name == "mlrun"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["model"], params["n_embd"], params["report_to"], params["run/world_size"]) == ("gpt", "32",
                                                                                                   "mlflow", "1")
    assert params["run/resumed_from"] == "None", "params are the first launch's: MLflow cannot change them"
    keys = {key for row in rows for key in row} - {"resumed_from"}
    assert_same_series(mlflow_series(client, run.info.run_id, keys), rows, rel_tol=1e-12)


@pytest.mark.launch
def test_an_unreachable_mlflow_server_does_not_stop_training(markov_files, tmp_path):
    """A port nobody listens on: one warning line, and the run ends in bounded time (mlflow's own client would
    retry for minutes)."""
    out = tmp_path / "run"
    began = time.time()
    result = run_ok(tiny_args(markov_files, out, 3, "--report_to", "mlflow"), cwd=tmp_path, timeout=240,
                    env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    took = time.time() - began
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: mlflow")]
    assert len(warnings) == 1 and "could not start" in warnings[0] and "training goes on without it" in warnings[0]
    assert read_run(out)["status"] == "completed" and [row["step"] for row in read_metrics(out)] == [1, 2, 3]
    assert took < 90, f"{took:.0f} s"


@pytest.mark.launch
def test_an_mlflow_server_gone_mid_run_does_not_stop_training(markov_files, tmp_path):
    """The server is killed before step 3's update: logging step 3 fails, one warning, and the run ends on time
    (mlflow's own client would retry for minutes at step 3 and again at exit)."""
    out = tmp_path / "run"
    with mlflow_server(tmp_path / "mlflow") as (url, server):
        began = time.time()
        result = run_ok(tiny_args(markov_files, out, 4, "--report_to", "mlflow"), cwd=tmp_path, script=faults.SCRIPT,
                        timeout=240, env={"MLFLOW_TRACKING_URI": url,
                                          **faults.inject(faults.kill_group_before_stop_check, pgid=server.pid,
                                                          check=3)})
        took = time.time() - began
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: mlflow")]
    assert len(warnings) == 1 and "could not log step 3" in warnings[0], result.stdout[-3000:]
    assert read_run(out)["status"] == "completed" and [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4]
    assert took < 90, f"{took:.0f} s"


# ----------------------------------------------------------------------------- config

@pytest.mark.launch
def test_an_unknown_tracker_is_exit_2_naming_the_known_ones(markov_files, tmp_path):
    result = launch(tiny_args(markov_files, tmp_path / "run", 3, "--report_to", "wandb,tensorbored"), cwd=tmp_path,
                    timeout=120)
    assert result.returncode == 2
    assert "--report_to 'wandb,tensorbored': unknown tracker tensorbored: the trackers are" in result.stderr
    assert all(name in result.stderr for name in ("mlflow", "tensorboard", "wandb", "comet_ml", "none"))


def test_a_tracker_whose_package_is_missing_is_refused_with_its_install_line(monkeypatch):
    """Before training; not when the config is read, as `lmdist eval` reads a run's on another machine."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # how Python marks a module as absent: imports fail
    cfg = parse_args(["--report_to", "mlflow,tensorboard"])
    with pytest.raises(ConfigError, match=r'tensorboard is not installed: pip install "lmdist\[tensorboard\]"'):
        check_available(cfg)


def test_report_to_names_and_their_contradictions():
    assert parse_args(["--report_to", "none"]).report_names == []
    assert parse_args(["--report_to", " tensorboard, wandb,tensorboard"]).report_names == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"none means metrics\.jsonl only"):
        parse_args(["--report_to", "none,wandb"])
    with pytest.raises(ConfigError, match="must name trackers"):
        parse_args(["--report_to", " , "])
    with pytest.raises(ConfigError, match="--wandb_mode 'offline': asks for W&B, which report_to leaves out"):
        parse_args(["--report_to", "tensorboard", "--wandb_mode", "offline"])
    assert parse_args(["--report_to", "tensorboard", "--wandb_mode", "disabled"]).report_names == ["tensorboard"]

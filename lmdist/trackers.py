"""The trackers of `report_to` besides W&B: TensorBoard, MLflow and any other of Accelerate's `log_with` names.

Each is Accelerate's own tracker class (accelerate.tracking.LOGGER_TYPE_TO_CLASS), started on rank zero by
RunLog beside metrics.jsonl and W&B and fed the same rows with the same keys at the same steps, and the
config plus the run facts, flattened (`run/world_size`), as its hyperparameters. Where each writes, and
what a resumed run (the same lmdist run id) does:

- `tensorboard`: event files in `<output_dir>/tensorboard` (each launch's hyperparameters in a subfolder of
  it, as Accelerate writes them). Every launch opens the writer with `purge_step` = its first step, so a
  reader discards the rows that an interrupted launch logged after the checkpoint it resumed from (and, on
  a fresh start, any left by an earlier run), as metrics.jsonl is cut back.
- `mlflow`: the server or store of MLFLOW_TRACKING_URI, else `sqlite:///<output_dir>/mlflow.db` (not
  mlflow's own default, a database in the working directory); the experiment is MLFLOW_EXPERIMENT_NAME,
  else `wandb_project`; the run is named as the W&B run and tagged `lmdist.run_id`. A resumed run finds its
  MLflow run by that tag and logs into it; as MLflow's params cannot change, it adds only params that are
  new. MLflow keeps every point it was sent: after a hard kill, steps between the checkpoint and the kill
  appear twice (a stop by signal saves a checkpoint at the step it stops on, so there are none).
- any other name: built as `accelerator.init_trackers(wandb_project)` builds it (logging directory
  `<output_dir>/<name>` for those that take one); it starts a tracker run of its own each launch.

A tracker never stops training: one that fails to start or to log (its server unreachable or gone, a
broken install) is warned about in one console line and dropped. MLflow's HTTP retries are bounded
(MLFLOW_HTTP_REQUEST_MAX_RETRIES, _TIMEOUT, unless set) and its server probed before the run starts, so
that a dead server costs seconds, not minutes. An empty report_to, `none` beside other names and a
contradicting wandb_mode are refused with the config (`check`); a name Accelerate does not know, or a tracker
whose package is not installed, before training (`check_available`).

RunLog drives these objects itself rather than through `accelerator.init_trackers`: it must choose the
kwargs per launch (purge_step, the MLflow run to continue), and Accelerator's trackers raise into training.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from lmdist import flags
from lmdist.errors import first_line

if TYPE_CHECKING:
    from lmdist.config import TrainConfig

EXTRAS = ("tensorboard", "mlflow")  # trackers with an lmdist extra (pyproject.toml); the rest install by name
RUN_ID_TAG = "lmdist.run_id"
MLFLOW_HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}  # mlflow's defaults retry for minutes
PROBE_TIMEOUT_S = 5


def known_names() -> list[str]:
    """Every report_to name: Accelerate's `log_with` trackers (wandb among them) and `none`."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return [*sorted(LOGGER_TYPE_TO_CLASS), "none"]


def install_line(name: str) -> str:
    return f'pip install "lmdist[{name}]"' if name in EXTRAS else f"pip install {name}"


def check(cfg: TrainConfig) -> None:
    """Refuse an empty report_to, `none` beside other names, and a wandb_mode asking for W&B that report_to
    leaves out (config.validate calls it)."""
    names = cfg.report_names
    flags.need(bool(names) or cfg.report_to.strip() == "none", cfg, "report_to",
               "must name trackers, comma-separated, or be none (metrics.jsonl only)")
    flags.need("none" not in names, cfg, "report_to", "none means metrics.jsonl only: give it alone, or drop it")
    flags.need(cfg.wandb_mode in ("auto", "disabled") or "wandb" in names, cfg, "wandb_mode",
               "asks for W&B, which report_to leaves out: add wandb to --report_to, or leave --wandb_mode out")


def check_available(cfg: TrainConfig) -> None:
    """Refuse report_to names this Accelerate does not know, and trackers whose package is not installed.

    Not in config.validate: `lmdist eval` and `generate` validate a run's saved config again, on machines that
    need not have its trackers."""
    names = cfg.report_names
    if set(names) - {"wandb"}:  # Accelerate's list costs an import (seconds): not for the default
        known = known_names()
        unknown = [name for name in names if name not in known]
        flags.need(not unknown, cfg, "report_to", f"unknown tracker {', '.join(unknown)}: the trackers are "
                   f"{', '.join(known)} (comma-separated; `all` is not one: name them)")
    for name in names:  # each tracker's package is importable by its own name
        flags.need(importlib.util.find_spec(name) is not None, cfg, "report_to",
                   f"{name} is not installed: {install_line(name)}")


def other_trackers(cfg: TrainConfig, run_id: str, resume_step: int | None,
                   warn: Callable[[str], None]) -> list[Tracker]:
    """report_to's trackers but W&B (tracking.wandb_tracker's), for RunLog; `warn` prints a console line."""
    kinds = {"tensorboard": TensorBoard, "mlflow": MLflow}
    return [kinds.get(name, Tracker)(name, cfg, run_id, resume_step, warn)
            for name in cfg.report_names if name != "wandb"]


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as `outer/inner` keys and lists as JSON: the scalars TensorBoard's hparams and MLflow's params
    take (W&B takes the nested config as it is)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


class Tracker:
    """One of Accelerate's trackers, started and fed by RunLog, that never stops training: the first exception it
    raises is one console warning, and the tracker is dropped. Subclasses choose how `open` builds it."""

    def __init__(self, name: str, cfg: TrainConfig, run_id: str, resume_step: int | None,
                 warn: Callable[[str], None]):
        self.name, self.cfg, self.run_id, self.resume_step, self.warn = name, cfg, run_id, resume_step, warn
        self.tracker = None  # Accelerate's, once started; None again once dropped

    def open(self):
        """Accelerate's tracker for this launch, built, not started (as accelerator.init_trackers builds it)."""
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        kind = LOGGER_TYPE_TO_CLASS[self.name]
        folder = (os.path.join(self.cfg.output_dir, self.name),) if kind.requires_logging_directory else ()
        return kind(self.cfg.wandb_project, *folder)

    def params(self, values: dict) -> dict:
        """The hyperparameters to store: the flattened config."""
        return flatten(values)

    def start(self) -> None:
        try:
            tracker = self.open()
            tracker.start()
            self.tracker = tracker
        except Exception as error:  # noqa: BLE001 -- no server, a broken install: training goes on without it
            self._drop("could not start", error)

    def store_init_configuration(self, values: dict) -> None:
        self._call("could not store the config", lambda tracker: tracker.store_init_configuration(self.params(values)))

    def log(self, values: dict, step: int | None = None) -> None:
        self._call(f"could not log step {step}", lambda tracker: tracker.log(values, step=step))

    def finish(self) -> None:
        self._call("could not finish", lambda tracker: tracker.finish())
        self.tracker = None

    def _call(self, failed: str, action: Callable[[Any], None]) -> None:
        if self.tracker is None:
            return
        try:
            action(self.tracker)
        except Exception as error:  # noqa: BLE001 -- a server gone mid-run must not stop training
            self._drop(failed, error)

    def _drop(self, failed: str, error: Exception) -> None:
        self.tracker = None
        self.warn(f"warning: {self.name} {failed} ({type(error).__name__}: {first_line(error)}); "
                  "training goes on without it")


class TensorBoard(Tracker):
    def open(self):
        from accelerate.tracking import TensorBoardTracker

        # readers discard what an earlier launch logged from this launch's first step on
        return TensorBoardTracker("tensorboard", self.cfg.output_dir, purge_step=(self.resume_step or 0) + 1)


class MLflow(Tracker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logged_params: set[str] = set()  # a continued MLflow run's, which cannot change

    def open(self):
        for variable, value in MLFLOW_HTTP_BOUNDS.items():
            os.environ.setdefault(variable, value)  # read by mlflow at each request, so before the first
        import mlflow
        from accelerate.tracking import MLflowTracker

        from lmdist.tracking import _run_name  # imported here: lmdist.tracking imports torch, config imports this

        local = not os.environ.get("MLFLOW_TRACKING_URI")
        if local:
            mlflow.set_tracking_uri("sqlite:///" + os.path.abspath(os.path.join(self.cfg.output_dir, "mlflow.db")))
        probe(mlflow.get_tracking_uri())
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", self.cfg.wandb_project)  # Accelerate's priority
        run = self._run_of_this_id(experiment)
        if run is not None:
            self.logged_params = set(run.data.params)
        return MLflowTracker(experiment_name=experiment, run_id=run.info.run_id if run else None,
                             logging_dir=os.path.join(os.path.abspath(self.cfg.output_dir), "mlartifacts")
                             if local else None,  # a server's artifact root is the server's
                             tags={RUN_ID_TAG: self.run_id},
                             run_name=self.cfg.run_name or _run_name(self.cfg))

    def _run_of_this_id(self, experiment: str):
        """The MLflow run an earlier launch of this lmdist run started, or None."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = client.search_runs([found.experiment_id], f"tags.`{RUN_ID_TAG}` = '{self.run_id}'", max_results=1)
        return runs[0] if runs else None

    def params(self, values: dict) -> dict:
        return {key: value for key, value in super().params(values).items() if key not in self.logged_params}


def probe(uri: str) -> None:
    """Raise OSError unless an http(s) tracking server accepts a connection within PROBE_TIMEOUT_S."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as error:
            raise OSError(f"no server answers at {uri}: {error}") from None

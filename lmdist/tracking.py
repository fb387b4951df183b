"""What rank zero writes about a run: config.yaml, run.json, metrics.jsonl, W&B, the console.

metrics.jsonl and W&B are trackers with Accelerate's protocol (start, store_init_configuration, log,
finish), built by RunLog on rank zero once the run id and the resumed step are known, and fed the same
rows with the same keys. W&B never stops training: if it cannot start online within
`wandb_init_timeout` seconds, the run logs offline and says so.
"""
from __future__ import annotations

import json
import netrc
import os
import platform
import shlex
import subprocess
import sys
import time
import uuid
from contextlib import suppress
from urllib.parse import urlparse

from lmdist import files, mixture, samples, trackers
from lmdist.config import TrainConfig
from lmdist.console import Console, format_final
from lmdist.errors import StorageError, as_user_error, first_line
from lmdist.resume import is_own_checkpoint
from lmdist.schedule import Plan
from lmdist.sharding import is_sharded, local_parameters
from lmdist.stopping import SIGNAL_LEAD_S
from lmdist.token_streams import Corpus


class JsonlTracker:
    """One JSON object per log event in `<output_dir>/metrics.jsonl`.

    A run resumed at `resume_step` first cuts the file back to that step, so it reads as one run. Rows are
    trusted up to the first line that is not a complete JSON row with a step (a write torn by a kill or a
    full disk): that line and everything after it are dropped, and `repaired` says what was dropped.
    """

    def __init__(self, path: str, resume_step: int | None = None):
        self.path, self.resume_step = path, resume_step
        self.fd: int | None = None
        self.repaired: str | None = None  # the warning about a torn tail cut off by start()

    def start(self) -> None:
        if self.resume_step is not None and os.path.exists(self.path):
            self._cut_back(self.resume_step)
        # a raw descriptor, no buffer: a row the disk refused can be cut off whole, and closing has nothing to flush
        with files.writing(self.path):
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND |
                              (0 if self.resume_step is not None else os.O_TRUNC), 0o666)

    def _cut_back(self, step: int) -> None:
        """Keep the trusted rows up to `step`, each ending in a newline; say what a torn tail cost."""
        with open(self.path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
        kept = []
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    raise ValueError("not a row")
            except ValueError:  # a torn or foreign line: what follows it cannot be trusted either
                dropped = lines[number:]
                self.repaired = (f"warning: {self.path} line {number + 1} is not a complete row (a torn write?): "
                                 f"dropped it and everything after it ({sum(map(len, dropped))} bytes, "
                                 f"{len(dropped)} lines); resuming from the checkpoint of step {step}")
                break
            if row["step"] <= step:
                kept.append(line.rstrip(b"\r\n") + b"\n")  # a last row complete but for its newline gets one
        with files.atomic_open(self.path, "wb") as f:
            f.writelines(kept)

    def store_init_configuration(self, values: dict) -> None:
        pass  # the config lives in config.yaml and run.json

    def log(self, values: dict, step: int | None = None) -> None:
        row = memoryview((json.dumps(values) + "\n").encode())
        end = os.lseek(self.fd, 0, os.SEEK_END)
        with files.writing(self.path):
            try:
                while row:
                    row = row[os.write(self.fd, row):]
            except OSError:
                with suppress(OSError):
                    os.ftruncate(self.fd, end)  # a disk-full write leaves no torn row behind
                raise

    def finish(self) -> None:
        os.close(self.fd)


class ResilientWandBTracker:
    """A W&B run (as accelerate's WandBTracker starts it) that never stops training, set up for its dashboard.

    An online start gets `timeout` seconds; if it fails, the run logs offline under the same id. If W&B
    cannot start at all, logging to it is switched off. `fell_back` says why, for the console. W&B's own
    banners are silenced: the console says where the run is, in lmdist's words.

    The dashboard: every metric is plotted against `step` (hidden itself), `tokens_seen` is there as the
    other x-axis, and the validation metrics keep their best value in the summary beside the last one;
    `best/val_loss` and `best/val_loss_step` are set explicitly, so they are in the run file however it is read.
    """

    def __init__(self, project: str, mode: str, timeout: float, **init_kwargs):
        self.project, self.mode, self.timeout, self.init_kwargs = project, mode, timeout, init_kwargs
        self.fell_back, self.run = None, None
        self.best_val_loss: float | None = None

    def start(self) -> None:
        import wandb

        try:
            self.run = wandb.init(project=self.project, mode=self.mode,
                                  settings=wandb.Settings(init_timeout=self.timeout, silent=True), **self.init_kwargs)
            self._define_metrics()
            return
        except Exception as e:  # noqa: BLE001 -- no key, no server, timeout, bad settings: W&B never stops training
            self.fell_back = f"{type(e).__name__}: {first_line(e)}"
        wandb.teardown()  # the failed start still holds the run id
        if self.mode == "online":
            try:
                self.run = wandb.init(project=self.project, mode="offline", settings=wandb.Settings(silent=True),
                                      **self.init_kwargs)
                self.mode = "offline"
                self._define_metrics()
                return
            except Exception as e:  # noqa: BLE001
                self.fell_back += f"; offline: {type(e).__name__}: {first_line(e)}"
        self.mode = "disabled"

    def _define_metrics(self) -> None:
        self.run.define_metric("step", hidden=True)  # the x-axis, not a chart of its own
        self.run.define_metric("micro_step", hidden=True)
        self.run.define_metric("*", step_metric="step")
        for key, best in (("val/loss", "min"), ("val/ppl", "min"), ("val/acc", "max")):
            self.run.define_metric(key, step_metric="step", summary=f"{best},last")

    def location(self) -> str | None:
        """Where the run is: its page online, its folder offline."""
        if self.run is None:
            return None
        return self.run.url if self.mode == "online" else self.run.settings.sync_dir

    def store_init_configuration(self, values: dict) -> None:
        if self.run is not None:
            self.run.config.update(values, allow_val_change=True)

    def log(self, values: dict, step: int | None = None) -> None:
        if self.run is None:
            return
        self.run.log(values, step=step)
        loss = values.get("val/loss")
        if loss is not None and (self.best_val_loss is None or loss < self.best_val_loss):
            self.best_val_loss = loss
            self.run.summary.update({"best/val_loss": loss, "best/val_loss_step": step})

    def log_samples(self, rows: list[dict], step: int) -> None:
        """The samples so far as one Table (step, prompt, text): the dashboard shows the newest, every step in it."""
        if self.run is None:
            return
        import wandb

        self.run.log({"samples": wandb.Table(columns=["step", "prompt", "text"],
                                             data=[[row["step"], row["prompt"], row["text"]] for row in rows])},
                     step=step)

    def log_model(self, folder: str, name: str, metadata: dict) -> str | None:
        """Upload `folder` as the model artifact `name`; why not, when it could not."""
        if self.run is None:
            return "W&B is off"
        import wandb

        try:
            artifact = wandb.Artifact(name, type="model", metadata=metadata)
            for parent, _, names in os.walk(folder):  # file by file: add_dir prints W&B's own progress line
                for file in names:
                    path = os.path.join(parent, file)
                    artifact.add_file(path, name=os.path.relpath(path, folder))
            self.run.log_artifact(artifact, aliases=["latest", f"step-{metadata['step']}"])
        except Exception as e:  # noqa: BLE001 -- an upload never fails the finished run
            return f"{type(e).__name__}: {first_line(e)}"
        return None

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def wandb_mode(cfg: TrainConfig) -> str:
    """The mode W&B runs in: the field, else WANDB_MODE, else online when credentials exist, else offline."""
    if cfg.wandb_mode != "auto":
        return cfg.wandb_mode
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_wandb_credentials() else "offline"


def has_wandb_credentials() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` stores it) for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_tracker(cfg: TrainConfig, run_id: str, group: str) -> ResilientWandBTracker | None:
    """The W&B run of this run id (a resumed run continues its W&B run; every launch of it, each an offline
    folder of its own, is in `group`), or None where W&B is disabled or report_to leaves it out."""
    mode = wandb_mode(cfg)
    if mode == "disabled" or "wandb" not in cfg.report_names:
        return None
    tags = [tag.strip() for tag in cfg.wandb_tags.split(",")] if cfg.wandb_tags else None
    return ResilientWandBTracker(cfg.wandb_project, mode, cfg.wandb_init_timeout, id=run_id,
                                 name=cfg.run_name or _run_name(cfg), dir=cfg.output_dir, resume="allow",
                                 group=group, job_type="train", tags=tags)


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def run_identity(resume, output_dir: str) -> tuple[str, dict | None]:
    """This launch's run id (W&B's too) and, for a fork, where it forked from (run.json's `forked_from`).

    A checkpoint inside output_dir continues its run and id; a checkpoint of another output_dir (a fork:
    `--resume <its path>`) starts a run of its own, so that it never logs into its source's W&B run.
    """
    if resume is None:
        return new_run_id(), None
    if is_own_checkpoint(resume.path, output_dir):
        return resume.run_id, resume.forked_from  # a fork's own checkpoint remembers where the fork began
    source = {"checkpoint": os.path.abspath(resume.path), "run_id": resume.run_id, "step": resume.progress.step}
    return new_run_id(), source


def _run_name(cfg: TrainConfig) -> str:
    return os.path.basename(os.path.normpath(cfg.output_dir))


# ----------------------------------------------------------------------------- run records

def run_facts(accelerator, plan: Plan, corpus: Corpus, model, parameters: int) -> dict:
    """The facts of this launch for run.json and W&B (not settings: those are in config.yaml)."""
    from importlib.metadata import version

    import accelerate
    import torch

    import lmdist

    return {
        "world_size": accelerator.num_processes,
        "distributed_type": "FSDP" if is_sharded(model) else str(accelerator.distributed_type).split(".")[-1],
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "device_name": (torch.cuda.get_device_name() if accelerator.device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),  # as applied, whatever asked for it
        "launcher": _launcher(),
        "hostname": platform.node(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "command": [sys.executable, *sys.orig_argv[1:]],  # as typed: `-m lmdist.train`, `lmdist train`
        "git_commit": _git_commit(os.path.dirname(os.path.abspath(sys.argv[0]))),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "accelerate": accelerate.__version__, "lmdist": lmdist.__version__,
                     # installed versions, not imports: a run that never reads a hub dataset or logs to W&B
                     # would pay two seconds of start-up for them
                     "datasets": version("datasets"), "wandb": version("wandb")},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parameters": parameters,
        "parameters_per_rank": local_parameters(accelerator, model),  # their shards, under FSDP
        "vocab_size": corpus.tokenizer.vocab_size,
        "data_fingerprint": corpus.fingerprint,
        "data_source": corpus.source,
        "train_tokens": corpus.train.n_tokens if corpus.train else None,  # None: streamed
        "val_tokens": corpus.val.n_tokens,
        "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": plan.total_steps,
    }


def _launcher() -> str:
    if "ACCELERATE_DYNAMO_BACKEND" in os.environ:  # set by every `accelerate launch`
        return "accelerate"
    return "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "python"


def _git_commit(folder: str) -> str | None:
    try:
        commit = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class RunLog:
    """Rank zero's record of one run: config.yaml, run.json, every tracker and the console.

    Use it as a context manager: a run that ends in an exception still leaves its status, exit code
    and reason in run.json (launchers squash exit codes to 1), and closes its trackers.
    """

    def __init__(self, accelerator, cfg: TrainConfig, facts: dict, run_id: str, resumed=None):
        self.accelerator, self.cfg, self.closed = accelerator, cfg, False
        self.facts = {**facts, "run_id": run_id, "resumed_from": resumed.step if resumed else None}
        self.console = Console(accelerator.is_main_process, facts["total_steps"], resumed.step if resumed else 0)
        self.started = time.monotonic()
        self.run_json = os.path.join(cfg.output_dir, "run.json")
        self.trackers, self.wandb_mode, self.wandb_run = [], "disabled", None  # rank zero's
        self.samples, self.sample_rows = None, []  # samples.jsonl, and the rows so far for W&B's Table
        if not accelerator.is_main_process:
            return
        cfg.save_yaml(os.path.join(cfg.output_dir, "config.yaml"))
        files.write_json(self.run_json, {**self.facts, "status": "running"})
        jsonl = JsonlTracker(os.path.join(cfg.output_dir, "metrics.jsonl"), resumed.step if resumed else None)
        group = (facts["forked_from"] or {}).get("run_id", run_id)  # a fork sits beside the run it forked from
        wandb_run = self.wandb_run = wandb_tracker(cfg, run_id, group)
        others = trackers.other_trackers(cfg, run_id, resumed.step if resumed else None, self.console.print)
        self.trackers = [jsonl, *([wandb_run] if wandb_run else []), *others]
        for tracker in self.trackers:  # as Accelerator.init_trackers: every start, then the config
            tracker.start()
        for tracker in self.trackers:
            tracker.store_init_configuration({**cfg.to_dict(), "run": self.facts})
        if wandb_run:
            self.wandb_mode = wandb_run.mode
            if wandb_run.fell_back:
                asked = cfg.wandb_mode if cfg.wandb_mode != "auto" else ""
                then = "logging offline instead" if self.wandb_mode == "offline" else "training goes on without W&B"
                self.console.print(f"warning: W&B could not start {asked}({wandb_run.fell_back}); {then}")
            if wandb_run.location():
                self.console.print(f"W&B: {self.wandb_mode} run {run_id} in project {cfg.wandb_project}: "
                                   f"{wandb_run.location()}")
        if jsonl.repaired:
            self.console.print(jsonl.repaired)
        if resumed:
            row = {"step": resumed.step, "micro_step": resumed.micro_step, "resumed_from": resumed.step}
            jsonl.log(row)  # not W&B: step S is there
        self._start_samples(resumed.step if resumed else None)

    def _start_samples(self, resume_step: int | None) -> None:
        """samples.jsonl, cut back to the resumed step like metrics.jsonl; its rows seed W&B's Table again."""
        if not samples.prompts_of(self.cfg):
            return
        self.samples = JsonlTracker(os.path.join(self.cfg.output_dir, "samples.jsonl"), resume_step)
        self.samples.start()
        if resume_step is not None:
            with open(self.samples.path) as f:
                self.sample_rows = [json.loads(line) for line in f if line.strip()]
        if self.samples.repaired:
            self.console.print(self.samples.repaired)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None or self.closed:
            return
        error = as_user_error(error)  # the status and reason the command will report
        reason = {"status": error.status, "exit_code": error.exit_code, "reason": str(error) or type(error).__name__}
        self.finish(reason)

    def print(self, message: str) -> None:
        self.console.print(message)

    def print_plan(self, plan: Plan, corpus: Corpus, parameters: int) -> None:
        """The plan line (what this launch is about to do), the data line, and any dropped remainder."""
        f = self.facts
        self.print(f"plan: world size {plan.world_size} ({f['distributed_type']}), mixed precision "
                   f"{f['mixed_precision']}, {f['threads']} threads/process, {plan.tokens_per_step:,} tokens/step "
                   f"(global), {plan.steps_per_epoch} steps/epoch, {plan.total_steps} total steps"
                   f"{f' over {plan.epochs} epoch' + 's' * (plan.epochs > 1) if plan.sequences else ''}, "
                   f"{parameters:,} parameters")
        self.print(f"data: {corpus.describe()}")
        if corpus.sources:
            self.print(mixture.describe([part.source for part in corpus.sources],
                                        [part.train.n_tokens for part in corpus.sources],
                                        plan.steps_per_epoch * plan.tokens_per_step))
        if plan.sequences_dropped:
            self.print(f"dropping {plan.sequences_dropped} of {plan.sequences} training sequences each epoch "
                       "(too few to fill one more optimizer step on every rank)")

    def advance(self) -> None:
        self.console.advance()

    def checkpoint_saved(self, path: str, seconds: float) -> None:
        self.print(f"checkpoint: {path} ({seconds:.1f} s)")
        if seconds > SIGNAL_LEAD_S:
            self.print(f"warning: saving took {seconds:.0f} s, more than the {SIGNAL_LEAD_S} s a preemption signal "
                       "leaves by default: ask for more (sbatch --signal=B:USR1@<seconds>)")

    def log(self, row: dict) -> None:
        for tracker in self.trackers:
            tracker.log(row, step=row["step"])
        self.console.log(row)

    def log_samples(self, rows: list[dict] | None) -> None:
        """A sampling step's rows (None on ranks but zero): to samples.jsonl and W&B's Table."""
        if not rows or self.samples is None:
            return
        for row in rows:
            self.samples.log(row)
        self.sample_rows += rows
        if self.wandb_run:
            self.wandb_run.log_samples(self.sample_rows, step=rows[0]["step"])

    def log_model(self, folder: str, step: int) -> None:
        """Upload final/ to W&B as model-<run id> when `wandb_artifact` asks for it."""
        if not (self.cfg.wandb_artifact and self.accelerator.is_main_process):
            return
        name = f"model-{self.facts['run_id']}"
        failed = self.wandb_run.log_model(folder, name, {"step": step, "run_id": self.facts["run_id"]}) \
            if self.wandb_run else "W&B is off"
        self.print(f"warning: final/ was not uploaded to W&B ({failed})" if failed else
                   f"W&B: final/ is the model artifact {name}")

    def finish(self, summary: dict) -> None:
        """Close the trackers, complete run.json, say where the W&B files are and, last, the final metrics."""
        self.closed = True
        self.console.close()
        for tracker in [*self.trackers, self.samples] if self.samples else self.trackers:
            tracker.finish()
        # The process group stays: run_cli closes it once main's frame has freed the DDP model. Destroyed here, the
        # model's Reducer would hold its last reference and join gloo's threads holding the GIL, which a thread still
        # finishing the last all-reduce waits for: a deadlock, at random (pytorch's ~ProcessGroupGloo under ~Reducer).
        if not self.accelerator.is_main_process:
            return
        if self.wandb_mode == "offline":
            wandb_dir = os.path.join(self.cfg.output_dir, "wandb")
            # quoted for the shell, the glob outside the quotes so that the shell still expands it
            self.print(f"W&B logged offline under {wandb_dir}; upload every piece of this run (one per launch) as "
                       f"one run with: wandb sync --id {shlex.quote(self.facts['run_id'])} "
                       f"{shlex.quote(wandb_dir + os.sep)}offline-run-*")
        record = {**self.facts, **summary, "wandb_mode": self.wandb_mode,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            files.write_json(self.run_json, record)
        except StorageError as error:  # run.json still says why, over its old blocks where there is no room
            completed = record["status"] == "completed"
            if completed:  # the run did not complete after all
                record.update(status="failed", exit_code=error.exit_code, reason=str(error))
            if not files.write_json_in_place(self.run_json, record):
                self.print(f"warning: could not record the end of the run in {self.run_json}")
            if completed:
                raise
        if record["status"] == "completed":
            self.print(format_final(summary["final"], summary["step"], time.monotonic() - self.started))

"""Resume policy: which checkpoint a launch continues from, and whether it may.

    resume=auto      the newest complete checkpoint in output_dir; torn or corrupted ones are skipped, with a warning
    resume=never     a fresh start; an output_dir that already holds a run is refused
    resume=<folder>  that checkpoint, which must be complete: one of output_dir's own continues its run; another
                     run's starts a fork (a run of its own), and a fork that saved checkpoints continues from them

A checkpoint continues only with the same training settings (the RUN_CONTROL_FIELDS may change), the same data
and tokenizer (their fingerprint), and within the run's total steps. On another number of processes or another
batch_size, grad_accum absorbs the change, so that the global batch and the data position (counted in
sequences) carry over. A finished run (final/ written) relaunched with its own config does nothing; with other
settings it is refused, and the refusal prints the command that trains on from its final weights.

trainer_state.json holds `checkpoint_record`'s fields, which `Resume` reads back; lmdist.checkpoint stores the
record as given (see its docstring for the two fields it reads). Its `data_order` names the lmdist.order the
run draws its batches in, and a resume keeps it: a record without one (written before it was recorded) trained
in ORDER_LEGACY, and one this lmdist does not know is refused.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass, replace

import yaml

from lmdist.checkpoint import CheckpointError, read_state, step_folders
from lmdist.config import TrainConfig, upgrade_saved
from lmdist.errors import ConfigError
from lmdist.order import ORDER, ORDER_LEGACY, ORDERS

# Fields a relaunch may change: they steer logging, saving and evaluation, not the training itself.
RUN_CONTROL_FIELDS = {"eval_every", "eval_batches", "log_every", "save_every", "keep_last", "keep_best", "resume",
                      "report_to", "wandb_mode", "wandb_init_timeout", "wandb_project", "wandb_tags", "wandb_artifact",
                      "run_name", "sample_prompts", "sample_tokens", "sample_every", "sample_temperature", "threads",
                      "cache_dir", "tokens_dir"}


@dataclass
class Progress:
    """Where training is: the counters and the data position, all in one place."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # batches through forward/backward
    epoch: int = 0  # the epoch in progress
    micro_batches_in_epoch: int = 0  # global micro-batches of that epoch already consumed
    tokens_seen: int = 0

    @classmethod
    def from_record(cls, saved: dict) -> Progress:
        """The progress a trainer_state.json records; checkpoints written before the rename call the data
        position `batches_in_epoch`."""
        saved = dict(saved)
        if "batches_in_epoch" in saved:
            saved["micro_batches_in_epoch"] = saved.pop("batches_in_epoch")
        return cls(**saved)

    def normalized(self, micro_batches_per_epoch: int) -> Progress:
        """The same position, with a finished epoch written as the start of the next one."""
        if self.micro_batches_in_epoch < micro_batches_per_epoch:
            return self
        return replace(self, epoch=self.epoch + 1, micro_batches_in_epoch=0)


@dataclass
class Resume:
    """A verified checkpoint to continue from."""

    path: str
    progress: Progress
    run_id: str
    config: dict
    data_fingerprint: str
    world_size: int  # processes that saved it
    forked_from: dict | None = None  # the run a fork began from (its checkpoint, run id and step)
    model_config: dict | None = None  # --model hf: the transformers config it trained (models.recorded_config)
    resumed_by: int | None = None  # processes that resume it (set by adapt_to_world_size)
    data_order: str = ORDER  # the lmdist.order its batches were drawn in

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step when it was saved."""
        return self.world_size * self.config["batch_size"] * self.config["grad_accum"]


def checkpoint_record(cfg: TrainConfig, progress: Progress, *, run_id: str, forked_from: dict | None,
                      data_fingerprint: str, data_order: str, val_loss: float | None,
                      model_config: dict | None = None) -> dict:
    """What a checkpoint records for its resume (trainer_state.json): the counters and data position, the run
    (its id and, for a fork, its origin), the config, the data fingerprint and order, and `val_loss`, the
    evaluation at this step if any, which `keep_best` compares; `model_config`, --model hf's transformers config."""
    return {"progress": asdict(progress), "run_id": run_id, "forked_from": forked_from, "config": cfg.to_dict(),
            "data_fingerprint": data_fingerprint, "data_order": data_order, "val_loss": val_loss,
            "model_config": model_config}


def find_resume(cfg: TrainConfig, say) -> Resume | None:
    """The checkpoint this launch continues from, verified; None for a fresh start.

    `resume=auto` takes the newest complete checkpoint and skips torn or corrupted ones (warning with
    `say`); `resume=never` refuses an output_dir that already holds a run; an explicit path must be complete.
    A fork (an explicit checkpoint of another run) that already saved checkpoints of its own continues from
    them: relaunching its first command continues the fork, as for any run.
    """
    if cfg.resume == "never":
        used = [n for n in ("checkpoints", "metrics.jsonl", "final") if os.path.exists(os.path.join(cfg.output_dir, n))]
        if used:
            raise ConfigError(f"--resume never: {cfg.output_dir} already holds a run ({', '.join(used)}); "
                              "choose a new output_dir, or use --resume auto to continue it")
        return None
    if cfg.resume != "auto" and is_own_checkpoint(cfg.resume, cfg.output_dir):
        return _resume_from(cfg.resume)
    own = None
    for _, path in sorted(step_folders(os.path.join(cfg.output_dir, "checkpoints")), reverse=True):
        try:
            own = _resume_from(path)
            break
        except CheckpointError as e:
            say(f"warning: skipping checkpoint {path}: {e}")
    if cfg.resume == "auto":
        return own
    if own is not None:  # a fork relaunched with its first command: it continues the fork, not its source
        say(f"continuing this run from its own newest checkpoint {own.path}; --resume {cfg.resume} is where it "
            "began")
        return own
    return _resume_from(cfg.resume)


def _resume_from(path: str) -> Resume:
    state = read_state(path)
    return Resume(path, Progress.from_record(state["progress"]), state["run_id"], upgrade_saved(state["config"]),
                  state["data_fingerprint"], state["world_size"], state.get("forked_from"), state.get("model_config"),
                  data_order=_data_order(state, path))


def _data_order(state: dict, path: str) -> str:
    """The order a checkpoint's batches were drawn in: ORDER_LEGACY where its record predates `data_order`."""
    data_order = state.get("data_order", ORDER_LEGACY)
    if data_order not in ORDERS:
        raise ConfigError(f"the checkpoint {path} draws its batches in the data order {data_order!r}, which this "
                          f"lmdist does not know (it knows {', '.join(map(repr, ORDERS))}): upgrade lmdist to the "
                          "version that wrote the checkpoint to continue it")
    return data_order


def is_own_checkpoint(checkpoint_path: str, output_dir: str) -> bool:
    """Whether a checkpoint folder is one of output_dir's own (output_dir/checkpoints/step_N), not a fork's source."""
    return os.path.dirname(os.path.dirname(os.path.realpath(checkpoint_path))) == os.path.realpath(output_dir)


def check_compatible(resume: Resume, cfg: TrainConfig) -> None:
    """Refuse to continue a checkpoint with different training settings.

    batch_size and grad_accum may differ where the global batch is the same (adapt_to_world_size chose them).
    """
    check_same_start(resume, cfg)
    saved, processes = resume.config, resume.resumed_by or resume.world_size
    if processes * cfg.batch_size * cfg.grad_accum == resume.global_batch:
        saved = {**saved, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    refuse_changes(saved, cfg, f"the checkpoint {resume.path}", "checkpoint")


def check_same_start(resume: Resume, cfg: TrainConfig) -> None:
    """Refuse `init_from` weights for a launch that would continue a run which did not start from them.

    The same init_from continues its run (a requeued fine-tuning job relaunches its first command); the
    checkpoint's weights replace the init_from ones.
    """
    began_from = resume.config.get("init_from")
    if cfg.init_from is None or (began_from is not None
                                 and os.path.realpath(began_from) == os.path.realpath(cfg.init_from)):
        return
    start = f"init_from {began_from}" if began_from else "its own initialisation"
    again = f"with --init_from {shlex.quote(began_from)}" if began_from else "without --init_from"
    raise ConfigError(f"the checkpoint {resume.path} continues a run that began from {start}, not from init_from "
                      f"{cfg.init_from}: relaunch {again} to continue it, or choose another output_dir for a new run")


def adapt_to_world_size(resume: Resume, cfg: TrainConfig, world_size: int, say) -> tuple[Resume, TrainConfig]:
    """The checkpoint and config that continue `resume` on `world_size` processes with the same global batch.

    The global batch (processes x batch_size x grad_accum sequences) and the data position, counted in
    sequences, carry over. On another number of processes, or with another batch_size, grad_accum absorbs
    the change; where no whole grad_accum keeps the global batch, that is an error listing the batch_sizes
    that would.
    """
    resume = replace(resume, resumed_by=world_size)
    saved_batch = resume.config["batch_size"]
    if (world_size, cfg.batch_size) == (resume.world_size, saved_batch):
        return resume, cfg
    if cfg.streaming:
        raise ConfigError(f"the checkpoint {resume.path} streamed its data over {resume.world_size} processes x "
                          f"batch_size {saved_batch}, each process with its own part of the stream: relaunch on "
                          f"{resume.world_size} processes with batch_size {saved_batch}")
    global_batch, per_micro_step = resume.global_batch, world_size * cfg.batch_size
    if global_batch % per_micro_step:
        where = (f"the checkpoint {resume.path} trained with a global batch of {global_batch} sequences "
                 f"({resume.world_size} processes x batch_size {saved_batch} x grad_accum "
                 f"{resume.config['grad_accum']}); {world_size} processes x batch_size {cfg.batch_size} cannot keep it "
                 "with a whole grad_accum")
        if global_batch % world_size:
            raise ConfigError(f"{where}, nor can any batch_size: relaunch on a number of processes that divides "
                              f"{global_batch}, e.g. {resume.world_size}")
        per_process = global_batch // world_size
        fits = [str(b) for b in range(1, per_process + 1) if per_process % b == 0]
        raise ConfigError(f"{where}: relaunch with a batch_size that divides {per_process} ({', '.join(fits)}; "
                          f"grad_accum follows), or on {resume.world_size} processes")
    grad_accum = global_batch // per_micro_step
    # the data position is kept in global micro-batches of the old size: convert it to the new size
    old_micro_batch = resume.world_size * saved_batch
    progress = replace(resume.progress, micro_batches_in_epoch=resume.progress.micro_batches_in_epoch
                       * old_micro_batch // per_micro_step)
    say(f"resuming a checkpoint of {resume.world_size} processes x batch_size {saved_batch} on {world_size} x "
        f"{cfg.batch_size}: grad_accum {resume.config['grad_accum']} -> {grad_accum} keeps the global batch of "
        f"{global_batch} sequences; dropout draws will differ from an uninterrupted run")
    return replace(resume, progress=progress), replace(cfg, grad_accum=grad_accum)


def check_within(resume: Resume, total_steps: int) -> None:
    """Refuse a checkpoint past the run's end: continuing it would train beyond total_steps."""
    if resume.progress.step > total_steps:
        raise CheckpointError(f"the checkpoint {resume.path} is at step {resume.progress.step}, past this run's "
                              f"{total_steps} total steps (an older lmdist trained past the end): resume an "
                              "earlier checkpoint with --resume <its folder>, or start a new output_dir")


def check_same_model(resume: Resume, cfg: TrainConfig, model_config: dict | None) -> None:
    """Refuse to continue a --model hf checkpoint whose transformers config file has changed since."""
    if resume.model_config is None or model_config == resume.model_config:
        return
    keys = sorted(set(model_config or {}) | set(resume.model_config))
    changed = [f"{k} (checkpoint {resume.model_config.get(k)!r}, now {(model_config or {}).get(k)!r})"
               for k in keys if resume.model_config.get(k) != (model_config or {}).get(k)]
    raise ConfigError(f"hf_config {cfg.hf_config} differs from the transformers config the checkpoint {resume.path} "
                      f"trained, in {'; '.join(changed)}: restore those values, or start a new output_dir")


def check_same_data(resume: Resume, data_fingerprint: str) -> None:
    """Refuse to continue a checkpoint on different data or a different tokenizer."""
    if data_fingerprint != resume.data_fingerprint:
        raise ConfigError(f"the data or tokenizer differ from the checkpoint {resume.path} (fingerprint "
                          f"{resume.data_fingerprint}, now {data_fingerprint}): restore them, or start a new "
                          "output_dir")


def refuse_changes(saved: dict, cfg: TrainConfig, where: str, label: str, fix: str = "") -> None:
    """ConfigError naming every training setting of `cfg` that differs from `saved` (run-control fields may; so
    may hf_config's path, whose contents check_same_model compares).

    `fix` replaces the default advice (relaunch with the saved values, or start a new output_dir).
    """
    now = cfg.resolved()
    saved = TrainConfig(**{k: v for k, v in saved.items() if k in now}).resolved()  # fields added since: defaults
    changed = [f"{k} ({label} {saved[k]!r}, now {now[k]!r})" for k in now
               if k not in RUN_CONTROL_FIELDS | {"output_dir", "init_from", "hf_config"} and saved[k] != now[k]]
    if changed:
        if not fix and saved["gpt_style"] != now["gpt_style"] and saved["gpt_style"] == "gpt2":
            fix = ("relaunch with --gpt_style gpt2 (a run from before lmdist's GPT styles is gpt2's; the default "
                   "is now modern), or start a new output_dir")
        raise ConfigError(f"this relaunch differs from {where} in {'; '.join(changed)}: "
                          f"{fix or 'relaunch with its values, or start a new output_dir'}")


def finished(cfg: TrainConfig) -> bool:
    """True when output_dir holds a completed run (final/ export written) of this same config.

    A completed run relaunched with other settings is refused, and the refusal prints the command that
    trains on from its final weights in a new output_dir (with `init_from`).
    """
    try:
        with open(os.path.join(cfg.output_dir, "run.json")) as f:
            status = json.load(f).get("status")
    except (OSError, ValueError):
        return False
    if status != "completed" or not os.path.exists(os.path.join(cfg.output_dir, "final", "model.safetensors")):
        return False
    final = os.path.join(cfg.output_dir, "final")
    command = relaunch_command(init_from=final, output_dir=_unused_folder(f"{cfg.output_dir.rstrip(os.sep)}-continued"))
    refuse_changes(_finished_config(cfg.output_dir), cfg, f"the finished run in {cfg.output_dir}", "finished run",
                   fix=f"relaunch with its values, or train on from its final weights in a new run (a new optimizer, "
                       f"lr schedule and step count) with: {command}")
    return True


def _finished_config(output_dir: str) -> dict:
    """The config.yaml of a finished run, or a ConfigError naming the file and the fix."""
    path = os.path.join(output_dir, "config.yaml")
    fix = (f"restore it, or delete {os.path.join(output_dir, 'run.json')} and relaunch: the run is then checked "
           "against its last checkpoint and completed again, writing a new config.yaml")
    try:
        with open(path) as f:
            saved = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"the finished run in {output_dir} has no readable {path} ({e.strerror}): {fix}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"the finished run's {path} is not valid YAML ({' '.join(str(e).split())}): {fix}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"the finished run's {path} holds a {type(saved).__name__}, not a mapping of field: value: "
                          f"{fix}")
    return upgrade_saved(saved)


def relaunch_command(**flags: str) -> str:
    """The command that launched this process, with `flags` set (replacing any given), shell-quoted.

    Under a launcher (torchrun, accelerate launch) this is the launcher's own command line, read from the
    parent process, so that the printed command starts the same processes; otherwise python and the script.
    """
    args = _without_flags(sys.argv[1:], flags)
    for name, value in flags.items():
        args += [f"--{name}", value]
    return shlex.join([*_launcher_prefix(), *args])


def _launcher_prefix() -> list[str]:
    """Everything of this process's command before the training flags."""
    flags = sys.argv[1:]
    typed = _before(sys.orig_argv, flags)  # `-m lmdist.train`, `lmdist train`: there argv[0] is the module's file
    own = [sys.executable, *typed[1:]] if typed and len(typed) > 1 else [sys.executable, sys.argv[0]]
    if "TORCHELASTIC_RUN_ID" not in os.environ and "ACCELERATE_DYNAMO_BACKEND" not in os.environ:
        return own
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = [a.decode() for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return own
    return _before(parent, flags) or own  # the launcher's command, when it passed the flags on


def _before(command: list[str], flags: list[str]) -> list[str] | None:
    """`command` less the `flags` it ends with; None when it does not end with them."""
    cut = len(command) - len(flags)
    return command[:cut] if cut > 0 and command[cut:] == flags else None


def _without_flags(argv: list[str], names) -> list[str]:
    """`argv` less every `--name value` and `--name=value` of `names`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--") and arg[2:].split("=", 1)[0] in names:
            skip = "=" not in arg
        else:
            kept.append(arg)
    return kept


def _unused_folder(path: str) -> str:
    """`path`, or `path-2`, `path-3` ... : the first that does not exist yet."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate

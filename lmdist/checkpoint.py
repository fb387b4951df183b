"""Checkpoints: one training state saved whole, atomically, and restored exactly.

    <output_dir>/checkpoints/step_00000200/
        model.safetensors     full weights (tied weights once), written by rank zero
        optimizer.pt          optimizer state      } torch.save of tensors and plain values:
        scheduler.pt          LR scheduler state   } loaded with weights_only=True
        rank_00000.pt ...     each rank's RNG states and unreduced metric sums
        trainer_state.json    counters, data position, config, data fingerprint, W&B run id
        manifest.json         size and sha256 of every file above; written last, by rank zero

A checkpoint counts only once its manifest exists and every file matches it: a save killed at any
moment leaves a folder that resume skips (with a warning naming it) in favour of the previous
complete one, that retention does not count, and that a save of the same step replaces. The manifest
lists exactly the files its save wrote, never a leftover of an earlier attempt. Hashes are checked once
per process: a folder this process wrote or verified is trusted while its manifest and its files'
sizes and modification times are unchanged. Nothing is unpickled before its file matched the
manifest, and even then only with `weights_only=True`. Old checkpoints are deleted by rank zero only
after a newer one is complete.

Why not `accelerator.save_state`: it pickles RNG states that `load_state` unpickles unchecked,
silently skips RNG files it cannot load, and its `total_limit` deletes the old checkpoint before
the new one is complete. The pieces it is right about (gathering a full state dict, barriers) are
used here.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import random
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from lmdist import sharding
from lmdist.config import TrainConfig
from lmdist.engine import shared_from_main
from lmdist.errors import ConfigError, LmdistError, StorageError
from lmdist.files import agree_on_writes, save_safetensors, save_torch, write_json, writing

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
# Fields a relaunch may change: they steer logging, saving and evaluation, not the training itself.
RUN_CONTROL_FIELDS = {"eval_every", "eval_batches", "log_every", "save_every", "keep_last", "keep_best", "resume",
                      "wandb_mode", "wandb_init_timeout", "wandb_project", "run_name", "threads", "cache_dir"}


class CheckpointError(LmdistError):
    """A checkpoint is missing, incomplete or does not match the run."""


@dataclass
class Progress:
    """Where training is: the counters and the data position, all in one place."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # batches through forward/backward
    epoch: int = 0  # the epoch in progress
    batches_in_epoch: int = 0  # global batches of that epoch already consumed
    tokens_seen: int = 0

    def normalized(self, batches_per_epoch: int) -> Progress:
        """The same position, with a finished epoch written as the start of the next one."""
        if self.batches_in_epoch < batches_per_epoch:
            return self
        return replace(self, epoch=self.epoch + 1, batches_in_epoch=0)


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
    resumed_by: int | None = None  # processes that resume it (set by adapt_to_world_size)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step when it was saved."""
        return self.world_size * self.config["batch_size"] * self.config["grad_accum"]


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"step_{step:08d}")


# ----------------------------------------------------------------------------- saving

def save(accelerator, path: str, cfg: TrainConfig, *, model, optimizer, scheduler, progress: Progress,
         rank_state: dict, run_id: str, data_fingerprint: str, val_loss: float | None,
         forked_from: dict | None = None) -> float:
    """Write a complete checkpoint at `path` on every rank, then apply retention; returns seconds taken.

    `val_loss` (the evaluation at this step, if any) is recorded for `keep_best`.
    """
    began = time.perf_counter()
    if shared_from_main(accelerator, _complete_or_cleared(path) if accelerator.is_main_process else None):
        return 0.0  # this very state is saved already (a stop request right after resuming from it)
    state = gather_weights(accelerator, model)  # every rank takes part (shards are gathered)
    # keyed by parameter name, whole: loadable with or without FSDP, on any number of processes
    optimizer_state = sharding.full_optimizer_state(_training_module(accelerator, model), optimizer)
    failure = None  # a write the storage refused: the step's own folder goes, older checkpoints stay
    try:
        with writing(path):
            os.makedirs(path, exist_ok=True)
            written = [_save_torch({"rng": _rng_state(), **rank_state}, path,
                                   f"rank_{accelerator.process_index:05d}.pt")]
            if accelerator.is_main_process:
                written.append(save_safetensors(without_tied_copies(state), os.path.join(path, "model.safetensors"),
                                                metadata={"format": "pt"}))
                written.append(_save_torch(optimizer_state, path, "optimizer.pt"))
                written.append(_save_torch(scheduler.state_dict(), path, "scheduler.pt"))
                if accelerator.scaler is not None:  # fp16's loss scale
                    written.append(_save_torch(accelerator.scaler.state_dict(), path, "scaler.pt"))
                trainer_state = {"progress": asdict(progress), "run_id": run_id, "forked_from": forked_from,
                                 "config": cfg.to_dict(),
                                 "data_fingerprint": data_fingerprint, "world_size": accelerator.num_processes,
                                 "sharded": sharding.is_sharded(model), "val_loss": val_loss}  # sharded: for the record
                written.append(write_json(os.path.join(path, STATE), trainer_state, indent=1))
            for file in written:
                _fsync(file)
    except StorageError as error:
        failure = error
    remove_partial = functools.partial(shutil.rmtree, path, ignore_errors=True)
    agree_on_writes(accelerator, failure, path, remove_partial)  # and a barrier: every rank's part is on disk
    if accelerator.is_main_process:
        try:
            with writing(path):
                others = [f"rank_{rank:05d}.pt" for rank in range(1, accelerator.num_processes)]
                write_manifest(path, [os.path.basename(file) for file in written] + others, progress.step)
                _fsync(os.path.dirname(path))
            apply_retention(os.path.dirname(path), cfg.keep_last, cfg.keep_best)
        except StorageError as error:
            failure = error
    agree_on_writes(accelerator, failure, path, remove_partial)
    return time.perf_counter() - began


def write_manifest(path: str, names: list[str], step: int) -> None:
    """Hash the files `names` of the checkpoint folder `path` into its manifest, the file that completes it."""
    files = {name: {"size": os.path.getsize(os.path.join(path, name)), "sha256": _sha256(os.path.join(path, name))}
             for name in sorted(names)}
    _fsync(write_json(os.path.join(path, MANIFEST), {"files": files, "step": step}, indent=1))
    _verified[os.path.realpath(path)] = _stamp(path, files)


def apply_retention(folder: str, keep_last: int, keep_best: bool) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints (and, with `keep_best`, the one with the
    lowest recorded val/loss); returns what was deleted.

    Complete means verified (see `verify`), so a corrupted checkpoint never takes a valid one's place.
    Incomplete or corrupted folders older than the newest complete checkpoint are leftovers of killed
    saves and go too; newer ones are left for the save of their step to replace.
    """
    entries = sorted(_step_folders(folder), reverse=True)
    # verified newest first and only as far as needed: hashing a checkpoint takes as long as reading it
    complete = list(itertools.islice(((step, path) for step, path in entries if _is_complete(path)), keep_last))
    if not complete:
        return []
    keep = {path for _, path in complete}
    if keep_best:
        scored = sorted((loss, path) for _, path in entries if (loss := _recorded_val_loss(path)) is not None)
        keep |= set(itertools.islice((path for _, path in scored if _is_complete(path)), 1))
    newest = complete[0][0]
    doomed = [path for step, path in entries if path not in keep and step <= newest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------- finding and loading

def refuse_changes(saved: dict, cfg: TrainConfig, where: str, label: str, fix: str = "") -> None:
    """ConfigError naming every training setting of `cfg` that differs from `saved` (run-control fields may).

    `fix` replaces the default advice (relaunch with the saved values, or start a new output_dir).
    """
    now = cfg.to_dict()
    changed = [f"{k} ({label} {saved.get(k)!r}, now {now[k]!r})" for k in now
               if k not in RUN_CONTROL_FIELDS | {"output_dir", "init_from"} and saved.get(k) != now[k]]
    if changed:
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
    return saved


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
    own = [sys.executable, sys.argv[0]]
    if "TORCHELASTIC_RUN_ID" not in os.environ and "ACCELERATE_DYNAMO_BACKEND" not in os.environ:
        return own
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = [a.decode() for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return own
    flags = sys.argv[1:]
    if len(parent) > len(flags) and parent[len(parent) - len(flags):] == flags:  # the launcher passed them on
        return parent[:len(parent) - len(flags)]
    return own


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


def find_resume(cfg: TrainConfig, warn) -> Resume | None:
    """The checkpoint this launch continues from, verified; None for a fresh start.

    `resume=auto` takes the newest complete checkpoint and skips torn or corrupted ones (warning with
    `warn`); `resume=never` refuses an output_dir that already holds a run; an explicit path must be complete.
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
    for _, path in sorted(_step_folders(os.path.join(cfg.output_dir, "checkpoints")), reverse=True):
        try:
            own = _resume_from(path)
            break
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {path}: {e}")
    if cfg.resume == "auto":
        return own
    if own is not None:  # a fork relaunched with its first command: it continues the fork, not its source
        warn(f"continuing this run from its own newest checkpoint {own.path}; --resume {cfg.resume} is where it "
             "began")
        return own
    return _resume_from(cfg.resume)


def is_own_checkpoint(checkpoint_path: str, output_dir: str) -> bool:
    """Whether a checkpoint folder is one of output_dir's own (output_dir/checkpoints/step_N), not a fork's source."""
    return os.path.dirname(os.path.dirname(os.path.realpath(checkpoint_path))) == os.path.realpath(output_dir)


def check_compatible(resume: Resume, cfg: TrainConfig) -> None:
    """Refuse to continue a checkpoint with different training settings.

    batch_size and grad_accum may differ where the global batch is the same (adapt_to_world_size chose them).
    """
    saved, processes = resume.config, resume.resumed_by or resume.world_size
    if processes * cfg.batch_size * cfg.grad_accum == resume.global_batch:
        saved = {**saved, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    refuse_changes(saved, cfg, f"the checkpoint {resume.path}", "checkpoint")


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
    progress = replace(resume.progress,
                       batches_in_epoch=resume.progress.batches_in_epoch * old_micro_batch // per_micro_step)
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


def check_same_data(resume: Resume, data_fingerprint: str) -> None:
    """Refuse to continue a checkpoint on different data or a different tokenizer."""
    if data_fingerprint != resume.data_fingerprint:
        raise ConfigError(f"the data or tokenizer differ from the checkpoint {resume.path} (fingerprint "
                          f"{resume.data_fingerprint}, now {data_fingerprint}): restore them, or start a new "
                          "output_dir")


def load(accelerator, resume: Resume, *, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; returns this rank's saved extra state."""
    # Every rank reads the full state and keeps what it holds (its shards under FSDP).
    module = _training_module(accelerator, model)
    weights = _with_tied_copies(module, load_file(os.path.join(resume.path, "model.safetensors")))
    sharding.load_full_state(module, optimizer, weights, _load_torch(resume.path, "optimizer.pt"))
    scheduler.load_state_dict(_load_torch(resume.path, "scheduler.pt"))
    if accelerator.scaler is not None and os.path.exists(os.path.join(resume.path, "scaler.pt")):
        accelerator.scaler.load_state_dict(_load_torch(resume.path, "scaler.pt"))
    rank = accelerator.process_index
    if accelerator.num_processes == resume.world_size:
        rank_state = _load_torch(resume.path, f"rank_{rank:05d}.pt")
        _set_rng_state(rank_state.pop("rng"))
        return rank_state
    # Another world size: RNG states only for ranks that existed; every unlogged metric sum goes to rank 0.
    saved = [_load_torch(resume.path, f"rank_{r:05d}.pt") for r in range(resume.world_size)]
    if rank < resume.world_size:
        _set_rng_state(saved[rank]["rng"])
    meter = sum(s["meter"] for s in saved) if rank == 0 else torch.zeros_like(saved[0]["meter"])
    return {"meter": meter}


def load_weights(module: torch.nn.Module, file: str) -> dict:
    """Load a model.safetensors into `module`; only tied copies may be missing from the file. Returns what it read."""
    state = load_file(file)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or set(missing) - _tied_aliases(module):
        raise CheckpointError(f"{file} does not fit this model: missing {sorted(set(missing) - _tied_aliases(module))}"
                              f", unexpected {sorted(unexpected)}")
    return state


def init_weights(module: torch.nn.Module, folder: str) -> str:
    """`init_from`: load `folder`'s weights into `module`; returns a line saying what was loaded, and from where."""
    file = os.path.join(folder, "model.safetensors")
    state = load_weights(module, file)
    origin = _weights_origin(folder)
    return (f"init_from: loaded {len(state)} tensors ({sum(t.numel() for t in state.values()):,} parameters) "
            f"from {file}{f' ({origin})' if origin else ''}")


def _weights_origin(folder: str) -> str:
    """The step and run a checkpoint or a final/ export holds the weights of, where its records say."""
    try:
        if os.path.exists(os.path.join(folder, STATE)):  # a checkpoint
            with open(os.path.join(folder, STATE)) as f:
                state = json.load(f)
            return f"checkpoint at step {state['progress']['step']} of run {state['run_id']}"
        with open(os.path.join(folder, os.pardir, "run.json")) as f:  # a final/ export inside its run's output_dir
            run = json.load(f)
        return f"final weights of run {run['run_id']}, {run.get('status')} at step {run.get('step')}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""  # an export copied elsewhere: its weights are all there is to say


def _training_module(accelerator, model) -> torch.nn.Module:
    """The module whose parameters the optimizer holds: the sharded model itself, or the model inside DDP."""
    return model if sharding.is_sharded(model) else accelerator.unwrap_model(model)


def gather_weights(accelerator, model) -> dict:
    """The model's full weights (a collective for sharded models: call on every rank)."""
    if not sharding.is_sharded(model):
        return accelerator.get_state_dict(model)
    aliases = _tied_aliases(model)  # gathered copies of tied weights no longer share memory: drop them by name
    return {name: tensor for name, tensor in sharding.full_model_state(model).items() if name not in aliases}


def _with_tied_copies(module: torch.nn.Module, state: dict) -> dict:
    """`state` plus the tied aliases that without_tied_copies left out."""
    first = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        first.setdefault(id(parameter), name)
        if name not in state and first[id(parameter)] in state:
            state[name] = state[first[id(parameter)]]
    return state


def without_tied_copies(state: dict) -> dict:
    """Keep the first name of each shared tensor (tied output weights are the embedding's)."""
    seen, unique = set(), {}
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            unique[name] = tensor.contiguous()
    return unique


def verify(path: str) -> dict:
    """The manifest of a complete checkpoint, after checking every file's size and sha256 (unless this
    process wrote or verified the folder and nothing in it changed since)."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder")
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"{manifest_path} is missing: the save did not complete")
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
        stamp = _stamp(path, files)
    except FileNotFoundError as e:
        raise CheckpointError(f"{e.filename} is missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable ({e})") from None
    for required in (STATE, "model.safetensors", "optimizer.pt", "scheduler.pt"):
        if required not in files:
            raise CheckpointError(f"{path} lacks {required}")
    if _verified.get(os.path.realpath(path)) == stamp:
        return files
    for name, expected in files.items():
        file = os.path.join(path, name)
        try:
            matches = os.path.getsize(file) == expected["size"] and _sha256(file) == expected["sha256"]
        except OSError as e:  # unreadable (I/O error, permissions): a checkpoint to skip, not a crash on one rank
            raise CheckpointError(f"{file} cannot be read ({e.strerror})") from None
        if not matches:
            raise CheckpointError(f"{file} does not match the manifest (truncated or modified)")
    _verified[os.path.realpath(path)] = stamp
    return files


# ----------------------------------------------------------------------------- internals

# checkpoint folder (real path) -> its stamp when this process wrote or verified it
_verified: dict[str, tuple] = {}


def _stamp(path: str, files: dict) -> tuple:
    """What a checkpoint's verification depends on, cheap to read: the manifest's entries and each listed
    file's size and modification time (a file rewritten, truncated or replaced since changes it)."""
    listed = []
    for name, expected in sorted(files.items()):
        info = os.stat(os.path.join(path, name))
        listed.append((name, expected["size"], expected["sha256"], info.st_size, info.st_mtime_ns, info.st_ino))
    return tuple(listed)


def _is_complete(path: str) -> bool:
    try:
        verify(path)
    except CheckpointError:
        return False
    return True


def _complete_or_cleared(path: str) -> bool:
    """True when `path` holds a complete checkpoint; otherwise removes whatever a failed save left there."""
    if _is_complete(path):
        return True
    shutil.rmtree(path, ignore_errors=True)
    return False

def _resume_from(path: str) -> Resume:
    verify(path)
    with open(os.path.join(path, STATE)) as f:
        state = json.load(f)
    return Resume(path, Progress(**state["progress"]), state["run_id"], state["config"], state["data_fingerprint"],
                  state["world_size"], state.get("forked_from"))


def _recorded_val_loss(path: str) -> float | None:
    try:
        with open(os.path.join(path, STATE)) as f:
            return json.load(f).get("val_loss")
    except (OSError, ValueError, AttributeError):  # a torn folder: it records nothing
        return None


def _step_folders(folder: str) -> list[tuple[int, str]]:
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        if name.startswith("step_") and name[5:].isdigit():
            found.append((int(name[5:]), os.path.join(folder, name)))
    return found


def _tied_aliases(module: torch.nn.Module) -> set[str]:
    """Parameter names that alias an earlier parameter (tied weights, stored once)."""
    first, aliases = set(), set()
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases.add(name)
        first.add(id(parameter))
    return aliases


def _save_torch(obj, folder: str, name: str) -> str:
    return save_torch(obj, os.path.join(folder, name))


def _load_torch(folder: str, name: str):
    path = os.path.join(folder, name)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- the unpickler refuses anything but tensors and plain values
        raise CheckpointError(f"{path} holds something other than tensors and plain values; refusing to load it "
                              f"({type(e).__name__})") from None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rng_state() -> dict:
    """Every RNG this rank draws from, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise CheckpointError("the checkpoint holds CUDA RNG states but no GPU is visible: the resume would "
                                  "not be exact")
        torch.cuda.set_rng_state_all(state["cuda"])
    elif torch.cuda.is_available():
        warnings.warn("the checkpoint was saved without a GPU: resuming on one, dropout draws differ from an "
                      "uninterrupted run", stacklevel=2)


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value

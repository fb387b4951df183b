"""Checkpoints: one training state saved whole, atomically, and restored exactly.

    <output_dir>/checkpoints/step_00000200/
        model.safetensors     full weights (tied weights once), written by rank zero
        optimizer.pt          optimizer state      } torch.save of tensors and plain values:
        scheduler.pt          LR scheduler state   } loaded with weights_only=True
        rank_00000.pt ...     each rank's RNG states and rank_state (its unreduced metric sums, stream position)
        trainer_state.json    the trainer's record (lmdist.resume: counters, data position, config, data
                              fingerprint, run id), its val_loss for keep_best, and the world size that saved it
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

The checkpointer knows the training objects only by their state: the model's full weights, the optimizer's
and scheduler's state dicts, each rank's own `rank_state` (tensors and plain values), and a JSON `record` it
stores as given and reads nothing of but `val_loss` (for keep_best) and `run_id` (to say where init_from's
weights come from).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import random
import shutil
import time
import warnings

import numpy as np
import torch
from safetensors.torch import load_file

from lmdist import sharding
from lmdist.engine import shared_from_main
from lmdist.errors import LmdistError, StorageError
from lmdist.files import agree_on_writes, save_safetensors, save_torch, write_json, writing

MANIFEST = "manifest.json"
STATE = "trainer_state.json"


class CheckpointError(LmdistError):
    """A checkpoint is missing, incomplete or does not match the run."""


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"step_{step:08d}")


# ----------------------------------------------------------------------------- saving

def save(accelerator, output_dir: str, step: int, *, model, optimizer, scheduler, rank_state: dict, record: dict,
         keep_last: int, keep_best: bool) -> tuple[str, float]:
    """Write a complete checkpoint of optimizer step `step` on every rank, then apply retention (`keep_last`,
    `keep_best`: see apply_retention); returns its folder and the seconds taken.

    `record` (JSON-ready) becomes trainer_state.json; its `val_loss` (this step's evaluation, or None) ranks the
    checkpoint for `keep_best`.
    """
    path = step_dir(output_dir, step)
    began = time.perf_counter()
    if shared_from_main(accelerator, _complete_or_cleared(path) if accelerator.is_main_process else None):
        return path, 0.0  # this very state is saved already (a stop request right after resuming from it)
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
                trainer_state = {**record, "world_size": accelerator.num_processes,
                                 "sharded": sharding.is_sharded(model)}  # sharded: for the record
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
                write_manifest(path, [os.path.basename(file) for file in written] + others, step)
                _fsync(os.path.dirname(path))
            apply_retention(os.path.dirname(path), keep_last, keep_best)
        except StorageError as error:
            failure = error
    agree_on_writes(accelerator, failure, path, remove_partial)
    return path, time.perf_counter() - began


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
    entries = sorted(step_folders(folder), reverse=True)
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


# ----------------------------------------------------------------------------- verifying and loading

def load(accelerator, path: str, *, model, optimizer, scheduler) -> list[dict]:
    """Restore model, optimizer, scheduler and this rank's RNG from the complete checkpoint `path`; returns the
    saved `rank_state`s this rank takes over: its own on as many processes as saved, otherwise (where the ranks
    no longer match) every saved rank's on rank zero and none elsewhere."""
    # Every rank reads the full state and keeps what it holds (its shards under FSDP).
    module = _training_module(accelerator, model)
    weights = _with_tied_copies(module, load_file(os.path.join(path, "model.safetensors")))
    sharding.load_full_state(module, optimizer, weights, _load_torch(path, "optimizer.pt"))
    scheduler.load_state_dict(_load_torch(path, "scheduler.pt"))
    if accelerator.scaler is not None and os.path.exists(os.path.join(path, "scaler.pt")):
        accelerator.scaler.load_state_dict(_load_torch(path, "scaler.pt"))
    rank, saved_world_size = accelerator.process_index, read_state(path)["world_size"]
    if accelerator.num_processes == saved_world_size:
        rank_state = _load_torch(path, f"rank_{rank:05d}.pt")
        _set_rng_state(rank_state.pop("rng"))
        return [rank_state]
    # Another world size: RNG states only for ranks that existed
    saved = [_load_torch(path, f"rank_{r:05d}.pt") for r in range(saved_world_size)]
    if rank < saved_world_size:
        _set_rng_state(saved[rank]["rng"])
    return [{k: v for k, v in state.items() if k != "rng"} for state in saved] if rank == 0 else []


def read_state(path: str) -> dict:
    """The trainer_state.json of the checkpoint `path`, once `verify` found the checkpoint complete."""
    verify(path)
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)


def load_state(module: torch.nn.Module, state: dict, source: str) -> dict:
    """Load weights `state` (read from `source`) into `module`: only tied copies may be missing, and every
    tensor must have its parameter's shape. Returns `state`."""
    expected = module.state_dict()
    wrong_shape = sorted(name for name, tensor in state.items()
                         if name in expected and tensor.shape != expected[name].shape)
    if wrong_shape:
        raise CheckpointError(f"{source} does not fit this model: {', '.join(wrong_shape[:5])} have other shapes "
                              f"(e.g. {wrong_shape[0]}: {tuple(state[wrong_shape[0]].shape)} in the file, "
                              f"{tuple(expected[wrong_shape[0]].shape)} in the model)")
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - _tied_aliases(module))
    if unexpected or missing:
        raise CheckpointError(f"{source} does not fit this model: missing {missing}, unexpected {sorted(unexpected)}")
    return state


def weights_origin(folder: str) -> str:
    """The step and run a checkpoint or a final/ export holds the weights of, where its records say."""
    try:
        if os.path.exists(os.path.join(folder, STATE)):  # a checkpoint: its manifest's step, its record's run
            with open(os.path.join(folder, MANIFEST)) as f:
                step = json.load(f)["step"]
            with open(os.path.join(folder, STATE)) as f:
                return f"checkpoint at step {step} of run {json.load(f)['run_id']}"
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

def _recorded_val_loss(path: str) -> float | None:
    try:
        with open(os.path.join(path, STATE)) as f:
            return json.load(f).get("val_loss")
    except (OSError, ValueError, AttributeError):  # a torn folder: it records nothing
        return None


def step_folders(folder: str) -> list[tuple[int, str]]:
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

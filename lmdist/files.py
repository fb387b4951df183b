"""Writing lmdist's outputs: atomically, with the process umask's modes, and one clear error when storage refuses.

Contracts:
- A file written with `atomic_open` (or the helpers built on it) is either whole at its final name or absent
  there: a failed write removes its temp file, and an older version of the file stays as it was.
- Every file gets the mode the process umask gives (0o666 & ~umask), like any other tool's output;
  safetensors alone would write 0600, hiding the weights from teammates.
- An OS refusal to write (disk full, quota, read-only filesystem, I/O error, permissions) becomes a
  `StorageError` naming the path and the OS error (exit status 74, sysexits' EX_IOERR); anything else keeps
  its traceback. Libraries that bury the OSError (torch.save's RuntimeError, safetensors' and tokenizers'
  Rust errors) are unwrapped by `lmdist.errors.os_error_of`.
- `make_output_dir` checks output_dir at start-up: a folder that cannot be created or written is a config
  problem (ConfigError, exit status 2); `lmdist.rundir.hold` calls it on rank zero and every rank refuses.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from lmdist.errors import ConfigError, LmdistError, StorageError, os_error_of, os_error_text


def _read_umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask alone must set one)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def file_mode() -> int:
    """The mode a new file gets under the process umask."""
    return 0o666 & ~_read_umask()


@contextmanager
def writing(path: str, *leftovers: str) -> Iterator[None]:
    """Turn an OS refusal inside the block into a StorageError naming `path`, after removing `leftovers`."""
    try:
        yield
    except BaseException as error:
        for leftover in leftovers:
            remove_quietly(leftover)
        if isinstance(error, LmdistError) or os_error_of(error) is None:
            raise
        raise StorageError.writing(path, error) from None


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary name to write to, moved onto `path` when the block ends (see the module's contract): for
    libraries that write a file by its name (safetensors, tokenizers)."""
    tmp = f"{path}.tmp"
    with writing(path, tmp):
        yield tmp
        os.replace(tmp, path)


@contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator:
    """A file object whose contents replace `path` when the block ends (see the module's contract)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_json(path: str, data: dict, indent: int | None = 2) -> str:
    with atomic_open(path) as f:
        json.dump(data, f, indent=indent, default=str)
        f.write("\n")
    return path


def write_json_in_place(path: str, data: dict) -> bool:
    """Write `path` over its old contents, for when storage refused write_json's temp file (a full disk): compact
    JSON written before truncating needs no new blocks while it fits in the old file's. False where that fails too
    (a read-only or vanished folder); a reader may then find it torn."""
    try:
        with open(path, "r+") as f:
            f.write(json.dumps(data, default=str) + "\n")
            f.truncate()
        return True
    except OSError:
        return False


def save_torch(obj, path: str) -> str:
    import torch

    # through a Python file object: torch.save on a path reports a full disk only as "unexpected pos"
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return path


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> str:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, file_mode())  # safetensors creates its file 0600
    return path


def agree_on_writes(accelerator, failure: StorageError | None, what: str,
                    cleanup: Callable[[], object] = lambda: None) -> None:
    """A barrier that raises on every rank when any rank's writes of `what` failed, after rank zero ran `cleanup`:
    a rank that leaves with its error must not leave the others waiting for it at the next collective."""
    import torch
    import torch.distributed as dist

    failed = torch.tensor([float(failure is not None)], device=accelerator.device)
    if dist.is_initialized():
        dist.all_reduce(failed)
    if not failed.item():
        return
    if accelerator.is_main_process:
        cleanup()
    raise failure or StorageError(f"another rank could not write its part of {what} (its message says why); fix "
                                  "the storage, then relaunch the same command")


def remove_quietly(path: str) -> None:
    """Remove a failed write's leftover, if any: on a broken disk that may fail too, and the error already says so."""
    with suppress(OSError):
        os.remove(path)


def make_output_dir(path: str) -> None:
    """Create output_dir and prove it writable, or raise a ConfigError saying what to fix."""
    if os.path.islink(path) and not os.path.exists(path):
        # not created on the user's behalf: a link to nowhere is most often a scratch filesystem not mounted
        raise ConfigError(f"--output_dir {path} is a symbolic link to {os.readlink(path)}, which does not exist "
                          "(an unmounted filesystem?): create its target, or choose another output_dir")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lmdist-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--output_dir {path} is not a writable folder ({os_error_text(error)}): fix it, or "
                          "choose another output_dir") from None

"""One live run per output_dir: an OS lock on `<output_dir>/run.lock`, held by rank zero for the whole run.

    hold(output_dir, accelerator)   every rank: returns once rank zero holds the lock; or every rank raises
                                    OutputDirInUse (exit 2) naming the holder (host, pid, Slurm job id), or
                                    OutputDirUnusable (exit 2) where output_dir cannot be written

The lock is `fcntl.flock` on an open file, so it dies with the process that holds it: a crashed or
SIGKILLed run, or a node that reboots, never blocks its own relaunch, and there is no stale lock to
remove by hand (forked children, such as DataLoader workers, close their copy). Workers left
training by a killed launcher still hold it, and a relaunch is refused until they are gone: that is
the point. Call it after the process group exists and before anything
reads or writes the run's state (run.json, config.yaml, metrics.jsonl, tokenizer/, checkpoints): a
refused launch writes nothing in output_dir, and never reads another run's half-written state.

The holder writes who it is (JSON) into the lock file once it holds the lock; the file itself stays
after the run, which is harmless: only a held lock counts, never the file's existence.

Network filesystems: on Linux NFS (v3 with lockd, v4) flock is emulated with POSIX byte-range locks
that the server arbitrates across clients; a crashed client's lock is released when its lease expires
(NFSv4: about 90 s), so a relaunch on another node may be refused for that long. Lustre honours it
across nodes only when mounted with `-o flock`; with `localflock` it is per node, and with `noflock`
flock fails. Where the filesystem cannot lock at all, the run goes on unlocked with a
warning saying so.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import sys
import time

from lmdist.engine import shared_from_main
from lmdist.errors import STORAGE_ERRNOS, ConfigError, LmdistError, StorageError
from lmdist.files import make_output_dir
from lmdist.stopping import slurm_job_id

LOCK_FILE = "run.lock"

_held: dict[str, int] = {}  # output_dir (real path) -> the file descriptor whose lock this process holds


class OutputDirInUse(LmdistError):
    """Another live process holds this output_dir."""

    label = "output_dir in use"


class OutputDirUnusable(LmdistError):
    """output_dir cannot be created or written (read-only, a dangling link, no permission)."""


def acquire(output_dir: str) -> str | None:
    """Take the lock for this process, without waiting; None once held, else a description of the holder.

    Raises OSError where the filesystem cannot lock (see the module docstring).
    """
    key = os.path.realpath(output_dir)
    if key in _held:
        return None
    path = os.path.join(output_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies; O_CLOEXEC: exec-ed commands never hold it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return describe_holder(path)
    except OSError:
        os.close(fd)
        raise
    _held[key] = fd
    # A forked child (a DataLoader worker) shares the lock: its copy is closed, so that the lock still dies
    # with this process and not with the last of its children.
    os.register_at_fork(after_in_child=lambda: _forget(key))
    holder = {"host": platform.node(), "pid": os.getpid(), "slurm_job_id": slurm_job_id(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": [sys.executable, *sys.orig_argv[1:]]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return None


def _forget(key: str) -> None:
    """In a forked child: close its copy of the lock's descriptor (the parent's lock stays held)."""
    fd = _held.pop(key, None)
    if fd is not None:
        os.close(fd)


def describe_holder(lock_path: str) -> str:
    """'host H, pid P, Slurm job J, since T' from the lock file (what the holder wrote)."""
    try:
        with open(lock_path) as f:
            holder = json.loads(f.read())
    except (OSError, ValueError):  # the holder took the lock a moment ago and is writing its name
        return "a process that is just starting"
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('since')}"


def hold(output_dir: str, accelerator) -> None:
    """Every rank: return once rank zero holds output_dir's lock, or raise the same error on every rank:
    OutputDirInUse naming the holder, or OutputDirUnusable where output_dir cannot be created or opened."""
    verdict, warning = None, None  # verdict: (error class, message) for every rank
    if accelerator.is_main_process:
        lock_path = os.path.join(output_dir, LOCK_FILE)
        try:
            make_output_dir(output_dir)
            holder = acquire(output_dir)
            if holder is not None:
                verdict = (OutputDirInUse, f"{output_dir} is held by a live run ({holder}): wait for it to end or "
                                           "stop it, or choose another output_dir")
        except ConfigError as e:  # cannot be created or written: nothing of the run could be written either
            verdict = (OutputDirUnusable, str(e))
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                warning = (f"warning: cannot lock {lock_path} ({e.strerror}): this filesystem has no working flock "
                           "(Lustre: mount with -o flock), so nothing stops a second launch into this output_dir")
            elif e.errno in STORAGE_ERRNOS:  # a full disk lets the probe's empty file through, not the holder's name
                verdict = (StorageError, str(StorageError.writing(lock_path, e)))
            else:  # as make_output_dir would say it, but on every rank: none is left waiting at the broadcast
                verdict = (OutputDirUnusable, f"cannot write {e.filename or lock_path} ({e.strerror}): choose an "
                                              "output_dir this user can write, or fix its permissions")
    verdict = shared_from_main(accelerator, verdict)
    if warning:
        accelerator.print(warning)
    if verdict is not None:
        kind, message = verdict
        raise kind(message)

"""Errors a user can fix, and the exit statuses that report them.

Anything raised as `LmdistError` is the user's to fix (bad config, missing data): the command prints
one message, no traceback, and exits with the error's status. Storage refusing a write (disk full,
read-only, I/O error) is reported the same way wherever it surfaces, as a `StorageError`. A reader that
closes stdout early (`lmdist fields | head`) ends the command quietly. Anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import errno
import faulthandler
import gc
import os
import re
import select
import signal
import sys
import warnings
from collections.abc import Callable

EXIT_BAD_INPUT = 2
EXIT_STORAGE = 74  # sysexits.h EX_IOERR, beside EX_TEMPFAIL (75): stopped, relaunch
EXIT_STOPPED = 75  # stopped on request (lmdist.stopping); job scripts relaunch on it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away
# OS errors that mean "storage refused" wherever they escape from (a library's own write, say)
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


class LmdistError(Exception):
    """An error with a message written for the user, reported as `lmdist: <label>: <message>`; `exit_code` is the
    process exit status and `status` run.json's."""

    exit_code = EXIT_BAD_INPUT
    status = "failed"
    label = "error"


class UnexpectedError(Exception):
    """Any other exception as a run reports it: a bug, so run.json says failed with Python's own exit status for an
    uncaught exception, and `error`, the original, keeps its traceback."""

    exit_code = 1
    status = "failed"

    def __init__(self, error: BaseException):
        super().__init__(str(error) or type(error).__name__)
        self.error = error


class ConfigError(LmdistError):
    """A config field is unknown, mistyped or impossible."""


class DataError(LmdistError):
    """The data cannot be found, read or turned into training batches."""


class LaunchError(LmdistError):
    """The launcher's environment and the processes Accelerate sees disagree."""


class StorageError(LmdistError):
    """Storage refused a write during the run (disk full, quota, read-only filesystem, I/O error).

    Its own status, not 2 (the config is fine) nor 75 (a wrapper that relaunches at once would fail again)."""

    exit_code = EXIT_STORAGE

    @classmethod
    def writing(cls, path: str | None, error: BaseException) -> StorageError:
        cause = os_error_of(error)
        what = os_error_text(cause) if cause else str(error)
        return cls(f"cannot write {path or 'a file'}: {what}; free space or fix the filesystem, then relaunch the "
                   "same command: it continues from the last complete checkpoint")


def os_error_of(error: BaseException) -> OSError | None:
    """The OS error behind `error`: itself, one it was raised from or during (torch.save's RuntimeError), or the
    errno in a message: a Rust library's (safetensors, tokenizers: "... (os error 28)") or shutil.copytree's, which
    gathers its files' errors as text ("[Errno 28] No space left on device")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error
        code = re.search(r"\(os error (\d+)\)|\[Errno (\d+)\]", str(error))
        if code:
            number = int(code.group(1) or code.group(2))
            return OSError(number, os.strerror(number))
        error = error.__cause__ or error.__context__
    return None


def os_error_text(error: OSError) -> str:
    """'[Errno 28] No space left on device': an OSError's number and reason, without the filename it may carry."""
    return f"[Errno {error.errno}] {error.strerror}" if error.errno else str(error)


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message ('' for none): a library's multi-line message, kept to one console line."""
    text = str(error)
    return text.splitlines()[0] if text else ""


def as_user_error(error: BaseException) -> LmdistError | UnexpectedError:
    """`error` as the command reports it: an LmdistError (a storage refusal that escaped unconverted becomes a
    StorageError), else an UnexpectedError around it."""
    if isinstance(error, LmdistError):
        return error
    cause = os_error_of(error)
    if cause is not None and cause.errno in STORAGE_ERRNOS:
        return StorageError.writing(cause.filename, cause)
    return UnexpectedError(error)


def run_cli(main: Callable[[], object]) -> None:
    """Call `main()`; turn an `LmdistError` into its message on stderr and its exit status.

    Every rank prints the message (prefixed by its rank when there are several), so the reason
    is visible whichever rank's log a user opens. A rank killed by a fatal signal (SIGSEGV, SIGABRT)
    prints every thread's Python stack first.
    """
    if not faulthandler.is_enabled() and sys.__stderr__ is not None:
        faulthandler.enable(sys.__stderr__)
    warnings.formatwarning = one_line_warning
    try:
        quiet_broken_pipe(main)
        # Free the run's Arrow-backed datasets while the interpreter is whole: Arrow's native threads
        # torn down during interpreter finalization can abort an exit that had succeeded
        # ("terminate called without an active exception": apache/arrow#34314, huggingface/datasets#7566).
        gc.collect()
        _close_process_group()
    except SystemExit:  # a stop signal during start-up: leave the process group as an error exit does
        _close_process_group()
        raise
    except Exception as raised:
        error = as_user_error(raised)
        if isinstance(error, UnexpectedError):
            raise
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        where = f"[rank {os.environ.get('RANK', '?')}] " if world > 1 else ""
        say_whole_line(f"lmdist: {error.label}: {where}{error}")
        _close_process_group()
        sys.exit(error.exit_code)


def one_line_warning(message, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    """A Python warning as one line: lmdist's own as `warning: ...`, another library's with where it came from,
    instead of Python's two lines that echo the warning's source line."""
    text = " ".join(str(message).split())
    if f"{os.sep}lmdist{os.sep}" in filename:
        return f"warning: {text}\n"
    return f"warning: {text} ({category.__name__}, {filename}:{lineno})\n"


def say_whole_line(message: str) -> None:
    """`message` on stderr in one write: the ranks of a launch share one stderr, and a pipe keeps a write of up to
    PIPE_BUF (4 KiB) bytes whole, where print's pieces could interleave with another rank's message."""
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr without a descriptor (captured, replaced)
        print(message, file=sys.stderr, flush=True)
        return
    data = (message + "\n").encode(errors="backslashreplace")
    while data:
        data = data[os.write(fd, data):]


def quiet_broken_pipe(main: Callable[[], object]) -> None:
    """Call `main()`; if its reader closed stdout (`... | head`), exit with status 141 and no traceback.

    The Python docs' recipe (library/signal, "Note on SIGPIPE"), but only when stdout really is the closed
    pipe: a broken pipe to a DataLoader worker is a failure and keeps its traceback."""
    try:
        main()
        sys.stdout.flush()  # here, not at interpreter exit, where the error would be printed
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush writes nowhere
        sys.exit(EXIT_BROKEN_PIPE)


def _stdout_closed() -> bool:
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout
        return False


def stop_during_startup() -> None:
    """Until training installs its own handlers (lmdist.stopping.StopGuard), a stop signal (SIGTERM, SIGINT,
    SIGUSR1) ends the launch at once with a message and EXIT_STOPPED.

    Nothing has been trained yet, so nothing is lost; EXIT_STOPPED, not EXIT_BAD_INPUT: the config is fine, and job
    scripts relaunch on 75, which continues the run. A SystemExit, not an LmdistError: the signal may come during
    the imports (seconds of them), before run_cli is there to catch anything."""
    def stop(signum, frame) -> None:
        say_whole_line(f"lmdist: stopped: {signal.Signals(signum).name} during start-up, before any training step of "
                       "this launch: nothing was trained or saved; relaunch the same command to continue")
        sys.exit(EXIT_STOPPED)

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def _close_process_group() -> None:
    """Leave the process group cleanly so that an error exit does not also print gloo/NCCL noise. A command that
    never imported torch (`lmdist prepare`) has none, and must not pay seconds to import it here."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

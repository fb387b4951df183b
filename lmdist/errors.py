"""Errors a user can fix, and the exit statuses that report them.

Anything raised as `LmdistError` is the user's to fix (bad config, missing data): the command prints
one message, no traceback, and exits with the error's status. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import faulthandler
import gc
import os
import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2


class LmdistError(Exception):
    """An error with a message written for the user; `exit_code` is the process exit status."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(LmdistError):
    """A config field is unknown, mistyped or impossible."""


class DataError(LmdistError):
    """The data cannot be found, read or turned into training batches."""


class LaunchError(LmdistError):
    """The launcher's environment and the processes Accelerate sees disagree."""


def run_cli(main: Callable[[], object]) -> None:
    """Call `main()`; turn an `LmdistError` into its message on stderr and its exit status.

    Every rank prints the message (prefixed by its rank when there are several), so the reason
    is visible whichever rank's log a user opens. A rank killed by a fatal signal (SIGSEGV, SIGABRT)
    prints every thread's Python stack first.
    """
    if not faulthandler.is_enabled() and sys.__stderr__ is not None:
        faulthandler.enable(sys.__stderr__)
    try:
        main()
        # Free the run's Arrow-backed datasets while the interpreter is whole: Arrow's native threads
        # torn down during interpreter finalization can abort an exit that had succeeded
        # ("terminate called without an active exception": apache/arrow#34314, huggingface/datasets#7566).
        gc.collect()
        _close_process_group()
    except LmdistError as error:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        where = f"[rank {os.environ.get('RANK', '?')}] " if world > 1 else ""
        print(f"lmdist: {getattr(error, 'label', 'error')}: {where}{error}", file=sys.stderr, flush=True)
        _close_process_group()
        sys.exit(error.exit_code)


def _close_process_group() -> None:
    """Leave the process group cleanly so that an error exit does not also print gloo/NCCL noise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

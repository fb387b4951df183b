"""Stopping together: signals and non-finite numbers, agreed by every rank once per optimizer step.

Any rank may be the one a signal reaches (torchrun's launcher dies on SIGUSR1 without telling its
workers; a Slurm batch shell may reach only some processes). Each rank records what it received;
`check()` sums every rank's flags with ONE small all-reduce per optimizer step -- the only host
sync of the loop -- so all ranks stop at the same step. The same check catches a non-finite loss or
gradient norm on any rank before the optimizer applies it.

    SIGUSR1  (Slurm's warning before a time limit or preemption) -> checkpoint, requeue under Slurm, exit 75
    SIGTERM  (scancel, Slurm preemption), SIGINT (Ctrl-C)        -> checkpoint, exit 75
    any of these before the StopGuard exists (start-up)          -> a message, exit 75 (lmdist.errors)
    a NaN or inf                                                  -> exit 3, nothing saved
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmdist.errors import EXIT_STOPPED, LmdistError

EXIT_NONFINITE = 3
SIGNAL_LEAD_S = 60  # Slurm's default time between --signal and the kill: a save must fit in it
MAX_SKIPPED_STEPS = 20  # fp16: the scaler skips overflowing steps; this many in a row means divergence


class NonFiniteError(LmdistError):
    """A NaN or inf in the loss or the gradient norm: nothing non-finite was saved."""

    exit_code = EXIT_NONFINITE
    status = "non-finite"


class Stopped(LmdistError):
    """Not a failure: training stopped on request after saving a checkpoint."""

    exit_code = EXIT_STOPPED
    label = status = "stopped"


@dataclass
class Verdict:
    nonfinite: str | None = None  # "loss" or "gradient norm" when any rank saw a NaN or inf
    stop_signal: str | None = None  # the signal that asked for the stop, as a name
    requeue: bool = False


SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)  # the order of their flags


class StopGuard:
    """Installs the signal handlers and runs the per-step agreement between ranks."""

    def __init__(self, use_scaler: bool):
        self.use_scaler = use_scaler
        self.received = torch.zeros(len(SIGNALS), dtype=torch.float64)  # host side: handlers only set it
        self.skipped = 0
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the save happens at the next step boundary, and a second signal changes nothing.
        self.received[SIGNALS.index(signum)] = 1

    def check(self, grad_norm: torch.Tensor, loss_sums: torch.Tensor) -> Verdict:
        """All ranks' signals and non-finite flags, summed in one all-reduce; call before optimizer.step().

        `loss_sums`: sums of the losses since the last check (the training meter's running sums, which this
        check has kept finite until now). A sum is finite exactly when all its terms are, and stays so across
        ranks, so the losses and gradient norms are summed as they are and tested on the host after the sync."""
        flags = torch.cat([grad_norm.reshape(1), loss_sums, self.received.to(loss_sums.device)])
        if dist.is_initialized():  # directly: this runs every step, and Accelerate's reduce adds a clone and checks
            dist.all_reduce(flags)
        norm_sum, *sums, usr1, term, interrupt = flags.tolist()
        nonfinite = None
        if not self.use_scaler:  # with fp16 an overflow is the scaler's business
            nonfinite = ("loss" if not all(map(math.isfinite, sums)) else
                         "gradient norm" if not math.isfinite(norm_sum) else None)
        name = "SIGUSR1" if usr1 else "SIGTERM" if term else "SIGINT" if interrupt else None
        return Verdict(nonfinite=nonfinite, stop_signal=name, requeue=bool(usr1))

    def after_step(self, optimizer) -> None:
        """fp16: count consecutive steps the gradient scaler skipped; too many is a divergence."""
        if not self.use_scaler:
            return
        self.skipped = self.skipped + 1 if getattr(optimizer, "step_was_skipped", False) else 0
        if self.skipped >= MAX_SKIPPED_STEPS:
            raise NonFiniteError(f"the fp16 gradient scaler skipped {self.skipped} optimizer steps in a row: "
                                 "the loss is diverging; lower lr or use bf16")


def nonfinite_error(what: str, step: int) -> NonFiniteError:
    return NonFiniteError(f"non-finite {what} at optimizer step {step} on at least one rank; every rank stopped "
                          "before the optimizer step and nothing non-finite was saved (lower lr, check the data)")


def slurm_job_id() -> str | None:
    """This Slurm job's id (an array job's task as <array job>_<task>), or None outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return job


def requeue_slurm_job() -> str | None:
    """`scontrol requeue` this job (array jobs by their own task id); returns the id, or None outside Slurm."""
    job = slurm_job_id()
    if not job:
        return None
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    return job

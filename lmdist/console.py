"""Rank zero's console: what a person watching a run reads, on a terminal or in a log file.

    step 150/1000 | epoch 0.15 | loss 2.134 | val loss 2.210 ppl 9.12 acc 41.2% | lr 3.00e-04 | 12,345 tok/s
        | MFU 38.9% | ETA 4m12s      (one line)

A log line carries what tells the story of a run -- the step, epoch, losses, the validation numbers when
it evaluated, the learning rate, throughput with separators, MFU as a percent and the time left -- and
nothing else: every key stays in metrics.jsonl and the trackers. On a terminal rank zero draws a tqdm
bar whose postfix is only the training loss, so that it keeps a usable width on 80 columns; rows with
validation numbers are printed above it as lines. When stderr is not a terminal (Slurm logs, `nohup`,
a pipe) every row is a plain line and nothing uses carriage returns. Other ranks print nothing.

ETA is this launch's wall time per step since its first step (evaluations and checkpoints included)
times the steps left; the bar's own estimate is tqdm's.
"""
from __future__ import annotations

import sys
import time

# The row keys a line shows, as (key, label); everything else is for the files and dashboards.
VAL_KEYS = (("val/loss", "loss"), ("val/ppl", "ppl"), ("val/acc", "acc"))


class Console:
    """Rank zero's progress bar (on a terminal) or plain lines (otherwise)."""

    def __init__(self, enabled: bool, total_steps: int, initial_step: int = 0):
        self.enabled, self.total_steps = enabled, total_steps
        self.step = initial_step
        self.first_step: tuple[int, float] | None = None  # (step, time) after this launch's first step
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def advance(self, steps: int = 1) -> None:
        self.step += steps
        if self.first_step is None:  # the first step of a launch holds its start-up (compilation, warm caches)
            self.first_step = (self.step, time.monotonic())
        if self.bar is not None:
            self.bar.update(steps)

    def eta_seconds(self) -> float | None:
        """Seconds left at this launch's pace since its first step; None before there is a pace."""
        if self.first_step is None or self.step <= self.first_step[0]:
            return None
        per_step = (time.monotonic() - self.first_step[1]) / (self.step - self.first_step[0])
        return per_step * (self.total_steps - self.step)

    def log(self, row: dict) -> None:
        """A metrics row: the bar's postfix on a terminal (rows with validation numbers as a line), else a line."""
        if not self.enabled:
            return
        if self.bar is not None and "val/loss" not in row:
            if "train/loss" in row:
                self.bar.set_postfix_str(f"loss {row['train/loss']:.4g}", refresh=False)
            return
        self.print(format_line(row, self.total_steps, self.eta_seconds()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None  # what follows the run (W&B, the final line) prints as lines


def format_line(row: dict, total_steps: int, eta: float | None = None) -> str:
    """The line of a metrics row (see the module docstring)."""
    parts = [f"step {row['step']}/{total_steps}"]
    if "epoch" in row:
        parts.append(f"epoch {row['epoch']:.3g}")
    if "train/loss" in row:
        parts.append(f"loss {row['train/loss']:.4g}")
    if "val/loss" in row:
        parts.append("val " + " ".join(f"{label} {_value(key, row[key])}" for key, label in VAL_KEYS if key in row))
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    if "tokens_per_sec" in row:
        parts.append(f"{row['tokens_per_sec']:,.0f} tok/s")
    if "mfu" in row:
        parts.append(f"MFU {row['mfu']:.1%}")
    if eta is not None and row["step"] < total_steps:
        parts.append(f"ETA {duration(eta)}")
    return " | ".join(parts)


def format_final(row: dict, steps: int, seconds: float) -> str:
    """The run's last line: where it ended, how long this launch took, and its final metrics."""
    parts = [f"done: step {steps} in {duration(seconds)}"]
    if "train/loss" in row:
        parts.append(f"loss {row['train/loss']:.4g}")
    if "val/loss" in row:
        parts.append("val " + " ".join(f"{label} {_value(key, row[key])}" for key, label in VAL_KEYS if key in row))
    return " | ".join(parts)


def _value(key: str, value: float) -> str:
    if key.endswith("/acc"):
        return f"{value:.1%}"
    return f"{value:,.0f}" if value >= 10_000 else f"{value:.4g}"  # a perplexity of 12,345, not 1.234e+04


def duration(seconds: float) -> str:
    """4s, 3m05s, 2h07m, 3d04h: two units at most, as a person says it."""
    seconds = max(0, round(seconds))
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    if days:
        return f"{days}d{h:02d}h"
    if hours:
        return f"{hours}h{m:02d}m"
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"

"""Time to the first optimizer step, and anonymous memory, of a train.py launch (bench/run.py's data section).

    LMDIST_BENCH_STARTED=<time.time() at spawn> python bench/launch_probe.py OUT.json STOP_AT TRAIN_FLAGS...

Runs train.py's `main` in this process with one probe on lmdist.run.Run.micro_step_done. At this launch's first
optimizer step it notes the seconds since the launch began (the parent's clock when it spawned this process, so
the interpreter's start and every import count). At step STOP_AT (this launch's first step when 0) it reads
RssAnon and RssFile from /proc/self/status -- anonymous memory is the process's own; file-backed pages of the
memory-mapped token shards belong to the page cache -- and sends itself SIGTERM: a preemption, so the run saves a
checkpoint and exits 75, and a launch of the same command resumes it. OUT.json: {first_step,
seconds_to_first_step, stopped_at, rss_anon_mb, rss_file_mb}.
"""
from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def main(out_path: str, stop_at: int, train_args: list[str]) -> None:
    started = float(os.environ.get("LMDIST_BENCH_STARTED", time.time()))
    train = runpy.run_path(TRAIN)  # defines main() without running it (not __main__)
    import lmdist.run

    done_step, found = lmdist.run.Run.micro_step_done, {}

    def probed(self) -> bool:
        completed = done_step(self)
        if completed and not found:
            found.update(first_step=self.progress.step, seconds_to_first_step=time.time() - started)
        if completed and self.progress.step == (stop_at or found["first_step"]) and "stopped_at" not in found:
            found.update(stopped_at=self.progress.step, rss_anon_mb=status_mb("RssAnon"),
                         rss_file_mb=status_mb("RssFile"))
            os.kill(os.getpid(), signal.SIGTERM)
        if completed and len(found) in (2, 5):
            with open(out_path, "w") as f:
                json.dump(found, f)
        return completed

    lmdist.run.Run.micro_step_done = probed
    from lmdist.errors import run_cli

    run_cli(lambda: train["main"](train_args))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])

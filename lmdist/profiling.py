"""`--profile_steps N`: torch.profiler over N optimizer steps, on every rank, written to output_dir/profile/.

Each rank writes `trace_rank{R}.json.gz` (open it in https://ui.perfetto.dev or chrome://tracing) and
`ops_rank{R}.txt`: the window's wall time per step, how busy the GPU was, and the ops that took the most
device time (CPU time on a CPU). The window starts after `profile_start` steps of this launch, so that
compilation, autotuning and allocator warm-up stay out of it; the profiler is off everywhere else.
"""
from __future__ import annotations

import gzip
import json
import os
from types import TracebackType

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from lmdist.config import TrainConfig

TABLE_ROWS = 40


class StepProfiler:
    """A context manager around the training loop; call `step()` after each optimizer step."""

    def __init__(self, cfg: TrainConfig, device: torch.device, rank: int):
        self.folder, self.rank = os.path.join(cfg.output_dir, "profile"), rank
        self.on_gpu = device.type == "cuda"
        self.profiler = None
        if cfg.profile_steps:
            self.profiler = torch.profiler.profile(
                activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if self.on_gpu else [])],
                # one warm-up step: the profiler's own start-up stays out of the recorded steps
                schedule=torch.profiler.schedule(wait=max(cfg.profile_start - 1, 0), warmup=1,
                                                 active=cfg.profile_steps, repeat=1),
                on_trace_ready=self._write, record_shapes=True)

    def __enter__(self) -> StepProfiler:
        if self.profiler:
            self.profiler.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None):
        if self.profiler:
            self.profiler.stop()  # a run shorter than the window writes what it recorded

    def step(self) -> None:
        if self.profiler:
            self.profiler.step()

    def _write(self, profiler: torch.profiler.profile) -> None:
        os.makedirs(self.folder, exist_ok=True)
        trace = os.path.join(self.folder, f"trace_rank{self.rank}.json.gz")
        profiler.export_chrome_trace(trace)
        # ProfilerStep#N (or ProfilerStep*, by torch version) marks each step on the host, and again on the GPU
        steps = [e for e in profiler.events() if e.name.startswith("ProfilerStep") and e.device_type == DeviceType.CPU]
        lines = [f"rank {self.rank}: {len(steps)} optimizer steps profiled"]
        if steps:
            wall_us = max(e.time_range.end for e in steps) - min(e.time_range.start for e in steps)
            lines[0] += f", {wall_us / 1e3 / len(steps):.2f} ms per step (host wall time)"
        if self.on_gpu:
            busy, span = busy_time(device_work(trace))
            if span:
                lines.append(f"GPU busy {busy / span:.1%} of the {span / 1e3:.1f} ms from its first kernel to its "
                             f"last; idle {(span - busy) / 1e3 / max(len(steps), 1):.2f} ms per step")
        sort_by = "self_device_time_total" if self.on_gpu else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS, max_name_column_width=70)
        with open(os.path.join(self.folder, f"ops_rank{self.rank}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n\n" + table + "\n")


def device_work(trace: str) -> list[tuple[float, float]]:
    """(start, end) in µs of every kernel, copy and memset in a Chrome trace; not the GPU-side annotations,
    which span whole steps and graphs, gaps included."""
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def busy_time(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(time covered by the union of the intervals, time from the first start to the last end)."""
    ordered = sorted(intervals)
    busy, reached = 0.0, float("-inf")
    for start, end in ordered:
        if end > reached:
            busy += end - max(start, reached)
            reached = end
    return busy, (reached - ordered[0][0]) if ordered else 0.0

"""`--profile_steps`: torch.profiler over chosen optimizer steps, per rank, and the GPU-idle arithmetic."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmdist.profiling import busy_time, device_work
from tests.conftest import TINY_GPT, run_ok, with_flags


def test_busy_time_is_the_union_of_overlapping_intervals():
    assert busy_time([(5, 6), (0, 2), (1, 3)]) == (4, 6)  # [0, 3] and [5, 6] covered, from 0 to 6
    assert busy_time([(0, 10), (2, 3)]) == (10, 10)
    assert busy_time([]) == (0.0, 0.0)


def test_device_work_is_kernels_copies_and_memsets_not_annotations(tmp_path):
    trace = tmp_path / "trace.json.gz"
    events = [{"cat": "kernel", "ts": 0, "dur": 4}, {"cat": "gpu_memcpy", "ts": 10, "dur": 1},
              {"cat": "gpu_memset", "ts": 12, "dur": 1},
              {"cat": "gpu_user_annotation", "ts": 0, "dur": 20},  # a whole step on the GPU, gaps included
              {"cat": "cpu_op", "ts": 0, "dur": 30}, {"ph": "M", "name": "process_name"}]
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert device_work(str(trace)) == [(0, 4), (10, 11), (12, 13)]
    assert busy_time(device_work(str(trace))) == (6, 13)


@pytest.mark.launch
def test_profile_steps_writes_a_trace_and_a_table_per_rank(tmp_path):
    out = tmp_path / "run"
    run_ok(with_flags([*TINY_GPT, "--output_dir", str(out)], "--max_steps", "6", "--profile_steps", "2",
                      "--profile_start", "3", "--log_every", "3"), cwd=tmp_path, nproc=2, launcher="torchrun")
    for rank in (0, 1):
        table = (out / "profile" / f"ops_rank{rank}.txt").read_text()
        assert table.startswith(f"rank {rank}: 2 optimizer steps profiled, ") and "ms per step" in table
        assert "aten::mm" in table and "Self CPU" in table  # the op table, by host time on a CPU
        with gzip.open(out / "profile" / f"trace_rank{rank}.json.gz", "rt") as f:
            names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
        # steps 4 and 5 of 6 (the profiler counts from 0): the three before it and the last are not recorded
        assert {n for n in names if n.startswith("ProfilerStep")} == {"ProfilerStep#3", "ProfilerStep#4"}
        assert any("gloo" in n or "all_reduce" in n for n in names), "the ranks' gradient all-reduce is in it"
    assert sorted(p.name for p in (out / "profile").iterdir()) == [
        "ops_rank0.txt", "ops_rank1.txt", "trace_rank0.json.gz", "trace_rank1.json.gz"]
    assert not list(Path(tmp_path).glob("*.json")), "nothing written outside output_dir"

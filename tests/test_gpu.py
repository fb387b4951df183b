"""CUDA: bf16 on one GPU and FSDP's checkpoint, resume and export path through Accelerate's own FSDP2.

Skipped where torch sees no GPU (CI has none); on a GPU machine `pytest tests/test_gpu.py` runs them.
GPU kernels (cuBLAS split-K, flash attention's backward) are not bitwise reproducible between processes,
so runs are compared within a tolerance here, where the CPU tests demand bitwise equality.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from lmdist import perf
from tests.conftest import (
    TINY_GPT,
    final_weights,
    launch_command,
    launch_env,
    read_metrics,
    read_run,
    run_ok,
    wait_for_step,
    with_flags,
)

SINGLE_GPU_YAML = {"launcher": "accelerate-config", "config": "single_gpu.yaml"}  # one process
FSDP_YAML = {"launcher": "accelerate-config", "config": "fsdp.yaml"}
pytestmark = [pytest.mark.launch,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_data(markov, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("gpu_data")
    (folder / "train.txt").write_text(markov.sample(5_900, seed=11) + "\n")  # 23 steps of 8 sequences
    (folder / "val.txt").write_text(markov.sample(300, seed=12) + "\n")
    return ["--dataset", str(folder / "train.txt"), "--val_dataset", str(folder / "val.txt")]


def gpu_args(gpu_data: list[str], output_dir: Path, *overrides: str) -> list[str]:
    return with_flags([*gpu_data, *TINY_GPT], "--batch_size", "8", "--epochs", "2", "--max_steps", "40",
                      "--save_every", "5", "--eval_every", "10", "--wandb_mode", "disabled",
                      "--output_dir", str(output_dir), *overrides)


def losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(output_dir) if "train/loss" in r}


def test_bf16_on_one_gpu_reports_the_datasheet_mfu_and_gpu_memory(gpu_data, tmp_path):
    out = tmp_path / "run"
    run_ok(gpu_args(gpu_data, out), tmp_path, **SINGLE_GPU_YAML, timeout=600)
    facts = read_run(out)
    assert facts["device"].startswith("cuda") and facts["mixed_precision"] == "bf16", facts
    known = perf.datasheet_peak(torch.cuda.get_device_name())
    if known:  # an H100/H200/A100...: mfu against the card's dense bf16 rate, not a measurement
        assert facts["peak_flops_per_process"] == known.flops and "datasheet" in facts["peak_flops_source"]
    rows = [r for r in read_metrics(out) if "train/loss" in r]
    assert all(r["peak_gpu_mb"] > 0 and 0 < r["mfu"] < 1 and r["tokens_per_sec"] > 0 for r in rows), rows[-1]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.3, "bf16 on the GPU learns"
    assert math.isfinite([r for r in read_metrics(out) if "val/loss" in r][-1]["val/loss"])


def test_fsdp_bf16_on_gpu_resumes_after_sigterm_like_the_uninterrupted_run(gpu_data, tmp_path):
    straight = tmp_path / "straight"
    run_ok(gpu_args(gpu_data, straight), tmp_path, **FSDP_YAML, timeout=600)
    assert read_run(straight)["distributed_type"] == "FSDP" and read_run(straight)["device"].startswith("cuda")
    out = tmp_path / "run"
    process = subprocess.Popen(launch_command(gpu_args(gpu_data, out), **FSDP_YAML),
                               cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    wait_for_step(out, 12, process, timeout=300)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert "lmdist: stopped" in stderr, stderr[-3000:]
    run_ok(gpu_args(gpu_data, out), tmp_path, **FSDP_YAML, timeout=600)

    resumed = [r["resumed_from"] for r in read_metrics(out) if "resumed_from" in r]
    assert len(resumed) == 1 and 10 <= resumed[0] < 40
    want, got = losses(straight), losses(out)
    assert got.keys() == want.keys() == set(range(1, 41))
    assert all(abs(got[s] - want[s]) <= 0.02 * want[s] for s in want), {s: (got[s], want[s]) for s in want}
    a, b = final_weights(out), final_weights(straight)  # full tensors keyed by parameter name, not shards
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    squared = lambda tensors: sum(t.float().norm() ** 2 for t in tensors)  # noqa: E731
    drift = math.sqrt(squared(a[k] - b[k] for k in a) / squared(b.values()))
    assert drift < 0.02, f"resumed weights differ from the uninterrupted run's by {drift:.3f} (relative)"

"""One model, whatever the launch: world sizes, accumulation and launchers all train the same weights."""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import faults
from tests.conftest import (
    EQUIVALENCE_PEAK_TFLOPS,
    REPO,
    TINY_GPT,
    equivalence_args,
    final_weights,
    launch,
    read_metrics,
    read_run,
    run_ok,
    run_on_terminal,
)

pytestmark = pytest.mark.launch


def losses_by_step(output_dir) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in read_metrics(output_dir) if "train/loss" in row}


def assert_same_training(run, reference, rtol=1e-5, weights_rtol=None):
    """Per-step train/loss to rtol, and every parameter tensor to weights_rtol (default 10 x rtol) in norm:
    ||a - b|| <= weights_rtol ||b||.

    (Element-wise rtol is meaningless for weights near zero: Adam divides their rounding noise by an
    equally tiny second moment.) The weights get the wider tolerance because 16 Adam steps amplify a
    gradient's rounding (summed in another order by another micro-batch size) where the losses do not:
    micro-batches of 2 moved the equivalence GPT's weights by 1.6e-5 here and 1.1e-5 on an AVX-512 runner,
    batches of 4 or 8 by 1e-6, while every per-step loss stayed within 2e-7. Another batch order moves the
    losses by 3e-4 from step 2 and the median parameter by 3e-1, far outside both.
    """
    weights_rtol = 10 * rtol if weights_rtol is None else weights_rtol
    got, want = losses_by_step(run), losses_by_step(reference)
    assert len(want) >= 10 and sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=rtol)
    a, b = final_weights(run), final_weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        difference = (a[name] - b[name]).norm().item()
        assert difference <= weights_rtol * b[name].norm().item(), f"parameter {name} differs by {difference:.2e}"


@pytest.mark.parametrize("name", ["torchrun_b4", "accelerate_b2x2", "config_b4"])
def test_two_ranks_train_the_one_process_model(equivalence_runs, name):
    """2 ranks x batch b (x grad_accum) == 1 process x the same global batch: per-step loss and final weights."""
    run, reference = equivalence_runs[name], equivalence_runs["one_b8"]
    facts = read_run(run)
    assert facts["world_size"] == 2 and facts["distributed_type"] == "MULTI_CPU"
    assert_same_training(run, reference)


@pytest.fixture(scope="session")
def muon_runs(markov_files, tmp_path_factory) -> dict[str, Path]:
    """The equivalence runs' training with Muon and wsd: 1 process x batch 8, 2 torchrun ranks x 4, and
    1 process x 4 x grad_accum 2."""
    root = tmp_path_factory.mktemp("muon")
    recipe = ["--optimizer", "muon", "--lr_schedule", "wsd", "--decay_fraction", "0.5", "--warmup_steps", "2"]
    runs = {"one_b8": (1, "python", ["--batch_size", "8"]), "torchrun_b4": (2, "torchrun", ["--batch_size", "4"]),
            "accum_b4x2": (1, "python", ["--batch_size", "4", "--grad_accum", "2"])}
    out = {}
    for name, (nproc, launcher, extra) in runs.items():
        out[name] = root / name
        result = run_ok([*equivalence_args(markov_files), *recipe, *extra, "--output_dir", str(out[name])], cwd=root,
                        nproc=nproc, launcher=launcher)
        (out[name] / "stdout.log").write_text(result.stdout)
    return out


@pytest.mark.parametrize("name", ["torchrun_b4", "accum_b4x2"])
def test_muon_on_two_ranks_or_accumulated_trains_the_one_process_model(muon_runs, name):
    """Losses to 1e-4 and weights to 2e-2, not 1e-5: torch.optim.Muon orthogonalizes in bfloat16, so a gradient's
    fp32 rounding (summed in another order by another batch size) flips bf16 roundings (2**-8) of the update,
    and Newton-Schulz's quintic (slope 3.4445 at zero) magnifies them. Measured: 1.2e-5 on this AVX2 machine,
    4.6e-3 on an AVX-512/AMX runner (native bf16 kernels), with losses within 1e-4 on both. Another batch order
    moves the losses by 2e-3 to 2e-2 from step 4 and the median parameter by 4e-1."""
    assert_same_training(muon_runs[name], muon_runs["one_b8"], rtol=1e-4, weights_rtol=2e-2)


def test_the_plan_says_which_optimizer_trains_what_and_the_phases(muon_runs):
    stdout = (muon_runs["one_b8"] / "stdout.log").read_text()
    assert ("model: gpt modern: 2 layers x 2 heads x 32, rope (theta 10000), rmsnorm, qk-norm, swiglu, no biases, "
            "zero-init projections, untied head") in stdout
    assert ("optimizer: muon on 10 matrices (muon_lr 0.02, momentum 0.95) + adamw on 11 other tensors (lr 0.003); "
            "schedule: warm-up 2 steps, stable to step 8, linear decay to 0.0003 over the last 8") in stdout
    rows = [r for r in read_metrics(muon_runs["one_b8"]) if "lr" in r]
    assert [r["muon_lr"] for r in rows if r["step"] in (2, 8, 16)] == pytest.approx([0.02, 0.02, 0.002])


def training_orders(run) -> list[list[int]]:
    """The sequence indices each epoch trained on, in order, from the run's recorded reads (faults.record_reads):
    the training reads are those of the larger dataset."""
    reads = faults.read_records(run / "reads.jsonl")
    train = [r for r in reads if r["dataset"] == max(r["dataset"] for r in reads)]
    indices = [i for r in train for i in r["indices"]]
    per_epoch = read_run(run)["steps_per_epoch"] * 8  # global batch 8
    return [indices[start:start + per_epoch] for start in range(0, len(indices), per_epoch)]


def test_runs_cross_an_epoch_boundary_with_shuffled_batches(equivalence_runs):
    rows = read_metrics(equivalence_runs["torchrun_b4"])
    facts = read_run(equivalence_runs["torchrun_b4"])
    assert facts["steps_per_epoch"] == 8 and max(r["step"] for r in rows) == 16
    assert any(r["epoch"] == 1.0 and "val/loss" in r for r in rows)  # epoch-end evaluation
    # Each epoch reads 64 distinct sequences of the 65, shuffled, and the second epoch in an order of its own.
    first, second = training_orders(equivalence_runs["workers_b8"])
    for order in (first, second):
        assert len(order) == len(set(order)) == 64 and set(order) <= set(range(65)) and order != sorted(order)
    assert second != first


def test_gradient_accumulation_equals_one_big_batch(equivalence_runs):
    """grad_accum 2 x batch 4 == 1 x batch 8; counters say 2 micro-steps per step."""
    assert_same_training(equivalence_runs["accum_b4x2"], equivalence_runs["one_b8"])
    rows = read_metrics(equivalence_runs["accum_b4x2"])
    assert all(r["micro_step"] == 2 * r["step"] for r in rows)
    assert read_metrics(equivalence_runs["one_b8"])[-1]["tokens_seen"] == rows[-1]["tokens_seen"] == 16 * 8 * 32


def test_dataloader_workers_change_nothing(equivalence_runs):
    """Batches sliced in a worker process train exactly what the main process's own batches train."""
    reads = faults.read_records(equivalence_runs["workers_b8"] / "reads.jsonl")
    assert reads and all(r["worker"] == 0 and r["pid"] != r["trainer"] for r in reads), "every read in the worker"
    assert_same_training(equivalence_runs["workers_b8"], equivalence_runs["one_b8"], rtol=0)


def counted_flops_per_token(vocab_size: int) -> float:
    """The equivalence runs' GPT, forward and backward over one sequence, its FLOPs counted by torch's
    FlopCounterMode (attention in the math kernel, whose matmuls it counts), per token. Within 3% of the PaLM
    convention lmdist states: the convention counts biases and LayerNorm weights as matmul weights too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from lmdist.config import TrainConfig
    from lmdist.models import build_model

    model = build_model(TrainConfig(model="gpt", n_layer=2, n_head=2, n_embd=32, block_size=32), vocab_size)
    tokens = torch.randint(0, vocab_size, (1, 32))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    return counter.get_total_flops() / tokens.numel()


def test_speed_and_memory_metrics(equivalence_runs):
    """tokens_per_sec, mfu, data_wait and peak memory in every training row. mfu is checked against FLOPs
    counted on the model and, for config_b4, the peak given with --peak_tflops (else the measured one)."""
    for name in ("one_b8", "config_b4"):
        facts = read_run(equivalence_runs[name])
        flops_per_token = counted_flops_per_token(facts["vocab_size"])
        assert facts["flops_per_token"] == pytest.approx(flops_per_token, rel=0.03)
        if name == "config_b4":
            peak = EQUIVALENCE_PEAK_TFLOPS * 1e12
            assert facts["peak_flops_source"] == "peak_tflops setting"
        else:
            peak = facts["peak_flops_per_process"]
            assert facts["peak_flops_source"].startswith("measured float32 matmul") and peak > 1e9
        rows = [r for r in read_metrics(equivalence_runs[name]) if "train/loss" in r]
        for row in rows:
            assert row["tokens_per_sec"] > 0 and 0 <= row["data_wait"] < 1 and row["peak_rss_mb"] > 50
            mfu = row["tokens_per_sec"] * flops_per_token / (facts["world_size"] * peak)
            assert row["mfu"] == pytest.approx(mfu, rel=0.03) and 0 < row["mfu"] < 1


def test_compiled_model_trains_the_eager_model(equivalence_runs, markov_files, tmp_path):
    """--compile: the same losses and weights up to kernel rounding, and the same parameter names."""
    out = tmp_path / "compiled"
    run_ok([*equivalence_args(markov_files), "--batch_size", "8", "--compile", "--output_dir", str(out)], cwd=tmp_path)
    assert_same_training(out, equivalence_runs["one_b8"], rtol=1e-3, weights_rtol=1e-3)
    # Really compiled: generated kernels round differently from eager ones, which repeat bitwise.
    assert losses_by_step(out) != losses_by_step(equivalence_runs["one_b8"])


def test_accumulation_micro_steps_do_not_all_reduce(markov_files, tmp_path):
    """Counted with torch's profiler on each rank: grad_accum 4 runs exactly the all-reduces of grad_accum 1
    over the same optimizer steps (DDP's gradient buckets, the per-step check, log and eval reductions)."""
    counts = {}
    for grad_accum in (1, 4):
        out = tmp_path / f"accum{grad_accum}"
        run_ok([str(tmp_path / f"counts{grad_accum}"), *equivalence_args(markov_files), "--max_steps", "4",
                "--batch_size", "2", "--grad_accum", str(grad_accum), "--output_dir", str(out)],
               cwd=tmp_path, nproc=2, launcher="accelerate", script=REPO / "bench" / "count_collectives.py")
        counts[grad_accum] = [json.loads((tmp_path / f"counts{grad_accum}.rank{r}").read_text()) for r in (0, 1)]
    one, four = counts[1], counts[4]
    assert one == four
    assert one[0]["c10d::allreduce_"] >= 2 * 4  # at least a gradient bucket and the stop/NaN check per step


def test_plan_line_and_run_facts(equivalence_runs):
    log = (equivalence_runs["torchrun_b4"] / "stdout.log").read_text()
    plan = [line for line in log.splitlines() if line.startswith("plan:")]
    assert len(plan) == 1, "rank zero prints one plan line"
    assert "world size 2 (MULTI_CPU)" in plan[0] and "256 tokens/step" in plan[0] and "8 steps/epoch" in plan[0]
    assert "16 total steps" in plan[0] and "1 threads/process" in plan[0]
    assert "dropping 1 of 65 training sequences" in log
    facts = read_run(equivalence_runs["torchrun_b4"])
    assert facts["launcher"] == "torchrun" and facts["threads"] == 1 and facts["status"] == "completed"
    assert facts["mixed_precision"] == "no" and facts["device"].startswith("cpu")
    assert {"torch", "accelerate", "datasets", "wandb"} <= set(facts["versions"])
    assert read_run(equivalence_runs["accelerate_b2x2"])["launcher"] == "accelerate"
    # One process gets every core this machine lets it use (the launchers' OMP_NUM_THREADS=1 does not win).
    assert read_run(equivalence_runs["one_b8"])["threads"] == len(os.sched_getaffinity(0))


def test_evaluation_counts_every_token_once_whatever_the_world_size(markov_files, tmp_path):
    """With lr 0 the weights never move: val/loss from 1 and 2 ranks (batch 3: padding needed) must agree to
    1e-6, and equal a hand computation over every validation target with the exported weights."""
    args = [*TINY_GPT, "--dataset", str(markov_files["short"]), "--val_dataset", str(markov_files["short_val"]),
            "--lr", "0", "--max_steps", "1", "--batch_size", "3"]
    run_ok([*args, "--output_dir", str(tmp_path / "one")], cwd=tmp_path)
    run_ok([*args, "--output_dir", str(tmp_path / "two")], cwd=tmp_path, nproc=2, launcher="torchrun")
    one, two = read_metrics(tmp_path / "one")[-1], read_metrics(tmp_path / "two")[-1]
    assert abs(one["val/loss"] - two["val/loss"]) <= 1e-6 * one["val/loss"]
    assert one["val/acc"] == pytest.approx(two["val/acc"], abs=1e-12)

    from lmdist.config import TrainConfig
    from lmdist.models import build_model
    from lmdist.tokenizer import load_tokenizer

    cfg = TrainConfig(model="gpt", n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0)
    tokenizer = load_tokenizer(str(tmp_path / "one" / "final"))
    model = build_model(cfg, tokenizer.vocab_size)
    model.load_state_dict(final_weights(tmp_path / "one"), strict=False)  # lm_head is tied to wte
    model.eval()
    # the file as written: its trailing line break is a token too, then the end-of-text token
    ids = torch.tensor(tokenizer.encode(markov_files["short_val"].read_text()) + [tokenizer.eos_id])
    assert len(ids) == 1001
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 32):  # the packing: inputs ids[s:s+32], targets shifted by one
            x, y = ids[start:start + 32][None], ids[start + 1:start + 33]
            logits = model(x[:, : len(y)])[0]
            total += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            count += len(y)
    assert count == 1000
    assert one["val/loss"] == pytest.approx(total / count, rel=1e-5)
    assert one["val/acc"] == pytest.approx(correct / count, abs=1e-9)


def test_world_size_mismatch_is_refused(markov_files, tmp_path):
    """Two torchrun ranks whose Accelerate was not told to use the CPU (what plain accelerate does on a CPU
    machine) would train two copies: both ranks must refuse with exit 2 and say why."""
    result = launch([*TINY_GPT, "--dataset", str(markov_files["short"]), "--output_dir", str(tmp_path / "out")],
                    cwd=tmp_path, nproc=2, launcher="torchrun", script=faults.SCRIPT,
                    env=faults.inject(faults.claim_a_gpu), timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("the launcher started 2 processes (WORLD_SIZE) but Accelerate sees a world of 1") == 2
    assert "lmdist/launch.py" not in result.stderr, "a user error, not a traceback (the launcher's own report aside)"
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_world_size_without_rank_is_refused(tmp_path):
    result = launch(["--output_dir", str(tmp_path / "out")], cwd=tmp_path, env={"WORLD_SIZE": "2"}, timeout=60)
    assert result.returncode == 2 and "WORLD_SIZE=2 is set but RANK is not" in result.stderr


def test_single_process_accelerate_launch_warns(markov_files, tmp_path):
    """`accelerate launch --num_processes 2` without --multi_gpu starts one process: say so."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", str(REPO / "train.py"),
           *TINY_GPT, "--dataset", str(markov_files["short"]), "--max_steps", "1", "--output_dir", str(tmp_path / "o"),
           "--wandb_mode", "disabled"]
    import subprocess

    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = next(line for line in result.stderr.splitlines() if "accelerate started ONE process" in line)
    assert warning.startswith("warning: accelerate started ONE process although --num_processes > 1 was asked for")
    assert warning.endswith("train.py`"), "one line: the whole message, not Python's source-line echo"
    assert "warnings.warn" not in result.stderr and "UserWarning" not in result.stderr
    assert read_run(tmp_path / "o")["world_size"] == 1


def test_threads_field_and_fp16_on_cpu(markov_files, tmp_path):
    args = [*TINY_GPT, "--dataset", str(markov_files["short"]), "--batch_size", "4", "--max_steps", "1"]
    run_ok([*args, "--threads", "1", "--output_dir", str(tmp_path / "t")], cwd=tmp_path)
    assert read_run(tmp_path / "t")["threads"] == 1
    fp16 = launch([*args, "--output_dir", str(tmp_path / "f")], cwd=tmp_path,
                  env={"ACCELERATE_MIXED_PRECISION": "fp16"})
    assert fp16.returncode == 2 and "fp16 mixed precision needs a GPU" in fp16.stderr


def test_console_is_a_progress_bar_on_a_terminal_and_plain_lines_otherwise(equivalence_runs, markov_files, tmp_path):
    plain = (equivalence_runs["torchrun_b4"] / "stdout.log").read_text()
    assert "\r" not in plain and "step 16/16 | epoch 2 | loss " in plain
    # Under a pseudo-terminal: a tqdm bar (carriage returns) on rank zero.
    cmd = [sys.executable, str(REPO / "train.py"), *TINY_GPT, "--dataset", str(markov_files["short"]),
           "--batch_size", "4", "--max_steps", "3", "--wandb_mode", "disabled", "--output_dir", str(tmp_path / "o")]
    text = run_on_terminal(cmd, tmp_path, columns=160)
    assert re.search(r"\| 3/3 \[[0-9:<]+, +[0-9.]+(step/s|s/step)", text), text[-2000:]  # tqdm's bar
    assert not re.search(r"\| 3/3 \[", plain)


def test_a_hung_rank_fails_the_run_after_the_collective_timeout(markov_files, tmp_path):
    """Rank 1 hangs before a collective: rank 0 gives up after LMDIST_COLLECTIVE_TIMEOUT, and the launcher ends
    the run -- instead of everyone waiting for the job's time limit."""
    started = time.monotonic()
    result = launch([*TINY_GPT, "--dataset", str(markov_files["short"]), "--output_dir", str(tmp_path / "o")],
                    cwd=tmp_path, nproc=2, launcher="torchrun", script=faults.SCRIPT, timeout=300,
                    env={**faults.inject(faults.hang_rank, rank=1), "LMDIST_COLLECTIVE_TIMEOUT": "15"})
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    # gloo's own words, on the rank that waited, with the timeout lmdist gave it
    assert re.search(r"\[rank0\]:.*Timed out waiting 15000ms", result.stderr), result.stderr[-3000:]
    assert 15 <= elapsed < 120, f"ended after {elapsed:.0f} s: not by the 15 s collective timeout"

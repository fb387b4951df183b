"""GPT-2 124M on one GPU: tokens/s and MFU with bf16 autocast, compiled and eager (bench/README.md's GPU figure).

    python bench/gpu.py [--text FILE] [--batch_size 32] [--steps 200] [--profile 5]

Trains GPT-2's shape (12 layers, 12 heads, 768 wide, 1024 tokens of context, a 50304-row vocabulary) with
`accelerate launch --config_file accelerate_configs/single_gpu.yaml train.py`, as a user would, on a BPE
tokenizer trained on the text (WikiText-2 by default, repeated so that one epoch outlasts the run: no epoch-end
evaluation in the middle). WikiText-2 holds too little text for GPT-2's 50257 BPE tokens, so
`--vocab_multiple 50304` pads the model's vocabulary to GPT-2's padded 50304: the model, and its FLOPs, are
GPT-2's whatever the tokenizer learned. A run's figure is the median of its log windows after the first
three (compilation, autotuning, allocator warm-up), and after the profiled one with `--profile`. MFU divides
the model FLOPs (PaLM's 6N + 12*L*n_embd*T per token, as in training) by the card's datasheet dense bf16
rate, and by a bf16 matmul measured here.
Writes bench/gpu_results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lmdist import perf  # noqa: E402

GPT2 = ("--model gpt --gpt_style gpt2 --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --dropout 0 "
        "--tokenizer bpe --bpe_vocab_size 50257 --vocab_multiple 50304 --lr 6e-4 --warmup_steps 10 --epochs 1000 "
        "--wandb_mode disabled "
        "--eval_every 1000000 --save_every 1000000 --eval_batches 1")
WARMUP_WINDOWS = 3


def train(text: Path, workdir: Path, name: str, batch_size: int, steps: int, log_every: int, compile: bool,
          logs: Path, profile_steps: int) -> dict:
    out = workdir / name
    flags = [*GPT2.split(), "--dataset", str(text), "--cache_dir", str(workdir / "cache"), "--output_dir", str(out),
             "--batch_size", str(batch_size), "--max_steps", str(steps), "--log_every", str(log_every),
             "--compile", str(compile).lower(), "--profile_steps", str(profile_steps),
             "--profile_start", str(WARMUP_WINDOWS * log_every)]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / "single_gpu.yaml"), str(REPO / "train.py"), *flags]
    began = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - began
    (logs / f"gpu_{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    for path in (out / "profile").glob("*"):  # the trace and the table of the costliest kernels
        shutil.copy(path, logs / f"gpu_{name}_{path.name}")
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "tokens_per_sec" in r]
    facts = json.loads((out / "run.json").read_text())
    measured = rows[WARMUP_WINDOWS + (1 if profile_steps else 0):]  # the profiled window is slowed by the profiler
    return {"name": name, "compile": compile, "batch_size": batch_size, "block_size": 1024, "steps": steps,
            "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in measured),
            "windows_tokens_per_sec": [r["tokens_per_sec"] for r in rows],
            "peak_gpu_mb": max(r["peak_gpu_mb"] for r in rows), "wall_s": wall,
            "flops_per_token": facts["flops_per_token"], "parameters": facts["parameters"],
            "final_train_loss": rows[-1]["train/loss"], "command": " ".join(command[1:]).replace(str(REPO) + "/", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "wikitext-2"),
                        help="a text file, or a folder whose *.txt files are joined (default: ../shared's WikiText-2)")
    parser.add_argument("--repeat", type=int, default=16, help="copies of the text to train on (default 16)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the eager (uncompiled) model (default: yes)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile this many steps of each run after its warm-up windows (lmdist's --profile_steps; "
                             "their window's figure is slowed by the profiler): gpu_NAME_ops_rank0.txt and the trace "
                             "land beside the logs")
    parser.add_argument("--out", default=str(REPO / "bench" / "gpu_results.json"))
    parser.add_argument("--logs", default=None, help="folder for each run's console log (default: beside --out)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU here: this benchmark measures one (the CPU suite is bench/run.py)")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    datasheet = perf.datasheet_peak(name)
    matmul = perf.measure_matmul_flops(device, torch.bfloat16, 8192, seconds=2.0)
    results = {"machine": {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                           "date": time.strftime("%Y-%m-%d")},
               "datasheet_bf16_flops": datasheet and datasheet.flops, "measured_bf16_matmul_flops": matmul, "runs": []}
    source = Path(args.text)
    files = sorted(source.glob("*.txt")) if source.is_dir() else [source]
    with tempfile.TemporaryDirectory(prefix="lmdist-gpu-bench-") as folder:
        workdir = Path(folder)
        text = workdir / "corpus.txt"
        text.write_bytes(b"".join(f.read_bytes() for f in files) * args.repeat)
        logs = Path(args.logs or Path(args.out).parent)
        for compile in (True, False) if args.eager else (True,):
            run = train(text, workdir, "compiled" if compile else "eager", args.batch_size, args.steps,
                        args.log_every, compile, logs, args.profile)
            flops = run["tokens_per_sec"] * run["flops_per_token"]
            run["mfu_datasheet"] = flops / datasheet.flops if datasheet else None
            run["mfu_measured_matmul"] = flops / matmul
            results["runs"].append(run)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")  # each run kept as it finishes
    print(f"{name}: bf16 matmul measured {matmul / 1e12:.0f} TFLOP/s"
          + (f", datasheet {datasheet.flops / 1e12:.0f}" if datasheet else ""))
    for run in results["runs"]:
        mfu = f"{run['mfu_datasheet']:.1%}" if run["mfu_datasheet"] else "-"
        print(f"{run['name']:>8}: {run['tokens_per_sec']:,.0f} tokens/s, MFU {mfu} of datasheet, "
              f"{run['mfu_measured_matmul']:.1%} of measured matmul, peak {run['peak_gpu_mb'] / 1024:.1f} GiB, "
              f"wall {run['wall_s']:.0f} s")
    print(f"figures written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

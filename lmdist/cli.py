"""The `lmdist` console script: commands around training (training itself is `train.py`).

    lmdist eval --checkpoint DIR [--dataset D --split S --batch_size B --output FILE]
    lmdist generate --checkpoint DIR --prompt TEXT [--max_new_tokens N --temperature T --top_k K --seed S]
    lmdist env       what a launch here would see: devices, launcher variables, threads, W&B mode
    lmdist fields    every config field with its type, default and meaning (--markdown for a table)
    lmdist peak      this machine's peak for `mfu`: the GPU's datasheet rate and measured matmul rates

`eval` runs on one process or several: `torchrun --nproc_per_node 2 -m lmdist eval --checkpoint DIR`.
"""
from __future__ import annotations

import json
import os

import fire


def env() -> dict:
    """Report what lmdist would decide for a launch in this environment (run it inside your job script)."""
    import accelerate
    import torch

    from lmdist import __version__, launch
    from lmdist.config import TrainConfig
    from lmdist.tracking import has_wandb_credentials, wandb_mode

    launcher_vars = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "OMP_NUM_THREADS", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "SLURM_JOB_ID")
    return {
        "lmdist": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
        "accelerator_available": launch.has_accelerator(),
        "cuda_devices": torch.cuda.device_count(),
        "threads_per_process": launch.threads_per_process(TrainConfig()),
        "launcher_env": {k: os.environ[k] for k in launcher_vars if k in os.environ},
        "wandb_credentials": has_wandb_credentials(),
        "wandb_mode": wandb_mode(TrainConfig()),
    }


def peak(seconds: float = 1.0, threads: int | None = None) -> None:
    """The peaks `mfu` can be measured against here: the GPU's datasheet dense bf16 rate (when known) and the
    best rate of a large fp32 and bf16 matmul over `seconds` each, on this process's device and threads."""
    import torch

    from lmdist import launch, perf
    from lmdist.config import TrainConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(threads or launch.threads_per_process(TrainConfig()))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    known = perf.datasheet_peak(name) if name else None
    n = 8192 if device.type == "cuda" else 2048
    report = {
        "device": name or "cpu", "threads": torch.get_num_threads(),
        "datasheet_bf16_tflops": known.flops / 1e12 if known else None,
        "measured_tflops": {str(dtype).removeprefix("torch."): perf.measure_matmul_flops(device, dtype, n, seconds)
                            / 1e12 for dtype in (torch.float32, torch.bfloat16)},
        "measured_onednn_float32_tflops": (perf.measure_matmul_flops(device, torch.float32, n, seconds, onednn=True)
                                           / 1e12 if perf.onednn_usable(device, torch.float32) else None),
        "matmul": f"{n}^3",
    }
    if device.type == "cpu" and not perf.native_cpu_bf16():
        report.update(cpu_bf16="emulated (no oneDNN bf16 kernels for this CPU)",
                      bf16_matmul=f"{perf.EMULATED_BF16_MATMUL}^3")
    print(json.dumps(report, indent=2))


def fields(markdown: bool = False) -> None:
    """Print every config field with its type, default and meaning."""
    from lmdist.config import help_text, markdown_table

    print(markdown_table() if markdown else help_text())


def eval(checkpoint: str, dataset: str | None = None, split: str | None = None, batch_size: int | None = None,
         output: str = "eval.json") -> None:
    """val/loss, val/ppl, val/acc of a checkpoint or final/ folder: on its run's validation data, or on
    `split` of `dataset` (default split: validation, valid, test or train, the first there is)."""
    from lmdist.errors import run_cli
    from lmdist.files import write_json
    from lmdist.inference import evaluate_saved

    def run() -> None:
        result = evaluate_saved(str(checkpoint), None if dataset is None else str(dataset), split, batch_size)
        if int(os.environ.get("RANK", "0")) == 0:
            write_json(output, result)
            print(json.dumps(result))

    run_cli(run)


def generate(checkpoint: str, prompt: str = "", max_new_tokens: int = 200, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0) -> None:
    """Continue `prompt` with text sampled from a checkpoint or final/ folder (same seed, same text)."""
    from lmdist.errors import run_cli
    from lmdist.inference import generate as sample

    run_cli(lambda: print(sample(str(checkpoint), str(prompt), int(max_new_tokens), float(temperature), int(top_k),
                                 int(seed))))


def main() -> None:
    from lmdist.errors import quiet_broken_pipe

    quiet_broken_pipe(lambda: fire.Fire({"eval": eval, "generate": generate, "env": env, "fields": fields,
                                         "peak": peak}, name="lmdist"))

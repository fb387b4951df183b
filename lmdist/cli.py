"""The `lmdist` console script: commands around training (training itself is `train.py`).

    lmdist env       what a launch here would see: devices, launcher variables, threads, W&B mode
    lmdist fields    every config field with its type, default and meaning (--markdown for a table)
"""
from __future__ import annotations

import os

import fire


def env() -> dict:
    """Report what lmdist would decide for a launch in this environment (run it inside your job script)."""
    import accelerate
    import torch

    from lmdist import __version__, engine
    from lmdist.config import TrainConfig
    from lmdist.tracking import has_wandb_credentials, wandb_mode

    launcher_vars = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "OMP_NUM_THREADS", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "SLURM_JOB_ID")
    return {
        "lmdist": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
        "accelerator_available": engine.has_accelerator(),
        "cuda_devices": torch.cuda.device_count(),
        "threads_per_process": engine.threads_per_process(TrainConfig()),
        "launcher_env": {k: os.environ[k] for k in launcher_vars if k in os.environ},
        "wandb_credentials": has_wandb_credentials(),
        "wandb_mode": wandb_mode(TrainConfig()),
    }


def fields(markdown: bool = False) -> None:
    """Print every config field with its type, default and meaning."""
    from lmdist.config import help_text, markdown_table

    print(markdown_table() if markdown else help_text())


def main() -> None:
    fire.Fire({"env": env, "fields": fields}, name="lmdist")

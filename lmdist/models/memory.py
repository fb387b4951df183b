"""Refusing a GPT whose attention cannot fit in this machine's memory, before the model is built.

`scaled_dot_product_attention` picks a kernel per call. Flash and memory-efficient kernels hold memory
linear in block_size; the math fallback materializes every attention score, batch_size x n_head x block_size²
per layer, and keeps them for the backward pass. Which one runs is probed, not assumed: on CPU, PyTorch 2.x's
flash kernel takes no dropout, so any dropout > 0 falls back to the math path there.

Measured on that path (torch 2.13, CPU, fp32 and bf16 autocast alike, which computes the softmax in fp32):
about 12 bytes per score per layer kept for backward (probabilities, dropout mask, dropped probabilities)
plus about 8 bytes per score while a layer computes. A run whose scores alone exceed this process's share
of the node's memory (physical memory, or its cgroup's limit, e.g. a Slurm job's) cannot train: it is
refused with ConfigError (exit 2). The estimate depends only on the config and the machine, so every rank
on a node reaches the same verdict, and none is left waiting for a rank that has gone.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from lmdist.config import TrainConfig
from lmdist.errors import ConfigError

SAVED_BYTES_PER_SCORE = 12  # per layer, kept from forward to backward
TRANSIENT_BYTES_PER_SCORE = 8  # in the layer being computed
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # autocast's compute dtype; fp32 otherwise


def attention_bytes(cfg: TrainConfig) -> int:
    """Memory the materialized attention scores of one training micro-batch take, per process."""
    scores = cfg.batch_size * cfg.n_head * cfg.block_size**2
    return scores * (SAVED_BYTES_PER_SCORE * cfg.n_layer + TRANSIENT_BYTES_PER_SCORE)


def materializes_scores(device: torch.device, dtype: torch.dtype, head_dim: int, dropout: float) -> bool:
    """True when no kernel with memory linear in the sequence (flash, memory-efficient, cuDNN) can run a training
    attention of this kind here, so the math fallback, which materializes every score, would."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.zeros(1, 1, 8, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each refusing kernel warns why
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
                F.scaled_dot_product_attention(q, q, q, dropout_p=dropout, is_causal=True)
    except RuntimeError:  # "No available kernel"
        return True
    return False


def node_memory() -> int | None:
    """Bytes of memory the processes here may use: physical memory, or the cgroup's limit when lower."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            limits += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:")]
    except (OSError, ValueError):
        pass
    for path in _cgroup_limit_files():
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits) if limits else None


def _cgroup_limit_files() -> list[str]:
    """cgroup v2's memory.max of this process's group, and cgroup v1's memory limit."""
    files = ["/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    try:
        with open("/proc/self/cgroup") as f:
            files += [f"/sys/fs/cgroup{line.strip().partition('::')[2]}/memory.max" for line in f
                      if line.startswith("0::")]
    except OSError:
        pass
    return files


def check_attention_memory(cfg: TrainConfig, device: torch.device, mixed_precision: str,
                           processes_on_node: int) -> None:
    """ConfigError when a GPT's materialized attention scores alone exceed this process's share of the memory."""
    if cfg.model != "gpt":
        return
    dtype, head_dim = DTYPES.get(mixed_precision, torch.float32), cfg.n_embd // cfg.n_head
    if not materializes_scores(device, dtype, head_dim, cfg.dropout):
        return
    memory = node_memory()
    if memory is None:
        return
    share, need = memory // processes_on_node, attention_bytes(cfg)
    if need <= share:
        return
    fix = "lower block_size or batch_size"
    if cfg.dropout > 0 and not materializes_scores(device, dtype, head_dim, 0.0):
        fix += ", or set --dropout 0 (a kernel with memory linear in block_size then runs)"
    whose = f"each of the {processes_on_node} processes on this machine" if processes_on_node > 1 else "this machine"
    raise ConfigError(f"--block_size {cfg.block_size}: this GPT's attention would materialize {need / 2**30:,.1f} GiB "
                      f"of scores per process ({cfg.n_layer} layers x batch_size {cfg.batch_size} x n_head "
                      f"{cfg.n_head} x {cfg.block_size}² scores, about {SAVED_BYTES_PER_SCORE} bytes each; on "
                      f"{device.type} with dropout {cfg.dropout} no flash kernel runs), more than the "
                      f"{share / 2**30:,.1f} GiB {whose} has: {fix}")

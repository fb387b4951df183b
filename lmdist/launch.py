"""How this process joins the launch: the CPU decision, the launcher checks, restarted gloo groups, the
collective timeout, threads per rank and the host allocator -- everything settled before the Accelerator exists.

accelerate only starts gloo when told to use the CPU, and otherwise silently trains independent copies, so
lmdist decides "CPU" itself when no accelerator is present and refuses a launcher world size that Accelerate
does not see.
"""
from __future__ import annotations

import ctypes
import os
import platform
import warnings
from datetime import timedelta

from lmdist.config import TrainConfig
from lmdist.errors import LaunchError


def has_accelerator() -> bool:
    """True when torch sees a GPU (or another accelerator), unless ACCELERATE_USE_CPU asks for CPU."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return False
    import torch  # here, not at the top: lmdist.shards' tokenizing workers use this module without torch

    accel = getattr(torch, "accelerator", None)  # torch >= 2.6
    return bool(accel.is_available()) if accel is not None else torch.cuda.is_available()


def check_launcher_env() -> None:
    """Catch launches that would hang or silently run fewer processes than asked for."""
    world = _env_int("WORLD_SIZE")
    if world is not None and world > 1 and _env_int("RANK") is None:
        raise LaunchError(f"WORLD_SIZE={world} is set but RANK is not: start the ranks with torchrun or "
                          "`accelerate launch --multi_gpu --num_processes N`, or unset WORLD_SIZE for one process")
    if os.environ.get("MASTER_ADDR") and "ACCELERATE_USE_CPU" in os.environ and _env_int("RANK") is None:
        # accelerate's single-process launcher sets MASTER_ADDR only when --num_processes > 1 was asked for.
        warnings.warn("accelerate started ONE process although --num_processes > 1 was asked for: add --multi_gpu "
                      "(on CPU too) to start them, e.g. `accelerate launch --multi_gpu --num_processes 2 train.py`",
                      stacklevel=2)


def check_world_size(accelerate_world: int) -> None:
    """Refuse to train when the launcher started more ranks than Accelerate joined into one group."""
    launched = _env_int("WORLD_SIZE")
    if launched is not None and launched != accelerate_world:
        raise LaunchError(
            f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate sees a world of "
            f"{accelerate_world}: "
            "they would train independent copies. On CPU-only machines export ACCELERATE_USE_CPU=1 or check that "
            "torch sees the GPUs you expect"
        )


def join_restarted_cpu_group() -> None:
    """Join the gloo group of a worker that `torchrun --max-restarts` restarted, under a per-attempt key prefix.

    torchrun keeps one store for every attempt, and gloo's address keys from the failed attempt are still in
    it: a restarted rank can read its dead peer's address and fail with "connection refused". Accelerate
    leaves an initialised group alone, so creating it here is enough.
    """
    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or launched_world_size() <= 1 or dist.is_initialized():
        return
    store, rank, world_size = next(dist.rendezvous("env://"))
    dist.init_process_group("gloo", store=dist.PrefixStore(f"lmdist/attempt_{attempt}", store), rank=rank,
                            world_size=world_size, timeout=collective_timeout())


def launched_world_size() -> int:
    """The processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return _env_int("WORLD_SIZE") or 1


def collective_timeout() -> timedelta:
    """How long a rank waits in a collective for the others: LMDIST_COLLECTIVE_TIMEOUT seconds (default 1800,
    torch's own). A hung rank then fails the job instead of holding it to its time limit."""
    return timedelta(seconds=float(os.environ.get("LMDIST_COLLECTIVE_TIMEOUT", "1800")))


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one, e.g. under Slurm or taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_process(cfg: TrainConfig) -> int:
    """`threads`, or the cores this process may use divided among the ranks on this node.

    Launchers set OMP_NUM_THREADS=1 for their workers, which leaves cores idle on CPU; this wins over it.
    """
    if cfg.threads:
        return cfg.threads
    return max(1, available_cores() // (_env_int("LOCAL_WORLD_SIZE") or 1))


# glibc mallopt parameters (malloc.h) and the values lmdist sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 * 2**20, 256 * 2**20  # 32 MiB is glibc's largest mmap threshold


def tune_host_allocator() -> bool:
    """Keep freed host memory for the next step instead of returning it to the OS (glibc only); True if set.

    glibc's adaptive defaults unmap or trim a step's large temporaries when freed and fault them in again the
    next step, in some runs and not others (docs/host-allocator.md has the measurement). A fixed mmap threshold
    and a trim threshold keep them in the heap, as PyTorch's CPU tuning guide does with jemalloc or tcmalloc.
    Left alone when the user chose (GLIBC_TUNABLES with malloc settings, a MALLOC_* variable, or a preloaded
    jemalloc, tcmalloc or mimalloc).
    """
    chosen = ("malloc" in os.environ.get("GLIBC_TUNABLES", "")
              or any(name.startswith("MALLOC_") for name in os.environ)
              or any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")))
    if chosen or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                       TRIM_THRESHOLD))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None

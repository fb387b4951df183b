"""Where the distributed world is set up: the one place that builds the Accelerator.

It decides "CPU" itself when no accelerator is present (accelerate only starts gloo when told, and
otherwise silently trains independent copies), refuses a launcher world size that Accelerate does
not see, sets threads and the host allocator, seeds, and builds the optimizer.
"""
from __future__ import annotations

import ctypes
import functools
import inspect
import os
import platform
import shutil
import warnings
from collections.abc import Callable
from datetime import timedelta
from types import MethodType
from typing import TypeVar

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import InitProcessGroupKwargs, set_seed
from accelerate.utils.operations import ConvertOutputsToFp32

from lmdist import metrics, perf, sharding
from lmdist.config import TrainConfig
from lmdist.errors import ConfigError, LaunchError, LmdistError

T = TypeVar("T")


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for this launch: CPU/gloo without an accelerator, the launcher's world size verified."""
    check_launcher_env()
    tune_host_allocator()
    cpu = not has_accelerator()
    if cpu:
        join_restarted_cpu_group()
    try:
        accelerator = Accelerator(
            cpu=cpu,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=collective_timeout())],
            gradient_accumulation_steps=cfg.grad_accum,
            # lmdist's loaders draw global batches and split them (N ranks x b see what 1 process x N*b sees);
            # split_batches tells Accelerate so, and its LR scheduler then steps once per optimizer step
            # whatever the world size.
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            project_dir=cfg.output_dir,
        )
    except ValueError as e:  # e.g. fp16 asked for on a device without it
        raise ConfigError(f"accelerate refused this launch: {e}") from None
    check_world_size(accelerator.num_processes)
    check_precision(accelerator.mixed_precision, accelerator.device)
    torch.set_num_threads(threads_per_process(cfg))
    _remember_installed_packages()
    return accelerator


def check_precision(mixed_precision: str, device: torch.device) -> None:
    """Refuse fp16 on CPU (Accelerate would report fp16 and quietly train in fp32); warn of bf16 on a CPU
    that can only emulate it."""
    if device.type != "cpu":
        return
    if mixed_precision == "fp16":
        raise ConfigError("fp16 mixed precision needs a GPU; on CPU launch with "
                          "`accelerate launch --mixed_precision bf16` "
                          "(torchrun: ACCELERATE_MIXED_PRECISION=bf16) or without mixed precision")
    if mixed_precision == "bf16" and not perf.native_cpu_bf16():
        warnings.warn("this CPU has no bf16 kernels (oneDNN needs AVX-512 or newer): bf16 autocast is emulated "
                      "and trains many times slower than fp32 here (GPTs: 5-20x on an AVX2 EPYC); "
                      "launch without --mixed_precision bf16 to train in fp32", stacklevel=2)


# glibc mallopt parameters (malloc.h) and the values lmdist sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 * 2**20, 256 * 2**20  # 32 MiB is glibc's largest mmap threshold


def tune_host_allocator() -> bool:
    """Keep freed host memory for the next step instead of returning it to the OS (glibc only); True if set.

    With glibc's adaptive defaults a step's large temporaries are unmapped or trimmed when freed and faulted
    in again the next step -- in some runs and not others: 4-6x the page faults and several percent of a
    small model's step time (LSTM S). A fixed 32 MiB mmap threshold and a 256 MiB trim threshold keep them
    in the heap, as PyTorch's CPU tuning guide does with jemalloc or tcmalloc. Left alone when the user chose
    (GLIBC_TUNABLES with malloc settings, a MALLOC_* variable, or a preloaded jemalloc, tcmalloc or mimalloc).
    """
    chosen = ("malloc" in os.environ.get("GLIBC_TUNABLES", "")
              or any(name.startswith("MALLOC_") for name in os.environ)
              or any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")))
    if chosen or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                       TRIM_THRESHOLD))


def _remember_installed_packages() -> None:
    """Accelerate's optimizer step asks whether `lomo_optim` is installed, twice per step, each an importlib
    search (about 25 us each, a third of the step's bookkeeping on a small model). Installed packages do not
    change during a run, so the answer is looked up once."""
    import accelerate.optimizer

    lookup = getattr(accelerate.optimizer, "is_lomo_available", None)
    if lookup is not None and not hasattr(lookup, "cache_info"):
        accelerate.optimizer.is_lomo_available = functools.cache(lookup)


def shard_if_asked(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """FSDP2 on CPU when an FSDP config meets a machine without GPUs (Accelerate would train DDP instead)."""
    if sharding.cpu_fsdp_requested(accelerator.device.type == "cpu") and accelerator.num_processes > 1:
        return sharding.shard(model)
    return model


def compile_if_asked(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """`torch.compile` the model in place when `compile` is set: parameter names (checkpoints) stay as they are."""
    if not cfg.compile:
        return model
    if device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
        raise ConfigError("--compile on CPU needs a C++ compiler (torch.compile generates C++): install g++ "
                          "(or set CXX to one), or train without --compile")
    model.compile()
    return model


def loss_function(cfg: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The training loss and meter sums (`metrics.next_token_loss`), compiled along with the model when `compile`
    is set (as torchtitan does): its fp32 upcast, softmax, mean and top-1 hits then fuse into one pass over the
    logits, where eager materialises fp32 copies of a batch x time x vocab tensor (GPT-2 124M, batch 32: 6.6 GB
    each)."""
    return torch.compile(metrics.next_token_loss) if cfg.compile else metrics.next_token_loss


def dataloader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """`num_workers`, else 0 on CPU (every core trains; a batch is one slice of a memory-mapped array) and
    2 per GPU (to keep host-side batching off the GPU's critical path)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return 2 if device.type == "cuda" else 0


def prepare(accelerator: Accelerator, model: torch.nn.Module, *objects) -> tuple:
    """`accelerator.prepare` as a tuple (model, *objects), except that a model lmdist sharded itself is not
    wrapped in DDP; Accelerate's FSDP (on GPUs) wraps the unit classes this model has, and the model's outputs
    keep the autocast dtype."""
    if sharding.is_sharded(model):
        return (model, *_prepare_each(accelerator, objects))
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None:
        plugin.transformer_cls_names_to_wrap = sharding.unit_names(model)
    prepared = _prepare_each(accelerator, (model, *objects))
    keep_autocast_outputs(accelerator.unwrap_model(prepared[0]))
    return prepared


def _prepare_each(accelerator: Accelerator, objects: tuple) -> tuple:
    """`accelerator.prepare(*objects)`, always a tuple (it hands back a lone object bare)."""
    if not objects:
        return ()
    prepared = accelerator.prepare(*objects)
    return prepared if len(objects) > 1 else (prepared,)


def keep_autocast_outputs(model: torch.nn.Module) -> None:
    """Undo Accelerate's upcast of a mixed-precision model's outputs to fp32; the forward pass keeps its autocast.

    Accelerate wraps `forward` to return fp32, so that a loss computed outside the model runs in full precision.
    lmdist's loss and evaluation upcast inside themselves (fused with the softmax when compiled), so the wrapper
    only added a batch x time x vocab fp32 copy of the logits, and another of their gradient: GPT-2 124M at
    batch 64 on an H200, 13 GB each and 9.2 of a step's 139 ms. A forward that Accelerate wrapped differently is
    left as it is."""
    upcast = getattr(model.__dict__.get("forward"), "__wrapped__", None)
    if isinstance(upcast, ConvertOutputsToFp32) and inspect.ismethod(model.__dict__.get("_original_forward")):
        model.forward = MethodType(upcast.model_forward, model)  # the autocast-wrapped forward Accelerate made


def clip_gradients(accelerator: Accelerator, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (math.inf: only measure it); returns the norm before clipping."""
    return sharding.plain(accelerator.clip_grad_norm_(model.parameters(), max_norm))


def has_accelerator() -> bool:
    """True when torch sees a GPU (or another accelerator), unless ACCELERATE_USE_CPU asks for CPU."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return False
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


def join_restarted_cpu_group() -> None:
    """Join the gloo group of a worker that `torchrun --max-restarts` restarted, under a per-attempt key prefix.

    torchrun keeps one store for every attempt, and gloo's address keys from the failed attempt are still in
    it: a restarted rank can read its dead peer's address and fail with "connection refused". Accelerate
    leaves an initialised group alone, so creating it here is enough.
    """
    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or (_env_int("WORLD_SIZE") or 1) <= 1 or dist.is_initialized():
        return
    store, rank, world_size = next(dist.rendezvous("env://"))
    dist.init_process_group("gloo", store=dist.PrefixStore(f"lmdist/attempt_{attempt}", store), rank=rank,
                            world_size=world_size, timeout=collective_timeout())


def collective_timeout() -> timedelta:
    """How long a rank waits in a collective for the others: LMDIST_COLLECTIVE_TIMEOUT seconds (default 1800,
    torch's own). A hung rank then fails the job instead of holding it to its time limit."""
    return timedelta(seconds=float(os.environ.get("LMDIST_COLLECTIVE_TIMEOUT", "1800")))


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


def threads_per_process(cfg: TrainConfig) -> int:
    """`threads`, or the cores this process may use divided among the ranks on this node.

    Launchers set OMP_NUM_THREADS=1 for their workers, which leaves cores idle on CPU; this wins over it.
    """
    if cfg.threads:
        return cfg.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (_env_int("LOCAL_WORLD_SIZE") or 1))


def main_process_first(accelerator: Accelerator, build: Callable[[], T]) -> T:
    """Run `build` on the main process, then on the others (which then reuse its caches).

    Like `accelerator.main_process_first()`, but a user error on the main process is raised on every
    rank instead of leaving the others waiting at the barrier.
    """
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = build()
        except LmdistError as e:
            error = e
    if accelerator.num_processes > 1:
        shared = broadcast_object_list([None if error is None else (type(error), str(error))])[0]
        if shared is not None and error is None:
            error = shared[0](f"{shared[1]} (reported by the main process)")
    if error is not None:
        raise error
    return result if accelerator.is_main_process else build()


def shared_from_main(accelerator: Accelerator, value: T) -> T:
    """`value` as the main process has it, on every rank: one broadcast, so that every rank takes the same branch."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def seed_everything(seed: int, accelerator: Accelerator, per_rank: bool) -> None:
    """Same seed on every rank for initialisation; seed + rank afterwards so ranks draw different dropout."""
    # modulo numpy's seed range: seed 2**32 - 1 is valid, and rank 1 must not then fail alone
    set_seed((seed + (accelerator.process_index if per_rank else 0)) % 2**32)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Fused AdamW/Adam, or SGD, with weight decay only on matrices and embeddings (never biases or norm weights)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.beta1)
    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel for the whole update, on CPU as on GPU (about 4x faster than foreach on CPU here)
    return optimizer_class(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None

"""The Accelerator and `prepare`: the one place that builds the Accelerator and hands it the model.

`build_accelerator` settles the launch first (`lmdist.launch`), then builds an Accelerator that uses the CPU
when no accelerator is present and whose world is the launcher's; `prepare` is `accelerator.prepare` except
for a model lmdist sharded itself, and with the model's outputs kept in the autocast dtype. Around them: seeding,
work on the main process first, compile, the loss function and the loaders' worker count.
"""
from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs, set_seed

from lmdist import launch, metrics, patches, perf, sharding
from lmdist.config import TrainConfig
from lmdist.errors import ConfigError, LmdistError
from lmdist.models import build_model

T = TypeVar("T")


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for this launch: CPU/gloo without an accelerator, the launcher's world size verified."""
    launch.check_launcher_env()
    launch.tune_host_allocator()
    cpu = not launch.has_accelerator()
    if cpu:
        launch.join_restarted_cpu_group()
    try:
        accelerator = Accelerator(
            cpu=cpu,
            fsdp_plugin=None if cpu else fsdp_plugin(cfg),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=launch.collective_timeout())],
            gradient_accumulation_steps=cfg.grad_accum,
            # lmdist's loaders draw global batches and split them (N ranks x b see what 1 process x N*b sees);
            # split_batches tells Accelerate so, and its LR scheduler then steps once per optimizer step
            # whatever the world size.
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            project_dir=cfg.output_dir,
        )
    except ValueError as e:  # e.g. fp16 asked for on a device without it
        raise ConfigError(f"accelerate refused this launch: {e}") from None
    launch.check_world_size(accelerator.num_processes)
    check_precision(accelerator.mixed_precision, accelerator.device)
    torch.set_num_threads(launch.threads_per_process(cfg))
    patches.remember_installed_packages()
    return accelerator


def fsdp_plugin(cfg: TrainConfig) -> FullyShardedDataParallelPlugin | None:
    """Accelerate's FSDP plugin (GPUs, more than one process) from the launch's FSDP config, wrapping only the
    unit classes this config's model has: one config names both models' layers, and Accelerate refuses a name
    the model lacks. None when no FSDP config was launched (Accelerate then uses none either)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true" or launch.launched_world_size() <= 1:
        return None
    with torch.device("meta"):  # the model's module classes, without allocating its weights
        model = build_model(cfg, cfg.vocab_multiple)
    return FullyShardedDataParallelPlugin(transformer_cls_names_to_wrap=sharding.unit_names(model))


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


def shard_if_asked(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """FSDP2 on CPU when an FSDP config meets a machine without GPUs (Accelerate would train DDP instead)."""
    return sharding.shard(model) if _lmdist_shards(accelerator) else model


def shards_model(accelerator: Accelerator) -> bool:
    """Whether this launch trains a sharded model: FSDP through Accelerate (GPUs) or through lmdist (CPU)."""
    return accelerator.distributed_type == DistributedType.FSDP or _lmdist_shards(accelerator)


def _lmdist_shards(accelerator: Accelerator) -> bool:
    return sharding.cpu_fsdp_requested(accelerator.device.type == "cpu") and accelerator.num_processes > 1


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
    logits, where eager materialises fp32 copies of a batch x time x vocab tensor."""
    return torch.compile(metrics.next_token_loss) if cfg.compile else metrics.next_token_loss


def dataloader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """`num_workers`, else 0 on CPU (every core trains; a batch is one slice of a memory-mapped array) and
    2 per GPU (to keep host-side batching off the GPU's critical path)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return 2 if device.type == "cuda" else 0


def prepare(accelerator: Accelerator, model: torch.nn.Module, *objects) -> tuple:
    """`accelerator.prepare` as a tuple (model, *objects), except that a model lmdist sharded itself is not
    wrapped in DDP; the model's outputs keep the autocast dtype (`patches.keep_autocast_outputs`)."""
    if sharding.is_sharded(model):
        return (model, *_prepare_each(accelerator, objects))
    prepared = _prepare_each(accelerator, (model, *objects))
    patches.keep_autocast_outputs(accelerator.unwrap_model(prepared[0]))
    return prepared


def _prepare_each(accelerator: Accelerator, objects: tuple) -> tuple:
    """`accelerator.prepare(*objects)`, always a tuple (it hands back a lone object bare)."""
    if not objects:
        return ()
    prepared = accelerator.prepare(*objects)
    return prepared if len(objects) > 1 else (prepared,)


def clip_gradients(accelerator: Accelerator, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (math.inf: only measure it); returns the norm before clipping."""
    return sharding.full_tensor(accelerator.clip_grad_norm_(model.parameters(), max_norm))


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

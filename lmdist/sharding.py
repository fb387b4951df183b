"""FSDP on CPU: torch's FSDP2 `fully_shard` over gloo, where Accelerate would silently fall back to DDP.

Accelerate routes FSDP only to accelerator devices. When an FSDP config (`ACCELERATE_USE_FSDP=true`)
meets a machine without GPUs, lmdist shards the model itself: one FSDP unit per module class named in
the config's `fsdp_transformer_layer_cls_to_wrap` (a GPT `Block`, an `nn.LSTM` layer) or in a transformers
model's `_no_split_modules` (e.g. `LlamaDecoderLayer`), then the root.
Everything else -- optimizer, scheduler, loaders, accumulation, metrics -- stays on the shared path;
only the model skips `accelerator.prepare` (which would wrap it in DDP), and its state dicts are
gathered with `torch.distributed.checkpoint.state_dict`.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from lmdist.errors import ConfigError

DEFAULT_UNITS = ("Block", "LSTM")


def cpu_fsdp_requested(cpu: bool) -> bool:
    return cpu and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def shard(model: nn.Module) -> nn.Module:
    """Apply fully_shard to each unit module, then to the root (parameters become DTensor shards)."""
    from torch.distributed.fsdp import fully_shard

    names = set(unit_names(model))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    recompute = os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true"
    for module in list(model.modules())[1:]:
        if type(module).__name__ in names:
            if recompute:  # keep no activations inside the unit; recompute them in backward
                module.forward = _recomputed(module.forward)
            fully_shard(module, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return model


def unit_names(model: nn.Module) -> list[str]:
    """The module classes named in the config's `fsdp_transformer_layer_cls_to_wrap` (default: a GPT Block and
    an nn.LSTM) that `model` has, and a transformers model's own layers (`--model hf`: its `_no_split_modules`):
    one config serves every model, while Accelerate refuses a name the model lacks."""
    asked = [n.strip() for n in (os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or ",".join(DEFAULT_UNITS)).split(",")]
    present = {type(module).__name__ for module in model.modules()}
    kept = [name for name in asked if name in present]
    kept += sorted(set(getattr(model, "layer_classes", ())) & present - set(kept))
    if not kept:
        raise ConfigError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(asked)}, and this "
                          f"{type(model).__name__} has none of them: name its repeated layers (GPT: Block; LSTM: "
                          "LSTM), or leave the field out for both")
    return kept


def _recomputed(forward):
    """`forward` under activation checkpointing (parameter names stay as they are, unlike checkpoint_wrapper)."""
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_parameters(accelerator, model: nn.Module) -> list[int]:
    """Parameters each rank holds (its shards, for a sharded model); a collective."""
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    return accelerator.gather(torch.tensor([held], device=accelerator.device)).tolist()


def full_model_state(model: nn.Module) -> dict:
    """The full state dict on every rank (a collective: call it on all ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _unwrapped(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Shard full state dicts (present on every rank) into the sharded model and optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, _unwrapped(optimizer), optimizer_state, options=options)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. a sharded model's gradient norm) as an ordinary tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _unwrapped(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one

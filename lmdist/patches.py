"""Every change lmdist makes to a library's internals, in one place.

Each patch was written against accelerate 1.15.0 and torch 2.13.0, checks that the internal it changes is still
there, and otherwise does nothing (the library's own behaviour stays, slower but correct); each returns whether
it took effect. tests/test_patches.py runs each against the installed library and fails when one stops taking
effect, so an upgrade that silently disables a patch turns it red. docs/library-patches.md: what each changes,
why, its measurement, and the patches a design removed.
"""
from __future__ import annotations

import functools
import inspect
from types import MethodType

import torch


def remember_installed_packages() -> bool:
    """Look up once whether `lomo_optim` is installed, instead of on every optimizer step.

    Accelerate's `AcceleratedOptimizer` asks `is_lomo_available()` twice per step, each an importlib search
    that is a large share of a small model's per-step bookkeeping; installed packages do not change during a
    run. Gone: accelerate no longer imports `is_lomo_available` into `accelerate.optimizer`.
    """
    import accelerate.optimizer

    lookup = getattr(accelerate.optimizer, "is_lomo_available", None)
    if lookup is None:
        return False
    if not hasattr(lookup, "cache_info"):
        accelerate.optimizer.is_lomo_available = functools.cache(lookup)
    return True


def keep_autocast_outputs(model: torch.nn.Module) -> bool:
    """Undo Accelerate's upcast of a mixed-precision model's outputs to fp32; the forward pass keeps its autocast.

    Accelerate wraps `forward` to return fp32, so that a loss computed outside the model runs in full precision.
    lmdist's loss and evaluation upcast inside themselves (fused with the softmax when compiled), so the wrapper
    only adds an fp32 copy of the logits (batch x time x vocab) and another of their gradient. Gone: `forward`
    is not `convert_outputs_to_fp32`'s wrapper around a `ConvertOutputsToFp32` with the autocast forward in
    `model_forward`, or `_original_forward` is not the bound forward Accelerate saved.
    """
    from accelerate.utils import operations

    upcasting = getattr(operations, "ConvertOutputsToFp32", None)
    upcast = getattr(model.__dict__.get("forward"), "__wrapped__", None)
    if (upcasting is None or not isinstance(upcast, upcasting) or not hasattr(upcast, "model_forward")
            or not inspect.ismethod(model.__dict__.get("_original_forward"))):
        return False
    model.forward = MethodType(upcast.model_forward, model)  # the autocast-wrapped forward Accelerate made
    return True

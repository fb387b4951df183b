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
from torch.overrides import TorchFunctionMode


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


def orthogonalize_in_fp32_where_bf16_is_emulated() -> bool:
    """Run torch.optim.Muon's Newton-Schulz iterations in fp32 on a CPU without bf16 kernels.

    Muon casts each update to bf16 before orthogonalising it, which suits GPUs and bf16 CPUs; a CPU without
    bf16 matmul kernels (AVX2, no AVX-512 BF16/AMX) emulates them about 40x slower than fp32, and the optimizer
    step then costs ten forward-backward passes of a small GPT. There the iterations run in fp32, a more
    precise orthogonalisation of the same update: `_zeropower_via_newtonschulz` runs under a TorchFunctionMode
    that turns its `.bfloat16()` into an fp32 copy. Gone: `torch.optim._muon` has no
    `_zeropower_via_newtonschulz`, or `_single_tensor_muon` no longer calls it.
    """
    try:
        from torch.optim import _muon
    except ImportError:
        return False
    original = getattr(_muon, "_zeropower_via_newtonschulz", None)
    caller = getattr(_muon, "_single_tensor_muon", None)
    if original is None or caller is None or "_zeropower_via_newtonschulz" not in caller.__code__.co_names:
        return False
    if getattr(original, "keeps_fp32_on_emulated_bf16", False):
        return True

    @functools.wraps(original)
    def orthogonalize(grad: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        from lmdist.perf import native_cpu_bf16

        if grad.device.type != "cpu" or native_cpu_bf16():
            return original(grad, *args, **kwargs)
        with _Bf16CastsCopyInFp32():
            return original(grad, *args, **kwargs)

    orthogonalize.keeps_fp32_on_emulated_bf16 = True
    _muon._zeropower_via_newtonschulz = orthogonalize
    return True


class _Bf16CastsCopyInFp32(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.bfloat16:  # a copy, as the cast is: the iterations work in place on it
            return args[0].to(torch.float32, copy=True)
        return func(*args, **(kwargs or {}))

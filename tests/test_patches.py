"""lmdist.patches against the installed accelerate and torch: each test fails when its patch stops taking effect
(an upgrade that renames the internal turns it red) or when its guard would crash on a library without it."""
from __future__ import annotations

import os
import subprocess
import sys

import accelerate.optimizer
import torch

from lmdist import engine, patches
from lmdist.config import make_config


def test_accelerates_lomo_lookup_is_made_once_however_many_steps(monkeypatch, tmp_path):
    calls = []

    def is_lomo_available() -> bool:
        calls.append(1)
        return False

    monkeypatch.setattr(accelerate.optimizer, "is_lomo_available", is_lomo_available)
    engine.build_accelerator(make_config({"output_dir": str(tmp_path)}))  # applies the patch
    model = torch.nn.Linear(2, 1)
    optimizer = accelerate.optimizer.AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    for _ in range(3):
        model(torch.ones(1, 2)).sum().backward()
        before = model.weight.detach().clone()
        optimizer.step()
        assert not torch.equal(model.weight, before), "it still steps, through the cached lookup"
    # 0: accelerate's step no longer asks through this name, and the patch caches nothing; 6: no cache
    assert len(calls) == 1


def test_the_lomo_patch_does_nothing_without_its_internal(monkeypatch):
    monkeypatch.delattr(accelerate.optimizer, "is_lomo_available")
    assert patches.remember_installed_packages() is False
    assert not hasattr(accelerate.optimizer, "is_lomo_available")


MIXED_PRECISION_OUTPUTS = """
import torch
from accelerate import Accelerator
from lmdist import engine, optim
from lmdist.config import TrainConfig
from lmdist.models import build_model

accelerator = Accelerator(cpu=True, mixed_precision="bf16")
cfg = TrainConfig(model="gpt", n_layer=1, n_head=2, n_embd=32, block_size=8, dropout=0)
idx = torch.randint(0, 64, (2, 8))
upcast = accelerator.prepare(build_model(cfg, 64))
model = build_model(cfg, 64)
with torch.autocast("cpu", dtype=torch.bfloat16):
    want = model(idx)
model, _ = engine.prepare(accelerator, model, optim.build_optimizer(cfg, model))  # as train.py does
alone, = engine.prepare(accelerator, build_model(cfg, 64))  # as `lmdist eval` does
print(upcast(idx).dtype, model(idx).dtype, torch.equal(model(idx), want), alone(idx).dtype)
"""


def test_a_mixed_precision_model_returns_autocast_logits():
    """Accelerate upcasts a prepared model's outputs to fp32 (the first dtype printed); lmdist keeps them in bf16,
    computed under the same autocast (its loss upcasts inside, fused)."""
    done = subprocess.run([sys.executable, "-c", MIXED_PRECISION_OUTPUTS], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["torch.float32", "torch.bfloat16", "True", "torch.bfloat16"]


def test_the_autocast_patch_leaves_a_forward_accelerate_did_not_wrap(monkeypatch):
    from accelerate.utils import operations

    model = torch.nn.Linear(2, 1)
    assert patches.keep_autocast_outputs(model) is False and "forward" not in model.__dict__
    model._original_forward = model.forward
    model.forward = wrapped = operations.convert_outputs_to_fp32(model.forward)  # as Accelerate's prepare does
    monkeypatch.delattr(operations, "ConvertOutputsToFp32")  # an accelerate that upcasts some other way
    assert patches.keep_autocast_outputs(model) is False and model.forward is wrapped


def test_muon_orthogonalises_in_fp32_where_bf16_is_emulated(monkeypatch):
    """On a CPU without bf16 kernels the Newton-Schulz iterations run in fp32 (an orthogonal-ish update of the
    same gradient, to bf16's precision); on one with them, Muon's own bf16 path runs untouched."""
    from torch.optim import _muon

    current = _muon._zeropower_via_newtonschulz  # already wrapped when an earlier test built a Muon optimizer
    original = getattr(current, "__wrapped__", current)
    monkeypatch.setattr(_muon, "_zeropower_via_newtonschulz", original)  # torch's own, until the test ends
    assert patches.orthogonalize_in_fp32_where_bf16_is_emulated() is True
    assert patches.orthogonalize_in_fp32_where_bf16_is_emulated() is True  # once: not wrapped twice
    assert _muon._zeropower_via_newtonschulz.__wrapped__ is original
    grad = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    args = ((3.4445, -4.775, 2.0315), 5, 1e-7)
    bf16 = original(grad, *args)
    for native, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr("lmdist.perf.native_cpu_bf16", lambda native=native: native)
        update = _muon._zeropower_via_newtonschulz(grad, *args)
        assert update.dtype == dtype and update.shape == grad.shape
        assert torch.allclose(update.float(), bf16.float(), atol=0.05)
        singular = torch.linalg.svdvals(update.float())
        assert singular.min() > 0.5 and singular.max() < 1.5  # what Muon's quintic iteration makes of a matrix
    weight = torch.nn.Parameter(grad.clone())
    weight.grad = grad.clone()
    torch.optim.Muon([weight], lr=0.1).step()  # torch's Muon calls the wrapper with its own arguments
    assert not torch.equal(weight, grad)


def test_the_muon_patch_does_nothing_without_its_internal(monkeypatch):
    from torch.optim import _muon

    monkeypatch.delattr(_muon, "_zeropower_via_newtonschulz")
    assert patches.orthogonalize_in_fp32_where_bf16_is_emulated() is False
    assert not hasattr(_muon, "_zeropower_via_newtonschulz")

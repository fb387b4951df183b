"""Speed accounting: FLOPs per token against torch's FLOP counter, MFU, data wait, peaks, fast defaults."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmdist import engine, optim, perf
from lmdist.config import make_config
from lmdist.errors import ConfigError
from lmdist.models import GPT, LSTMLanguageModel, build_model


def counted_flops_per_token(loss_of: callable, idx: torch.Tensor) -> float:
    """FLOPs torch's counter sees in one forward and backward pass, per token."""
    with FlopCounterMode(display=False) as counter:
        loss_of(idx).backward()
    return counter.get_total_flops() / idx.numel()


@pytest.mark.parametrize("options", [{"gpt_style": "gpt2"}, {"gpt_style": "modern"},
                                     {"gpt_style": "modern", "mlp": "relu2", "tie_weights": True},
                                     {"gpt_style": "gpt2", "mlp": "swiglu", "bias": False, "tie_weights": False},
                                     {"gpt_style": "gpt2", "position": "rope", "qk_norm": True, "norm": "rmsnorm"},
                                     {"gpt_style": "modern", "n_kv_head": 2, "head_dim": 24, "mlp_width": 100,
                                      "qkv_bias": True}],
                         ids=["gpt2", "modern", "modern-relu2-tied", "gpt2-swiglu-untied", "gpt2-rope-qknorm",
                              "modern-gqa-head24-mlp100"])
def test_gpt_flops_per_token_is_the_palm_formula_and_what_torch_counts(options):
    model = build_model(make_config({"model": "gpt", "block_size": 64, "n_layer": 3, "n_head": 4, "n_embd": 64,
                                     "dropout": 0.0, **options}), 512)
    lookups = [model.wpe.weight] if hasattr(model, "wpe") else []  # position and token embeddings are not matmuls,
    if model.lm_head.weight is not model.wte.weight:  # except a token embedding that is the head too
        lookups.append(model.wte.weight)
    n = sum(p.numel() for p in model.parameters()) - sum(w.numel() for w in lookups)
    assert model.flops_per_token() == 6 * n + 12 * 3 * (4 * options.get("head_dim", 16)) * 64  # query heads' width
    idx = torch.randint(0, 512, (2, 64))
    with sdpa_kernel(SDPBackend.MATH):  # attention as plain matmuls, which the counter sees
        counted = counted_flops_per_token(lambda i: F.cross_entropy(model(i).flatten(0, 1), i.flatten()), idx)
    # The convention counts biases and norm weights as matmul weights (a fraction of a percent) and the
    # causal attention's full T x T square, as the math kernel computes it.
    assert counted == pytest.approx(model.flops_per_token(), rel=0.02)


@pytest.mark.parametrize("tie", [True, False])
def test_lstm_flops_per_token_are_its_matmul_flops(tie):
    """Against the same model unrolled into LSTMCells, whose matmuls torch's counter sees (nn.LSTM is one
    opaque kernel to it)."""
    model = LSTMLanguageModel(vocab_size=300, embedding_dim=48, hidden_dim=64, num_layers=2, dropout=0.0,
                              tie_weights=tie)
    cells = [torch.nn.LSTMCell(layer.input_size, layer.hidden_size) for layer in model.layers]

    def unrolled_loss(idx: torch.Tensor) -> torch.Tensor:
        x = model.embedding(idx)
        for cell in cells:
            h = c = torch.zeros(idx.shape[0], cell.hidden_size)
            outputs = []
            for t in range(idx.shape[1]):
                h, c = cell(x[:, t], (h, c))
                outputs.append(h)
            x = torch.stack(outputs, dim=1)
        return F.cross_entropy(model.decoder(x).flatten(0, 1), idx.flatten())

    counted = counted_flops_per_token(unrolled_loss, torch.randint(0, 300, (2, 32)))
    # (the zero initial state needs no gradient, which saves the counter a little at each sequence start)
    assert counted == pytest.approx(model.flops_per_token(), rel=0.03)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throughput_reports_tokens_mfu_and_data_wait(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(perf.time, "perf_counter", clock)
    meter = perf.Throughput(tokens_per_step=1000, flops_per_token=6e6, peak=perf.Peak(1e12, "test"), world_size=2)

    class SlowBatches:  # each batch takes 0.5 s to arrive
        def __iter__(self):
            for i in range(4):
                clock.now += 0.5
                yield i

    for _ in meter.timed(SlowBatches()):
        clock.now += 1.5  # the step itself
        meter.step()
    with meter.paused():  # evaluation: not training time
        clock.now += 100.0
    row = meter.report()
    assert row["tokens_per_sec"] == pytest.approx(4000 / 8.0)
    assert row["data_wait"] == pytest.approx(2.0 / 8.0)
    assert row["mfu"] == pytest.approx(500 * 6e6 / 2e12)  # both ranks' peaks
    assert perf.Throughput(1000, 6e6, None, 1).report().keys() == {"tokens_per_sec", "data_wait"}  # no peak, no mfu
    assert meter.facts() == {"flops_per_token": 6e6, "peak_flops_per_process": 1e12, "peak_flops_source": "test"}


def test_peaks_from_the_setting_the_datasheet_or_a_measurement():
    cpu = torch.device("cpu")
    assert perf.peak_flops(cpu, "no", 2.5).flops == 2.5e12
    assert perf.peak_flops(cpu, "bf16", 0) is None  # 0: no mfu
    assert perf.datasheet_peak("NVIDIA H100 80GB HBM3").flops == 989e12
    assert perf.datasheet_peak("NVIDIA H100 PCIe").flops == 756e12
    assert perf.datasheet_peak("NVIDIA L40S").flops == 362e12 and perf.datasheet_peak("Tesla T4") is None
    measured = perf.peak_flops(cpu, "no", None)
    assert measured.flops > 1e9 and "measured float32 matmul" in measured.source


def test_a_measured_peak_is_kept_per_machine_and_conditions(tmp_path, monkeypatch):
    """A launch reuses the peak measured under the same conditions (0.3 s of every start-up and resume), and
    measures again under others; a torn or unwritable cache is measured around."""
    monkeypatch.setenv("LMDIST_CACHE_DIR", str(tmp_path / "cache"))
    rates = iter([1e11, 2e11, 3e11, 4e11, 5e11, 6e11, 7e11])
    monkeypatch.setattr(perf, "measure_matmul_flops", lambda *args, **kwargs: next(rates))
    monkeypatch.setattr(perf, "onednn_usable", lambda *args: False)
    cpu = torch.device("cpu")
    first = perf.peak_flops(cpu, "no", None)
    assert first.flops == 1e11 and "cached" not in first.source
    again = perf.peak_flops(cpu, "no", None)
    assert again.flops == 1e11 and f"cached {time.strftime('%Y-%m-%d')}" in again.source
    assert str(tmp_path / "cache" / "peak_flops.json") in again.source
    assert perf.peak_flops(cpu, "no", None, local_processes=2).flops == 2e11  # ranks sharing the cores
    with torch_threads(torch.get_num_threads() + 1):
        assert perf.peak_flops(cpu, "no", None).flops == 3e11
    assert perf.peak_flops(cpu, "no", None, local_processes=2).flops == 2e11
    assert len(perf.cached_peaks(perf.peak_cache())) == 3
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "peak_flops.json"]  # no temp file left
    (tmp_path / "cache" / "peak_flops.json").write_text('{"torn')
    assert perf.peak_flops(cpu, "no", None).flops == 4e11
    assert perf.peak_flops(cpu, "no", None).flops == 4e11  # rewritten whole
    entries = perf.cached_peaks(perf.peak_cache())
    (tmp_path / "cache" / "peak_flops.json").write_text(json.dumps({key: {"flops": "fast"} for key in entries}))
    assert perf.peak_flops(cpu, "no", None).flops == 5e11  # an entry edited by hand: measured again
    monkeypatch.setenv("LMDIST_CACHE_DIR", str(tmp_path / "cache" / "peak_flops.json" / "not a folder"))
    assert perf.peak_flops(cpu, "no", None).flops == 6e11
    assert perf.peak_flops(cpu, "no", None).flops == 7e11


@contextmanager
def torch_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_a_cpu_that_emulates_bf16_is_named_and_measured_by_its_fp32_units(monkeypatch):
    """Without oneDNN bf16 kernels bf16 autocast is emulated (5x slower than fp32 on an AVX2 EPYC): the user is
    warned, and `mfu` divides by the fp32 rate the emulation runs on, not by a bf16 rate that the model's
    own emulated matmuls exceed (mfu 5.5 before)."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(perf, "native_cpu_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 kernels.*without --mixed_precision bf16"):
        engine.check_precision("bf16", cpu)
    peak = perf.peak_flops(cpu, "bf16", None)
    assert "measured float32 matmul" in peak.source and "emulates bf16" in peak.source and peak.flops > 1e9
    monkeypatch.setattr(perf, "native_cpu_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.check_precision("bf16", cpu)
        engine.check_precision("bf16", torch.device("cuda"))
    with pytest.raises(ConfigError, match="fp16 mixed precision needs a GPU"):
        engine.check_precision("fp16", cpu)


def test_peak_memory_is_this_process_resident_peak():
    before = perf.peak_memory(torch.device("cpu"))["peak_rss_mb"]
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = perf.peak_memory(torch.device("cpu"))["peak_rss_mb"]
    assert before > 10 and after >= before and after > block.numel() * 4 / 2**20


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_is_fused_and_skips_decay_on_biases_and_norms(name):
    model = GPT(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    optimizer = optim.build_optimizer(make_config({"model": "gpt", "optimizer": name}), model)
    assert optimizer.defaults["fused"] is True
    decayed, plain = optimizer.param_groups
    assert all(p.dim() >= 2 for p in decayed["params"]) and decayed["weight_decay"] > 0
    assert all(p.dim() < 2 for p in plain["params"]) and plain["weight_decay"] == 0
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_compile_compiles_the_loss_with_the_model():
    """Compiled, the loss's fp32 upcast, softmax and top-1 hits fuse into one pass over the logits (GPT-2 124M on
    an H200: 400k -> 449k tokens/s); it must stay the eager loss, with the same meter sums."""
    eager = engine.loss_function(make_config({"compile": False}))
    compiled = engine.loss_function(make_config({"compile": True}))
    assert not hasattr(eager, "_torchdynamo_orig_callable") and hasattr(compiled, "_torchdynamo_orig_callable")
    logits, targets = torch.randn(2, 6, 17, dtype=torch.bfloat16), torch.randint(0, 17, (2, 6))
    targets[0] = logits[0].argmax(-1)  # at least 6 hits
    want = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    hits = (logits.argmax(-1) == targets).sum().item()
    loss, sums = eager(logits, targets)
    assert torch.equal(loss, want) and sums.tolist() == pytest.approx([12 * want.item(), hits, 12]) and hits >= 6
    compiled_loss, compiled_sums = compiled(logits, targets)
    torch.testing.assert_close((compiled_loss, compiled_sums), (loss, sums))


def test_dataloader_workers_default_to_none_on_cpu_and_two_per_gpu():
    assert engine.dataloader_workers(make_config({}), torch.device("cpu")) == 0
    assert engine.dataloader_workers(make_config({}), torch.device("cuda")) == 2
    assert engine.dataloader_workers(make_config({"num_workers": 3}), torch.device("cpu")) == 3


def test_lmdist_peak_reports_measured_matmul_rates_and_the_cached_peaks(tmp_path):
    runs_measured = {"AMD EPYC x2, 2 threads, 1 processes, float32, torch 2.13.0+cpu": {"flops": 1e11}}
    (tmp_path / "peak_flops.json").write_text(json.dumps(runs_measured))
    done = subprocess.run([sys.executable, "-m", "lmdist", "peak", "--seconds", "0.2", "--threads", "1"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LMDIST_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["device"] == "cpu" and report["threads"] == 1 and report["datasheet_bf16_tflops"] is None
    assert report["measured_tflops"]["float32"] > 0.001 and report["measured_onednn_float32_tflops"] > 0.001
    # emulated bf16 (CPUs without AVX-512) runs at about 1 GFLOP/s, measured on a smaller matmul
    assert report["measured_tflops"]["bfloat16"] > (1e-4 if "cpu_bf16" in report else 0.001)
    assert ("cpu_bf16" in report) == (not perf.native_cpu_bf16())
    assert report["peak_cache"] == {"file": str(tmp_path / "peak_flops.json"), "measured": runs_measured}


# A child process: a "step" touches 16 buffers of 10 MB and frees them; the page faults of the second step.
# engine too, as in training: tune_host_allocator runs once accelerate and the rest are loaded (with torch alone
# loaded, glibc's heap still returned some buffers in about half the runs).
SECOND_STEP_FAULTS = """
import resource, sys, torch
from lmdist import engine, launch
print(launch.tune_host_allocator(), file=sys.stderr)
for step in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [torch.empty(2_500_000).fill_(1.0) for _ in range(16)]
    del buffers
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_host_memory_is_reused_without_page_faults_unless_the_user_tuned_malloc():
    def second_step_faults(**env: str) -> tuple[int, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        done = subprocess.run([sys.executable, "-c", SECOND_STEP_FAULTS], env={**clean, **env},
                              capture_output=True, text=True, check=True)
        return int(done.stdout), done.stderr.strip()

    faults, tuned = second_step_faults()
    assert tuned == "True" and faults < 4 * 2441, "the freed 160 MB stays in the heap for the next step"
    # glibc's own adaptive behaviour (a setting equal to its default, so lmdist leaves malloc alone):
    # the buffers are mapped afresh (2,441 pages each)
    faults, tuned = second_step_faults(GLIBC_TUNABLES="glibc.malloc.tcache_count=7")
    assert tuned == "False" and faults > 12 * 2441
    assert second_step_faults(MALLOC_ARENA_MAX="4")[1] == "False"

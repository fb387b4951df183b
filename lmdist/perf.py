"""How fast a run trains: tokens per second, model FLOPs utilisation (MFU), time spent waiting for data,
peak memory.

MFU = model FLOPs per token x tokens per second / peak FLOP/s of the processes that trained. The model
states its FLOPs per token (`flops_per_token()`: GPT the PaLM convention 6N + 12*L*n_embd*T, the LSTM
its matmul FLOPs). The peak is the GPU's datasheet dense bf16 rate when training in bf16/fp16 on a GPU
listed below, else a square matmul measured on this process's device, dtype and threads (with every rank of
the node measuring at once, so they compete for the cores as they do in training); on CPU in fp32 the faster of
torch's matmul (its BLAS) and oneDNN's.

The measurement is kept per machine in `peak_flops.json` of lmdist's cache folder ($LMDIST_CACHE_DIR, else
$XDG_CACHE_HOME/lmdist, else ~/.cache/lmdist), keyed by everything it depends on: the device's model, torch's
version, the dtype, threads per process and processes on the node. A launch then pays no measurement (0.3 s of
every start-up and resume on a CPU), and every run on that machine divides by the same peak, so their MFUs
compare. Deleting the file remeasures; a cache that cannot be read or written is measured around, never fatal.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lmdist.files import remove_quietly

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets; the first name
# contained in torch.cuda.get_device_name() wins, so the specific variants come first.
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                         ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0))


@dataclass
class Peak:
    """Peak FLOP/s of one process, and where the figure comes from."""

    flops: float
    source: str


def datasheet_peak(device_name: str) -> Peak | None:
    for name, tflops in DATASHEET_BF16_TFLOPS:
        if name in device_name:
            return Peak(tflops * 1e12, f"datasheet dense bf16, {device_name}")
    return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None,
                         seconds: float = 0.1, onednn: bool = False) -> float:
    """The best rate of an n x n x n matmul over about `seconds` (after one warm-up), in FLOP/s: torch's
    matmul, or with `onednn` (CPU) oneDNN's, which fp32 matmuls on some CPUs run at twice the rate of
    torch's BLAS (MKL keeps to AVX2 on AMD CPUs; oneDNN uses AVX-512). bf16 on a CPU that emulates it is
    measured at n <= 512 (a 2048^3 one would take a minute)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    if device.type == "cpu" and dtype == torch.bfloat16 and not native_cpu_bf16():
        n = min(n, EMULATED_BF16_MATMUL)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    if onednn:
        a, b = a.to_mkldnn(), b.to_mkldnn()

    def multiply() -> torch.Tensor:
        return torch._C._nn.mkldnn_linear(a, b) if onednn else a @ b

    multiply()
    best, began = 0.0, time.perf_counter()
    while time.perf_counter() - began < seconds or best == 0.0:
        _synchronize(device)
        start = time.perf_counter()
        multiply()
        _synchronize(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


EMULATED_BF16_MATMUL = 512


@functools.cache
def native_cpu_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 and newer). Without them torch runs bf16 matmuls
    in reference loops, far slower than fp32 (bench/README.md), and oneDNN's LSTM refuses bf16 altogether."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def onednn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def peak_flops(device: torch.device, mixed_precision: str, peak_tflops: float | None,
               local_processes: int = 1) -> Peak | None:
    """This process's peak: `peak_tflops` when set (0: none, no MFU), else the datasheet or a measurement (kept in
    the cache, see the module's docstring) made while `local_processes` processes of the node measure at once."""
    if peak_tflops is not None:
        return Peak(peak_tflops * 1e12, "peak_tflops setting") if peak_tflops > 0 else None
    low_precision = mixed_precision in ("bf16", "fp16")
    if device.type == "cuda" and low_precision:
        known = datasheet_peak(torch.cuda.get_device_name(device))
        if known:
            return known
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    emulated = device.type == "cpu" and dtype == torch.bfloat16 and not native_cpu_bf16()
    if emulated:  # emulated bf16 computes in fp32 units: their rate is the limit (and takes 0.1 s, not 6 s, to measure)
        dtype = torch.float32
    where = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    key = (f"{device_model(device)}{where}, {local_processes} processes, {str(dtype).removeprefix('torch.')}, "
           f"torch {torch.__version__}")
    cache = peak_cache()
    cached = cached_peaks(cache).get(key)
    if isinstance(cached, dict) and isinstance(cached.get("flops"), int | float) and cached["flops"] > 0:
        flops, kernel = cached["flops"], cached.get("kernel", "?")
        when = f"; cached {cached.get('measured_at', '')} in {cache}"
    else:
        measured = {"torch": measure_matmul_flops(device, dtype)}
        if onednn_usable(device, dtype):  # the machine's fp32 peak is the faster of the two (the LSTM runs oneDNN)
            measured["oneDNN"] = measure_matmul_flops(device, dtype, onednn=True)
        kernel = max(measured, key=measured.get)
        flops, when = measured[kernel], ""
        _remember(cache, key, {"flops": flops, "kernel": kernel,
                               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    note = "; this CPU emulates bf16" if emulated else ""
    return Peak(flops, f"measured {str(dtype).removeprefix('torch.')} matmul ({kernel}){where}{note}{when}")


def peak_cache() -> str:
    """The file of measured peaks in lmdist's per-user cache folder (the module's docstring)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.environ.get("LMDIST_CACHE_DIR") or os.path.join(base, "lmdist"), "peak_flops.json")


def device_model(device: torch.device) -> str:
    """The model of the device a peak is measured on: a GPU's name, a CPU's name and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or platform.machine()} x{os.cpu_count()}"


def cached_peaks(path: str) -> dict:
    """The measurements in the cache at `path`, by key; none where it is missing, unreadable or torn."""
    try:
        with open(path) as f:
            found = json.load(f)
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(path: str, key: str, entry: dict) -> None:
    """Add `entry` to the cache at `path` through a temp file of its own, so that ranks writing at once never
    tear it (one of their entries may be lost: it is measured again next time)."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=".peak_flops.")
    except OSError:  # a read-only home: this launch measured, the next measures again
        return
    try:
        with os.fdopen(handle, "w") as f:
            json.dump({**cached_peaks(path), key: entry}, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        remove_quietly(tmp)


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory (and peak GPU memory allocated by torch), in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    row = {"peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    if device.type == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


class Throughput:
    """Training speed over the window since the last `report()`; evaluation and checkpoint time excluded.

    `tokens_per_sec` counts every rank's tokens; `mfu` divides the model FLOP/s by every rank's peak;
    `data_wait` is the fraction of training time spent waiting for the next batch.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: Peak | None, world_size: int):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak = peak
        self.peak_flops = peak.flops * world_size if peak else None
        self.start, self.excluded, self.waited, self.steps = time.perf_counter(), 0.0, 0.0, 0

    def facts(self) -> dict:
        """For run.json: the FLOPs and the peak that `mfu` is computed from."""
        return {"flops_per_token": self.flops_per_token, "peak_flops_per_process": self.peak and self.peak.flops,
                "peak_flops_source": self.peak and self.peak.source}

    def timed(self, batches: Iterable) -> Iterator:
        """Yield from `batches`, adding the time each one takes to arrive to the data wait."""
        iterator = iter(batches)
        while True:
            began = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - began
            yield batch

    def step(self) -> None:
        self.steps += 1

    @contextmanager
    def paused(self):
        began = time.perf_counter()
        yield
        self.excluded += time.perf_counter() - began

    def report(self) -> dict[str, float]:
        """tokens_per_sec, mfu (when the peak is known) and data_wait over the window; starts a new window."""
        now = time.perf_counter()
        seconds = max(now - self.start - self.excluded, 1e-9)
        tokens_per_sec = self.steps * self.tokens_per_step / seconds
        row = {"tokens_per_sec": tokens_per_sec}
        if self.peak_flops:
            row["mfu"] = tokens_per_sec * self.flops_per_token / self.peak_flops
        row["data_wait"] = min(self.waited / seconds, 1.0)
        self.start, self.excluded, self.waited, self.steps = now, 0.0, 0.0, 0
        return row


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

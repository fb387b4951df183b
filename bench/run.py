"""lmdist's benchmark suite: whole training runs, repeated, compared side by side in one invocation.

    python bench/run.py                  # the suite (about 50 min on 2 AVX2 cores): table, results.json, README
    python bench/run.py --smoke          # seconds per section, tiny models: checks the harness, asserts no figure
    python bench/run.py --only overhead,data --repeats 6   # some sections, merged into bench/results.json

The README it regenerates is bench/README.md, which also says what each figure means.

Every figure comes from separate processes launched the way a user launches them (`python train.py`,
`accelerate launch`), each measured over log windows after a warm-up window. A run's speed is its fastest
window (as `timeit` takes the fastest repeat: other load only ever slows a window down), a configuration's
figure the median over its runs, and compared runs alternate (A B, B A, ...) so that drift in the machine
hits both sides alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench import data_scale, report  # noqa: E402
from lmdist import launch, perf  # noqa: E402

TRAIN, PLAIN, COUNT = REPO / "train.py", REPO / "bench" / "plain_loop.py", REPO / "bench" / "count_collectives.py"
CPU_CONFIG = REPO / "accelerate_configs" / "cpu.yaml"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"

# The sizes. `window`: optimizer steps per measured log window (about 3 s each here).
SIZES = {
    # pairs: at least this many A/B pairs when compared; the small models' short steps are the noisiest here
    # (4 pairs of GPT S spread from 0.94 to 1.02 in one run, 8 of LSTM S from 0.87 to 1.10)
    "GPT S": dict(flags="--model gpt --gpt_style gpt2 --n_layer 4 --n_head 4 --n_embd 128 --block_size 64 "
                        "--batch_size 32", window=25, pairs=8),
    "GPT M": dict(flags="--model gpt --gpt_style gpt2 --n_layer 6 --n_head 6 --n_embd 384 --block_size 256 "
                        "--batch_size 8", window=4),
    "GPT L": dict(flags="--model gpt --gpt_style gpt2 --n_layer 12 --n_head 12 --n_embd 768 --block_size 256 "
                        "--batch_size 4", window=1),
    "LSTM S": dict(flags="--model lstm --embedding_dim 200 --hidden_dim 200 --num_layers 2 --block_size 35 "
                         "--batch_size 20", window=100, pairs=8),
    "LSTM M": dict(flags="--model lstm --embedding_dim 650 --hidden_dim 650 --num_layers 2 --block_size 35 "
                         "--batch_size 20", window=10),
}
SMOKE_SIZES = {
    "GPT S": dict(flags="--model gpt --gpt_style gpt2 --n_layer 1 --n_head 2 --n_embd 32 --block_size 32 "
                        "--batch_size 4", window=2),
    "LSTM S": dict(flags="--model lstm --embedding_dim 32 --hidden_dim 32 --num_layers 1 --block_size 16 "
                         "--batch_size 4", window=2),
}
# Nothing but training in the measured windows: no evaluation or checkpoint before the last step, no W&B.
COMMON = "--wandb_mode disabled --eval_every 1000000 --save_every 1000000 --eval_batches 1 --warmup_steps 2"
TARGETS = {"overhead": 0.97, "scaling": 0.90, "data_wait": 0.01, "mfu_fp32": 0.45,
           "time_to_loss": 0.4, "loss_gain": 0.15, "modern_speed": 0.8,
           "prepare_ratio": 1.2, "bytes_per_token": 2.1, "launch_s": 5.0,
           "prepare_sizes": ["100MB", "1GB"], "launch_sizes": ["1GB"]}  # where issue 17 sets those two

# time_to_loss: the recipes compared, on the shapes of the issue (GPT S is nanoGPT's CPU shape and recipe).
# `every`: steps between evaluations on the same fixed validation batches (2.5% of the run: the crossing
# step is found to within that); `seeds`: runs per recipe (the ablation's architecture alone takes one).
RECIPES = {
    "gpt2": "--gpt_style gpt2 --lr 1e-3 --min_lr 1e-4",  # today's recipe: AdamW, cosine (nanoGPT's char values)
    "modern": "--gpt_style modern --optimizer muon --lr_schedule wsd --min_lr 0",
    "modern_adamw": "--gpt_style modern --lr 1e-3 --min_lr 1e-4",  # the architecture alone, today's optimizer
}
TTL_COMMON = ("--model gpt --tokenizer char --dropout 0 --warmup_steps 100 --weight_decay 0.1 --eval_batches 40 "
              "--save_every 1000000 --wandb_mode disabled")
TTL_SIZES = {
    "GPT S": dict(flags="--n_layer 4 --n_head 4 --n_embd 128 --block_size 64 --batch_size 12", steps=2000, every=50,
                  seeds=3, cost_steps=20),
    "GPT M": dict(flags="--n_layer 6 --n_head 6 --n_embd 384 --block_size 256 --batch_size 8", steps=250, every=10,
                  seeds=1, cost_steps=4),  # about 10 minutes a run here
}
TTL_SMOKE = {"GPT S": dict(flags="--n_layer 1 --n_head 2 --n_embd 32 --block_size 32 --batch_size 4", steps=20,
                           every=5, seeds=1, cost_steps=2)}
STEP_PHASES = ("forward", "backward", "optimizer")


class Bench:
    def __init__(self, smoke: bool, repeats: int, workdir: str, ttl_sizes: list[str] | None = None,
                 data_sizes: list[str] | None = None):
        self.smoke, self.repeats, self.workdir, self.data_sizes = smoke, repeats, Path(workdir), data_sizes
        self.ttl_sizes = TTL_SMOKE if smoke else {size: TTL_SIZES[size] for size in ttl_sizes or TTL_SIZES}
        self.sizes = SMOKE_SIZES if smoke else SIZES
        self.windows = 1 if smoke else 3  # measured windows per run, after one warm-up window
        self.runs = 0
        self.efficiency_runs: dict[str, dict] = {}  # size -> the single-process fp32 run, shared by sections

    # ------------------------------------------------------------------------- one run

    def train(self, size: str, overrides: dict | None = None, script: Path = TRAIN, processes: int = 1,
              env: dict | None = None) -> dict:
        """One whole run of `size` (flags changed by `overrides`); the medians of its measured log windows,
        its wall time and facts."""
        window = self.sizes[size]["window"]
        self.runs += 1
        out = self.workdir / f"run{self.runs:03d}"
        settings = {**flag_dict(self.sizes[size]["flags"] + " " + COMMON), "log_every": window,
                    "max_steps": window * (1 + self.windows), "output_dir": out, **(overrides or {})}
        flags = [word for name, value in settings.items() for word in (f"--{name}", str(value))]
        if processes == 1:
            command = [sys.executable, str(script), *flags]
        else:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
                       "--num_processes", str(processes), str(script), *flags]
        began = time.perf_counter()
        done = subprocess.run(command, cwd=self.workdir, env={**os.environ, **(env or {})},
                              capture_output=True, text=True)
        wall = time.perf_counter() - began
        if done.returncode != 0:
            raise RuntimeError(f"bench run failed ({' '.join(command)}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        measured = [r for r in rows if "tokens_per_sec" in r][1:]  # the first window pays the warm-up
        result = {"tokens_per_sec": [r["tokens_per_sec"] for r in measured], "wall_s": wall,
                  "peak_rss_mb": max(r["peak_rss_mb"] for r in rows if "peak_rss_mb" in r)}
        for key in ("data_wait", "mfu"):
            if key in measured[0]:
                result[key] = statistics.median(r[key] for r in measured)
        if (out / "run.json").exists():
            facts = json.loads((out / "run.json").read_text())
            result.update(flops_per_token=facts["flops_per_token"], threads=facts["threads"])
        return result

    def alternate(self, size: str, a: dict, b: dict) -> tuple[dict, dict, list[float]]:
        """Runs of `a` and `b` (each: keyword arguments of `train`), `repeats` each, in the order A B, B A, A B, ...
        (this machine's speed drifts by 10-20% over seconds, so neither side may always go first). Returns
        both sides merged and each pair's ratio of speeds (fastest windows), a / b. A comparison's figure is the
        median of its pairs' ratios: the two runs of a pair share the machine's drift, which the ratio of the
        sides' medians would not cancel."""
        runs_a, runs_b = [], []
        for repeat in range(max(self.repeats, 1 if self.smoke else self.sizes[size].get("pairs", 0))):
            for side in ((a, runs_a), (b, runs_b))[:: 1 if repeat % 2 == 0 else -1]:
                side[1].append(self.train(size, **side[0]))
        pairs = [max(x["tokens_per_sec"]) / max(y["tokens_per_sec"]) for x, y in zip(runs_a, runs_b, strict=True)]
        return merge(runs_a), merge(runs_b), pairs

    # ------------------------------------------------------------------------- the figures

    def overhead(self) -> list[dict]:
        """lmdist against the plain PyTorch loop, one process, same flags and threads."""
        rows = []
        for size in [s for s in ("GPT S", "GPT M", "LSTM S") if s in self.sizes]:
            lmdist, plain, pairs = self.alternate(size, {}, {"script": PLAIN})
            rows.append({"size": size, "lmdist_tokens_per_sec": lmdist["tokens_per_sec"],
                         "plain_tokens_per_sec": plain["tokens_per_sec"],
                         "ratio": statistics.median(pairs), "pair_ratios": pairs,
                         "lmdist_peak_rss_mb": lmdist["peak_rss_mb"], "plain_peak_rss_mb": plain["peak_rss_mb"]})
            self.efficiency_runs[size] = lmdist
        return rows

    def scaling(self) -> list[dict]:
        """2 CPU ranks (1 thread each) against 1 process with 2 threads, same global batch."""
        rows = []
        cases = [("GPT S", 1), ("GPT M", 1), ("GPT S", 4)] if not self.smoke else [("GPT S", 1), ("GPT S", 2)]
        for size, grad_accum in cases:
            per_rank = int(flag_dict(self.sizes[size]["flags"])["batch_size"]) // 2
            one, two, pairs = self.alternate(
                size, {"overrides": {"batch_size": 2 * per_rank, "grad_accum": grad_accum}},
                {"overrides": {"batch_size": per_rank, "grad_accum": grad_accum}, "processes": 2})
            rows.append({"size": size, "grad_accum": grad_accum, "one_process_tokens_per_sec": one["tokens_per_sec"],
                         "two_ranks_tokens_per_sec": two["tokens_per_sec"],
                         "ratio": statistics.median(1 / p for p in pairs),
                         "pair_ratios": [1 / p for p in pairs],
                         "one_process_peak_rss_mb": one["peak_rss_mb"], "two_ranks_peak_rss_mb": two["peak_rss_mb"]})
        return rows

    def collectives(self) -> dict:
        """All-reduces per run with grad_accum 1 and 4 and the same optimizer steps: equal when accumulation
        micro-steps skip the gradient all-reduce."""
        counts = {}
        for grad_accum in (1, 4):
            path = self.workdir / f"collectives_{grad_accum}.json"
            self.runs += 1
            settings = {**flag_dict(SMOKE_SIZES["GPT S"]["flags"] + " " + COMMON), "batch_size": 2,
                        "grad_accum": grad_accum, "max_steps": 4, "log_every": 2,
                        "output_dir": self.workdir / f"run{self.runs:03d}"}
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
                       str(COUNT), str(path), *(w for k, v in settings.items() for w in (f"--{k}", str(v)))]
            done = subprocess.run(command, cwd=self.workdir, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"collective count failed:\n{done.stderr[-3000:]}")
            counts[grad_accum] = json.loads(Path(f"{path}.rank0").read_text()).get("c10d::allreduce_", 0)
        return {"optimizer_steps": 4, "allreduce_grad_accum_1": counts[1], "allreduce_grad_accum_4": counts[4],
                "no_allreduce_on_micro_steps": counts[1] == counts[4]}

    def data(self) -> dict:
        """Token preparation, launches and memory against the corpus's size, beside a nanoGPT-style baseline
        (bench/data_scale.py says what and how)."""
        return data_scale.measure(self.workdir, self.repeats, self.smoke, self.data_sizes)

    def efficiency(self, peak: dict) -> list[dict]:
        """tokens/s, MFU against the measured fp32 matmul rate, data wait and memory for every size."""
        rows = []
        for size in self.sizes:
            run = self.efficiency_runs.get(size) or merge([self.train(size)])
            self.efficiency_runs[size] = run
            rows.append({"size": size, "tokens_per_sec": run["tokens_per_sec"],
                         "flops_per_token": run["flops_per_token"],
                         "mfu_fp32": run["tokens_per_sec"] * run["flops_per_token"] / peak["fp32_flops"],
                         "mfu_best_fp32": run["tokens_per_sec"] * run["flops_per_token"]
                         / max(peak["fp32_flops"], peak["fp32_onednn_flops"]),
                         "data_wait": run["data_wait"], "peak_rss_mb": run["peak_rss_mb"], "threads": run["threads"]})
        return rows

    def options(self, peak: dict) -> list[dict]:
        """The effect of `compile` and of bf16 autocast, whole-run wall time (compile time) included."""
        rows = []
        for size in [s for s in ("GPT S", "GPT M", "LSTM S") if s in self.sizes]:
            eager = self.efficiency_runs.get(size) or merge([self.train(size)])
            for option, overrides, env, peak_flops in (
                    ("compile", {"compile": True}, {}, max(peak["fp32_flops"], peak["fp32_onednn_flops"])),
                    ("bf16", {}, {"ACCELERATE_MIXED_PRECISION": "bf16"}, bf16_peak(peak))):
                run = merge([self.train(size, overrides, env=env)])
                rows.append({"size": size, "option": option, "eager_tokens_per_sec": eager["tokens_per_sec"],
                             "tokens_per_sec": run["tokens_per_sec"],
                             "speedup": run["tokens_per_sec"] / eager["tokens_per_sec"],
                             "mfu": run["tokens_per_sec"] * run["flops_per_token"] / peak_flops,
                             "eager_wall_s": eager["wall_s"], "wall_s": run["wall_s"],
                             "steps": self.sizes[size]["window"] * (1 + self.windows),
                             "peak_rss_mb": run["peak_rss_mb"]})
        return rows

    def time_to_loss(self) -> list[dict]:
        """The modern recipe (RoPE, RMSNorm, QK-norm, SwiGLU, Muon, wsd) against GPT-2's (AdamW, cosine), the same
        corpus, shape, batches and steps: validation loss at equal steps, and the steps and training time the
        modern run takes to first reach the baseline's final validation loss. Training time is the sum of the
        logged windows' durations (tokens / tokens per second): evaluation and start-up stay out of both.
        """
        data = ["--dataset", "builtin"]
        if WIKITEXT.is_dir() and not self.smoke:  # optional input: WikiText-2, character-level
            data = ["--dataset", str(WIKITEXT / "test.txt"), "--val_dataset", str(WIKITEXT / "valid.txt")]
        rows = []
        for size, shape in self.ttl_sizes.items():
            runs: dict[str, list[dict]] = {name: [] for name in RECIPES}
            for seed in range(shape["seeds"]):
                order = ["gpt2", "modern"] if seed % 2 == 0 else ["modern", "gpt2"]  # alternate who goes first
                for name in order + (["modern_adamw"] if seed == 0 else []):
                    runs[name].append(self._curve(size, shape, name, seed, data))
            rows.append({"size": size, "steps": shape["steps"], "every": shape["every"],
                         "corpus": "wikitext-2 char" if len(data) > 2 else "builtin char",
                         "flags": f"{TTL_COMMON} {shape['flags']}", "recipes": RECIPES,
                         "runs": runs, **crossings(runs)})
        return rows

    def step_costs(self) -> list[dict]:
        """What each time_to_loss recipe spends a training step on: milliseconds in the forward (with the loss),
        the backward and the optimizer step, timed apart in this process on random tokens (a 128-token
        vocabulary) with lmdist's threads, model and optimizer; the recipes alternate, `repeats` times."""
        from lmdist import optim
        from lmdist.config import parse_args
        from lmdist.models import build_model

        rows = []
        for size, shape in self.ttl_sizes.items():
            samples = {name: {phase: [] for phase in STEP_PHASES} for name in RECIPES}
            for repeat in range(self.repeats):
                for name in RECIPES if repeat % 2 == 0 else reversed(RECIPES):
                    cfg = parse_args(f"{TTL_COMMON} {shape['flags']} {RECIPES[name]}".split())
                    torch.set_num_threads(launch.threads_per_process(cfg))
                    torch.manual_seed(repeat)
                    model = build_model(cfg, 128)
                    optimizer = optim.build_optimizer(cfg, model)
                    tokens = torch.randint(0, 128, (cfg.batch_size, cfg.block_size + 1))
                    phases = []
                    for _ in range(2 + shape["cost_steps"]):  # the first two warm up the allocator and kernels
                        began = time.perf_counter()
                        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1),
                                                                 tokens[:, 1:].flatten())
                        forward = time.perf_counter()
                        loss.backward()
                        backward = time.perf_counter()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        phases.append((forward - began, backward - forward, time.perf_counter() - backward))
                    for phase, seconds in zip(STEP_PHASES, zip(*phases[2:], strict=True), strict=True):
                        samples[name][phase].append(statistics.median(seconds) * 1e3)
            rows.append({"size": size, "flags": f"{TTL_COMMON} {shape['flags']}", "steps": shape["cost_steps"],
                         "ms": {name: {phase: {"median": statistics.median(values), "min": min(values),
                                               "max": max(values)} for phase, values in phases.items()}
                                for name, phases in samples.items()}})
        return rows

    def _curve(self, size: str, shape: dict, recipe: str, seed: int, data: list[str]) -> dict:
        """One run's validation curve, training time at each evaluation, and median tokens/s."""
        self.runs += 1
        out = self.workdir / f"run{self.runs:03d}"
        flags = [*f"{TTL_COMMON} {shape['flags']} {RECIPES[recipe]}".split(), *data, "--seed", str(seed),
                 "--max_steps", str(shape["steps"]), "--eval_every", str(shape["every"]),
                 "--log_every", str(shape["every"]), "--output_dir", str(out)]
        done = subprocess.run([sys.executable, str(TRAIN), *flags], cwd=self.workdir, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench run failed ({' '.join(flags)}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        seconds, tokens, curve = 0.0, 0, []
        for row in rows:
            if "tokens_per_sec" in row:
                seconds += (row["tokens_seen"] - tokens) / row["tokens_per_sec"]
                tokens = row["tokens_seen"]
            if "val/loss" in row:
                curve.append({"step": row["step"], "val_loss": row["val/loss"], "train_s": seconds})
        return {"seed": seed, "curve": curve, "train_s": seconds,
                "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r)}

    def run(self, sections: list[str]) -> dict:
        seconds = 0.5 if self.smoke else 3.0
        cpu = torch.device("cpu")
        peak = {"fp32_flops": perf.measure_matmul_flops(cpu, torch.float32, 2048, seconds),
                "fp32_onednn_flops": perf.measure_matmul_flops(cpu, torch.float32, 2048, seconds, onednn=True),
                "bf16_flops": perf.measure_matmul_flops(cpu, torch.bfloat16, 2048, seconds)}
        results = {"machine": machine(), "smoke": self.smoke, "repeats": self.repeats, "peak": peak,
                   "targets": TARGETS}
        for section in sections:
            began = time.perf_counter()
            method = getattr(self, section)
            results[section] = method(peak) if section in ("efficiency", "options") else method()
            print(f"bench: {section} done in {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
        return results


def crossings(runs: dict[str, list[dict]]) -> dict:
    """Per seed: the baseline's final validation loss, the first evaluation at which the modern run is at or below
    it (step and training time), their ratios, and the loss gap at equal steps; then medians and spreads."""
    per_seed = []
    for base, modern in zip(runs["gpt2"], runs["modern"], strict=True):
        target = base["curve"][-1]["val_loss"]
        reached = next((point for point in modern["curve"] if point["val_loss"] <= target), None)
        per_seed.append({
            "seed": base["seed"], "target": target, "modern_final": modern["curve"][-1]["val_loss"],
            "gain_at_equal_steps": target - modern["curve"][-1]["val_loss"],
            "steps_to_target": reached and reached["step"], "seconds_to_target": reached and reached["train_s"],
            "time_ratio": reached and reached["train_s"] / base["train_s"],
            "speed_ratio": modern["tokens_per_sec"] / base["tokens_per_sec"]})
    summary = {}
    for key in ("gain_at_equal_steps", "time_ratio", "speed_ratio", "steps_to_target"):
        values = [s[key] for s in per_seed]
        summary[key] = None if None in values else {"median": statistics.median(values), "min": min(values),
                                                     "max": max(values)}
    return {"per_seed": per_seed, "summary": summary}


def merge(runs: list[dict]) -> dict:
    """Runs of one configuration as one: the median of the runs' speeds, the worst memory. A run's speed is
    its fastest measured window, as `timeit` takes the fastest repeat: this machine's neighbours only ever
    slow a window down, by 10-20% at times, and the median window kept that noise in the figures."""
    merged = {**runs[0], "tokens_per_sec": statistics.median(max(r["tokens_per_sec"]) for r in runs),
              "wall_s": statistics.median(r["wall_s"] for r in runs),
              "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    for key in ("data_wait", "mfu"):
        if key in runs[0]:
            merged[key] = statistics.median(r[key] for r in runs)
    return merged


def flag_dict(flags: str) -> dict[str, str]:
    """"--a 1 --b x" -> {"a": "1", "b": "x"}."""
    words = flags.split()
    return {name.removeprefix("--"): value for name, value in zip(words[::2], words[1::2], strict=True)}


def bf16_peak(peak: dict) -> float:
    """The bf16 MFU denominator: the bf16 matmul rate, or on a CPU that emulates bf16 the fp32 rate the
    emulation runs on (as `mfu` in training)."""
    return peak["bf16_flops"] if perf.native_cpu_bf16() else max(peak["fp32_flops"], peak["fp32_onednn_flops"])


def same_machine(a: dict, b: dict) -> bool:
    """Whether two `machine()` records describe the same hardware and software (the date aside)."""
    return {k: v for k, v in a.items() if k != "date"} == {k: v for k, v in b.items() if k != "date"}


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return {"cpu": model, "cores": launch.available_cores(), "isa": torch.backends.cpu.get_cpu_capability(),
            "bf16": "native" if perf.native_cpu_bf16() else "emulated", "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


SECTIONS = ("overhead", "scaling", "collectives", "data", "efficiency", "options", "time_to_loss", "step_costs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models, one repeat: checks the harness only")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each compared configuration (default 4: "
                                                                  "A B, B A, A B, B A)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--ttl_sizes", default=",".join(TTL_SIZES),
                        help=f"time_to_loss and step_costs: comma-separated sizes of {tuple(TTL_SIZES)} "
                             "(GPT M's time_to_loss takes ~30 min)")
    parser.add_argument("--data_sizes", default=None,
                        help=f"data: comma-separated corpus sizes of {tuple(data_scale.SIZES)} (default: all, 10GB "
                             "where the disk holds it; about 40 min)")
    parser.add_argument("--out", default=None, help="figures as JSON (default bench/results.json; smoke: none)")
    parser.add_argument("--readme", default=None, help="README whose tables to regenerate "
                                                       "(default bench/README.md; smoke: none)")
    args = parser.parse_args()
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}: choose from {', '.join(SECTIONS)}")
    ttl_sizes = [s for s in args.ttl_sizes.split(",") if s]
    if set(ttl_sizes) - set(TTL_SIZES):
        parser.error(f"unknown --ttl_sizes {sorted(set(ttl_sizes) - set(TTL_SIZES))}: choose from "
                     f"{', '.join(TTL_SIZES)}")
    if "options" in sections or "efficiency" in sections:  # they reuse the overhead runs when there are some
        sections = sorted(sections, key=SECTIONS.index)
    out = args.out or (None if args.smoke else str(REPO / "bench" / "results.json"))
    readme = args.readme or (None if args.smoke else str(REPO / "bench" / "README.md"))
    partial = out and Path(out).exists() and (set(sections) != set(SECTIONS) or set(ttl_sizes) != set(TTL_SIZES))
    if partial and not same_machine(json.loads(Path(out).read_text())["machine"], machine()):
        parser.error(f"{out} holds figures from another machine or torch; a partial run would mix them into one "
                     "table: run the whole suite here (without --only), or pass --out for a separate file")
    with tempfile.TemporaryDirectory(prefix="lmdist-bench-") as workdir:
        data_sizes = [s for s in args.data_sizes.split(",") if s] if args.data_sizes else None
        results = Bench(args.smoke, 1 if args.smoke else args.repeats, workdir, ttl_sizes, data_sizes).run(sections)
    if partial:  # a partial run refreshes its sections (those per size: the sizes it ran)
        saved = json.loads(Path(out).read_text())
        for section in set(sections) & {"time_to_loss", "step_costs"}:
            ran = {row["size"] for row in results[section]}
            kept = [row for row in saved.get(section, []) if row["size"] not in ran]
            results[section] = sorted(kept + results[section], key=lambda row: list(TTL_SIZES).index(row["size"]))
        results = {**saved, **{s: results[s] for s in sections}, "targets": TARGETS}
    if out:  # first: the figures outlive any problem in presenting them
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"bench: figures written to {out}", file=sys.stderr)
    print(report.render(results))
    if readme:
        report.update_readme(readme, results)
        print(f"bench: tables in {readme} regenerated", file=sys.stderr)


if __name__ == "__main__":
    main()

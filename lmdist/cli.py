"""The `lmdist` console script: training and the commands around it.

    lmdist train [--config FILE.yaml] [--FIELD VALUE ...]   the loop in train.py, from any folder
    lmdist prepare [--config FILE.yaml] [--FIELD VALUE ...] tokenize a run's data into token shards ahead of it
    lmdist eval --checkpoint DIR [--dataset D --split S --batch_size B --output FILE]
    lmdist eval --checkpoint DIR --harness TASKS [--harness_include DIR]   lm-eval-harness tasks (lmdist[eval])
    lmdist generate --checkpoint DIR --prompt TEXT [--max_new_tokens N --temperature T --top_k K --seed S]
    lmdist export --checkpoint DIR --out DIR   a transformers model folder of a checkpoint, as final/ is
    lmdist env       what a launch here would see: devices, launcher variables, threads, W&B mode
    lmdist fields    every config field with its type, default and meaning (--markdown for a table)
    lmdist peak      this machine's peak for `mfu`: the GPU's datasheet rate and measured matmul rates
    lmdist plot RUN_DIR [RUN_DIR ...] [--out FILE.png --x step|tokens --metrics loss,lr ...]   curves of runs

Each command's flags are a dataclass parsed by lmdist.flags, as train.py's are: the same typing, `--help`
and errors (exit status 2, naming the flag); `plot` alone takes bare arguments, its run dirs. `eval` runs on one
process or several:
`torchrun --nproc_per_node 2 -m lmdist eval --checkpoint DIR`.
"""
from __future__ import annotations

import difflib
import inspect
import json
import os
import runpy
import sys
from dataclasses import dataclass
from typing import Literal

from lmdist.errors import ConfigError, run_cli
from lmdist.flags import Flags, need, option


@dataclass
class Eval:
    """val/loss, val/ppl and val/acc of a checkpoint or final/ folder, or its lm-eval-harness results.

    On its run's validation data, on `split` of `dataset`, or on lm-eval tasks (`harness`, lmdist[eval]). Rank zero
    writes them to `output`."""

    checkpoint: str = option(help="a training checkpoint (output_dir/checkpoints/step_N) or a final/ folder")
    dataset: str | None = option(None, "evaluate on this dataset (same forms as train.py's) instead of the run's "
                                       "validation data")
    split: str | None = option(None, "the split of `dataset` (default: validation, valid, test or train, the first "
                                     "there is)")
    batch_size: int | None = option(None, "sequences per process per batch (default: the run's batch_size; 1 with "
                                          "--harness)")
    output: str = option("eval.json", "file rank zero writes the metrics to, as JSON")
    harness: str | None = option(None, "lm-eval-harness tasks instead (comma-separated names or task YAML files), "
                                       "run by lm-eval's hf model on the transformers folder (pip install "
                                       "\"lmdist[eval]\")")
    harness_include: str | None = option(None, "a folder of lm-eval task YAML files of your own, for `harness`")

    def check(self) -> None:
        need(self.batch_size is None or self.batch_size >= 1, self, "batch_size", "must be at least 1 (or none)")
        need(self.harness is None or any(self.harness.split(",")), self, "harness", "names no task")
        need(self.harness is None or (self.dataset is None and self.split is None), self, "harness",
             "evaluates on its tasks' own data: drop --dataset and --split")
        need(self.harness_include is None or self.harness is not None, self, "harness_include",
             "adds tasks for --harness: give --harness TASKS too")

    def run(self) -> None:
        from lmdist.files import write_json
        from lmdist.inference import evaluate_harness, evaluate_saved

        if self.harness is not None:
            result = evaluate_harness(self.checkpoint, self.harness, self.harness_include, self.batch_size)
        else:
            result = evaluate_saved(self.checkpoint, self.dataset, self.split, self.batch_size)
        if result is not None and int(os.environ.get("RANK", "0")) == 0:
            write_json(self.output, result)
            print(json.dumps(result))


@dataclass
class Generate:
    """Continue a prompt with text sampled from a checkpoint or final/ folder (same seed, same text)."""

    checkpoint: str = option(help="a training checkpoint (output_dir/checkpoints/step_N) or a final/ folder")
    prompt: str = option("", "the text to continue")
    max_new_tokens: int = option(200, "tokens to sample")
    temperature: float = option(1.0, "divides the logits before sampling (0 = greedy)")
    top_k: int = option(0, "sample among the k likeliest tokens only (0 = all; 1 = greedy)")
    seed: int = option(0, "random seed of the sampling")

    def check(self) -> None:
        need(self.max_new_tokens >= 0, self, "max_new_tokens", "must be non-negative")
        need(self.temperature >= 0, self, "temperature", "must be non-negative (0 = greedy)")
        need(self.top_k >= 0, self, "top_k", "must be non-negative (0 = all tokens)")

    def run(self) -> None:
        from lmdist.inference import generate

        print(generate(self.checkpoint, self.prompt, self.max_new_tokens, self.temperature, self.top_k, self.seed))


@dataclass
class Export:
    """Write an export of a checkpoint or of another export, as a run writes final/: a transformers model folder
    (AutoModelForCausalLM and AutoTokenizer load it) where the model has an exact transformers equivalent."""

    checkpoint: str = option(help="a training checkpoint (output_dir/checkpoints/step_N) or an export folder")
    out: str = option(help="the folder to write: new, empty, or an earlier export (which it replaces)")

    def run(self) -> None:
        from lmdist.inference import export_saved

        print(f"{self.out}: {export_saved(self.checkpoint, self.out)}")


@dataclass
class Env:
    """What lmdist would decide for a launch in this environment (run it inside your job script)."""

    def run(self) -> None:
        import accelerate
        import torch

        from lmdist import __version__, launch
        from lmdist.config import TrainConfig
        from lmdist.tracking import has_wandb_credentials, wandb_mode

        launcher_vars = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "OMP_NUM_THREADS", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "SLURM_JOB_ID")
        report = {
            "lmdist": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
            "accelerator_available": launch.has_accelerator(),
            "cuda_devices": torch.cuda.device_count(),
            "threads_per_process": launch.threads_per_process(TrainConfig()),
            "launcher_env": {k: os.environ[k] for k in launcher_vars if k in os.environ},
            "wandb_credentials": has_wandb_credentials(),
            "wandb_mode": wandb_mode(TrainConfig()),
        }
        width = max(map(len, report)) + 1
        for key, value in report.items():  # one aligned `key: value` line each, values as JSON (strings bare)
            print(f"{key + ':':<{width}} {value if isinstance(value, str) else json.dumps(value)}")


@dataclass
class Fields:
    """Every training config field with its type, default and meaning."""

    markdown: bool = option(False, "print the README's table of fields instead")

    def run(self) -> None:
        from lmdist.config import help_text, markdown_table

        print(markdown_table() if self.markdown else help_text())


@dataclass
class Peak:
    """The peak FLOP/s that `mfu` can be measured against on this machine.

    The GPU's datasheet dense bf16 rate (when known) and the best rate of a large fp32 and bf16 matmul over
    `seconds` each, on this process's device and threads; and the peaks that training runs here measured and
    divide by (lmdist's cache: delete the file to have the next run remeasure)."""

    seconds: float = option(1.0, "seconds of matmuls per measured rate")
    threads: int | None = option(None, "torch threads (default: available cores / processes on this node)")

    def check(self) -> None:
        need(self.seconds > 0, self, "seconds", "must be positive")
        need(self.threads is None or self.threads >= 1, self, "threads", "must be at least 1 (or none)")

    def run(self) -> None:
        import torch

        from lmdist import launch, perf
        from lmdist.config import TrainConfig

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.set_num_threads(self.threads or launch.threads_per_process(TrainConfig()))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        known = perf.datasheet_peak(name) if name else None
        n, seconds = (8192 if device.type == "cuda" else 2048), self.seconds
        report = {
            "device": name or "cpu", "threads": torch.get_num_threads(),
            "datasheet_bf16_tflops": known.flops / 1e12 if known else None,
            "measured_tflops": {str(dtype).removeprefix("torch."): perf.measure_matmul_flops(device, dtype, n, seconds)
                                / 1e12 for dtype in (torch.float32, torch.bfloat16)},
            "measured_onednn_float32_tflops": (perf.measure_matmul_flops(device, torch.float32, n, seconds, onednn=True)
                                               / 1e12 if perf.onednn_usable(device, torch.float32) else None),
            "matmul": f"{n}^3",
            "peak_cache": {"file": perf.peak_cache(), "measured": perf.cached_peaks(perf.peak_cache())},
        }
        if device.type == "cpu" and not perf.native_cpu_bf16():
            report.update(cpu_bf16="emulated (no oneDNN bf16 kernels for this CPU)",
                          bf16_matmul=f"{perf.EMULATED_BF16_MATMUL}^3")
        print(json.dumps(report, indent=2))


@dataclass
class Plot:
    """Draw runs' metrics.jsonl as an image: train and validation loss by default, several runs overlaid.

    Works on a run in progress (a row being written is left out) and on a resumed run (one curve). Needs
    matplotlib: pip install "lmdist[plot]"."""

    runs: tuple[str, ...] = option(help="the runs' output_dirs, each holding metrics.jsonl", positional="RUN_DIR")
    out: str = option("plot.png", "the image to write (.png, .svg, .pdf ...), replaced if it exists; a bare "
                                   "name lands in the current folder")
    x: Literal["step", "tokens"] = option("step", "the x axis: optimizer steps, or training tokens (tokens_seen)")
    metrics: str = option("loss", "the panels, comma-separated: each takes the keys that are its name or end in "
                                  "/NAME or _NAME (loss: train/loss and val/loss; also ppl, acc, lr, grad_norm, "
                                  "tokens_per_sec, or any key in metrics.jsonl)")
    labels: str | None = option(None, "the runs' names in the legends, comma-separated, one per RUN_DIR (default: "
                                      "each folder's name, with its parents where two share one)")
    log_x: bool = option(False, "the x axes on a log scale")
    log_y: bool = option(False, "the y axes on a log scale")

    def check(self) -> None:
        need(all(self.metrics.split(",")), self, "metrics", "names an empty panel: give names separated by commas")
        seen: dict[str, str] = {}
        for run in self.runs:
            if os.path.realpath(run) in seen:
                raise ConfigError(f"RUN_DIR {run!r} is {seen[os.path.realpath(run)]!r} again: give each run once")
            seen[os.path.realpath(run)] = run
        if self.labels is not None:
            labels = self.labels.split(",")
            need(len(labels) == len(self.runs), self, "labels",
                 f"has {len(labels)} name(s) for {len(self.runs)} RUN_DIR(s): give one per RUN_DIR, in their order")
            need(len(set(labels)) == len(labels) and all(labels), self, "labels", "must be distinct and non-empty")

    def run(self) -> None:
        from lmdist.plot import plot

        plot(list(self.runs), self.out, self.metrics.split(","), self.x,
             self.labels.split(",") if self.labels else None, self.log_x, self.log_y)
        print(f"wrote {self.out}")


COMMANDS = {"eval": Eval, "generate": Generate, "export": Export, "env": Env, "fields": Fields, "peak": Peak,
            "plot": Plot}
TRAIN_SUMMARY = "Train a language model: the loop in train.py, with its flags (see lmdist train --help)."


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        train(argv[1:])
    elif argv[:1] == ["prepare"]:
        run_cli(lambda: prepare(argv[1:]))
    else:
        run_cli(lambda: run_command(argv))


def train(flags: list[str]) -> None:
    """Run train.py (installed as the module lmdist.train) as `python -m lmdist.train FLAGS` would: the same
    argv, so that it parses, reports its errors and prints its relaunch command as under any launcher."""
    sys.argv = [sys.argv[0], *flags]  # runpy puts the module's file in sys.argv[0]
    runpy.run_module("lmdist.train", run_name="__main__", alter_sys=True)


PREPARE_SUMMARY = ("Tokenize a run's data into prepared token shards ahead of training, with train.py's flags "
                   "(e.g. in a CPU job before the GPU job).")
LOCAL_PATH_FIELDS = ("dataset", "mixture", "val_dataset", "tokenizer", "cache_dir", "tokens_dir")
# the fields that decide which prepared shards a run reads (lmdist.shards' key), shown in `prepare`'s hint
DATA_FIELDS = ("dataset", "mixture", "dataset_config", "val_dataset", "val_fraction", "text_column", "tokenizer",
               "bpe_vocab_size", "bpe_sample_bytes", "min_freq", "streaming", "cache_dir", "tokens_dir")


def prepare(flags: list[str]) -> None:
    """Prepare the token shards of the run these flags describe, then print the flags that find them again."""
    import shlex
    import textwrap

    from lmdist import shards, token_streams
    from lmdist.config import TrainConfig, load_config
    from lmdist.sources import warn

    about = (f"{PREPARE_SUMMARY} It takes the training command's flags, so that the same flags find the result; "
             f"those that decide the tokens: {', '.join(f'--{name}' for name in DATA_FIELDS)}. The others are "
             "checked, not used.")
    cfg = load_config(flags, usage=["usage: lmdist prepare [--config FILE.yaml] [--FIELD VALUE ...]", "",
                                    *textwrap.wrap(about, 100)])
    for spec in token_streams.data_specs(cfg):
        token_streams.check_source(spec)
    token_streams.quiet_progress_bars(True)
    corpus = token_streams.open_corpus(cfg, warn, True)
    names = [part.source.name for part in corpus.sources] if corpus.sources else [None] * len(corpus.prepared)
    for folder, name in zip(corpus.prepared, names, strict=True):
        with open(os.path.join(folder, "manifest.json")) as f:
            splits = json.load(f)["splits"]
        disk = sum(os.path.getsize(os.path.join(folder, shard["file"])) for split in splits.values()
                   for shard in split["shards"])
        tokens = sum(split["tokens"] for split in splits.values())
        print(f"prepared: {folder}")
        print("  " + (f"source {name}: " if name else "")
              + ("prepared now" if folder in corpus.made_now else "found prepared (reused)") + "; "
              + ", ".join(f"{split_name} {split['tokens']:,} tokens, {split['documents']:,} "
                          f"document{'s' * (split['documents'] != 1)} ended" for split_name, split in splits.items())
              + f"; {corpus.tokenizer.kind} tokenizer (vocab {corpus.tokenizer.vocab_size}); "
              f"{disk / max(1, tokens):.2f} bytes/token on disk")
    defaults = TrainConfig()
    shown = {name: getattr(cfg, name) for name in DATA_FIELDS
             if name in ("tokenizer", "dataset" if cfg.mixture is None else "mixture")
             or getattr(cfg, name) != getattr(defaults, name)}
    shown["tokens_dir"] = shards.tokens_root(cfg)
    shown = {name: _absolute(name, value) for name, value in shown.items()}
    print("train on it with these flags (and any others):")
    print("  " + " ".join(f"--{name} {shlex.quote(str(value))}" for name, value in shown.items()), flush=True)


def _absolute(name: str, value):
    """A local path of `prepare`'s printed flags made absolute, for a job that starts in another folder; a hub
    name, an inline mixture and the other values as given."""
    import glob

    path = os.path.expanduser(value) if name in LOCAL_PATH_FIELDS and isinstance(value, str) else None
    if path is not None and (name in ("cache_dir", "tokens_dir") or os.path.exists(path) or glob.glob(path)):
        return os.path.abspath(path)
    return value


def run_command(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(overview_text(), flush=True)
        return
    name, flags = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, ["train", "prepare", *COMMANDS], n=1)
        raise ConfigError(f"unknown command {name!r}{f'; did you mean {close[0]}?' if close else ''} "
                          "(see lmdist --help)")
    command = COMMANDS[name]
    table = Flags(command, getattr(command, "check", None))
    if any(arg in ("-h", "--help") for arg in flags):
        print(table.help_text([f"usage: lmdist {name} {table.usage()}", "", inspect.cleandoc(command.__doc__)]),
              flush=True)
        return
    table.parse(flags).run()


def overview_text() -> str:
    width = max(map(len, ["train", "prepare", *COMMANDS])) + 2
    lines = ["usage: lmdist COMMAND [--FIELD VALUE ...]    (lmdist COMMAND --help lists its flags)", "",
             "commands:", f"  {'train':<{width}}{TRAIN_SUMMARY}", f"  {'prepare':<{width}}{PREPARE_SUMMARY}"]
    lines += [f"  {name:<{width}}{_summary(command)}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def _summary(command: type) -> str:
    return command.__doc__.splitlines()[0]

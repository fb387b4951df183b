"""Shared fixtures: generated corpora and real training runs, launched once per session and reused.

Every run is a real `train.py` process (or 2 gloo ranks) on tiny models; no test depends on ../shared
or on the network.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import faults, prewarmed
from tests.markov import MarkovSource

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
# A tiny GPT and the settings every comparison run shares (dropout off: ranks must draw the same numbers).
TINY_GPT = ["--model", "gpt", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
            "--dropout", "0", "--tokenizer", "char", "--log_every", "1", "--seed", "7"]


TINY_HF = {  # --model hf's transformers configs: 2 layers, 4 heads (2 of keys and values for Llama), width 32
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "tie_word_embeddings": False, "vocab_size": 1000},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 1000},
}


def without_flags(args: list[str], *names: str) -> list[str]:
    """`args` (--flag value pairs) without the flags `names`."""
    return [item for flag, value in zip(args[::2], args[1::2], strict=True) if flag not in names
            for item in (flag, value)]


def tiny_hf_config(folder: Path, kind: str = "llama", **changes) -> Path:
    """A transformers config.json for --model hf (vocab_size is lmdist's to set), written into `folder`."""
    path = folder / f"{kind}_config.json"
    path.write_text(json.dumps({**TINY_HF[kind], **changes}))
    return path


def with_flags(args: list[str], *overrides: str) -> list[str]:
    """`args` (--flag value pairs) with `overrides` replacing or adding flags."""
    flags = dict(zip(args[::2], args[1::2], strict=True))
    flags.update(zip(overrides[::2], overrides[1::2], strict=True))
    return [item for pair in flags.items() for item in pair]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(args: list[str], nproc: int = 1, launcher: str = "python", config: str = "cpu.yaml",
                   script: Path = TRAIN) -> list[str]:
    """`script args` under a launcher: python, torchrun, accelerate (--multi_gpu) or accelerate-config (the
    accelerate_configs/ file `config`, with nproc processes); W&B off and samples of 8 tokens (a tiny model's 64
    cost more than its steps) unless `args` say otherwise."""
    prefix = {
        "python": [sys.executable],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                       str(nproc), "--main_process_port", str(free_port())],
        "accelerate-config": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                              str(REPO / "accelerate_configs" / config), "--num_processes", str(nproc),
                              "--main_process_port", str(free_port())],
    }[launcher]
    if "--wandb_mode" not in args:
        args = [*args, "--wandb_mode", "disabled"]
    if "--sample_tokens" not in args:
        args = [*args, "--sample_tokens", "8"]
    return [*prefix, str(script), *args]


def launch_env(env: dict | None = None, prewarmed: bool = True) -> dict:
    """The environment of a test's launch: os.environ with `env` (None removes a variable), and, unless
    `prewarmed` is False or LMDIST_TEST_SPAWN is set, the hook that forks train.py and the launchers from the
    session's prewarmed server (tests/prewarmed.py) where that gives what a fresh interpreter would."""
    full_env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    if prewarmed and not os.environ.get("LMDIST_TEST_SPAWN"):
        full_env = prewarmed_server().env(full_env)
    return full_env


def launch(args: list[str], cwd: Path, nproc: int = 1, launcher: str = "python", env: dict | None = None,
           timeout: int = 300, script: Path = TRAIN, config: str = "cpu.yaml",
           prewarmed: bool = True) -> subprocess.CompletedProcess:
    """Run `launch_command(...)` to its end."""
    return subprocess.run(launch_command(args, nproc, launcher, config, script), cwd=cwd,
                          env=launch_env(env, prewarmed), capture_output=True, text=True, timeout=timeout)


_PREWARMED: list[prewarmed.Server] = []


def prewarmed_server() -> prewarmed.Server:
    if not _PREWARMED:
        _PREWARMED.append(prewarmed.Server(launch_env(prewarmed=False)))
    return _PREWARMED[0]


@pytest.fixture(scope="session", autouse=True)
def stop_prewarmed_server():
    yield
    for server in _PREWARMED:
        server.close()


def run_ok(*a, **kw) -> subprocess.CompletedProcess:
    result = launch(*a, **kw)
    assert result.returncode == 0, f"failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def wait_for_step(output_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {process.communicate()[1][-3000:]}")
        path = output_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines() if line):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def run_on_terminal(cmd: list[str], cwd: Path, columns: int, timeout: float = 180) -> str:
    """Everything `cmd` wrote to a pseudo-terminal `columns` wide (its stdin, stdout and stderr), once it exited 0."""
    import fcntl
    import pty
    import struct
    import termios

    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))  # a terminal has a width
    process = subprocess.Popen(cmd, stdin=secondary, stdout=secondary, stderr=secondary, cwd=cwd, env=launch_env())
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    text = output.decode(errors="replace")
    assert process.wait(timeout=timeout) == 0, text[-3000:]
    return text


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_run(output_dir: Path) -> dict:
    return json.loads((output_dir / "run.json").read_text())


def final_weights(output_dir: Path) -> dict:
    """A run's final weights, in lmdist's names (final/ holds them in transformers' where it can)."""
    from lmdist.export import read_weights

    return read_weights(str(output_dir / "final"))


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory):
    """Keep the HF datasets cache and lmdist's (the peaks mfu divides by, measured on a busy machine here) of
    every run and its subprocesses out of the user's home."""
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    os.environ["LMDIST_CACHE_DIR"] = str(tmp_path_factory.mktemp("lmdist_cache"))


@pytest.fixture(scope="session")
def markov() -> MarkovSource:
    return MarkovSource.make(seed=0)


@pytest.fixture(scope="session")
def markov_files(markov, tmp_path_factory) -> dict[str, Path]:
    """Train/validation text from the same source, sampled separately, one line each; plus a short
    training file (a few optimizer steps per epoch) for the equivalence runs."""
    folder = tmp_path_factory.mktemp("markov")
    files = {"train": folder / "train.txt", "val": folder / "val.txt", "short": folder / "short.txt",
             "short_val": folder / "short_val.txt"}
    files["train"].write_text(markov.sample(200_000, seed=1) + "\n")
    files["val"].write_text(markov.sample(20_000, seed=2) + "\n")
    files["short"].write_text(markov.sample(2_100, seed=3) + "\n")
    # 999 symbols + its line break + <eos>: 1000 targets, not a multiple of block_size 32 nor of the batch
    files["short_val"].write_text(markov.sample(999, seed=4) + "\n")
    return files


def equivalence_args(markov_files) -> list[str]:
    """The training every equivalence run shares: global batch 8, 16 shuffled steps over two epochs."""
    return [*TINY_GPT, "--dataset", str(markov_files["short"]), "--val_dataset", str(markov_files["short_val"]),
            "--epochs", "2", "--eval_every", "5", "--warmup_steps", "3"]


EQUIVALENCE_PEAK_TFLOPS = 0.05  # config_b4's --peak_tflops: its mfu is checked against a peak known beforehand


@pytest.fixture(scope="session")
def equivalence_runs(markov_files, tmp_path_factory) -> dict[str, Path]:
    """The same training (global batch 8, 16 shuffled steps over two epochs) under six launches:
    1 process x batch 8 (the reference), 2 torchrun ranks x 4 (with W&B offline), 1 process x 4 x
    grad_accum 2, 2 `accelerate launch --multi_gpu` ranks x 2 x grad_accum 2, 2 ranks from
    accelerate_configs/cpu.yaml x 4 (a given peak for mfu), and 1 process x 8 loading batches in a DataLoader
    worker, every read recorded in its `reads.jsonl` (faults.record_reads)."""
    root = tmp_path_factory.mktemp("equivalence")
    runs = {  # one_b8 gets OMP_NUM_THREADS=1 as launchers set it: lmdist must still use every core
        "one_b8": (1, "python", ["--batch_size", "8"]),
        "torchrun_b4": (2, "torchrun", ["--batch_size", "4", "--wandb_mode", "offline"]),
        "accum_b4x2": (1, "python", ["--batch_size", "4", "--grad_accum", "2"]),
        "accelerate_b2x2": (2, "accelerate", ["--batch_size", "2", "--grad_accum", "2"]),
        "config_b4": (2, "accelerate-config", ["--batch_size", "4", "--peak_tflops", str(EQUIVALENCE_PEAK_TFLOPS)]),
        "workers_b8": (1, "python", ["--batch_size", "8", "--num_workers", "1"]),
    }
    out = {}
    for name, (nproc, launcher, extra) in runs.items():
        out[name] = root / name
        env = {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1" if name == "one_b8" else None}
        script = TRAIN
        if name == "workers_b8":
            script = faults.SCRIPT
            env.update(faults.inject(faults.record_reads, path=str(root / "workers_b8.reads.jsonl")))
        result = run_ok([*equivalence_args(markov_files), *extra, "--output_dir", str(out[name])], cwd=root,
                        nproc=nproc, launcher=launcher, env=env, script=script)
        (out[name] / "stdout.log").write_text(result.stdout)
    (root / "workers_b8.reads.jsonl").rename(out["workers_b8"] / "reads.jsonl")
    return out

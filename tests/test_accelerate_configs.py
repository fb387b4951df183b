"""Every file in accelerate_configs/ that can run on a CPU machine runs here, as its row in docs/launching.md says."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from lmdist import engine, sharding
from lmdist.config import make_config
from lmdist.errors import ConfigError
from lmdist.models import build_model
from tests.conftest import (
    REPO,
    TINY_GPT,
    equivalence_args,
    final_weights,
    free_port,
    launch_env,
    read_metrics,
    read_run,
    run_ok,
    with_flags,
)

pytestmark = pytest.mark.launch
CONFIGS = REPO / "accelerate_configs"


def accelerate(config: str, *launch_flags: str, train_args: list[str], cwd, wait: bool = True):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), *launch_flags,
           str(REPO / "train.py"), *train_args, "--wandb_mode", "disabled"]
    process = subprocess.Popen(cmd, cwd=cwd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    return process.communicate(timeout=300) + (process.returncode,) if wait else process


@pytest.mark.parametrize("config, flags, world_size, distributed_type, mixed_precision", [
    ("single_gpu.yaml", [], 1, "NO", "bf16"),
    pytest.param("multi_gpu.yaml", ["--num_processes", "2"], 2, "MULTI_CPU", "bf16", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="CPU machines only: on GPUs it needs 2 of them and trains MULTI_GPU")),
])
def test_config_runs_on_cpu(markov_files, tmp_path, config, flags, world_size, distributed_type, mixed_precision):
    args = [*TINY_GPT, "--dataset", str(markov_files["short"]), "--batch_size", "2", "--max_steps", "2",
            "--output_dir", str(tmp_path / "out")]
    _, stderr, code = accelerate(config, *flags, "--main_process_port", str(free_port()), train_args=args, cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    facts = read_run(tmp_path / "out")
    assert (facts["world_size"], facts["distributed_type"], facts["mixed_precision"]) == (
        world_size, distributed_type, mixed_precision)


def test_multi_node_template_as_two_machines_trains_the_single_node_model(equivalence_runs, markov_files, tmp_path):
    """Two launchers (machine ranks 0 and 1) on this machine: one rank each, the 2-rank run's per-step losses."""
    port = str(free_port())
    args = [*equivalence_args(markov_files), "--batch_size", "4", "--output_dir", str(tmp_path / "out")]
    launchers = [accelerate("multi_node.yaml", "--num_processes", "2", "--machine_rank", str(rank),
                            "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
                            train_args=args, cwd=tmp_path, wait=False) for rank in (0, 1)]
    for launcher in launchers:
        _, stderr = launcher.communicate(timeout=300)
        assert launcher.returncode == 0, stderr[-3000:]
    facts = read_run(tmp_path / "out")
    assert (facts["world_size"], facts["distributed_type"]) == (2, "MULTI_CPU")
    got = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "out") if "train/loss" in r}
    want = {r["step"]: r["train/loss"] for r in read_metrics(equivalence_runs["torchrun_b4"]) if "train/loss" in r}
    assert got.keys() == want.keys() and all(abs(got[s] - want[s]) <= 1e-5 * abs(want[s]) for s in want)


def test_fsdp_config_shards_on_cpu_and_trains_the_ddp_model(equivalence_runs, markov_files, tmp_path):
    """fsdp.yaml on 2 CPU ranks: FSDP2 shards (each rank holds half the parameters), the same per-step losses as
    DDP, and a final export equal to DDP's."""
    out = tmp_path / "out"
    args = [*equivalence_args(markov_files), "--batch_size", "4", "--output_dir", str(out)]
    _, stderr, code = accelerate("fsdp.yaml", "--num_processes", "2", "--main_process_port", str(free_port()),
                                 "--mixed_precision", "no", train_args=args, cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    facts = read_run(out)
    assert (facts["distributed_type"], facts["world_size"]) == ("FSDP", 2)
    held = facts["parameters_per_rank"]
    assert len(held) == 2 and all(abs(h - facts["parameters"] / 2) <= 0.05 * facts["parameters"] for h in held)
    ddp = equivalence_runs["torchrun_b4"]
    got = {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}
    want = {r["step"]: r["train/loss"] for r in read_metrics(ddp) if "train/loss" in r}
    assert got.keys() == want.keys() and all(abs(got[s] - want[s]) <= 1e-5 * want[s] for s in want)
    a, b = final_weights(out), final_weights(ddp)
    assert a.keys() == b.keys() and all((a[k] - b[k]).norm() <= 1e-5 * b[k].norm() for k in b)


def test_fsdp_activation_checkpointing_changes_memory_not_results(equivalence_runs, markov_files, tmp_path):
    out = tmp_path / "out"
    args = [*equivalence_args(markov_files), "--batch_size", "4", "--max_steps", "4", "--output_dir", str(out)]
    _, stderr, code = accelerate("fsdp.yaml", "--num_processes", "2", "--main_process_port", str(free_port()),
                                 "--mixed_precision", "no", "--fsdp_activation_checkpointing", "true",
                                 train_args=args, cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    got = {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}
    want = {r["step"]: r["train/loss"] for r in read_metrics(equivalence_runs["torchrun_b4"]) if "train/loss" in r}
    assert sorted(got) == [1, 2, 3, 4] and all(abs(got[s] - want[s]) <= 1e-5 * want[s] for s in got)


def test_fsdp_trains_the_lstm_like_ddp(markov_files, tmp_path):
    """Each nn.LSTM layer is an FSDP unit: FSDP's per-step losses equal DDP's for the lesson's model too."""
    lstm = ["--model", "lstm", "--embedding_dim", "16", "--hidden_dim", "16", "--num_layers", "2"]
    args = with_flags(equivalence_args(markov_files), *lstm, "--batch_size", "4", "--max_steps", "6")
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    run_ok(with_flags(args, "--output_dir", str(ddp)), cwd=tmp_path, nproc=2, launcher="torchrun")
    _, stderr, code = accelerate("fsdp.yaml", "--num_processes", "2", "--main_process_port", str(free_port()),
                                 "--mixed_precision", "no", train_args=with_flags(args, "--output_dir", str(fsdp)),
                                 cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    assert read_run(fsdp)["distributed_type"] == "FSDP"
    got = {r["step"]: r["train/loss"] for r in read_metrics(fsdp) if "train/loss" in r}
    want = {r["step"]: r["train/loss"] for r in read_metrics(ddp) if "train/loss" in r}
    assert got.keys() == want.keys() and all(abs(got[s] - want[s]) <= 1e-5 * want[s] for s in want)


@pytest.mark.parametrize("model_name, units", [("gpt", ["Block"]), ("lstm", ["LSTM"])])
def test_fsdp_yaml_on_gpus_wraps_the_layers_the_model_has(monkeypatch, model_name, units):
    """Accelerate's FSDP (GPUs only) refuses a model that lacks any class the config names; fsdp.yaml names
    both models' layers, so lmdist hands Accelerate the ones this model has (found on an H200: GPT failed)."""
    fsdp = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]
    for name, value in {"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2", "FSDP_VERSION": fsdp["fsdp_version"],
                        "FSDP_AUTO_WRAP_POLICY": fsdp["fsdp_auto_wrap_policy"],
                        "FSDP_TRANSFORMER_CLS_TO_WRAP": fsdp["fsdp_transformer_layer_cls_to_wrap"]}.items():
        monkeypatch.setenv(name, str(value))  # as accelerate launch exports them
    cfg = make_config({"model": model_name})
    plugin = engine.fsdp_plugin(cfg)  # what build_accelerator hands the Accelerator
    assert plugin.transformer_cls_names_to_wrap == units and plugin.fsdp_version == 2
    model = build_model(cfg, 100)
    plugin.set_auto_wrap_policy(model)  # what Accelerate's prepare does next
    wrapped = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
    assert {cls.__name__ for cls in wrapped} == set(units)


def test_fsdp_layers_the_model_lacks_are_a_config_error(monkeypatch):
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "GPT2Block")
    with pytest.raises(ConfigError, match=r"fsdp_transformer_layer_cls_to_wrap names GPT2Block.*GPT: Block"):
        sharding.unit_names(build_model(make_config({"model": "gpt"}), 100))

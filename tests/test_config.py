"""The config: defaults < YAML < flags, strict coercion, validation with named fields, and the CLI's exits."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from lmdist import checkpoint, resume
from lmdist.config import FIELDS, TrainConfig, load_config, markdown_table, parse_args
from lmdist.errors import ConfigError
from tests.conftest import REPO, TRAIN


def error_of(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    return str(info.value)


def test_defaults_and_flag_forms():
    assert parse_args([]) == TrainConfig()
    cfg = parse_args(["--model", "gpt", "--n_embd=64", "--lr", "3e-4", "--max_steps", "none", "--notie_weights"])
    assert (cfg.model, cfg.n_embd, cfg.lr, cfg.max_steps, cfg.tie_weights) == ("gpt", 64, 3e-4, None, False)
    assert parse_args(["--tie-weights", "false"]).tie_weights is False  # dashes work like underscores


@pytest.mark.parametrize("text, value", [("false", False), ("False", False), ("no", False), ("0", False),
                                         ("true", True), ("yes", True), ("1", True), ("ON", True)])
def test_booleans_are_parsed_not_truthy(text, value):
    assert parse_args(["--tie_weights", text]).tie_weights is value


def test_strings_stay_verbatim():
    """A loosely typed parser (fire's) would turn these into numbers; a string field keeps what was typed."""
    cfg = parse_args(["--run_name", "007", "--output_dir", "1e3", "--wandb_project", "0x10"])
    assert (cfg.run_name, cfg.output_dir, cfg.wandb_project) == ("007", "1e3", "0x10")


def test_misspelt_flag_suggests_the_field():
    assert "unknown flag --n_embdd; did you mean --n_embd?" in error_of(["--n_embdd", "64"])
    assert "did you mean --batch_size?" in error_of(["--batchsize", "4"])
    assert "did you mean" not in error_of(["--zzzz", "1"])


@pytest.mark.parametrize("argv, message", [
    (["--n_layer", "3.5"], "--n_layer: expects an integer, got '3.5'"),
    (["--lr", "fast"], "--lr: expects a number, got 'fast'"),
    (["--lr", "nan"], "--lr: expects a finite number"),
    (["--tie_weights", "maybe"], "--tie_weights: expects true or false"),
    (["--model", "gtp"], "did you mean 'gpt'?"),
    (["--lr_schedule", "step"], "expects one of cosine, linear, constant"),
    (["--max_steps"], "flag --max_steps needs a value"),
    (["gpt"], "unexpected argument 'gpt'"),
    (["--lr", "1", "--lr", "fast"], "--lr: expects a number, got 'fast'"),  # the last of a repeated flag counts
])
def test_wrong_types_are_named(argv, message):
    assert message in error_of(argv)


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt", "--n_embd", "100", "--n_head", "3"], "--n_embd 100: must be divisible by n_head (3), or give "
                                                             "head_dim"),
    (["--model", "gpt", "--n_head", "4", "--n_kv_head", "3"], "--n_kv_head 3: must divide n_head (4)"),
    (["--model", "gpt", "--head_dim", "0"], "--head_dim 0: must be at least 1 (or none)"),
    (["--model", "gpt", "--norm_eps", "0"], "--norm_eps 0.0: must be positive"),
    (["--model", "lstm", "--qkv_bias", "true"], "--qkv_bias True: shapes a GPT only"),
    (["--model", "gpt", "--head_dim", "15"], "rope rotates pairs of dimensions: the head width (15) must be even"),
    (["--block_size", "1"], "--block_size 1: must be at least 2"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--dropout", "1"], "--dropout 1.0: must be in [0, 1)"),
    (["--lr", "1e-3", "--min_lr", "1e-2"], "--min_lr 0.01: must be between 0 and lr"),
    (["--val_fraction", "0"], "--val_fraction 0.0: must be between 0 and 1"),
    (["--max_steps", "0"], "--max_steps 0: must be at least 1"),
    (["--tokenizer", "sentencepiece"], "--tokenizer 'sentencepiece': must be one of byte, char, word, bpe"),
    (["--bpe_vocab_size", "100"], "--bpe_vocab_size 100: must be at least 260"),
    (["--model", "lstm", "--mlp", "swiglu"], "--mlp 'swiglu': shapes a GPT only: leave it out with --model lstm"),
    (["--model", "gpt", "--n_embd", "30", "--n_head", "6"], "rope rotates pairs of dimensions: the head width (5)"),
    (["--muon_momentum", "1"], "--muon_momentum 1.0: must be in [0, 1)"),
    (["--decay_fraction", "1.5"], "--decay_fraction 1.5: must be between 0 and 1"),
    (["--lr_schedule", "wsdd"], "did you mean 'wsd'?"),
    (["--sample_tokens", "-1"], "--sample_tokens -1: must be 0 (no samples) or more"),
    (["--sample_every", "-2"], "--sample_every -2: must be 0 (never) or more steps"),
    (["--sample_temperature", "-0.5"], "--sample_temperature -0.5: must be 0 (greedy) or more"),
    (["--wandb_tags", "a,,b"], "--wandb_tags 'a,,b': names an empty tag: separate tags with single commas"),
])
def test_impossible_values_are_named(argv, message):
    assert message in error_of(argv)


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": "gpt", "n_embd": 96, "n_head": 3, "lr": 0.001, "tie_weights": "false"}))
    cfg = parse_args(["--config", str(path), "--lr", "2e-3"])
    assert (cfg.model, cfg.n_embd, cfg.n_head, cfg.lr, cfg.tie_weights) == ("gpt", 96, 3, 2e-3, False)


def test_yaml_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("modle: gpt\n")
    assert "unknown field 'modle'; did you mean --model?" in error_of(["--config", str(path)])
    path.write_text("- a list\n")
    assert "expected a mapping" in error_of(["--config", str(path)])
    path.write_text("n_layer: 2.5\n")
    assert "--n_layer: expects an integer" in error_of(["--config", str(path)])
    assert "no such file" in error_of(["--config", str(tmp_path / "missing.yaml")])


def test_the_renamed_vocab_size_flag_names_its_new_name():
    assert error_of(["--vocab_size", "300"]) == "--vocab_size was renamed --bpe_vocab_size: use --bpe_vocab_size 300"
    assert parse_args(["--bpe_vocab_size", "300"]).bpe_vocab_size == 300


def old_saved(cfg: TrainConfig) -> dict:
    """`cfg` as lmdist saved it before bpe_vocab_size was named so: with `vocab_size`."""
    return {("vocab_size" if k == "bpe_vocab_size" else k): v for k, v in cfg.to_dict().items()}


def test_a_finished_runs_old_config_yaml_still_matches(tmp_path):
    cfg = parse_args(["--bpe_vocab_size", "300", "--output_dir", str(tmp_path)])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old_saved(cfg)))
    (tmp_path / "run.json").write_text('{"status": "completed"}')
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"")
    assert resume.finished(cfg)  # the same run: not refused
    with pytest.raises(ConfigError, match=r"bpe_vocab_size \(finished run 300, now 400\)"):
        resume.finished(parse_args(["--bpe_vocab_size", "400", "--output_dir", str(tmp_path)]))
    assert parse_args(["--config", str(tmp_path / "config.yaml")]) == cfg  # and it still serves as a --config
    (tmp_path / "both.yaml").write_text("vocab_size: 300\nbpe_vocab_size: 300\n")
    assert "'vocab_size' was renamed 'bpe_vocab_size', and both are given" in error_of(["--config",
                                                                                         str(tmp_path / "both.yaml")])


def test_an_old_checkpoints_config_still_matches_on_resume(tmp_path):
    cfg = parse_args(["--bpe_vocab_size", "300", "--output_dir", str(tmp_path)])
    path = tmp_path / "checkpoints" / "step_00000005"
    path.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt"):  # stand-ins: only their hashes are checked
        (path / name).write_bytes(name.encode())
    (path / checkpoint.STATE).write_text(json.dumps({"progress": {"step": 5}, "run_id": "r", "config": old_saved(cfg),
                                                     "data_fingerprint": "f", "world_size": 1}))
    checkpoint.write_manifest(str(path), [*os.listdir(path)], 5)
    found = resume.find_resume(cfg, say=print)
    resume.check_compatible(found, cfg)  # the same run: not refused
    with pytest.raises(ConfigError, match=r"bpe_vocab_size \(checkpoint 300, now 400\)"):
        resume.check_compatible(found, parse_args(["--bpe_vocab_size", "400", "--output_dir", str(tmp_path)]))


GPT_FIELDS_SINCE_STYLES = ("gpt_style", "position", "rope_theta", "norm", "norm_scale", "qk_norm", "mlp", "bias",
                           "zero_init", "muon_lr", "muon_momentum", "decay_fraction")


def saved_before_styles(cfg: TrainConfig) -> dict:
    """A GPT's config as lmdist saved it before gpt_style: no architecture or Muon fields, tie_weights spelt out."""
    return {k: v for k, v in {**cfg.to_dict(), "tie_weights": True}.items() if k not in GPT_FIELDS_SINCE_STYLES}


def test_a_gpt_checkpoint_from_before_styles_resumes_as_the_gpt2_style(tmp_path):
    """Its GPT was gpt2's: relaunched with --gpt_style gpt2 it resumes; with today's default style it is refused,
    naming what would change, and a config.yaml of that time still builds that GPT."""
    gpt2 = parse_args(["--model", "gpt", "--gpt_style", "gpt2", "--output_dir", str(tmp_path)])
    path = tmp_path / "checkpoints" / "step_00000005"
    path.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt"):
        (path / name).write_bytes(name.encode())
    (path / checkpoint.STATE).write_text(json.dumps({"progress": {"step": 5}, "run_id": "r", "data_fingerprint": "f",
                                                     "config": saved_before_styles(gpt2), "world_size": 1}))
    checkpoint.write_manifest(str(path), [*os.listdir(path)], 5)
    found = resume.find_resume(gpt2, say=print)
    assert found.config["gpt_style"] == "gpt2"
    resume.check_compatible(found, gpt2)
    today = parse_args(["--model", "gpt", "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match=r"gpt_style \(checkpoint 'gpt2', now 'modern'\); position \(checkpoint "
                                          r"'learned', now 'rope'\).*: relaunch with --gpt_style gpt2 \(a run from"):
        resume.check_compatible(found, today)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved_before_styles(gpt2)))
    assert parse_args(["--config", str(tmp_path / "config.yaml")]).architecture == gpt2.architecture
    (tmp_path / "short.yaml").write_text("model: gpt\nn_embd: 64\n")  # written by hand: today's default style
    assert parse_args(["--config", str(tmp_path / "short.yaml")]).gpt_style == TrainConfig().gpt_style


def test_a_style_spelt_out_field_by_field_is_the_same_run(tmp_path):
    styled = parse_args(["--model", "gpt", "--gpt_style", "gpt2"])
    spelt = parse_args(["--model", "gpt", "--gpt_style", "gpt2", "--position", "learned", "--mlp", "gelu",
                        "--tie_weights", "true"])
    assert styled.architecture == spelt.architecture
    resume.refuse_changes(styled.to_dict(), spelt, "the run", "run")  # not refused: it trains the same model
    with pytest.raises(ConfigError, match=r"mlp \(run 'gelu', now 'relu2'\)"):
        resume.refuse_changes(styled.to_dict(), parse_args(["--model", "gpt", "--gpt_style", "gpt2", "--mlp", "relu2"]),
                              "the run", "run")


def test_saved_config_round_trips(tmp_path):
    cfg = parse_args(["--model", "gpt", "--max_steps", "7", "--run_name", "007", "--min_lr", "1e-5"])
    cfg.save_yaml(str(tmp_path / "config.yaml"))
    assert set(yaml.safe_load((tmp_path / "config.yaml").read_text())) == set(FIELDS)
    assert parse_args(["--config", str(tmp_path / "config.yaml")]) == cfg


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as info:
        load_config(["--model", "gpt", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name, f in FIELDS.items():
        assert f"--{name} " in text and f"(default: {f.default})" in text


def test_the_config_reference_documents_every_field():
    reference = (REPO / "docs" / "config.md").read_text()
    assert markdown_table() in reference, "docs/config.md's field table is stale: paste `lmdist fields --markdown`"


def run_train(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN), *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv, message", [
    (["--n_embdd", "64"], "did you mean --n_embd?"),
    (["--n_layer", "3.5"], "expects an integer"),
    (["--model", "gpt", "--n_embd", "10", "--n_head", "4"], "must be divisible by n_head"),
])
def test_cli_errors_exit_2_without_traceback(argv, message, tmp_path):
    result = run_train(*argv, "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists(), "nothing is created before the config is valid"


def test_cli_help_exits_0():
    result = run_train("--help")
    assert result.returncode == 0 and "--n_embd int (default: 128)" in result.stdout and not result.stderr


def test_lmdist_console_script():
    fields = subprocess.run(["lmdist", "fields", "--markdown"], capture_output=True, text=True, timeout=60)
    assert fields.returncode == 0 and fields.stdout.strip() == markdown_table()
    env = subprocess.run(["lmdist", "env"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "WORLD_SIZE": "4", "ACCELERATE_USE_CPU": "1"})
    assert env.returncode == 0
    assert "accelerator_available: false" in env.stdout and '"WORLD_SIZE": "4"' in env.stdout


def test_a_rank_killed_by_a_fatal_signal_prints_its_python_stack():
    """An abort inside native code (gloo, Arrow) names the Python line it happened under, in the rank's log."""
    code = ("import os\nfrom lmdist.errors import run_cli\n"
            "def train_step():\n    os.abort()\n"
            "run_cli(train_step)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -6 and "Fatal Python error: Aborted" in result.stderr
    assert "in train_step" in result.stderr

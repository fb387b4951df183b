"""The commands: train.py's loop from any folder (`python -m lmdist.train`, `lmdist train`, `torchrun -m`), and
the `lmdist` subcommands, whose flags, --help and errors are train.py's."""
from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from lmdist import cli
from tests.conftest import TRAIN, equivalence_args, final_weights, launch_command, launch_env, run_ok
from tests.test_distributed import assert_same_training

LMDIST = shutil.which("lmdist")  # the console script `pip install` wrote


def module_command(command: list[str]) -> list[str]:
    """`command` with `-m lmdist.train` in place of the path to train.py."""
    at = command.index(str(TRAIN))
    return [*command[:at], "-m", "lmdist.train", *command[at + 1:]]


def run_in(folder, command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=folder, env=launch_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def script_run(markov_files, tmp_path_factory):
    """The reference: `python /path/to/train.py`, global batch 8, 16 steps."""
    out = tmp_path_factory.mktemp("cli") / "script"
    run_ok([*equivalence_args(markov_files), "--batch_size", "8", "--output_dir", str(out)], cwd=out.parent)
    return out


@pytest.mark.launch
@pytest.mark.parametrize("entry", [["-m", "lmdist.train"], [LMDIST, "train"]], ids=["python-m", "lmdist-train"])
def test_train_runs_from_another_folder_as_the_script_does(entry, script_run, markov_files, tmp_path):
    """The same flags through the installed module train the same weights, and a finished run relaunched with
    other settings prints a command for the entry it was started with, which trains on."""
    out = tmp_path / "run"
    flags = [*equivalence_args(markov_files), "--batch_size", "8", "--wandb_mode", "disabled", "--output_dir", str(out)]
    command = [*([sys.executable] if entry[0] == "-m" else []), *entry, *flags]  # the console script as typed
    done = run_in(tmp_path, command)
    assert done.returncode == 0, done.stderr[-3000:]
    weights, reference = final_weights(out), final_weights(script_run)
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)
    recorded = json.loads((out / "run.json").read_text())["command"]
    assert recorded[1:3] == entry, recorded  # run.json says how the run was started, as typed

    changed = run_in(tmp_path, [*command, "--lr", "1e-3"])
    assert changed.returncode == 2 and "lr (finished run 0.003, now 0.001)" in changed.stderr
    relaunch = shlex.split(changed.stderr.split("with: ", 1)[1].splitlines()[0])
    assert relaunch[1:3] == entry, relaunch  # after the python that ran it
    assert relaunch[relaunch.index("--init_from") + 1] == str(out / "final")
    continued = run_in(tmp_path, [*relaunch, "--max_steps", "1"])
    assert continued.returncode == 0, continued.stderr[-3000:]


@pytest.mark.launch
def test_torchrun_runs_the_module_from_another_folder(script_run, markov_files, tmp_path):
    """`torchrun -m lmdist.train` on 2 CPU ranks x batch 4 trains the one-process batch-8 model."""
    out = tmp_path / "run"
    command = launch_command([*equivalence_args(markov_files), "--batch_size", "4", "--output_dir", str(out)],
                             nproc=2, launcher="torchrun")
    done = run_in(tmp_path, module_command(command))
    assert done.returncode == 0, done.stderr[-5000:]
    assert_same_training(out, script_run)


# ----------------------------------------------------------------------------- the lmdist commands

def lmdist(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmdist", *argv], env=launch_env(), capture_output=True, text=True,
                          timeout=120)


def test_lmdist_help_lists_the_commands(capfd):
    cli.main(["--help"])
    out = capfd.readouterr().out
    assert out.startswith("usage: lmdist COMMAND")
    for name in ("train", *cli.COMMANDS):
        assert f"\n  {name} " in out


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_help_lists_its_fields(name, capfd):
    cli.main([name, "--help"])
    out = capfd.readouterr().out
    bare = {"plot": "RUN_DIR [RUN_DIR ...] "}.get(name, "")  # the one command with bare arguments, its runs
    assert out.startswith(f"usage: lmdist {name} {bare}[--FIELD VALUE ...]")
    for f in dataclasses.fields(cli.COMMANDS[name]):
        shown = f"  {f.metadata['positional']} ... " if f.metadata["positional"] else f"  --{f.name} "
        assert shown in out and f.metadata["help"].replace("`", "") in out


def test_lmdist_train_help_is_train_pys():
    script = run_in(TRAIN.parent, [sys.executable, str(TRAIN), "--help"], timeout=120)
    command = lmdist("train", "--help")
    assert command.returncode == script.returncode == 0 and command.stdout == script.stdout


@pytest.mark.parametrize("argv, message", [
    (["evl"], "unknown command 'evl'; did you mean eval? (see lmdist --help)"),
    (["eval", "--batch_size", "abc"], "--batch_size: expects an integer, got 'abc'"),
    (["eval", "--chekpoint", "x"], "unknown flag --chekpoint; did you mean --checkpoint? (see --help)"),
    (["eval", "runs/x/final"], "unexpected argument 'runs/x/final': every setting is a flag"),
    (["eval", "--checkpoint"], "flag --checkpoint needs a value"),
    (["generate", "--prompt", "a"], "--checkpoint is required"),
    (["generate", "--checkpoint", "x", "--temperature", "-1"], "--temperature -1.0: must be non-negative"),
    (["generate", "--checkpoint", "x", "--top_k", "1.5"], "--top_k: expects an integer, got '1.5'"),
    (["fields", "--markdown", "maybe"], "--markdown: expects true or false, got 'maybe'"),
    (["peak", "--seconds", "0"], "--seconds 0.0: must be positive"),
    (["peak", "--threads", "0"], "--threads 0: must be at least 1 (or none)"),
])
def test_command_errors_exit_2_naming_the_flag(argv, message, capfd):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and message in capfd.readouterr().err


def test_a_mistake_reads_the_same_in_train_py_and_a_command():
    script = run_in(TRAIN.parent, [sys.executable, str(TRAIN), "--batch_size", "abc"], timeout=120)
    command = lmdist("eval", "--checkpoint", "x", "--batch_size", "abc")
    assert command.returncode == script.returncode == 2
    assert command.stderr == script.stderr == "lmdist: error: --batch_size: expects an integer, got 'abc'\n"


def test_prepare_help_says_how_to_run_it_and_which_flags_decide_the_tokens(capfd):
    with pytest.raises(SystemExit) as done:
        cli.main(["prepare", "--help"])
    head = capfd.readouterr().out.split("\n\nValues come from")[0]
    assert done.value.code == 0 and head.startswith("usage: lmdist prepare [--config FILE.yaml] [--FIELD VALUE ...]")
    assert "accelerate launch" not in head and "train.py" in head  # how to run prepare, not how to run training
    assert "decide the tokens: --dataset, --mixture," in " ".join(head.split())


def test_boolean_flags_take_every_form(capfd):
    from lmdist.config import help_text, markdown_table

    for argv, table in ((["--markdown"], True), (["--markdown=false"], False), (["--nomarkdown"], False),
                        (["--markdown", "yes"], True), ([], False)):
        cli.main(["fields", *argv])
        assert capfd.readouterr().out.strip() == (markdown_table() if table else help_text())

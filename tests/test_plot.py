"""`lmdist plot`: metrics.jsonl files written here (two runs, a resumed run, a run still writing a row, a torn
file) drawn to images that decode and are not blank, with one labelled curve per run and key holding the file's
values; its errors exit 2 (no metrics.jsonl, no matplotlib); and one real run of the session's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from lmdist import cli, plot
from lmdist.errors import ConfigError
from tests.conftest import REPO, launch_env, read_metrics

TOKENS_PER_STEP = 256


def train_row(step: int, loss: float) -> dict:
    return {"step": step, "micro_step": step, "epoch": step / 20, "train/loss": loss, "train/ppl": np.exp(loss),
            "lr": 1e-3 * step / 10, "tokens_per_sec": 1000.0 + step, "tokens_seen": step * TOKENS_PER_STEP}


def run_rows(scale: float, steps: int = 10) -> list[dict]:
    """A run's rows as train.py logs them: training every step, validation (in the same row) every 5."""
    rows = [train_row(s, scale * 4 / s) for s in range(1, steps + 1)]
    for row in rows[4::5]:
        row["val/loss"] = row["train/loss"] + 0.1
    return rows


def write_run(folder, rows: list[dict], tail: str = "") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return str(folder)


def curves(ax) -> dict[str, tuple[list, list]]:
    """Legend label -> (xs, ys) of each line of `ax`."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def colour_pixels(png, colour: str) -> int:
    """Pixels of the image within a few levels of `colour`."""
    image = imread(png)[..., :3]
    return int((np.abs(image - np.array(to_rgb(colour))).max(axis=-1) < 0.05).sum())


def test_two_runs_are_two_labelled_curves_of_their_values_in_an_image(tmp_path):
    """Each run has one colour for its train (solid) and val (dashed, markers) loss; the legend names each curve;
    the lines hold the files' values; the PNG decodes, is not blank and shows both runs' colours."""
    rows = {"small": run_rows(1.0), "large": run_rows(0.5)}
    dirs = [write_run(tmp_path / name, r) for name, r in rows.items()]
    out = tmp_path / "loss.png"
    fig = plot.plot(dirs, str(out), ["loss"])
    (ax,) = fig.axes
    drawn = curves(ax)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(drawn) == [
        "small train/loss", "small val/loss", "large train/loss", "large val/loss"]
    for name, run in rows.items():
        for key in ("train/loss", "val/loss"):
            assert drawn[f"{name} {key}"] == ([r["step"] for r in run if key in r], [r[key] for r in run if key in r])
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["small train/loss"].get_color() == lines["small val/loss"].get_color() != \
        lines["large train/loss"].get_color()
    assert (lines["small train/loss"].get_linestyle(), lines["small val/loss"].get_linestyle()) == ("-", "--")
    assert lines["small val/loss"].get_marker() == "o"
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "loss (nats/token)"

    image = imread(out)
    assert image.shape[:2] == (360, 750) and image[..., :3].std() > 0.05
    for line in ("small train/loss", "large train/loss"):
        assert colour_pixels(out, lines[line].get_color()) > 200, line


def test_a_resumed_run_is_one_curve_with_the_last_value_of_each_step(tmp_path):
    """Rows of steps 2, 4 and 6, the `resumed_from` row of a resume at step 4, then steps 5 to 10 without the cut
    (a file another tool appended to): one line per key, each step once, in order, with the value logged last."""
    first, again = run_rows(1.0, 6)[1::2], run_rows(0.5, 10)[4:]
    resumed = {"step": 4, "micro_step": 4, "resumed_from": 4}
    run = write_run(tmp_path / "resumed", [*first, resumed, *again])
    (ax,) = plot.plot([run], str(tmp_path / "plot.png"), ["loss"]).axes
    kept = {**{r["step"]: r for r in first}, **{r["step"]: r for r in again}}
    steps = [2, 4, 5, 6, 7, 8, 9, 10]
    assert curves(ax) == {
        "resumed train/loss": (steps, [kept[s]["train/loss"] for s in steps]),
        "resumed val/loss": ([5, 10], [kept[5]["val/loss"], kept[10]["val/loss"]]),
    }


@pytest.mark.parametrize("tail, warned", [
    ('{"step": 11, "micro_step": 11, "train/lo', False),  # the row being written by a run in progress
    ('{"step": 11, "micro_st\n' + json.dumps(train_row(12, 9.0)) + "\n", True),  # torn, then more rows
], ids=["in-progress", "torn"])
def test_a_run_being_written_plots_its_complete_rows(tail, warned, tmp_path, capfd):
    """A partial last line is left out quietly; a bad line before the last is reported, and what follows is
    untrusted, as on resume."""
    run = write_run(tmp_path / "live", run_rows(1.0), tail)
    (ax,) = plot.plot([run], str(tmp_path / "plot.png"), ["loss"]).axes
    assert curves(ax)["live train/loss"][0] == list(range(1, 11))
    err = capfd.readouterr().err
    assert ("line 11 is not a complete row (a torn write?): plotting the 10 rows before it" in err) == warned, err


def test_a_run_with_no_row_yet_has_no_curve(tmp_path, capfd):
    started, going = write_run(tmp_path / "started", []), write_run(tmp_path / "going", run_rows(1.0))
    (ax,) = plot.plot([started, going], str(tmp_path / "plot.png"), ["loss"]).axes
    assert list(curves(ax)) == ["going train/loss", "going val/loss"]
    assert f"note: {started} has no complete row yet" in capfd.readouterr().err
    with pytest.raises(ConfigError, match="no run logs loss yet; the runs log: no row yet"):
        plot.plot([started], str(tmp_path / "plot.png"), ["loss"])


def test_panels_tokens_and_labels(tmp_path):
    """--metrics names panels (lr takes muon_lr too), --x tokens plots tokens_seen with SI ticks, two dirs of one
    name are told apart by their parents, and a name no run logs is refused with the keys there are."""
    rows = [{**r, "muon_lr": r["lr"] * 20} for r in run_rows(1.0)]
    dirs = [write_run(tmp_path / parent / "run", rows) for parent in ("a", "b")]
    fig = plot.plot(dirs, str(tmp_path / "panels.svg"), ["loss", "lr", "tokens_per_sec"], x="tokens", log_y=True)
    loss, lr, speed = fig.axes
    assert list(curves(lr)) == ["a/run lr", "a/run muon_lr", "b/run lr", "b/run muon_lr"]
    assert [line.get_linestyle() for line in lr.get_lines()[:2]] == ["-", ":"]
    assert curves(speed)["a/run"] == ([r["tokens_seen"] for r in rows], [r["tokens_per_sec"] for r in rows])
    assert speed.get_xlabel() == "training tokens" and speed.get_ylabel() == "tokens/s" and loss.get_xlabel() == ""
    assert lr.get_xlabel() == "training tokens"  # the lowest of its column: the cell below it is empty
    assert loss.get_yscale() == "log" and speed.xaxis.get_major_formatter()(2_000_000, 0) == "2M"
    assert (tmp_path / "panels.svg").read_text().startswith("<?xml")
    with pytest.raises(ConfigError, match=r"no run logs pplx yet; the runs log: epoch, lr, micro_step, muon_lr"):
        plot.plot(dirs, str(tmp_path / "x.png"), ["pplx"])


def test_the_command_writes_the_image_and_says_where(tmp_path, capfd):
    """Run dirs are bare arguments, before or after flags (a boolean flag does not swallow one)."""
    a, b = write_run(tmp_path / "a", run_rows(1.0)), write_run(tmp_path / "b", run_rows(0.5))
    out = tmp_path / "out" / "curves.png"
    cli.main(["plot", a, "--log_y", b, "--labels", "first,second", "--out", str(out)])
    assert capfd.readouterr().out == f"wrote {out}\n"
    assert imread(out).shape == (360, 750, 4)
    with pytest.raises(SystemExit) as info:
        cli.main(["plot", a, "--out", str(tmp_path / "curves.txt")])
    assert info.value.code == 2 and "curves.txt': name an image file, ending in one of" in capfd.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["plot"], "RUN_DIR is required: the runs' output_dirs"),
    (["plot", "--runs", "a"], "--runs is no flag: give each RUN_DIR bare (usage: RUN_DIR [RUN_DIR ...] [--FIELD"),
    (["plot", "a", "b", "--labels", "x"], "--labels 'x': has 1 name(s) for 2 RUN_DIR(s): give one per RUN_DIR"),
    (["plot", "a", "./a"], "RUN_DIR './a' is 'a' again: give each run once"),
    (["plot", "a", "--metrics", "loss,"], "--metrics 'loss,': names an empty panel"),
    (["plot", "a", "--x", "token"], "--x: expects one of step, tokens, got 'token'; did you mean 'tokens'?"),
])
def test_command_mistakes_exit_2(argv, message, capfd):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and message in capfd.readouterr().err


def test_a_dir_without_metrics_exits_2_naming_the_path(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    for folder, why in (("empty", "no metrics.jsonl in it"), ("absent", "no such folder")):
        with pytest.raises(SystemExit) as info:
            cli.main(["plot", str(tmp_path / folder), "--out", str(tmp_path / "plot.png")])
        err = capfd.readouterr().err
        assert info.value.code == 2 and f"{tmp_path / folder / 'metrics.jsonl'}: {why}: a RUN_DIR is a run's" in err
    assert not (tmp_path / "plot.png").exists()


def test_without_matplotlib_the_command_says_how_to_install_it(tmp_path):
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib (simulated)')\n")
    run = write_run(tmp_path / "run", run_rows(1.0))
    done = subprocess.run([sys.executable, "-m", "lmdist", "plot", run, "--out", str(tmp_path / "plot.png")],
                          env=launch_env({"PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO)])}),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.endswith('lmdist plot needs matplotlib (No module named matplotlib (simulated)): '
                                'pip install "lmdist[plot]"\n'), done.stderr


@pytest.mark.launch
def test_a_real_run_is_drawn_with_its_logged_values(equivalence_runs, tmp_path):
    """The session's one-process and two-rank runs (the same training), by steps and by tokens."""
    runs = [equivalence_runs["one_b8"], equivalence_runs["torchrun_b4"]]
    fig = plot.plot([str(r) for r in runs], str(tmp_path / "real.png"), ["loss", "acc"], x="tokens")
    rows = read_metrics(runs[0])
    drawn = curves(fig.axes[1])
    assert drawn["one_b8 val/acc"] == ([r["tokens_seen"] for r in rows if "val/acc" in r],
                                       [r["val/acc"] for r in rows if "val/acc" in r])
    assert len(drawn) == 4 and imread(tmp_path / "real.png")[..., :3].std() > 0.05

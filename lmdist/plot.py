"""`lmdist plot`: the curves of runs' metrics.jsonl as one image, drawn without a display or a server.

What it reads: `<run_dir>/metrics.jsonl` of each run, the rows JsonlTracker writes (docs/metrics.md). Rows
are trusted as the tracker trusts them on resume: up to the first line that is not a complete JSON row
with an integer step. A last line that does not parse is a row still being written (the run is in
progress) and is left out quietly; a bad line before the last is reported on stderr with what was dropped.
A run with no complete row yet is noted on stderr and has no curve; if no run has a point for a panel, that
is a ConfigError listing the keys the runs do log. A run dir without metrics.jsonl is a ConfigError (exit 2)
naming the path.

One run is one curve per key: the row a resumed run appends (`resumed_from`) carries no metric, and if a
step occurs twice its last value wins; points are sorted by step. The x axis is the step or, with
`x="tokens"`, the row's `tokens_seen` (SI suffixes: 10k, 2M). Values that are not finite numbers are left out.

The figure: one panel per name in `metrics` (the command's default: `loss`), in a column (two columns from
three panels on), sharing the x axis. A panel takes every key that is its name or ends in `/NAME` or `_NAME`: `loss` is
`train/loss` and `val/loss`, `lr` is `lr` and Muon's `muon_lr`, `train/loss` alone is itself. Each run has
one colour in every panel; train keys are solid lines, `val/` keys dashed with markers (validation rows are
few), other keys of a panel solid, dotted, dash-dotted. Each panel's legend names every curve by run label
(its dir name, with parent folders where two dirs share a name) and key, or by label alone in a panel of one
key.

It draws on a bare Figure with the Agg canvas, never pyplot: no backend to pick, no display needed (ssh, a
Slurm job), no global state. matplotlib is the optional extra lmdist[plot]; without it, exit 2 with the
install line. The image is written atomically, so a viewer refreshing it beside a running job never shows
half a file.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lmdist.errors import ConfigError
from lmdist.files import atomic_open

if TYPE_CHECKING:
    from matplotlib.figure import Figure

UNITS = {  # a panel's y label: what its numbers measure
    "loss": "loss (nats/token)", "ppl": "perplexity", "acc": "top-1 accuracy", "lr": "learning rate",
    "grad_norm": "gradient L2 norm", "tokens_per_sec": "tokens/s", "mfu": "MFU (fraction of peak)",
    "data_wait": "fraction of time waiting for data", "peak_rss_mb": "peak RSS (MiB)",
    "peak_gpu_mb": "peak GPU memory (MiB)", "epoch": "epochs",
}
X_LABELS = {"step": "optimizer step", "tokens": "training tokens"}
OTHER_STYLES = ("-", ":", "-.")  # the line styles of a panel's non-validation keys, in order
INSTALL = 'pip install "lmdist[plot]"'


def read_rows(run_dir: str) -> list[dict]:
    """The trusted rows of `run_dir`'s metrics.jsonl, in file order (see the module's contract)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        where = "no such folder" if not os.path.isdir(run_dir) else "no metrics.jsonl in it"
        raise ConfigError(f"{path}: {where}: a RUN_DIR is a run's output_dir, where train.py writes "
                          "metrics.jsonl") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = _row(line)
        if row is None:
            if number < len(lines) or line.endswith(b"\n"):  # not merely the row being written now
                print(f"warning: {path} line {number} is not a complete row (a torn write?): plotting the "
                      f"{len(rows)} rows before it", file=sys.stderr)
            break
        rows.append(row)
    return rows


def _row(line: bytes) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:  # partial JSON, or bytes torn inside a UTF-8 character
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def series(rows: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, values) of `key`: one point per step, the last logged winning, sorted by step."""
    by_step: dict[int, tuple[float, float]] = {}
    for row in rows:
        value, at = row.get(key), row["step"] if x == "step" else row.get("tokens_seen")
        if _number(value) and _number(at):
            by_step[row["step"]] = (at, value)
    points = [by_step[step] for step in sorted(by_step)]
    return [p[0] for p in points], [p[1] for p in points]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def panel_keys(name: str, runs: dict[str, list[dict]]) -> list[str]:
    """The keys panel `name` draws, in the order the runs first log them (train before val: a log row's order)."""
    keys: dict[str, None] = {}
    for rows in runs.values():
        for row in rows:
            keys.update((k, None) for k in row if k == name or k.endswith((f"/{name}", f"_{name}")))
    return [k for k in keys if any(_number(row.get(k)) for rows in runs.values() for row in rows)]


def default_labels(run_dirs: list[str]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes for no two to read the same."""
    parts = [Path(os.path.abspath(d)).parts for d in run_dirs]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            break
    return labels


def figure(runs: dict[str, list[dict]], metrics: list[str], x: str = "step", log_x: bool = False,
           log_y: bool = False) -> Figure:
    """The figure of `runs` (label -> rows): one panel per name in `metrics` (see the module's contract)."""
    Figure, FigureCanvasAgg, EngFormatter = _matplotlib()
    panels = {name: panel_keys(name, runs) for name in metrics}
    if missing := [name for name, keys in panels.items() if not keys]:
        logged = sorted({k for rows in runs.values() for row in rows for k in row if _number(row[k])} - {"step"})
        raise ConfigError(f"--metrics: no run logs {', '.join(missing)} yet; the runs log: "
                          f"{', '.join(logged) or 'no row yet'}")
    columns = 1 if len(panels) < 3 else 2
    rows_of_panels = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(7.5 * columns, 3.6 * rows_of_panels), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows_of_panels, columns, sharex=True, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.remove()  # the empty cell of an odd number of panels in two columns
    colours = {label: f"C{i % 10}" for i, label in enumerate(runs)}
    for i, (ax, (name, keys)) in enumerate(zip(axes[:len(panels)], panels.items(), strict=True)):
        others = iter(OTHER_STYLES * len(keys))
        styles = {k: dict(linestyle="--", marker="o", markersize=3) if k.startswith("val/")
                  else dict(linestyle=next(others)) for k in keys}
        for label, rows in runs.items():
            for key in keys:
                xs, ys = series(rows, key, x)
                if xs:
                    ax.plot(xs, ys, color=colours[label], label=label if len(keys) == 1 else f"{label} {key}",
                            linewidth=1.4, **styles[key])
        ax.set_ylabel(UNITS.get(name.rpartition("/")[2], name))
        if i + columns >= len(panels):  # the lowest panel of its column (above an empty cell, too) gets the x axis
            ax.set_xlabel(X_LABELS[x])
            ax.tick_params(axis="x", labelbottom=True)
        ax.grid(alpha=0.3)
        ax.set_xscale("log" if log_x else "linear")
        ax.set_yscale("log" if log_y else "linear")
        if x == "tokens" and not log_x:
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.legend(fontsize="small")
    return fig


def image_format(out: str) -> str:
    """The format `out`'s suffix names (png, svg, pdf ...), refused before any run is read if matplotlib has none."""
    _, FigureCanvasAgg, _ = _matplotlib()
    kind, formats = Path(out).suffix.lstrip(".").lower(), FigureCanvasAgg.get_supported_filetypes()
    if kind not in formats:
        raise ConfigError(f"--out {out!r}: name an image file, ending in one of "
                          f"{', '.join('.' + k for k in sorted(formats))}")
    return kind


def plot(run_dirs: list[str], out: str, metrics: list[str], x: str = "step", labels: list[str] | None = None,
         log_x: bool = False, log_y: bool = False) -> Figure:
    """Read `run_dirs`, draw them and write the image to `out`, atomically; the figure, for a caller to inspect."""
    kind = image_format(out)
    runs = dict(zip(labels or default_labels(run_dirs), map(read_rows, run_dirs), strict=True))
    for run_dir, rows in zip(run_dirs, runs.values(), strict=True):
        if not rows:  # a run that has only just started: in the image, but with no curve yet
            print(f"note: {run_dir} has no complete row yet", file=sys.stderr)
    fig = figure(runs, metrics, x, log_x, log_y)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format=kind, dpi=100)
    return fig


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError as e:
        raise ConfigError(f"lmdist plot needs matplotlib ({e}): {INSTALL}") from None
    return Figure, FigureCanvasAgg, EngFormatter

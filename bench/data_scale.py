"""bench/run.py's data section: token preparation, launches and memory against the corpus's size, side by side
with a nanoGPT-style baseline (bench/prepare_baseline.py) in one invocation.

For each corpus size (10 MB, 100 MB, 1 GB of text, and 10 GB where the disk holds it; the smoke run: 1 and 2 MB)
and tokenizer (`byte`; `bpe`: a 4096-entry byte-level BPE folder trained once beforehand on the smallest corpus,
so that both sides encode with the same tokenizer -- bpe stops at 1 GB, 10 GB of it would take hours here):
- cold preparation: `lmdist prepare` into an empty tokens_dir against the baseline script, whole-command wall
  time, in pairs that alternate who goes first (A B, B A, ...): `repeats` pairs, 2 for bpe at 1 GB and 1 at
  10 GB (each run of those takes minutes);
- disk: bytes per token of everything in the preparation folder (shards, document index, manifest, tokenizer),
  against the baseline's two flat files;
- launches: train.py on the prepared tokens (a tiny GPT, through bench/launch_probe.py): seconds from the
  command's start to the first optimizer step of a warm launch into a new output_dir, and of the resume of that
  run after a SIGTERM at step STEPS; the warm launch's anonymous memory (RssAnon: not the page cache's mapped
  shards) at step STEPS; the sizes alternating, `repeats` times (once at 10 GB); once a round, the floor under
  them: a plain torch script's seconds to its first step (bench/launch_floor.py);
- bpe from the text: `lmdist prepare --tokenizer bpe` once per size up to 1 GB, its training included (on a
  seeded sample of at most bpe_sample_bytes, 100 MB).
The growth exponent of a figure is the slope of log(figure) against log(size), least squares over the sizes.
Corpora: WikiText-2's validation and test text (../shared/data/wikitext-2) repeated to each size, else the
built-in corpus's.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE, PROBE, FLOOR = (REPO / "bench" / name for name in ("prepare_baseline.py", "launch_probe.py",
                                                               "launch_floor.py"))
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
SIZES = {"10MB": 10**7, "100MB": 10**8, "1GB": 10**9, "10GB": 10**10}
SMOKE_SIZES = {"1MB": 10**6, "2MB": 2 * 10**6}
BPE_UP_TO = 10**9
STEPS = 200  # steps of the warm launch before its memory is read and it is stopped
SMOKE_STEPS = 10
LAUNCH = ("--model gpt --n_layer 2 --n_head 2 --n_embd 64 --block_size 128 --batch_size 8 --eval_every 1000000 "
          "--save_every 1000000 --sample_every 0 --wandb_mode disabled --log_every 50")


def measure(workdir: Path, repeats: int, smoke: bool, sizes: list[str] | None = None) -> dict:
    """The section's figures (the module's docstring says which)."""
    chosen = SMOKE_SIZES if smoke else {name: SIZES[name] for name in sizes or SIZES}
    if not smoke and sizes is None and not _disk_holds(workdir, SIZES["10GB"]):
        chosen.pop("10GB")
    corpora = {name: _corpus(workdir / f"corpus-{name}.txt", size) for name, size in chosen.items()}
    bpe = _bpe_folder(workdir, corpora[min(chosen, key=chosen.get)])
    rows = []
    for name, size in chosen.items():
        for tokenizer in ("byte", "bpe"):
            if tokenizer == "bpe" and size > BPE_UP_TO:
                continue
            pairs = 1 if size > BPE_UP_TO else 2 if tokenizer == "bpe" and size == BPE_UP_TO and not smoke \
                else repeats
            rows.append({"size": name, "bytes": size, "tokenizer": tokenizer,
                         **_prepare_pairs(workdir, corpora[name], bpe if tokenizer == "bpe" else "byte", pairs)})
            print(f"bench: data {name} {tokenizer} prepared", file=sys.stderr, flush=True)
    steps = SMOKE_STEPS if smoke else STEPS
    floor_s = _launches(workdir, rows, corpora, bpe, repeats, steps)
    for row in rows:
        if row["tokenizer"] == "bpe":
            row["bpe_from_text_s"] = _bpe_from_text(workdir, corpora[row["size"]])
        shutil.rmtree(row.pop("tokens_dir"), ignore_errors=True)
    return {"rows": rows, "exponents": exponents(rows), "steps": steps, "launch_flags": LAUNCH, "floor_s": floor_s,
            "corpus": "wikitext-2" if WIKITEXT.is_dir() else "builtin"}


def _disk_holds(workdir: Path, size: int) -> bool:
    """Room for the corpus, lmdist's tokens and the baseline's at 2 bytes a byte, and a margin."""
    return shutil.disk_usage(workdir).free > 5 * size + (10 << 30)


def _corpus(path: Path, size: int) -> Path:
    """`size` bytes of text: WikiText-2 (or the built-in corpus) repeated, cut after a line break."""
    if WIKITEXT.is_dir():
        text = (WIKITEXT / "valid.txt").read_bytes() + (WIKITEXT / "test.txt").read_bytes()
    else:
        from lmdist import corpus

        text = "\n".join(corpus.builtin_documents()).encode()
    with open(path, "wb") as f:
        for _ in range(size // len(text)):
            f.write(text)
        f.write(text[: text.rfind(b"\n", 0, size % len(text)) + 1])
    return path


def _bpe_folder(workdir: Path, corpus: Path) -> str:
    """A 4096-entry BPE tokenizer folder, trained by lmdist on `corpus`, that both sides encode with."""
    tokens = workdir / "bpe-tokens"
    _run([sys.executable, "-m", "lmdist", "prepare", "--dataset", str(corpus), "--tokenizer", "bpe",
          "--tokens_dir", str(tokens)])
    folder = workdir / "bpe-tokenizer"
    shutil.copytree(next(tokens.glob("*/tokenizer")), folder)
    shutil.rmtree(tokens)
    return str(folder)


def _prepare_pairs(workdir: Path, corpus: Path, tokenizer: str, pairs: int) -> dict:
    """Cold preparations by lmdist and by the baseline, alternating; the last lmdist preparation is kept."""
    seconds: dict[str, list[float]] = {"lmdist": [], "baseline": []}
    kept = None
    for pair in range(pairs):
        for side in ("lmdist", "baseline")[:: 1 if pair % 2 == 0 else -1]:
            out = workdir / f"prepared-{side}"
            shutil.rmtree(out, ignore_errors=True)
            if side == "lmdist":
                command = [sys.executable, "-m", "lmdist", "prepare", "--dataset", str(corpus), "--tokenizer",
                           tokenizer, "--tokens_dir", str(out)]
            else:
                command = [sys.executable, str(BASELINE), str(corpus), str(out), "--tokenizer", tokenizer]
            seconds[side].append(_run(command))
            if side == "lmdist":
                kept = workdir / f"tokens-{corpus.stem}-{Path(tokenizer).name}"
                shutil.rmtree(kept, ignore_errors=True)
                out.rename(kept)
            else:
                baseline_disk = sum(f.stat().st_size for f in out.glob("*.bin"))
                shutil.rmtree(out)
    folder = next(p for p in kept.iterdir() if p.is_dir())
    manifest = json.loads((folder / "manifest.json").read_text())
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    ratios = [a / b for a, b in zip(seconds["lmdist"], seconds["baseline"], strict=True)]
    return {"lmdist_prepare_s": seconds["lmdist"], "baseline_prepare_s": seconds["baseline"],
            "prepare_ratio": statistics.median(ratios), "prepare_pair_ratios": ratios, "tokens": tokens,
            "shards": sum(len(split["shards"]) for split in manifest["splits"].values()),
            "bytes_per_token": disk / tokens, "baseline_bytes_per_token": baseline_disk / tokens,
            "tokens_dir": str(kept)}


def _launches(workdir: Path, rows: list[dict], corpora: dict, bpe: str, repeats: int, steps: int) -> list[float]:
    """Warm launch, memory at `steps` and resume of every row, the rows alternating their order each round; and
    the floor under them (bench/launch_floor.py) once a round, whose seconds are returned."""
    for row in rows:
        row.update(launch_s=[], resume_s=[], rss_anon_mb=[], rss_file_mb=[])
    floor_s = []
    for round_ in range(repeats):
        floor_s.append(_probe(workdir, FLOOR, [], returncode=0)["seconds_to_first_step"])
        for row in rows if round_ % 2 == 0 else rows[::-1]:
            if row["bytes"] > BPE_UP_TO and round_ > 0:
                continue  # once at 10 GB
            out = workdir / "launch-run"
            shutil.rmtree(out, ignore_errors=True)
            flags = [*LAUNCH.split(), "--dataset", str(corpora[row["size"]]), "--tokens_dir", row["tokens_dir"],
                     "--tokenizer", bpe if row["tokenizer"] == "bpe" else "byte", "--output_dir", str(out),
                     "--max_steps", str(steps + 20)]
            warm = _probe(workdir, PROBE, [str(steps), *flags])
            resumed = _probe(workdir, PROBE, ["0", *flags])
            if resumed["first_step"] <= warm["stopped_at"]:
                raise RuntimeError(f"the second launch did not resume: {resumed}")
            row["launch_s"].append(warm["seconds_to_first_step"])
            row["resume_s"].append(resumed["seconds_to_first_step"])
            row["rss_anon_mb"].append(warm["rss_anon_mb"])
            row["rss_file_mb"].append(warm["rss_file_mb"])
    return floor_s


def _probe(workdir: Path, script: Path, args: list[str], returncode: int = 75) -> dict:
    """Run a probe script, which writes its findings to the JSON file named by its first argument. A train.py
    launch is stopped by the probe's SIGTERM, saved, to be relaunched: it exits 75."""
    found = workdir / "probe.json"
    found.unlink(missing_ok=True)
    env = {**os.environ, "LMDIST_BENCH_STARTED": repr(time.time())}
    done = subprocess.run([sys.executable, str(script), str(found), *args], cwd=workdir, env=env,
                          capture_output=True, text=True)
    if done.returncode != returncode:
        raise RuntimeError(f"bench launch failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return json.loads(found.read_text())


def _bpe_from_text(workdir: Path, corpus: Path) -> float:
    out = workdir / "bpe-from-text"
    shutil.rmtree(out, ignore_errors=True)
    seconds = _run([sys.executable, "-m", "lmdist", "prepare", "--dataset", str(corpus), "--tokenizer", "bpe",
                    "--tokens_dir", str(out)])
    shutil.rmtree(out)
    return seconds


def _run(command: list[str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench command failed ({' '.join(command)}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return time.perf_counter() - began


FIGURES = {"lmdist cold preparation s": "lmdist_prepare_s", "baseline cold preparation s": "baseline_prepare_s",
           "bytes per token": "bytes_per_token", "warm launch s": "launch_s", "resume s": "resume_s",
           "anonymous memory MiB": "rss_anon_mb"}


def exponents(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per tokenizer and figure, the least-squares slope of log(median figure) against log(size)."""
    found: dict[str, dict[str, float]] = {}
    for tokenizer in sorted({r["tokenizer"] for r in rows}):
        mine = [r for r in rows if r["tokenizer"] == tokenizer]
        if len(mine) < 2:
            continue
        x = [math.log(r["bytes"]) for r in mine]
        for label, key in FIGURES.items():
            values = [r[key] for r in mine]
            y = [math.log(statistics.median(v) if isinstance(v, list) else v) for v in values]
            mx, my = statistics.fmean(x), statistics.fmean(y)
            slope = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum((a - mx) ** 2 for a in x)
            found.setdefault(tokenizer, {})[label] = slope
    return found

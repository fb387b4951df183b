"""The benchmark harness: its smoke mode runs every section end to end, and bench/README.md shows its figures."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

from bench import data_scale as bench_data
from bench import report
from bench import run as bench_run
from tests.conftest import REPO


def test_bench_readme_tables_are_generated_from_the_saved_figures():
    results = json.loads((REPO / "bench" / "results.json").read_text())
    assert not results["smoke"]
    assert report.render(results) in (REPO / "bench" / "README.md").read_text(), \
        "bench/README.md's tables are stale: run `python bench/report.py`"


@pytest.mark.launch
def test_smoke_run_exercises_every_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nstale table\n{report.END}\n\nafter\n")
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out", str(out),
                           "--readme", str(readme)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    results = json.loads(out.read_text())
    assert results["smoke"] and results["peak"]["fp32_flops"] > 0 and results["peak"]["bf16_flops"] > 0
    assert {r["size"] for r in results["overhead"]} == {"GPT S", "LSTM S"}
    assert all(r["lmdist_tokens_per_sec"] > 0 and r["plain_tokens_per_sec"] > 0 for r in results["overhead"])
    assert [r["grad_accum"] for r in results["scaling"]] == [1, 2]
    assert all(r["two_ranks_tokens_per_sec"] > 0 for r in results["scaling"])
    assert results["collectives"]["allreduce_grad_accum_1"] > 0
    data = results["data"]
    assert [(r["size"], r["tokenizer"]) for r in data["rows"]] == [
        (size, tokenizer) for size in bench_data.SMOKE_SIZES for tokenizer in ("byte", "bpe")]
    for r in data["rows"]:  # both sides prepared every size, a launch trained on it and its resume did
        assert len(r["lmdist_prepare_s"]) == len(r["baseline_prepare_s"]) == len(r["prepare_pair_ratios"]) == 1
        # per lmdist's token: the baseline's BPE, cutting its byte ranges elsewhere, makes a few tokens more or less
        assert r["tokens"] > 0 and r["bytes_per_token"] >= 2 and r["baseline_bytes_per_token"] == pytest.approx(2, 1e-3)
        assert 0 < r["launch_s"][0] < 120 and 0 < r["resume_s"][0] < 120 and r["rss_anon_mb"][0] > 50
    assert all("bpe_from_text_s" in r for r in data["rows"] if r["tokenizer"] == "bpe")
    assert set(data["exponents"]) == {"byte", "bpe"}
    assert len(data["floor_s"]) == 1 and 0 < data["floor_s"][0] < 120
    assert all(r["mfu_fp32"] > 0 and r["peak_rss_mb"] > 0 for r in results["efficiency"])
    assert {(r["size"], r["option"]) for r in results["options"]} == {
        (s, o) for s in ("GPT S", "LSTM S") for o in ("compile", "bf16")}
    ttl, = results["time_to_loss"]
    assert ttl["size"] == "GPT S" and {name: len(runs) for name, runs in ttl["runs"].items()} == {
        "gpt2": 1, "modern": 1, "modern_adamw": 1}
    curve = ttl["runs"]["modern"][0]["curve"]
    assert [p["step"] for p in curve] == [5, 10, 15, 20]
    assert all(b["train_s"] > a["train_s"] > 0 for a, b in itertools.pairwise(curve))
    assert ttl["per_seed"][0]["target"] == ttl["runs"]["gpt2"][0]["curve"][-1]["val_loss"]
    costs, = results["step_costs"]
    assert costs["size"] == "GPT S" and set(costs["ms"]) == {"gpt2", "modern", "modern_adamw"}
    assert all(costs["ms"][name][phase]["median"] > 0 for name in costs["ms"] for phase in bench_run.STEP_PHASES)
    text = readme.read_text()
    assert report.render(results) in text and "stale table" not in text and text.endswith("after\n")
    assert report.render(results) in done.stdout  # the table is printed too


def test_a_comparison_is_the_median_of_its_pairs_ratios(monkeypatch, tmp_path):
    """Each A/B pair shares the machine's drift: pairs 10/10, 20/10 and 30/40 make 1.0, the median pair, where
    the ratio of the two sides' medians (20/10) would say 2.0."""
    bench = bench_run.Bench(False, 3, str(tmp_path))
    bench.sizes = {"GPT M": bench_run.SIZES["GPT M"]}
    speeds = {"lmdist": [10.0, 20.0, 30.0], "plain": [10.0, 10.0, 40.0]}

    def train(size, overrides=None, script=bench_run.TRAIN, processes=1, env=None):
        side = "plain" if script == bench_run.PLAIN else "lmdist"
        return {"tokens_per_sec": [speeds[side].pop(0)], "wall_s": 1.0, "peak_rss_mb": 1.0}

    monkeypatch.setattr(bench, "train", train)
    [row] = bench.overhead()
    assert row["pair_ratios"] == [1.0, 2.0, 0.75] and row["ratio"] == 1.0


def test_growth_exponents_are_the_slopes_of_log_figures_against_log_size():
    """A figure that grows as size**0.5 has exponent 0.5, a constant one 0; lists count by their median."""
    rows = [{"tokenizer": "byte", "bytes": size, **{key: [0.1, size ** 0.5, 9 * size ** 0.5] if key == "launch_s"
                                                    else 3.0 for key in bench_data.FIGURES.values()}}
            for size in (10**7, 10**8, 10**9)]
    found = bench_data.exponents(rows)["byte"]
    assert found["warm launch s"] == pytest.approx(0.5) and found["resume s"] == pytest.approx(0.0)


def test_a_partial_run_refuses_to_mix_machines_in_one_table(tmp_path):
    out = tmp_path / "results.json"
    saved = json.loads((REPO / "bench" / "results.json").read_text())
    out.write_text(json.dumps({**saved, "machine": {**saved["machine"], "cpu": "another CPU"}}))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--only", "data", "--out", str(out),
                           "--readme", str(tmp_path / "README.md")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "figures from another machine" in done.stderr
    assert json.loads(out.read_text())["machine"]["cpu"] == "another CPU"  # left as it was


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_gpu_benchmark_says_it_needs_a_gpu():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py")], capture_output=True, text=True)
    assert done.returncode == 2 and "no CUDA GPU here" in done.stderr and "bench/run.py" in done.stderr


def test_the_bench_readme_gpu_figures_are_the_saved_ones():
    """bench/gpu.py's results, as measured on the lent H200, are what bench/README.md's GPU table says."""
    readme = (REPO / "bench" / "README.md").read_text()
    for name in ("gpu_results.json", "gpu_results_b64.json"):
        results = json.loads((REPO / "bench" / name).read_text())
        for run in results["runs"]:
            row = (f"| {run['name']} | {run['batch_size']} | {run['tokens_per_sec']:,.0f} | "
                   f"{run['mfu_datasheet']:.1%}")
            assert row in readme, row


def test_the_readme_headline_figures_are_the_saved_ones():
    """The README's Performance paragraph quotes bench/results.json and the fastest run of bench/gpu.py."""
    headline = (REPO / "README.md").read_text().partition("\n## Performance\n")[2]
    results = json.loads((REPO / "bench" / "results.json").read_text())
    overhead = [r["ratio"] for r in results["overhead"]]
    scaling = [r["ratio"] for r in results["scaling"]]
    mfu = {r["size"]: r["mfu_fp32"] for r in results["efficiency"]}
    gpu = max((run for name in ("gpu_results.json", "gpu_results_b64.json")
               for run in json.loads((REPO / "bench" / name).read_text())["runs"]), key=lambda r: r["tokens_per_sec"])
    for figure in (f"{min(overhead):.2f} to {max(overhead):.2f} times",
                   f"{min(scaling):.2f} to {max(scaling):.2f} times", f"{mfu['GPT M']:.1%} and {mfu['GPT L']:.1%}",
                   f"{gpu['tokens_per_sec']:,.0f} tokens/s", f"{gpu['mfu_datasheet']:.1%} MFU"):
        assert figure in headline, f"README's headline figure {figure!r} is not the saved one: see bench/README.md"


def test_the_readme_gpt_recipe_figures_are_the_saved_ones():
    """The README's GPT section quotes bench/results.json's time_to_loss at GPT S."""
    section = (REPO / "README.md").read_text().partition("\n## The GPT: a modern recipe, and Muon\n")[2]
    section = " ".join(section.partition("\n## ")[0].split())  # one line: figures may wrap
    ttl = next(r for r in json.loads((REPO / "bench" / "results.json").read_text())["time_to_loss"]
               if r["size"] == "GPT S")
    summary = ttl["summary"]
    for figure in (f"after {summary['steps_to_target']['median']:.0f} of its {ttl['steps']} steps",
                   f"{summary['time_ratio']['median']:.2f} of its training time",
                   f"{summary['gain_at_equal_steps']['median']:.2f} nats lower",
                   f"{summary['speed_ratio']['median']:.2f} times its tokens/s",
                   f"{len(ttl['per_seed'])} seeds"):
        assert figure in section, f"README's GPT figure {figure!r} is not the saved one"

"""lm-eval-harness on a run's final/ folder: `lm_eval --model hf --model_args pretrained=final/` scores a
multiple-choice task (a local YAML over a local jsonl, offline) with the log-likelihoods lmdist's own model gives,
and `lmdist eval --harness` gives the same results from a checkpoint. Skipped where lm-eval is not installed
(`pip install "lmdist[eval]"`; the test extras include it)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_GPT, launch_env, run_ok, with_flags

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason='lm-eval is not installed (pip install "lmdist[eval]")')
SENTENCES = ["the cat sat on the mat.", "a dog ran to the park.", "the bird sang in the tree."]
TASK = "lmdist_tiny_choice"
# Contexts and choices from the training text's characters; each context + " " + choice is a different text: two
# requests with the same text split elsewhere share lm-eval's logits cache, which scores the shorter continuation
# at the wrong positions (lm-eval 0.4.13, models/huggingface.py _loglikelihood_tokens).
DOCS = [{"context": "the cat sat on the", "choices": ["mat.", "park.", "tree."], "label": 0},
        {"context": "a dog ran to the", "choices": ["mat.", "park.", "tree."], "label": 1},
        {"context": "the bird sang in the", "choices": ["park.", "tree.", "mat."], "label": 1},
        {"context": "the bird sat", "choices": ["on the mat.", "in the park."], "label": 0},
        {"context": "a cat ran to", "choices": ["the park.", "the tree."], "label": 1}]
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def harness_runs(tmp_path_factory):
    """A tiny run, the task, and both harness runs on it, side by side: the `lm_eval` CLI on final/ (fp32, CPU,
    batch 1, every sample logged) and `lmdist eval --harness` on the run's checkpoint."""
    root = tmp_path_factory.mktemp("harness")
    text = root / "text.txt"
    text.write_text("".join(SENTENCES[i % 3] + "\n" for i in range(600)))
    out = root / "run"
    run_ok([*with_flags(TINY_GPT, "--block_size", "64", "--log_every", "10"), "--dataset", str(text), "--max_steps",
            "40", "--batch_size", "8", "--lr", "3e-3", "--eval_every", "40", "--output_dir", str(out)], cwd=root)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tasks / "task.yaml").write_text(TASK_YAML.format(task=TASK, docs=tasks / "docs.jsonl"))
    step, = (out / "checkpoints").iterdir()
    commands = {
        "cli": [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                f"pretrained={out / 'final'},dtype=float32", "--include_path", str(tasks), "--tasks", TASK,
                "--device", "cpu", "--batch_size", "1", "--output_path", str(root / "cli"), "--log_samples"],
        "lmdist": [sys.executable, "-m", "lmdist", "eval", "--checkpoint", str(step), "--harness", TASK,
                   "--harness_include", str(tasks), "--output", str(root / "lmdist.json")],
    }
    # one core each: lm-eval spends most of its time indexing its built-in tasks, in one thread
    logs = {name: (root / f"{name}.log").open("w") for name in commands}
    running = {name: subprocess.Popen(command, cwd=root, env=launch_env({**OFFLINE, "OMP_NUM_THREADS": "1"}),
                                      stdout=logs[name], stderr=subprocess.STDOUT)
               for name, command in commands.items()}
    for name, process in running.items():
        code = process.wait(timeout=300)
        logs[name].close()
        assert code == 0, f"{name} failed ({code}):\n{(root / f'{name}.log').read_text()[-5000:]}"
    samples, = (root / "cli").glob(f"*/samples_{TASK}_*.jsonl")
    results, = (root / "cli").glob("*/results_*.json")
    return {"step": step, "samples": [json.loads(line) for line in samples.read_text().splitlines()],
            "cli": json.loads(results.read_text()), "lmdist": json.loads((root / "lmdist.json").read_text())}


def lmdist_scorer(step: Path):
    """(context, continuation) -> the log-likelihood of the continuation and whether it is the greedy text, by
    lmdist's model from the checkpoint (its own weights and tokenizer, not the export's)."""
    from lmdist import inference

    saved = inference.open_saved(str(step))
    model = inference.load_model(saved)

    def score(context: str, continuation: str) -> tuple[float, bool]:
        prefix, whole = saved.tokenizer.encode(context), saved.tokenizer.encode(context + continuation)
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([whole[:-1]]))[0].float(), dim=-1)
        positions, targets = range(len(prefix) - 1, len(whole) - 1), whole[len(prefix):]
        total = sum(logprobs[p, t].item() for p, t in zip(positions, targets, strict=True))
        return total, all(logprobs[p].argmax().item() == t for p, t in zip(positions, targets, strict=True))

    return score


@needs_lm_eval
def test_lm_eval_scores_the_exported_folder_with_lmdists_log_likelihoods(harness_runs):
    samples = sorted(harness_runs["samples"], key=lambda s: s["doc_id"])
    assert [s["doc"] for s in samples] == DOCS
    score, correct = lmdist_scorer(harness_runs["step"]), 0
    for doc, sample in zip(DOCS, samples, strict=True):
        requests = [(args["arg_0"], args["arg_1"]) for args in sample["arguments"].values()]
        assert requests == [(doc["context"], " " + choice) for choice in doc["choices"]]  # the task as written
        ours = [score(*request) for request in requests]
        theirs = [(float(loglikelihood), greedy == "True") for loglikelihood, greedy in sample["filtered_resps"]]
        for (our_ll, our_greedy), (their_ll, their_greedy) in zip(ours, theirs, strict=True):
            assert their_ll == pytest.approx(our_ll, abs=1e-4) and their_greedy == our_greedy, (doc, ours, theirs)
        best = max(range(len(ours)), key=lambda i: ours[i][0])
        assert sample["acc"] == float(best == doc["label"])
        correct += best == doc["label"]
    assert harness_runs["cli"]["results"][TASK]["acc,none"] == pytest.approx(correct / len(DOCS))


@needs_lm_eval
def test_lmdist_eval_harness_gives_the_clis_results_from_a_checkpoint(harness_runs):
    ours, cli = harness_runs["lmdist"], harness_runs["cli"]
    assert ours["checkpoint"] == str(harness_runs["step"]) and ours["harness"] == [TASK]
    assert ours["results"][TASK]["acc,none"] == cli["results"][TASK]["acc,none"]
    assert ours["results"][TASK]["sample_len"] == len(DOCS) and ours["n-shot"] == {TASK: 0}


def test_lmdist_eval_harness_without_lm_eval_names_the_install(tmp_path):
    """Where lm-eval is missing (simulated where it is installed): exit 2 and the install line, no traceback."""
    script = ("import sys; sys.modules['lm_eval'] = None; from lmdist.cli import main; "
              "main(['eval', '--checkpoint', sys.argv[1], '--harness', 'hellaswag'])")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=launch_env())
    assert done.returncode == 2 and 'pip install "lmdist[eval]"' in done.stderr and "Traceback" not in done.stderr
    conflict = subprocess.run([sys.executable, "-m", "lmdist", "eval", "--checkpoint", str(tmp_path), "--harness",
                               "hellaswag", "--dataset", "x.txt"], capture_output=True, text=True, timeout=120,
                              env=launch_env())
    assert conflict.returncode == 2 and "drop --dataset and --split" in conflict.stderr

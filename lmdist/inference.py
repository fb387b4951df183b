"""Using saved weights: evaluate them on a dataset or on lm-eval-harness tasks, or generate text from a prompt.

Each takes a training checkpoint (`<output_dir>/checkpoints/step_N/`, verified against its manifest
first) or a `final/` export.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import torch
import yaml

from lmdist import checkpoint, data, engine, export, samples, sources, token_streams
from lmdist.config import TrainConfig, make_config, upgrade_saved
from lmdist.errors import ConfigError, DataError
from lmdist.metrics import evaluate
from lmdist.models import build_model
from lmdist.models import hf as hf_model
from lmdist.tokenizer import Tokenizer, load_tokenizer


@dataclass
class Saved:
    """The folder of the weights, its tokenizer and the run's config, as found in a checkpoint or an export."""

    folder: str
    tokenizer: Tokenizer
    cfg: TrainConfig


def open_saved(folder: str) -> Saved:
    """Find the weights, tokenizer and run config of a checkpoint or an export (final/)."""
    folder = os.path.normpath(folder)
    if os.path.exists(os.path.join(folder, checkpoint.STATE)):  # a training checkpoint
        values = checkpoint.read_state(folder)["config"]
        tokenizer_dir = os.path.join(folder, "..", "..", "tokenizer")
        if values.get("model") == "hf" and hf_model.kept_config(folder):  # not the path the run was launched with
            values["hf_config"] = hf_model.kept_config(folder)
    elif export.is_export(folder):
        values, tokenizer_dir = export.model_values(folder)
        run_config = os.path.join(folder, "..", "config.yaml")
        if os.path.exists(run_config):  # still beside its run: the full config, data included
            with open(run_config) as f:
                values = yaml.safe_load(f)
    else:
        raise DataError(f"{folder} is neither a training checkpoint ({checkpoint.STATE}) nor an lmdist export "
                        f"({export.LMDIST_FILE})")
    values = {**upgrade_saved(values), "resume": "auto", "init_from": None}  # inference neither resumes nor initialises
    return Saved(folder, load_tokenizer(tokenizer_dir), make_config(values))


def load_model(saved: Saved) -> torch.nn.Module:
    model = build_model(saved.cfg, saved.tokenizer.vocab_size)
    checkpoint.load_state(model, export.read_weights(saved.folder), os.path.join(saved.folder, "model.safetensors"))
    return model.eval()


def evaluate_saved(folder: str, dataset: str | None, split: str | None, batch_size: int | None) -> dict:
    """val/loss, val/ppl, val/acc of saved weights: on the run's validation data, or on `split` of `dataset`."""
    saved = open_saved(folder)
    cfg = saved.cfg if batch_size is None else make_config({**saved.cfg.to_dict(), "batch_size": batch_size})
    accelerator = engine.build_accelerator(cfg)
    token_streams.quiet_progress_bars(accelerator.is_main_process)
    if dataset is None:  # the run's own prepared shards, prepared anew with its tokenizer where they are gone
        say = sources.warn if accelerator.is_main_process else lambda message: None
        tokens = token_streams.open_corpus(cfg, say, accelerator.is_main_process, saved.tokenizer).val
    else:
        sources.check_source(dataset)
        rows = sources.pick_split(sources.load_dataset_dict(dataset, cfg), (split,) if split else sources.EVAL_SPLITS,
                                  dataset)
        tokens = token_streams.tokenize(rows, saved.tokenizer, cfg.text_column)
    sequences = data.PackedSequences(tokens, cfg.block_size, keep_partial=True)
    loader = data.eval_loader(sequences, cfg.batch_size, accelerator)
    model, = engine.prepare(accelerator, load_model(saved))  # bf16 logits under bf16, as in training
    metrics = evaluate(model, loader, accelerator)
    return {**metrics, "tokens": tokens.n_tokens - 1, "checkpoint": folder, "dataset": dataset or cfg.dataset,
            "split": split or ("validation" if dataset is None else "auto")}


def generate(folder: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int) -> str:
    """Sample a continuation of `prompt`: the same seed gives the same text; top_k 1 (or temperature 0) is greedy."""
    saved = open_saved(folder)
    ids = samples.continue_ids(load_model(saved), samples.prompt_ids(saved.tokenizer, prompt), max_new_tokens,
                               saved.cfg.block_size, saved.tokenizer.vocab_size, temperature, top_k,
                               torch.Generator().manual_seed(seed), torch.device("cpu"))
    return saved.tokenizer.decode(ids)


def export_saved(folder: str, out: str) -> str:
    """Write an export of the checkpoint or export `folder` into `out`; returns what it is, in a line."""
    if os.path.abspath(out) == os.path.abspath(folder):
        raise ConfigError(f"--out {out} is the folder being exported: choose another one")
    if os.path.isdir(out) and os.listdir(out) and not export.is_export(out):
        raise ConfigError(f"--out {out} holds files and is not an lmdist export: choose a new or empty folder")
    saved = open_saved(folder)
    return export.write_export(out, load_model(saved).state_dict(), saved.cfg, saved.tokenizer)


def evaluate_harness(folder: str, tasks: str, include: str | None, batch_size: int | None) -> dict | None:
    """lm-eval-harness's results on `tasks` (comma-separated task names or YAML files; `include`: a folder of task
    YAMLs of your own) of an export, or of a checkpoint exported to a temporary folder first; None on ranks but 0."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError('--harness needs lm-eval-harness: pip install "lmdist[eval]"') from None
    if include and not os.path.isdir(include):
        raise ConfigError(f"--harness_include {include}: no such folder (a folder of lm-eval task YAML files)")
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = folder
        if not _transformers_export(folder):  # a checkpoint, or an export from before transformers folders
            model_dir = os.path.join(scratch, "model")
            line = export_saved(folder, model_dir)
            if not _transformers_export(model_dir):
                raise ConfigError(f"--checkpoint {folder}: {line}; lm-eval's hf model needs a transformers folder")
        names, manager = [name for name in tasks.split(",") if name], TaskManager(include_path=include)  # ~15 s
        unknown = [name for name in names if not manager.match_tasks([name]) and not os.path.isfile(name)]
        if unknown:
            raise ConfigError(f"--harness {tasks!r}: no lm-eval task {', '.join(unknown)} (`lm_eval ls tasks` lists "
                              "them; --harness_include DIR adds your own task YAMLs)")
        device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's hf model would take cuda regardless
        # logits_cache off: lm-eval 0.4.13 scores a continuation at the wrong positions when another request
        # joins into the same text split elsewhere (docs/transformers.md)
        results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": model_dir, "logits_cache": False},
                                          tasks=names, device=device, batch_size=batch_size or 1,
                                          task_manager=manager, log_samples=False)
    if results is None:
        return None
    return {"checkpoint": folder, "harness": names, "results": results["results"], "n-shot": results["n-shot"],
            "versions": results["versions"], "lm_eval": lm_eval.__version__}


def _transformers_export(folder: str) -> bool:
    path = os.path.join(folder, export.LMDIST_FILE)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f)["weights"] == "transformers"

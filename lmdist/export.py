"""The final export: `<output_dir>/final/` with model.safetensors, the model's config and the tokenizer.

Pickle-free and loadable without lmdist's training code: safetensors weights (tied weights stored
once), a JSON config naming the architecture and its sizes, and the tokenizer folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

from safetensors.torch import save_file

from lmdist.checkpoint import gather_weights, without_tied_copies
from lmdist.config import TrainConfig

MODEL_FIELDS = {
    "lstm": ("embedding_dim", "hidden_dim", "num_layers", "dropout", "tie_weights", "vocab_multiple"),
    "gpt": ("n_layer", "n_head", "n_embd", "dropout", "block_size", "tie_weights", "vocab_multiple"),
}


def save_final(accelerator, model, cfg: TrainConfig, vocab_size: int) -> str:
    """Gather the full weights and write `<output_dir>/final/`; returns its path. Call on every rank."""
    final_dir = os.path.join(cfg.output_dir, "final")
    state = gather_weights(accelerator, model)  # the full weights (shards gathered)
    if accelerator.is_main_process:
        os.makedirs(final_dir, exist_ok=True)
        save_file(without_tied_copies(state), os.path.join(final_dir, "model.safetensors"), metadata={"format": "pt"})
        values = dataclasses.asdict(cfg)
        model_config = {"model": cfg.model, "vocab_size": vocab_size, **{k: values[k] for k in MODEL_FIELDS[cfg.model]}}
        with open(os.path.join(final_dir, "config.json"), "w") as f:
            json.dump(model_config, f, indent=2)
        shutil.copytree(os.path.join(cfg.output_dir, "tokenizer"), os.path.join(final_dir, "tokenizer"),
                        dirs_exist_ok=True)
    accelerator.wait_for_everyone()
    return final_dir


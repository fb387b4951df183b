"""The final export: `<output_dir>/final/` with model.safetensors, the model's config and the tokenizer.

Pickle-free and loadable without lmdist's training code: safetensors weights (tied weights stored
once), a JSON config naming the architecture and its sizes, and the tokenizer folder.
"""
from __future__ import annotations

import os
import shutil

from lmdist.checkpoint import gather_weights, without_tied_copies
from lmdist.config import GPT_FIELDS, TrainConfig
from lmdist.errors import StorageError
from lmdist.files import agree_on_writes, save_safetensors, write_json, writing

MODEL_FIELDS = {
    "lstm": ("embedding_dim", "hidden_dim", "num_layers", "dropout", "tie_weights", "vocab_multiple"),
    "gpt": ("n_layer", "n_head", "n_embd", "dropout", "block_size", "vocab_multiple", "gpt_style", *GPT_FIELDS,
            "rope_theta"),
}


def save_final(accelerator, model, cfg: TrainConfig, vocab_size: int) -> str:
    """Gather the full weights and write `<output_dir>/final/`; returns its path. Call on every rank."""
    final_dir = os.path.join(cfg.output_dir, "final")
    state = gather_weights(accelerator, model)  # the full weights (shards gathered)
    failure = None
    if accelerator.is_main_process:
        try:
            with writing(final_dir):
                os.makedirs(final_dir, exist_ok=True)
                save_safetensors(without_tied_copies(state), os.path.join(final_dir, "model.safetensors"),
                                 metadata={"format": "pt"})
                values = cfg.resolved()  # each option as trained: the export does not depend on a style's defaults
                write_json(os.path.join(final_dir, "config.json"), {"model": cfg.model, "vocab_size": vocab_size,
                                                                     **{k: values[k] for k in MODEL_FIELDS[cfg.model]}})
                shutil.copytree(os.path.join(cfg.output_dir, "tokenizer"), os.path.join(final_dir, "tokenizer"),
                                dirs_exist_ok=True)
        except StorageError as error:
            failure = error
    agree_on_writes(accelerator, failure, final_dir)  # and a barrier: final/ is complete
    return final_dir


"""The models lmdist trains; pure torch, usable without any process group."""
from __future__ import annotations

from torch import nn

from lmdist.config import TrainConfig
from lmdist.models.gpt import GPT
from lmdist.models.lstm import LSTMLanguageModel
from lmdist.models.parameters import count_parameters


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The configured model for a tokenizer of `vocab_size` ids (rounded up to a multiple of vocab_multiple)."""
    vocab_size = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    if cfg.model == "gpt":
        return GPT(vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.tie_weights)
    return LSTMLanguageModel(vocab_size, cfg.embedding_dim, cfg.hidden_dim, cfg.num_layers, cfg.dropout,
                             cfg.tie_weights)


__all__ = ["GPT", "LSTMLanguageModel", "build_model", "count_parameters"]

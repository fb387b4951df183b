"""The models lmdist trains; pure torch, usable without any process group."""
from __future__ import annotations

import torch
from torch import nn

from lmdist.config import GPT_FIELDS, TrainConfig
from lmdist.models.gpt import GPT
from lmdist.models.lstm import LSTMLanguageModel
from lmdist.models.parameters import count_parameters


def vocab_rows(cfg: TrainConfig, vocab_size: int) -> int:
    """The model's embedding and output rows for a tokenizer of `vocab_size` ids: rounded up to vocab_multiple."""
    return -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The configured model for a tokenizer of `vocab_size` ids (vocab_rows of them)."""
    vocab_size = vocab_rows(cfg, vocab_size)
    if cfg.model == "hf":  # imports transformers
        from lmdist.models import hf

        return hf.HFCausalLM(hf.load_config(cfg.hf_config, vocab_size), cfg.block_size, cfg.hf_config)
    if cfg.model == "gpt":
        return GPT(vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, **cfg.architecture)
    return LSTMLanguageModel(vocab_size, cfg.embedding_dim, cfg.hidden_dim, cfg.num_layers, cfg.dropout,
                             **cfg.architecture)


def check_buildable(cfg: TrainConfig) -> None:
    """Refuse a model config that cannot be built, before any data work (--model hf: its transformers config)."""
    if cfg.model == "hf":
        with torch.device("meta"):  # transformers checks the config as it builds; no memory for the weights
            build_model(cfg, cfg.vocab_multiple)


def recorded_config(cfg: TrainConfig) -> dict | None:
    """What a checkpoint records of the model beyond the config's fields: --model hf's transformers config,
    whose file may be edited between launches; None for lmdist's own models."""
    if cfg.model != "hf":
        return None
    from lmdist.models import hf

    return hf.recorded_config(cfg.hf_config)


def describe(cfg: TrainConfig) -> str:
    """The model line of the plan: the architecture as resolved from gpt_style and the fields that override it."""
    if cfg.model == "hf":
        from lmdist.models import hf

        return hf.describe(hf.load_config(cfg.hf_config), cfg.hf_config)
    arch = cfg.architecture
    head = "tied head" if arch["tie_weights"] else "untied head"
    if cfg.model != "gpt":
        return f"model: lstm, {cfg.num_layers} layers x {cfg.hidden_dim} hidden, {head}"
    overridden = [name for name in GPT_FIELDS if getattr(cfg, name) is not None]
    parts = [f"rope (theta {arch['rope_theta']:g})" if arch["position"] == "rope" else "learned positions",
             arch["norm"] + ("" if arch["norm_scale"] else " without scale"), *(["qk-norm"] * arch["qk_norm"]),
             arch["mlp"], "biases" if arch["bias"] else "no biases", *(["zero-init projections"] * arch["zero_init"]),
             head]
    shapes = {f"{arch['n_kv_head']} key/value heads": arch["n_kv_head"] != cfg.n_head,
              f"head width {arch['head_dim']}": cfg.head_dim is not None,
              f"mlp width {arch['mlp_width']}": cfg.mlp_width is not None,
              f"norm eps {arch['norm_eps']}": arch["norm_eps"] is not None, "qkv bias": arch["qkv_bias"]}
    parts += [part for part, shown in shapes.items() if shown]
    return (f"model: gpt {cfg.gpt_style}{' with ' + ', '.join(overridden) + ' set' if overridden else ''}: "
            f"{cfg.n_layer} layers x {cfg.n_head} heads x {cfg.n_embd}, {', '.join(parts)}")


__all__ = ["GPT", "LSTMLanguageModel", "build_model", "check_buildable", "count_parameters", "describe",
           "recorded_config", "vocab_rows"]

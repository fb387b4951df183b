"""The lesson's LSTM language model: embedding -> stacked LSTM layers -> linear decoder.

Each layer is its own `nn.LSTM` module (not one multi-layer LSTM), so later work can shard or
checkpoint layer by layer without changing parameter names. Every sequence starts from a zero
hidden state, as in the lesson: results do not depend on how sequences are split across ranks.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from lmdist.perf import native_cpu_bf16


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab_size: int, embedding_dim: int, hidden_dim: int, num_layers: int,
                 dropout: float, tie_weights: bool):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        # With tied weights the last layer must speak the embedding's width (as in AWD-LSTM).
        widths = [embedding_dim] + [hidden_dim] * (num_layers - 1) + [embedding_dim if tie_weights else hidden_dim]
        self.layers = nn.ModuleList(nn.LSTM(widths[i], widths[i + 1], batch_first=True) for i in range(num_layers))
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(widths[-1], vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The LSTM layers' input and recurrent weights (each the four gates' matrices stacked): Muon's."""
        return [p for p in self.layers.parameters() if p.dim() == 2]

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token of the matmuls: 6 x every weight that multiplies an
        activation (the gates' input and recurrent weights and the decoder; not the embedding lookup)."""
        matmul_weights = [p for name, p in self.layers.named_parameters() if "weight" in name]
        return 6 * (sum(w.numel() for w in matmul_weights) + self.decoder.weight.numel())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, time) -> next-token logits (batch, time, vocab)."""
        x = self.drop(self.embedding(idx))
        with _lstm_precision(x.device):
            for layer in self.layers:
                x, _ = layer(x)  # no initial state: each sequence starts from zeros
                x = self.drop(x)
        return self.decoder(x)


def _lstm_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """fp32 LSTM layers under CPU bf16 autocast where oneDNN has no bf16 LSTM (CPUs without AVX-512): torch
    2.13 still hands autocast's bf16 LSTM to oneDNN there, which fails with "could not create a primitive
    descriptor". The embedding and the decoder keep the run's precision."""
    if device.type == "cpu" and torch.is_autocast_enabled("cpu") and not native_cpu_bf16():
        return torch.autocast("cpu", enabled=False)
    return contextlib.nullcontext()


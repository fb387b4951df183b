"""Token-weighted loss and accuracy, summed on the device, reduced across ranks only at log time.

Nothing here calls `.item()` per micro-step: the sums stay on the device until `compute()`, which is
one all-reduce of three numbers. Perplexity is exp(mean loss per token).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmdist.data import IGNORE_INDEX


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean cross-entropy of next-token logits (batch, time, vocab) against targets (batch, time), in fp32
    whatever the autocast dtype of the logits, and the batch's meter sums (loss, top-1 hits, tokens).

    The loss and the hit count read the same logits: compiled together (`--compile`), the hits' `amax` shares
    the softmax's pass over batch x time x vocab instead of making one of its own. A top-1 hit is "the target's
    logit is the largest" (amax + gather, far cheaper than argmax on CPU; a tie for the top counts as a hit, except
    in a row of equal logits, which predicts nothing: a zero-initialised head's, before it has learned).
    Every target counts: training sequences are whole."""
    flat, flat_targets = logits.flatten(0, 1), targets.flatten()
    loss = F.cross_entropy(flat.float(), flat_targets)
    hits = top1_hits(flat, flat_targets).sum()
    n_tokens = torch.full_like(loss, flat_targets.numel())  # filled on the device: no host copy
    return loss, torch.stack([loss.detach() * n_tokens, hits.to(loss.dtype), n_tokens])


def top1_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Whether each target's logit is the largest of its row (logits (..., vocab), targets (...)) and the row
    not constant."""
    top = logits.amax(-1)
    return (logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) >= top) & (top > logits.amin(-1))


class TokenMeter:
    """Sums of loss, correct top-1 predictions and counted tokens since the last `compute()`."""

    def __init__(self, device: torch.device):
        # float64: sums over millions of tokens stay exact enough to agree across world sizes
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, batch_sums: torch.Tensor) -> None:
        """Add a batch's (loss sum, hits, tokens), as `next_token_loss` returns them (float32: its counts are
        exact); training does this every micro-step, so it is one kernel and no host sync."""
        self.sums += batch_sums

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add an evaluation batch, which may be padded with ignored targets."""
        counted = targets != IGNORE_INDEX
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum",
                                   ignore_index=IGNORE_INDEX)
        hits = top1_hits(logits, targets.clamp(min=0)) & counted  # an ignored target reads row 0, not counted
        self.add(torch.stack([loss_sum, hits.sum().to(loss_sum.dtype), counted.sum().to(loss_sum.dtype)]))

    def compute(self, accelerator, prefix: str) -> dict[str, float]:
        """{prefix/loss, prefix/ppl, prefix/acc} over every rank's tokens; resets the sums."""
        loss_sum, correct, tokens = accelerator.reduce(self.sums.clone(), reduction="sum").tolist()
        self.sums.zero_()
        if tokens == 0:
            return {}
        loss = loss_sum / tokens
        return {f"{prefix}/loss": loss, f"{prefix}/ppl": math.exp(min(loss, 700.0)), f"{prefix}/acc": correct / tokens}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loaders, accelerator) -> dict[str, float]:
    """val/loss, val/ppl, val/acc over the loader (every token once, all ranks together); given a dict of named
    loaders (a mixture's sources), over all of them, and val/<name>/loss, ppl and acc of each."""
    named = loaders if isinstance(loaders, dict) else {None: loaders}
    was_training = model.training
    model.eval()
    total, each = TokenMeter(accelerator.device), {}
    for name, loader in named.items():
        meter = TokenMeter(accelerator.device)
        for inputs, targets in loader:
            meter.update(model(inputs), targets)
        total.sums += meter.sums
        if name is not None:
            each.update(meter.compute(accelerator, f"val/{name}"))
    model.train(was_training)
    return {**total.compute(accelerator, "val"), **each}

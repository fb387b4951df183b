"""Token-weighted loss and accuracy, summed on the device, reduced across ranks only at log time.

Nothing here calls `.item()` per micro-step: the sums stay on the device until `compute()`, which is
one all-reduce of three numbers. Perplexity is exp(mean loss per token).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmdist.data import IGNORE_INDEX


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token logits (batch, time, vocab) against targets (batch, time), in fp32
    whatever the autocast dtype of the logits."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class TokenMeter:
    """Sums of loss, correct top-1 predictions and counted tokens since the last `compute()`."""

    def __init__(self, device: torch.device):
        # float64: sums over millions of tokens stay exact enough to agree across world sizes
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, mean_loss: torch.Tensor | None = None) -> None:
        """Add a batch. Training passes `mean_loss`, its loss already computed over whole sequences (every
        target counts); evaluation batches may be padded with ignored targets.

        Training calls this every micro-step, so that path is a handful of kernels: a top-1 hit is "the
        target's logit is the largest" (amax + gather: an order of magnitude cheaper than argmax on CPU; a tie
        for the top counts as a hit), and the three sums are added in one go."""
        if mean_loss is not None:
            n_counted = torch.full_like(mean_loss, targets.numel())  # filled on the device: no host copy
            loss_sum = mean_loss * n_counted
            hits = logits.gather(-1, targets.unsqueeze(-1)) >= logits.amax(-1, keepdim=True)
        else:
            counted = targets != IGNORE_INDEX
            n_counted = counted.sum()
            loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum",
                                       ignore_index=IGNORE_INDEX)
            target_logit = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            hits = (target_logit >= logits.amax(-1)) & counted
        self.sums += torch.stack([loss_sum, hits.sum(), n_counted])  # float32 per batch: its counts are exact

    def compute(self, accelerator, prefix: str) -> dict[str, float]:
        """{prefix/loss, prefix/ppl, prefix/acc} over every rank's tokens; resets the sums."""
        loss_sum, correct, tokens = accelerator.reduce(self.sums.clone(), reduction="sum").tolist()
        self.sums.zero_()
        if tokens == 0:
            return {}
        loss = loss_sum / tokens
        return {f"{prefix}/loss": loss, f"{prefix}/ppl": math.exp(min(loss, 700.0)), f"{prefix}/acc": correct / tokens}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator) -> dict[str, float]:
    """val/loss, val/ppl, val/acc over the loader (every token once, all ranks together)."""
    was_training = model.training
    model.eval()
    meter = TokenMeter(accelerator.device)
    for inputs, targets in loader:
        meter.update(model(inputs), targets)
    model.train(was_training)
    return meter.compute(accelerator, "val")

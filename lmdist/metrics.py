"""Token-weighted loss and accuracy, summed on the device, reduced across ranks only at log time.

Nothing here calls `.item()` per micro-step: the sums stay on the device until `compute()`, which is
one all-reduce of three numbers. Perplexity is exp(mean loss per token).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmdist.data import IGNORE_INDEX


class TokenMeter:
    """Sums of loss, correct top-1 predictions and counted tokens since the last `compute()`."""

    def __init__(self, device: torch.device):
        # float64: sums over millions of tokens stay exact enough to agree across world sizes
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss_sum: torch.Tensor | None = None) -> None:
        """Add a batch; pass `loss_sum` (summed cross-entropy) when the caller has it already."""
        counted = targets != IGNORE_INDEX
        if loss_sum is None:
            loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum",
                                       ignore_index=IGNORE_INDEX)
        correct = ((logits.argmax(-1) == targets) & counted).sum()
        self.sums += torch.stack([loss_sum.detach().double(), correct.double(), counted.sum().double()])

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

"""How many parameters a model has, each tensor counted once."""
from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters: `Module.parameters()` yields a tied weight once (named_parameters' remove_duplicate)."""
    return sum(p.numel() for p in model.parameters())

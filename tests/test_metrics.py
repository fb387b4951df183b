"""Metric definitions on hand-computed cases, and the learning-rate schedule."""
from __future__ import annotations

import math

import pytest
import torch

from lmdist.config import TrainConfig
from lmdist.data import IGNORE_INDEX
from lmdist.errors import DataError
from lmdist.metrics import TokenMeter, next_token_loss
from lmdist.optim import lr_at
from lmdist.schedule import Plan


class OneProcess:
    """The part of an Accelerator that TokenMeter uses, for a single process."""

    device = torch.device("cpu")

    @staticmethod
    def reduce(tensor, reduction="sum"):
        return tensor


def test_loss_ppl_acc_by_hand():
    # Two positions over a 2-symbol vocabulary, one ignored position.
    logits = torch.log(torch.tensor([[[0.75, 0.25], [0.4, 0.6], [0.5, 0.5]]]))
    targets = torch.tensor([[0, 0, IGNORE_INDEX]])
    meter = TokenMeter(torch.device("cpu"))
    meter.update(logits, targets)
    got = meter.compute(OneProcess, "val")
    loss = -(math.log(0.75) + math.log(0.4)) / 2
    assert got["val/loss"] == pytest.approx(loss)
    assert got["val/ppl"] == pytest.approx(math.exp(loss)) == pytest.approx(1 / math.sqrt(0.75 * 0.4))
    assert got["val/acc"] == 0.5  # first right, second wrong, third not counted
    assert meter.compute(OneProcess, "val") == {}, "compute() resets the sums"


def test_meter_is_token_weighted_across_updates():
    meter = TokenMeter(torch.device("cpu"))
    logits = torch.zeros(1, 4, 3)  # uniform: loss ln 3 per token
    loss, sums = next_token_loss(logits, torch.tensor([[0, 1, 2, 0]]))  # training: every target counts
    assert loss.item() == pytest.approx(math.log(3))
    meter.add(sums)
    meter.add(next_token_loss(torch.tensor([[[3.0, 0, 0], [0, 3.0, 0]]]), torch.tensor([[1, 2]]))[1])
    meter.update(logits, torch.tensor([[0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]))  # evaluation: one counts
    high = 3 + math.log(1 + 2 * math.exp(-3))  # the loss of a target 3 nats below the top logit
    assert meter.compute(OneProcess, "train")["train/loss"] == pytest.approx((5 * math.log(3) + 2 * high) / 7)


def test_accuracy_agrees_with_argmax_and_counts_a_tie_for_the_top_as_a_hit():
    """A tie for the top is a hit, except in a row of equal logits (a zero-initialised head), which predicts nothing."""
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 50, 17), torch.randint(0, 17, (3, 50))
    targets[0, :10] = IGNORE_INDEX
    counted = targets != IGNORE_INDEX
    targets[1, :25] = logits[1, :25].argmax(-1)  # make some hits
    meter = TokenMeter(torch.device("cpu"))
    meter.update(logits, targets)
    expected = ((logits.argmax(-1) == targets) & counted).sum().item() / counted.sum().item()
    assert expected > 0.2 and meter.compute(OneProcess, "val")["val/acc"] == pytest.approx(expected)
    meter.add(next_token_loss(logits[1:], targets[1:])[1])  # the training path: no ignored targets
    expected = (logits[1:].argmax(-1) == targets[1:]).float().mean().item()
    assert meter.compute(OneProcess, "train")["train/acc"] == pytest.approx(expected)
    tie = torch.tensor([[[1.0, 2.0, 2.0], [2.0, 2.0, 1.0]]])
    meter.update(tie, torch.tensor([[2, 2]]))  # tied for the top (argmax would say 1); below the top
    assert meter.compute(OneProcess, "val")["val/acc"] == 0.5
    meter.update(torch.zeros(1, 4, 3), torch.tensor([[0, 1, 2, 0]]))  # a zero head's rows: equal, no prediction
    assert meter.compute(OneProcess, "val")["val/acc"] == 0.0


def test_schedule_warmup_then_decay_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55) and lr_at(110, cfg, 110) == pytest.approx(0.1)
    linear = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, lr_schedule="linear")
    assert lr_at(25, linear, 100) == pytest.approx(0.75)
    assert lr_at(99, TrainConfig(lr=0.5, warmup_steps=0, lr_schedule="constant"), 100) == 0.5
    assert TrainConfig(lr=0.3).effective_min_lr == pytest.approx(0.03)


def test_plan_counts_whole_optimizer_steps():
    cfg = TrainConfig(batch_size=4, grad_accum=2, block_size=16, epochs=3, max_steps=None)
    plan = Plan.make(cfg, 100, world_size=2)
    assert (plan.steps_per_epoch, plan.total_steps, plan.tokens_per_step, plan.sequences_dropped) == (6, 18, 256, 4)
    assert Plan.make(TrainConfig(batch_size=4, epochs=3, max_steps=5), 100, 2).total_steps == 5
    assert plan.epoch_of(9) == 1.5
    with pytest.raises(DataError, match="fewer than one optimizer step needs"):
        Plan.make(TrainConfig(batch_size=64), 100, world_size=2)

"""How long the run is, counted in optimizer steps (the learning rate over it: `lmdist.optim`).

Two counters, never mixed up: a *micro-step* is one batch through forward and backward; a *step*
is one optimizer update (`grad_accum` micro-steps).

The length: `max_steps`, when set, is the run's length exactly and overrides `epochs` (as HF's
`max_train_steps` overrides `num_train_epochs`): the run takes as many epochs as those steps need, the
last one possibly partial. Without it the run is `epochs` whole epochs.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmdist.config import TrainConfig
from lmdist.errors import DataError
from lmdist.optim import lr_at


@dataclass(frozen=True)
class Plan:
    world_size: int
    sequences: int  # training sequences per epoch
    steps_per_epoch: int
    total_steps: int
    epochs: int  # epochs begun, the last one possibly cut short by max_steps
    tokens_per_step: int  # global: every rank's targets in one optimizer step
    sequences_dropped: int  # per epoch: the remainder that cannot fill a whole optimizer step
    log_every: int  # the intervals, in optimizer steps, of the decisions below
    eval_every: int
    save_every: int
    keep_best: bool  # every checkpoint is evaluated, so that the best can be kept

    @classmethod
    def make(cls, cfg: TrainConfig, n_sequences: int, world_size: int) -> Plan:
        per_step = world_size * cfg.batch_size * cfg.grad_accum
        steps_per_epoch = n_sequences // per_step
        if steps_per_epoch == 0:
            raise DataError(
                f"the training split has {n_sequences} sequences of block_size {cfg.block_size}, fewer than one "
                f"optimizer step needs ({world_size} processes x batch_size {cfg.batch_size} x grad_accum "
                f"{cfg.grad_accum} = {per_step}): use more text or a smaller batch_size, grad_accum or block_size"
            )
        total = cfg.max_steps or steps_per_epoch * cfg.epochs
        return cls(world_size, n_sequences, steps_per_epoch, total, -(-total // steps_per_epoch),
                   per_step * cfg.block_size, n_sequences - steps_per_epoch * per_step, *cls._intervals(cfg))

    @classmethod
    def for_stream(cls, cfg: TrainConfig, world_size: int) -> Plan:
        """A stream has no epochs: the run is max_steps long, and `epoch` reports the fraction done."""
        per_step = world_size * cfg.batch_size * cfg.grad_accum
        return cls(world_size, 0, cfg.max_steps, cfg.max_steps, 1, per_step * cfg.block_size, 0, *cls._intervals(cfg))

    @staticmethod
    def _intervals(cfg: TrainConfig) -> tuple[int, int, int, bool]:
        return cfg.log_every, cfg.eval_every, cfg.save_every, cfg.keep_best

    # The loop's decisions after optimizer step `step` (1-based: steps done).

    def is_last(self, step: int) -> bool:
        return step == self.total_steps

    def should_log(self, step: int) -> bool:
        """Every log_every steps and at the last: the training metrics then average the steps since the last row."""
        return step % self.log_every == 0 or self.is_last(step)

    def should_save(self, step: int) -> bool:
        """Every save_every steps and at the last (a stop request saves too: the loop asks for that itself)."""
        return step % self.save_every == 0 or self.is_last(step)

    def should_evaluate(self, step: int, saving: bool) -> bool:
        """Every eval_every steps, at each epoch's end and at the last step; with keep_best also at every checkpoint,
        whose val/loss it compares."""
        return (step % self.eval_every == 0 or step % self.steps_per_epoch == 0 or self.is_last(step)
                or (saving and self.keep_best))

    def epoch_of(self, step: int) -> float:
        """Fractional epochs completed after `step` optimizer steps."""
        return step / self.steps_per_epoch

    def warnings(self, cfg: TrainConfig) -> list[str]:
        """What in `cfg` does not fit this plan without being an error."""
        if cfg.warmup_steps > self.total_steps:
            return [f"warning: warmup_steps {cfg.warmup_steps} is longer than the run ({self.total_steps} steps): "
                    f"the learning rate never reaches lr {cfg.lr} (it peaks at "
                    f"{lr_at(self.total_steps - 1, cfg, self.total_steps):.3g}); lower --warmup_steps"]
        return []


"""The optimizer and the learning-rate schedule: what updates the weights, and by how much at each step.

`--optimizer muon` is two torch optimizers, `torch.optim.Muon` on the hidden weight matrices and fused AdamW
on the rest, stepped as one (`MuonWithAdamW`): the loop, Accelerate's gradient accumulation, the LR scheduler
and the checkpointer each see a single optimizer whose `param_groups` are both optimizers' groups (the same
dicts), so the schedule scales muon_lr and lr alike and one state dict holds both optimizers' states.
"""
from __future__ import annotations

import math

import torch

from lmdist import patches
from lmdist.config import TrainConfig
from lmdist.errors import ConfigError

MUON_SINCE = "2.9"  # the torch release that ships torch.optim.Muon


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Fused AdamW/Adam, SGD, or Muon with AdamW, with weight decay only on matrices and embeddings (never
    biases or norm weights)."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight once, in one group
    if cfg.optimizer == "muon":
        return _muon_with_adamw(cfg, model, params)
    groups = _decay_groups(params, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.beta1)
    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel for the whole update, on CPU as on GPU (faster than foreach there too)
    return optimizer_class(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def _decay_groups(params: list[torch.Tensor], weight_decay: float) -> list[dict]:
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _muon_with_adamw(cfg: TrainConfig, model: torch.nn.Module, params: list[torch.Tensor]) -> MuonWithAdamW:
    _check_torch_has_muon()
    patches.orthogonalize_in_fp32_where_bf16_is_emulated()
    matrices = model.hidden_matrices()  # compile_if_asked compiles in place: the model keeps its methods
    hidden = {id(p) for p in matrices}
    rest = [p for p in params if id(p) not in hidden]
    muon = torch.optim.Muon([p for p in matrices if p.requires_grad], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                            weight_decay=cfg.weight_decay, nesterov=True)
    adamw = torch.optim.AdamW(_decay_groups(rest, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                              fused=True)
    return MuonWithAdamW(muon, adamw)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW as one optimizer. `param_groups` is Muon's groups then AdamW's (the very dicts each
    optimizer reads its lr from), and both write their per-parameter state into this optimizer's `state`, so
    torch's own `state_dict`/`load_state_dict` (and torch.distributed.checkpoint's) cover both unchanged."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        super().__init__([p for o in (muon, adamw) for g in o.param_groups for p in g["params"]], {})
        self.optimizers = (muon, adamw)
        self._share()

    def _share(self) -> None:
        muon, adamw = self.optimizers
        self.param_groups = [*muon.param_groups, *adamw.param_groups]
        self._muon_groups = len(muon.param_groups)
        for optimizer in self.optimizers:
            optimizer.state = self.state

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new group dicts and state: hand them back to the two optimizers
        muon, adamw = self.optimizers
        muon.param_groups = self.param_groups[:self._muon_groups]
        adamw.param_groups = self.param_groups[self._muon_groups:]
        self._share()


def check_optimizer(cfg: TrainConfig, sharded: bool) -> None:
    """Refuse Muon before any work where it cannot train: on a torch without it, or on a sharded (FSDP) model,
    whose ranks would each orthogonalise their own shard of a matrix instead of the matrix, in silence."""
    if cfg.optimizer != "muon":
        return
    _check_torch_has_muon()
    if sharded:
        raise ConfigError("--optimizer muon needs whole weight matrices on every rank, and FSDP shards them: "
                          "train Muon with DDP (launch without the FSDP config), or keep FSDP with "
                          "--optimizer adamw")


def _check_torch_has_muon() -> None:
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"--optimizer muon needs torch {MUON_SINCE} or newer (torch.optim.Muon); this is torch "
                          f"{torch.__version__}: upgrade torch, or choose --optimizer adamw")


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule down to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "wsd":
        decay_start, decay_steps = wsd_phases(cfg, total_steps)
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start + 1) / decay_steps)  # the run's last step trains at min_lr
        return cfg.lr + progress * (cfg.effective_min_lr - cfg.lr)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return cfg.effective_min_lr + shape * (cfg.lr - cfg.effective_min_lr)


def learning_rates(cfg: TrainConfig, step: int, total_steps: int) -> dict[str, float]:
    """The metrics of optimizer step `step` (0-based): `lr`, and with muon `muon_lr`, the matrices' own."""
    lr = lr_at(step, cfg, total_steps)
    if cfg.optimizer != "muon":
        return {"lr": lr}
    return {"lr": lr, "muon_lr": lr / cfg.lr * cfg.muon_lr if cfg.lr else cfg.muon_lr}


def wsd_phases(cfg: TrainConfig, total_steps: int) -> tuple[int, int]:
    """wsd: (the first decaying step, 0-based; how many steps decay): the last decay_fraction of the run, or
    what follows the warm-up when that is less (the rate then decays from its peak, never jumps down)."""
    decay_start = max(total_steps - max(1, round(cfg.decay_fraction * total_steps)), cfg.warmup_steps)
    return decay_start, max(1, total_steps - decay_start)


def describe(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> str:
    """The optimizer line of the plan: which optimizer trains how many tensors at what peak rate, and the
    schedule's phases in steps."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's AcceleratedOptimizer
    if isinstance(optimizer, MuonWithAdamW):
        muon, adamw = (sum(len(g["params"]) for g in o.param_groups) for o in optimizer.optimizers)
        what = (f"muon on {muon} matrices (muon_lr {cfg.muon_lr:g}, momentum {cfg.muon_momentum:g}) + adamw on "
                f"{adamw} other tensors (lr {cfg.lr:g})")
    else:
        what = f"{cfg.optimizer} (lr {cfg.lr:g})"
    warm = f"warm-up {min(cfg.warmup_steps, total_steps)} steps"
    if cfg.lr_schedule == "wsd":
        decay_start, decay_steps = wsd_phases(cfg, total_steps)
        shape = (f"{warm}, stable to step {decay_start}, linear decay to "
                 f"{cfg.effective_min_lr:.3g} over the last {decay_steps}")
    elif cfg.lr_schedule == "constant":
        shape = f"{warm}, then constant"
    else:
        shape = f"{warm}, {cfg.lr_schedule} decay to {cfg.effective_min_lr:.3g} at step {total_steps}"
    return f"optimizer: {what}; schedule: {shape}"


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """A LambdaLR that follows `lr_at`, stepped once per optimizer step; it scales every group's own peak
    (lr, and muon_lr for Muon's matrices) by the same factor."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, cfg, total_steps) / cfg.lr if cfg.lr else 1.0
    )

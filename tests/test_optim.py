"""The optimizers and the schedule: Muon's parameter split, one state dict for both optimizers, wsd's phases."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from lmdist import optim
from lmdist.config import make_config
from lmdist.errors import ConfigError
from lmdist.models import build_model

SMALL_GPT = {"model": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0,
             "optimizer": "muon", "warmup_steps": 2}


def trained(cfg, model, optimizer, scheduler, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 65, (4, 16), generator=generator)
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("style", ["gpt2", "modern"])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(style):
    cfg = make_config({**SMALL_GPT, "gpt_style": style, "weight_decay": 0.05})
    model = build_model(cfg, 65)
    optimizer = optim.build_optimizer(cfg, model)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"]
    by_id = {id(p): name for name, p in model.named_parameters()}
    in_muon = {by_id[id(p)] for g in muon.param_groups for p in g["params"]}
    assert in_muon == {name for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2}
    decayed, not_decayed = ({by_id[id(p)] for p in g["params"]} for g in adamw.param_groups)
    assert "wte.weight" in decayed and ("lm_head.weight" in decayed) == (style == "modern")  # gpt2's head is wte
    assert all(model.get_parameter(name).dim() == 1 for name in not_decayed) and "ln_f.weight" in not_decayed
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.05, 0.0]
    assert (muon.param_groups[0]["lr"], muon.param_groups[0]["momentum"]) == (cfg.muon_lr, cfg.muon_momentum)
    assert len(in_muon | decayed | not_decayed) == len(list(model.parameters()))  # each parameter exactly once


def test_the_schedule_scales_both_optimizers_alike():
    cfg = make_config({**SMALL_GPT, "lr": 1e-3, "muon_lr": 0.04, "lr_schedule": "wsd", "decay_fraction": 0.5})
    model = build_model(cfg, 65)
    optimizer = optim.build_optimizer(cfg, model)
    scheduler = optim.build_scheduler(cfg, optimizer, total_steps=10)
    for step in range(10):
        factor = optim.lr_at(step, cfg, 10) / cfg.lr
        muon, adamw = (o.param_groups[0]["lr"] for o in optimizer.optimizers)
        assert muon == pytest.approx(0.04 * factor) and adamw == pytest.approx(1e-3 * factor)
        assert optim.learning_rates(cfg, step, 10) == pytest.approx({"lr": adamw, "muon_lr": muon})
        trained(cfg, model, optimizer, scheduler, 1, seed=step)


def test_one_state_dict_holds_both_optimizers_and_resumes_bitwise():
    """3 steps, the optimizer's full state dict (as checkpoints take it) into a fresh optimizer, 3 more steps:
    the same weights, bit for bit, as 6 steps straight; without the state, Muon's momentum is lost."""
    cfg = make_config(SMALL_GPT)

    def fresh():
        torch.manual_seed(0)
        model = build_model(cfg, 65)
        optimizer = optim.build_optimizer(cfg, model)
        return model, optimizer, optim.build_scheduler(cfg, optimizer, 6)

    straight = fresh()
    trained(cfg, *straight, 3)
    trained(cfg, *straight, 3, seed=1)
    first = fresh()
    trained(cfg, *first, 3)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    saved = get_optimizer_state_dict(first[0], first[1], options=options)
    assert {"momentum_buffer", "exp_avg", "exp_avg_sq"} <= {k for state in saved["state"].values() for k in state}
    for forget in (False, True):
        second = fresh()
        second[0].load_state_dict(first[0].state_dict())
        if not forget:
            set_optimizer_state_dict(second[0], second[1], saved, options=StateDictOptions(full_state_dict=True))
            second[2].load_state_dict(first[2].state_dict())
            muon, adamw = second[1].optimizers
            assert muon.state is adamw.state is second[1].state and muon.param_groups[0] is second[1].param_groups[0]
        trained(cfg, *second, 3, seed=1)
        same = all(torch.equal(a, b) for a, b in zip(second[0].parameters(), straight[0].parameters(), strict=True))
        assert same != forget


@pytest.mark.parametrize("total", [100, 37])
def test_wsd_holds_lr_then_decays_over_the_last_fraction(total):
    cfg = make_config({"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "lr_schedule": "wsd", "decay_fraction": 0.2})
    decay_start, decay_steps = optim.wsd_phases(cfg, total)
    assert (decay_start, decay_steps) == (total - round(0.2 * total), round(0.2 * total))
    assert optim.lr_at(0, cfg, total) == pytest.approx(0.1) and optim.lr_at(9, cfg, total) == 1.0  # warm-up
    assert optim.lr_at(10, cfg, total) == 1.0 and optim.lr_at(decay_start - 1, cfg, total) == 1.0  # stable
    assert optim.lr_at(decay_start, cfg, total) == pytest.approx(1.0 - 0.9 / decay_steps)  # decay begins
    assert optim.lr_at(total - 1, cfg, total) == pytest.approx(0.1)  # the last step trains at min_lr
    lrs = [optim.lr_at(step, cfg, total) for step in range(decay_start, total)]
    assert all(a > b for a, b in itertools.pairwise(lrs))


def test_wsd_decays_from_the_peak_when_the_warm_up_reaches_into_its_decay():
    """150 steps, 100 of warm-up, a 0.4 decay: the decay takes the 50 steps after the warm-up, without a jump."""
    cfg = make_config({"lr": 1.0, "min_lr": 0.1, "warmup_steps": 100, "lr_schedule": "wsd", "decay_fraction": 0.4})
    assert optim.wsd_phases(cfg, 150) == (100, 50)
    lrs = [optim.lr_at(step, cfg, 150) for step in range(150)]
    assert lrs[99] == 1.0 and lrs[100] == pytest.approx(1.0 - 0.9 / 50) and lrs[-1] == pytest.approx(0.1)
    assert max(abs(a - b) for a, b in itertools.pairwise(lrs[99:])) == pytest.approx(0.9 / 50)


def test_the_plan_names_the_optimizers_and_the_phases():
    cfg = make_config({**SMALL_GPT, "lr_schedule": "wsd", "decay_fraction": 0.25, "warmup_steps": 10})
    line = optim.describe(cfg, optim.build_optimizer(cfg, build_model(cfg, 65)), 200)
    assert line == ("optimizer: muon on 10 matrices (muon_lr 0.02, momentum 0.95) + adamw on 11 other tensors "
                    "(lr 0.003); schedule: warm-up 10 steps, stable to step 150, linear decay to 0.0003 over the "
                    "last 50")


def test_muon_without_torch_muon_names_the_version_before_any_work(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    cfg = make_config(SMALL_GPT)
    for refusal in (lambda: optim.check_optimizer(cfg, sharded=False),
                    lambda: optim.build_optimizer(cfg, build_model(cfg, 65))):
        with pytest.raises(ConfigError, match=r"needs torch 2\.9 or newer .*--optimizer adamw"):
            refusal()


def test_muon_needs_a_positive_lr_whose_schedule_it_follows():
    with pytest.raises(ConfigError, match=r"--lr 0\.0: must be positive with --optimizer muon"):
        make_config({**SMALL_GPT, "lr": 0.0})


def test_muon_on_a_sharded_model_is_refused_naming_what_works():
    with pytest.raises(ConfigError, match=r"FSDP shards them: train Muon with DDP .* --optimizer adamw"):
        optim.check_optimizer(make_config(SMALL_GPT), sharded=True)
    optim.check_optimizer(make_config(SMALL_GPT), sharded=False)
    optim.check_optimizer(make_config({**SMALL_GPT, "optimizer": "adamw"}), sharded=True)


def test_muon_trains_the_lstms_layer_matrices():
    cfg = make_config({"model": "lstm", "optimizer": "muon", "num_layers": 2})
    model = build_model(cfg, 65)
    muon, _ = optim.build_optimizer(cfg, model).optimizers
    assert {id(p) for p in muon.param_groups[0]["params"]} == {
        id(p) for name, p in model.named_parameters() if name.startswith("layers.") and "weight" in name}

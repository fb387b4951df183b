"""Train a language model: the lesson's loop, on one CPU, several processes or several GPUs.

    accelerate launch train.py [--config run.yaml] [--FIELD VALUE ...]
    torchrun --nproc_per_node 2 train.py ...        python train.py ...

Each batch goes forward, through the loss, backward and (every `grad_accum` batches) into an optimizer
step. Everything distributed -- processes, devices, precision, gathering metrics -- sits behind the
`lmdist` calls. Two counters: `micro_step` counts batches, `step` counts optimizer updates.
"""
import math
import os
import sys

import torch.nn.functional as F

from lmdist import config, data, engine, export, tracking
from lmdist.errors import run_cli
from lmdist.metrics import Throughput, TokenMeter, evaluate
from lmdist.models import build_model, count_parameters
from lmdist.schedule import Plan, build_scheduler, lr_at


def main(argv: list[str]) -> None:
    cfg = config.load_config(argv)  # a bad flag stops here, before any process group or data work
    os.makedirs(cfg.output_dir, exist_ok=True)
    accelerator = engine.build_accelerator(cfg, log_with=tracking.make_trackers(cfg, tracking.new_run_id()))
    engine.seed_everything(cfg.seed, accelerator, per_rank=False)  # identical initial weights everywhere

    # Data: the main process tokenizes first, the others reuse its cache.
    corpus = data.load_corpus(cfg, lambda build: engine.main_process_first(accelerator, build),
                              accelerator.is_main_process)
    train_set = data.PackedSequences(corpus.train, cfg.block_size, keep_partial=False)
    val_set = data.PackedSequences(corpus.val, cfg.block_size, keep_partial=True)
    plan = Plan.make(cfg, len(train_set), accelerator.num_processes)
    train_loader = data.train_loader(train_set, cfg.batch_size, accelerator.num_processes, cfg.grad_accum, cfg.seed)
    val_loader = data.eval_loader(val_set, cfg.batch_size, accelerator.num_processes, cfg.eval_batches)

    model = build_model(cfg, corpus.tokenizer.vocab_size)
    n_params = count_parameters(model)
    optimizer = engine.build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, plan.total_steps)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler)
    engine.seed_everything(cfg.seed, accelerator, per_rank=True)  # but each rank its own dropout

    # Rank zero writes config.yaml and run.json, starts W&B and prints the plan.
    log = tracking.RunLog(accelerator, cfg, tracking.run_facts(accelerator, plan, corpus, n_params))
    log.print_plan(plan, corpus, n_params)

    step = micro_step = 0
    train_meter, throughput = TokenMeter(accelerator.device), Throughput(plan.tokens_per_step)
    for epoch in range(cfg.epochs):
        train_loader.set_epoch(epoch)  # a fresh, seeded shuffle each epoch
        for inputs, targets in train_loader:
            with accelerator.accumulate(model):
                logits = model(inputs)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            train_meter.update(logits.detach(), targets, loss.detach() * targets.numel())
            micro_step += 1
            if not accelerator.sync_gradients:
                continue  # still accumulating: no optimizer step yet
            step += 1
            throughput.step()
            log.advance()
            last = step == plan.total_steps

            row = {}
            if step % cfg.log_every == 0 or last:
                row.update(train_meter.compute(accelerator, "train"), lr=lr_at(step - 1, cfg, plan.total_steps),
                           grad_norm=grad_norm.item(), tokens_per_sec=throughput.rate())
            if step % cfg.eval_every == 0 or step % plan.steps_per_epoch == 0 or last:
                with throughput.paused():
                    row.update(evaluate(model, val_loader, accelerator))
            if row:
                log.log({"step": step, "micro_step": micro_step, "epoch": plan.epoch_of(step), **row,
                         "tokens_seen": step * plan.tokens_per_step})
            if last:
                break
        if step == plan.total_steps:
            break

    final_dir = export.save_final(accelerator, model, cfg, corpus.tokenizer.vocab_size)
    log.print(f"final weights: {final_dir}")
    log.finish({"status": "completed", "step": step, "micro_step": micro_step, "final": row})


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))

"""Train a language model: the lesson's loop, on one CPU, several processes or several GPUs.

    accelerate launch train.py [--config run.yaml] [--FIELD VALUE ...]
    torchrun --nproc_per_node 2 train.py ...        python train.py ...

Each batch goes forward, through the loss, backward and (every `grad_accum` batches) into an optimizer
step. Everything distributed -- processes, devices, precision, gathering metrics, checkpoints, stop
requests -- sits behind the `lmdist` calls. Two counters: `micro_step` counts batches, `step` counts
optimizer updates. Relaunching the same command after an interruption continues where it stopped.
"""
import math
import os
import sys

from lmdist.errors import run_cli, stop_during_startup

if __name__ == "__main__":  # before the imports below: they take seconds, and a SIGTERM then must not go unheard
    stop_during_startup()

from lmdist import checkpoint, config, data, engine, export, perf, rundir, streaming, tracking
from lmdist.metrics import TokenMeter, evaluate
from lmdist.models import build_model, count_parameters
from lmdist.models.memory import check_attention_memory
from lmdist.profiling import StepProfiler
from lmdist.resume import (
    Progress,
    adapt_to_world_size,
    check_compatible,
    check_same_data,
    check_within,
    checkpoint_record,
    find_resume,
    finished,
)
from lmdist.schedule import Plan, build_scheduler, lr_at
from lmdist.stopping import StopGuard, Stopped, nonfinite_error, requeue_slurm_job


def main(argv: list[str]) -> None:
    cfg = config.load_config(argv)  # a bad flag stops here, before any process group or data work
    streaming.check_streaming_config(cfg)
    accelerator = engine.build_accelerator(cfg)
    rundir.hold(cfg.output_dir, accelerator)  # one live run per output_dir: before anything reads its state
    check_attention_memory(cfg, accelerator.device, accelerator.mixed_precision,  # before any data work
                           int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    if cfg.resume == "auto" and finished(cfg):
        accelerator.print(f"lmdist: the run in {cfg.output_dir} has already finished; nothing to do")
        return
    resume = find_resume(cfg, say=accelerator.print)  # the newest complete checkpoint, verified
    if resume:  # the same global batch on another number of processes or batch_size adjusts grad_accum
        resume, cfg = adapt_to_world_size(resume, cfg, accelerator.num_processes, say=accelerator.print)
        accelerator.gradient_accumulation_steps = cfg.grad_accum
        check_compatible(resume, cfg)
    # The peak FLOP/s behind `mfu`, measured before any model exists: a big matmul measured after the model
    # and optimizer were allocated slowed the training steps that followed (LSTM S: -15%).
    peak = perf.peak_flops(accelerator.device, accelerator.mixed_precision, cfg.peak_tflops)
    engine.seed_everything(cfg.seed, accelerator, per_rank=False)  # identical initial weights everywhere

    # Data: the main process tokenizes first, the others reuse its cache.
    corpus = data.load_corpus(cfg, lambda build: engine.main_process_first(accelerator, build),
                              accelerator.is_main_process, reuse_tokenizer=resume is not None)
    if resume:
        check_same_data(resume, corpus.fingerprint)
    workers = engine.dataloader_workers(cfg, accelerator.device)
    val_set = data.PackedSequences(corpus.val, cfg.block_size, keep_partial=True)
    val_loader = data.eval_loader(val_set, cfg.batch_size, accelerator, cfg.eval_batches, workers)
    if cfg.streaming:  # each rank reads its own part of the stream, packed on the fly
        stream = streaming.open_stream(cfg, accelerator.process_index, accelerator.num_processes)
        train_set = streaming.StreamedSequences(stream, corpus.tokenizer, cfg.text_column, cfg.block_size)
        train_loader = streaming.StreamLoader(train_set, cfg.batch_size, accelerator.device)
        plan = Plan.for_stream(cfg, accelerator.num_processes)
    else:
        train_set = data.PackedSequences(corpus.train, cfg.block_size, keep_partial=False)
        plan = Plan.make(cfg, len(train_set), accelerator.num_processes)
        train_loader = data.train_loader(train_set, cfg.batch_size, cfg.grad_accum, cfg.seed, accelerator, workers)
    if resume:
        check_within(resume, plan.total_steps)

    model = build_model(cfg, corpus.tokenizer.vocab_size)
    if cfg.init_from:  # weights only: a new run with its own optimizer, counters and run id
        accelerator.print(checkpoint.init_weights(model, cfg.init_from))
    n_params, flops_per_token = count_parameters(model), model.flops_per_token()
    model = engine.shard_if_asked(model, accelerator)  # FSDP on a machine without GPUs: lmdist shards it
    model = engine.compile_if_asked(model, cfg, accelerator.device)
    loss_fn = engine.loss_function(cfg)  # compiled too, when the model is
    optimizer = engine.build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, plan.total_steps)
    model, optimizer, scheduler = engine.prepare(accelerator, model, optimizer, scheduler)  # the loaders place batches
    engine.seed_everything(cfg.seed, accelerator, per_rank=True)  # but each rank its own dropout

    train_meter = TokenMeter(accelerator.device)
    throughput = perf.Throughput(plan.tokens_per_step, flops_per_token, peak, accelerator.num_processes)
    progress, (run_id, forked_from) = Progress(), tracking.run_identity(resume, cfg.output_dir)
    if resume:  # model, optimizer, scheduler, RNG, unlogged metric sums and stream position, exactly as saved
        inherited = checkpoint.load(accelerator, resume.path, model=model, optimizer=optimizer, scheduler=scheduler)
        if inherited:  # on another number of processes, rank zero takes over every saved rank's unlogged sums
            train_meter.sums = sum(state["meter"] for state in inherited).to(accelerator.device)
        if cfg.streaming:  # on as many processes as saved
            train_set.load_state(inherited[0]["stream"])
        progress = resume.progress
    guard = StopGuard(use_scaler=accelerator.scaler is not None)

    def save_checkpoint() -> str:
        record = checkpoint_record(cfg, progress.normalized(plan.steps_per_epoch * cfg.grad_accum), run_id=run_id,
                                   forked_from=forked_from, data_fingerprint=corpus.fingerprint,
                                   val_loss=row.get("val/loss"))
        path, seconds = checkpoint.save(accelerator, cfg.output_dir, progress.step, model=model, optimizer=optimizer,
                                        scheduler=scheduler, record=record, keep_last=cfg.keep_last,
                                        keep_best=cfg.keep_best,
                                        rank_state={"meter": train_meter.sums,
                                                    **({"stream": train_set.state()} if cfg.streaming else {})})
        log.checkpoint_saved(path, seconds)
        return path

    facts = {**tracking.run_facts(accelerator, plan, corpus, model, n_params), **throughput.facts(),
             "forked_from": forked_from}
    with (tracking.RunLog(accelerator, cfg, facts, run_id, resumed=progress if resume else None) as log,
          StepProfiler(cfg, accelerator.device, accelerator.process_index) as profiler):  # off unless profile_steps
        log.print_plan(plan, corpus, n_params)
        for warning in plan.warnings(cfg):
            log.print(warning)
        row = {}
        if resume:
            log.print(f"resumed from {resume.path}: step {progress.step}, epoch {progress.epoch}, "
                      f"batch {progress.micro_batches_in_epoch} of that epoch")
            if progress.step == plan.total_steps:  # stopped during its last step, or run.json lost: export only
                log.print(f"the checkpoint is the run's last step ({plan.total_steps}): nothing left to train")
                row = evaluate(model, val_loader, accelerator)  # the final row's val metrics (the same weights)
        for epoch in range(progress.epoch, plan.epochs):
            if progress.step == plan.total_steps:
                break  # the run is done: at the end of the last epoch's steps, or resumed at its last step
            # A fresh, seeded shuffle each epoch; a resumed epoch skips the batches it already trained on.
            skip = progress.micro_batches_in_epoch if epoch == progress.epoch else 0
            if not cfg.streaming:  # a stream has no epochs: its position is part of its state
                train_loader.set_epoch(epoch, skip)
            progress.epoch, progress.micro_batches_in_epoch = epoch, skip
            for inputs, targets in throughput.timed(train_loader):  # timed: the wait for each batch
                with accelerator.accumulate(model):
                    logits = model(inputs)
                    loss, batch_sums = loss_fn(logits, targets)  # and the meter's loss, hits and tokens
                    train_meter.add(batch_sums)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = engine.clip_gradients(accelerator, model, cfg.grad_clip or math.inf)
                        # every rank's signals and NaNs (losses and norm): the one sync per step
                        verdict = guard.check(grad_norm, train_meter.sums)
                        if verdict.nonfinite:
                            raise nonfinite_error(verdict.nonfinite, progress.step + 1)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                progress.micro_step += 1
                progress.micro_batches_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue  # still accumulating: no optimizer step yet
                guard.after_step(optimizer)
                progress.step += 1
                progress.tokens_seen = progress.step * plan.tokens_per_step
                throughput.step()
                profiler.step()
                log.advance()
                last = progress.step == plan.total_steps

                row = {}
                if progress.step % cfg.log_every == 0 or last:
                    row.update(train_meter.compute(accelerator, "train"), grad_norm=grad_norm.item(),
                               lr=lr_at(progress.step - 1, cfg, plan.total_steps), **throughput.report(),
                               **perf.peak_memory(accelerator.device))
                save_now = progress.step % cfg.save_every == 0 or last or verdict.stop_signal
                if (progress.step % cfg.eval_every == 0 or progress.step % plan.steps_per_epoch == 0 or last
                        or (save_now and cfg.keep_best)):  # keep_best compares every checkpoint's val/loss
                    with throughput.paused():
                        row.update(evaluate(model, val_loader, accelerator))
                if row:
                    log.log({"step": progress.step, "micro_step": progress.micro_step,
                             "epoch": plan.epoch_of(progress.step), **row, "tokens_seen": progress.tokens_seen})
                if save_now:
                    with throughput.paused():
                        saved = save_checkpoint()
                if verdict.stop_signal:
                    log.finish({"status": "stopped", "exit_code": Stopped.exit_code, "step": progress.step,
                                "stop_signal": verdict.stop_signal, "checkpoint": saved})
                    requeued = requeue_slurm_job() if verdict.requeue and accelerator.is_main_process else None
                    raise Stopped(f"{verdict.stop_signal} at step {progress.step}: saved {saved}"
                                  f"{f'; requeued Slurm job {requeued}' if requeued else ''}; relaunch the same "
                                  "command to continue")
                if last:
                    break

        final_dir = export.save_final(accelerator, model, cfg, corpus.tokenizer.vocab_size)
        log.print(f"final weights: {final_dir}")
        log.finish({"status": "completed", "step": progress.step, "micro_step": progress.micro_step, "final": row})


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))

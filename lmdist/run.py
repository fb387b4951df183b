"""One launch of a training run, set up: everything the loop in `train.py` trains with.

    run = setup(cfg)        None when output_dir holds this run, finished
    with run: ...           run.json records how the launch ends; trackers and profiler closed

`setup` takes the steps in an order that is part of the contract: the config is checked before any
process group exists; the output_dir lock is held before anything reads the run's state; the attention
memory is checked before any data work; a checkpoint is found, verified and adapted to this world size
before the data is read; the peak FLOP/s is measured before any model exists (a large matmul measured
after the model was allocated slowed the steps that followed); the model is built with the same seed on
every rank and prepared before each rank reseeds for its own dropout.

The loop drives the run through named steps (`batches`, `clip_gradients`, `step_done`, `train_metrics`,
`evaluate`, `log_metrics`, `sample_text`, `save_checkpoint`, `stop`, `finish`), so it reads as the lesson's loop while
counters, timing, trackers and checkpoints stay here. Nothing in it refers to names the loop binds.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Iterator

import torch

from lmdist import (
    checkpoint,
    data,
    engine,
    export,
    optim,
    perf,
    rundir,
    streaming,
    token_streams,
    trackers,
    tracking,
)
from lmdist.config import TrainConfig
from lmdist.metrics import TokenMeter
from lmdist.metrics import evaluate as evaluate_on
from lmdist.models import build_model, check_buildable, count_parameters, recorded_config
from lmdist.models import describe as describe_model
from lmdist.models import hf as hf_model
from lmdist.models.memory import check_attention_memory
from lmdist.order import ORDER
from lmdist.profiling import StepProfiler
from lmdist.resume import (
    Progress,
    Resume,
    adapt_to_world_size,
    check_compatible,
    check_same_data,
    check_same_model,
    check_within,
    checkpoint_record,
    find_resume,
    finished,
)
from lmdist.samples import Sampler
from lmdist.schedule import Plan
from lmdist.stopping import StopGuard, Stopped, requeue_slurm_job


class Run:
    """The parts of one launch the loop uses, and the bookkeeping around its steps."""

    def __init__(self, cfg: TrainConfig, accelerator, plan: Plan, progress: Progress, corpus,
                 model, optimizer, scheduler, loss_fn, train_set, train_loader, val_loader,
                 train_meter: TokenMeter, throughput: perf.Throughput, facts: dict, run_id: str,
                 forked_from: dict | None, resume: Resume | None, n_params: int, model_config: dict | None,
                 data_order: str):
        self.cfg, self.accelerator, self.plan, self.progress, self.corpus = cfg, accelerator, plan, progress, corpus
        self.model, self.optimizer, self.scheduler, self.loss_fn = model, optimizer, scheduler, loss_fn
        self.train_set, self.train_loader, self.val_loader = train_set, train_loader, val_loader
        self.train_meter, self.throughput, self.facts = train_meter, throughput, facts
        self.run_id, self.forked_from, self.resume, self.n_params = run_id, forked_from, resume, n_params
        self.model_config = model_config  # what checkpoints record of the model beyond cfg (--model hf's config)
        self.data_order = data_order  # the lmdist.order of the batches, which checkpoints record
        self.guard = StopGuard(use_scaler=accelerator.scaler is not None)
        self.sampler = Sampler(cfg, corpus.tokenizer, accelerator)
        self.log: tracking.RunLog | None = None  # from `with run:` on
        self._closing = contextlib.ExitStack()

    def __enter__(self) -> Run:
        """Begin the run's record (config.yaml, run.json, trackers, console) and say what this launch will do."""
        resumed = self.progress if self.resume else None
        self.log = self._closing.enter_context(tracking.RunLog(self.accelerator, self.cfg, self.facts, self.run_id,
                                                               resumed=resumed))
        self.profiler = self._closing.enter_context(  # off unless profile_steps
            StepProfiler(self.cfg, self.accelerator.device, self.accelerator.process_index))
        self.log.print_plan(self.plan, self.corpus, self.n_params)
        self.log.print(describe_model(self.cfg))
        self.log.print(optim.describe(self.cfg, self.optimizer, self.plan.total_steps))
        for warning in self.plan.warnings(self.cfg):
            self.log.print(warning)
        if self.resume:
            self.log.print(f"resumed from {self.resume.path}: step {resumed.step}, epoch {resumed.epoch}, "
                           f"batch {resumed.micro_batches_in_epoch} of that epoch")
            if resumed.step == self.plan.total_steps:  # stopped during its last step, or run.json lost: export only
                self.log.print(f"the checkpoint is the run's last step ({self.plan.total_steps}): nothing left to "
                               "train")
        return self

    def __exit__(self, *error) -> bool:
        return self._closing.__exit__(*error)

    # ------------------------------------------------------------------ the data

    def epochs(self) -> range:
        """The epochs this launch trains in: from the one in progress to the last, none when nothing is left."""
        if self.progress.step == self.plan.total_steps:
            return range(0)
        return range(self.progress.epoch, self.plan.epochs)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`epoch`'s (inputs, targets) micro-batches in a fresh seeded order, up to the end of the run; a resumed
        epoch leaves out those it already trained on. Timed: the wait for each batch counts as data time."""
        progress = self.progress
        skip = progress.micro_batches_in_epoch if epoch == progress.epoch else 0
        if not self.cfg.streaming:  # a stream has no epochs: its position is part of its state
            self.train_loader.set_epoch(epoch, skip)
        progress.epoch, progress.micro_batches_in_epoch = epoch, skip
        left_in_run = (self.plan.total_steps - progress.step) * self.cfg.grad_accum
        return itertools.islice(self.throughput.timed(self.train_loader), left_in_run)

    # ------------------------------------------------------------------ one step

    def clip_gradients(self) -> torch.Tensor:
        """Clip the global gradient norm to `grad_clip` (0: only measure it); the norm before clipping."""
        return engine.clip_gradients(self.accelerator, self.model, self.cfg.grad_clip or math.inf)

    def micro_step_done(self) -> bool:
        """Count a micro-batch through forward and backward; True when it completed an optimizer step."""
        self.progress.micro_step += 1
        self.progress.micro_batches_in_epoch += 1
        if not self.accelerator.sync_gradients:
            return False
        self.guard.after_step(self.optimizer)
        self.progress.step += 1
        self.progress.tokens_seen = self.progress.step * self.plan.tokens_per_step
        self.throughput.step()
        self.profiler.step()
        self.log.advance()
        return True

    def train_metrics(self, grad_norm: torch.Tensor) -> dict:
        """The training metrics since the last logged step, gathered from every rank (a collective)."""
        return {**self.train_meter.compute(self.accelerator, "train"), "grad_norm": grad_norm.item(),
                **optim.learning_rates(self.cfg, self.progress.step - 1, self.plan.total_steps),
                **self.throughput.report(), **perf.peak_memory(self.accelerator.device)}

    def evaluate(self) -> dict:
        """val/loss, val/ppl and val/acc over the validation batches (a collective), outside tokens/s."""
        with self.throughput.paused():
            return evaluate_on(self.model, self.val_loader, self.accelerator)

    def log_metrics(self, row: dict) -> None:
        """One metrics row for this step: to metrics.jsonl, W&B and the console, from rank zero."""
        step = self.progress.step
        self.log.log({"step": step, "micro_step": self.progress.micro_step, "epoch": self.plan.epoch_of(step), **row,
                      "tokens_seen": self.progress.tokens_seen})

    def sample_text(self, evaluated: bool) -> None:
        """Continue the sample prompts when this step takes samples (at evaluations by default), outside tokens/s;
        every rank calls it, rank zero logs the text."""
        step = self.progress.step
        if self.sampler.due(step, evaluated, last=step == self.plan.total_steps):
            with self.throughput.paused():
                self.log.log_samples(self.sampler.sample(self.model, step))

    def save_checkpoint(self, val_loss: float | None) -> str:
        """Save this step's complete checkpoint (every rank takes part), outside tokens/s; returns its folder.

        `val_loss`, this step's evaluation if there was one, is what `keep_best` compares."""
        rank_state = {"meter": self.train_meter.sums}  # the metric sums not logged yet
        if self.cfg.streaming:
            rank_state["stream"] = self.train_set.state()
        record = checkpoint_record(self.cfg, self.progress.normalized(self.plan.steps_per_epoch * self.cfg.grad_accum),
                                   run_id=self.run_id, forked_from=self.forked_from,
                                   data_fingerprint=self.corpus.fingerprint, data_order=self.data_order,
                                   val_loss=val_loss, model_config=self.model_config)
        with self.throughput.paused():
            path, seconds = checkpoint.save(self.accelerator, self.cfg.output_dir, self.progress.step, model=self.model,
                                            optimizer=self.optimizer, scheduler=self.scheduler, rank_state=rank_state,
                                            record=record, keep_last=self.cfg.keep_last, keep_best=self.cfg.keep_best)
        self.log.checkpoint_saved(path, seconds)
        return path

    def stop(self, stop_signal: str, requeue: bool, checkpoint_path: str) -> None:
        """End this launch on a stop request, after its checkpoint: requeue a Slurm job when its signal asks to,
        and raise Stopped (exit 75: relaunch the same command to continue)."""
        step = self.progress.step
        self.log.finish({"status": "stopped", "exit_code": Stopped.exit_code, "step": step,
                         "stop_signal": stop_signal, "checkpoint": checkpoint_path})
        requeued = requeue_slurm_job() if requeue and self.accelerator.is_main_process else None
        done = f"{stop_signal} at step {step}: saved {checkpoint_path}"
        if requeued:
            done += f"; requeued Slurm job {requeued}"
        raise Stopped(f"{done}; relaunch the same command to continue")

    def finish(self, last_row: dict) -> None:
        """Export the final weights and record the run as completed, with its last metrics row (a launch that
        resumed at the last step trained nothing: its row is the evaluation of the same weights)."""
        if not last_row:
            last_row = self.evaluate()
        final_dir, what = export.save_final(self.accelerator, self.model, self.cfg, self.corpus.tokenizer)
        self.log.print(f"final weights: {final_dir}: {what}")
        self.log.log_model(final_dir, self.progress.step)
        self.log.finish({"status": "completed", "step": self.progress.step, "micro_step": self.progress.micro_step,
                         "final": last_row})


def setup(cfg: TrainConfig) -> Run | None:
    """Everything one launch trains with, or None when output_dir holds this very run, finished."""
    cfg, adopted = export.adopt_pretrained(cfg)  # init_from a transformers folder: its architecture and tokenizer
    streaming.check_streaming_config(cfg)
    trackers.check_available(cfg)  # a missing package is refused before training, not warned about mid-run
    accelerator = engine.build_accelerator(cfg)
    if adopted:
        accelerator.print(adopted)
    rundir.hold(cfg.output_dir, accelerator)  # one live run per output_dir: before anything reads its state
    check_buildable(cfg)  # before any data work
    model_config = recorded_config(cfg)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    check_attention_memory(cfg, accelerator.device, accelerator.mixed_precision, local_processes)
    optim.check_optimizer(cfg, sharded=engine.shards_model(accelerator))
    if cfg.resume == "auto" and finished(cfg):
        accelerator.print(f"lmdist: the run in {cfg.output_dir} has already finished; nothing to do")
        return None
    resume = find_resume(cfg, say=accelerator.print)  # the newest complete checkpoint, verified
    if resume:  # the same global batch on another number of processes or batch_size adjusts grad_accum
        resume, cfg = adapt_to_world_size(resume, cfg, accelerator.num_processes, say=accelerator.print)
        accelerator.gradient_accumulation_steps = cfg.grad_accum
        check_compatible(resume, cfg)
        check_same_model(resume, cfg, model_config)
    if cfg.model == "hf" and accelerator.is_main_process:  # what its checkpoints are evaluated and exported with
        hf_model.keep_config(cfg.hf_config, cfg.output_dir)
    peak = perf.peak_flops(accelerator.device, accelerator.mixed_precision, cfg.peak_tflops, local_processes)
    engine.seed_everything(cfg.seed, accelerator, per_rank=False)  # identical initial weights everywhere

    # Data: the main process prepares the token shards when there are none, then every rank opens them.
    corpus = token_streams.load_corpus(cfg, lambda build: engine.main_process_first(accelerator, build),
                              accelerator.is_main_process, reuse_tokenizer=resume is not None)
    if resume:
        check_same_data(resume, corpus.fingerprint)
    workers = engine.dataloader_workers(cfg, accelerator.device)
    data_order = resume.data_order if resume else ORDER  # a resumed run draws in its checkpoint's order
    if corpus.sources:  # a mixture: each source's validation on its own, and its sequences drawn by weight
        val_loader = {part.source.name: data.eval_loader(data.PackedSequences(part.val, cfg.block_size, True),
                                                         cfg.batch_size, accelerator, cfg.eval_batches, workers)
                      for part in corpus.sources}
    else:
        val_set = data.PackedSequences(corpus.val, cfg.block_size, keep_partial=True)
        val_loader = data.eval_loader(val_set, cfg.batch_size, accelerator, cfg.eval_batches, workers)
    if corpus.sources:
        train_set = data.MixedSequences([data.PackedSequences(part.train, cfg.block_size, keep_partial=False)
                                            for part in corpus.sources])
        plan = Plan.make(cfg, len(train_set), accelerator.num_processes)
        train_loader = data.mixture_train_loader(train_set, [part.source for part in corpus.sources],
                                                 cfg.batch_size, cfg.grad_accum, cfg.seed, accelerator, workers)
    elif cfg.streaming:  # each rank reads its own part of the stream, packed on the fly
        stream = streaming.open_stream(cfg, accelerator.process_index, accelerator.num_processes)
        train_set = streaming.StreamedSequences(stream, corpus.tokenizer, cfg.text_column, cfg.block_size)
        train_loader = streaming.StreamLoader(train_set, cfg.batch_size, accelerator.device)
        plan = Plan.for_stream(cfg, accelerator.num_processes)
    else:
        train_set = data.PackedSequences(corpus.train, cfg.block_size, keep_partial=False)
        plan = Plan.make(cfg, len(train_set), accelerator.num_processes)
        train_loader = data.train_loader(train_set, cfg.batch_size, cfg.grad_accum, cfg.seed, accelerator, workers,
                                         data_order)
    if resume:
        check_within(resume, plan.total_steps)

    # The model, and what trains it.
    model = build_model(cfg, corpus.tokenizer.vocab_size)
    if cfg.init_from and not resume:  # weights only: a new run with its own optimizer, counters and run id
        accelerator.print(export.init_weights(model, cfg.init_from, cfg))
    n_params, flops_per_token = count_parameters(model), model.flops_per_token()
    model = engine.shard_if_asked(model, accelerator)  # FSDP on a machine without GPUs: lmdist shards it
    model = engine.compile_if_asked(model, cfg, accelerator.device)
    loss_fn = engine.loss_function(cfg)  # compiled too, when the model is
    optimizer = optim.build_optimizer(cfg, model)
    scheduler = optim.build_scheduler(cfg, optimizer, plan.total_steps)
    model, optimizer, scheduler = engine.prepare(accelerator, model, optimizer, scheduler)  # the loaders place batches
    engine.seed_everything(cfg.seed, accelerator, per_rank=True)  # but each rank its own dropout

    # Where training stands: fresh, or exactly as the checkpoint saved it.
    train_meter = TokenMeter(accelerator.device)
    throughput = perf.Throughput(plan.tokens_per_step, flops_per_token, peak, accelerator.num_processes)
    progress, (run_id, forked_from) = Progress(), tracking.run_identity(resume, cfg.output_dir)
    if resume:  # model, optimizer, scheduler, RNG, unlogged metric sums and stream position
        inherited = checkpoint.load(accelerator, resume.path, model=model, optimizer=optimizer, scheduler=scheduler)
        if inherited:  # on another number of processes, rank zero takes over every saved rank's unlogged sums
            train_meter.sums = sum(state["meter"] for state in inherited).to(accelerator.device)
        if cfg.streaming:  # on as many processes as saved
            train_set.load_state(inherited[0]["stream"])
        progress = resume.progress

    facts = {**tracking.run_facts(accelerator, plan, corpus, model, n_params), **throughput.facts(),
             "forked_from": forked_from}
    return Run(cfg, accelerator, plan, progress, corpus, model, optimizer, scheduler, loss_fn, train_set,
               train_loader, val_loader, train_meter, throughput, facts, run_id, forked_from, resume, n_params,
               model_config, data_order)

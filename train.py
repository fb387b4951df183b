"""Train a language model: the lesson's loop, on one CPU, several processes or several GPUs.

    accelerate launch train.py [--config run.yaml] [--FIELD VALUE ...]
    torchrun --nproc_per_node 2 train.py ...        python train.py ...
    lmdist train ...   python -m lmdist.train ...   (this same file, from any folder)

Each batch goes forward, through the loss, backward and (every `grad_accum` batches) into an optimizer
step; then the run logs, evaluates, saves and stops when its plan says so. Everything distributed --
processes, devices, precision, gathering metrics, checkpoints, stop requests -- sits behind `lmdist`
calls: `setup` builds the run (lmdist/run.py), and the loop drives it. Two counters: a micro-step is
one batch, a step one optimizer update. Relaunching the same command after an interruption continues
where it stopped.
"""
import sys

from lmdist.errors import run_cli, stop_during_startup

if __name__ == "__main__":  # before the imports below: they take seconds, and a SIGTERM then must not go unheard
    stop_during_startup()

from lmdist.config import load_config
from lmdist.run import setup
from lmdist.stopping import nonfinite_error


def main(argv: list[str]) -> None:
    cfg = load_config(argv)  # defaults < --config FILE < --flags; a bad one stops here, before any process starts
    run = setup(cfg)  # accelerator, output_dir lock, resume, data, model, optimizer, scheduler
    if run is None:
        return  # output_dir holds this run, finished
    accelerator, model, optimizer, scheduler = run.accelerator, run.model, run.optimizer, run.scheduler
    plan, progress = run.plan, run.progress

    with run:  # run.json, trackers and the console: closed however the launch ends
        row = {}
        for epoch in run.epochs():
            for inputs, targets in run.batches(epoch):
                with accelerator.accumulate(model):  # gradients sync across ranks on the last micro-step only
                    logits = model(inputs)  # (batch, time, vocab)
                    loss, batch_sums = run.loss_fn(logits, targets)  # and the meter's loss, hits and tokens
                    run.train_meter.add(batch_sums)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = run.clip_gradients()
                        # every rank's stop requests and NaNs (losses and norm): the one sync per step
                        verdict = run.guard.check(grad_norm, run.train_meter.sums)
                        if verdict.nonfinite:
                            raise nonfinite_error(verdict.nonfinite, progress.step + 1)
                    optimizer.step()  # Accelerate skips these while accumulating
                    scheduler.step()
                    optimizer.zero_grad()
                if not run.micro_step_done():
                    continue  # still accumulating: no optimizer step yet

                step, row = progress.step, {}
                if plan.should_log(step):
                    row |= run.train_metrics(grad_norm)
                saving = plan.should_save(step) or verdict.stop_signal is not None
                if plan.should_evaluate(step, saving):
                    row |= run.evaluate()
                if row:
                    run.log_metrics(row)
                run.sample_text(evaluated="val/loss" in row)  # the prompts' continuations, to watch it learn to write
                if saving:
                    saved = run.save_checkpoint(val_loss=row.get("val/loss"))
                if verdict.stop_signal:  # a preemption or Ctrl-C: saved above; exit 75 to be relaunched
                    run.stop(verdict.stop_signal, verdict.requeue, saved)
        run.finish(row)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))

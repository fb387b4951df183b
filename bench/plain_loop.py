"""The lesson's loop written directly in PyTorch: the baseline that lmdist's overhead is measured against.

Same model, data, batch, optimizer (fused AdamW, no weight decay on biases and norm weights), gradient
clipping, learning-rate schedule, threads and host allocator settings as `train.py` with the same flags; no
Accelerate, no metrics beyond the loss, no trackers, no checkpoints. One process. It writes `metrics.jsonl` rows with
`tokens_per_sec` per log window, as `train.py` does, so the bench reads both the same way.

    python bench/plain_loop.py --model gpt --max_steps 60 --log_every 10 --output_dir /tmp/plain
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

from lmdist import config, launch, optim, token_streams
from lmdist.models import build_model


def main(argv: list[str]) -> None:
    cfg = config.parse_args(argv)
    launch.tune_host_allocator()  # the process settings lmdist makes, so that the loops alone are compared
    torch.set_num_threads(launch.threads_per_process(cfg))
    torch.manual_seed(cfg.seed)
    corpus = token_streams.load_corpus(cfg, lambda build: build(), is_main=True)
    tokens = torch.from_numpy(corpus.train.slice(0, corpus.train.n_tokens).astype("int64"))

    model = build_model(cfg, corpus.tokenizer.vocab_size)
    optimizer = optim.build_optimizer(cfg, model)
    scheduler = optim.build_scheduler(cfg, optimizer, cfg.max_steps)
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w") as log:
        train(cfg, model, optimizer, scheduler, tokens, log)


def train(cfg, model, optimizer, scheduler, tokens: torch.Tensor, log) -> None:
    """The loop: forward, loss, backward, clip, step; a metrics row every `log_every` optimizer steps."""
    n_sequences = (len(tokens) - 1) // cfg.block_size
    offsets = torch.arange(cfg.block_size + 1)
    order, cursor = torch.randperm(n_sequences), 0
    loss_sum, window_start = torch.zeros(()), time.perf_counter()
    model.train()
    for step in range(1, cfg.max_steps + 1):
        for _ in range(cfg.grad_accum):
            if cursor + cfg.batch_size > n_sequences:
                order, cursor = torch.randperm(n_sequences), 0
            batch = tokens[order[cursor:cursor + cfg.batch_size, None] * cfg.block_size + offsets]
            cursor += cfg.batch_size
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logits = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0:
            now = time.perf_counter()
            tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
            row = {"step": step, "train/loss": loss_sum.item() / cfg.log_every,
                   "tokens_per_sec": cfg.log_every * tokens_per_step / (now - window_start),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            log.write(json.dumps(row) + "\n")
            log.flush()
            loss_sum.zero_()
            window_start = now  # like train.py, the next window pays for this log row


if __name__ == "__main__":
    main(sys.argv[1:])

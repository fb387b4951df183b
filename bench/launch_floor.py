"""The floor under bench/run.py's launch figures: the least a torch training script does before its first step.

    LMDIST_BENCH_STARTED=<time.time() at spawn> python bench/launch_floor.py OUT.json

Imports torch, builds a linear layer and torch's AdamW (whose constructor imports torch._dynamo), takes one
optimizer step and writes {seconds_to_first_step} to OUT.json, counted from the parent's clock when it spawned
this process, as bench/launch_probe.py counts a train.py launch. What a launch takes above this is lmdist's.
"""
import json
import os
import sys
import time

started = float(os.environ["LMDIST_BENCH_STARTED"])
import torch  # noqa: E402 -- its import is what is timed

model = torch.nn.Linear(64, 64)
optimizer = torch.optim.AdamW(model.parameters())
model(torch.randn(8, 64)).square().mean().backward()
optimizer.step()
with open(sys.argv[1], "w") as f:
    json.dump({"seconds_to_first_step": time.time() - started}, f)

"""Count the collectives a `train.py` run calls on each rank, with torch's profiler.

    accelerate launch --config_file accelerate_configs/cpu.yaml bench/count_collectives.py COUNTS.json \\
        --max_steps 4 --grad_accum 4 ...

Every rank runs train.py's `main` under the profiler and writes `{op: calls}` for every c10d
collective (`c10d::allreduce_`, `c10d::broadcast_`, ...) to COUNTS.json.rank<R>. DDP's gradient
all-reduces go through the same dispatcher op as the others, so comparing a run with `grad_accum`
k against one with `grad_accum` 1 and the same number of optimizer steps shows whether accumulation
micro-steps all-reduce gradients: the counts must be equal.
"""
from __future__ import annotations

import json
import os
import runpy
import sys

from torch.profiler import ProfilerActivity, profile

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


def main(out_path: str, train_args: list[str]) -> None:
    train = runpy.run_path(TRAIN)  # defines main() without running it (not __main__)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train["main"](train_args)
    counts = {event.key: event.count for event in prof.key_averages() if event.key.startswith("c10d::")}
    with open(f"{out_path}.rank{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(counts, f, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

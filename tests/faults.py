"""Faults and probes injected into real training runs, one named helper each.

A test launches this file in place of train.py, with the environment `inject(helper, **arguments)` returns:
the launched process (every rank of it) applies the helper -- which patches one lmdist function -- and
then runs train.py as usual. For example:

    launch(args, cwd, nproc=2, launcher="torchrun", script=faults.SCRIPT, env=faults.inject(faults.hang_rank, rank=1))

The helpers import lmdist themselves, inside the launched process.
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import time
from collections.abc import Callable
from pathlib import Path

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
VARIABLE = "LMDIST_TEST_FAULT"  # the helper's name and arguments, as JSON


def inject(helper: Callable, **arguments) -> dict[str, str]:
    """The environment under which SCRIPT applies `helper(**arguments)` before it runs train.py."""
    return {VARIABLE: json.dumps([helper.__name__, arguments])}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def claim_a_gpu() -> None:
    """Accelerate is not told to use the CPU, as on a machine where it believes a GPU exists: each rank of a
    CPU launch then builds a world of its own."""
    import lmdist.engine

    lmdist.engine.has_accelerator = lambda: True


def hang_rank(rank: int, seconds: float = 600) -> None:
    """`rank` sleeps before it loads the corpus, while the other ranks wait for it in a collective."""
    import lmdist.data

    load = lmdist.data.load_corpus

    def hanging_load(*args, **kwargs):
        if _rank() == rank:
            time.sleep(seconds)
        return load(*args, **kwargs)

    lmdist.data.load_corpus = hanging_load


def record_reads(path: str) -> None:
    """Probe: every read of training or evaluation sequences appends a JSON line to `path`: the dataset's
    length, the indices read, the process that read them (pid, DataLoader worker id or null) and the trainer's
    pid (the rank that loaded this probe; its loader workers inherit it)."""
    import torch.utils.data

    import lmdist.data

    read, trainer = lmdist.data.PackedSequences.__getitems__, os.getpid()

    def recorded_read(self, indices):
        worker = torch.utils.data.get_worker_info()
        line = {"dataset": len(self), "indices": list(indices), "pid": os.getpid(), "trainer": trainer,
                "rank": _rank(), "worker": worker and worker.id}
        with open(path, "a") as f:  # one short append per read: lines from several processes stay whole
            f.write(json.dumps(line) + "\n")
        return read(self, indices)

    lmdist.data.PackedSequences.__getitems__ = recorded_read


def read_records(path: Path) -> list[dict]:
    """The lines `record_reads` wrote."""
    return [json.loads(line) for line in path.read_text().splitlines()]


if __name__ == "__main__":
    sys.path[0] = str(REPO)  # where train.py finds lmdist (not tests/, where this file lies)
    name, arguments = json.loads(os.environ[VARIABLE])
    globals()[name](**arguments)
    sys.argv[0] = str(REPO / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")

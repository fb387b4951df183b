"""Faults and probes injected into real training runs, one named helper each.

A test launches this file in place of train.py, with the environment `inject(helper, **arguments)` returns:
the launched process (every rank of it) applies the helper -- which patches one lmdist function -- and
then runs train.py as usual. For example:

    launch(args, cwd, nproc=2, launcher="torchrun", script=faults.SCRIPT, env=faults.inject(faults.hang_rank, rank=1))

The helpers import lmdist themselves, inside the launched process, so that a helper patching an import
(`slow_import`) comes before it.
"""
from __future__ import annotations

import json
import os
import runpy
import signal
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
    import lmdist.launch

    lmdist.launch.has_accelerator = lambda: True


def hang_rank(rank: int, seconds: float = 600) -> None:
    """`rank` sleeps before it loads the corpus, while the other ranks wait for it in a collective."""
    import lmdist.token_streams

    load = lmdist.token_streams.load_corpus

    def hanging_load(*args, **kwargs):
        if _rank() == rank:
            time.sleep(seconds)
        return load(*args, **kwargs)

    lmdist.token_streams.load_corpus = hanging_load


def crash_rank_once(rank: int, micro_step: int, marker: str) -> None:
    """`rank` exits at once (no checkpoint, no goodbye) when it adds its `micro_step`-th micro-batch to the
    loss meter -- unless `marker` exists, which the crash creates: a restarted launch runs through."""
    import lmdist.metrics

    add, calls = lmdist.metrics.TokenMeter.add, [0]

    def crashing_add(self, *args, **kwargs):
        calls[0] += 1
        if _rank() == rank and calls[0] == micro_step and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)
        return add(self, *args, **kwargs)

    lmdist.metrics.TokenMeter.add = crashing_add


def small_prepare_units(unit_bytes: int) -> None:
    """Token shards prepared in units of `unit_bytes` (text read in pieces of that size), so that a small corpus is
    tokenized by the worker pool."""
    import lmdist.shards
    import lmdist.sources

    lmdist.shards.UNIT_BYTES = lmdist.sources.PIECE_BYTES = unit_bytes


def nan_output_on_rank(rank: int, forward: int) -> None:
    """`rank`'s model returns NaN logits from its `forward`-th training forward pass."""
    import lmdist.models

    build, calls = lmdist.models.build_model, [0]

    def poisoned_build(cfg, vocab_size):
        model = build(cfg, vocab_size)
        clean_forward = model.forward

        def nan_forward(idx):
            out = clean_forward(idx)
            if model.training:
                calls[0] += 1
            return out * float("nan") if _rank() == rank and calls[0] == forward else out

        model.forward = nan_forward
        return model

    lmdist.models.build_model = poisoned_build


def sigint_while_hashing(step: int) -> None:
    """Ctrl-C to this process once, while it hashes the files of checkpoint `step` for their manifest."""
    import lmdist.checkpoint

    sha256, sent = lmdist.checkpoint._sha256, []

    def interrupted_sha256(path):
        if not sent and f"step_{step:08d}" in path:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return sha256(path)

    lmdist.checkpoint._sha256 = interrupted_sha256


def _before_stop_check(check: int, action: Callable[[], None]) -> None:
    """`action()` just before this process's `check`-th stop check (one per optimizer step, before its update and
    its log row)."""
    import lmdist.stopping

    stop_check, calls = lmdist.stopping.StopGuard.check, [0]

    def act_then_check(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == check:
            action()
        return stop_check(self, *args, **kwargs)

    lmdist.stopping.StopGuard.check = act_then_check


def sigterm_before_stop_check(check: int) -> None:
    """SIGTERM to this process just before its `check`-th stop check: that step is completed and saved, and the
    run stops there."""
    _before_stop_check(check, lambda: os.kill(os.getpid(), signal.SIGTERM))


def kill_group_before_stop_check(pgid: int, check: int) -> None:
    """SIGKILL to process group `pgid` (a server the run talks to) just before the `check`-th stop check of rank 0:
    the server is gone mid-run."""
    if _rank() == 0:
        _before_stop_check(check, lambda: os.killpg(pgid, signal.SIGKILL))


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


def record_training_targets(folder: str) -> None:
    """Probe: every training micro-batch's targets, appended as a JSON line to `folder`/rank<RANK>.jsonl in the
    order trained (evaluation goes through TokenMeter.update, not the training loss)."""
    import lmdist.metrics

    loss = lmdist.metrics.next_token_loss

    def recording_loss(logits, targets):
        with open(os.path.join(folder, f"rank{_rank()}.jsonl"), "a") as f:
            f.write(json.dumps(targets.tolist()) + "\n")
        return loss(logits, targets)

    lmdist.metrics.next_token_loss = recording_loss


def legacy_data_order() -> None:
    """The launch is an lmdist from before `data_order`: it draws its batches in ORDER_LEGACY and its
    checkpoints' trainer_state.json has no `data_order`."""
    import lmdist.run
    from lmdist.order import ORDER_LEGACY

    record = lmdist.run.checkpoint_record

    def record_of_old(*args, **kwargs):
        return {k: v for k, v in record(*args, **kwargs).items() if k != "data_order"}

    lmdist.run.ORDER, lmdist.run.checkpoint_record = ORDER_LEGACY, record_of_old


def slow_import(module: str, seconds: float = 60) -> None:
    """Start-up held in the import of `module`: prints "starting" there, then sleeps."""

    class Slow:
        def find_spec(self, name, path=None, target=None):
            if name == module:
                print("starting", flush=True)
                time.sleep(seconds)

    sys.meta_path.insert(0, Slow())


def slow_data_load(seconds: float = 60) -> None:
    """Start-up held in loading the corpus: prints "starting" there, then sleeps."""
    import lmdist.token_streams

    load = lmdist.token_streams.load_corpus

    def slow_load(*args, **kwargs):
        print("starting", flush=True)
        time.sleep(seconds)
        return load(*args, **kwargs)

    lmdist.token_streams.load_corpus = slow_load


def read_records(path: Path) -> list[dict]:
    """The lines `record_reads` wrote."""
    return [json.loads(line) for line in path.read_text().splitlines()]


if __name__ == "__main__":
    sys.path[0] = str(REPO)  # where train.py finds lmdist (not tests/, where this file lies)
    name, arguments = json.loads(os.environ[VARIABLE])
    globals()[name](**arguments)
    sys.argv[0] = str(REPO / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")

"""The data order: a seeded bijection of range(n) in constant memory, and checkpoints that keep the order they
trained in (a record without `data_order` continues in the legacy randperm order, an unknown one is refused)."""
from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from lmdist import checkpoint
from lmdist.config import TrainConfig
from lmdist.data import EpochPermutation
from lmdist.errors import ConfigError
from lmdist.order import CHUNK, ORDER, ORDER_LEGACY, chunks
from lmdist.resume import Progress, checkpoint_record, find_resume
from tests import faults
from tests.conftest import equivalence_args, final_weights, read_metrics, run_ok, with_flags


def drawn(n: int, seed: int, epoch: int, start: int = 0) -> np.ndarray:
    """ORDER's indices at positions [start, n)."""
    return np.concatenate([np.zeros(0, dtype=np.int64), *chunks(ORDER, n, seed, epoch, start, n)])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, CHUNK + 1, random.Random(17).randrange(100_000, 1_000_000)])
def test_the_order_is_a_permutation_and_starts_anywhere(n):
    for seed, epoch in ((0, 0), (7, 3), (2**40 + 1, 12)):
        full = drawn(n, seed, epoch)
        assert np.array_equal(np.sort(full), np.arange(n)), "every index exactly once"
        for skip in {1, n // 3, n - 1}:  # a resumed epoch: the tail of the same order, without replaying the head
            assert np.array_equal(drawn(n, seed, epoch, skip), full[skip:])


def test_the_order_depends_on_the_seed_and_the_epoch_only():
    orders = {(seed, epoch): drawn(1000, seed, epoch).tobytes() for seed in (0, 1) for epoch in (0, 1)}
    assert len(set(orders.values())) == 4
    assert drawn(1000, 1, 0).tobytes() == orders[1, 0]


@pytest.mark.parametrize("epoch", [0, 1])
def test_the_order_is_well_mixed(epoch):
    n = 100_000  # a domain of 4**9: 62% of the first steps walk on
    order, positions = drawn(n, seed=3, epoch=epoch), np.arange(n)
    assert abs(np.corrcoef(positions, order)[0, 1]) < 0.02, "rank correlation with the identity"
    assert np.mean(np.abs(np.diff(order)) <= 1) < 1e-3, "consecutive positions draw distant indices"
    quarters = np.histogram2d(positions, order, bins=4, range=[[0, n], [0, n]])[0]
    assert np.all(np.abs(quarters - n / 16) < 0.1 * n / 16), f"each quarter of positions x of indices: {quarters}"


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_an_epoch_of_a_billion_sequences_takes_constant_memory():
    """randperm would hold 8 GB on every rank; the order draws its first 300,000 and its last 100,000
    indices in a few MiB (numpy's allocations, which tracemalloc sees, and the resident memory, which
    counts torch's too)."""
    n, global_batch = 10**9, 8
    baseline = resident_bytes()
    tracemalloc.start()
    try:
        sampler = EpochPermutation(n, n, seed=0, global_batch=global_batch)
        sampler.set_epoch(1)
        indices = iter(sampler)
        head = np.fromiter(itertools.islice(indices, 300_000), dtype=np.int64)
        grown = resident_bytes() - baseline  # the iterator still holds what it draws from
        assert grown < 64 << 20, f"resident memory +{grown >> 20} MiB"
        del indices
        sampler.set_epoch(1, skip_batches=(n - 100_000) // global_batch)
        tail = np.fromiter(sampler, dtype=np.int64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"traced peak {peak >> 20} MiB"
    assert len(tail) == 100_000 and len(np.unique(np.concatenate([head, tail]))) == 400_000
    assert min(head.min(), tail.min()) >= 0 and max(head.max(), tail.max()) < n


def test_the_legacy_order_is_the_randperm_of_before():
    """A checkpoint trained in ORDER_LEGACY continues in exactly the order lmdist drew before ORDER."""
    legacy = EpochPermutation(100, 96, seed=5, global_batch=4, data_order=ORDER_LEGACY)
    legacy.set_epoch(3, skip_batches=5)
    before = torch.randperm(100, generator=torch.Generator().manual_seed(5 * 100_003 + 3))[20:96].tolist()
    assert list(legacy) == before
    today = EpochPermutation(100, 96, seed=5, global_batch=4)
    today.set_epoch(3, skip_batches=5)
    assert list(today) != before


def saved_checkpoint(output_dir: Path, record: dict) -> None:
    """output_dir's step-5 checkpoint with trainer_state.json `record` (stand-in weights: only hashes are read)."""
    path = Path(checkpoint.step_dir(str(output_dir), 5))
    path.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt"):
        (path / name).write_bytes(name.encode())
    (path / checkpoint.STATE).write_text(json.dumps({**record, "world_size": 1}))
    checkpoint.write_manifest(str(path), [*os.listdir(path)], 5)


def record(cfg: TrainConfig, data_order: str) -> dict:
    return checkpoint_record(cfg, Progress(step=5), run_id="r", forked_from=None, data_fingerprint="f",
                             data_order=data_order, val_loss=None)


@pytest.mark.parametrize("data_order", [ORDER, ORDER_LEGACY, None])  # None: a record from before data_order
def test_a_checkpoint_resumes_in_the_order_it_records(tmp_path, data_order):
    cfg = TrainConfig(output_dir=str(tmp_path))
    saved = record(cfg, data_order)
    if data_order is None:
        del saved["data_order"]
    saved_checkpoint(tmp_path, saved)
    assert find_resume(cfg, say=print).data_order == (data_order or ORDER_LEGACY)


def test_an_unknown_data_order_is_refused_naming_it_and_the_fix(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path))
    saved_checkpoint(tmp_path, record(cfg, "feistel-v9"))
    with pytest.raises(ConfigError, match=r"the data order 'feistel-v9', which this lmdist does not know .*: "
                                          r"upgrade lmdist") as refused:
        find_resume(cfg, say=print)
    assert refused.value.exit_code == 2


@pytest.mark.launch
def test_an_old_runs_checkpoint_continues_in_its_legacy_order(markov_files, tmp_path):
    """A run of an lmdist from before data_order (randperm, nothing recorded), continued by this lmdist from its
    step-10 checkpoint (mid-epoch), ends as the old run did: every later loss bitwise, the same final weights;
    the checkpoints it writes record the legacy order."""
    args = with_flags(equivalence_args(markov_files), "--batch_size", "8", "--save_every", "5", "--keep_last", "4")
    old = tmp_path / "old"
    run_ok([*args, "--output_dir", str(old)], cwd=tmp_path, script=faults.SCRIPT,
           env=faults.inject(faults.legacy_data_order))
    saved = Path(checkpoint.step_dir(str(old), 10))
    assert "data_order" not in json.loads((saved / checkpoint.STATE).read_text())
    continued = tmp_path / "continued"
    shutil.copytree(saved, checkpoint.step_dir(str(continued), 10))
    shutil.copytree(old / "tokenizer", continued / "tokenizer")
    run_ok([*args, "--output_dir", str(continued)], cwd=tmp_path)
    want = {r["step"]: r["train/loss"] for r in read_metrics(old) if "train/loss" in r and r["step"] > 10}
    got = {r["step"]: r["train/loss"] for r in read_metrics(continued) if "train/loss" in r}
    assert sorted(got) == list(range(11, 17)) and got == want
    a, b = final_weights(continued), final_weights(old)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = json.loads((Path(checkpoint.step_dir(str(continued), 16)) / checkpoint.STATE).read_text())
    assert last["data_order"] == ORDER_LEGACY

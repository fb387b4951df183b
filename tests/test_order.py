"""The data order: a seeded bijection of range(n) in constant memory, and the legacy randperm order kept."""
from __future__ import annotations

import itertools
import os
import random
import tracemalloc

import numpy as np
import pytest
import torch

from lmdist.data import EpochPermutation
from lmdist.order import CHUNK, ORDER, ORDER_LEGACY, chunks


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

"""The order in which an epoch visits the training sequences: a seeded bijection of range(n), in constant memory.

    FeistelOrder(n, seed, epoch).at(positions)   the indices at `positions` (a numpy array), all at once
    chunks(order, n, seed, epoch, start, stop)   the indices at positions [start, stop), CHUNK at a time

Contract of ORDER ("feistel-v1"): a bijection of range(n) for any n up to 2**62, that depends only on
(seed, epoch, n) -- never on the world size, the process or what ran before -- so every rank, launch and resume
draws the same order. It costs O(1) memory and time per position, so an epoch starts at any position without
replaying the ones before it. The scheme: a 6-round Feistel network on the smallest domain of 4**k >= n
indices (two halves of k bits; the round function is splitmix64's finalizer keyed by round keys drawn from
(seed, epoch)), cycle-walked back into range(n) -- a domain of at most 4n, so a few steps on average.

Why not `torch.randperm(n)`: it holds 8 bytes per sequence on every rank (gigabytes for a corpus of tens of GB)
and a resume draws it whole to skip a prefix. That was ORDER_LEGACY ("randperm"); it is kept for checkpoints
written with it (their trainer_state.json has no `data_order`), which must continue in their own order.
The names are part of the checkpoint format: a scheme that draws other indices needs a new name.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

ORDER = "feistel-v1"
ORDER_LEGACY = "randperm"  # checkpoints written before `data_order` was recorded
ORDERS = (ORDER, ORDER_LEGACY)
CHUNK = 1 << 16  # positions per numpy call: a few MiB of temporaries
ROUNDS = 6
MAX_N = 1 << 62  # halves of 31 bits: the round arithmetic stays inside uint64

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix_int(x: int) -> int:
    """splitmix64's finalizer on a Python int (the round keys)."""
    x = (x ^ (x >> 30)) * int(_MIX1) & _M64
    x = (x ^ (x >> 27)) * int(_MIX2) & _M64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (multiplication wraps modulo 2**64, as intended)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


class FeistelOrder:
    """ORDER's bijection of range(n) for one (seed, epoch)."""

    def __init__(self, n: int, seed: int, epoch: int):
        if not 0 <= n <= MAX_N:
            raise ValueError(f"FeistelOrder covers 0 to 2**62 indices, not {n}")
        self.n = n
        self.half_bits = max(1, (max(n - 1, 1).bit_length() + 1) // 2)  # 4**half_bits >= n
        self.half_mask = np.uint64((1 << self.half_bits) - 1)
        stream = _mix_int(_mix_int(seed & _M64) ^ (epoch & _M64))  # a splitmix64 stream seeded by (seed, epoch)
        self.keys = [np.uint64(_mix_int((stream + r * _GOLDEN) & _M64)) for r in range(1, ROUNDS + 1)]

    def _permute(self, x: np.ndarray) -> np.ndarray:
        """The Feistel permutation of the whole domain range(4**half_bits)."""
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.half_mask)
        return (left << shift) | right

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The indices (int64) at `positions` (integers in range(n)): permute until inside range(n), which
        restricts the domain's permutation to a permutation of range(n)."""
        out = self._permute(np.asarray(positions, dtype=np.uint64))
        outside = np.flatnonzero(out >= np.uint64(self.n))
        while len(outside):
            out[outside] = self._permute(out[outside])
            outside = outside[out[outside] >= np.uint64(self.n)]
        return out.astype(np.int64)


def chunks(order: str, n: int, seed: int, epoch: int, start: int, stop: int) -> Iterator[np.ndarray]:
    """The indices at positions [start, stop) of `order`'s permutation of range(n) for (seed, epoch), as int64
    arrays of CHUNK at most: never a list of every index."""
    if order == ORDER:
        feistel = FeistelOrder(n, seed, epoch)
        for begin in range(start, stop, CHUNK):
            yield feistel.at(np.arange(begin, min(begin + CHUNK, stop), dtype=np.uint64))
    elif order == ORDER_LEGACY:  # the whole permutation, 8 bytes an index, as before data_order was recorded
        import torch  # only here: lmdist prepare reads this module without torch

        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        yield from (chunk.numpy() for chunk in torch.randperm(n, generator=generator)[start:stop].split(CHUNK))
    else:
        raise ValueError(f"unknown data order {order!r}: one of {', '.join(ORDERS)}")

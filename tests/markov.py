"""A second-order Markov source whose entropy rate is known exactly, for learning tests."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SYMBOLS = "abcdefghij"


@dataclass
class MarkovSource:
    """Next symbol ~ P[a, b, :] given the previous two; each context allows 3 successors (0.6/0.3/0.1)."""

    P: np.ndarray  # (n, n, n) transition probabilities

    @classmethod
    def make(cls, seed: int = 0, n: int = len(SYMBOLS), probs=(0.6, 0.3, 0.1)) -> MarkovSource:
        rng = np.random.default_rng(seed)
        P = np.zeros((n, n, n))
        for a in range(n):
            for b in range(n):
                P[a, b, rng.choice(n, size=len(probs), replace=False)] = probs
        return cls(P)

    def pair_stationary(self) -> np.ndarray:
        """pi(a, b): the stationary distribution of the chain over consecutive pairs."""
        n = self.P.shape[0]
        pi = np.full((n, n), 1 / n**2)
        for _ in range(10_000):
            new = np.einsum("ab,abc->bc", pi, self.P)
            if np.abs(new - pi).max() < 1e-15:
                break
            pi = new
        return pi

    def entropy_rate(self) -> float:
        """H = sum_ab pi(a,b) H(P[a,b,:]) in nats per symbol."""
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.nansum(self.P * np.log(self.P), axis=2)
        return float((self.pair_stationary() * h).sum())

    def unigram_entropy(self) -> float:
        """Entropy of the stationary single-symbol distribution."""
        p = self.pair_stationary().sum(axis=0)
        return float(-(p * np.log(p)).sum())

    def sample(self, length: int, seed: int) -> str:
        rng = np.random.default_rng(seed)
        n = self.P.shape[0]
        out = list(rng.integers(n, size=2))
        cumulative = self.P.cumsum(axis=2)
        draws = rng.random(length)
        for u in draws[2:]:
            out.append(int(np.searchsorted(cumulative[out[-2], out[-1]], u)))
        return "".join(SYMBOLS[i] for i in out)

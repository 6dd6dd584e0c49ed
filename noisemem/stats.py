"""Mergeable sufficient statistics of vectors: count, mean and centred sum of squares (float64).

Monte Carlo E[M] and its per-coordinate standard error come from these, so estimates from
any subset of permutations (chunks computed on different workers) merge exactly.

Why not count, sum and sum of squares: the variance ``(sum x^2 - (sum x)^2 / n) / (n - 1)``
subtracts two numbers of size ``n mean^2``, so when the spread across permutations is small
against the mean (relative spread 1e-9) float64 keeps no correct digit of it. Keeping the
mean and ``M2 = sum (x - mean)^2`` instead, and merging with Chan et al.'s pairwise update,
never forms that difference: the error of the variance stays relative to the variance itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

A = TypeVar("A")  # a torch Tensor or a numpy array: the formula is the same


def chan_merge(n_a: int, mean_a: A, m2_a: A, n_b: int, mean_b: A, m2_b: A) -> tuple[int, A, A]:
    """Count, mean and M2 of the union of two samples from each one's count, mean and M2.

    Chan, Golub & LeVeque (1979), "Updating formulae and a pairwise algorithm for computing
    sample variances", Eq. (2.1b)::

        n = n_a + n_b,  delta = mean_b - mean_a
        mean = mean_a + delta n_b / n
        M2 = M2_a + M2_b + delta^2 n_a n_b / n

    where ``M2 = sum_i (x_i - mean)^2`` (the unbiased variance is ``M2 / (n - 1)``). Exact in
    exact arithmetic, so any split of a sample into parts merges to the same statistics up to
    rounding. An empty side (count 0, whatever its mean) leaves the other unchanged.
    """
    if n_b == 0:
        return n_a, mean_a, m2_a
    if n_a == 0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a  # type: ignore[operator]
    mean = mean_a + delta * (n_b / n)  # type: ignore[operator]
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)  # type: ignore[operator]
    return n, mean, m2


@dataclass
class Moments:
    """``count``, ``mean`` and ``m2 = sum (x - mean)**2`` of vectors x (float64, CPU).

    The mean of no samples is NaN. ``add`` is Welford's update (a merge with one sample);
    ``merge`` is :func:`chan_merge`.
    """

    count: int
    mean: Tensor
    m2: Tensor

    @classmethod
    def empty(cls, dim: int) -> Moments:
        nan = torch.full((dim,), torch.nan, dtype=torch.float64)
        return cls(0, nan, torch.zeros(dim, dtype=torch.float64))

    def __post_init__(self) -> None:
        self.mean = self.mean.to("cpu", torch.float64)
        self.m2 = self.m2.to("cpu", torch.float64)

    def add(self, x: Tensor) -> None:
        x = x.detach().to("cpu", torch.float64)
        self.count += 1
        if self.count == 1:
            self.mean = x.clone()
            self.m2 = torch.zeros_like(x)
            return
        delta = x - self.mean
        self.mean = self.mean + delta / self.count
        self.m2 = self.m2 + delta * (x - self.mean)

    def merge(self, other: Moments) -> Moments:
        n, mean, m2 = chan_merge(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        return Moments(n, mean.clone(), m2.clone())

    @property
    def variance(self) -> Tensor:
        """Unbiased per-coordinate sample variance ``M2 / (count - 1)`` (needs count >= 2)."""
        if self.count < 2:
            raise ValueError(f"count={self.count}: a variance needs at least 2 samples")
        return self.m2 / (self.count - 1)

    @property
    def stderr(self) -> Tensor:
        """Standard error of the mean, per coordinate: sqrt(variance / count)."""
        return torch.sqrt(self.variance / self.count)


def cosine(a: A, b: A) -> float:
    """``<a, b> / (|a| |b|)`` of two vectors (torch or numpy), NaN when either is zero."""
    na = float((a * a).sum()) ** 0.5  # type: ignore[operator]
    nb = float((b * b).sum()) ** 0.5  # type: ignore[operator]
    return float((a * b).sum()) / (na * nb) if na > 0 and nb > 0 else math.nan  # type: ignore[operator]

"""Mergeable sufficient statistics of vectors: count, sum and sum of squares (float64).

Monte Carlo E[M] and its per-coordinate standard error come from these, so estimates from
any subset of permutations (chunks computed on different workers) merge exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Moments:
    """``count``, ``total = sum x`` and ``squares = sum x**2`` of vectors x (float64, CPU)."""

    count: int
    total: Tensor
    squares: Tensor

    @classmethod
    def empty(cls, dim: int) -> Moments:
        z = torch.zeros(dim, dtype=torch.float64)
        return cls(0, z, z.clone())

    def add(self, x: Tensor) -> None:
        x = x.detach().to("cpu", torch.float64)
        self.count += 1
        self.total += x
        self.squares += x * x

    def merge(self, other: Moments) -> Moments:
        return Moments(
            self.count + other.count, self.total + other.total, self.squares + other.squares
        )

    @property
    def mean(self) -> Tensor:
        return self.total / self.count

    @property
    def variance(self) -> Tensor:
        """Unbiased per-coordinate sample variance (needs count >= 2)."""
        if self.count < 2:
            raise ValueError(f"count={self.count}: a variance needs at least 2 samples")
        var = (self.squares - self.total * self.total / self.count) / (self.count - 1)
        return var.clamp_min(0.0)

    @property
    def stderr(self) -> Tensor:
        """Standard error of the mean, per coordinate: sqrt(variance / count)."""
        return torch.sqrt(self.variance / self.count)

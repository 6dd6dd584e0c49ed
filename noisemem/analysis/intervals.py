"""Monte Carlo E[M] from a store's per-chunk statistics, and 95% intervals by the jackknife.

A ``moments`` row holds, for one chunk k of one (config, probe, step), the count n_k of
runs with a finite M there, their mean and their centred sum of squares M2_k. Any set S of
chunks pools exactly (the closed form of Chan et al.'s pairwise merge,
:func:`noisemem.stats.chan_merge`, applied to every chunk at once)::

    n_S = sum_k n_k,   mean_S = sum_k n_k mean_k / n_S,
    M2_S = sum_k M2_k + sum_k n_k (mean_k - mean_S)^2,
    stderr_S = sqrt(M2_S / (n_S - 1) / n_S)          (per coordinate; NaN when n_S < 2)

A scalar of the Monte Carlo mean (a cosine with a prediction, a relative error, a debiased
norm, a projection) gets its interval from the delete-one-chunk jackknife (Efron & Stein
1981; the grouped jackknife of Shao & Tu 1995, Sec. 5.2)::

    T_(k) = T(every chunk but k),   T_(.) = mean_k T_(k),
    SE^2 = (K - 1)/K sum_k (T_(k) - T_(.))^2,     95%: T +- t_{K-1, 0.975} SE

over the K chunks that hold runs. Chunks are independent (each has its own batch orders),
so this accounts for the correlations between coordinates that the per-coordinate stderr
leaves out. It is exact in expectation for the mean itself (:func:`jackknife` of one
coordinate's mean is the standard error of the K chunk means); chunks of unequal size (a
shorter last chunk, runs left out) make it approximate. With fewer than 2 chunks there is
no interval (NaN).

The norm of E[M] is debiased for Monte Carlo noise: E|mean|^2 = |E[M]|^2 + sum_j Var(mean_j),
so ``|mean|^2 - sum_j stderr_j^2`` is unbiased for |E[M]|^2 (:func:`debiased_norm` takes its
square root, 0 when it is negative: the mean is then indistinguishable from noise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

LEVEL = 0.95
NAN = float("nan")


@dataclass(frozen=True)
class Pooled:
    """Count, mean and M2 of M over a set of chunks (float64, ``(d,)``)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @property
    def stderr(self) -> np.ndarray:
        """Per-coordinate standard error of the mean, ``sqrt(M2/(n-1)/n)``; NaN for n < 2."""
        if self.count < 2:
            return np.full_like(self.m2, np.nan)
        return np.sqrt(self.m2 / (self.count - 1) / self.count)

    @property
    def noise2(self) -> float:
        """``sum_j stderr_j^2``: the expected excess of |mean|^2 over |E[M]|^2."""
        return float(np.sum(self.stderr**2)) if self.count >= 2 else NAN


@dataclass(frozen=True)
class ChunkStats:
    """The chunks of one (config, probe, step): ``counts (K,)``, ``means (K, d)``, ``m2s``."""

    chunks: tuple[int, ...]
    counts: np.ndarray
    means: np.ndarray
    m2s: np.ndarray
    excluded: int  # runs left out over every chunk (0 where the store does not say)

    @classmethod
    def from_rows(cls, rows: pd.DataFrame) -> ChunkStats:
        """From the ``moments`` rows of one (config, probe, step), in chunk order."""
        rows = rows.sort_values("chunk")
        counts = rows["count"].to_numpy(dtype=np.int64)
        means = np.stack([np.asarray(v, dtype=np.float64) for v in rows["mean"]])
        m2s = np.stack([np.asarray(v, dtype=np.float64) for v in rows["m2"]])
        excluded = rows["excluded"] if "excluded" in rows else pd.Series([], dtype=float)
        return cls(
            chunks=tuple(int(c) for c in rows["chunk"]),
            counts=counts,
            means=means,
            m2s=m2s,
            excluded=int(np.nansum(excluded.to_numpy(dtype=float))),
        )

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def with_runs(self) -> np.ndarray:
        """Indices of the chunks that hold at least one run."""
        return np.flatnonzero(self.counts > 0)

    def pooled(self, keep: np.ndarray | None = None) -> Pooled:
        """The statistics of the chunks ``keep`` (indices; default: all) pooled."""
        idx = self.with_runs if keep is None else np.intersect1d(keep, self.with_runs)
        if idx.size == 0:
            return Pooled(0, np.full(self.dim, np.nan), np.zeros(self.dim))
        n = self.counts[idx].astype(np.float64)
        total = float(n.sum())
        mean = (n[:, None] * self.means[idx]).sum(0) / total
        m2 = self.m2s[idx].sum(0) + (n[:, None] * (self.means[idx] - mean) ** 2).sum(0)
        return Pooled(int(total), mean, m2)

    def leave_one_out(self) -> list[Pooled]:
        """The pooled statistics without each chunk that holds runs, in chunk order."""
        idx = self.with_runs
        return [self.pooled(np.delete(idx, j)) for j in range(idx.size)]

    def cumulative(self) -> list[Pooled]:
        """The pooled statistics of the first 1, 2, ... chunks (those with runs), in order."""
        idx = self.with_runs
        return [self.pooled(idx[: j + 1]) for j in range(idx.size)]


@dataclass(frozen=True)
class Interval:
    """A statistic, its jackknife standard error and its ``LEVEL`` interval."""

    value: float
    se: float
    low: float
    high: float
    groups: int  # chunks the jackknife used


def t_quantile(dof: int, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``dof`` degrees of freedom."""
    return float(sps.t.ppf(0.5 + level / 2, dof)) if dof >= 1 else NAN


def jackknife(
    stats: ChunkStats,
    statistic: Callable[[Pooled], float],
    *,
    level: float = LEVEL,
    bounds: tuple[float, float] = (-np.inf, np.inf),
) -> Interval:
    """``statistic`` of the pooled mean with its delete-one-chunk jackknife interval
    (module docstring); ``bounds`` clips the interval (a cosine lies in [-1, 1])."""
    value = float(statistic(stats.pooled()))
    parts = stats.leave_one_out()
    k = len(parts)
    if k < 2 or not np.isfinite(value):
        return Interval(value, NAN, NAN, NAN, k)
    loo = np.array([statistic(p) for p in parts], dtype=np.float64)
    if not np.all(np.isfinite(loo)):
        return Interval(value, NAN, NAN, NAN, k)
    se = float(np.sqrt((k - 1) / k * np.sum((loo - loo.mean()) ** 2)))
    half = t_quantile(k - 1, level) * se
    low, high = max(value - half, bounds[0]), min(value + half, bounds[1])
    return Interval(value, se, low, high, k)


def mean_interval(values: np.ndarray, *, level: float = LEVEL) -> Interval:
    """The mean of independent values with its t interval (runs are independent)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Interval(NAN, NAN, NAN, NAN, 0)
    mean = float(v.mean())
    if v.size < 2:
        return Interval(mean, NAN, NAN, NAN, int(v.size))
    se = float(v.std(ddof=1) / np.sqrt(v.size))
    half = t_quantile(v.size - 1, level) * se
    return Interval(mean, se, mean - half, mean + half, int(v.size))


def debiased_norm2(p: Pooled, reference: np.ndarray | None = None) -> float:
    """``|mean - reference|^2 - sum stderr^2``: unbiased for ``|E[M] - reference|^2``."""
    if p.count < 2:
        return NAN
    diff = p.mean if reference is None else p.mean - reference
    return float(diff @ diff) - p.noise2


def debiased_norm(p: Pooled, reference: np.ndarray | None = None) -> float:
    """sqrt of :func:`debiased_norm2`, 0 where it is negative."""
    n2 = debiased_norm2(p, reference)
    return float(np.sqrt(max(n2, 0.0))) if np.isfinite(n2) else NAN


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """``<a, b>/(|a| |b|)``; NaN when either vanishes or is not finite."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if not (na > 0 and nb > 0 and np.isfinite(na) and np.isfinite(nb)):
        return NAN
    return float(a @ b) / (na * nb)


def columns(prefix: str, interval: Interval) -> dict[str, float]:
    """``{prefix, prefix_low, prefix_high}`` of an interval (the tidy frames' convention)."""
    return {prefix: interval.value, f"{prefix}_low": interval.low, f"{prefix}_high": interval.high}


# -- statistics of a pooled mean, for :func:`jackknife` (``functools.partial`` binds them) -----
def projection(
    p: Pooled, direction: np.ndarray, offset: np.ndarray | None = None, scale: float = 1.0
) -> float:
    """``<mean - offset, direction>/scale``."""
    diff = p.mean if offset is None else p.mean - offset
    return float(diff @ direction) / scale


def cosine_with(p: Pooled, vector: np.ndarray, offset: np.ndarray | None = None) -> float:
    """The cosine of ``mean - offset`` with ``vector``."""
    return cosine(p.mean if offset is None else p.mean - offset, vector)


def scaled_norm(p: Pooled, reference: np.ndarray | None = None, scale: float = 1.0) -> float:
    """:func:`debiased_norm` of ``mean - reference`` over ``scale``."""
    return debiased_norm(p, reference) / scale

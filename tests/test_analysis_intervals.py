"""Pooling chunk statistics and the jackknife over chunks, against direct computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from noisemem.analysis.intervals import (
    ChunkStats,
    Pooled,
    cosine,
    debiased_norm2,
    jackknife,
    mean_interval,
    t_quantile,
)


def chunk_rows(chunks: list[np.ndarray]) -> pd.DataFrame:
    """``moments`` rows of raw vectors, one ``(n_k, d)`` array per chunk (n_k may be 0)."""
    rows = []
    for k, v in enumerate(chunks):
        mean = v.mean(0) if len(v) else np.full(v.shape[1], np.nan)
        m2 = ((v - mean) ** 2).sum(0) if len(v) else np.zeros(v.shape[1])
        rows.append({"chunk": k, "count": len(v), "mean": mean, "m2": m2, "excluded": 0})
    return pd.DataFrame(rows)


def chunk_stats(chunks: list[np.ndarray]) -> ChunkStats:
    """ChunkStats of raw vectors (built directly: the replication loops need speed)."""
    means = np.stack([v.mean(0) if len(v) else np.full(v.shape[1], np.nan) for v in chunks])
    m2s = np.stack([((v - m) ** 2).sum(0) for v, m in zip(chunks, means, strict=True)])
    counts = np.array([len(v) for v in chunks])
    return ChunkStats(tuple(range(len(chunks))), counts, means, m2s, 0)


def test_pooled_chunks_are_the_statistics_of_all_their_vectors():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=(n, 5)) for n in (4, 1, 7, 0, 3)]
    x = np.concatenate([c for c in chunks if len(c)])
    from_store = ChunkStats.from_rows(chunk_rows(chunks))  # as the store's rows read back
    assert np.array_equal(from_store.counts, chunk_stats(chunks).counts)
    p = from_store.pooled()
    assert p.count == len(x)
    assert np.allclose(p.mean, x.mean(0), rtol=1e-14)
    assert np.allclose(p.m2, ((x - x.mean(0)) ** 2).sum(0), rtol=1e-12)
    assert np.allclose(p.stderr, x.std(0, ddof=1) / np.sqrt(len(x)), rtol=1e-12)
    # leave-one-out skips the empty chunk and drops each other chunk's vectors
    loo = chunk_stats(chunks).leave_one_out()
    kept = [j for j, c in enumerate(chunks) if len(c)]
    assert len(loo) == len(kept)
    for j, part in zip(kept, loo, strict=True):
        rest = np.concatenate([c for i, c in enumerate(chunks) if i != j and len(c)])
        assert part.count == len(rest)
        assert np.allclose(part.mean, rest.mean(0), rtol=1e-13)
    cum = chunk_stats(chunks).cumulative()
    assert [c.count for c in cum] == [4, 5, 12, 15]


def test_jackknife_of_a_mean_is_the_standard_error_of_the_chunk_means():
    """For equal chunks, the delete-one-chunk jackknife of a coordinate's mean reduces to
    sqrt(sum_k (mean_k - mean)^2 / (K (K - 1))): T_(k) - T = (T - mean_k)/(K - 1)."""
    rng = np.random.default_rng(1)
    chunks = [rng.normal(size=(6, 3)) for _ in range(5)]
    s = chunk_stats(chunks)
    got = jackknife(s, lambda q: float(q.mean[1]))
    means = np.array([c.mean(0)[1] for c in chunks])
    K = len(chunks)
    expected_se = np.sqrt(((means - means.mean()) ** 2).sum() / (K * (K - 1)))
    assert got.se == pytest.approx(expected_se, rel=1e-12)
    half = sps.t.ppf(0.975, K - 1) * expected_se
    assert (got.low, got.high) == pytest.approx((means.mean() - half, means.mean() + half))
    assert got.groups == K


def test_jackknife_variance_of_a_mean_is_unbiased_for_the_analytic_one():
    """E[SE_jack^2] = sigma^2/(K n) for K chunks of n i.i.d. values: over 2000 replications
    the mean of SE_jack^2 is within 4 of its standard errors of the analytic value."""
    rng = np.random.default_rng(2)
    K, n, sigma = 4, 8, 1.5
    se2 = []
    for _ in range(2000):
        chunks = [rng.normal(0.0, sigma, size=(n, 1)) for _ in range(K)]
        se2.append(jackknife(chunk_stats(chunks), lambda q: float(q.mean[0])).se ** 2)
    se2 = np.array(se2)
    analytic = sigma**2 / (K * n)
    assert abs(se2.mean() - analytic) <= 4 * se2.std(ddof=1) / np.sqrt(se2.size)


def test_jackknife_intervals_of_a_cosine_cover_at_their_level():
    """The cosine of the MC mean with a fixed vector (a nonlinear statistic), 8 chunks of
    16 runs: its 95% intervals hold the cosine of the true mean in 95% of 400 replications
    (within 4 binomial standard errors)."""
    rng = np.random.default_rng(3)
    d, K, n = 20, 8, 16
    mu = rng.normal(size=d)
    ref = mu + rng.normal(scale=0.8, size=d)
    truth = cosine(mu, ref)
    hits = []
    for _ in range(400):
        chunks = [mu + rng.normal(scale=2.0, size=(n, d)) for _ in range(K)]
        got = jackknife(chunk_stats(chunks), lambda q: cosine(q.mean, ref), bounds=(-1, 1))
        hits.append(got.low <= truth <= got.high)
    rate = float(np.mean(hits))
    assert abs(rate - 0.95) <= 4 * np.sqrt(0.95 * 0.05 / len(hits))


def test_debiased_norm_is_unbiased_for_the_norm_of_the_expectation():
    rng = np.random.default_rng(4)
    mu = np.array([0.3, -0.2, 0.1, 0.0])
    values, naive = [], []
    for _ in range(3000):
        x = mu + rng.normal(scale=1.0, size=(10, mu.size))
        mean = x.mean(0)
        values.append(debiased_norm2(Pooled(10, mean, ((x - mean) ** 2).sum(0))))
        naive.append(mean @ mean)
    values, naive = np.array(values), np.array(naive)
    assert abs(values.mean() - mu @ mu) <= 4 * values.std(ddof=1) / np.sqrt(values.size)
    # |mean|^2 itself is biased upwards by sum_j Var(mean_j) = d sigma^2 / n = 0.4
    bias = naive.mean() - mu @ mu
    assert abs(bias - 0.4) <= 4 * naive.std(ddof=1) / np.sqrt(naive.size)


def test_no_interval_without_two_chunks_and_none_from_no_runs():
    rng = np.random.default_rng(5)
    one = chunk_stats([rng.normal(size=(5, 2))])
    got = jackknife(one, lambda q: float(q.mean[0]))
    assert np.isfinite(got.value) and np.isnan(got.se) and np.isnan(got.low)
    empty = chunk_stats([np.zeros((0, 2)), np.zeros((0, 2))])
    assert empty.pooled().count == 0 and np.isnan(empty.pooled().mean).all()
    assert np.isnan(jackknife(empty, lambda q: float(q.mean[0])).value)
    assert np.isnan(mean_interval(np.array([np.nan])).value)
    assert t_quantile(0) != t_quantile(0)  # NaN


def test_mean_interval_is_the_t_interval():
    x = np.array([1.0, 2.5, 0.5, 3.0, 2.0])
    got = mean_interval(x)
    half = sps.t.ppf(0.975, 4) * x.std(ddof=1) / np.sqrt(5)
    assert (got.value, got.low, got.high) == pytest.approx(
        (x.mean(), x.mean() - half, x.mean() + half)
    )

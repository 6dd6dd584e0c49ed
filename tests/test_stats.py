"""Mergeable moments: precision when the spread is tiny against the mean, and exact merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from noisemem.stats import Moments, chan_merge


def accumulate(xs: torch.Tensor | np.ndarray) -> Moments:
    xs = torch.as_tensor(xs)
    acc = Moments.empty(xs.shape[1])
    for x in xs:
        acc.add(x)
    return acc


def two_pass_stderr(xs: np.ndarray) -> np.ndarray:
    return xs.std(axis=0, ddof=1) / math.sqrt(len(xs))


@pytest.mark.parametrize("relative_spread", [1e-3, 1e-6, 1e-9])
def test_stderr_is_accurate_when_the_spread_is_tiny_against_the_mean(relative_spread):
    # the reviewer's case: nearly identical corrections around a large mean; sum and sum of
    # squares cancel catastrophically there (12-36x too large at 1e-9)
    rng = np.random.default_rng(0)
    mean = rng.uniform(1e2, 1e4, size=6) * rng.choice([-1, 1], size=6)
    xs = mean + relative_spread * np.abs(mean) * rng.normal(size=(200, 6))
    acc = accumulate(torch.from_numpy(xs))
    # float64 holds x to ~1e-16 |mean|, so the deviations themselves carry a relative error of
    # ~1e-16 / relative_spread: the best any method can do against the two-pass reference
    tol = 1e-12 + 100 * 2.2e-16 / relative_spread
    assert acc.count == 200
    assert np.allclose(acc.mean.numpy(), xs.mean(0), rtol=1e-13, atol=0)
    assert np.allclose(acc.stderr.numpy(), two_pass_stderr(xs), rtol=tol, atol=0)


@pytest.mark.parametrize("seed", range(5))
def test_merging_chunks_in_any_split_and_order_equals_the_one_pass_result(seed):
    rng = np.random.default_rng(seed)
    xs = torch.from_numpy(1e3 + 1e-6 * rng.normal(size=(37, 4)))
    whole = accumulate(xs)
    cuts = sorted(rng.choice(np.arange(1, 37), size=rng.integers(1, 8), replace=False))
    parts = [accumulate(p) for p in np.split(xs.numpy(), cuts)]
    parts.append(Moments.empty(4))  # a chunk whose runs all diverged
    order = rng.permutation(len(parts))
    merged = Moments.empty(4)
    for i in order:
        merged = merged.merge(parts[i])
    assert merged.count == whole.count == 37
    assert torch.allclose(merged.mean, whole.mean, rtol=1e-13, atol=0)
    assert torch.allclose(merged.m2, whole.m2, rtol=1e-7, atol=0)  # of ~1e-10: see above
    assert np.allclose(merged.stderr.numpy(), two_pass_stderr(xs.numpy()), rtol=1e-6)


def test_chan_merge_is_the_same_formula_on_numpy_arrays():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    ma, mb = accumulate(torch.from_numpy(a)), accumulate(torch.from_numpy(b))
    count, mean, m2 = chan_merge(
        3, ma.mean.numpy(), ma.m2.numpy(), 4, mb.mean.numpy(), mb.m2.numpy()
    )
    both = np.concatenate([a, b])
    assert count == 7
    assert np.allclose(mean, both.mean(0), rtol=1e-14)
    assert np.allclose(m2, ((both - both.mean(0)) ** 2).sum(0), rtol=1e-13)


def test_empty_and_single_sample_moments():
    empty = Moments.empty(2)
    assert empty.count == 0 and torch.isnan(empty.mean).all()
    assert empty.merge(Moments.empty(2)).count == 0
    one = Moments.empty(2)
    one.add(torch.tensor([1.0, -2.0], dtype=torch.float32))
    assert one.mean.dtype == torch.float64 and one.mean.tolist() == [1.0, -2.0]
    assert one.merge(empty).mean.tolist() == [1.0, -2.0]
    with pytest.raises(ValueError, match="count=1"):
        one.stderr  # noqa: B018

"""The coefficients of the history form: decay filters, per-batch momentum weights, and
the truncation of the memory tail (THEORY §2-3).

A momentum sum ``S_l^(s+1) = sum_{j<=s} beta_l^(s-j) G_l^{sigma(j)}`` over a batch sequence
is a first-order filter of the one-hot batch indicators (:func:`decay_filter`); grouped by the
batch each term points to it is ``sum_i c_i G_l^i`` with ``c`` from :func:`decay_weights`.
Eq. (9) weighs the step ``s`` of the window by ``beta_l^(n-s)`` (:func:`memory_weights`).

Tail truncation (``tail_tol``): terms with k > K are dropped, K the smallest integer with

    r(K) = sum_{k>K} k beta^k / sum_{k>=1} k beta^k = beta^K ((K+1)(1-beta) + beta) <= tail_tol,

beta the largest decay among the variables that carry memory (the window of steps); a
variable with a faster decay beta_l keeps only its own k <= K_l (same rule with beta_l).
Since ||u_k|| <= k max_s||F^(s)||, the dropped part of every w_{l,i} is at most ``tail_tol``
times the bound ``max_s||F^(s)|| beta_l/(1-beta_l)^2`` on its whole sum. ``tail_tol=0``
keeps every term.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from noisemem.optim import Source

#: default relative bound on the dropped memory tail (see the module docstring)
TAIL_TOL = 1e-12


def tail_ratio(beta: float, k: int) -> float:
    """``r(K) = beta^K ((K+1)(1-beta) + beta)``: relative weight of the terms k > K."""
    if beta == 0.0:
        return 0.0 if k >= 1 else 1.0
    return math.exp(k * math.log(beta)) * ((k + 1) * (1.0 - beta) + beta)


def truncation_horizon(beta: float, tail_tol: float, n: int) -> int:
    """Smallest K in [1, n] with ``tail_ratio(beta, K) <= tail_tol`` (n if none)."""
    if n <= 0:
        return 0
    if tail_tol <= 0.0 or tail_ratio(beta, n) > tail_tol:
        return n
    lo, hi = 0, n  # tail_ratio(lo) > tol >= tail_ratio(hi); tail_ratio decreases in K
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tail_ratio(beta, mid) > tail_tol:
            lo = mid
        else:
            hi = mid
    return max(hi, 1)


#: rows per block of :func:`decay_filter`
_FILTER_BLOCK = 64


@functools.lru_cache(maxsize=64)
def _filter_matrices(beta: float) -> tuple[np.ndarray, np.ndarray]:
    """The block matrix ``beta^(r-j)`` (r >= j) and the carry powers ``beta^(r+1)`` of
    :func:`decay_filter` (read-only; cached, since a study reuses a few betas)."""
    T = _FILTER_BLOCK
    lag = np.subtract.outer(np.arange(T), np.arange(T))
    L = np.where(lag >= 0, beta ** np.maximum(lag, 0).astype(np.float64), 0.0)
    carry_pow = beta ** np.arange(1, T + 1, dtype=np.float64)
    L.flags.writeable = False
    carry_pow.flags.writeable = False
    return L, carry_pow


def decay_filter(x: np.ndarray, beta: float, init: np.ndarray | float = 0.0) -> np.ndarray:
    """``y[r] = x[r] + beta y[r-1]`` along axis 0, with ``y[-1] = init``, in float64.

    Blocks of ``_FILTER_BLOCK`` rows are one product with the lower-triangular matrix
    ``beta^(r-j)`` plus ``beta^(r+1)`` times the carried row: no negative powers of beta
    (nothing to overflow), and O(K) numpy calls / 64 instead of a Python loop over the rows.
    """
    x = np.asarray(x, dtype=np.float64)
    T = _FILTER_BLOCK
    L, carry_pow = _filter_matrices(float(beta))
    flat = x.reshape(x.shape[0], -1)
    out = np.empty_like(flat)
    carry = np.broadcast_to(np.asarray(init, dtype=np.float64), flat.shape[1:]).reshape(-1)
    for s in range(0, flat.shape[0], T):
        t = min(T, flat.shape[0] - s)
        out[s : s + t] = L[:t, :t] @ flat[s : s + t] + carry_pow[:t, None] * carry[None, :]
        carry = out[s + t - 1]
    return out.reshape(x.shape)


def memory_weights(beta: float, steps: np.ndarray, n: int, tail_tol: float) -> np.ndarray:
    """``beta^(n-s)`` for the window's steps s, zero for the steps beyond the variable's own
    horizon (s < n - K_l, K_l = ``truncation_horizon(beta, tail_tol, n)``): its k > K_l."""
    own_start = n - truncation_horizon(beta, tail_tol, n)
    return np.where(steps >= own_start, beta ** (n - steps).astype(np.float64), 0.0)


def decay_weights(sig: np.ndarray, beta: float, num_rows: int, source: Source) -> np.ndarray:
    """``c[i] = sum_{j: sigma(j)=i} beta^(len-1-j)`` (one row for the PARAM source)."""
    if sig.size == 0:
        return np.zeros(num_rows)
    powers = beta ** np.arange(sig.size - 1, -1, -1, dtype=np.float64)
    if not source.uses_grad:
        return np.array([powers.sum()])
    return np.bincount(sig, weights=powers, minlength=num_rows)

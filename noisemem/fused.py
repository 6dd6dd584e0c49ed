"""A fused CPU kernel for the window of Eq. (9) (momentum rows, Phi, suffix sums, scatter).

The torch evaluations of the window (:func:`noisemem.window.scan`, blocks of steps through
small matrix products or cumulative sums; :func:`noisemem.window.dense`, (K, d) arrays) make
several passes over every block of rows; on a CPU each pass costs about as much as the
arithmetic. This module computes the same numbers in one pass per block of coordinates, so
that a block's rows stay in cache:

    forward over the window s = start..n-1 (row r = s - start):
        S_a <- beta_a S_a + g_{sigma(s)}            (first moment, unscaled)
        S_q <- beta_q S_q + g_{sigma(s)}^2          (second moment, Adam family)
        x    = c_a[r] S_a + c_b[r] g_{sigma(s)}     (c_b: NAdam's and Lion's memoryless term)
        F[r] = Phi(x, c_q[r] S_q, c_p[r] theta)
    backward (r = K-1..0):
        U   += F[r]                                  (U = u_{n-s}, the suffix sum of THEORY §3)
        w_{a, sigma(s)} += wa[r] U,  w_{q, sigma(s)} += wq[r] U

with the scales c (signs folded in) and weights w (``beta_l^(n-s)``, zero where a variable's
own horizon ends) computed by the caller. The result ``w_{l,i}`` equals ``B_l @ F`` of the
torch paths; tests compare them with the literal Eq. (9). The kernel also returns S_a and
S_q after the window (the momenta m^(n+1) follow from them and step n's gradient), writes
only the outputs asked for (heavy ball has no second moment) and keeps its per-thread rows
of F between calls (:data:`_WORKSPACE`: at most ``buffer(K)`` numbers).

Which optimizers it covers is read off their description (:func:`form`): a Phi with a
:class:`~noisemem.optim.Form` of kind ``sum`` (heavy ball, Nesterov), ``adam`` (AdamW, NAdamW,
RMSProp-like; eps inside or outside the square root) or ``soft_sign`` (Lion), over at most
two gradient momenta (one of them memoryless), one squared-gradient momentum and one
memoryless PARAM momentum. Anything else, a non-CPU tensor, a dtype other than
float32/float64, numba missing, or a window whose buffers (:func:`buffer`) would exceed
``window.MAX_WINDOW_ELEMENTS``, takes a torch strategy of :mod:`noisemem.window`. The
kernel is compiled by numba on first use (a few seconds; cached on disk where numba finds a
writable place) and runs on ``min(torch.get_num_threads(), numba's threads)`` threads of
numba's own ``workqueue`` pool (unless ``NUMBA_THREADING_LAYER`` says otherwise).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from noisemem.optim import Optimizer, Source

LINEAR, ADAM_EPS_IN, ADAM_EPS_OUT, LION = 0, 1, 2, 3
#: aim for this many numbers of F per block of coordinates (its rows times the block width;
#: blocks are 16 to 1024 coordinates wide, so long windows hold 16 K each: see :func:`buffer`)
BLOCK_ELEMENTS = 1 << 17


@dataclass(frozen=True)
class Form:
    """Where an optimizer's variables sit in the kernel's slots (indices into
    ``optimizer.variables``; None when the optimizer has no such variable)."""

    kind: int
    a: int  # first moment: GRAD or NEG_GRAD source, any beta
    b: int | None  # memoryless gradient term (beta = 0)
    q: int | None  # second moment: GRAD_SQ source
    p: int | None  # decoupled weight decay: PARAM source, beta = 0
    eps: float


def form(optimizer: Optimizer) -> Form | None:
    """The kernel's description of ``optimizer`` read off its Phi's form and its momentum
    variables, or None when the kernel does not cover it."""
    phi = optimizer.form
    if phi is None or phi.kind == "sign":
        return None
    v = optimizer.variables
    grads = [l for l, x in enumerate(v) if x.source in (Source.GRAD, Source.NEG_GRAD)]
    squares = [l for l, x in enumerate(v) if x.source is Source.GRAD_SQ]
    params = [l for l, x in enumerate(v) if x.source is Source.PARAM]
    # the gradient momentum with memory in slot a, a memoryless one in slot b
    grads.sort(key=lambda l: v[l].beta == 0.0)
    if not 1 <= len(grads) <= 2 or len(squares) > 1 or len(params) > 1:
        return None
    if len(grads) == 2 and v[grads[1]].beta != 0.0:
        return None
    if params and v[params[0]].beta != 0.0:
        return None
    kind = {"sum": LINEAR, "soft_sign": LION}.get(phi.kind)
    if phi.kind == "adam":
        if len(squares) != 1:
            return None
        kind = ADAM_EPS_IN if phi.eps_in_sqrt else ADAM_EPS_OUT
    elif squares:  # a second moment that Phi does not use
        return None
    assert kind is not None
    return Form(
        kind,
        grads[0],
        grads[1] if len(grads) == 2 else None,
        squares[0] if squares else None,
        params[0] if params else None,
        float(phi.eps),
    )


@cache
def _numba() -> Any | None:
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency; the torch path remains
        return None
    if "NUMBA_THREADING_LAYER" not in os.environ:
        # numba's own thread pool, not a second OpenMP runtime beside torch's: with OpenMP,
        # two 1-CPU study actors on 2 cores ran 5-8x slower (torch's work included) once the
        # kernel had run. It is not reentrant, hence _LOCK.
        numba.config.THREADING_LAYER = "workqueue"
    return numba


_LOCK = threading.Lock()


def usable(optimizer: Optimizer, theta: Tensor) -> bool:
    """Whether :func:`window` applies: a covered optimizer, a CPU float32/float64 tensor, numba."""
    return (
        theta.device.type == "cpu"
        and theta.dtype in (torch.float32, torch.float64)
        and form(optimizer) is not None
        and _numba() is not None
    )


def _block(K: int) -> int:
    """Block width (coordinates) for a window of K steps."""
    return max(16, min(1024, (BLOCK_ELEMENTS // max(K, 1)) // 16 * 16))


def _threads() -> int:
    nb = _numba()
    assert nb is not None
    return max(1, min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS))


def buffer(K: int) -> int:
    """Numbers of F the kernel holds at once for a window of K steps (all threads)."""
    return _block(K) * K * _threads()


def window(
    optimizer: Optimizer,
    grads: Tensor,
    theta: Tensor,
    target: np.ndarray,
    states: dict[int, Tensor],
    scales: np.ndarray,
    weights: dict[int, np.ndarray],
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """``w_l = B_l @ F`` over a window of K steps for the variables in ``weights``, and the
    unscaled sums S_l of the kernel's momenta (a, q) after the window.

    ``grads`` (m, d): the batch gradients g_i; ``target`` (K,): the batch of each step;
    ``states[l]`` (d,): the unscaled sum S_l of variable l (a or q) before the window, of its
    own source (-g for Lion); ``scales`` (L, K or more): b_l^(s+1) for the window's steps in
    its first K columns; ``weights[l]`` (K,): beta_l^(n-s), zero outside the variable's
    horizon. Returns ``{l: w_l}`` ((m, d) each) and ``{l: S_l}`` ((d,) each, in the
    variable's own source).
    """
    f = form(optimizer)
    nb = _numba()
    assert f is not None and nb is not None
    dtype = grads.dtype
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    K = int(target.size)
    m, d = grads.shape
    v = optimizer.variables

    def row(l: int | None, sign: float = 1.0) -> np.ndarray:
        if l is None:
            return np.zeros(K, dtype=np_dtype)
        return (sign * scales[l, :K]).astype(np_dtype)

    sign_a = -1.0 if v[f.a].source is Source.NEG_GRAD else 1.0
    sign_b = -1.0 if f.b is not None and v[f.b].source is Source.NEG_GRAD else 1.0
    zeros = torch.zeros(d, dtype=dtype)
    state_a = sign_a * states.get(f.a, zeros)  # the kernel sums g; the sign sits in the scales
    state_q = states.get(f.q, zeros) if f.q is not None else zeros
    slots = [f.a, f.q]
    wts = np.zeros((2, K), dtype=np_dtype)
    for s, l in enumerate(slots):
        if l is not None and l in weights:
            wts[s] = weights[l]
    # only the slots that are asked for get an (m, d) output; the other is never written
    wanted = [l is not None and l in weights for l in slots]
    first, outs = outputs(target, wts, wanted, (m, d), np_dtype)
    ends = np.empty((2, d), dtype=np_dtype)  # the unscaled sums after the window
    block = _block(K)
    scalar = np_dtype
    threads = _threads()
    with _LOCK:
        if threads > 1:
            nb.set_num_threads(threads)
        _kernel(threads > 1)(
            grads.detach().contiguous().numpy(),
            theta.detach().contiguous().numpy(),
            np.ascontiguousarray(target, dtype=np.int64),
            scalar(v[f.a].beta),
            state_a.detach().contiguous().numpy(),
            row(f.a, sign_a),
            row(f.b, sign_b),
            scalar(v[f.q].beta if f.q is not None else 0.0),
            state_q.detach().contiguous().numpy(),
            row(f.q),
            row(f.p),
            f.kind,
            scalar(f.eps),
            wts,
            first,
            outs[0],
            outs[1],
            ends,
            block,
            _workspace(threads, K, block, np_dtype),
        )
    out: dict[int, Tensor] = {}
    after: dict[int, Tensor] = {}
    for s, l in enumerate(slots):
        if wanted[s]:
            assert l is not None
            out[l] = torch.from_numpy(outs[s])
        if l is not None:
            sign = sign_a if s == 0 else 1.0  # back to the variable's own source
            after[l] = sign * torch.from_numpy(ends[s])
    return out, after


def uninitialised(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Memory for an output whose every element is written before it is read (its values
    are whatever the allocator left: the tests fill it with NaN to show none leaks)."""
    return np.empty(shape, dtype=dtype)


def outputs(
    target: np.ndarray, wts: np.ndarray, wanted: list[bool], shape: tuple[int, int], dtype: type
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The kernel's outputs, one per slot ((1, 1) where not wanted), and ``(2, K)`` flags:
    step r is the first of the kernel's writes to row ``target[r]`` of slot s's output (the
    kernel runs the steps backwards, so the batch's last step with a nonzero weight). The
    rows need no zeroing first (an (m, d) memset); only those of batches without a weighted
    step, which the kernel never writes, are zeroed."""
    first = np.zeros(wts.shape, dtype=np.bool_)
    outs = []
    for s, want in enumerate(wanted):
        steps = np.flatnonzero(wts[s])[::-1]  # weighted steps, last first
        _, at = np.unique(target[steps], return_index=True)
        first[s, steps[at]] = True
        out = uninitialised(shape if want else (1, 1), dtype)
        if want:
            unwritten = np.ones(shape[0], dtype=np.bool_)
            unwritten[target[steps[at]]] = False
            out[unwritten] = 0.0
        outs.append(out)
    return first, outs


#: the kernel's per-thread rows of F, kept between calls (at most ``buffer(K)`` numbers):
#: a fresh buffer per block of coordinates was an allocation, and page faults, per block
_WORKSPACE: dict[tuple[int, str], np.ndarray] = {}


def _workspace(threads: int, K: int, block: int, dtype: type) -> np.ndarray:
    """A ``(threads, K, block)`` array for the kernel's rows of F, reused when it fits."""
    key = (threads, np.dtype(dtype).str)
    need = K * block
    buf = _WORKSPACE.get(key)
    if buf is None or buf.shape[1] < need:
        buf = np.empty((threads, need), dtype=dtype)
        _WORKSPACE.clear()  # one buffer at a time
        _WORKSPACE[key] = buf
    return buf


@cache
def _kernel(parallel: bool) -> Any:
    """The compiled kernel: over blocks of coordinates in parallel, or serial (one thread:
    no thread pool to start, and its cached code loads faster)."""
    nb = _numba()
    assert nb is not None

    def kernel(
        G: np.ndarray,
        theta: np.ndarray,
        target: np.ndarray,
        beta_a: float,
        state_a: np.ndarray,
        ca: np.ndarray,
        cb: np.ndarray,
        beta_q: float,
        state_q: np.ndarray,
        cq: np.ndarray,
        cp: np.ndarray,
        kind: int,
        eps: float,
        wts: np.ndarray,
        first: np.ndarray,
        Wa: np.ndarray,
        Wq: np.ndarray,
        ends: np.ndarray,
        blk: int,
        work: np.ndarray,
    ) -> None:  # pragma: no cover - compiled; covered through correction's tests
        K = target.shape[0]
        d = G.shape[1]
        nblocks = (d + blk - 1) // blk
        threads = work.shape[0]
        for t in nb.prange(threads):  # each thread its own row of work, blocks round-robin
            for bi in range(t, nblocks, threads):
                j0 = bi * blk
                j1 = min(d, j0 + blk)
                n = j1 - j0
                Sa = state_a[j0:j1].copy()
                Sq = state_q[j0:j1].copy()
                th = theta[j0:j1]
                rows = work[t]  # F of step r is rows[r n : (r+1) n]
                for r in range(K):
                    g = G[target[r], j0:j1]
                    F = rows[r * n : (r + 1) * n]
                    a, b, q, p = ca[r], cb[r], cq[r], cp[r]
                    if kind == LINEAR:
                        for j in range(n):
                            s = beta_a * Sa[j] + g[j]
                            Sa[j] = s
                            F[j] = a * s + b * g[j] + p * th[j]
                    elif kind == LION:  # -x / sqrt(x^2 + eps) + p theta
                        for j in range(n):
                            s = beta_a * Sa[j] + g[j]
                            Sa[j] = s
                            x = a * s + b * g[j]
                            F[j] = p * th[j] - x / np.sqrt(x * x + eps)
                    # the two Adam loops differ only where eps sits: kept apart on purpose, one
                    # loop with both eps (one of them 0) measured 20-40% slower
                    elif kind == ADAM_EPS_IN:  # x / sqrt(m2 + eps) + p theta
                        for j in range(n):
                            gj = g[j]
                            s = beta_a * Sa[j] + gj
                            Sa[j] = s
                            s2 = beta_q * Sq[j] + gj * gj
                            Sq[j] = s2
                            F[j] = (a * s + b * gj) / np.sqrt(q * s2 + eps) + p * th[j]
                    else:  # ADAM_EPS_OUT: x / (sqrt(m2) + eps) + p theta
                        for j in range(n):
                            gj = g[j]
                            s = beta_a * Sa[j] + gj
                            Sa[j] = s
                            s2 = beta_q * Sq[j] + gj * gj
                            Sq[j] = s2
                            F[j] = (a * s + b * gj) / (np.sqrt(q * s2) + eps) + p * th[j]
                ends[0, j0:j1] = Sa
                ends[1, j0:j1] = Sq
                U = np.zeros(n, G.dtype)
                for r in range(K - 1, -1, -1):
                    F = rows[r * n : (r + 1) * n]
                    for j in range(n):
                        U[j] += F[j]
                    i = target[r]
                    for slot in range(2):
                        w = wts[slot, r]
                        if w != 0.0:
                            out = Wa[i, j0:j1] if slot == 0 else Wq[i, j0:j1]
                            if first[slot, r]:  # the row's first write: no zeroed row to add to
                                for j in range(n):
                                    out[j] = w * U[j]
                            else:
                                for j in range(n):
                                    out[j] += w * U[j]

    kernel.__qualname__ = "window_parallel" if parallel else "window_serial"  # own disk caches
    try:
        return nb.njit(parallel=parallel, error_model="numpy", cache=True)(kernel)
    except RuntimeError:  # nowhere to cache (read-only install, no writable home): compile only
        return nb.njit(parallel=parallel, error_model="numpy")(kernel)

"""The window of Eq. (9): ways to compute the same grouped sum (THEORY §3).

For step n of a batch sequence sigma, with ``u_k = sum_{s=n-k..n-1} F^(s)(theta)``,

    w_{l,i} = sum_{k: sigma(n-k)=i} beta_l^k u_k,
    M^(n)   = h * sum_l dPhi/dm_l(m^(n+1)) . b_l^(n+1) sum_i J[G_l^i](theta) w_{l,i}.

The window is the steps ``s = start..n-1`` whose memory is kept (:class:`Window`, cut by the
tail tolerance of :mod:`noisemem.memory`). Each strategy below is a plain function of a
:class:`~noisemem.probe.Probe`, an optimizer and a window, and returns ``M^(n)`` in the
probe's native order; they give the same numbers (same truncation) and each is tested
against the literal Eq. (9):

* :func:`scan`: torch, the window in blocks of steps: the momentum rows of a block by a
  decayed prefix sum (:func:`decayed_rows`), Phi on the block, and the suffix sums u_k as
  prefix sums of F (:func:`scan_vectors`): O(K d) work and O(T d) temporaries for a block of
  T steps, however deep the window and however many batches. What a GPU takes.
* :func:`fused`: the CPU kernel of :mod:`noisemem.fused` (the same recurrences, suffix sums
  and scatter in one pass per block of coordinates), for optimizers whose Phi has a
  :class:`~noisemem.optim.Form`.
* :func:`linear`: optimizers linear in the gradients (``Phi = sum_l m_l``, GRAD sources):
  one cotangent ``W_i = sum_l b_l^(n+1) w_{l,i}`` and one summed Hessian-vector product,
  ``M = h sum_i H_i W_i``. W comes from the kernel (CPU), or in torch as ``A G`` with the
  (m, m) coefficients A computed from the window's steps alone (:func:`linear_coefficients`:
  flat in the depth, one matrix product), or from the scan where that costs less.
* :func:`online`: O(L d) memory: no batch gradient or w_{l,i} is kept; the window is run
  forward in blocks of steps, each block with the graph of its own batches, and its
  products ``H_{sigma(s)} u`` taken there (:func:`online`). About one pass of products per
  epoch of the window plus one: for when the O(m d) arrays do not fit
  (:mod:`noisemem.budget`).
* :func:`dense`: torch, momentum rows as coefficient matrices times the stacked sources
  (O(K m d); kept as a second, independent torch evaluation).
* :func:`streamed`: torch, an O(d) recurrence per step, streamed in blocks of steps (a
  Python loop over the steps; kept likewise).

The strategies but :func:`online` end alike (:func:`finish`): the w_{l,i}, then at most one
pass of Hessian-vector products per momentum variable, all of them in one traversal of the
gradients' graphs (``hvp="double_backward"``: a summed product for gradient sources, the
per-batch products weighed by g_i for squared gradients) or one vmapped forward-over-reverse
call (``hvp="vmap"``), then one JVP of Phi.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.func import jvp

from noisemem import fused as fused_kernel
from noisemem.memory import decay_filter, decay_weights, memory_weights, truncation_horizon
from noisemem.optim import MomentumVariable, Optimizer, Source
from noisemem.probe import BatchGraph, HvpRequest, Probe, rows_of, weighted_row_sum

#: at most this many numbers (window rows x d, summed over variables) are held at once
MAX_WINDOW_ELEMENTS = 1 << 26
#: rows of a block of the scan done by matrix products (a CPU): their flops grow as T per
#: number, the Python-level calls per block fall as 1/T
MATRIX_ROWS = 12
#: the scan scales a block's rows by beta^-r: the largest factor allowed, per dtype
_SCALE_LIMIT = {torch.float16: 2.0**6, torch.bfloat16: 2.0**6, torch.float32: 2.0**20}
_SCALE_LIMIT_DEFAULT = 2.0**50


@dataclass(frozen=True)
class Window:
    """The steps of Eq. (9) that carry memory: ``s = start..n-1`` (k = n - s = K..1), and
    the last step n, whose momenta m^(n+1) Phi is differentiated at."""

    sequence: np.ndarray  # sigma(0..n), int64
    start: int
    scales: np.ndarray  # (L, K+1): b_l^(s+1) for s = start..n
    memory: tuple[int, ...]  # the variables with beta_l > 0
    tail_tol: float
    hvp: str

    @property
    def n(self) -> int:
        return self.sequence.size - 1

    @property
    def K(self) -> int:
        return self.n - self.start

    @property
    def targets(self) -> np.ndarray:
        """The batch of each step of the window (s = start..n-1)."""
        return self.sequence[self.start : self.n]


def window_of(
    optimizer: Optimizer, sequence: np.ndarray, tail_tol: float, hvp: str
) -> Window | None:
    """The window of ``sequence`` (arguments checked); None when no term carries memory."""
    n = sequence.size - 1
    variables = optimizer.variables
    memory = tuple(l for l, v in enumerate(variables) if v.beta > 0.0)
    if n == 0 or not memory:
        return None
    K = truncation_horizon(max(variables[l].beta for l in memory), tail_tol, n)
    start = n - K
    scales = optimizer.scales(np.arange(start, n + 1, dtype=np.float64))  # (L, K+1)
    return Window(sequence, start, scales, memory, tail_tol, hvp)


# -- the blocked scan ------------------------------------------------------------------------
def decayed_rows(X: Tensor, beta: float, state: Tensor, scale: np.ndarray) -> tuple[Tensor, Tensor]:
    """The momentum rows of a block and the state after it (the sums of THEORY §2).

    With ``S[-1] = state`` and ``S[r] = beta S[r-1] + X[r]`` (r = 0..T-1), returns
    ``scale[r] S[r]`` (T, d) and ``S[T-1]`` (d,). Within the block
    ``S[r] = beta^r sum_{j<=r} beta^-j X[j] + beta^(r+1) state``: one cumulative sum instead of
    T sequential steps. The rounding errors are those of the recurrence (each partial sum's
    error is scaled back by beta^r as its terms are); the block is kept short enough that
    beta^-T stays representable (:func:`scan_rows`)."""
    T = X.shape[0]
    r = np.arange(T, dtype=np.float64)
    dtype, device = X.dtype, X.device
    up = torch.as_tensor(beta**-r, dtype=dtype, device=device)
    Y = torch.cumsum(X * up[:, None], 0)  # (T, d)
    after = Y[-1] * float(beta ** (T - 1)) + float(beta**T) * state
    down = torch.as_tensor(scale * beta**r, dtype=dtype, device=device)
    carry = torch.as_tensor(scale * beta ** (r + 1), dtype=dtype, device=device)
    Y.mul_(down[:, None]).addr_(carry, state)
    return Y, after


def scan_rows(optimizer: Optimizer, w: Window, d: int, dtype: torch.dtype, matrices: bool) -> int:
    """Rows T of a block of the scan: at most ``MAX_WINDOW_ELEMENTS`` numbers over the
    variables; with matrix products ``MATRIX_ROWS`` (their cost grows with T); with
    cumulative sums short enough that beta^-T stays below the dtype's limit for every
    decaying variable (:func:`decayed_rows`)."""
    variables = optimizer.variables
    T = MAX_WINDOW_ELEMENTS // max(1, len(variables) * d)
    if matrices:
        T = min(T, MATRIX_ROWS)
    else:
        limit = math.log(_SCALE_LIMIT.get(dtype, _SCALE_LIMIT_DEFAULT))
        for v in variables:
            if 0.0 < v.beta < 1.0:
                T = min(T, int(limit / -math.log(v.beta)))
    return max(1, min(T, w.K))


def _block_sources(
    probe: Probe, optimizer: Optimizer, rows: Tensor | None, T: int
) -> list[Tensor | None]:
    """``G_l^{sigma(s)}`` for a block's steps: (T, d) rows of g, -g, g^2; None for theta."""
    out: list[Tensor | None] = []
    for v in optimizer.variables:
        if v.source is Source.PARAM:
            out.append(None)
        else:
            assert rows is not None
            out.append(v.source.value(rows, probe.native_theta))
    return out


def block_momenta(
    probe: Probe,
    optimizer: Optimizer,
    X: list[Tensor | None],
    states: list[Tensor],
    scales: np.ndarray,
) -> list[Tensor]:
    """The momentum rows ``m_l^(s+1)`` of a block (T, d) from its sources ``X`` (None:
    theta) and the unscaled states before it; ``states`` is advanced in place."""
    theta = probe.native_theta
    T = scales.shape[1]
    out = []
    for l, v in enumerate(optimizer.variables):
        x = X[l]
        if x is None and v.beta == 0.0:  # b_l theta: one broadcast row when b_l is constant
            if np.all(scales[l] == scales[l, 0]):
                out.append(float(scales[l, 0]) * theta[None])
            else:
                b = torch.as_tensor(scales[l], dtype=theta.dtype, device=theta.device)
                out.append(torch.outer(b, theta))
            continue
        if x is None:
            x = theta.expand(T, -1)
        if v.beta == 0.0:
            sc = torch.as_tensor(scales[l], dtype=x.dtype, device=x.device)
            out.append(x * sc[:, None])
            continue
        rows, states[l] = decayed_rows(x, v.beta, states[l], scales[l])
        out.append(rows)
    return out


def initial_states(probe: Probe, optimizer: Optimizer, sig: np.ndarray, start: int) -> list[Tensor]:
    """``S_l`` after steps 0..start-1: sum_{j<start} beta_l^(start-1-j) G_l^{sigma(j)}
    (grouped by batch: one weighted sum of the batch gradients per variable)."""
    m = probe.problem.num_batches
    out = []
    for v in optimizer.variables:
        c = decay_weights(sig[:start], v.beta, m, v.source)
        out.append(probe.native_weighted_source(v.source, c))
    return out


def scan_vectors(
    probe: Probe, optimizer: Optimizer, w: Window
) -> tuple[list[Tensor | None], list[Tensor]]:
    """``w_{l,i}`` (rows: m for gradient sources, 1 for theta; None for the variables
    without memory) and ``m^(n+1)``, by blocked scans in torch.

    Blocks of T steps run forward: the block's batch gradients are gathered, its momentum
    rows come from the states carried over, F = Phi on the block, and with
    P_s = sum_{start<=s'<s} F^(s') the prefix of F, ``u_{n-s} = P_n - P_s``, so
    ``w_{l,i} = c_{l,i} P_n - sum_{sigma(s)=i} beta_l^(n-s) P_s``
    (c_{l,i} = sum_{sigma(s)=i} beta_l^(n-s)): one pass, nothing of size (K, d). The last
    block takes its u exactly as suffix sums of its own F instead, so the terms with the
    largest weights carry no cancellation; the others' rounding (relative eps K of their
    sum) is damped by beta^T.

    A block is a few small T x T operators on (T, d) rows: the decayed prefix sums of the
    momenta, the (weighted) suffix and prefix sums of F. On a CPU they are matrix products
    (:class:`_MatrixBlock`: a handful of BLAS calls per block, where a ``cumsum`` down the
    rows runs at a fifth of memory speed); elsewhere cumulative sums (:func:`decayed_rows`:
    O(1) work per number, where the products' O(T) would dominate on a GPU).
    """
    theta = probe.native_theta
    G = probe.native_grads
    m, d = G.shape
    dtype, device = theta.dtype, theta.device
    variables = optimizer.variables
    sig, start, n = w.sequence, w.start, w.n
    grad_sources = any(v.source.uses_grad for v in variables)
    matrices = device.type == "cpu" if SCAN_MATRICES is None else SCAN_MATRICES

    def tensor(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=dtype, device=device)

    states = initial_states(probe, optimizer, sig, start)
    rows_of = [m if v.source.uses_grad else 1 for v in variables]
    W: list[Tensor | None] = [None] * len(variables)
    for l in w.memory:
        W[l] = theta.new_zeros((rows_of[l], d))
    on_P = {l: np.zeros(rows_of[l]) for l in w.memory}  # c_{l,i}: the weight of P_n
    P = torch.zeros_like(theta)
    T = scan_rows(optimizer, w, d, dtype, matrices)
    window_steps = np.arange(start, n)
    all_weights = {
        l: memory_weights(variables[l].beta, window_steps, n, w.tail_tol) for l in w.memory
    }
    block = _MatrixBlock(probe, optimizer, w, T, all_weights) if matrices else None
    for b, s0 in enumerate(range(start, n, T)):
        s1 = min(n, s0 + T)
        idx = sig[s0:s1]
        index = torch.as_tensor(idx, device=device)
        sc = w.scales[:, s0 - start : s1 - start]
        last = s1 == n
        weights = {l: all_weights[l][s0 - start : s1 - start] for l in w.memory}
        targets = {
            l: idx if variables[l].source.uses_grad else np.zeros(s1 - s0, dtype=np.int64)
            for l in w.memory
        }
        if block is not None:
            F = optimizer.phi(*block.momenta(b, G if grad_sources else None, index, states))
            rows, total = block.scatter(b, F, P)
            for l in w.memory:
                target = (
                    index if variables[l].source.uses_grad else tensor_index(targets[l], device)
                )
                W[l].index_add_(0, target, rows[l])  # type: ignore[union-attr]
        else:
            gathered = G.index_select(0, index) if grad_sources else None
            X = _block_sources(probe, optimizer, gathered, s1 - s0)
            F = optimizer.phi(*block_momenta(probe, optimizer, X, states, sc)).expand(s1 - s0, d)
            E = torch.cumsum(F, 0).sub_(F)  # exclusive prefix of the block: P_s - P_{s0}
            total = E[-1] + F[-1]
            # rows: u_{n-s} (last block, exactly) or -P_s (the P_n part is added at the end)
            V = torch.sub(total, E, out=E) if last else E.add_(P).neg_()
            for l in w.memory:
                W[l].index_add_(  # type: ignore[union-attr]
                    0, tensor_index(targets[l], device), V * tensor(weights[l])[:, None]
                )
        if not last:
            for l in w.memory:
                on_P[l] += np.bincount(targets[l], weights=weights[l], minlength=rows_of[l])
        P += total
    for l in w.memory:
        if np.any(on_P[l]):
            W[l].addr_(tensor(on_P[l]), P)  # type: ignore[union-attr]
    # m^(n+1): the states through step n-1, then step n itself
    g_n = G[int(sig[n])] if grad_sources else None
    b_n = w.scales[:, -1]
    m_last = step_momenta(variables, states, g_n, theta, b_n)
    return W, m_last


def step_momenta(
    variables: Sequence[MomentumVariable],
    states: Sequence[Tensor],
    g_n: Tensor | None,
    theta: Tensor,
    b_n: Tensor,
) -> list[Tensor]:
    """m^(n+1): each variable's state through step n-1 (``states``), then step n itself
    with the last batch's gradient ``g_n`` (None where no source uses a gradient), scaled
    by ``b_n``."""
    m_last = []
    for l, v in enumerate(variables):
        if v.source is Source.PARAM:
            x = theta
        else:
            assert g_n is not None
            x = v.source.value(g_n, theta)
        S = x if v.beta == 0.0 else v.beta * states[l] + x
        m_last.append(float(b_n[l]) * S)
    return m_last


#: None: the scan's blocks are matrix products on a CPU, cumulative sums elsewhere;
#: True/False forces one way (the tests run both on a CPU)
SCAN_MATRICES: bool | None = None


def tensor_index(a: np.ndarray, device: torch.device) -> Tensor:
    return torch.as_tensor(a, dtype=torch.int64, device=device)


class _MatrixBlock:
    """The scan's block operators as small matrices (:func:`scan_vectors`), all of them
    built for the whole window at once (one conversion to torch per kind), with the rows
    buffers reused from block to block.

    Momenta: for a decaying variable with the source rows X (t, d) and the unscaled state S
    before the block, ``[S; X]`` (t+1, d) times the (t+1, t+1) matrix whose row r < t is
    ``scale_r (beta^(r+1), beta^(r-j) for j <= r)`` and whose row t is the state after the
    block ``(beta^t, beta^(t-1-j))``: the scaled momentum rows and the next state in one
    product. Memoryless variables scale X row by row.

    F's sums: ``[P_{s0}; F]`` times the (t+1, t+1) matrix with the rows ``(0, [j >= r])``
    (last block: the suffix sums u_{n-s}) or ``-(1, [j < r])`` (the others: -P_s), and the
    row ``(0, 1, ..., 1)`` for the block's total; each weight vector (a variable with
    memory, say) then scales those rows.
    """

    def __init__(
        self,
        probe: Probe,
        optimizer: Optimizer,
        w: Window,
        T: int,
        weights: dict[int, np.ndarray],
    ) -> None:
        self.probe = probe
        self.optimizer = optimizer
        theta = probe.native_theta
        d = theta.numel()
        self.dtype, self.device = theta.dtype, theta.device
        variables = optimizer.variables
        K = w.K
        self.bounds = [(r0, min(K, r0 + T)) for r0 in range(0, K, T)]
        # one [S; X] buffer per source with memory (g or -g share one: the sign sits in the
        # matrix), a second one when two decaying variables share a source
        self.slot: dict[int, int] = {}  # variable -> its [S; X] buffer
        self.kinds: list[str] = []  # per buffer: what its rows X are ("g", "g^2", "theta")
        taken: set[str] = set()
        for l, v in enumerate(variables):
            if v.beta > 0.0:
                kind = {Source.GRAD_SQ: "g^2", Source.PARAM: "theta"}.get(v.source, "g")
                if kind in taken:  # a second decaying variable of the same source
                    kind = f"{kind}/{l}"
                taken.add(kind)
                self.slot[l] = len(self.kinds)
                self.kinds.append(kind)
        self.buffers = [theta.new_empty((T + 1, d)) for _ in self.kinds]
        self.F = theta.new_empty((T + 1, d))
        self.scales = torch.as_tensor(w.scales, dtype=self.dtype, device=self.device)
        self.constant = [bool(np.all(row == row[0])) for row in w.scales]
        self._first = w.scales[:, 0].copy()
        self.moments = {
            l: self._blocks(self._momentum_matrices(v.beta, w.scales[l, :K], v.source), T)
            for l, v in enumerate(variables)
            if v.beta > 0.0
        }
        self.sums = self._blocks(self._sum_matrices(K, T), T)
        self.weights = {
            name: torch.as_tensor(wl, dtype=self.dtype, device=self.device)
            for name, wl in weights.items()
        }

    def _blocks(self, parts: list[np.ndarray], T: int) -> list[Tensor]:
        """Full blocks stacked (one conversion), the ragged last one apart."""
        out: list[Tensor] = []
        full = [p for p in parts if p.shape[-1] == T + 1]
        if full:
            stacked = torch.as_tensor(np.stack(full), dtype=self.dtype, device=self.device)
            out.extend(stacked.unbind(0))
        if len(full) < len(parts):
            out.append(torch.as_tensor(parts[-1], dtype=self.dtype, device=self.device))
        return out

    def _momentum_matrices(
        self, beta: float, scale: np.ndarray, source: Source
    ) -> list[np.ndarray]:
        sign = -1.0 if source is Source.NEG_GRAD else 1.0
        out = []
        for r0, r1 in self.bounds:
            t = r1 - r0
            sc = scale[r0:r1]
            r = np.arange(t)
            lag = np.subtract.outer(r, r)  # r - j
            A = np.zeros((t + 1, t + 1))
            A[:t, 0] = sc * beta ** (r + 1.0)
            A[:t, 1:] = np.where(lag >= 0, beta ** np.maximum(lag, 0).astype(np.float64), 0.0)
            A[:t, 1:] *= sign * sc[:, None]
            A[t, 0] = beta**t
            A[t, 1:] = sign * beta ** (t - 1.0 - r)
            out.append(A)
        return out

    def _sum_matrices(self, K: int, T: int) -> list[np.ndarray]:
        out = []
        for b, (r0, r1) in enumerate(self.bounds):
            t = r1 - r0
            r = np.arange(t)
            later = (r[None, :] >= r[:, None]).astype(np.float64)  # [j >= r]
            A = np.zeros((t + 1, t + 1))
            if b == len(self.bounds) - 1:
                A[:t, 1:] = later
            else:
                A[:t, 0] = -1.0
                A[:t, 1:] = later - 1.0  # -[j < r]
            A[t, 1:] = 1.0
            out.append(A)
        return out

    def momenta(
        self, b: int, G: Tensor | None, index: Tensor, states: list[Tensor]
    ) -> list[Tensor]:
        """The momentum rows of block b (t, d) each; ``states`` advanced in place."""
        theta = self.probe.native_theta
        r0, r1 = self.bounds[b]
        t = r1 - r0
        variables = self.optimizer.variables
        rows: Tensor | None = None  # the block's g rows
        filled: set[str] = set()
        out: list[Tensor] = []
        for l, v in enumerate(variables):
            if v.beta == 0.0:
                sc = self.scales[l, r0:r1]
                if v.source is Source.PARAM:  # b_l theta: one broadcast row if b_l is constant
                    if self.constant[l]:
                        out.append(float(self._first[l]) * theta[None])
                    else:
                        out.append(torch.outer(sc, theta))
                    continue
                if rows is None:  # memoryless: scale_r G^{sigma(s)}
                    assert G is not None
                    rows = G.index_select(0, index)
                out.append(v.source.value(rows, theta) * sc[:, None])
                continue
            slot = self.slot[l]
            buf = self.buffers[slot][: t + 1]
            kind = self.kinds[slot]
            if kind not in filled:
                if v.source is Source.PARAM:
                    buf[1:] = theta
                elif v.source is Source.GRAD_SQ:
                    if rows is None:
                        assert G is not None
                        rows = G.index_select(0, index)
                    torch.mul(rows, rows, out=buf[1:])
                else:  # g or -g: the sign sits in the matrix
                    assert G is not None
                    torch.index_select(G, 0, index, out=buf[1:])
                    rows = buf[1:] if rows is None else rows
                filled.add(kind)
            buf[0] = states[l]
            prod = self.moments[l][b] @ buf  # (t+1, d)
            states[l] = prod[t]
            out.append(prod[:t])
        return out

    def scatter(self, b: int, F: Tensor, P: Tensor) -> tuple[dict[int, Tensor], Tensor]:
        """Block b's rows to add for each weight vector (t, d), and its total of F (d,)."""
        r0, r1 = self.bounds[b]
        t = r1 - r0
        buf = self.F[: t + 1]
        buf[0] = P
        buf[1:] = F  # F may be one broadcast row
        out = self.sums[b] @ buf  # (t+1, d): u_{n-s} or -P_s, then the total
        V = out[:t]
        rows = {name: V * wl[r0:r1, None] for name, wl in self.weights.items()}
        return rows, out[t]


# -- the strategies ------------------------------------------------------------------------
def scan(probe: Probe, optimizer: Optimizer, w: Window) -> Tensor:
    """Eq. (9) with the window by blocked scans in torch (:func:`scan_vectors`)."""
    W, m_last = scan_vectors(probe, optimizer, w)
    return finish(probe, optimizer, w, W, m_last)


def fused_vectors(
    probe: Probe, optimizer: Optimizer, w: Window
) -> tuple[list[Tensor | None], list[Tensor]]:
    """``w_{l,i}`` and ``m^(n+1)`` from the fused CPU kernel (:mod:`noisemem.fused`); the
    momenta from the kernel's sums after the window and step n's own gradient."""
    variables = optimizer.variables
    before = initial_states(probe, optimizer, w.sequence, w.start)
    steps = np.arange(w.start, w.n)
    states = {l: before[l] for l in w.memory}
    weights = {l: memory_weights(variables[l].beta, steps, w.n, w.tail_tol) for l in w.memory}
    out, after = fused_kernel.window(
        optimizer, probe.native_grads, probe.native_theta, w.targets, states, w.scales, weights
    )
    W: list[Tensor | None] = [out.get(l) for l in range(len(variables))]
    return W, last_momenta(probe, optimizer, w, after)


def last_momenta(
    probe: Probe, optimizer: Optimizer, w: Window, after: dict[int, Tensor]
) -> list[Tensor]:
    """``m_l^(n+1) = b_l^(n+1) (beta_l S_l + G_l^{sigma(n)})`` from the unscaled sums S_l
    after step n-1 (``after``, for the variables with memory)."""
    theta = probe.native_theta
    g_n = probe.native_grads[int(w.sequence[w.n])]
    b_n = w.scales[:, -1]
    out = []
    for l, v in enumerate(optimizer.variables):
        x = theta if v.source is Source.PARAM else v.source.value(g_n, theta)
        S = x if v.beta == 0.0 else v.beta * after[l].to(theta.device) + x
        out.append(float(b_n[l]) * S)
    return out


def fused(probe: Probe, optimizer: Optimizer, w: Window) -> Tensor:
    """Eq. (9) on the CPU with the window in one fused pass (:mod:`noisemem.fused`): the
    same ``w_l`` as :func:`scan` and :func:`dense`, without (K, d) arrays."""
    W, m_last = fused_vectors(probe, optimizer, w)
    return finish(probe, optimizer, w, W, m_last)


def linear(probe: Probe, optimizer: Optimizer, w: Window) -> Tensor:
    """Eq. (9) for optimizers linear in the g's (Phi = sum_l m_l, every source g).

    Then dPhi/dm_l = I and ``M^(n) = h sum_l b_l^(n+1) sum_i H_i w_{l,i} = h sum_i H_i W_i``
    with ``W_i = sum_l b_l^(n+1) w_{l,i}``: the w_{l,i} of the fused kernel (CPU) or the scan
    (O(K d): no m x m coefficient matrix), one summed Hessian-vector product.
    """
    combined = linear_cotangent(probe, optimizer, w)
    if w.hvp == "vmap":
        index = torch.arange(combined.shape[0], device=combined.device)
        return optimizer.lr * probe.native_vmapped_hvps(index, combined).sum(0)
    return optimizer.lr * probe.native_hvp(combined, summed=True)


#: the torch path of :func:`linear_cotangent` takes the coefficient matrix when
#: m^2 <= ratio K: one (m, m) @ (m, d) product (2 m^2 d flops) against the scan's O(K d)
#: elementwise passes. On a CPU (digits MLP, one thread) they break even between
#: m^2 / K = 57 (m = 56 one epoch deep: 4.2 against the scan's 4.8 ms; ten deep: 4.5
#: against 19.5) and 170 (m = 224: 29 against 25 ms; one epoch deep 33 against 13). On a
#: GPU, from its ratio of flops to memory speed (not measured here): about 1000, the
#: scan's kernel launches aside
COEFFICIENT_RATIO = {"cpu": 64, "cuda": 1024}
#: at most this many numbers (K m) in each of the coefficient computation's arrays
MAX_COEFFICIENTS = 1 << 22
#: None: choose by :data:`COEFFICIENT_RATIO`; True/False forces one way (tests)
LINEAR_COEFFICIENTS: bool | None = None


def linear_cotangent(probe: Probe, optimizer: Optimizer, w: Window) -> Tensor:
    """``W_i = sum_l b_l^(n+1) w_{l,i}`` (m, d) of :func:`linear`: ``M^(n) = h sum_i H_i W_i``.
    From the fused kernel (CPU), else ``A G`` with the coefficients of
    :func:`linear_coefficients` (flat in the depth) or the scan, whichever costs less."""
    usable = fused_kernel.usable(optimizer, probe.native_theta)
    if usable and fused_kernel.buffer(w.K) <= MAX_WINDOW_ELEMENTS:
        W, _ = fused_vectors(probe, optimizer, w)
    elif takes_coefficients(probe, w):
        G = probe.native_grads
        A = linear_coefficients(optimizer, w, G.shape[0])
        return torch.as_tensor(A, dtype=G.dtype, device=G.device) @ G
    else:
        W, _ = scan_vectors(probe, optimizer, w)
    b_n = w.scales[:, -1]
    combined: Tensor | None = None
    for l in w.memory:  # the w_{l,i} are this function's own: combined in place
        x = W[l]
        assert x is not None
        b = float(b_n[l])
        if combined is None:
            combined = x if b == 1.0 else x.mul_(b)
        else:
            combined.add_(x, alpha=b)
    assert combined is not None
    return combined


def takes_coefficients(probe: Probe, w: Window) -> bool:
    """Whether :func:`linear_cotangent`'s torch path takes ``A G`` (else the scan)."""
    if LINEAR_COEFFICIENTS is not None:
        return LINEAR_COEFFICIENTS
    m = probe.problem.num_batches
    # another accelerator: a GPU's ratio
    ratio = COEFFICIENT_RATIO.get(probe.native_theta.device.type) or COEFFICIENT_RATIO["cuda"]
    return w.K * m <= MAX_COEFFICIENTS and m * m <= ratio * w.K


def linear_coefficients(optimizer: Optimizer, w: Window, m: int) -> np.ndarray:
    """``A`` (m, m), float64, with ``W = A G`` for :func:`linear_cotangent` (a linear
    optimizer: Phi = sum_l m_l, every source g), from the window's steps alone.

    Row s - start of ``F`` holds the coefficients of F^(s) over the batches, the sum of the
    momenta's (:func:`momentum_coefficients`: decayed counts of the one-hot batch
    indicators); their suffix sums are those of the u_k, and the rows grouped by batch with
    the weights ``sum_l b_l^(n+1) beta_l^(n-s)`` give A. O(K m) numbers, nothing of size d:
    flat in the depth, and a GPU's one matrix product.
    """
    variables = optimizer.variables
    start, n, K = w.start, w.n, w.K
    coef, _ = momentum_coefficients(optimizer, w, [m] * len(variables))
    F = np.sum([c[:K] for c in coef], axis=0)  # Phi = sum_l m_l
    U = np.cumsum(F[::-1], axis=0)[::-1]  # the u of step s: sum_{s'=s..n-1} F^(s')
    steps = np.arange(start, n)
    b_n = w.scales[:, -1]
    weight = np.zeros(K)
    for l in w.memory:
        weight += b_n[l] * memory_weights(variables[l].beta, steps, n, w.tail_tol)
    A = np.zeros((m, m))
    np.add.at(A, w.targets, weight[:, None] * U)  # each step's row to its batch's
    return A


def momentum_coefficients(
    optimizer: Optimizer, w: Window, rows: Sequence[int]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per variable l, its momenta as combinations of the rows of its sources:
    ``m_l^(s+1) = C_l[s - start] @ G_l`` for s = start..n (``C_l`` (K+1, rows[l]), scaled by
    b_l^(s+1): a first-order filter over the one-hot batch indicators from the variable's
    sum before the window, float64), and the row of G_l each step uses (0 for theta)."""
    sig, start, K = w.sequence, w.start, w.K
    coef, gather = [], []
    for l, v in enumerate(optimizer.variables):
        target = sig[start:] if v.source.uses_grad else np.zeros(K + 1, dtype=np.int64)
        onehot = np.zeros((K + 1, rows[l]))
        onehot[np.arange(K + 1), target] = 1.0
        c0 = decay_weights(sig[:start], v.beta, rows[l], v.source)
        coef.append(w.scales[l][:, None] * decay_filter(onehot, v.beta, c0))
        gather.append(target)
    return coef, gather


def dense(probe: Probe, optimizer: Optimizer, w: Window) -> Tensor:
    """Eq. (9) in torch when there are few distinct batches.

    Every momentum row is a coefficient row times the stacked sources,
    ``m_l^(s+1) = b_l^(s+1) C_l[s] @ G_l`` (C_l a first-order filter over the one-hot
    batch indicators, float64 numpy), and ``w_l = B_l @ F`` with
    ``B_l[i, s] = sum_{s' <= s, sigma(s') = i} beta_l^(n-s')`` (the suffix sums u_k folded
    into the scatter): matrix products instead of a loop over steps.
    """
    theta = probe.native_theta
    start, n, K = w.start, w.n, w.K
    variables = optimizer.variables
    sources = probe.native_sources(optimizer)
    dtype, device = theta.dtype, theta.device

    def tensor(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=dtype, device=device)

    coef, gather = momentum_coefficients(optimizer, w, [G.shape[0] for G in sources])
    B, first = {}, {}
    steps = np.arange(start, n)
    for l in w.memory:
        # each variable's own horizon: its terms with k > K_l are dropped (same bound)
        first[l] = K - truncation_horizon(variables[l].beta, w.tail_tol, n)
        E = np.zeros((K, sources[l].shape[0]))
        E[np.arange(K), gather[l][:K]] = memory_weights(variables[l].beta, steps, n, w.tail_tol)
        B[l] = np.cumsum(E, axis=0).T  # (rows_l, K); columns before first[l] are zero
    W: list[Tensor | None] = [None] * len(variables)
    for l in w.memory:
        W[l] = torch.zeros_like(sources[l])
    rows_per_block = max(1, MAX_WINDOW_ELEMENTS // (len(variables) * theta.numel()))
    for r0 in range(0, K, rows_per_block):
        r1 = min(K, r0 + rows_per_block)
        F = optimizer.phi(
            *(_rows(tensor, c[r0:r1], G) for c, G in zip(coef, sources, strict=True))
        ).expand(r1 - r0, -1)  # every row may have been a broadcast single row
        for l in w.memory:
            lo = max(r0, first[l])
            if lo < r1:
                W[l] += tensor(B[l][:, lo:r1]) @ F[lo - r0 :]  # type: ignore[operator]
    m_last = [tensor(c[K]) @ G for c, G in zip(coef, sources, strict=True)]
    return finish(probe, optimizer, w, W, m_last)


def streamed(probe: Probe, optimizer: Optimizer, w: Window) -> Tensor:
    """Eq. (9) with an O(d) recurrence per step and variable (a Python loop over the steps),
    streamed in blocks of steps (forward for the states, backward for the suffix sums)."""
    theta = probe.native_theta
    sig, start, n = w.sequence, w.start, w.n
    variables = optimizer.variables
    sources = probe.native_sources(optimizer)
    W = [torch.zeros_like(G) if l in w.memory else None for l, G in enumerate(sources)]
    suffix = torch.zeros_like(theta)  # sum of F^(s) over the rows already processed
    m_last: list[Tensor] | None = None
    rows_per_block = max(1, MAX_WINDOW_ELEMENTS // (len(variables) * theta.numel()))
    bounds = [*range(start, n + 1, rows_per_block), n + 1]
    blocks = list(itertools.pairwise(bounds))
    # forward pass: the state S_l before each block (one d-vector each)
    states = [initial_states(probe, optimizer, sig, start)]
    cached: list[Tensor] | None = None
    for s0, s1 in blocks:
        rows = state_rows(optimizer, sources, sig, s0, s1, states[-1])
        states.append([r[-1] for r in rows])
        cached = rows
    # backward pass over the blocks: F rows, suffix sums u_k, scatter into w_{l,i}
    for b_idx in range(len(blocks) - 1, -1, -1):
        s0, s1 = blocks[b_idx]
        rows = (
            cached  # type: ignore[assignment]
            if b_idx == len(blocks) - 1
            else state_rows(optimizer, sources, sig, s0, s1, states[b_idx])
        )
        sc = w.scales[:, s0 - start : s1 - start]
        m_rows = [
            torch.as_tensor(sc[l], dtype=theta.dtype, device=theta.device)[:, None] * rows[l]
            for l in range(len(variables))
        ]
        if s1 == n + 1:  # the last row is s = n: m^(n+1), not part of any u_k
            m_last = [m[-1] for m in m_rows]
            m_rows = [m[:-1] for m in m_rows]
            s1 = n
        if s1 <= s0:
            continue
        F = optimizer.phi(*m_rows)  # (rows, d): F^(s) for s = s0..s1-1
        U = torch.flip(torch.cumsum(torch.flip(F, (0,)), 0), (0,)) + suffix  # u_{n-s}
        suffix = U[0]
        s_idx = np.arange(s0, s1)
        for l in w.memory:
            v = variables[l]
            weights = torch.as_tensor(
                memory_weights(v.beta, s_idx, n, w.tail_tol), dtype=theta.dtype, device=theta.device
            )
            target = sig[s0:s1] if v.source.uses_grad else np.zeros(s1 - s0, dtype=np.int64)
            W[l].index_add_(  # type: ignore[union-attr]
                0, torch.as_tensor(target, device=theta.device), weights[:, None] * U
            )
    assert m_last is not None
    return finish(probe, optimizer, w, W, m_last)


def online(probe: Probe, optimizer: Optimizer, w: Window) -> Tensor:
    """Eq. (9) in O(L d) memory: no (m, d) array.

    The steps before the window enter through the states
    ``S_l = sum_i c_i G_l^i`` (one pass of batch gradients without a graph, batch by group).
    The window runs forward in blocks of steps: each block builds the graph of its steps'
    batches (one row per step), reads its gradients, advances the states and F as
    :func:`scan_vectors` does, and takes the block's products at once. With the prefix
    P_s = sum_{start<=s'<s} F^(s'), ``u_{n-s} = P_n - P_s``, so

        z_l = sum_i J[G_l^i] w_{l,i}
            = sum_i J[G_l^i] (c_{l,i} P_n) - sum_s beta_l^(n-s) J[G_l^{sigma(s)}] P_s,

    the second sum block by block (the last block with its exact suffix sums instead, as
    in :func:`scan_vectors`), the first in one more pass over the batches once P_n is known.
    The products of a step serve every variable (J[g] = H, J[g^2] = 2 diag(g) H). Cost:
    about one pass of products per epoch of the window, plus one.
    """
    theta = probe.native_theta
    problem = probe.problem
    d = theta.numel()
    m = problem.num_batches
    dtype, device = theta.dtype, theta.device
    variables = optimizer.variables
    sig, start, n = w.sequence, w.start, w.n
    numels = problem.numels
    mem_grad = [l for l in w.memory if variables[l].source.uses_grad]
    # one summed product serves when a single gradient variable has memory
    single = len(mem_grad) == 1 and variables[mem_grad[0]].source is not Source.GRAD_SQ
    kind = "shared" if single else "copies"

    def tensor(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=dtype, device=device)

    # states before the window, by groups of batches without a graph
    q = probe.plan.graph_batches
    states = [torch.zeros_like(theta) for _ in variables]
    coef = [decay_weights(sig[:start], v.beta, m, v.source) for v in variables]
    leaves = [c.clone() for c in torch.split(theta, numels)]
    for l, v in enumerate(variables):
        if v.source is Source.PARAM:
            states[l] = float(np.sum(coef[l])) * theta
    if start > 0 and any(v.source.uses_grad for v in variables):
        for lo in range(0, m, q):
            hi = min(m, lo + q)
            if not any(np.any(coef[l][lo:hi]) for l, v in enumerate(variables)):
                continue
            g = torch.cat(problem.shared_batch_grads(leaves, slice(lo, hi)), 1)
            for l, v in enumerate(variables):
                if v.source.uses_grad and np.any(coef[l][lo:hi]):
                    c = tensor(coef[l][lo:hi])
                    if v.source is Source.GRAD_SQ:
                        states[l] += weighted_row_sum(g, g, c)
                    else:
                        states[l] += (c @ g) * (-1.0 if v.source is Source.NEG_GRAD else 1.0)
    z = [torch.zeros_like(theta) for _ in variables]  # sum_i J[G_l^i] w_{l,i}
    on_P = {l: np.zeros(m if variables[l].source.uses_grad else 1) for l in w.memory}
    P = torch.zeros_like(theta)
    matrices = device.type == "cpu" if SCAN_MATRICES is None else SCAN_MATRICES
    T = max(1, min(q, scan_rows(optimizer, w, d, dtype, matrices)))
    block = _MatrixBlock(probe, optimizer, w, T, {0: np.ones(w.K)}) if matrices else None
    for b, s0 in enumerate(range(start, n, T)):
        s1 = min(n, s0 + T)
        idx = sig[s0:s1]
        steps = np.arange(s0, s1)
        weights = {l: memory_weights(variables[l].beta, steps, n, w.tail_tol) for l in w.memory}
        index = torch.as_tensor(idx, device=device)
        graph = None
        if mem_grad and w.hvp == "double_backward":
            graph = probe.build_graph(kind, 0, s1 - s0, index)
            gathered = torch.cat([c.detach() for c in graph.grads], 1)
        else:
            gathered = torch.cat(problem.shared_batch_grads(leaves, index), 1)
        sc = w.scales[:, s0 - start : s1 - start]
        last = s1 == n
        if block is not None:
            rows = torch.arange(s1 - s0, device=device)
            F = optimizer.phi(*block.momenta(b, gathered, rows, states))
            sums, total = block.scatter(b, F, P)
            V = sums[0]  # (T, d): u_{n-s} (last block) or -P_s
        else:
            X = _block_sources(probe, optimizer, gathered, s1 - s0)
            F = optimizer.phi(*block_momenta(probe, optimizer, X, states, sc))
            F = F.expand(s1 - s0, d)
            E = torch.cumsum(F, 0).sub_(F)
            total = E[-1] + F[-1]
            V = torch.sub(total, E, out=E) if last else E.add_(P).neg_()
        for l in w.memory:
            v = variables[l]
            if not v.source.uses_grad:
                z[l] += tensor(weights[l]) @ V  # J[theta] = I
                if not last:
                    on_P[l][0] += weights[l].sum()
            elif not last:
                on_P[l] += np.bincount(idx, weights=weights[l], minlength=m)
        P += total
        if not mem_grad:
            continue
        if single:
            (l,) = mem_grad
            cot = V * tensor(weights[l])[:, None]
            hv = _products(probe, graph, index, cot, summed=True)
            z[l] += -hv if variables[l].source is Source.NEG_GRAD else hv
        else:
            hv = _products(probe, graph, index, V, summed=False)  # (T, d): H_{sigma(s)} V_s
            for l in mem_grad:
                z[l] += _tangent_sum(variables[l].source, tensor(weights[l]), gathered, hv)
        del graph
    # the P_n part: sum_i J[G_l^i] (c_{l,i} P_n), one more pass over the batches
    for l in w.memory:
        if not variables[l].source.uses_grad and np.any(on_P[l]):
            z[l] += float(on_P[l][0]) * P
    with_P = [l for l in mem_grad if np.any(on_P[l])]
    for lo in range(0, m, q):
        hi = min(m, lo + q)
        active = [l for l in with_P if np.any(on_P[l][lo:hi])]
        if not active:
            continue
        c = {l: tensor(on_P[l][lo:hi]) for l in active}
        index = torch.arange(lo, hi, device=device)
        rows = None  # the group's g_i, for J[g^2] = 2 diag(g) H
        if w.hvp == "double_backward":
            graph = probe.build_graph(kind, lo, hi)
            if not single:
                rows = torch.cat([b.detach() for b in graph.grads], 1)
        else:
            graph = None
            if not single:
                rows = torch.cat(problem.shared_batch_grads(leaves, slice(lo, hi)), 1)
        if single:
            (l,) = active
            hv = _products(probe, graph, index, c[l][:, None] * P, summed=True)
            z[l] += -hv if variables[l].source is Source.NEG_GRAD else hv
        else:
            hv = _products(probe, graph, index, P.expand(hi - lo, d), summed=False)
            for l in active:
                z[l] += _tangent_sum(variables[l].source, c[l], rows, hv)  # type: ignore[arg-type]
        del graph
    # m^(n+1): the states through step n-1, then step n itself
    b_n = w.scales[:, -1]
    g_n = None
    if any(v.source.uses_grad for v in variables):
        last_batch = slice(int(sig[n]), int(sig[n]) + 1)
        g_n = torch.cat(problem.shared_batch_grads(leaves, last_batch), 1)[0]
    m_last = step_momenta(variables, states, g_n, theta, b_n)
    tangent_args = tuple(float(b_n[l]) * z[l] for l in range(len(variables)))
    _, dphi = jvp(optimizer.phi, tuple(m_last), tangent_args)
    return optimizer.lr * dphi


def _products(
    probe: Probe, graph: BatchGraph | None, index: Tensor, V: Tensor, summed: bool
) -> Tensor:
    """``H_{index[r]} V[r]`` for rows of batches (a block of steps, or a group of batches
    with ``graph`` built on them): summed (d,) or per row (T, d). Without a graph
    (``hvp="vmap"``): forward-over-reverse per row."""
    if graph is None:
        hv = probe.native_vmapped_hvps(index, V)
        return hv.sum(0) if summed else hv
    blocks = list(torch.split(V, probe.problem.numels, dim=1))
    request = HvpRequest(lambda lo, hi: blocks, "sum" if summed else "rows")
    return probe.backward(graph, request, retain=False)


def _tangent_sum(source: Source, weights: Tensor, g: Tensor, hv: Tensor) -> Tensor:
    """``sum_r weights[r] J[G](theta) V_r`` from the rows ``hv = H V`` and ``g`` (J[g] = H,
    J[-g] = -H, J[g^2] = 2 diag(g) H)."""
    if source is Source.GRAD:
        return weights @ hv
    if source is Source.NEG_GRAD:
        return -(weights @ hv)
    return 2.0 * weighted_row_sum(g, hv, weights)


STRATEGIES: dict[str, Callable[[Probe, Optimizer, Window], Tensor]] = {
    "linear": linear,
    "fused": fused,
    "scan": scan,
    "dense": dense,
    "streamed": streamed,
    "online": online,
}


def unavailable(name: str, probe: Probe, optimizer: Optimizer, w: Window) -> str | None:
    """Why strategy ``name`` cannot compute this window (None when it can)."""
    if name == "linear" and not optimizer.linear:
        return f"{optimizer.name} is not linear in the gradients"
    if name == "fused":
        if not fused_kernel.usable(optimizer, probe.native_theta):
            return (
                "the fused kernel needs a CPU float32/float64 tensor, numba and an optimizer "
                f"whose Phi has a form it covers (sum, adam, soft_sign); got {optimizer.name} "
                f"on {probe.native_theta.device.type}, {probe.native_theta.dtype}"
            )
        if fused_kernel.buffer(w.K) > MAX_WINDOW_ELEMENTS:
            return f"a window of {w.K} steps exceeds the kernel's buffer"
    return None


def choose(probe: Probe, optimizer: Optimizer, w: Window) -> str:
    """The strategy ``window="auto"`` takes: linear where it applies, else the fused CPU
    kernel where it applies, else the torch scan. All three cost O(K d) for the window and
    hold O(m d); :func:`online` (O(L d)) is taken only when asked for."""
    if optimizer.linear:
        return "linear"
    if unavailable("fused", probe, optimizer, w) is None:
        return "fused"
    return "scan"


def needs_per_batch(optimizer: Optimizer, hvp: str) -> bool:
    """Whether Eq. (9) needs every ``H_i w_i`` apart (a squared-gradient source with memory,
    through the graph), not only their sum."""
    return hvp == "double_backward" and any(
        v.beta > 0.0 and v.source is Source.GRAD_SQ for v in optimizer.variables
    )


# -- shared pieces -------------------------------------------------------------------------
def finish(
    probe: Probe, optimizer: Optimizer, w: Window, W: list[Tensor | None], m_last: list[Tensor]
) -> Tensor:
    """``M = h dPhi(m^(n+1)) . (b_l^(n+1) z_l)_l`` with z_l = sum_i J[G_l^i] w_{l,i}."""
    z = tangents(probe, optimizer, W, w.targets, w.hvp)
    return phi_tangent(probe.native_theta, optimizer, w, z, m_last)


def phi_tangent(
    theta: Tensor, optimizer: Optimizer, w: Window, z: list[Tensor | None], m_last: list[Tensor]
) -> Tensor:
    """The end of :func:`finish`: ``h dPhi(m^(n+1)) . (b_l^(n+1) z_l)_l`` (one JVP of Phi)."""
    b_n = w.scales[:, -1]
    tangent_args = tuple(
        float(b_n[l]) * t if t is not None else torch.zeros_like(theta) for l, t in enumerate(z)
    )
    _, dphi = jvp(optimizer.phi, tuple(m_last), tangent_args)
    return optimizer.lr * dphi


def tangents(
    probe: Probe, optimizer: Optimizer, W: list[Tensor | None], targets: np.ndarray, hvp: str
) -> list[Tensor | None]:
    """``z_l = sum_i J[G_l^i](theta) w_{l,i}`` for the variables with memory: J[g] = H and
    J[-g] = -H by a summed product, J[g^2] = 2 diag(g) H by the per-batch products weighed
    by g_i, all of them in one traversal of the graphs."""
    theta = probe.native_theta
    variables = optimizer.variables
    if hvp == "vmap":  # one vmapped forward-over-reverse call
        out: list[Tensor | None] = [None] * len(W)
        grad_vars = [l for l, x in enumerate(W) if x is not None and variables[l].source.uses_grad]
        for l, x in enumerate(W):
            if x is not None and not variables[l].source.uses_grad:
                out[l] = x.sum(0)
        if not grad_vars:
            return out
        g = probe.native_grads
        active = torch.as_tensor(np.unique(targets), device=theta.device)
        index = active.repeat(len(grad_vars))
        vectors = torch.cat([W[l][active] for l in grad_vars])  # type: ignore[index]
        hv = probe.native_vmapped_hvps(index, vectors).view(len(grad_vars), len(active), -1)
        for j, l in enumerate(grad_vars):
            x = W[l]
            assert x is not None
            out[l] = variables[l].source.tangent(g[active], hv[j], x[active]).sum(0)
        return out
    out, grad_vars, requests = tangent_requests(probe.problem.numels, optimizer, W)
    return apply_tangents(out, optimizer, grad_vars, probe.native_hvps(requests))


def tangent_requests(
    numels: Sequence[int], optimizer: Optimizer, W: list[Tensor | None]
) -> tuple[list[Tensor | None], list[int], list[HvpRequest]]:
    """The first half of :func:`tangents` (``hvp="double_backward"``): the z_l of the
    variables whose source is theta (``sum_i w_{l,i}``, no product; None elsewhere), the
    variables with memory and a gradient source, and one pass of products for each."""
    variables = optimizer.variables
    out: list[Tensor | None] = [None] * len(W)
    grad_vars: list[int] = []
    requests = []
    for l, x in enumerate(W):
        if x is None:
            continue
        source = variables[l].source
        if not source.uses_grad:
            out[l] = x.sum(0)
        else:
            reduce = "own" if source is Source.GRAD_SQ else "sum"
            grad_vars.append(l)
            requests.append(HvpRequest(rows_of(x, numels), reduce))
    return out, grad_vars, requests


def apply_tangents(
    out: list[Tensor | None],
    optimizer: Optimizer,
    grad_vars: Sequence[int],
    products: Sequence[Tensor],
) -> list[Tensor | None]:
    """The second half of :func:`tangents`: the passes' results (``products``, one per
    variable of ``grad_vars``, as :func:`tangent_requests` gave them) made the z_l of their
    variables (in place)."""
    variables = optimizer.variables
    for l, hv in zip(grad_vars, products, strict=True):
        source = variables[l].source
        if source is Source.GRAD_SQ:
            out[l] = hv.mul_(2.0)
        else:
            out[l] = hv.neg_() if source is Source.NEG_GRAD else hv
    return out


def state_rows(
    optimizer: Optimizer,
    sources: list[Tensor],
    sig: np.ndarray,
    s0: int,
    s1: int,
    before: list[Tensor],
) -> list[Tensor]:
    """``S_l^(s+1)`` for s = s0..s1-1 (rows), from the state ``before`` step s0."""
    rows = []
    for v, G, S in zip(optimizer.variables, sources, before, strict=True):
        idx = torch.as_tensor(sig[s0:s1] if v.source.uses_grad else np.zeros(s1 - s0, int))
        gathered = G[idx.to(G.device)]  # (rows, d)
        if v.beta == 0.0:
            rows.append(gathered)
            continue
        out = torch.empty_like(gathered)
        prev = S
        for r in range(s1 - s0):
            torch.add(gathered[r], prev, alpha=v.beta, out=out[r])
            prev = out[r]
        rows.append(out)
    return rows


def _rows(tensor: Callable[[np.ndarray], Tensor], coef: np.ndarray, G: Tensor) -> Tensor:
    """``coef @ G``; a single source row with a constant coefficient stays one broadcast row."""
    if G.shape[0] == 1 and np.all(coef == coef[0, 0]):
        return float(coef[0, 0]) * G
    return tensor(coef) @ G

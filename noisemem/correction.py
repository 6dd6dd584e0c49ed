"""The memory correction M^(n) of Eq. (9), computed with the grouping of THEORY §3.

Eq. (9), for step n of a fixed batch sequence sigma, every history slot set to theta:

    M^(n)(theta) = h * sum_{k=1..n} dF^(n)/dtheta^(n-k)(theta) . u_k,
    u_k = sum_{s=n-k..n-1} F^(s)(theta).

With momentum variables (THEORY §2),
``dF^(n)/dtheta^(n-k) . u = sum_l dPhi/dm_l . b_l^(n+1) beta_l^k J[G_l^{sigma(n-k)}] u``, and
since ``J[G_l^i]`` only depends on the batch i, the k's are grouped by the batch they point to:

    w_{l,i} = sum_{k: sigma(n-k)=i} beta_l^k u_k,
    M^(n)   = h * sum_l dPhi/dm_l(m^(n+1)) . b_l^(n+1) sum_i J[G_l^i](theta) w_{l,i}.

Cost: the batch gradients g_i (one vmapped call, graph kept); the momentum rows of the
window of steps (matrix products of float64 coefficients with the stacked sources, or an
O(d) recurrence per step when there are many distinct batches); Phi and the suffix sums,
vectorised; then at most one Hessian-vector product per distinct batch and momentum variable,
all of a variable's in one backward pass through the gradients' graph (each batch has its own
copy of theta, so the H_i w_{l,i} come out separately; for heavy ball this is
``grad_theta sum_i <g_i, w_i>``); and one JVP of Phi. Optimizers linear in the g's reduce to
scalar coefficients and a single summed HVP.

On a CPU the window (momentum rows, Phi, suffix sums and scatter) is evaluated by the fused
kernel of :mod:`noisemem.fused`, one pass per block of coordinates, for the optimizers it
covers; elsewhere (GPU, other dtypes) in torch: coefficient matrices times the stacked sources
for up to ``DENSE_MAX_BATCHES`` batches, an O(d) recurrence per step beyond. All three give
the same ``w_{l,i}`` (same truncation) and are tested against the literal Eq. (9).

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
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jvp

from noisemem import fused
from noisemem.optim import OPTIMIZERS, Optimizer, Source
from noisemem.problem import Batch, LossFn, Problem, as_problem, sequence_array

#: default relative bound on the dropped memory tail (see the module docstring)
TAIL_TOL = 1e-12
#: at most this many numbers (window rows x d, summed over variables) are held at once
MAX_WINDOW_ELEMENTS = 1 << 26
#: up to this many batches, the torch window (used where the fused CPU kernel is not) takes
#: momentum rows as coefficient matrices times the stacked sources; beyond, a recurrence
DENSE_MAX_BATCHES = 256
#: on CPU, evaluate the window with the fused kernel of :mod:`noisemem.fused` where it applies
FUSED = True
#: how Hessian-vector products are taken (see :func:`memory_correction`)
HVP_MODES = ("auto", "vmap", "double_backward")


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


def require_optimizer(optimizer: object) -> None:
    """``optimizer`` must be one of :mod:`noisemem.optim`'s descriptions."""
    if not isinstance(optimizer, Optimizer):
        raise ValueError(
            f"optimizer={optimizer!r} is not allowed; use one of noisemem.optim's "
            f"{', '.join(OPTIMIZERS)} (a torch.optim object does not describe its memory)"
        )


def require_smooth(optimizer: Optimizer) -> None:
    require_optimizer(optimizer)
    if not optimizer.smooth:
        raise ValueError(
            f"optimizer: {optimizer!r} is not differentiable, so Eq. (9) is undefined; "
            "for Lion use eps > 0 (the soft sign K = ||x||_{1,eps})"
        )


def check_correction_args(optimizer: Optimizer, tail_tol: float, hvp: str) -> None:
    """The arguments of Eq. (9) other than the sequence, checked before any work."""
    require_smooth(optimizer)
    ok = isinstance(tail_tol, int | float) and not isinstance(tail_tol, bool)
    if not (ok and 0 <= tail_tol < 1):
        raise ValueError(f"tail_tol={tail_tol!r} is not allowed; tail_tol must lie in [0, 1)")
    if hvp not in HVP_MODES:
        raise ValueError(f"hvp={hvp!r} is not allowed; use one of {HVP_MODES}")


class Probe:
    """Everything Eq. (9) needs at one point theta, computed once and shared by sequences.

    ``grads`` holds ``g_i(theta)`` for every batch (``(m, d)``); it is what the Monte Carlo
    estimators reuse across permutations. They are computed with their autograd graph kept
    (``keep_graph``), so that ``sum_i H_i w_i`` is then one backward pass through that graph
    (:meth:`summed_hvp`) instead of a second forward and backward.

    Inside, every flat vector is in the native order of the problem's gradients
    (:class:`~noisemem.problem.GradLayout`: no transposed copies in the graph); every public
    method takes and returns ``parameters_to_vector`` order. The engine's computations are
    coordinatewise or linear, so they are the same in either order.
    """

    def __init__(
        self, problem: Problem, theta: Tensor | None = None, *, keep_graph: bool = True
    ) -> None:
        self.problem = problem
        self.theta = (problem.theta if theta is None else theta).detach()
        self.keep_graph = keep_graph
        self.layout = problem.layout
        self._th = self.layout.to_native(self.theta)  # theta in the native order
        self._chunks: list[Tensor] | None = None
        self._grads: Tensor | None = None
        # (one leaf per parameter, their per-batch copies, the batch gradients of each
        # parameter with their graph), native order
        self._graph: tuple[list[Tensor], list[Tensor], list[Tensor]] | None = None
        self._g: Tensor | None = None
        self._hg: Tensor | None = None
        self._moments: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def _grad_chunks(self) -> list[Tensor]:
        """The batch gradients, one ``(m, numel)`` block per parameter (native order)."""
        if self._chunks is None:
            if self.keep_graph:
                # one copy of theta per batch (expanded views of one leaf per parameter):
                # G_i depends on its own copy only, so a backward pass with cotangents W
                # returns every H_i W[i] separately at the copies, and their sum at the
                # leaves (summed per parameter inside autograd: no (m, d) result)
                m = self.problem.num_batches
                leaves = [
                    c.clone().requires_grad_(True)
                    for c in torch.split(self._th, self.problem.numels)
                ]
                with torch.enable_grad():
                    copies = [leaf.expand(m, -1) for leaf in leaves]
                G = self.problem.batch_grads_at(copies)
                self._graph = (leaves, copies, G)
                self._chunks = [c.detach() for c in G]
            else:
                G = self.layout.to_native(self.problem.batch_grads(self.theta))
                self._chunks = list(torch.split(G, self.problem.numels, dim=1))
        return self._chunks

    @property
    def native_grads(self) -> Tensor:
        """``g_i(theta)`` for every batch, ``(m, d)``, in the native order (built once)."""
        if self._grads is None:
            self._grads = torch.cat(self._grad_chunks, 1)
        return self._grads

    @property
    def grads(self) -> Tensor:
        """``g_i(theta)`` for every batch i: ``(m, d)``."""
        return self.layout.to_standard(self.native_grads)

    def _hvp(self, W: Tensor | Sequence[Tensor], summed: bool) -> Tensor:
        """``H_i W[i]`` (or their sum over i), all in the native order; ``W`` is ``(m, d)``
        or one ``(m, numel)`` block per parameter."""
        self._grad_chunks  # noqa: B018 - builds the graph
        if self._graph is None:
            index = torch.arange(self.problem.num_batches, device=self.theta.device)
            flat = W if isinstance(W, Tensor) else torch.cat(list(W), 1)
            out = self._vmapped_hvps(index, flat)
            return out.sum(0) if summed else out
        blocks = torch.split(W, self.problem.numels, dim=1) if isinstance(W, Tensor) else W
        leaves, copies, G = self._graph
        inputs = leaves if summed else copies
        # a parameter the loss does not use has a constant zero gradient, outside the graph
        pairs = [(g, b) for g, b in zip(G, blocks, strict=True) if g.requires_grad]
        out = torch.autograd.grad(
            [g for g, _ in pairs],
            inputs,
            [b for _, b in pairs],
            retain_graph=True,
            allow_unused=True,
        )
        parts = [torch.zeros_like(t) if o is None else o for o, t in zip(out, inputs, strict=True)]
        return torch.cat(parts) if summed else torch.cat(parts, 1)

    def _vmapped_hvps(self, index: Tensor, vectors: Tensor) -> Tensor:
        """``H_{index[p]} vectors[p]`` by one vmapped forward-over-reverse call (no graph),
        native order in and out (the call itself works in the standard order)."""
        std = self.layout.to_standard(vectors)
        return self.layout.to_native(self.problem.batch_hvps(self.theta, index, std))

    def batch_hvps(self, W: Tensor) -> Tensor:
        """``H_i(theta) W[i]`` for every batch i (``W`` and the result are ``(m, d)``)."""
        return self.layout.to_standard(self._hvp(self.layout.to_native(W), summed=False))

    def summed_hvp(self, W: Tensor) -> Tensor:
        """``sum_i H_i(theta) W[i]`` over every batch i (``W`` is ``(m, d)``): one backward
        pass, summed at the leaf (no ``(m, d)`` result)."""
        return self.layout.to_standard(self._hvp(self.layout.to_native(W), summed=True))

    # -- full-loss quantities at theta, from the same graph (L = mean_i L_i) -------------
    def _full_grad(self) -> Tensor:
        if self._g is None:
            self._g = torch.cat([c.mean(0) for c in self._grad_chunks])
        return self._g

    def _full_hvp(self, v: Tensor) -> Tensor:
        """``H v = mean_i H_i v`` (native order): one backward pass with the cotangent an
        expanded view of v (the 1/m is applied to the result)."""
        m = self.problem.num_batches
        blocks = [c.expand(m, -1) for c in torch.split(v, self.problem.numels)]
        return self._hvp(blocks, summed=True) / m

    def _hessian_gradient(self) -> Tensor:
        if self._hg is None:
            self._hg = self._full_hvp(self._full_grad())
        return self._hg

    def full_grad(self) -> Tensor:
        """``g = grad L = mean_i g_i``."""
        return self.layout.to_standard(self._full_grad())

    def full_hvp(self, v: Tensor) -> Tensor:
        """``H v = mean_i H_i v``: one backward pass."""
        return self.layout.to_standard(self._full_hvp(self.layout.to_native(v)))

    def hessian_gradient(self) -> Tensor:
        """``H g``: one backward pass, computed once (shared with :meth:`hessian_moments`)."""
        return self.layout.to_standard(self._hessian_gradient())

    def hessian_moments(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(g, H g, Cov)`` with g = mean_i g_i and Cov = mean_i H_i g_i - H g (THEORY §4),
        from two backward passes through the batch gradients' graph; computed once per
        probe (H g alone, for the full-batch predictions, costs one pass)."""
        if self._moments is None:
            Hg = self._hessian_gradient()
            cov = self._hvp(self._grad_chunks, summed=True) / self.problem.num_batches - Hg
            self._moments = (
                self.full_grad(),
                self.hessian_gradient(),
                self.layout.to_standard(cov),
            )
        return self._moments

    def _sources(self, optimizer: Optimizer) -> list[Tensor]:
        """``G_l^i(theta)`` per variable: ``(m, d)``, or ``(1, d)`` for the PARAM source."""
        out = []
        for v in optimizer.variables:
            if v.source is Source.PARAM:
                out.append(self._th.unsqueeze(0))
            else:
                out.append(v.source.value(self.native_grads, self._th))
        return out

    # -- F^(n)(theta, ..., theta) -------------------------------------------------------
    def _momenta(self, optimizer: Optimizer, sequence: Sequence[int]) -> list[Tensor]:
        sig = np.asarray(sequence, dtype=np.int64)
        n = sig.size - 1
        b = optimizer.scales(np.array([float(n)]))[:, 0]
        out = []
        for v, G, b_l in zip(optimizer.variables, self._sources(optimizer), b, strict=True):
            c = _decay_weights(sig, v.beta, G.shape[0], v.source)
            out.append(float(b_l) * (torch.as_tensor(c, dtype=G.dtype, device=G.device) @ G))
        return out

    def momenta(self, optimizer: Optimizer, sequence: Sequence[int]) -> list[Tensor]:
        """``m_l^(n+1)`` with every history slot at theta (n = len(sequence) - 1)."""
        require_optimizer(optimizer)
        sig = sequence_array(sequence, self.problem.num_batches)
        return [self.layout.to_standard(m) for m in self._momenta(optimizer, sig)]

    def direction(self, optimizer: Optimizer, sequence: Sequence[int]) -> Tensor:
        """``F^(n)(theta, ..., theta)``: the first-order memoryless direction of (4)."""
        require_optimizer(optimizer)
        sig = sequence_array(sequence, self.problem.num_batches)
        return self.layout.to_standard(optimizer.phi(*self._momenta(optimizer, sig)))

    # -- Eq. (9) ------------------------------------------------------------------------
    def memory_correction(
        self,
        optimizer: Optimizer,
        sequence: Sequence[int],
        *,
        tail_tol: float = TAIL_TOL,
        hvp: str = "auto",
    ) -> Tensor:
        """``M^(n)(theta)`` of Eq. (9) for ``sequence`` (n = len(sequence) - 1)."""
        check_correction_args(optimizer, tail_tol, hvp)
        sig = sequence_array(sequence, self.problem.num_batches)
        return self.layout.to_standard(self._correction(optimizer, sig, tail_tol, hvp))

    def _correction(
        self, optimizer: Optimizer, sequence: Sequence[int], tail_tol: float, hvp: str
    ) -> Tensor:
        """:meth:`memory_correction` in the native order."""
        sig = np.asarray(sequence, dtype=np.int64)
        n = sig.size - 1
        theta = self._th
        variables = optimizer.variables
        memory = [l for l, v in enumerate(variables) if v.beta > 0.0]
        if n == 0 or not memory:
            return torch.zeros_like(theta)
        K = truncation_horizon(max(variables[l].beta for l in memory), tail_tol, n)
        start = n - K  # window of steps s = start..n-1 (k = n - s = K..1), plus s = n
        scales = optimizer.scales(np.arange(start, n + 1, dtype=np.float64))  # (L, K+1)
        m = self.problem.num_batches
        if optimizer.linear and hvp != "vmap" and K * m * m <= MAX_WINDOW_ELEMENTS:
            return self._linear_correction(optimizer, sig, start, scales)
        if FUSED and fused.usable(optimizer, theta) and fused.buffer(K) <= MAX_WINDOW_ELEMENTS:
            return self._fused_correction(optimizer, sig, start, scales, memory, hvp, tail_tol)
        if m <= DENSE_MAX_BATCHES:
            return self._dense_correction(optimizer, sig, start, scales, memory, hvp, tail_tol)
        return self._streamed_correction(optimizer, sig, start, scales, memory, hvp, tail_tol)

    def _dense_correction(
        self,
        optimizer: Optimizer,
        sig: np.ndarray,
        start: int,
        scales: np.ndarray,
        memory: list[int],
        hvp: str,
        tail_tol: float,
    ) -> Tensor:
        """Eq. (9) in torch when there are few distinct batches (m <= DENSE_MAX_BATCHES).

        Every momentum row is a coefficient row times the stacked sources,
        ``m_l^(s+1) = b_l^(s+1) C_l[s] @ G_l`` (C_l a first-order filter over the one-hot
        batch indicators, float64 numpy), and ``w_l = B_l @ F`` with
        ``B_l[i, s] = sum_{s' <= s, sigma(s') = i} beta_l^(n-s')`` (the suffix sums u_k folded
        into the scatter): matrix products instead of a loop over steps.
        """
        theta = self._th
        n = sig.size - 1
        K = n - start
        variables = optimizer.variables
        sources = self._sources(optimizer)
        dtype, device = theta.dtype, theta.device

        def tensor(a: np.ndarray) -> Tensor:
            return torch.as_tensor(a, dtype=dtype, device=device)

        coef: list[np.ndarray] = []  # (K+1, rows_l): row r is step s = start + r, scaled
        gather: list[np.ndarray] = []  # which row of G_l step s uses
        for l, v in enumerate(variables):
            rows = sources[l].shape[0]
            target = sig[start:] if v.source.uses_grad else np.zeros(K + 1, dtype=np.int64)
            onehot = np.zeros((K + 1, rows))
            onehot[np.arange(K + 1), target] = 1.0
            c0 = _decay_weights(sig[:start], v.beta, rows, v.source)
            C = decay_filter(onehot, v.beta, c0)
            coef.append(scales[l][:, None] * C)
            gather.append(target)
        B, first = {}, {}
        steps = np.arange(start, n)
        for l in memory:
            # each variable's own horizon: its terms with k > K_l are dropped (same bound)
            first[l] = K - truncation_horizon(variables[l].beta, tail_tol, n)
            E = np.zeros((K, sources[l].shape[0]))
            E[np.arange(K), gather[l][:K]] = memory_weights(variables[l].beta, steps, n, tail_tol)
            B[l] = np.cumsum(E, axis=0).T  # (rows_l, K); columns before first[l] are zero
        W: list[Tensor | None] = [None] * len(variables)
        for l in memory:
            W[l] = torch.zeros_like(sources[l])
        rows_per_block = max(1, MAX_WINDOW_ELEMENTS // (len(variables) * theta.numel()))
        for r0 in range(0, K, rows_per_block):
            r1 = min(K, r0 + rows_per_block)
            F = optimizer.phi(
                *(_rows(tensor, c[r0:r1], G) for c, G in zip(coef, sources, strict=True))
            ).expand(r1 - r0, -1)  # every row may have been a broadcast single row
            for l in memory:
                lo = max(r0, first[l])
                if lo < r1:
                    W[l] += tensor(B[l][:, lo:r1]) @ F[lo - r0 :]
        m_last = [tensor(c[K]) @ G for c, G in zip(coef, sources, strict=True)]
        return self._finish(optimizer, W, sig[start:n], scales[:, -1], m_last, hvp)

    def _fused_correction(
        self,
        optimizer: Optimizer,
        sig: np.ndarray,
        start: int,
        scales: np.ndarray,
        memory: list[int],
        hvp: str,
        tail_tol: float,
    ) -> Tensor:
        """Eq. (9) on the CPU with the window in one fused pass (:mod:`noisemem.fused`):
        the same ``w_l = B_l @ F`` as :meth:`_dense_correction`, without the (K, d) arrays."""
        n = sig.size - 1
        variables = optimizer.variables
        before = self._initial_states(optimizer, self._sources(optimizer), sig, start)
        steps = np.arange(start, n)
        states = {l: before[l] for l in memory}
        weights = {l: memory_weights(variables[l].beta, steps, n, tail_tol) for l in memory}
        w = fused.window(
            optimizer, self.native_grads, self._th, sig[start:n], states, scales, weights
        )
        W: list[Tensor | None] = [w.get(l) for l in range(len(variables))]
        return self._finish(
            optimizer, W, sig[start:n], scales[:, -1], self._momenta(optimizer, sig), hvp
        )

    def _finish(
        self,
        optimizer: Optimizer,
        W: list[Tensor | None],
        window: np.ndarray,
        b_n: np.ndarray,
        m_last: list[Tensor],
        hvp: str,
    ) -> Tensor:
        """``M = h dPhi(m^(n+1)) . (b_l^(n+1) z_l)_l`` with z_l = sum_i J[G_l^i] w_{l,i}."""
        theta = self._th
        tangents = self._tangents(optimizer, W, window, hvp)
        tangent_args = tuple(
            float(b_n[l]) * t if t is not None else torch.zeros_like(theta)
            for l, t in enumerate(tangents)
        )
        _, dphi = jvp(optimizer.phi, tuple(m_last), tangent_args)
        return optimizer.lr * dphi

    def _streamed_correction(
        self,
        optimizer: Optimizer,
        sig: np.ndarray,
        start: int,
        scales: np.ndarray,
        memory: list[int],
        hvp: str,
        tail_tol: float,
    ) -> Tensor:
        """Eq. (9) for many distinct batches: an O(d) recurrence per step and variable,
        streamed in blocks of steps (forward for the states, backward for the suffix sums)."""
        theta = self._th
        n = sig.size - 1
        variables = optimizer.variables
        sources = self._sources(optimizer)
        W = [torch.zeros_like(G) if l in memory else None for l, G in enumerate(sources)]
        suffix = torch.zeros_like(theta)  # sum of F^(s) over the rows already processed
        m_last: list[Tensor] | None = None
        rows_per_block = max(1, MAX_WINDOW_ELEMENTS // (len(variables) * theta.numel()))
        bounds = [*range(start, n + 1, rows_per_block), n + 1]
        blocks = list(itertools.pairwise(bounds))
        # forward pass: the state S_l before each block (one d-vector each)
        states = [self._initial_states(optimizer, sources, sig, start)]
        cached: list[Tensor] | None = None
        for s0, s1 in blocks:
            rows = self._state_rows(optimizer, sources, sig, s0, s1, states[-1])
            states.append([r[-1] for r in rows])
            cached = rows
        # backward pass over the blocks: F rows, suffix sums u_k, scatter into w_{l,i}
        for b_idx in range(len(blocks) - 1, -1, -1):
            s0, s1 = blocks[b_idx]
            rows = (
                cached
                if b_idx == len(blocks) - 1
                else self._state_rows(optimizer, sources, sig, s0, s1, states[b_idx])
            )
            sc = scales[:, s0 - start : s1 - start]
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
            for l in memory:
                v = variables[l]
                weights = torch.as_tensor(
                    memory_weights(v.beta, s_idx, n, tail_tol),
                    dtype=theta.dtype,
                    device=theta.device,
                )
                target = sig[s0:s1] if v.source.uses_grad else np.zeros(s1 - s0, dtype=np.int64)
                W[l].index_add_(
                    0, torch.as_tensor(target, device=theta.device), weights[:, None] * U
                )
        assert m_last is not None
        return self._finish(optimizer, W, sig[start:n], scales[:, -1], m_last, hvp)

    def _linear_correction(
        self, optimizer: Optimizer, sig: np.ndarray, start: int, scales: np.ndarray
    ) -> Tensor:
        """Eq. (9) for optimizers linear in the g's (Phi = sum_l m_l, every source g).

        Then F^(s) = sum_i f[s, i] g_i, u_k = sum_i U[k, i] g_i and w_{l,i} = sum_j A_l[i, j] g_j
        with scalar coefficients (float64, numpy): the momentum sums are a first-order filter
        over the one-hot batch indicators, u_k a suffix sum, w_{l,i} a scatter. So
        M^(n) = h sum_i H_i W_i with W = (sum_l b_l^(n+1) A_l) @ G: one summed HVP.
        """
        m = self.problem.num_batches
        n = sig.size - 1
        K = n - start
        onehot = np.zeros((K, m))
        onehot[np.arange(K), sig[start:n]] = 1.0  # step s = start + r uses batch sig[s]
        f = np.zeros((K, m))  # F^(s) = sum_i f[r, i] g_i
        for l, v in enumerate(optimizer.variables):
            c0 = _decay_weights(sig[:start], v.beta, m, v.source)
            C = decay_filter(onehot, v.beta, c0)
            f += scales[l, :K, None] * C
        U = np.cumsum(f[::-1], axis=0)[::-1]  # U[r] = coefficients of u_k, k = n - start - r
        A = np.zeros((m, m))
        k = n - np.arange(start, n)
        for l, v in enumerate(optimizer.variables):
            if v.beta > 0.0:
                weights = v.beta ** k.astype(np.float64)  # beta_l^k for the step of row r
                A += scales[l, K] * (onehot.T @ (weights[:, None] * U))
        G = self.native_grads
        W = torch.as_tensor(A, dtype=G.dtype, device=G.device) @ G  # (m, d)
        return optimizer.lr * self._hvp(W, summed=True)

    def _initial_states(
        self, optimizer: Optimizer, sources: list[Tensor], sig: np.ndarray, start: int
    ) -> list[Tensor]:
        """``S_l`` after steps 0..start-1: sum_{j<start} beta_l^(start-1-j) G_l^{sigma(j)}."""
        out = []
        for v, G in zip(optimizer.variables, sources, strict=True):
            c = _decay_weights(sig[:start], v.beta, G.shape[0], v.source)
            out.append(torch.as_tensor(c, dtype=G.dtype, device=G.device) @ G)
        return out

    @staticmethod
    def _state_rows(
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

    def _tangents(
        self, optimizer: Optimizer, W: list[Tensor | None], window: np.ndarray, hvp: str
    ) -> list[Tensor | None]:
        """``z_l = sum_i J[G_l^i](theta) w_{l,i}`` for the variables with memory."""
        theta = self._th
        active = torch.as_tensor(np.unique(window), device=theta.device)
        out: list[Tensor | None] = [None] * len(W)
        grad_vars = [
            l for l, w in enumerate(W) if w is not None and optimizer.variables[l].source.uses_grad
        ]
        for l, w in enumerate(W):
            if w is not None and not optimizer.variables[l].source.uses_grad:
                out[l] = w.sum(0)
        if not grad_vars:
            return out
        g = self.native_grads
        if hvp == "vmap" or not self.keep_graph:  # one vmapped forward-over-reverse call
            index = active.repeat(len(grad_vars))
            vectors = torch.cat([W[l][active] for l in grad_vars])  # type: ignore[index]
            hv = self._vmapped_hvps(index, vectors).view(len(grad_vars), len(active), -1)
            for j, l in enumerate(grad_vars):
                w = W[l]
                assert w is not None
                source = optimizer.variables[l].source
                out[l] = source.tangent(g[active], hv[j], w[active]).sum(0)
            return out
        for l in grad_vars:  # one backward through the batch gradients' graph per variable
            w = W[l]
            assert w is not None
            out[l] = optimizer.variables[l].source.tangent(g, self._hvp(w, summed=False), w).sum(0)
        return out


def _rows(tensor: Callable[[np.ndarray], Tensor], coef: np.ndarray, G: Tensor) -> Tensor:
    """``coef @ G``; a single source row with a constant coefficient stays one broadcast row."""
    if G.shape[0] == 1 and np.all(coef == coef[0, 0]):
        return float(coef[0, 0]) * G
    return tensor(coef) @ G


def _decay_weights(sig: np.ndarray, beta: float, num_rows: int, source: Source) -> np.ndarray:
    """``c[i] = sum_{j: sigma(j)=i} beta^(len-1-j)`` (one row for the PARAM source)."""
    if sig.size == 0:
        return np.zeros(num_rows)
    powers = beta ** np.arange(sig.size - 1, -1, -1, dtype=np.float64)
    if not source.uses_grad:
        return np.array([powers.sum()])
    return np.bincount(sig, weights=powers, minlength=num_rows)


def memory_correction(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    optimizer: Optimizer,
    sequence: Sequence[int],
    *,
    tail_tol: float = TAIL_TOL,
    hvp: str = "auto",
) -> Tensor:
    """Eq. (9): ``M^(n)`` at the model's current parameters, n = len(sequence) - 1.

    ``sequence[j]`` is the index of the batch used at iteration j (any length: several
    epochs, repeated batches). Returns a flat ``(d,)`` tensor in
    ``parameters_to_vector(model.parameters())`` order, on the parameters' device and dtype.
    ``hvp`` picks how the Hessian-vector products are taken: ``"auto"`` (the default) and
    ``"double_backward"``, one backward pass per momentum variable through the graph of
    the batch gradients, each batch holding its own copy of theta so that every ``H_i w_i``
    comes out separately; or ``"vmap"``, one vmapped forward-over-reverse call over every
    (batch, variable) pair. Every argument is checked before any work starts.
    """
    check_correction_args(optimizer, tail_tol, hvp)
    problem = as_problem(model, loss_fn, batches)
    seq = sequence_array(sequence, problem.num_batches)
    return Probe(problem).memory_correction(optimizer, seq, tail_tol=tail_tol, hvp=hvp)

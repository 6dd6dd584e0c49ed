"""The window of Eq. (9): four ways to compute the same grouped sum (THEORY §3).

For step n of a batch sequence sigma, with ``u_k = sum_{s=n-k..n-1} F^(s)(theta)``,

    w_{l,i} = sum_{k: sigma(n-k)=i} beta_l^k u_k,
    M^(n)   = h * sum_l dPhi/dm_l(m^(n+1)) . b_l^(n+1) sum_i J[G_l^i](theta) w_{l,i}.

The window is the steps ``s = start..n-1`` whose memory is kept (:class:`Window`, cut by the
tail tolerance of :mod:`noisemem.memory`). Each strategy below is a plain function of a
:class:`~noisemem.probe.Probe`, an optimizer and a window, and returns ``M^(n)`` in the
probe's native order; they give the same numbers (same truncation) and each is tested
against the literal Eq. (9):

* :func:`linear`: optimizers linear in the gradients (``Phi = sum_l m_l``, GRAD sources).
  F^(s), u_k and w_{l,i} are scalar combinations of the g_i, so ``M = h sum_i H_i W_i`` with
  ``W = A @ G``: float64 coefficients and one summed Hessian-vector product.
* :func:`fused`: the CPU kernel of :mod:`noisemem.fused` (momentum rows, Phi, suffix sums
  and scatter in one pass per block of coordinates), for optimizers whose Phi has a
  :class:`~noisemem.optim.Form`.
* :func:`dense`: torch, momentum rows as coefficient matrices times the stacked sources
  (few distinct batches).
* :func:`streamed`: torch, an O(d) recurrence per step, streamed in blocks of steps (many
  distinct batches).

The three non-linear strategies end alike (:func:`finish`): at most one Hessian-vector
product per distinct batch and momentum variable, all of a variable's in one backward pass
through the gradients' graph (``hvp="double_backward"``) or one vmapped forward-over-reverse
call (``hvp="vmap"``), then one JVP of Phi.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.func import jvp

from noisemem import fused as fused_kernel
from noisemem.memory import decay_filter, decay_weights, memory_weights, truncation_horizon
from noisemem.optim import Optimizer

if TYPE_CHECKING:
    from noisemem.probe import Probe

#: at most this many numbers (window rows x d, summed over variables) are held at once
MAX_WINDOW_ELEMENTS = 1 << 26
#: up to this many batches, ``"auto"`` takes :func:`dense` where the fused kernel does not
#: apply; beyond, :func:`streamed`
DENSE_MAX_BATCHES = 256


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


# -- the strategies ------------------------------------------------------------------------
def linear(probe: Probe, optimizer: Optimizer, w: Window) -> Tensor:
    """Eq. (9) for optimizers linear in the g's (Phi = sum_l m_l, every source g).

    Then F^(s) = sum_i f[s, i] g_i, u_k = sum_i U[k, i] g_i and w_{l,i} = sum_j A_l[i, j] g_j
    with scalar coefficients (float64, numpy): the momentum sums are a first-order filter
    over the one-hot batch indicators, u_k a suffix sum, w_{l,i} a scatter. So
    M^(n) = h sum_i H_i W_i with W = (sum_l b_l^(n+1) A_l) @ G: one summed HVP.
    """
    m = probe.problem.num_batches
    sig, start, n, K, scales = w.sequence, w.start, w.n, w.K, w.scales
    onehot = np.zeros((K, m))
    onehot[np.arange(K), w.targets] = 1.0  # step s = start + r uses batch sig[s]
    f = np.zeros((K, m))  # F^(s) = sum_i f[r, i] g_i
    for l, v in enumerate(optimizer.variables):
        c0 = decay_weights(sig[:start], v.beta, m, v.source)
        C = decay_filter(onehot, v.beta, c0)
        f += scales[l, :K, None] * C
    U = np.cumsum(f[::-1], axis=0)[::-1]  # U[r] = coefficients of u_k, k = n - start - r
    A = np.zeros((m, m))
    k = n - np.arange(start, n)
    for l, v in enumerate(optimizer.variables):
        if v.beta > 0.0:
            weights = v.beta ** k.astype(np.float64)  # beta_l^k for the step of row r
            A += scales[l, K] * (onehot.T @ (weights[:, None] * U))
    G = probe.native_grads
    W = torch.as_tensor(A, dtype=G.dtype, device=G.device) @ G  # (m, d)
    if w.hvp == "vmap":
        index = torch.arange(m, device=G.device)
        return optimizer.lr * probe.native_vmapped_hvps(index, W).sum(0)
    return optimizer.lr * probe.native_hvp(W, summed=True)


def fused(probe: Probe, optimizer: Optimizer, w: Window) -> Tensor:
    """Eq. (9) on the CPU with the window in one fused pass (:mod:`noisemem.fused`): the
    same ``w_l = B_l @ F`` as :func:`dense`, without the (K, d) arrays."""
    variables = optimizer.variables
    before = initial_states(optimizer, probe.native_sources(optimizer), w.sequence, w.start)
    steps = np.arange(w.start, w.n)
    states = {l: before[l] for l in w.memory}
    weights = {l: memory_weights(variables[l].beta, steps, w.n, w.tail_tol) for l in w.memory}
    out = fused_kernel.window(
        optimizer, probe.native_grads, probe.native_theta, w.targets, states, w.scales, weights
    )
    W: list[Tensor | None] = [out.get(l) for l in range(len(variables))]
    return finish(probe, optimizer, w, W, probe.native_momenta(optimizer, w.sequence))


def dense(probe: Probe, optimizer: Optimizer, w: Window) -> Tensor:
    """Eq. (9) in torch when there are few distinct batches.

    Every momentum row is a coefficient row times the stacked sources,
    ``m_l^(s+1) = b_l^(s+1) C_l[s] @ G_l`` (C_l a first-order filter over the one-hot
    batch indicators, float64 numpy), and ``w_l = B_l @ F`` with
    ``B_l[i, s] = sum_{s' <= s, sigma(s') = i} beta_l^(n-s')`` (the suffix sums u_k folded
    into the scatter): matrix products instead of a loop over steps.
    """
    theta = probe.native_theta
    sig, start, n, K = w.sequence, w.start, w.n, w.K
    variables = optimizer.variables
    sources = probe.native_sources(optimizer)
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
        c0 = decay_weights(sig[:start], v.beta, rows, v.source)
        C = decay_filter(onehot, v.beta, c0)
        coef.append(w.scales[l][:, None] * C)
        gather.append(target)
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
    """Eq. (9) for many distinct batches: an O(d) recurrence per step and variable,
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
    states = [initial_states(optimizer, sources, sig, start)]
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


STRATEGIES: dict[str, Callable[[Probe, Optimizer, Window], Tensor]] = {
    "linear": linear,
    "fused": fused,
    "dense": dense,
    "streamed": streamed,
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
    """The strategy ``window="auto"`` takes: linear where it applies (and the HVPs go through
    the graph), else the fused CPU kernel, else dense for up to ``DENSE_MAX_BATCHES``
    batches, else streamed."""
    m = probe.problem.num_batches
    if optimizer.linear and w.hvp != "vmap" and w.K * m * m <= MAX_WINDOW_ELEMENTS:
        return "linear"
    if unavailable("fused", probe, optimizer, w) is None:
        return "fused"
    return "dense" if m <= DENSE_MAX_BATCHES else "streamed"


# -- shared pieces -------------------------------------------------------------------------
def finish(
    probe: Probe, optimizer: Optimizer, w: Window, W: list[Tensor | None], m_last: list[Tensor]
) -> Tensor:
    """``M = h dPhi(m^(n+1)) . (b_l^(n+1) z_l)_l`` with z_l = sum_i J[G_l^i] w_{l,i}."""
    theta = probe.native_theta
    b_n = w.scales[:, -1]
    z = tangents(probe, optimizer, W, w.targets, w.hvp)
    tangent_args = tuple(
        float(b_n[l]) * t if t is not None else torch.zeros_like(theta) for l, t in enumerate(z)
    )
    _, dphi = jvp(optimizer.phi, tuple(m_last), tangent_args)
    return optimizer.lr * dphi


def tangents(
    probe: Probe, optimizer: Optimizer, W: list[Tensor | None], targets: np.ndarray, hvp: str
) -> list[Tensor | None]:
    """``z_l = sum_i J[G_l^i](theta) w_{l,i}`` for the variables with memory."""
    theta = probe.native_theta
    variables = optimizer.variables
    active = torch.as_tensor(np.unique(targets), device=theta.device)
    out: list[Tensor | None] = [None] * len(W)
    grad_vars = [l for l, x in enumerate(W) if x is not None and variables[l].source.uses_grad]
    for l, x in enumerate(W):
        if x is not None and not variables[l].source.uses_grad:
            out[l] = x.sum(0)
    if not grad_vars:
        return out
    g = probe.native_grads
    if hvp == "vmap":  # one vmapped forward-over-reverse call
        index = active.repeat(len(grad_vars))
        vectors = torch.cat([W[l][active] for l in grad_vars])  # type: ignore[index]
        hv = probe.native_vmapped_hvps(index, vectors).view(len(grad_vars), len(active), -1)
        for j, l in enumerate(grad_vars):
            x = W[l]
            assert x is not None
            out[l] = variables[l].source.tangent(g[active], hv[j], x[active]).sum(0)
        return out
    for l in grad_vars:  # one backward through the batch gradients' graph per variable
        x = W[l]
        assert x is not None
        out[l] = variables[l].source.tangent(g, probe.native_hvp(x, summed=False), x).sum(0)
    return out


def initial_states(
    optimizer: Optimizer, sources: list[Tensor], sig: np.ndarray, start: int
) -> list[Tensor]:
    """``S_l`` after steps 0..start-1: sum_{j<start} beta_l^(start-1-j) G_l^{sigma(j)}."""
    out = []
    for v, G in zip(optimizer.variables, sources, strict=True):
        c = decay_weights(sig[:start], v.beta, G.shape[0], v.source)
        out.append(torch.as_tensor(c, dtype=G.dtype, device=G.device) @ G)
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

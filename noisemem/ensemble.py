"""Probes of one problem at many points at once: the batch gradients of P points in one
autograd graph, and each pass of Hessian-vector products for all of them in one backward pass.

A study's chunk trains P permutations as one vmapped ensemble; after each epoch every run sits
at its own theta_p, where it needs Eq. (9), the noise direction, Sec. 4's direction and the
full-batch prediction. A :class:`~noisemem.probe.Probe` per run builds and traverses P graphs
one after another: P times the Python calls and kernel launches of one, which is where a GPU
spends its time on small models. An :class:`EnsembleProbe` gives batch i of point p its own
copy of theta_p (P m copies in one graph; the batches themselves are shared, not copied),
so that one backward pass returns
``sum_i H_i(theta_p) w_{p,i}`` for every p at once (at the P leaves), or every product apart
(at the copies). The flops are those of P probes; the calls are those of one.

It answers what the closed forms of :mod:`noisemem.full_batch` and
:func:`noisemem.noise_aware.direction_at` ask of a probe, with a leading axis of points:
``theta``, :meth:`full_grad`, :meth:`hessian_gradient`, :meth:`full_hvp` and
:meth:`hessian_moments` are ``(P, d)``; and Eq. (9) for one sequence per point
(:meth:`corrections`): each point's window by the strategies of :mod:`noisemem.window` on a
per-point view of its batch gradients, then the passes of products of every point together.

Memory: the P graphs of every batch and O(P m d) vectors at once;
:func:`noisemem.budget.points_per_graph` says how many points fit in a budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from noisemem import checks
from noisemem import window as windows
from noisemem.correction import check_correction_args, correction_at
from noisemem.memory import TAIL_TOL
from noisemem.optim import Optimizer
from noisemem.probe import HvpRequest, Probe, check_slots, graph_vjp, rows_of, slot_reduce
from noisemem.problem import Problem


class EnsembleProbe:
    """The batch gradients of ``problem`` at the points ``thetas`` (``(P, d)``, standard
    order), with one graph for all of them (module docstring)."""

    def __init__(self, problem: Problem, thetas: Tensor) -> None:
        if thetas.dim() != 2 or thetas.shape[1] != problem.theta.numel():
            raise ValueError(
                f"thetas must be (P, {problem.theta.numel()}); got {tuple(thetas.shape)}"
            )
        self.problem = problem
        self.theta = thetas.detach()
        self.layout = problem.layout
        self.native_theta = self.layout.to_native(self.theta)
        P, m, d = self.points, problem.num_batches, self.theta.shape[1]
        self._leaves = [
            c.clone().requires_grad_(True)
            for c in torch.split(self.native_theta, problem.numels, dim=1)
        ]
        with torch.enable_grad():  # batch i of point p: its own copy (a view) of theta_p
            self._copies = [leaf.unsqueeze(1).expand(P, m, -1) for leaf in self._leaves]
        self._grads = problem.points_batch_grads(self._copies)  # (P, m, numel), with graph
        self.native_grads = torch.cat([g.detach() for g in self._grads], 2)
        assert self.native_grads.shape == (P, m, d)
        self._hg: Tensor | None = None
        self._moments: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def points(self) -> int:
        return self.theta.shape[0]

    @property
    def grads(self) -> Tensor:
        """``g_i(theta_p)``: ``(P, m, d)``."""
        return self.layout.to_standard(self.native_grads)

    def view(self, p: int) -> Probe:
        """A :class:`~noisemem.probe.Probe` of point p that holds its batch gradients (from
        this graph) and no graph of its own: what a window reads."""
        probe = Probe(self.problem.at(self.theta[p]))
        probe._grads = self.native_grads[p]
        return probe

    # -- passes of products ------------------------------------------------------------------
    def native_passes(self, requests: Sequence[Sequence[HvpRequest | None]]) -> list[Tensor]:
        """Passes of products, one per slot j: ``requests[p][j]`` is point p's request (as a
        :class:`~noisemem.probe.Probe` takes it, over its m batches; None: no product for p,
        a zero result). Returns one ``(P, d)`` tensor per slot, native order."""
        P, m = self.points, self.problem.num_batches
        if len(requests) != P:
            raise ValueError(f"requests: one list per point ({P}); got {len(requests)}")
        out = []
        for j in range(check_slots(requests)):
            column = [r[j] for r in requests]
            reduce = slot_reduce(column, j)
            blocks = [torch.zeros_like(g) for g in self._grads]
            for p, r in enumerate(column):
                if r is None:
                    continue
                if r.cotangent is None:
                    parts: Sequence[Tensor] = [g[p].detach() for g in self._grads]
                else:
                    parts = r.cotangent(0, m)
                for b, x in zip(blocks, parts, strict=True):
                    b[p] = x
            out.append(self._backward(blocks, reduce, retain=True))
        return out

    def _backward(self, blocks: Sequence[Tensor], reduce: str, retain: bool) -> Tensor:
        """One backward pass with the cotangent ``blocks`` (one ``(P, m, numel)`` per
        parameter): ``sum_i H_i w_{p,i}`` (``"sum"``) or ``sum_i g_{p,i} * H_i w_{p,i}``
        (``"own"``) for every point, ``(P, d)`` native."""
        inputs = self._leaves if reduce == "sum" else self._copies
        parts = graph_vjp(self._grads, inputs, blocks, retain)
        if parts is None:  # no parameter enters the loss through the graph
            return torch.zeros_like(self.native_theta)
        if reduce == "sum":
            return torch.cat(parts, 1)
        weighted = [(g.detach() * h).sum(1) for g, h in zip(self._grads, parts, strict=True)]
        return torch.cat(weighted, 1)

    def _broadcast_pass(self, V: Tensor) -> Tensor:
        """``sum_i H_i(theta_p) V[p]`` for every p (native in and out)."""
        m = self.problem.num_batches
        blocks = [
            b.unsqueeze(1).expand(-1, m, -1) for b in torch.split(V, self.problem.numels, dim=1)
        ]
        return self._backward(blocks, "sum", retain=True)

    # -- what the closed forms ask of a probe, per point ----------------------------------
    def full_grad(self) -> Tensor:
        """``g(theta_p) = mean_i g_i(theta_p)``: ``(P, d)``."""
        return self.layout.to_standard(self.native_grads.mean(1))

    def full_hvp(self, V: Tensor) -> Tensor:
        """``H(theta_p) V[p]`` for every point: ``(P, d)`` in and out, one backward pass."""
        native = self.layout.to_native(V)
        out = self._broadcast_pass(native) / self.problem.num_batches
        return self.layout.to_standard(out)

    def hessian_gradient(self) -> Tensor:
        """``H g`` at every point (computed once)."""
        if self._hg is None:
            self._hg = self.full_hvp(self.full_grad())
        return self._hg

    def hessian_moments(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(g, H g, Cov)`` at every point, ``Cov = mean_i H_i g_i - H g`` (THEORY §4):
        two backward passes, computed once."""
        if self._moments is None:
            m = self.problem.num_batches
            blocks = [g.detach() for g in self._grads]
            own = self.layout.to_standard(self._backward(blocks, "sum", retain=True)) / m
            Hg = self.hessian_gradient()
            self._moments = (self.full_grad(), Hg, own - Hg)
        return self._moments

    # -- Eq. (9) ------------------------------------------------------------------------------
    def corrections(
        self,
        optimizer: Optimizer,
        sequences: Sequence[Sequence[int] | np.ndarray],
        *,
        tail_tol: float = TAIL_TOL,
    ) -> Tensor:
        """``M^(n_p)`` of Eq. (9) at each point p for its own ``sequences[p]`` (n_p =
        len - 1): ``(P, d)``, standard order, the numbers of
        :func:`noisemem.correction.correction_at` with ``window="auto"``."""
        check_correction_args(optimizer, tail_tol, "double_backward")
        if len(sequences) != self.points:
            raise ValueError(f"sequences: one per point ({self.points}); got {len(sequences)}")
        native = together(
            self.problem, self.view, self.native_theta, optimizer, sequences, tail_tol,
            self.native_passes,
        )  # fmt: skip
        return self.layout.to_standard(native)


def corrections_at(
    probe: Probe,
    optimizer: Optimizer,
    sequences: Sequence[Sequence[int] | np.ndarray],
    *,
    tail_tol: float = TAIL_TOL,
) -> Tensor:
    """``M^(n_p)`` of Eq. (9) at the probe's one point for each of ``sequences`` (the runs
    of a chunk at a fixed probe): each window on the probe, then each pass of products for
    every sequence in one vmapped backward pass through its kept graph
    (:meth:`~noisemem.probe.Probe.native_batched_hvps`). ``(P, d)``, standard order, the
    numbers of :func:`noisemem.correction.correction_at`; one at a time where the probe's
    plan does not keep its graph."""
    check_correction_args(optimizer, tail_tol, "double_backward")
    probe.require(optimizer, per_batch=windows.needs_per_batch(optimizer, "double_backward"))
    if probe.plan.mode != "graph":
        return torch.stack(
            [correction_at(probe, optimizer, s, tail_tol=tail_tol) for s in sequences]
        )
    P = len(sequences)
    thetas = probe.native_theta.expand(P, -1)
    native = together(
        probe.problem, lambda _: probe, thetas, optimizer, sequences, tail_tol,
        probe.native_batched_hvps,
    )  # fmt: skip
    return probe.layout.to_standard(native)


def together(
    problem: Problem,
    view_of: Callable[[int], Probe],
    native_thetas: Tensor,
    optimizer: Optimizer,
    sequences: Sequence[Sequence[int] | np.ndarray],
    tail_tol: float,
    passes: Callable[[Sequence[Sequence[HvpRequest | None]]], list[Tensor]],
) -> Tensor:
    """Eq. (9) for P (point, sequence) pairs of ``problem``, native ``(P, d)``: each window
    on its view (``view_of(p)``, a :class:`~noisemem.probe.Probe` holding point p's batch
    gradients) by the strategies of :mod:`noisemem.window` (linear, fused or scan, as
    ``window="auto"`` picks), then every pass of products by ``passes`` for all pairs at
    once, then each pair's JVP of Phi."""
    P = native_thetas.shape[0]
    if len(sequences) != P:
        raise ValueError(f"sequences: one per point ({P}); got {len(sequences)}")
    m, numels = problem.num_batches, problem.numels
    found = []
    for seq in sequences:
        sig = checks.sequence_array(seq, m)
        found.append(windows.window_of(optimizer, sig, tail_tol, "double_backward"))
    out = torch.zeros(
        (P, native_thetas.shape[1]), dtype=native_thetas.dtype, device=native_thetas.device
    )
    live = [p for p in range(P) if found[p] is not None]
    if not live:
        return out
    views = {p: view_of(p) for p in live}
    requests: list[list[HvpRequest | None]] = [[] for _ in range(P)]
    if optimizer.linear:
        for p in live:
            W = windows.linear_cotangent(views[p], optimizer, found[p])  # type: ignore[arg-type]
            requests[p] = [HvpRequest(rows_of(W, numels))]
        (summed,) = passes(_fill(requests, live))
        out[live] = optimizer.lr * summed[live]
        return out
    pending: dict[int, tuple[list[Tensor | None], list[int], list[Tensor]]] = {}
    for p in live:
        w, view = found[p], views[p]
        assert w is not None
        name = windows.choose(view, optimizer, w)
        vectors = windows.fused_vectors if name == "fused" else windows.scan_vectors
        W, m_last = vectors(view, optimizer, w)
        z, grad_vars, reqs = windows.tangent_requests(numels, optimizer, W)
        requests[p] = list(reqs)
        pending[p] = (z, grad_vars, m_last)
    products = passes(_fill(requests, live))
    for p in live:
        z, grad_vars, m_last = pending[p]
        w = found[p]
        assert w is not None
        z = windows.apply_tangents(z, optimizer, grad_vars, [x[p] for x in products])
        out[p] = windows.phi_tangent(native_thetas[p], optimizer, w, z, m_last)
    return out


def _fill(
    requests: list[list[HvpRequest | None]], live: Sequence[int]
) -> list[list[HvpRequest | None]]:
    """Every point's list as long as the live points' (None: no product)."""
    count = len(requests[live[0]])
    return [r if r else [None] * count for r in requests]

"""One point theta of the loss landscape: what Eq. (9), the expectations and the full-batch
predictions need there, computed once and shared.

A :class:`Probe` holds the batch gradients ``g_i(theta)`` and the autograd graph they come
from, and from it the Hessian-vector products ``H_i w_i`` (one backward pass for all i), the
full-loss ``g``, ``H v``, ``H g`` and ``Cov = mean_i H_i g_i - H g`` (THEORY §4), the
momentum variables with every history slot at theta and ``F^(n)(theta, ..., theta)``. The
windows of Eq. (9) (:mod:`noisemem.window`) read these.

Memory (:mod:`noisemem.budget`): the graph of every batch is built once and kept when it
fits in ``memory_budget`` (mode ``"graph"``); otherwise graphs of a group of batches are
built for each pass of Hessian-vector products and dropped (mode ``"grouped"``), so that the
peak is one group's graph plus the O(m d) vectors. :attr:`Probe.plan` says which.

Two kinds of graph: ``"copies"`` gives batch i its own copy of theta, so that a backward
pass returns every ``H_i w_i`` apart (needed for Adam's squared gradients, J[g^2] =
2 diag(g) H); ``"shared"`` takes ``vmap(grad)`` at one theta and returns only
``sum_i H_i w_i``, which is all that gradient sources and the expectations need, and is
cheaper when batches are many (no per-batch product with the weights reaches the
parameters' shape). A probe builds the kind its first use asks for and upgrades a kept
``"shared"`` graph when a per-batch product is asked for later.

Inside, every flat vector is in the native order of the problem's gradients
(:class:`~noisemem.problem.GradLayout`: no transposed copies in the graph); the ``native_*``
members work in that order, every other public method takes and returns
``parameters_to_vector`` order. The engine's computations are coordinatewise or linear, so
they are the same in either order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from noisemem import checks
from noisemem.budget import MemoryPlan, parse_budget, plan_for, vector_arrays
from noisemem.checks import sequence_array
from noisemem.memory import decay_weights
from noisemem.optim import Optimizer, Source, require_optimizer
from noisemem.problem import Problem

#: rows of (m, d) arrays combined at once where a product over batches is reduced blockwise
ROW_BLOCK = 64
#: uses that need only sums of products build the "shared" graph for batches smaller than
#: this, the "copies" graph otherwise (digits MLP, the exact E[M] and heavy ball's M in ms,
#: shared/copies: batches of 4 48/69 and 41/54, of 8 44/53 and 28/31, of 16 30/33 and 24/25,
#: of 32 29/30 and 19/17)
SHARED_BELOW_BATCH = 32

#: a cotangent of a pass of products: its per-parameter blocks for the batches lo..hi-1
Cotangent = Callable[[int, int], Sequence[Tensor]]


@dataclass
class BatchGraph:
    """The batch gradients of the batches ``lo..hi-1`` (or of a list of batches, one row
    each) with their graph, native order (:meth:`Probe.build_graph`)."""

    kind: str  # "copies" or "shared"
    lo: int
    hi: int
    leaves: list[Tensor]  # one flat leaf per parameter
    copies: list[Tensor] | None  # "copies": (hi-lo, numel) expanded views of the leaves
    grads: list[Tensor]  # per parameter, (hi-lo, numel), with their graph


@dataclass(frozen=True)
class HvpRequest:
    """One pass of products through the batch gradients' graph (:meth:`Probe.native_hvps`).

    ``cotangent(lo, hi)``: the per-parameter blocks ``w_i`` for the batches lo..hi-1; None:
    the graph's own gradients, ``w_i = g_i`` (contiguous, as autograd made them).
    ``reduce``: ``"sum"`` (``sum_i H_i w_i``, a d-vector), ``"rows"`` (every ``H_i w_i``,
    ``(m, d)``), ``"own"`` (``sum_i g_i * H_i w_i``, a d-vector: half the tangent of a
    squared-gradient source, J[g^2] = 2 diag(g) H, with the graph's own g_i), or an
    ``(m, d)`` tensor A (``sum_i A_i * H_i w_i``)."""

    cotangent: Cotangent | None
    reduce: str | Tensor = "sum"
    #: with a cotangent, ``own`` times the graph's own gradients is added to it
    #: (``w_i = cotangent_i + own g_i``: a combination of two passes in one)
    own: float = 0.0

    @property
    def per_batch(self) -> bool:
        return not _is(self.reduce, "sum")


def _is(reduce: str | Tensor, name: str) -> bool:
    return isinstance(reduce, str) and reduce == name


def rows_of(W: Tensor | Sequence[Tensor], numels: Sequence[int]) -> Cotangent:
    """The cotangent whose rows are those of ``W`` (``(m, d)`` or per-parameter blocks)."""
    blocks = torch.split(W, list(numels), dim=1) if isinstance(W, Tensor) else list(W)
    return lambda lo, hi: [b[lo:hi] for b in blocks]


def broadcast(v: Tensor, numels: Sequence[int]) -> Cotangent:
    """The cotangent ``w_i = v`` for every batch (expanded views: nothing copied)."""
    blocks = torch.split(v, list(numels))
    return lambda lo, hi: [b.expand(hi - lo, -1) for b in blocks]


class Probe:
    """Everything Eq. (9) needs at one point theta, computed once and shared by sequences.

    ``grads`` holds ``g_i(theta)`` for every batch (``(m, d)``); it is what the Monte Carlo
    estimators reuse across permutations. With the graph kept (``plan.mode == "graph"``)
    they come from the graph itself, so that ``sum_i H_i w_i`` is one backward pass through
    it (:meth:`summed_hvp`) instead of a second forward and backward.

    ``memory_budget`` (bytes, a string such as ``"8GiB"``, or None for the device's free
    memory) and ``graph_batches`` (batches per graph, None to choose from the budget) set
    the :class:`~noisemem.budget.MemoryPlan` (:attr:`plan`).
    """

    def __init__(
        self,
        problem: Problem,
        theta: Tensor | None = None,
        *,
        memory_budget: int | float | str | None = None,
        graph_batches: int | None = None,
    ) -> None:
        self.memory_budget = parse_budget(memory_budget)  # both checked before any work
        m = problem.num_batches
        if graph_batches is not None:
            checks.integer(
                "graph_batches",
                graph_batches,
                1,
                m,
                allowed=f"graph_batches must be an int in [1, {m}] (batches per graph) or None",
            )
        self.graph_batches = graph_batches
        self.problem = problem
        self.theta = (problem.theta if theta is None else theta).detach()
        self.layout = problem.layout
        self.native_theta = self.layout.to_native(self.theta)
        self._arrays = 0  # the (m, d) arrays the plan reserves (budget.vector_arrays)
        self._plan: MemoryPlan | None = None
        self._kind = "copies"  # the kind of graph a first use builds unless told otherwise
        self._kept: BatchGraph | None = None
        self._grads: Tensor | None = None
        self._g: Tensor | None = None
        self._hg: Tensor | None = None
        self._moments: tuple[Tensor, Tensor, Tensor] | None = None

    # -- the memory plan --------------------------------------------------------------------
    @property
    def plan(self) -> MemoryPlan:
        """How this probe holds its graphs (:class:`~noisemem.budget.MemoryPlan`), made on
        first use from ``memory_budget`` and what its users declared (:meth:`require`)."""
        if self._plan is None:
            self._plan = plan_for(
                self.problem, self._arrays, self.memory_budget, self.graph_batches
            )
        return self._plan

    @property
    def planned(self) -> MemoryPlan | None:
        """The plan if a use has made it, else None (reading :attr:`plan` would make one)."""
        return self._plan

    def require(
        self,
        optimizer: Optimizer | None,
        *,
        per_batch: bool | None = None,
        hvp: str = "double_backward",
    ) -> None:
        """Declare a use before it starts: Eq. (9) for ``optimizer`` with products by
        ``hvp`` (its (m, d) arrays are reserved in the plan; a ``ValueError`` if they cannot
        fit) or, with None, the expectations. ``per_batch``: whether it needs the
        ``H_i w_i`` apart (the graph kind built first). A plan that no longer fits the kept
        graph drops it."""
        arrays = vector_arrays(optimizer, hvp)
        if arrays > self._arrays:
            self._arrays = arrays
            old, self._plan = self._plan, None
            if old is not None and self.plan.mode != "graph":
                self._kept = None
        else:
            self.plan  # noqa: B018 - fixes the plan (and checks it) before any work
        if per_batch is not None and self._kept is None:
            self._kind = "copies" if per_batch else self._summed_kind()

    # -- graphs -----------------------------------------------------------------------------
    def _summed_kind(self) -> str:
        """The graph kind for uses that need only ``sum_i H_i w_i``."""
        return "shared" if self.problem.batch_size < SHARED_BELOW_BATCH else "copies"

    def _leaves(self, requires_grad: bool) -> list[Tensor]:
        chunks = torch.split(self.native_theta, self.problem.numels)
        return [c.clone().requires_grad_(requires_grad) for c in chunks]

    def build_graph(self, kind: str, lo: int, hi: int, index: Tensor | None = None) -> BatchGraph:
        """The graph of the batches lo..hi-1, or of the batches ``index`` (then hi - lo of
        them, repeats allowed: one row per step of a window)."""
        leaves = self._leaves(True)
        batches: slice | Tensor = slice(lo, hi) if index is None else index
        if kind == "copies":
            with torch.enable_grad():
                copies = [leaf.expand(hi - lo, -1) for leaf in leaves]
            grads = self.problem.batch_grads_at(copies, batches)
            return BatchGraph(kind, lo, hi, leaves, copies, grads)
        return BatchGraph(
            kind, lo, hi, leaves, None, self.problem.shared_batch_grads(leaves, batches)
        )

    def _groups(self) -> list[tuple[int, int]]:
        m, q = self.problem.num_batches, self.plan.graph_batches
        return [(lo, min(m, lo + q)) for lo in range(0, m, q)]

    def _graphs(self, kind: str) -> Iterator[BatchGraph]:
        """The graphs covering every batch, for products of ``kind`` (a ``"copies"`` graph
        serves both kinds): the kept one (built, or upgraded, here) or one per group."""
        m = self.problem.num_batches
        if self.plan.mode == "graph":
            if self._kept is None or (kind == "copies" and self._kept.kind != "copies"):
                self._kept = None  # free the old graph before the new one is built
                self._kept = self.build_graph(kind, 0, m)
            yield self._kept
            return
        for lo, hi in self._groups():
            yield self.build_graph(kind, lo, hi)

    # -- the batch gradients ---------------------------------------------------------------
    @property
    def native_grads(self) -> Tensor:
        """``g_i(theta)`` for every batch, ``(m, d)``, in the native order (built once: from
        the kept graph, or group by group without a graph)."""
        if self._grads is None:
            if self.plan.mode == "graph":
                (graph,) = self._graphs(self._kind)
                self._grads = torch.cat([g.detach() for g in graph.grads], 1)
            else:
                m, d = self.problem.num_batches, self.native_theta.numel()
                out = self.native_theta.new_empty((m, d))
                leaves = self._leaves(False)
                for lo, hi in self._groups():
                    blocks = self.problem.shared_batch_grads(leaves, slice(lo, hi))
                    torch.cat(blocks, 1, out=out[lo:hi])
                self._grads = out
        assert self._grads is not None
        return self._grads

    @property
    def grads(self) -> Tensor:
        """``g_i(theta)`` for every batch i: ``(m, d)``."""
        return self.layout.to_standard(self.native_grads)

    # -- Hessian-vector products -----------------------------------------------------------
    def native_hvps(self, requests: Sequence[HvpRequest]) -> list[Tensor]:
        """The passes of products ``requests`` (:class:`HvpRequest`), all in one traversal
        of the graphs: each graph (the kept one, or one group's) is built once and serves
        one backward pass per request. Native order in and out."""
        m, d = self.problem.num_batches, self.native_theta.numel()
        kept = self.plan.mode == "graph"
        if any(r.per_batch for r in requests):
            kind = "copies"
        else:  # a kept graph serves whatever its kind; a group's is built for this pass
            kind = self._kind if kept else self._summed_kind()
        outs = [
            self.native_theta.new_zeros((m, d) if _is(r.reduce, "rows") else (d,)) for r in requests
        ]
        for graph in self._graphs(kind):
            for j, r in enumerate(requests):
                retain = kept or j < len(requests) - 1
                part = self.backward(graph, r, retain)
                if _is(r.reduce, "rows"):
                    outs[j][graph.lo : graph.hi] = part
                else:
                    outs[j] += part
        return outs

    def backward(self, graph: BatchGraph, r: HvpRequest, retain: bool) -> Tensor:
        """One backward pass of ``r`` through ``graph``: a d-vector (reduced as ``r`` says),
        or ``(hi-lo, d)`` for ``"rows"``."""
        if r.cotangent is None:
            blocks: Sequence[Tensor] = [g.detach() for g in graph.grads]
        else:
            blocks = r.cotangent(graph.lo, graph.hi)
            if r.own:
                blocks = [
                    torch.add(b, g.detach(), alpha=r.own)
                    for b, g in zip(blocks, graph.grads, strict=True)
                ]
        summed = not r.per_batch
        inputs = graph.leaves if summed else graph.copies
        assert inputs is not None, "per-batch products need a 'copies' graph"
        parts = graph_vjp(graph.grads, inputs, blocks, retain)
        if parts is None:
            d = self.native_theta.numel()
            return self.native_theta.new_zeros((d,) if summed else (graph.hi - graph.lo, d))
        if summed:
            return torch.cat(parts)
        if _is(r.reduce, "rows"):
            return torch.cat(parts, 1)
        if _is(r.reduce, "own"):  # per parameter, so that no (hi-lo, d) copy is made
            return torch.cat(
                [weighted_row_sum(g.detach(), h) for g, h in zip(graph.grads, parts, strict=True)]
            )
        assert isinstance(r.reduce, Tensor)
        return weighted_row_sum(r.reduce[graph.lo : graph.hi], torch.cat(parts, 1))

    def native_batched_hvps(self, requests: Sequence[Sequence[HvpRequest | None]]) -> list[Tensor]:
        """Passes of products for many sets of cotangents at once, through the kept graph:
        ``requests[p][j]`` is set p's j-th pass (reduce ``"sum"`` or ``"own"``; None: a zero
        result), and each slot j is one vmapped backward pass (``is_grads_batched``) for every
        p. Returns one ``(P, d)`` tensor per slot, native order. Needs the graph kept
        (``plan.mode == "graph"``); its vmapped backward holds about P times a pass's
        temporaries."""
        if self.plan.mode != "graph":
            raise ValueError(
                f"batched products need the kept graph; this probe's plan is {self.plan.describe()}"
            )
        sets = len(requests)
        count = check_slots(requests)
        live = [r for rs in requests for r in rs if r is not None]
        (graph,) = self._graphs("copies" if any(r.per_batch for r in live) else self._kind)
        m, numels = self.problem.num_batches, self.problem.numels
        outs = []
        for j in range(count):
            column = [rs[j] for rs in requests]
            reduce = slot_reduce(column, j)
            stacked = [self.native_theta.new_zeros((sets, m, n)) for n in numels]
            for p, r in enumerate(column):
                if r is None:
                    continue
                blocks = (
                    [g.detach() for g in graph.grads] if r.cotangent is None else r.cotangent(0, m)
                )
                for target, b in zip(stacked, blocks, strict=True):
                    target[p] = b
            inputs = graph.leaves if reduce == "sum" else graph.copies
            assert inputs is not None
            parts = self._batched_vjp(graph, inputs, stacked)
            if parts is None:
                outs.append(self.native_theta.new_zeros((sets, self.native_theta.numel())))
                continue
            if reduce == "sum":
                outs.append(torch.cat(parts, 1))
            else:  # (sets, m, numel) per copy, weighed by the graph's own g_i
                own = [(g.detach() * h).sum(1) for g, h in zip(graph.grads, parts, strict=True)]
                outs.append(torch.cat(own, 1))
        return outs

    def _batched_vjp(
        self, graph: BatchGraph, inputs: Sequence[Tensor], stacked: Sequence[Tensor]
    ) -> list[Tensor] | None:
        """:func:`graph_vjp` of every set of ``stacked`` (leading axis: the sets), vmapped;
        one set at a time for a model whose graph has an op without a batching rule (the
        first failure says so once and is remembered for the problem)."""
        works = self.problem.vmapped_backward
        if works[0]:
            try:
                return graph_vjp(graph.grads, inputs, stacked, retain=True, batched=True)
            except RuntimeError as err:
                works[0] = False
                warnings.warn(
                    f"noisemem: a vmapped backward pass failed for this model "
                    f"({checks.first_line(err)}); "
                    "its batched passes of products run one set at a time",
                    RuntimeWarning,
                    stacklevel=3,
                )
        sets = stacked[0].shape[0]
        each = [graph_vjp(graph.grads, inputs, [b[p] for b in stacked], True) for p in range(sets)]
        if each[0] is None:
            return None
        return [torch.stack(column) for column in zip(*each, strict=True)]

    def native_hvp(self, W: Tensor | Sequence[Tensor], summed: bool) -> Tensor:
        """``H_i W[i]`` (or their sum over i), all in the native order; ``W`` is ``(m, d)``
        or one ``(m, numel)`` block per parameter. One backward pass per graph."""
        reduce = "sum" if summed else "rows"
        return self.native_hvps([HvpRequest(rows_of(W, self.problem.numels), reduce)])[0]

    def native_vmapped_hvps(self, index: Tensor, vectors: Tensor) -> Tensor:
        """``H_{index[p]} vectors[p]`` by vmapped forward-over-reverse calls (no graph kept),
        native order in and out (the call itself works in the standard order); as many
        pairs per call as the plan puts batches in a graph."""
        std = self.layout.to_standard(vectors)
        q = self.plan.graph_batches
        parts = [
            self.problem.batch_hvps(self.theta, index[p : p + q], std[p : p + q])
            for p in range(0, index.numel(), q)
        ]
        return self.layout.to_native(torch.cat(parts) if parts else std)

    def batch_hvps(self, W: Tensor) -> Tensor:
        """``H_i(theta) W[i]`` for every batch i (``W`` and the result are ``(m, d)``)."""
        return self.layout.to_standard(self.native_hvp(self.layout.to_native(W), summed=False))

    def summed_hvp(self, W: Tensor) -> Tensor:
        """``sum_i H_i(theta) W[i]`` over every batch i (``W`` is ``(m, d)``): one backward
        pass, summed at the leaf (no ``(m, d)`` result)."""
        return self.layout.to_standard(self.native_hvp(self.layout.to_native(W), summed=True))

    # -- full-loss quantities at theta, from the same graph (L = mean_i L_i) -------------
    def _full_grad(self) -> Tensor:
        if self._g is None:
            if self._grads is None and self.plan.mode == "grouped":
                # g alone: a pass without a graph, nothing of size (m, d) kept
                leaves = self._leaves(False)
                g = torch.zeros_like(self.native_theta)
                for lo, hi in self._groups():
                    blocks = self.problem.shared_batch_grads(leaves, slice(lo, hi))
                    g += torch.cat([b.sum(0) for b in blocks])
                self._g = g / self.problem.num_batches
            elif self._grads is None:  # from the kept graph's blocks: no (m, d) copy
                (graph,) = self._graphs(self._kind)
                self._g = torch.cat([g.detach().mean(0) for g in graph.grads])
            else:
                self._g = self._grads.mean(0)
        return self._g

    def _full_hvp(self, v: Tensor) -> Tensor:
        """``H v = mean_i H_i v`` (native order): one backward pass per graph with the
        cotangent an expanded view of v (the 1/m is applied to the result)."""
        numels = self.problem.numels
        return self.native_hvps([HvpRequest(broadcast(v, numels))])[0] / self.problem.num_batches

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
        from two backward passes through the batch gradients' graph (H g alone, for the
        full-batch predictions, costs one pass); computed once per probe. Grouped, without
        the batch gradients kept, the first pass builds each group's graph and takes its
        g_i and sum H_i g_i together; the second rebuilds them for H g: no (m, d) array."""
        if self._moments is None:
            m, numels = self.problem.num_batches, self.problem.numels
            if self._kept is None and self._grads is None:
                self._kind = self._summed_kind()  # only sums of products are needed here
            if self._grads is None and self.plan.mode == "grouped":
                g_sum = torch.zeros_like(self.native_theta)
                own = torch.zeros_like(self.native_theta)
                for graph in self._graphs(self._kind):
                    g_sum += torch.cat([c.detach().sum(0) for c in graph.grads])
                    own += self.backward(graph, HvpRequest(None), retain=False)
                if self._g is None:
                    self._g = g_sum / m
                self._hg = self._hessian_gradient()
            else:
                g = self._full_grad()
                # the kept graph's own gradients, or the rows of the kept ones
                own_rows = None if self.plan.mode == "graph" else rows_of(self.native_grads, numels)
                todo = [HvpRequest(own_rows)]
                if self._hg is None:
                    todo.append(HvpRequest(broadcast(g, numels)))
                done = self.native_hvps(todo)
                own = done[0]
                if self._hg is None:
                    self._hg = done[1] / m
            cov = own / m - self._hg
            self._moments = (
                self.full_grad(),
                self.hessian_gradient(),
                self.layout.to_standard(cov),
            )
        return self._moments

    def moment_combination(self, a: float, b: float) -> Tensor:
        """``a mean_i H_i g_i + b H g`` (a combination of Cov's two terms): from
        :meth:`hessian_moments` when they are known, else one backward pass with the
        cotangent ``(a g_i + b g) / m`` (after a pass without a graph for g when the graphs
        are grouped and g is not known)."""
        if self._moments is not None:
            _, Hg, cov = self._moments
            return a * (cov + Hg) + b * Hg
        m, numels = self.problem.num_batches, self.problem.numels
        if self._kept is None and self._grads is None:
            self._kind = self._summed_kind()  # only sums of products are needed here
        g = self._full_grad()
        request = HvpRequest(broadcast(g * (b / m), numels), own=a / m)
        return self.layout.to_standard(self.native_hvps([request])[0])

    # -- the momentum variables and F^(n) with every history slot at theta ---------------
    def native_sources(self, optimizer: Optimizer) -> list[Tensor]:
        """``G_l^i(theta)`` per variable: ``(m, d)``, or ``(1, d)`` for the PARAM source."""
        out = []
        for v in optimizer.variables:
            if v.source is Source.PARAM:
                out.append(self.native_theta.unsqueeze(0))
            else:
                out.append(v.source.value(self.native_grads, self.native_theta))
        return out

    def native_weighted_source(self, source: Source, c: np.ndarray) -> Tensor:
        """``sum_i c[i] G^i(theta)`` for one source (d,): a matrix-vector product for g and
        -g, blocks of rows for g^2 (no (m, d) temporary), ``sum(c) theta`` for theta."""
        theta = self.native_theta
        if source is Source.PARAM:
            return float(np.sum(c)) * theta
        rows = np.flatnonzero(c)
        if rows.size == 0:  # e.g. a window that starts at step 0: nothing to read
            return torch.zeros_like(theta)
        G = self.native_grads
        if rows.size < c.size:  # only the batches that carry weight
            index = torch.as_tensor(rows, device=G.device)
            G, c = G.index_select(0, index), c[rows]
        ct = torch.as_tensor(c, dtype=G.dtype, device=G.device)
        if source is Source.GRAD_SQ:
            return weighted_row_sum(G, G, ct)
        out = ct @ G
        return -out if source is Source.NEG_GRAD else out

    def native_momenta(self, optimizer: Optimizer, sequence: np.ndarray) -> list[Tensor]:
        """``m_l^(n+1)`` with every history slot at theta (n = len(sequence) - 1)."""
        n = sequence.size - 1
        b = optimizer.scales(np.array([float(n)]))[:, 0]
        m = self.problem.num_batches
        out = []
        for v, b_l in zip(optimizer.variables, b, strict=True):
            c = decay_weights(sequence, v.beta, m, v.source)
            out.append(float(b_l) * self.native_weighted_source(v.source, c))
        return out

    def direction(self, optimizer: Optimizer, sequence: Sequence[int]) -> Tensor:
        """``F^(n)(theta, ..., theta)``: the first-order memoryless direction of (4)."""
        require_optimizer(optimizer)
        sig = sequence_array(sequence, self.problem.num_batches)
        return self.layout.to_standard(optimizer.phi(*self.native_momenta(optimizer, sig)))


def weighted_row_sum(A: Tensor, B: Tensor, c: Tensor | None = None) -> Tensor:
    """``sum_i c_i A_i * B_i`` over the rows (c = 1 if None), in blocks of ``ROW_BLOCK``
    rows, so that no temporary as large as A is made."""
    out = A.new_zeros(A.shape[1:])
    for r0 in range(0, A.shape[0], ROW_BLOCK):
        r1 = min(A.shape[0], r0 + ROW_BLOCK)
        prod = A[r0:r1] * B[r0:r1]
        if c is None:
            out += prod.sum(0)
        else:
            out += c[r0:r1] @ prod
    return out


def graph_vjp(
    grads: Sequence[Tensor],
    inputs: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    retain: bool,
    batched: bool = False,
) -> list[Tensor] | None:
    """One backward pass from the batch gradients ``grads`` with ``cotangents`` to
    ``inputs`` (``batched``: a leading axis of sets of cotangents, vmapped); None when no
    gradient has a graph. A parameter the loss does not use has a constant zero gradient,
    outside the graph: its products are zeros."""
    pairs = [(g, b) for g, b in zip(grads, cotangents, strict=True) if g.requires_grad]
    if not pairs:
        return None
    got = torch.autograd.grad(
        [g for g, _ in pairs],
        list(inputs),
        [b for _, b in pairs],
        retain_graph=retain,
        allow_unused=True,
        is_grads_batched=batched,
    )
    lead = (cotangents[0].shape[0],) if batched else ()
    return [
        t.new_zeros((*lead, *t.shape)) if o is None else o for o, t in zip(got, inputs, strict=True)
    ]


def check_slots(requests: Sequence[Sequence[HvpRequest | None]]) -> int:
    """The number of passes every set of ``requests`` asks for (the same for each)."""
    slots = {len(r) for r in requests}
    if len(slots) > 1:
        raise ValueError(f"requests: every set needs as many passes; got {sorted(slots)}")
    return slots.pop() if slots else 0


def slot_reduce(column: Sequence[HvpRequest | None], j: int) -> str:
    """The one reduction of pass j over the sets (``"sum"`` or ``"own"``)."""
    kinds = {r.reduce if isinstance(r.reduce, str) else "weights" for r in column if r is not None}
    if len(kinds) > 1:
        raise ValueError(f"requests: pass {j} mixes reductions {sorted(kinds)}")
    reduce = kinds.pop() if kinds else "sum"
    if reduce not in ("sum", "own"):
        raise ValueError(
            f"requests: reduce {reduce!r} in pass {j}: batched passes take 'sum' or 'own'"
        )
    return reduce

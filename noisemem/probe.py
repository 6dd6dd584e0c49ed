"""One point theta of the loss landscape: what Eq. (9), the expectations and the full-batch
predictions need there, computed once and shared.

A :class:`Probe` holds the batch gradients ``g_i(theta)`` with their autograd graph, and
from it the Hessian-vector products ``H_i w_i`` (one backward pass for all i), the full-loss
``g``, ``H v``, ``H g`` and ``Cov = mean_i H_i g_i - H g`` (THEORY §4), the momentum
variables with every history slot at theta and ``F^(n)(theta, ..., theta)``. The windows of
Eq. (9) (:mod:`noisemem.window`) read these.

Inside, every flat vector is in the native order of the problem's gradients
(:class:`~noisemem.problem.GradLayout`: no transposed copies in the graph); the ``native_*``
members work in that order, every other public method takes and returns
``parameters_to_vector`` order. The engine's computations are coordinatewise or linear, so
they are the same in either order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from noisemem.checks import sequence_array
from noisemem.memory import decay_weights
from noisemem.optim import Optimizer, Source, require_optimizer
from noisemem.problem import Problem


class Probe:
    """Everything Eq. (9) needs at one point theta, computed once and shared by sequences.

    ``grads`` holds ``g_i(theta)`` for every batch (``(m, d)``); it is what the Monte Carlo
    estimators reuse across permutations. They are computed with their autograd graph kept,
    so that ``sum_i H_i w_i`` is one backward pass through that graph (:meth:`summed_hvp`)
    instead of a second forward and backward.
    """

    def __init__(self, problem: Problem, theta: Tensor | None = None) -> None:
        self.problem = problem
        self.theta = (problem.theta if theta is None else theta).detach()
        self.layout = problem.layout
        self.native_theta = self.layout.to_native(self.theta)
        self._chunks: list[Tensor] | None = None
        self._grads: Tensor | None = None
        # (one leaf per parameter, their per-batch copies, the batch gradients of each
        # parameter with their graph), native order
        self._graph: tuple[list[Tensor], list[Tensor], list[Tensor]] | None = None
        self._g: Tensor | None = None
        self._hg: Tensor | None = None
        self._moments: tuple[Tensor, Tensor, Tensor] | None = None

    # -- the batch gradients and their graph -----------------------------------------------
    @property
    def _grad_chunks(self) -> list[Tensor]:
        """The batch gradients, one ``(m, numel)`` block per parameter (native order).

        One copy of theta per batch (expanded views of one leaf per parameter): G_i depends
        on its own copy only, so a backward pass with cotangents W returns every H_i W[i]
        separately at the copies, and their sum at the leaves (summed per parameter inside
        autograd: no (m, d) result)."""
        if self._chunks is None:
            m = self.problem.num_batches
            leaves = [
                c.clone().requires_grad_(True)
                for c in torch.split(self.native_theta, self.problem.numels)
            ]
            with torch.enable_grad():
                copies = [leaf.expand(m, -1) for leaf in leaves]
            G = self.problem.batch_grads_at(copies)
            self._graph = (leaves, copies, G)
            self._chunks = [c.detach() for c in G]
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

    def native_hvp(self, W: Tensor | Sequence[Tensor], summed: bool) -> Tensor:
        """``H_i W[i]`` (or their sum over i), all in the native order; ``W`` is ``(m, d)``
        or one ``(m, numel)`` block per parameter. One backward pass through the graph."""
        self._grad_chunks  # noqa: B018 - builds the graph
        assert self._graph is not None
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

    def native_vmapped_hvps(self, index: Tensor, vectors: Tensor) -> Tensor:
        """``H_{index[p]} vectors[p]`` by one vmapped forward-over-reverse call (no graph),
        native order in and out (the call itself works in the standard order)."""
        std = self.layout.to_standard(vectors)
        return self.layout.to_native(self.problem.batch_hvps(self.theta, index, std))

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
            self._g = torch.cat([c.mean(0) for c in self._grad_chunks])
        return self._g

    def _full_hvp(self, v: Tensor) -> Tensor:
        """``H v = mean_i H_i v`` (native order): one backward pass with the cotangent an
        expanded view of v (the 1/m is applied to the result)."""
        m = self.problem.num_batches
        blocks = [c.expand(m, -1) for c in torch.split(v, self.problem.numels)]
        return self.native_hvp(blocks, summed=True) / m

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
            cov = self.native_hvp(self._grad_chunks, summed=True) / self.problem.num_batches - Hg
            self._moments = (
                self.full_grad(),
                self.hessian_gradient(),
                self.layout.to_standard(cov),
            )
        return self._moments

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

    def native_momenta(self, optimizer: Optimizer, sequence: np.ndarray) -> list[Tensor]:
        """``m_l^(n+1)`` with every history slot at theta (n = len(sequence) - 1)."""
        n = sequence.size - 1
        b = optimizer.scales(np.array([float(n)]))[:, 0]
        out = []
        for v, G, b_l in zip(optimizer.variables, self.native_sources(optimizer), b, strict=True):
            c = decay_weights(sequence, v.beta, G.shape[0], v.source)
            out.append(float(b_l) * (torch.as_tensor(c, dtype=G.dtype, device=G.device) @ G))
        return out

    def direction(self, optimizer: Optimizer, sequence: Sequence[int]) -> Tensor:
        """``F^(n)(theta, ..., theta)``: the first-order memoryless direction of (4)."""
        require_optimizer(optimizer)
        sig = sequence_array(sequence, self.problem.num_batches)
        return self.layout.to_standard(optimizer.phi(*self.native_momenta(optimizer, sig)))

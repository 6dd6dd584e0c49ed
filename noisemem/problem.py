"""A model, a mean-reduced loss and equal-size mini-batches, as functions of a flat vector.

Parameters are flat, in ``parameters_to_vector(model.parameters())`` order. Everything is
written for one batch and lifted with ``torch.func`` (``vmap``, ``grad``, ``jvp``).
Mini-batch loss ``L_i`` is the **mean** loss over batch ``i``; the full loss is
``L = mean_i L_i`` (equal batch sizes, so it is also the mean over all samples).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.utils import parameters_to_vector

from noisemem.system import engine_allocator

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


def stack_batches(batches: Sequence[Batch]) -> tuple[Tensor, Tensor]:
    """Stack ``[(x_i, y_i)]`` into ``X (m, b, ...)``, ``Y (m, b, ...)``; sizes must agree."""
    if len(batches) == 0:
        raise ValueError("batches: got no batches; give at least one (inputs, targets) pair")
    sizes = [len(x) for x, _ in batches]
    target_sizes = [len(y) for _, y in batches]
    if len(set(sizes)) != 1 or sizes != target_sizes:
        raise ValueError(
            "batches: every batch must have the same size (inputs and targets alike); "
            f"got input sizes {sizes} and target sizes {target_sizes} "
            "(drop the incomplete last batch)"
        )
    for what, k in (("inputs", 0), ("targets", 1)):
        shapes = sorted({tuple(b[k].shape[1:]) for b in batches})
        if len(shapes) != 1:
            raise ValueError(
                f"batches: every batch's {what} must have the same shape past the batch "
                f"dimension; got {shapes}"
            )
    return torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches])


@dataclass(frozen=True)
class GradLayout:
    """An order of the flat coordinates in which autograd writes per-batch gradients.

    Autograd's formulas hand back some parameters' gradients in a permuted memory order (a
    ``Linear`` weight's gradient is its transpose, stored contiguously). Flattening those into
    ``parameters_to_vector`` order is then a strided copy, and a double backward that starts
    from such a flat cotangent runs its elementwise work on transposed operands, several times
    slower on a CPU. In the "native" order each parameter's coordinates follow the memory
    order autograd produced, so nothing is transposed. Every quantity is the same, only its
    coordinates are permuted: ``native = standard[..., index]``.
    """

    #: per parameter, its dimensions from the outermost to the innermost in native storage
    orders: tuple[tuple[int, ...], ...]
    #: ``native[..., j] = standard[..., index[j]]``; None when the two orders agree
    index: Tensor | None
    inverse: Tensor | None

    def to_native(self, v: Tensor) -> Tensor:
        return v if self.index is None else v.index_select(-1, self.index)

    def to_standard(self, v: Tensor) -> Tensor:
        return v if self.inverse is None else v.index_select(-1, self.inverse)


def storage_order(t: Tensor) -> tuple[int, ...]:
    """The dimensions of ``t`` from the outermost to the innermost in memory, if ``t`` is a
    permutation of a contiguous tensor; its own order otherwise (and for size-1 ties)."""
    dims = tuple(sorted(range(t.dim()), key=lambda i: (-t.stride(i), i)))
    permuted = t.permute(dims)
    return dims if permuted.is_contiguous() else tuple(range(t.dim()))


class Problem:
    """Flat-parameter view of ``(model, loss_fn, batches)``."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Batch],
        *,
        layout: GradLayout | None = None,
        graph_bytes: int | None = None,
    ) -> None:
        """``layout``: the native order of the gradients if already known (the same model
        and batch size); read from the model when needed otherwise (:attr:`layout`).
        ``graph_bytes``: likewise for :attr:`graph_bytes_per_batch`. The first problem
        of a process makes the engine's allocator choice (:mod:`noisemem.system`)."""
        engine_allocator()
        self.model = model
        self.loss_fn = loss_fn
        self.X, self.Y = stack_batches(batches)  # (m, b, ...)
        self.names = [name for name, _ in model.named_parameters()]
        params = [p for _, p in model.named_parameters()]
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.buffers = dict(model.named_buffers())
        self.theta = parameters_to_vector(params).detach()  # (d,)
        device, dtype = self.theta.device, self.theta.dtype
        self.X = self.X.to(device)
        self.Y = self.Y.to(device)
        if self.X.is_floating_point():
            self.X = self.X.to(dtype)
        # one-slot cells: views made by :meth:`at` share them, so each is read once
        self._layout: list[GradLayout | None] = [layout]
        self._graph_bytes: list[int | None] = [graph_bytes]
        # whether a vmapped backward pass through the batch gradients' graph works for this
        # model (False once one failed: some ops have no batching rule); shared by the views
        self.vmapped_backward: list[bool] = [True]

    def at(self, theta: Tensor) -> Problem:
        """The same problem viewed at other flat parameters (data shared, nothing copied)."""
        other = copy.copy(self)
        other.theta = theta.detach()
        return other

    def samples(self) -> tuple[Tensor, Tensor]:
        """Every sample the batches hold, ``X (N, ...)`` and ``Y (N, ...)``, N = m b."""
        return self.X.flatten(0, 1), self.Y.flatten(0, 1)

    def rebatched(self, rows: Tensor | Sequence[Sequence[int]]) -> Problem:
        """The same samples in other batches: batch j holds the samples ``rows[j]`` (an
        ``(m', b')`` index array); same model, loss, parameters and gradient layout when
        the batch size is the same."""
        X, Y = self.samples()
        index = torch.as_tensor(rows, device=X.device)
        same = index.shape[1] == self.batch_size
        fresh = Problem(
            self.model,
            self.loss_fn,
            list(zip(X[index], Y[index], strict=True)),
            layout=self._layout[0] if same else None,
            graph_bytes=self._graph_bytes[0] if same else None,
        )
        return fresh.at(self.theta)

    def full_batch(self) -> Problem:
        """Every sample in one batch (the full loss is unchanged: L = mean_i L_i)."""
        return self.rebatched(torch.arange(self.X.shape[0] * self.batch_size)[None])

    def per_sample(self) -> Problem:
        """Every sample its own batch of size one (the per-sample analogue of the batches)."""
        return self.rebatched(torch.arange(self.X.shape[0] * self.batch_size)[:, None])

    @property
    def num_batches(self) -> int:
        return self.X.shape[0]

    @property
    def batch_size(self) -> int:
        return self.X.shape[1]

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        chunks = torch.split(theta, self.numels)
        return {
            name: c.view(shape)
            for name, c, shape in zip(self.names, chunks, self.shapes, strict=True)
        }

    def loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Mean loss of one batch ``(x, y)`` at flat parameters ``theta``."""
        return self._loss(self.unflatten(theta), x, y)

    def _loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(functional_call(self.model, (params, self.buffers), (x,)), y)

    @property
    def layout(self) -> GradLayout:
        """The native coordinate order of per-batch gradients (:class:`GradLayout`), read
        once from one vmapped gradient of (up to) two batches."""
        if self._layout[0] is None:
            k = min(2, self.num_batches)
            with torch.enable_grad():
                flat = self.theta.expand(k, -1).clone().requires_grad_(True)
                chunks = torch.split(flat, self.numels, dim=1)
                params = [c.view(k, *shape) for c, shape in zip(chunks, self.shapes, strict=True)]

                def loss(ps: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
                    return self._loss(dict(zip(self.names, ps, strict=True)), x, y)

                losses = vmap(loss)(params, self.X[:k], self.Y[:k])
                grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
            orders, pieces, offset = [], [], 0
            for g, shape, numel in zip(grads, self.shapes, self.numels, strict=True):
                order = tuple(range(len(shape))) if g is None else storage_order(g[0])
                orders.append(order)
                ids = torch.arange(offset, offset + numel, device=self.theta.device)
                pieces.append(ids.view(shape).permute(order).reshape(-1))
                offset += numel
            index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
            if torch.equal(index, torch.arange(offset, device=index.device)):
                self._layout[0] = GradLayout(tuple(orders), None, None)
            else:
                self._layout[0] = GradLayout(tuple(orders), index, torch.argsort(index))
        return self._layout[0]

    @property
    def graph_bytes_per_batch(self) -> int:
        """Bytes the autograd graph of one batch's gradient holds (what a double backward
        through it needs: the tensors autograd saves in the forward pass and in the backward
        pass with ``create_graph``, plus the gradient itself), measured once on up to two
        batches (:func:`saved_bytes`) and shared by the views of :meth:`at`."""
        if self._graph_bytes[0] is None:
            k = min(2, self.num_batches)
            chunks = torch.split(self.layout.to_native(self.theta), self.numels)
            leaves = [c.clone().requires_grad_(True) for c in chunks]
            with torch.enable_grad():
                copies = [leaf.expand(k, -1) for leaf in leaves]
            keep = [*leaves, self.X, self.Y, *self.buffers.values()]
            grads, saved = saved_bytes(lambda: self.batch_grads_at(copies, slice(0, k)), keep)
            out = sum(g.numel() * g.element_size() for g in grads)
            self._graph_bytes[0] = -(-(saved + out) // k)
        return self._graph_bytes[0]

    def native_loss(self, chunks: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        """:meth:`loss` at parameters given as one flat chunk per parameter, each in the
        native order (:attr:`layout`)."""
        params = {}
        for name, c, shape, order in zip(
            self.names, chunks, self.shapes, self.layout.orders, strict=True
        ):
            stored = c.view([shape[o] for o in order])
            params[name] = stored.permute(sorted(range(len(order)), key=order.__getitem__))
        return self._loss(params, x, y)

    def full_loss(self, theta: Tensor) -> Tensor:
        """``L = mean_i L_i``."""
        return vmap(self.loss, in_dims=(None, 0, 0))(theta, self.X, self.Y).mean()

    def batch_grads(self, theta: Tensor, index: Tensor | None = None) -> Tensor:
        """``g_i(theta)`` for the batches ``index`` (all by default): ``(k, d)``."""
        X, Y = (self.X, self.Y) if index is None else (self.X[index], self.Y[index])
        return vmap(grad(self.loss), in_dims=(None, 0, 0))(theta, X, Y)

    def batch_grads_at(
        self, thetas: Sequence[Tensor], batches: slice | Tensor | None = None
    ) -> list[Tensor]:
        """``g_i(theta_i)`` for every batch i (or the batches ``batches``: a slice or an
        index tensor, repeats allowed),
        each at its own parameters, with their autograd graph kept. ``thetas`` holds one
        ``(k, numel)`` tensor per parameter (row i: batch i's copy; they must require grad),
        in the native order (:attr:`layout`); so does the result (one ``(k, numel)``
        gradient per parameter).

        Batch i's loss depends on its own copies only, so one backward pass of the summed
        losses gives every g_i, and a backward pass through them gives every ``H_i w_i``
        apart, at the copies (:meth:`shared_batch_grads` gives only their sum).
        """
        X, Y = (self.X, self.Y) if batches is None else (self.X[batches], self.Y[batches])
        with torch.enable_grad():
            losses = vmap(self.native_loss)(list(thetas), X, Y)
            grads = torch.autograd.grad(losses.sum(), thetas, create_graph=True, allow_unused=True)
        # a parameter the loss does not use has zero gradients (and no graph)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, thetas, strict=True)]

    def points_batch_grads(self, thetas: Sequence[Tensor]) -> list[Tensor]:
        """``g_i(theta_{p,i})`` for every point p and batch i, with their graph kept:
        ``thetas`` holds one ``(P, m, numel)`` tensor per parameter (row (p, i): batch i's
        copy of point p's parameters; they must require grad), native order, and so does
        the result. The batches are shared by the points (a vmap over the points around the
        vmap over the batches), not copied for each."""
        per_batch = vmap(self.native_loss)
        with torch.enable_grad():
            losses = vmap(per_batch, in_dims=(0, None, None))(list(thetas), self.X, self.Y)
            grads = torch.autograd.grad(losses.sum(), thetas, create_graph=True, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, thetas, strict=True)]

    def shared_batch_grads(
        self, leaves: Sequence[Tensor], batches: slice | Tensor | None = None
    ) -> list[Tensor]:
        """``g_i(theta)`` for every batch i (or those of ``batches``) at the one point
        ``leaves`` (one flat chunk per parameter, native order), by ``vmap(grad)``: with
        the leaves requiring grad, the result keeps its graph, and a backward pass through
        it with cotangents ``w_i`` gives ``sum_i H_i w_i`` at the leaves. Only that sum:
        there is no per-batch copy of theta to hold the terms apart, which is what makes it
        cheaper than :meth:`batch_grads_at` when batches are many and small (the per-batch
        products with the weights then never reach the parameters' shape)."""
        X, Y = (self.X, self.Y) if batches is None else (self.X[batches], self.Y[batches])
        with torch.enable_grad():
            out = vmap(grad(self.native_loss), in_dims=(None, 0, 0))(list(leaves), X, Y)
        return [g.contiguous() for g in out]

    def full_grad(self, theta: Tensor) -> Tensor:
        """``g = grad L``: ``(d,)``."""
        return grad(self.full_loss)(theta)

    def batch_hvps(self, theta: Tensor, index: Tensor, vectors: Tensor) -> Tensor:
        """``H_{index[p]}(theta) vectors[p]`` for every p, one vmapped forward-over-reverse."""

        def hvp(x: Tensor, y: Tensor, v: Tensor) -> Tensor:
            return jvp(lambda t: grad(self.loss)(t, x, y), (theta,), (v,))[1]

        return vmap(hvp)(self.X[index], self.Y[index], vectors)


def saved_bytes(
    build: Callable[[], list[Tensor]], persistent: Sequence[Tensor] = ()
) -> tuple[list[Tensor], int]:
    """Run ``build`` and return its result with the bytes of the distinct storages autograd
    saved for backward meanwhile (``saved_tensors_hooks``), leaving out those of
    ``persistent`` (parameters, data: they outlive the graph). Works on any device."""
    skip = {t.untyped_storage().data_ptr() for t in persistent}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage of its own
            return t
        ptr = storage.data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = build()
    return out, sum(seen.values())


def as_problem(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch] | Problem) -> Problem:
    return batches if isinstance(batches, Problem) else Problem(model, loss_fn, batches)

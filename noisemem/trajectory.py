"""Memoryful and memoryless trajectories for a batch sequence (Eq. (1), Eq. (4), Figure 1).

    memoryful      theta^(n+1)  = theta^(n)  - h F^(n)(theta^(n), ..., theta^(0))         (1)
    second order   theta~^(n+1) = theta~^(n) - h [F^(n)(theta~^(n)) + M^(n)(theta~^(n))]   (4)
    first order    theta^^(n+1) = theta^^(n) - h F^(n)(theta^^(n))

with F^(n)(theta) = F^(n)(theta, ..., theta) and M^(n) of Eq. (9) for the prefix
sequence[:n+1]. Corollary 3.3: over a horizon T (n <= T/h) the l_inf distance between (1) and
(4) is O(h^2), and O(h) to the first-order iteration; :func:`trajectories` records both
distances at every step (the paper's Figure 1 measurement).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from noisemem import checks
from noisemem.correction import check_correction_args, correction_at
from noisemem.memory import TAIL_TOL
from noisemem.optim import Optimizer, require_optimizer, require_smooth
from noisemem.probe import Probe
from noisemem.problem import Batch, LossFn, Problem, as_problem


def memoryful_steps(
    optimizer: Optimizer, theta: Tensor, gradient: Callable[[int, Tensor], Tensor], steps: int
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Iteration (1) from ``theta^(0) = theta``: yields ``(n, g^(n), theta^(n+1))`` for
    n = 0..steps-1, where ``g^(n) = gradient(n, theta^(n))`` is the gradient step n uses.

    The one memoryful iteration of noisemem: runs, a study's ensembles (``theta`` then holds
    one row per run, ``(P, d)``: the optimizer's update is elementwise) and its full-batch
    reference runs all take their steps here."""
    state = optimizer.init(theta)
    for n in range(steps):
        g = gradient(n, theta)
        F, state = optimizer.update(g, state, theta)
        theta = theta - optimizer.lr * F
        yield n, g, theta


@dataclass(frozen=True)
class Run:
    """Iterates ``theta^(0..N)`` (``(N+1, d)``); after divergence the rows are NaN and
    ``diverged_at`` is the first step whose iterate was not finite."""

    thetas: Tensor
    diverged_at: int | None = None


def _run(theta0: Tensor, iterates: Iterator[tuple[int, Tensor]], steps: int) -> Run:
    out = torch.full(
        (steps + 1, theta0.numel()), float("nan"), dtype=theta0.dtype, device=theta0.device
    )
    out[0] = theta0
    for n, theta in iterates:
        if not bool(torch.isfinite(theta).all()):
            return Run(out, diverged_at=n + 1)
        out[n + 1] = theta
    return Run(out)


def memoryful_run(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    optimizer: Optimizer,
    sequence: Sequence[int],
) -> Run:
    """Iteration (1) from the model's current parameters over ``sequence``."""
    require_optimizer(optimizer)
    problem = as_problem(model, loss_fn, batches)
    seq = checks.sequence_array(sequence, problem.num_batches)

    def gradient(n: int, theta: Tensor) -> Tensor:  # one backward pass, plain autograd
        i = int(seq[n])
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            loss = problem.loss(leaf, problem.X[i], problem.Y[i])
            (g,) = torch.autograd.grad(loss, leaf, allow_unused=True)
        return torch.zeros_like(theta) if g is None else g

    steps = memoryful_steps(optimizer, problem.theta, gradient, len(seq))
    return _run(problem.theta, ((n, theta) for n, _, theta in steps), len(seq))


def first_order_steps(
    problem: Problem, optimizer: Optimizer, seq: np.ndarray
) -> Iterator[tuple[int, Tensor]]:
    """The first-order memoryless iteration theta^^(n+1) = theta^^(n) - h F^(n)(theta^^(n)),
    with F^(n)(theta) = Phi(m^(n+1)) and every history slot at theta:
    ``m_l^(n+1) = b_l^(n+1) sum_i c_{l,i}^(n) G_l^i(theta)``, the weights carried from step
    to step (``c_l^(n) = beta_l c_l^(n-1) + e_{sigma(n)}``, a scalar for the PARAM source),
    and the batch gradients taken without a graph: a step costs the same at step 300 as at
    step 1."""
    theta = problem.theta
    variables = optimizer.variables
    weights = [np.zeros(problem.num_batches if v.source.uses_grad else 1) for v in variables]
    for n in range(len(seq)):
        G = problem.batch_grads(theta)  # (m, d)
        b = optimizer.scales(np.array([float(n)]))[:, 0]
        momenta = []
        for l, v in enumerate(variables):
            weights[l] *= v.beta
            weights[l][int(seq[n]) if v.source.uses_grad else 0] += 1.0
            source = v.source.value(G, theta) if v.source.uses_grad else theta[None]
            c = torch.as_tensor(weights[l], dtype=G.dtype, device=G.device)
            momenta.append(float(b[l]) * (c @ source))
        theta = theta - optimizer.lr * optimizer.phi(*momenta)
        yield n, theta


def memoryless_run(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    optimizer: Optimizer,
    sequence: Sequence[int],
    *,
    order: int = 2,
    tail_tol: float = TAIL_TOL,
) -> Run:
    """Iteration (4) (``order=2``) or its first-order version (``order=1``)."""
    if not checks.is_integer(order) or order not in (1, 2):
        raise checks.not_allowed("order", order, "use 1 or 2")
    if order == 2:
        check_correction_args(optimizer, tail_tol, "double_backward")
    else:
        require_optimizer(optimizer)
    problem = as_problem(model, loss_fn, batches)
    seq = checks.sequence_array(sequence, problem.num_batches)
    if order == 1:
        return _run(problem.theta, first_order_steps(problem, optimizer, seq), len(seq))

    def iterates() -> Iterator[tuple[int, Tensor]]:
        theta = problem.theta
        for n in range(len(seq)):
            probe = Probe(problem, theta)  # one graph of the batch gradients serves F and M
            step = probe.direction(optimizer, seq[: n + 1])
            step = step + correction_at(probe, optimizer, seq[: n + 1], tail_tol=tail_tol)
            theta = theta - optimizer.lr * step
            yield n, theta

    return _run(problem.theta, iterates(), len(seq))


@dataclass(frozen=True)
class Trajectories:
    """The three runs and their per-step l_inf distances ``(N+1,)`` to the memoryful one."""

    memoryful: Run
    first_order: Run
    second_order: Run
    linf_first: Tensor
    linf_second: Tensor


def trajectories(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    optimizer: Optimizer,
    sequence: Sequence[int],
) -> Trajectories:
    """Run (1), the first-order and the second-order memoryless iterations over ``sequence``."""
    require_smooth(optimizer)  # every argument checked before the first run starts
    problem = as_problem(model, loss_fn, batches)
    checks.sequence_array(sequence, problem.num_batches)
    full = memoryful_run(model, loss_fn, problem, optimizer, sequence)
    first = memoryless_run(model, loss_fn, problem, optimizer, sequence, order=1)
    second = memoryless_run(model, loss_fn, problem, optimizer, sequence, order=2)
    return Trajectories(
        memoryful=full,
        first_order=first,
        second_order=second,
        linf_first=(full.thetas - first.thetas).abs().amax(1),
        linf_second=(full.thetas - second.thetas).abs().amax(1),
    )

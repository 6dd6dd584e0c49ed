"""Brute-force twins of the engine, written independently of it.

* ``literal_F``: F^(n)(theta^(n), ..., theta^(0)) typed in from the paper's Examples 1.1-1.5
  (not from noisemem's momentum-variable description), with plain autograd gradients; for
  any other optimizer (one a user defines) the momentum sums over the whole history read
  off its description, term by term (the engine's grouping by batch is not used).
* ``literal_correction``: Eq. (9) with ``torch.autograd.functional.jacobian`` of F^(n) with
  respect to every history slot and the literal O(n^2) sums of F^(s).
* ``literal_memoryful_run``: the iteration (1) driven by ``literal_F`` over the whole history.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from noisemem.optim import AdamW, HeavyBall, Lion, NAdamW, Nesterov, Optimizer

Batch = tuple[Tensor, Tensor]


def flat_loss(model: nn.Module, loss_fn: Callable, theta: Tensor, batch: Batch) -> Tensor:
    shapes = [p.shape for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    chunks = torch.split(theta, [s.numel() for s in shapes])
    params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
    x, y = batch
    return loss_fn(functional_call(model, params, (x,)), y)


def batch_gradient(model: nn.Module, loss_fn: Callable, theta: Tensor, batch: Batch) -> Tensor:
    """g_i(theta) with create_graph, so that it can be differentiated again."""
    if not theta.requires_grad:
        theta = theta.requires_grad_(True)
    loss = flat_loss(model, loss_fn, theta, batch)
    return torch.autograd.grad(loss, theta, create_graph=True)[0]


def literal_F(
    opt: Optimizer,
    history: Sequence[Tensor],
    sequence: Sequence[int],
    grad_of: Callable[[Tensor, int], Tensor],
) -> Tensor:
    """F^(n)(theta^(n), ..., theta^(0)), history[k] = theta^(k), n = len(history) - 1."""
    n = len(history) - 1
    g = [grad_of(history[k], sequence[k]) for k in range(n + 1)]
    if isinstance(opt, HeavyBall):
        return sum(opt.beta ** (n - k) * g[k] for k in range(n + 1))
    if isinstance(opt, Nesterov):
        return opt.beta * sum(opt.beta ** (n - k) * g[k] for k in range(n + 1)) + g[n]
    if isinstance(opt, AdamW | NAdamW):
        b1, b2 = opt.beta1, opt.beta2
        m1 = (1 - b1) / (1 - b1 ** (n + 1)) * sum(b1 ** (n - k) * g[k] for k in range(n + 1))
        m2 = (1 - b2) / (1 - b2 ** (n + 1)) * sum(b2 ** (n - k) * g[k] ** 2 for k in range(n + 1))
        if opt.eps_in_sqrt:
            denom = torch.sqrt(m2 + opt.eps)
        else:
            denom = torch.sqrt(m2) + opt.eps
        if isinstance(opt, NAdamW):
            assert opt.momentum_decay is None, "the literal form is the paper's Example 1.4"
            num = b1 * m1 + (1 - b1) * g[n]
        else:
            num = m1
        return num / denom + opt.weight_decay * history[n]
    if isinstance(opt, Lion):
        r1, r2 = opt.rho1, opt.rho2
        c = (1 - r2) / (1 - r2 ** (n + 1)) if opt.bias_correction else 1 - r2
        m1 = -c * (r1 / r2) * sum(r2 ** (n - k) * g[k] for k in range(n + 1))
        m2 = -(1 - r1 / r2) * g[n]
        x = m1 + m2
        assert opt.eps is not None
        return -x / torch.sqrt(x**2 + opt.eps) + opt.weight_decay * history[n]
    b = opt.scales(torch.arange(n + 1.0).numpy())[:, n]
    momenta = []
    for v, b_l in zip(opt.variables, b, strict=True):
        terms = [v.beta ** (n - k) * v.source.value(g[k], history[k]) for k in range(n + 1)]
        momenta.append(float(b_l) * sum(terms))
    return opt.phi(*momenta)


def literal_correction(
    model: nn.Module,
    loss_fn: Callable,
    batches: Sequence[Batch],
    opt: Optimizer,
    sequence: Sequence[int],
    theta: Tensor,
) -> Tensor:
    """Eq. (9) verbatim: h sum_k dF^(n)/dtheta^(n-k) . sum_{s=n-k}^{n-1} F^(s)."""
    n = len(sequence) - 1

    def grad_of(t: Tensor, i: int) -> Tensor:
        return batch_gradient(model, loss_fn, t, batches[i])

    def F_of_history(*hist: Tensor) -> Tensor:
        return literal_F(opt, list(hist), sequence, grad_of)

    theta = theta.detach()
    jac = torch.autograd.functional.jacobian(
        F_of_history, tuple(theta.clone() for _ in range(n + 1))
    )
    F_s = [
        literal_F(opt, [theta.clone() for _ in range(s + 1)], sequence, grad_of).detach()
        for s in range(n)
    ]
    M = torch.zeros_like(theta)
    for k in range(1, n + 1):
        u = sum(F_s[s] for s in range(n - k, n))
        M = M + jac[n - k] @ u
    return opt.lr * M


def literal_memoryful_run(
    model: nn.Module,
    loss_fn: Callable,
    batches: Sequence[Batch],
    opt: Optimizer,
    sequence: Sequence[int],
    theta0: Tensor,
) -> list[Tensor]:
    """theta^(0..N) of the iteration (1), re-evaluating F^(n) over the whole history."""

    def grad_of(t: Tensor, i: int) -> Tensor:
        return batch_gradient(model, loss_fn, t.detach().clone(), batches[i]).detach()

    hist = [theta0.detach().clone()]
    for n in range(len(sequence)):
        F = literal_F(opt, hist, sequence[: n + 1], grad_of)
        hist.append((hist[-1] - opt.lr * F).detach())
    return hist

"""Full-batch memoryless predictions: Appendix E and Lemmas K.1-K.3 (THEORY §6).

In the full-batch case every ``g_l`` is the full-loss quantity, and Eq. (9) has closed forms.
``step=n`` gives the exact finite-n correction, ``step=None`` the n -> infinity limit.
Notation: g = grad L, H = hess L, h = lr, ``||g||_{1,eps} = sum_i sqrt(g_i^2 + eps)``.

The closed forms are looked up by the optimizer's class (:data:`CLOSED_FORMS`; register one
for an optimizer of your own with :func:`closed_form`). Without one, the finite-n correction
is Eq. (9) itself on the full batch repeated n + 1 times (exact: every batch is then the full
batch), and the limit is refused with :class:`NoClosedForm`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from noisemem import checks
from noisemem.correction import correction_at
from noisemem.optim import AdamW, HeavyBall, Lion, NAdamW, Nesterov, Optimizer, require_smooth
from noisemem.probe import Probe
from noisemem.problem import Batch, LossFn, Problem, as_problem

if TYPE_CHECKING:
    from noisemem.ensemble import EnsembleProbe

#: a closed form: (probe at theta, optimizer, step or None for the limit) -> M, or None
#: where it does not apply (the generic finite-n evaluation is used then)
ClosedForm = Callable[[Probe, Optimizer, int | None], Tensor | None]
#: the closed forms, by optimizer class (exactly: a subclass may change the scales)
CLOSED_FORMS: dict[type[Optimizer], ClosedForm] = {}


class NoClosedForm(ValueError):
    """The n -> infinity limit was asked for an optimizer without a closed form."""


def closed_form(*classes: type[Optimizer]) -> Callable[[ClosedForm], ClosedForm]:
    """Register ``fn`` as the full-batch closed form of ``classes``."""

    def register(fn: ClosedForm) -> ClosedForm:
        for cls in classes:
            CLOSED_FORMS[cls] = fn
        return fn

    return register


def heavy_ball_coefficient(beta: float, step: int | None) -> float:
    """Lemma K.1: M = h c H g with c = beta[1-(2n+1)beta^n(1-beta)-beta^(2n+1)]/(1-beta)^3.

    (The paper writes it as h c/2 grad||grad L||^2; grad||g||^2 = 2 H g.) Limit: beta/(1-beta)^3.
    """
    if step is None:
        return beta / (1 - beta) ** 3
    n = step
    return beta * (1 - (2 * n + 1) * beta**n * (1 - beta) - beta ** (2 * n + 1)) / (1 - beta) ** 3


def nesterov_coefficient(beta: float, step: int | None) -> float:
    """Nesterov, M = h c H g, derived like Lemma K.1 from F^(s) = (1 - beta^(s+2))/(1-beta) g
    and dF^(n)/dtheta^(n-k) = beta^(k+1) H:

        c = sum_{k=1..n} beta^(k+1) sum_{s=n-k..n-1} (1 - beta^(s+2))/(1-beta)
          = beta c_K1(n) + beta^(n+2)/(1-beta) [n - beta (1-beta^n)/(1-beta)],

    c_K1 the heavy-ball coefficient. Limit: beta^2/(1-beta)^3 (Appendix E).
    """
    if step is None:
        return beta**2 / (1 - beta) ** 3
    n = step
    tail = beta ** (n + 2) / (1 - beta) * (n - beta * (1 - beta**n) / (1 - beta))
    return beta * heavy_ball_coefficient(beta, n) + tail


def adam_memory_weight(beta: float, step: int | None) -> float:
    """``a = b^(n+1) sum_{k=1..n} k beta^k = beta/(1-beta) - (n+1) beta^(n+1)/(1-beta^(n+1))``
    (Lemma K.2), ``beta/(1-beta)`` in the limit."""
    if step is None:
        return beta / (1 - beta)
    n = step
    if beta == 0.0:
        return 0.0
    return beta / (1 - beta) - (n + 1) * beta ** (n + 1) / (1 - beta ** (n + 1))


@closed_form(HeavyBall)
def _heavy_ball(probe: Probe, opt: HeavyBall, step: int | None) -> Tensor:
    """Lemma K.1: M = h c H g."""
    return opt.lr * heavy_ball_coefficient(opt.beta, step) * probe.hessian_gradient()


@closed_form(Nesterov)
def _nesterov(probe: Probe, opt: Nesterov, step: int | None) -> Tensor:
    """Nesterov's analogue of Lemma K.1: M = h c H g."""
    return opt.lr * nesterov_coefficient(opt.beta, step) * probe.hessian_gradient()


@closed_form(AdamW, NAdamW)
def _adam_family(probe: Probe, opt: AdamW | NAdamW, step: int | None) -> Tensor | None:
    """Lemma K.2 (AdamW) and its NAdam analogue, both eps conventions.

    eps inside the sqrt (the paper's), with D = g^2 + eps:
        M = h (c1 a1 - a2 + eps a2 / D) / sqrt(D) * H phi,   phi = g/sqrt(D) + lambda theta
    (H phi = grad||g||_{1,eps} + lambda H theta). eps outside (PyTorch's), with r = |g|:
        M = h (c1 a1 / (r + eps) - a2 r / (r + eps)^2) * H phi,   phi = g/(r + eps) + lambda theta
    derived the same way from d/dm2 [m1/(sqrt(m2)+eps)] = -m1/(2 sqrt(m2)(sqrt(m2)+eps)^2).
    c1 = 1 for AdamW, beta1 for NAdam (Appendix E: beta1^2 in place of beta1 in the limit).
    Exact at finite n because bias correction makes F^(s)(theta) = phi for every s. NAdam
    with PyTorch's momentum schedule (``momentum_decay`` set) has no closed form at finite n
    (None: the generic evaluation); its limit is the paper's, since mu_t -> beta1.
    """
    if isinstance(opt, NAdamW) and opt.momentum_decay is not None and step is not None:
        return None
    theta = probe.theta
    g = probe.full_grad()
    a1 = adam_memory_weight(opt.beta1, step)
    a2 = adam_memory_weight(opt.beta2, step)
    c1 = opt.beta1 if isinstance(opt, NAdamW) else 1.0
    if opt.eps_in_sqrt:
        D = g * g + opt.eps
        phi = g / torch.sqrt(D) + opt.weight_decay * theta
        coef = (c1 * a1 - a2 + opt.eps * a2 / D) / torch.sqrt(D)
    else:
        r = torch.abs(g)
        phi = g / (r + opt.eps) + opt.weight_decay * theta
        coef = c1 * a1 / (r + opt.eps) - a2 * r / (r + opt.eps) ** 2
    return opt.lr * coef * probe.full_hvp(phi)


@closed_form(Lion)
def _lion(probe: Probe, opt: Lion, step: int | None) -> Tensor:
    """Lemma K.3 and its bias-corrected variant (Appendix L); hess K diagonal.

    No bias correction, finite n:
        M = h rho1 (1-rho2) hessK(-(1-rho1 rho2^n) g) . H v,
        v = sum_{k=1..n} rho2^(k-1) sum_{s=n-k..n-1} F_s
          = sum_{s=0..n-1} rho2^(n-s-1) (1-rho2^(s+1))/(1-rho2) F_s,
        F_s = -gradK(-(1-rho1 rho2^s) g) + lambda theta.
    Bias correction: F^(s) = -gradK(-g) + lambda theta for every s, and
        M = h rho1 [1/(1-rho2) - (n+1) rho2^n/(1-rho2^(n+1))] hessK(-g) . H F.
    Limit (both): M = -h rho1/(1-rho2) hessK(-g) H [gradK(-g) - lambda theta].
    """
    theta = probe.theta
    g = probe.full_grad()
    r1, r2, lam = opt.rho1, opt.rho2, opt.weight_decay
    if step is None or opt.bias_correction:
        F = -opt.grad_k(-g) + lam * theta
        if step is None:
            coef = r1 / (1 - r2)
        else:
            n = step
            coef = r1 * (1 / (1 - r2) - (n + 1) * r2**n / (1 - r2 ** (n + 1)))
        return opt.lr * coef * opt.hess_k(-g) * probe.full_hvp(F)
    n = step
    v = torch.zeros_like(theta)
    for s in range(n):
        weight = r2 ** (n - s - 1) * (1 - r2 ** (s + 1)) / (1 - r2)
        v = v + weight * (-opt.grad_k(-(1 - r1 * r2**s) * g) + lam * theta)
    H_v = probe.full_hvp(v)
    return opt.lr * r1 * (1 - r2) * opt.hess_k(-(1 - r1 * r2**n) * g) * H_v


def full_batch_correction(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    optimizer: Optimizer,
    *,
    step: int | None = None,
) -> Tensor:
    """Full-batch memoryless correction M^(n) (Appendix E, Lemmas K.1-K.3), flat ``(d,)``.

    The full loss is ``L = mean_i L_i`` over ``batches``. ``step=None`` is the n -> infinity
    limit; ``step=n`` the exact value at step n. Closed forms: heavy ball (K.1), Nesterov,
    AdamW and NAdam (K.2, both eps conventions), Lion-K with eps > 0 (K.3, with or without
    bias correction). Any other smooth optimizer (and NAdam with PyTorch's momentum schedule)
    gets Eq. (9) on the full batch repeated n+1 times at finite n; its limit raises
    :class:`NoClosedForm`.
    """
    require_smooth(optimizer)
    if step is not None:
        step = checks.integer(
            "step", step, 0, allowed="step must be None (the limit) or an int >= 0"
        )
    problem = as_problem(model, loss_fn, batches)
    return full_batch_prediction(problem, optimizer, step)


def closed_form_at(
    probe: Probe | EnsembleProbe, optimizer: Optimizer, step: int | None
) -> Tensor | None:
    """The registered closed form of ``optimizer`` at the probe's point, or None where it
    has none (for this step). ``probe``: a :class:`~noisemem.probe.Probe`, or an
    :class:`~noisemem.ensemble.EnsembleProbe` (then ``(P, d)``, one row per point: the
    forms are coordinatewise in g, theta and the products)."""
    form = CLOSED_FORMS.get(type(optimizer))
    return None if form is None else form(probe, optimizer, step)


def full_batch_prediction(
    problem: Problem, optimizer: Optimizer, step: int | None, probe: Probe | None = None
) -> Tensor:
    """:func:`full_batch_correction` at ``problem.theta`` (arguments already checked).

    g and the Hessian-vector products come from ``probe`` (a :class:`Probe` of ``problem``,
    built here if not given): one backward pass through its batch gradients' graph, and none
    for heavy ball and Nesterov once the probe holds H g (:meth:`Probe.hessian_gradient`).
    """
    M = closed_form_at(probe if probe is not None else Probe(problem), optimizer, step)
    if M is not None:
        return M
    if step is None:
        raise NoClosedForm(
            f"optimizer: {optimizer.name} has no closed full-batch limit (step=None); give a "
            "finite step, or register one with noisemem.full_batch.closed_form"
        )
    full = Probe(problem.full_batch())
    return correction_at(full, optimizer, [0] * (step + 1), tail_tol=0.0)

"""Optimizers with memory in history form (THEORY §2, the paper's Examples 1.1-1.5).

Each optimizer is a small, pure description of its momentum variables (Assumption D.1):

    m_l^(n+1) = b_l^(n+1) * sum_{j=0..n} beta_l^(n-j) * G_l^{sigma(j)}(theta^(j))
    F^(n)     = Phi(m_1^(n+1), ..., m_L^(n+1))
    theta^(n+1) = theta^(n) - lr * F^(n)

with ``G_l`` one of ``g``, ``-g``, ``g**2`` (elementwise) or ``theta`` (a :class:`Source`),
a decay ``beta_l`` and a scale ``b_l^(n+1)`` (:meth:`Optimizer.scales`), and Phi either in
closed form (:class:`Form`: a sum, Adam's quotient, a soft sign) or as any elementwise
function (:meth:`Optimizer.phi`). The memoryful run (:meth:`Optimizer.init` /
:meth:`Optimizer.update`), Eq. (9) (:mod:`noisemem.correction`, whose fused CPU kernel reads
the form), the exact expectations (:attr:`Optimizer.linear`) and the full-batch formulas
(:mod:`noisemem.full_batch`) all read this one description, so a new optimizer is one new
subclass, written anywhere (see :class:`Optimizer`).

State follows optax: ``init(theta) -> state`` and ``update(grad, state, theta) ->
(direction, state)`` are pure; the state holds the step count and the *unscaled* sums
``S_l^(n+1) = beta_l S_l^(n) + G_l^{sigma(n)}(theta^(n))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from noisemem import checks


class Source(StrEnum):
    """What a momentum variable averages: ``G_l(theta)`` for one mini-batch gradient ``g``."""

    GRAD = "grad"  # g
    NEG_GRAD = "neg_grad"  # -g (Lion's convention)
    GRAD_SQ = "grad_sq"  # g**2, elementwise
    PARAM = "param"  # theta (decoupled weight decay)

    def value(self, g: Tensor, theta: Tensor) -> Tensor:
        """``G(theta)`` given the gradient ``g`` at ``theta``."""
        if self is Source.GRAD:
            return g
        if self is Source.NEG_GRAD:
            return -g
        if self is Source.GRAD_SQ:
            return g * g
        return theta.expand_as(g)

    def tangent(self, g: Tensor, hv: Tensor, v: Tensor) -> Tensor:
        """``J[G](theta) v`` given ``g``, the Hessian-vector product ``hv = H v`` and ``v``.

        J[g] = H, J[-g] = -H, J[g^2] = 2 diag(g) H, J[theta] = I (THEORY §3).
        """
        if self is Source.GRAD:
            return hv
        if self is Source.NEG_GRAD:
            return -hv
        if self is Source.GRAD_SQ:
            return 2.0 * g * hv
        return v

    @property
    def uses_grad(self) -> bool:
        return self is not Source.PARAM


@dataclass(frozen=True)
class MomentumVariable:
    """One momentum variable: its source ``G_l`` and its decay ``beta_l``."""

    source: Source
    beta: float


class OptState(NamedTuple):
    """Memoryful optimizer state: ``count`` = steps taken, ``sums[l]`` = unscaled ``S_l``."""

    count: int
    sums: tuple[Tensor, ...]


#: the kinds of :class:`Form`
FORM_KINDS = ("sum", "adam", "soft_sign", "sign")


@dataclass(frozen=True)
class Form:
    """Phi in closed form, over the momenta grouped by their source:

        x = sum of the momenta whose source is a gradient (GRAD or NEG_GRAD),
        q = the GRAD_SQ momentum,  p = sum of the PARAM momenta (0 when there is none)

    ``kind``:

    * ``"sum"``: F = x + p (heavy ball, Nesterov; with GRAD sources only, F is linear in
      the gradients and the exact expectations of THEORY §4 exist);
    * ``"adam"``: F = x / sqrt(q + eps) + p (``eps_in_sqrt``), x / (sqrt(q) + eps) + p
      (outside, PyTorch's; the root is guarded as :func:`_adam_step` says);
    * ``"soft_sign"``: F = -x / sqrt(x^2 + eps) + p (Lion-K with K = ||.||_{1,eps});
    * ``"sign"``: F = -sign(x) + p (ordinary Lion: not differentiable, runs only).
    """

    kind: str
    eps: float = 0.0
    eps_in_sqrt: bool = True

    def __post_init__(self) -> None:
        checks.choice("form.kind", self.kind, FORM_KINDS)


def _groups(variables: tuple[MomentumVariable, ...]) -> tuple[list[int], list[int], list[int]]:
    """Indices of the gradient, GRAD_SQ and PARAM variables (the x, q and p of :class:`Form`)."""
    grads = [l for l, v in enumerate(variables) if v.source in (Source.GRAD, Source.NEG_GRAD)]
    squares = [l for l, v in enumerate(variables) if v.source is Source.GRAD_SQ]
    params = [l for l, v in enumerate(variables) if v.source is Source.PARAM]
    return grads, squares, params


def _sum(terms: list[Tensor]) -> Tensor | None:
    out = None
    for t in terms:
        out = t if out is None else out + t
    return out


def _lr(owner: str, lr: float) -> None:
    checks.real(
        "lr", lr, low=0.0, low_open=True, allowed="lr must be a finite number > 0", owner=owner
    )


def _unit(owner: str, name: str, value: float, *, open_left: bool = False) -> None:
    interval = "(0, 1)" if open_left else "[0, 1)"
    checks.real(
        name,
        value,
        low=0.0,
        high=1.0,
        low_open=open_left,
        high_open=True,
        allowed=f"{name} must lie in {interval}",
        owner=owner,
    )


def _positive(owner: str, name: str, value: float) -> None:
    checks.real(name, value, low=0.0, low_open=True, allowed=f"{name} must be > 0", owner=owner)


def _nonnegative(owner: str, name: str, value: float) -> None:
    checks.real(name, value, low=0.0, allowed=f"{name} must be >= 0", owner=owner)


def _bias_scale(beta: float, n: np.ndarray) -> np.ndarray:
    """Adam's bias-corrected scale ``(1 - beta) / (1 - beta^(n+1))``."""
    return (1.0 - beta) / (1.0 - beta ** (n + 1.0))


class Optimizer:
    """An optimizer with memory, described by its momentum variables (Assumption D.1).

    A subclass (a frozen dataclass of its hyperparameters, in any module) defines
    ``variables`` (:class:`MomentumVariable` s), :meth:`scales` and either :attr:`form` (Phi
    in closed form: runs, Eq. (9), the fused CPU window and the exact expectations then
    follow from it) or :meth:`phi` (any elementwise, differentiable Phi: runs and Eq. (9) in
    torch). It validates its hyperparameters in ``__post_init__``. For example RMSProp,
    F = g / sqrt(m_2 + eps) with m_2 = (1 - beta2) sum beta2^(n-k) g^2::

        @dataclass(frozen=True)
        class RMSProp(Optimizer):
            lr: float
            beta2: float
            eps: float

            @property
            def variables(self):
                return (MomentumVariable(Source.GRAD, 0.0),
                        MomentumVariable(Source.GRAD_SQ, self.beta2))

            @property
            def form(self):
                return Form("adam", self.eps)

            def scales(self, n):
                n = np.asarray(n, dtype=np.float64).reshape(-1)
                return np.stack([np.ones(n.size), np.full(n.size, 1.0 - self.beta2)])
    """

    lr: float
    variables: tuple[MomentumVariable, ...]

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def form(self) -> Form | None:
        """Phi in closed form, or None when only :meth:`phi` defines it."""
        return None

    @property
    def linear(self) -> bool:
        """F is linear in the gradients (a ``"sum"`` form over GRAD sources): the exact
        expectations of THEORY §4 exist only for these."""
        form = self.form
        return (
            form is not None
            and form.kind == "sum"
            and all(v.source is Source.GRAD for v in self.variables)
        )

    @property
    def smooth(self) -> bool:
        """Phi is differentiable, so Eq. (9) is defined."""
        form = self.form
        return form is None or form.kind != "sign"

    def scales(self, n: np.ndarray) -> np.ndarray:
        """``b_l^(n+1)`` for each variable ``l`` (rows) and step ``n`` (columns), float64."""
        raise NotImplementedError

    def phi(self, *m: Tensor) -> Tensor:
        """``F = Phi(m_1, ..., m_L)``; elementwise, so it broadcasts over leading dims. By
        default read off :attr:`form`."""
        form = self.form
        if form is None:
            raise NotImplementedError(f"{self.name}: define phi() or form")
        grads, squares, params = _groups(self.variables)
        x = _sum([m[l] for l in grads])
        p = _sum([m[l] for l in params])
        assert x is not None, "a form needs a momentum variable of the gradient"
        if form.kind == "sum":
            return x if p is None else x + p
        if form.kind == "adam":
            (q,) = squares
            return _adam_step(x, m[q], p, form.eps, form.eps_in_sqrt)
        step = torch.sign(x) if form.kind == "sign" else x / torch.sqrt(x * x + form.eps)
        return -step if p is None else p - step

    # -- the memoryful iteration (1) ------------------------------------------------------
    def init(self, theta: Tensor) -> OptState:
        return OptState(0, tuple(torch.zeros_like(theta) for _ in self.variables))

    def update(self, grad: Tensor, state: OptState, theta: Tensor) -> tuple[Tensor, OptState]:
        """One step: returns ``F^(n)`` (the step is ``theta - lr * F``) and the new state."""
        sums = tuple(
            v.beta * s + v.source.value(grad, theta)
            for v, s in zip(self.variables, state.sums, strict=True)
        )
        new = OptState(state.count + 1, sums)
        b = self.scales(np.array([new.count - 1.0]))[:, 0]
        return self.phi(*(float(b_l) * s for b_l, s in zip(b, sums, strict=True))), new


def require_optimizer(optimizer: object) -> None:
    """``optimizer`` must be a description of :mod:`noisemem.optim` (or a subclass of it)."""
    if not isinstance(optimizer, Optimizer):
        raise ValueError(
            f"optimizer={optimizer!r} is not allowed; use one of noisemem.optim's "
            f"{', '.join(OPTIMIZERS)} or a subclass of noisemem.optim.Optimizer (a torch.optim "
            "object does not describe its memory)"
        )


def require_smooth(optimizer: object) -> None:
    """``optimizer`` must be a description whose Phi is differentiable (Eq. (9) exists)."""
    require_optimizer(optimizer)
    assert isinstance(optimizer, Optimizer)
    if not optimizer.smooth:
        raise ValueError(
            f"optimizer: {optimizer!r} is not differentiable, so Eq. (9) is undefined; "
            "for Lion use eps > 0 (the soft sign K = ||x||_{1,eps})"
        )


class _MomentumHyperparameters:
    """What heavy ball and Nesterov share: the checks of lr and beta, and Phi = the sum of
    the momenta (F is linear in the gradients)."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        _lr(name, self.lr)  # type: ignore[attr-defined]
        _unit(name, "beta", self.beta)  # type: ignore[attr-defined]

    @property
    def form(self) -> Form:
        return Form("sum")


@dataclass(frozen=True)
class HeavyBall(_MomentumHyperparameters, Optimizer):
    """Heavy-ball momentum (Example 1.1) = ``torch.optim.SGD(momentum=beta, dampening=0)``.

    F^(n) = m_1^(n+1) = sum_{k=0..n} beta^(n-k) g^{sigma(k)}(theta^(k)).
    """

    lr: float
    beta: float

    @property
    def variables(self) -> tuple[MomentumVariable, ...]:  # type: ignore[override]
        return (MomentumVariable(Source.GRAD, self.beta),)

    def scales(self, n: np.ndarray) -> np.ndarray:
        return np.ones((1, np.size(n)))


@dataclass(frozen=True)
class Nesterov(_MomentumHyperparameters, Optimizer):
    """Nesterov momentum (Example 1.2) = ``torch.optim.SGD(momentum=beta, nesterov=True)``.

    F^(n) = beta * sum_{k=0..n} beta^(n-k) g^{sigma(k)}(theta^(k)) + g^{sigma(n)}(theta^(n)).
    """

    lr: float
    beta: float

    @property
    def variables(self) -> tuple[MomentumVariable, ...]:  # type: ignore[override]
        return (MomentumVariable(Source.GRAD, self.beta), MomentumVariable(Source.GRAD, 0.0))

    def scales(self, n: np.ndarray) -> np.ndarray:
        k = np.size(n)
        return np.stack([np.full(k, self.beta), np.ones(k)])


def _adam_step(x: Tensor, m2: Tensor, p: Tensor | None, eps: float, eps_in_sqrt: bool) -> Tensor:
    """``x/sqrt(m2 + eps) + p`` (eps inside) or ``x/(sqrt(m2) + eps) + p`` (outside).

    Eps outside: where ``m2 = 0`` every gradient in the memory is 0 there, so ``x = 0`` too
    and the step ``x/(sqrt(m2) + eps)`` is differentiable, with derivative ``dx/eps``; but
    sqrt's own derivative at 0 is infinite, and a JVP or backward would form 0 * inf = NaN
    (a dead input feature, such as the digits' always-zero pixels, does this). The root is
    therefore taken only where ``m2 > 0`` and set to 0 elsewhere, with zero derivative.
    """
    if eps_in_sqrt:
        scale = torch.rsqrt(m2 + eps)
        return x * scale if p is None else torch.addcmul(p, x, scale)
    pos = m2 > 0
    root = torch.where(pos, torch.sqrt(torch.where(pos, m2, 1.0)), 0.0) + eps
    return x / root if p is None else torch.addcdiv(p, x, root)


class _AdamHyperparameters:
    """The checks AdamW and NAdamW share (lr, beta1, beta2, eps, weight_decay, eps_in_sqrt)."""

    def _check_adam(self) -> None:
        name = type(self).__name__
        _lr(name, self.lr)  # type: ignore[attr-defined]
        _unit(name, "beta1", self.beta1)  # type: ignore[attr-defined]
        _unit(name, "beta2", self.beta2)  # type: ignore[attr-defined]
        _positive(name, "eps", self.eps)  # type: ignore[attr-defined]
        _nonnegative(name, "weight_decay", self.weight_decay)  # type: ignore[attr-defined]
        checks.flag("eps_in_sqrt", self.eps_in_sqrt, owner=name)  # type: ignore[attr-defined]

    @property
    def form(self) -> Form:
        return Form("adam", float(self.eps), self.eps_in_sqrt)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class AdamW(_AdamHyperparameters, Optimizer):
    """AdamW (Example 1.3) with bias correction and decoupled weight decay.

    F^(n) = m_1/sqrt(m_2 + eps) + weight_decay * theta^(n)   (eps_in_sqrt=True, the paper's)
    F^(n) = m_1/(sqrt(m_2) + eps) + weight_decay * theta^(n) (eps_in_sqrt=False, PyTorch's)
    with m_1 = (1-beta1)/(1-beta1^(n+1)) sum beta1^(n-k) g, m_2 likewise with g**2.
    With eps_in_sqrt=False this is ``torch.optim.AdamW`` (and ``Adam`` when weight_decay=0).
    """

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float = 0.0
    eps_in_sqrt: bool = True

    def __post_init__(self) -> None:
        self._check_adam()

    @property
    def variables(self) -> tuple[MomentumVariable, ...]:  # type: ignore[override]
        return (
            MomentumVariable(Source.GRAD, self.beta1),
            MomentumVariable(Source.GRAD_SQ, self.beta2),
            MomentumVariable(Source.PARAM, 0.0),
        )

    def scales(self, n: np.ndarray) -> np.ndarray:
        n = np.asarray(n, dtype=np.float64).reshape(-1)
        return np.stack(
            [
                _bias_scale(self.beta1, n),
                _bias_scale(self.beta2, n),
                np.full(n.size, float(self.weight_decay)),
            ]
        )


@dataclass(frozen=True)
class NAdamW(_AdamHyperparameters, Optimizer):
    """NAdam with decoupled weight decay (Example 1.4).

    F^(n) = (c_1 S_1 + c_4 g^{sigma(n)}(theta^(n))) / sqrt(m_2 + eps) + weight_decay * theta^(n)
    with S_1 = sum beta1^(n-k) g and m_2 as in AdamW. The scales depend on ``momentum_decay``:

    * ``None`` (the paper's Example 1.4): c_1 = beta1 (1-beta1)/(1-beta1^(n+1)), c_4 = 1-beta1.
    * a number psi (PyTorch's schedule, ``torch.optim.NAdam(momentum_decay=psi,
      decoupled_weight_decay=True)``): mu_t = beta1 (1 - 0.5 * 0.96^(t psi)), t = n+1,
      c_1 = (1-beta1) mu_{t+1} / (1 - prod_{i<=t+1} mu_i), c_4 = (1-mu_t)/(1 - prod_{i<=t} mu_i).

    As psi -> infinity, mu_t -> beta1 and the schedule's scales become bias-corrected
    versions of the paper's: c_1 -> beta1 (1-beta1)/(1-beta1^(n+2)) and
    c_4 -> (1-beta1)/(1-beta1^(n+1)). Their n -> infinity limits are the same.
    """

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float = 0.0
    eps_in_sqrt: bool = True
    momentum_decay: float | None = None

    def __post_init__(self) -> None:
        self._check_adam()
        if self.momentum_decay is not None:
            _nonnegative(self.name, "momentum_decay", self.momentum_decay)

    @property
    def variables(self) -> tuple[MomentumVariable, ...]:  # type: ignore[override]
        return (
            MomentumVariable(Source.GRAD, self.beta1),
            MomentumVariable(Source.GRAD_SQ, self.beta2),
            MomentumVariable(Source.PARAM, 0.0),
            MomentumVariable(Source.GRAD, 0.0),
        )

    def _mu(self, t: np.ndarray) -> np.ndarray:
        assert self.momentum_decay is not None
        return self.beta1 * (1.0 - 0.5 * 0.96 ** (t * self.momentum_decay))

    def scales(self, n: np.ndarray) -> np.ndarray:
        n = np.asarray(n, dtype=np.float64).reshape(-1)
        b1 = self.beta1
        if self.momentum_decay is None:
            c1 = b1 * _bias_scale(b1, n)
            c4 = np.full(n.size, 1.0 - b1)
        else:
            t_max = int(n.max()) + 2 if n.size else 1
            t = np.arange(1, t_max + 1, dtype=np.float64)
            mu = self._mu(t)
            prod = np.cumprod(mu)  # prod[t-1] = prod_{i<=t} mu_i
            ti = (n + 1).astype(np.int64)
            c1 = (1.0 - b1) * mu[ti] / (1.0 - prod[ti])
            c4 = (1.0 - mu[ti - 1]) / (1.0 - prod[ti - 1])
        return np.stack(
            [c1, _bias_scale(self.beta2, n), np.full(n.size, float(self.weight_decay)), c4]
        )


@dataclass(frozen=True)
class Lion(Optimizer):
    """Lion-K (Example 1.5; with ``bias_correction`` the variant of Appendix L).

    F^(n) = -grad K(m_1 + m_2) + weight_decay * theta^(n), with
    m_1 = -(1-rho2)(rho1/rho2) [/(1-rho2^(n+1)) if bias_correction] sum rho2^(n-k) g,
    m_2 = -(1 - rho1/rho2) g^{sigma(n)}(theta^(n)).
    ``eps=None``: ordinary Lion, grad K = sign (not smooth: runs only, no Eq. (9)).
    ``eps > 0``: the soft sign grad K(x) = x / sqrt(x^2 + eps) of K = ||x||_{1,eps}.
    ``rho2`` must be > 0 because m_1 carries the factor rho1/rho2.
    """

    lr: float
    rho1: float
    rho2: float
    weight_decay: float = 0.0
    eps: float | None = None
    bias_correction: bool = False

    def __post_init__(self) -> None:
        _lr(self.name, self.lr)
        _unit(self.name, "rho1", self.rho1)
        _unit(self.name, "rho2", self.rho2, open_left=True)
        _nonnegative(self.name, "weight_decay", self.weight_decay)
        checks.flag("bias_correction", self.bias_correction, owner=self.name)
        if self.eps is not None:
            _positive(self.name, "eps", self.eps)

    @property
    def variables(self) -> tuple[MomentumVariable, ...]:  # type: ignore[override]
        return (
            MomentumVariable(Source.NEG_GRAD, self.rho2),
            MomentumVariable(Source.NEG_GRAD, 0.0),
            MomentumVariable(Source.PARAM, 0.0),
        )

    @property
    def form(self) -> Form:
        return Form("sign") if self.eps is None else Form("soft_sign", float(self.eps))

    def scales(self, n: np.ndarray) -> np.ndarray:
        n = np.asarray(n, dtype=np.float64).reshape(-1)
        r1, r2 = self.rho1, self.rho2
        b1 = np.full(n.size, (1.0 - r2) * r1 / r2)
        if self.bias_correction:
            b1 = b1 / (1.0 - r2 ** (n + 1.0))
        return np.stack(
            [b1, np.full(n.size, 1.0 - r1 / r2), np.full(n.size, float(self.weight_decay))]
        )

    def grad_k(self, x: Tensor) -> Tensor:
        """grad K: sign(x), or the soft sign x / sqrt(x^2 + eps)."""
        return torch.sign(x) if self.eps is None else x / torch.sqrt(x * x + self.eps)

    def hess_k(self, x: Tensor) -> Tensor:
        """Diagonal of hess K for the soft sign: eps / (x^2 + eps)^(3/2)."""
        if self.eps is None:
            raise ValueError("Lion: eps=None (sign) has no Hessian of K; set eps > 0")
        return self.eps / (x * x + self.eps) ** 1.5


OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.__name__: cls for cls in (HeavyBall, Nesterov, AdamW, NAdamW, Lion)
}

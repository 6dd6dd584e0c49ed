"""Optimizers with memory in history form (THEORY §2, the paper's Examples 1.1-1.5).

Each optimizer is a small, pure description of its momentum variables (Assumption D.1):

    m_l^(n+1) = b_l^(n+1) * sum_{j=0..n} beta_l^(n-j) * G_l^{sigma(j)}(theta^(j))
    F^(n)     = Phi(m_1^(n+1), ..., m_L^(n+1))
    theta^(n+1) = theta^(n) - lr * F^(n)

with ``G_l`` one of ``g``, ``-g``, ``g**2`` (elementwise) or ``theta`` (a :class:`Source`),
a decay ``beta_l`` and a scale ``b_l^(n+1)`` (:meth:`Optimizer.scales`). The memoryful run
(:meth:`Optimizer.init` / :meth:`Optimizer.update`), Eq. (9) (:mod:`noisemem.correction`) and
the full-batch formulas (:mod:`noisemem.full_batch`) all read this one description.

State follows optax: ``init(theta) -> state`` and ``update(grad, state, theta) ->
(direction, state)`` are pure; the state holds the step count and the *unscaled* sums
``S_l^(n+1) = beta_l S_l^(n) + G_l^{sigma(n)}(theta^(n))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


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


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_flag(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name}={value!r} is not allowed; {name} must be True or False")


def _check_lr(owner: str, lr: float) -> None:
    if not (_number(lr) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"{owner}: lr={lr!r} is not allowed; lr must be a finite number > 0")


def _check_unit(owner: str, name: str, value: float, *, open_left: bool = False) -> None:
    ok = _number(value) and (0 < value < 1 if open_left else 0 <= value < 1)
    if not ok:
        interval = "(0, 1)" if open_left else "[0, 1)"
        raise ValueError(f"{owner}: {name}={value!r} is not allowed; {name} must lie in {interval}")


def _check_positive(owner: str, name: str, value: float) -> None:
    if not (_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}: {name}={value!r} is not allowed; {name} must be > 0")


def _check_nonnegative(owner: str, name: str, value: float) -> None:
    if not (_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}: {name}={value!r} is not allowed; {name} must be >= 0")


def _bias_scale(beta: float, n: np.ndarray) -> np.ndarray:
    """Adam's bias-corrected scale ``(1 - beta) / (1 - beta^(n+1))``."""
    return (1.0 - beta) / (1.0 - beta ** (n + 1.0))


class Optimizer:
    """Common machinery: the memoryful iteration read off the momentum-variable description.

    Subclasses define ``variables``, :meth:`scales` and :meth:`phi`, and validate their
    hyperparameters in ``__post_init__``.
    """

    lr: float
    variables: tuple[MomentumVariable, ...]
    #: F is linear in the gradients (Phi = sum of the m_l, every source g): the exact
    #: expectations of THEORY §4 exist only for these.
    linear: bool = False
    #: Phi is differentiable, so Eq. (9) is defined.
    smooth: bool = True

    @property
    def name(self) -> str:
        return type(self).__name__

    def scales(self, n: np.ndarray) -> np.ndarray:
        """``b_l^(n+1)`` for each variable ``l`` (rows) and step ``n`` (columns), float64."""
        raise NotImplementedError

    def phi(self, *m: Tensor) -> Tensor:
        """``F = Phi(m_1, ..., m_L)``; elementwise, so it broadcasts over leading dims."""
        raise NotImplementedError

    # -- the memoryful iteration (1) ------------------------------------------------------
    def init(self, theta: Tensor) -> OptState:
        return OptState(0, tuple(torch.zeros_like(theta) for _ in self.variables))

    def momenta(self, state: OptState) -> tuple[Tensor, ...]:
        """``m_l^(n+1) = b_l^(n+1) S_l^(n+1)`` for the state after step n."""
        b = self.scales(np.array([state.count - 1.0]))[:, 0]
        return tuple(float(b_l) * s for b_l, s in zip(b, state.sums, strict=True))

    def update(self, grad: Tensor, state: OptState, theta: Tensor) -> tuple[Tensor, OptState]:
        """One step: returns ``F^(n)`` (the step is ``theta - lr * F``) and the new state."""
        sums = tuple(
            v.beta * s + v.source.value(grad, theta)
            for v, s in zip(self.variables, state.sums, strict=True)
        )
        new = OptState(state.count + 1, sums)
        return self.phi(*self.momenta(new)), new


@dataclass(frozen=True)
class HeavyBall(Optimizer):
    """Heavy-ball momentum (Example 1.1) = ``torch.optim.SGD(momentum=beta, dampening=0)``.

    F^(n) = m_1^(n+1) = sum_{k=0..n} beta^(n-k) g^{sigma(k)}(theta^(k)).
    """

    lr: float
    beta: float

    def __post_init__(self) -> None:
        _check_lr(self.name, self.lr)
        _check_unit(self.name, "beta", self.beta)

    @property
    def variables(self) -> tuple[MomentumVariable, ...]:  # type: ignore[override]
        return (MomentumVariable(Source.GRAD, self.beta),)

    linear = True

    def scales(self, n: np.ndarray) -> np.ndarray:
        return np.ones((1, np.size(n)))

    def phi(self, *m: Tensor) -> Tensor:
        return m[0]


@dataclass(frozen=True)
class Nesterov(Optimizer):
    """Nesterov momentum (Example 1.2) = ``torch.optim.SGD(momentum=beta, nesterov=True)``.

    F^(n) = beta * sum_{k=0..n} beta^(n-k) g^{sigma(k)}(theta^(k)) + g^{sigma(n)}(theta^(n)).
    """

    lr: float
    beta: float

    def __post_init__(self) -> None:
        _check_lr(self.name, self.lr)
        _check_unit(self.name, "beta", self.beta)

    @property
    def variables(self) -> tuple[MomentumVariable, ...]:  # type: ignore[override]
        return (MomentumVariable(Source.GRAD, self.beta), MomentumVariable(Source.GRAD, 0.0))

    linear = True

    def scales(self, n: np.ndarray) -> np.ndarray:
        k = np.size(n)
        return np.stack([np.full(k, self.beta), np.ones(k)])

    def phi(self, *m: Tensor) -> Tensor:
        return m[0] + m[1]


def _adam_step(m1: Tensor, m2: Tensor, m3: Tensor, eps: float, eps_in_sqrt: bool) -> Tensor:
    """``m1/sqrt(m2 + eps) + m3`` (eps inside) or ``m1/(sqrt(m2) + eps) + m3`` (outside).

    Eps outside: where ``m2 = 0`` every gradient in the memory is 0 there, so ``m1 = 0`` too
    and the step ``m1/(sqrt(m2) + eps)`` is differentiable, with derivative ``dm1/eps``; but
    sqrt's own derivative at 0 is infinite, and a JVP or backward would form 0 * inf = NaN
    (a dead input feature, such as the digits' always-zero pixels, does this). The root is
    therefore taken only where ``m2 > 0`` and set to 0 elsewhere, with zero derivative.
    """
    if eps_in_sqrt:
        return torch.addcmul(m3, m1, torch.rsqrt(m2 + eps))
    pos = m2 > 0
    root = torch.where(pos, torch.sqrt(torch.where(pos, m2, 1.0)), 0.0)
    return torch.addcdiv(m3, m1, root + eps)


@dataclass(frozen=True)
class AdamW(Optimizer):
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
        _check_lr(self.name, self.lr)
        _check_unit(self.name, "beta1", self.beta1)
        _check_unit(self.name, "beta2", self.beta2)
        _check_positive(self.name, "eps", self.eps)
        _check_nonnegative(self.name, "weight_decay", self.weight_decay)
        _check_flag(self.name, "eps_in_sqrt", self.eps_in_sqrt)

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

    def phi(self, *m: Tensor) -> Tensor:
        return _adam_step(m[0], m[1], m[2], self.eps, self.eps_in_sqrt)


@dataclass(frozen=True)
class NAdamW(Optimizer):
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
        _check_lr(self.name, self.lr)
        _check_unit(self.name, "beta1", self.beta1)
        _check_unit(self.name, "beta2", self.beta2)
        _check_positive(self.name, "eps", self.eps)
        _check_nonnegative(self.name, "weight_decay", self.weight_decay)
        _check_flag(self.name, "eps_in_sqrt", self.eps_in_sqrt)
        if self.momentum_decay is not None:
            _check_nonnegative(self.name, "momentum_decay", self.momentum_decay)

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

    def phi(self, *m: Tensor) -> Tensor:
        return _adam_step(m[0] + m[3], m[1], m[2], self.eps, self.eps_in_sqrt)


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
        _check_lr(self.name, self.lr)
        _check_unit(self.name, "rho1", self.rho1)
        _check_unit(self.name, "rho2", self.rho2, open_left=True)
        _check_nonnegative(self.name, "weight_decay", self.weight_decay)
        _check_flag(self.name, "bias_correction", self.bias_correction)
        if self.eps is not None:
            _check_positive(self.name, "eps", self.eps)

    @property
    def variables(self) -> tuple[MomentumVariable, ...]:  # type: ignore[override]
        return (
            MomentumVariable(Source.NEG_GRAD, self.rho2),
            MomentumVariable(Source.NEG_GRAD, 0.0),
            MomentumVariable(Source.PARAM, 0.0),
        )

    @property
    def smooth(self) -> bool:  # type: ignore[override]
        return self.eps is not None

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

    def phi(self, *m: Tensor) -> Tensor:
        return -self.grad_k(m[0] + m[1]) + m[2]


OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.__name__: cls for cls in (HeavyBall, Nesterov, AdamW, NAdamW, Lion)
}

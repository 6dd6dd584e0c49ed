"""Two optimizers a user defines in their own module, outside noisemem: each is one
subclass of :class:`noisemem.optim.Optimizer` (its momentum variables, scales and Phi)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from noisemem.optim import Form, MomentumVariable, Optimizer, Source


@dataclass(frozen=True)
class RMSProp(Optimizer):
    """``torch.optim.RMSprop(alpha, eps)``: F = g / (sqrt(v) + eps),
    v = (1 - alpha) sum alpha^(n-k) g^2 (no bias correction, eps outside the root)."""

    lr: float
    alpha: float
    eps: float

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"RMSProp: alpha={self.alpha!r} is not allowed; it must lie in (0, 1)")

    @property
    def variables(self) -> tuple[MomentumVariable, ...]:  # type: ignore[override]
        return (MomentumVariable(Source.GRAD, 0.0), MomentumVariable(Source.GRAD_SQ, self.alpha))

    @property
    def form(self) -> Form:
        return Form("adam", self.eps, eps_in_sqrt=False)

    def scales(self, n: np.ndarray) -> np.ndarray:
        k = np.size(n)
        return np.stack([np.ones(k), np.full(k, 1.0 - self.alpha)])


@dataclass(frozen=True)
class SoftSignum(Optimizer):
    """Signum (sign of the momentum, Bernstein et al. 2018) with the soft sign:
    F = m / sqrt(m^2 + eps), m = (1 - beta) sum beta^(n-k) g. Written with Lion's NEG_GRAD
    source, so that Phi is the soft-sign form F = -x / sqrt(x^2 + eps), x = -m."""

    lr: float
    beta: float
    eps: float

    @property
    def variables(self) -> tuple[MomentumVariable, ...]:  # type: ignore[override]
        return (MomentumVariable(Source.NEG_GRAD, self.beta),)

    @property
    def form(self) -> Form:
        return Form("soft_sign", self.eps)

    def scales(self, n: np.ndarray) -> np.ndarray:
        return np.full((1, np.size(n)), 1.0 - self.beta)

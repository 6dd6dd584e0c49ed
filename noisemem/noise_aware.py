"""Noise-aware prediction of E[M^(n)] over batch orders for any optimizer with a closed Phi.

The full-batch forms of Appendix E (Lemmas K.1-K.3) stop describing E[M] once mini-batch
noise is comparable to the gradient; the paper leaves Adam and Lion under noise open
(Appendix A). Here Eq. (9) is expanded around the expectation of the momentum variables over
batch orders, keeping every term up to second order in their fluctuations and the batch that
the Hessian belongs to exactly; the expectation of each term is then an exact sum over the
ways the positions involved can coincide (THEORY §4's s_same and s_diff, generalised).

Notation (THEORY §1): m batches, g_i = grad L_i, H_i, g = mean_i g_i, H = mean_i H_i,
v = mean_i g_i^2 (elementwise), delta_i = g_i - g, eps_i = g_i^2 - v; <f> = mean_i f_i.

1. Eq. (9) in channels
----------------------
Form-based optimizers (:class:`noisemem.optim.Form`) see their momenta through three
channels: x = the sum of the gradient momenta, q = the squared-gradient one, p = the
decoupled weight decay. With every history slot at theta,

    x_s = sum_{c<=s} k_x(s,c) g_sigma(c),  k_x(s,c) = sum_{l in x} (+-) b_l^(s+1) beta_l^(s-c),
    q_s = sum_{c<=s} k_q(s,c) g_sigma(c)^2,  p_s = K_p(s) theta,  F^(s) = Phi(x_s, q_s, p_s)

(sign - for Lion's NEG_GRAD sources; NAdam's instantaneous g is the beta = 0 part of k_x).
dx_n/dtheta^(a) = k_x(n,a) H_sigma(a) and dq_n/dtheta^(a) = k_q(n,a) 2 diag(g_sigma(a)) H_sigma(a)
(J[g^2] = 2 diag(g) H, THEORY §3), so Eq. (9) is, with j in {x, q}, h_j(a) = k_j(n,a),
T_x(i) = 1 and T_q(i) = 2 g_i,

    M^(n)/h = sum_{a<n} sum_j h_j(a) Phi_j(x_n, q_n) . T_j(sigma(a)) . H_sigma(a) U_a,
    U_a = sum_{s=a}^{n-1} F^(s)                                                    (E1)

(Phi_j = dPhi/dj, elementwise; "." is the elementwise product).

2. The expansion (Adam(W), NAdam(W), heavy ball, Nesterov)
----------------------------------------------------------
Every position's batch is uniform over the m batches, so E x_s = mu_x(s) = K_x(s) g and
E q_s = mu_q(s) = K_q(s) v, K(s) = sum_c k(s,c) (= 1 with Adam's bias correction). With
Z_x(s) = sum_c k_x(s,c) delta_sigma(c), Z_q(s) = sum_c k_q(s,c) eps_sigma(c) and every
Phi-derivative at the means (step n on the left, step s on the right):

    Phi_j(x_n, q_n) = Phi_j + sum_k Phi_jk Z_k(n) + 1/2 sum_{k,k2} Phi_jkk2 Z_k(n) Z_k2(n) + ...
    F^(s)           = Phi(s) + sum_k Phi_k(s) Z_k(s) + 1/2 sum_{k,k2} Phi_kk2(s) Z_k Z_k2 + ...

Inserted in (E1), the products of total order <= 2 in Z are six terms (the ``terms`` keys):

    mean_field/j                        Phi_j . T_j H_sigma(a) Phi(s)
    step_covariance/j/k                 Phi_j . T_j H_sigma(a) (Phi_k(s) Z_k(s))
    preconditioner_covariance/j/k       Phi_jk Z_k(n) . T_j H_sigma(a) Phi(s)
    preconditioner_step_covariance/j/k  Phi_jk Z_k(n) . T_j H_sigma(a) (Phi_k2(s) Z_k2(s))
    preconditioner_variance/j/kk2       1/2 Phi_jkk2 Z_k(n) Z_k2(n) . T_j H_sigma(a) Phi(s)
    step_variance/j/kk2                 1/2 Phi_j . T_j H_sigma(a) (Phi_kk2(s) Z_k Z_k2)

("preconditioner": dPhi/dm at step n, which multiplies the Hessian; for Adam 1/sqrt(m2 + eps)
and the m1 d/dm2 part). mean_field is the form of THEORY §8 (AdamW:
h [a1 H phi/sqrt(D) - a2 g . <g_i . H_i phi>/D^(3/2)], D = v + eps, phi = g/sqrt(D) +
lambda theta); with one batch or identical ones every Z vanishes, v = g^2, and it is
Lemma K.2 (K.1, K.3) exactly.

Orders. Adam's Phi = x rho(q) + p is linear in x, so no product has more than two Z_x and
the x part is exact; what is dropped is third and higher order in Z_q (Z_q^3, Z_x Z_q^2,
Z_q^2 against the Hessian's batch, ...), O(nu^3) with nu = std(Z_q)/(v + eps) per
coordinate: about sqrt(1 - beta2) CV(g^2) late in a run, sqrt(1/(s+1)) CV(g^2) at its first
bias-corrected steps, which are the least accurate part. Heavy ball and Nesterov have
Phi = x: the expansion is exact and equals :func:`noisemem.expectation.exact_expectation`
at every n.

3. Coincidence classes: the exact expectation of each term
-----------------------------------------------------------
A term is a sum over positions (a: the Hessian's batch; e, f <= n on the left; c, c2 <= s on
the right) of weights times per-position batch quantities. Its expectation depends only on
which positions coincide and which distinct ones share an epoch (drawn without replacement).
For distinct positions of one epoch and zero-mean h, k (the fluctuations):

    E[f(i) h(j)]      = pair <f h>,                               pair = -1/(m-1) (s_diff)
    E[f(i) h(j) k(l)] = three_self <f h k> + three_mean <f><h k>,
                        three_self = 2/((m-1)(m-2)),  three_mean = -m/((m-1)(m-2))
    E[f(i) (h k)(j)]  = apart <f><h k> + pair <f h k>,            apart = m/(m-1)

(the first is THEORY §4's E_diff - H g = -Cov/(m-1)); a lone fluctuation in an epoch of its
own averages to 0. The batch objects, with A_j(w) = <T_j H_i w> (= H w, or <2 g_i . H_i w>),
zeta, xi in {delta, eps}:

    step_covariance                 <T_j H_i (Psi . xi_i)>                        one pass
    preconditioner_covariance       <zeta_i . T_j H_i Psi>                        one pass
    preconditioner_step_covariance  E2 = <zeta_i . A_j(Psi . xi_i)>              m passes
                                    S3 = <zeta_i . T_j H_i (Psi . xi_i)>          one pass
    *_variance                      <zeta zeta2> . A_j(Psi), <zeta_i zeta2_i . T_j H_i Psi>,
                                    A_j(Psi . <xi xi2>), <T_j H_i (Psi . xi_i xi2_i)>

Psi = sum_s W(s) V(s), V(s) the Phi-derivative at step s the term needs and W(s) its class
weight; for instance step_covariance has W(s) = sum_{a<=s} sum_{c<=s} h_j(a) S(a,c) k_k(s,c)
with S = 1 (a = c), pair (a != c, one epoch), 0 (different epochs): for heavy ball this is
THEORY §4's C_same s_same + C_epoch s_diff. All weights take O(n^2) (cumulative sums over a,
epoch sums over e).

Sampling: ``"permute"``, epochs of m consecutive positions (the paper, Sec. 6.2);
``"replacement"``, every position independent (pair = three_* = 0, apart = 1).
``"reshuffle"`` is not supported: fresh batches are random b-subsets, and their second-order
objects (E2, S3, ...) do not reduce to per-sample moments without O(N) Hessian passes.

4. The n -> infinity limit (``step=None``)
------------------------------------------
As in Sec. 6.2 the limit takes m = n + 1 -> infinity as well, so pair, three_* -> 0 and the
positions are independent; the kernels are stationary (the scales b_l at a large step; NAdam
with ``momentum_decay`` takes the paper's scales, mu_t -> beta1). With lags p = n - a >= 1,
kappa_k(u) the weight u steps back, Rc_k(u) = sum_{v<=u} kappa_k(v) and
C(t) = sum_u kappa_k(t+u) kappa_k2(u) (from kappa_k's geometric components), e.g.

    mean_field       sum_p p h(p)          (beta/(1-beta) for Adam: Lemma K.2's a_j)
    step_covariance  sum_p h(p) Rc_k(p-1)  (beta/((1-beta)^2 (1+beta)) for heavy ball)
    E2, S3           sum_p h(p) [sum_{t<=p} C(t) - kappa_k(p) Rc_k2(p-1)],
                     sum_p h(p) kappa_k(p) Rc_k2(p-1)

over L lags, beta_max^L < :data:`LIMIT_TAIL`.

5. Lion: a Gaussian closure instead of the series
-------------------------------------------------
For Phi = -s(x) + p, s(x) = x/sqrt(x^2 + eps), the fluctuation of x is not small against
sqrt(x^2 + eps) unless eps is large: on digits at eps = 1e-6 the term 1/2 s''' Var(x) alone
is 67% of |E[M]| and the series diverges. Instead x_s is taken Gaussian per coordinate with
its exact variance over orders, Var x_s = gamma(s) <delta^2> (gamma from the kernel and the
classes), and x_n as its own batch's term, exactly, plus a Gaussian rest,
x_n = mu_n + k' delta_sigma(n) + N(0, gamma_rest <delta^2>): step n's batch carries most of
x_n's variance (weight 1 - rho1, against rho1 (1 - rho2) for each earlier one), and the
left factor s'(x_n) is where the Gaussian shape matters most. The Phi-derivatives are
replaced by their averages under that law (:func:`_smoothed_soft_sign`) and the covariances
follow from Stein's lemma, E[f(X) Y] = E[f'(X)] Cov(X, Y) for jointly Gaussian X, Y: the
same step and preconditioner covariance terms with averaged derivatives, while the variance
terms are inside the averages and are not added again. Dropped: the non-Gaussian cumulants of
x_s for s < n, the second and higher Hermite orders of the covariances (O(r^2) in the
correlation r of x_n and x_s), and the nonlinearity of the coincidence a = c = s (the
Hessian's batch is the step's own batch), which Stein's lemma linearises.

6. full_batch_part, noise_part, and where the noise part is a gradient
----------------------------------------------------------------------
``full_batch_part`` is :func:`noisemem.full_batch.full_batch_prediction` at the same step,
what survives with one batch or identical batches; ``noise_part = mean - full_batch_part``
(for Adam it includes the change g^2 -> v = g^2 + <delta^2> inside D).

* Heavy ball, Nesterov: noise_part = h c Cov = (h c/2) grad R, R = <||g_i - g||^2>
  (THEORY §5): a regularizer, exactly.
* Every optimizer: step_covariance/x/x = h Phi_x(n) . grad_theta R_Psi(theta), Psi frozen,
  with R_Psi = 1/2 <sum_r Psi_r (g_i,r - g_r)^2> and Psi = sum_s W(s) Phi_x(s): the
  preconditioned gradient of a Psi-weighted variance of the batch gradients. For AdamW with
  bias correction Psi = W P with P = 1/sqrt(v + eps) (eps inside), the preconditioner of
  Sec. 4's "grad L~ / |grad L|" form, and P . <H_i (P delta_i)> = P . [grad sum_r
  sqrt(v_r + eps) - H (P g)], whose first part has a true potential, sum_r sqrt(v_r + eps).
* The other terms multiply Hessian-vector products elementwise by batch-dependent factors
  (g, delta_i, eps_i) outside H; their Jacobians are not symmetric and they are not the
  gradient of a potential in general (nor is the noise part of Adam or Lion as a whole).

The anti-regularization direction of Sec. 4 is :func:`anti_regularization_direction`,
d = grad ||grad L||_{1,eps} = H (g/sqrt(g^2 + eps)) (or H (g/sqrt(v + eps))), and
:func:`signed_projection` the signed length of a vector along it.

Cost: the batch gradients and, per prediction, one Hessian pass (a backward pass through the
batch gradients' graph, all batches) per term and channel, plus m passes per channel pair
of preconditioner_step_covariance with Phi_jk != 0: about 3m + 26 for Adam, m + 4 for Lion,
2-3 for heavy ball. The class weights take O(n^2) time and memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from noisemem import checks
from noisemem.full_batch import full_batch_prediction
from noisemem.optim import NAdamW, Optimizer, Source, require_smooth
from noisemem.probe import Probe
from noisemem.problem import Batch, LossFn, Problem, as_problem

if TYPE_CHECKING:
    from noisemem.ensemble import EnsembleProbe

#: the sampling schemes the prediction supports (module docstring, section 3, on reshuffle)
NOISE_AWARE_SAMPLINGS = ("permute", "replacement")
#: Phi's closed forms it expands (:class:`noisemem.optim.Form` kinds)
EXPANDED_FORMS = ("sum", "adam", "soft_sign")
#: the fluctuating channels: x (the gradient momenta, summed), q (the squared-gradient one)
CHANNELS = ("x", "q")
#: relative size of the geometric tail dropped from the lag sums of the n -> infinity limit
LIMIT_TAIL = 1e-18
#: the step at which the limit's scales b_l^(n+1) are read (bias corrections have converged)
LIMIT_SCALE_STEP = 1_000_000


@dataclass(frozen=True)
class NoiseAwarePrediction:
    """The noise-aware E[M^(n)] (flat ``(d,)`` tensors) and what it is made of.

    ``mean = full_batch_part + noise_part``; ``full_batch_part`` is the full-batch prediction
    (Appendix E, Lemmas K.1-K.3) at the same step, ``noise_part`` what mini-batch noise adds.
    ``terms`` holds every contribution of the expansion (they sum to ``mean``), keyed
    ``"<term>/<channels>"``; ``coefficients`` the scalar weights (summed over steps) and the
    sampling constants used.
    """

    mean: Tensor
    full_batch_part: Tensor
    noise_part: Tensor
    step: int | None
    sampling: str
    coefficients: dict[str, float]
    terms: dict[str, Tensor]


# -- arguments --------------------------------------------------------------------------------
def check_noise_aware_args(optimizer: object, step: object, sampling: object) -> int | None:
    """Every argument of the prediction, checked before any model call."""
    require_smooth(optimizer)
    assert isinstance(optimizer, Optimizer)
    form = optimizer.form
    if form is None or form.kind not in EXPANDED_FORMS:
        kind = None if form is None else form.kind
        raise checks.not_allowed(
            "optimizer",
            optimizer,
            f"the noise-aware prediction expands Phi in closed form (form.kind in "
            f"{', '.join(EXPANDED_FORMS)}); {optimizer.name} has form {kind!r}",
        )
    for v in optimizer.variables:
        if v.source is Source.PARAM and v.beta != 0.0:
            raise checks.not_allowed(
                "optimizer",
                optimizer,
                "a PARAM momentum must have beta = 0 (decoupled weight decay without memory)",
            )
    if sampling == "reshuffle":
        raise checks.not_allowed(
            "sampling",
            sampling,
            "fresh batches' second-order moments need O(N) Hessian passes (module docstring, "
            f"section 3); use one of {', '.join(NOISE_AWARE_SAMPLINGS)}",
        )
    checks.choice("sampling", sampling, NOISE_AWARE_SAMPLINGS)
    if step is None:
        return None
    return checks.integer("step", step, 0, allowed="step must be None (the limit) or an int >= 0")


# -- the momentum kernels -------------------------------------------------------------------
@dataclass(frozen=True)
class _Kernels:
    """Finite n: ``x_s = sum_c K["x"][s, c] g_{sigma(c)}``, ``q_s = sum_c K["q"][s, c]
    g_{sigma(c)}^2``, ``p_s = P[s] theta`` for positions s, c in [0, n]."""

    K: dict[str, np.ndarray]
    P: np.ndarray


def _finite_kernels(optimizer: Optimizer, n: int) -> _Kernels:
    steps = np.arange(n + 1, dtype=np.float64)
    b = np.asarray(optimizer.scales(steps), dtype=np.float64)  # (L, n+1)
    lag = steps[:, None] - steps[None, :]  # s - c
    lower = lag >= 0
    K: dict[str, np.ndarray] = {}
    P = np.zeros(n + 1)
    for l, var in enumerate(optimizer.variables):
        if var.source is Source.PARAM:
            P += b[l]
            continue
        decay = np.where(lower, np.power(var.beta, np.where(lower, lag, 0.0)), 0.0)
        sign = -1.0 if var.source is Source.NEG_GRAD else 1.0
        ch = "q" if var.source is Source.GRAD_SQ else "x"
        K[ch] = K.get(ch, 0.0) + sign * b[l][:, None] * decay
    return _Kernels(K, P)


@dataclass(frozen=True)
class _LagKernels:
    """The n -> infinity limit: ``x`` weighs the gradient u steps back by ``kappa["x"][u]``;
    ``geometric["x"]`` lists its components (coefficient, beta) with beta > 0 (they make up
    ``kappa`` for lags u >= 1)."""

    kappa: dict[str, np.ndarray]
    geometric: dict[str, list[tuple[float, float]]]
    P: float


def _limit_optimizer(optimizer: Optimizer) -> Optimizer:
    """NAdam with PyTorch's momentum schedule has the paper's limit (mu_t -> beta1)."""
    if isinstance(optimizer, NAdamW) and optimizer.momentum_decay is not None:
        return dataclasses.replace(optimizer, momentum_decay=None)
    return optimizer


def _lag_kernels(optimizer: Optimizer) -> _LagKernels:
    opt = _limit_optimizer(optimizer)
    betas = [v.beta for v in opt.variables if v.source is not Source.PARAM]
    top = max(betas, default=0.0)
    L = 8 if top == 0.0 else max(8, math.ceil(math.log(LIMIT_TAIL) / math.log(top)) + 2)
    b = np.asarray(opt.scales(np.array([float(LIMIT_SCALE_STEP)])), dtype=np.float64)[:, 0]
    u = np.arange(L + 1, dtype=np.float64)
    kappa: dict[str, np.ndarray] = {}
    geometric: dict[str, list[tuple[float, float]]] = {}
    P = 0.0
    for l, var in enumerate(opt.variables):
        if var.source is Source.PARAM:
            P += float(b[l])
            continue
        sign = -1.0 if var.source is Source.NEG_GRAD else 1.0
        ch = "q" if var.source is Source.GRAD_SQ else "x"
        kappa[ch] = kappa.get(ch, 0.0) + sign * b[l] * np.power(var.beta, u)
        if var.beta > 0.0:
            geometric.setdefault(ch, []).append((sign * float(b[l]), float(var.beta)))
    return _LagKernels(kappa, geometric, P)


# -- the joint law of the batches at the positions -----------------------------------------
@dataclass(frozen=True)
class _Law:
    """Which positions share an epoch (drawn without replacement) and the constants of the
    coincidence classes (module docstring, section 3):

    * ``pair``   = E[f(i) h(j)] / <f h> for distinct positions of one epoch, h zero-mean:
      -1/(m-1) (permute; s_diff of THEORY §4), 0 (independent positions);
    * ``apart``  = m/(m-1): the weight of <h> <f> for distinct positions of one epoch;
    * ``three_mean``, ``three_self``: three distinct positions of one epoch,
      E = three_self <f h k> + three_mean <f> <h k> (h, k zero-mean), i.e.
      -m/((m-1)(m-2)) and 2/((m-1)(m-2)).
    """

    epoch: np.ndarray
    pair: float
    apart: float
    three_mean: float
    three_self: float


def _law(sampling: str, num_batches: int, n: int) -> _Law:
    positions = np.arange(n + 1)
    m = num_batches
    if sampling == "replacement" or m == 1:
        return _Law(positions, 0.0, 1.0, 0.0, 0.0)
    pair, apart = -1.0 / (m - 1), m / (m - 1)
    three_mean = -m / ((m - 1) * (m - 2)) if m > 2 else 0.0
    three_self = 2.0 / ((m - 1) * (m - 2)) if m > 2 else 0.0
    return _Law(positions // m, pair, apart, three_mean, three_self)


def _epoch_sums(w: np.ndarray, epoch: np.ndarray) -> np.ndarray:
    """``out[..., E] = sum of w[..., p] over the positions p of epoch E``."""
    E = int(epoch.max()) + 1 if epoch.size else 0
    onehot = np.zeros((epoch.size, E))
    onehot[np.arange(epoch.size), epoch] = 1.0
    return w @ onehot


# -- class weights, finite n (module docstring, section 3) -----------------------------------
def _weight_mean_field(h: np.ndarray) -> np.ndarray:
    """``W(s) = sum_{a<=s} h(a)``: the mean-field weight of F^(s)."""
    return np.cumsum(h)


def _cumulative_rows(h: np.ndarray, G: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """``W(s) = sum_{a<=s} sum_{c<=s} h(a) G(a, c) rho(s, c)`` (rho lower-triangular)."""
    Y = np.cumsum(h[:, None] * G, axis=0)  # Y[s, c] = sum_{a<=s} h(a) G(a, c)
    return (rho * Y).sum(1)


def _weight_step_cov(h: np.ndarray, rho: np.ndarray, law: _Law) -> np.ndarray:
    """Right fluctuation at c against the Hessian's batch at a: S(a, c) = 1 (a = c),
    ``pair`` (a != c, one epoch), 0 otherwise."""
    ep = law.epoch[: h.size]
    eq = np.eye(h.size, dtype=bool)
    same = ep[:, None] == ep[None, :]
    G = eq + law.pair * (same & ~eq)
    return _cumulative_rows(h, G, rho)


def _weight_precond_cov(h: np.ndarray, lam: np.ndarray, law: _Law) -> np.ndarray:
    """Left fluctuation at e in [0, n] against the Hessian's batch at a."""
    n = h.size
    Lam = _epoch_sums(lam, law.epoch)
    ep = law.epoch[:n]
    sigma = lam[:n] + law.pair * (Lam[ep] - lam[:n])
    return np.cumsum(h * sigma)


def _weight_precond_step_cov(
    h: np.ndarray, lam: np.ndarray, rho: np.ndarray, law: _Law
) -> tuple[np.ndarray, np.ndarray]:
    """Left fluctuation at e, Hessian at a, right fluctuation at c: the weights of the
    objects E2 = <zeta_j . A(Psi xi_j)> and S3 = <zeta_i . T_i H_i (Psi xi_i)>."""
    n = h.size
    Lam = _epoch_sums(lam, law.epoch)
    ep = law.epoch[:n]
    la, lc = lam[:n][:, None], lam[:n][None, :]
    La, Lc = Lam[ep][:, None], Lam[ep][None, :]
    eq = np.eye(n, dtype=bool)
    same = (ep[:, None] == ep[None, :]) & ~eq
    other = ep[:, None] != ep[None, :]
    rest = La - la - lc  # the other positions of the shared epoch
    G_E2 = np.where(same, lc * law.apart + rest * law.three_mean, 0.0)
    G_E2 = G_E2 + np.where(other, lc + law.pair * (Lc - lc), 0.0)
    G_S3 = np.where(eq, la + law.pair * (La - la), 0.0)
    G_S3 = G_S3 + np.where(same, law.pair * (la + lc) + law.three_self * rest, 0.0)
    return _cumulative_rows(h, G_E2, rho), _cumulative_rows(h, G_S3, rho)


def _pair_taus(
    u: np.ndarray, w: np.ndarray, epoch_of: np.ndarray, law: _Law, ep_a: np.ndarray, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two fluctuations at positions e, f (weights u(e), w(f), last axis) against the
    Hessian's batch at a (epoch ``ep_a``, position ``idx`` on that axis): the weights of
    <zeta zeta'> A(.) ("a") and <zeta zeta' T H .> ("b")."""
    A = _epoch_sums(u, epoch_of)
    B = _epoch_sums(w, epoch_of)
    P = _epoch_sums(u * w, epoch_of)
    ABP_total = (A * B - P).sum(-1, keepdims=True)
    P_total = P.sum(-1, keepdims=True)
    ua = np.take(u, idx, axis=-1)
    wa = np.take(w, idx, axis=-1)
    Aa, Ba, Pa = (np.take(X, ep_a, axis=-1) for X in (A, B, P))
    mu = ua * wa
    distinct = (Aa - ua) * (Ba - wa) - (Pa - mu)  # e != f, both != a, in a's epoch
    tau_a = (
        law.apart * (Pa - mu)
        + (P_total - Pa)
        + law.three_mean * distinct
        + law.pair * (ABP_total - (Aa * Ba - Pa))
    )
    tau_b = (
        mu
        + law.pair * (Pa - mu)
        + law.pair * (ua * (Ba - wa) + wa * (Aa - ua))
        + law.three_self * distinct
    )
    return tau_a, tau_b


def _weight_precond_var(
    h: np.ndarray, lam1: np.ndarray, lam2: np.ndarray, law: _Law
) -> tuple[np.ndarray, np.ndarray]:
    n = h.size
    idx = np.arange(n)
    tau_a, tau_b = _pair_taus(lam1[None, :], lam2[None, :], law.epoch, law, law.epoch[idx], idx)
    return np.cumsum(h * tau_a[0]), np.cumsum(h * tau_b[0])


def _weight_step_var(
    h: np.ndarray, rho1: np.ndarray, rho2: np.ndarray, law: _Law
) -> tuple[np.ndarray, np.ndarray]:
    n = h.size
    idx = np.arange(n)
    ep = law.epoch[:n]
    # rows s, last axis c; evaluated at every a (broadcast over a on a middle axis)
    tau_a, tau_b = _pair_taus(rho1, rho2, ep, law, ep, idx)  # (n_s, n_a)
    lower = idx[None, :] <= idx[:, None]  # a <= s
    return (tau_a * h[None, :] * lower).sum(1), (tau_b * h[None, :] * lower).sum(1)


#: (term, Hessian channel j, left channel k, right channel k2, object)
WeightKey = tuple[str, ...]


def _finite_weights(kern: _Kernels, law: _Law, n: int) -> dict[WeightKey, np.ndarray]:
    """Every class weight W(s), s in [0, n-1], of the expansion at step n."""
    chans = [c for c in CHANNELS if c in kern.K]
    h = {j: kern.K[j][n, :n] for j in chans}  # Hessian's batch at a < n
    lam = {k: kern.K[k][n, :] for k in chans}  # left fluctuation at e <= n
    rho = {k: kern.K[k][:n, :n] for k in chans}  # right fluctuation at c <= s < n
    W: dict[WeightKey, np.ndarray] = {}
    for j in chans:
        W["mean_field", j] = _weight_mean_field(h[j])
        for k in chans:
            W["step_covariance", j, k] = _weight_step_cov(h[j], rho[k], law)
            W["preconditioner_covariance", j, k] = _weight_precond_cov(h[j], lam[k], law)
            for k2 in chans:
                e2, s3 = _weight_precond_step_cov(h[j], lam[k], rho[k2], law)
                W["preconditioner_step_covariance", j, k, k2, "E2"] = e2
                W["preconditioner_step_covariance", j, k, k2, "S3"] = s3
        for k, k2 in _unordered(chans):
            a, b = _weight_precond_var(h[j], lam[k], lam[k2], law)
            W["preconditioner_variance", j, k, k2, "a"] = a
            W["preconditioner_variance", j, k, k2, "b"] = b
            a, b = _weight_step_var(h[j], rho[k], rho[k2], law)
            W["step_variance", j, k, k2, "a"] = a
            W["step_variance", j, k, k2, "b"] = b
    return W


def _unordered(chans: Sequence[str]) -> list[tuple[str, str]]:
    return [(k, k2) for i, k in enumerate(chans) for k2 in chans[i:]]


def _limit_weights(lk: _LagKernels) -> dict[WeightKey, float]:
    """The class weights of the n -> infinity limit (independent positions, stationary
    kernels), as sums over lags (module docstring, section 4)."""
    chans = [c for c in CHANNELS if c in lk.kappa]
    W: dict[WeightKey, float] = {}
    L = next(iter(lk.kappa.values())).size - 1
    p = np.arange(1, L + 1, dtype=np.float64)
    for j in chans:
        h = lk.kappa[j][1:]  # h(p), p >= 1
        W["mean_field", j] = float((p * h).sum())
        for k in chans:
            lam = lk.kappa[k]
            W["preconditioner_covariance", j, k] = float((p * h * lam[1:]).sum())
            for k2 in chans:
                rho = lk.kappa[k2]
                Rc = np.cumsum(rho)[:-1]  # Rc(p-1), p >= 1
                # C(t) = sum_u lam(t+u) rho(u), t >= 1, from lam's geometric components
                cumC = np.zeros(L)
                for coef, beta in lk.geometric.get(k, []):
                    G = float((np.power(beta, np.arange(L + 1.0)) * rho).sum())
                    cumC += coef * G * (beta - np.power(beta, p + 1)) / (1 - beta)
                s3 = float((h * lam[1:] * Rc).sum())
                W["preconditioner_step_covariance", j, k, k2, "E2"] = float((h * cumC).sum()) - s3
                W["preconditioner_step_covariance", j, k, k2, "S3"] = s3
        for k2 in chans:
            Rc = np.cumsum(lk.kappa[k2])[:-1]
            W["step_covariance", j, k2] = float((h * Rc).sum())
        for k, k2 in _unordered(chans):
            ll = lk.kappa[k] * lk.kappa[k2]
            W["preconditioner_variance", j, k, k2, "a"] = float((p * h * (ll.sum() - ll[1:])).sum())
            W["preconditioner_variance", j, k, k2, "b"] = float((p * h * ll[1:]).sum())
            cum = np.cumsum(ll)[:-1]  # the right kernels are the same lag arrays
            W["step_variance", j, k, k2, "a"] = float((h * (p * ll.sum() - cum)).sum())
            W["step_variance", j, k, k2, "b"] = float((h * cum).sum())
    return W


# -- Phi and its partial derivatives in the channels ---------------------------------------
def _rho_derivatives(q: Tensor, eps: float, eps_in_sqrt: bool) -> list[Tensor]:
    """``rho(q)`` and its first three derivatives: rho = (q + eps)^(-1/2) (eps inside), or
    rho = 1/(sqrt(q) + eps) (outside), where with u = sqrt(q)

        rho'   = -1/(2u(u+eps)^2),   rho'' = 1/(4u^3(u+eps)^2) + 1/(2u^2(u+eps)^3),
        rho''' = -3/(8u^5(u+eps)^2) - 3/(4u^4(u+eps)^3) - 3/(4u^3(u+eps)^4).

    Outside, where q = 0 the derivatives are 0, as :func:`noisemem.optim._adam_step`'s guard
    makes them in Eq. (9) (every gradient in the memory is 0 there)."""
    if eps_in_sqrt:
        r = torch.rsqrt(q + eps)
        r2 = r * r
        return [r, -0.5 * r * r2, 0.75 * r * r2 * r2, -1.875 * r * r2 * r2 * r2]
    pos = q > 0
    u = torch.sqrt(torch.where(pos, q, 1.0))
    w = u + eps
    d1 = -1.0 / (2 * u * w**2)
    d2 = 1.0 / (4 * u**3 * w**2) + 1.0 / (2 * u**2 * w**3)
    d3 = -3.0 / (8 * u**5 * w**2) - 3.0 / (4 * u**4 * w**3) - 3.0 / (4 * u**3 * w**4)
    rho = torch.where(pos, 1.0 / w, 1.0 / eps)
    return [rho] + [torch.where(pos, d, 0.0) for d in (d1, d2, d3)]


def _partials(
    optimizer: Optimizer, x: Tensor, q: Tensor, p: Tensor
) -> dict[tuple[int, int], Tensor]:
    """``d^(i+j) Phi / dx^i dq^j`` at (x, q, p) for i + j <= 3, elementwise, for the forms
    the series expands (section 2): "sum", Phi = x + p; "adam", Phi = x rho(q) + p."""
    form = optimizer.form
    assert form is not None
    zero = torch.zeros_like(x)
    D = {(i, t - i): zero for t in range(4) for i in range(t + 1)}
    if form.kind == "sum":
        D[0, 0], D[1, 0] = x + p, torch.ones_like(x)
        return D
    rho = _rho_derivatives(q, form.eps, form.eps_in_sqrt)
    for j in range(4):
        D[0, j] = x * rho[j] + p if j == 0 else x * rho[j]
        if j < 3:
            D[1, j] = rho[j]
    return D


#: nodes of the Gaussian averages of the soft sign (accurate to ~1e-5 of each one's scale)
_QUADRATURE_NODES = 64
#: coordinates per block of those averages
_QUADRATURE_CHUNK = 1 << 16


def _soft_sign_nodes(
    K: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gauss-Hermite nodes and weights for E over N(0, 1); Gauss-Legendre in theta for E
    over the density (1/2)(1+t^2)^(-3/2), as nodes t = tan(theta) and weights."""
    z, wz = np.polynomial.hermite_e.hermegauss(K)
    th, wt = np.polynomial.legendre.leggauss(K)
    th = th * math.pi / 2
    wt = wt * (math.pi / 4) * np.cos(th)
    as_t = {"dtype": dtype, "device": device}
    return (
        torch.as_tensor(z, **as_t),
        torch.as_tensor(wz / math.sqrt(2 * math.pi), **as_t),
        torch.as_tensor(np.tan(th), **as_t),
        torch.as_tensor(wt, **as_t),
    )


def _smoothed_soft_sign(
    eps: float, mu: Tensor, sd: Tensor, p: Tensor
) -> dict[tuple[int, int], Tensor]:
    """Gaussian averages of Phi = -s(x) + p and its x-derivatives, s(x) = x/sqrt(x^2 + eps):
    ``E[Phi^(k)(mu + sd Z)]``, Z ~ N(0, 1), k = 0, 1, 2, keyed like :func:`_partials`.

    Two routes, per coordinate. Where ``sd <= sqrt(eps)`` or ``|mu| >= 6 sd``, Gauss-Hermite in
    Z: s is analytic within |Im z| < sqrt(eps)/sd of the bulk. Elsewhere the soft sign's
    step (width sqrt(eps)) sits inside the Gaussian, and the Gaussian is integrated out
    exactly instead: s = 2 C(x/sqrt(eps)) - 1 with C the CDF of the density
    (1/2)(1+t^2)^(-3/2), so with u = (mu - sqrt(eps) T)/sd, T of that density,

        E[s] = E_T[erf(u/sqrt 2)],  E[s'] = 2 E_T[phi(u)]/sd,  E[s''] = -2 E_T[u phi(u)]/sd^2,

    and E_T is Gauss-Legendre in theta, T = tan(theta) (weight cos(theta)/2).
    """
    z, wz, t, wt = _soft_sign_nodes(_QUADRATURE_NODES, mu.dtype, mu.device)
    root = math.sqrt(eps)
    flat_mu, flat_sd = mu.reshape(-1), sd.expand_as(mu).reshape(-1)
    out = torch.empty(3, flat_mu.numel(), dtype=mu.dtype, device=mu.device)
    use_t = (flat_sd > root) & (flat_mu.abs() < 6.0 * flat_sd)
    for rows in torch.split(torch.arange(flat_mu.numel(), device=mu.device), _QUADRATURE_CHUNK):
        ut = use_t[rows]
        gh, tt = rows[~ut], rows[ut]
        if gh.numel():
            x = flat_mu[gh, None] + flat_sd[gh, None] * z  # (k, K)
            r = x * x + eps
            out[0, gh] = (x * torch.rsqrt(r)) @ wz
            out[1, gh] = (eps * r**-1.5) @ wz
            out[2, gh] = (-3.0 * eps * x * r**-2.5) @ wz
        if tt.numel():
            sd_t = flat_sd[tt, None]
            u = (flat_mu[tt, None] - root * t) / sd_t
            phi = torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
            out[0, tt] = torch.erf(u / math.sqrt(2.0)) @ wt
            out[1, tt] = 2.0 * (phi @ wt) / sd_t[:, 0]
            out[2, tt] = -2.0 * ((u * phi) @ wt) / sd_t[:, 0] ** 2
    s0, s1, s2 = (o.reshape(mu.shape) for o in out)
    return {(0, 0): p - s0, (1, 0): -s1, (2, 0): -s2}


def _index(*chans: str) -> tuple[int, int]:
    return (sum(c == "x" for c in chans), sum(c == "q" for c in chans))


# -- the batch statistics and the Hessian passes ---------------------------------------------
class _Batches:
    """g_i, their fluctuations (x: delta_i = g_i - g, q: eps_i = g_i^2 - v) and the
    Hessian's batch factors T_x = 1, T_q = 2 g_i, with the passes through the probe."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.G = probe.grads  # (m, d)
        self.m, self.d = self.G.shape
        self.g = self.G.mean(0)
        self.v = (self.G * self.G).mean(0)
        self.fluct = {"x": self.G - self.g, "q": self.G * self.G - self.v}  # (m, d)
        self.passes = 0

    def hv_all(self, w: Tensor) -> Tensor:
        """``H_i w`` for every batch i: ``(m, d)``."""
        self.passes += 1
        return self.probe.batch_hvps(w.expand(self.m, self.d).contiguous())

    def hv_each(self, W: Tensor) -> Tensor:
        """``H_i W[i]`` for every batch i: ``(m, d)``."""
        self.passes += 1
        return self.probe.batch_hvps(W)

    def mean_T(self, j: str, HW: Tensor, left: Tensor | None = None) -> Tensor:
        """``mean_i left_i . T_j(i) . HW[i]`` (left = 1 when None)."""
        out = HW if j == "x" else 2.0 * self.G * HW
        if left is not None:
            out = left * out
        return out.mean(0)


def _closure(optimizer: Optimizer) -> bool:
    """Whether Phi is expanded by the Gaussian closure (section 5) rather than the series."""
    form = optimizer.form
    return form is not None and form.kind == "soft_sign"


def _nonzero(t: Tensor) -> bool:
    return bool(torch.count_nonzero(t))


def _assemble(
    batches: _Batches,
    optimizer: Optimizer,
    theta: Tensor,
    point_K: np.ndarray,
    left: int,
    W: dict[WeightKey, np.ndarray],
    current: tuple[float, float],
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Every term of the expansion. ``point_K`` (4, U): the distinct (K_x, K_q, K_p,
    gamma_x) at which the momenta sit (mu_x = K_x g, mu_q = K_q v, p = K_p theta, and
    Var x = gamma_x <delta^2> for the Gaussian closure); ``W[key]`` (U,): the class weight
    of each such point; ``left``: the point of step n; ``current``: (k, gamma_rest), the
    weight of step n's own batch in x_n and the variance factor of the rest of x_n (the
    Gaussian closure treats that batch exactly)."""
    B = batches
    dtype = theta.dtype
    chans = sorted({key[1] for key in W}, key=CHANNELS.index)
    Kx, Kq, Kp, gamma = (torch.as_tensor(r, dtype=dtype)[:, None] for r in point_K)
    form = optimizer.form
    assert form is not None
    gaussian = _closure(optimizer)
    if gaussian:
        sd = torch.sqrt(gamma * (B.fluct["x"] ** 2).mean(0))
        D = _smoothed_soft_sign(form.eps, Kx * B.g, sd, Kp * theta)
    else:
        D = _partials(optimizer, Kx * B.g, Kq * B.v, Kp * theta)

    def psi(key: WeightKey, deriv: tuple[int, int]) -> Tensor:
        w = torch.as_tensor(W[key], dtype=dtype)
        return w @ D[deriv]

    at_n = {key: val[left] for key, val in D.items()}
    if gaussian:
        k_own, gamma_rest = current
        rest = math.sqrt(max(gamma_rest, 0.0)) * torch.sqrt((B.fluct["x"] ** 2).mean(0))
        mixture = _smoothed_soft_sign(
            form.eps, Kx[left] * B.g + k_own * B.fluct["x"], rest.expand(B.m, -1), Kp[left] * theta
        )
        at_n = {key: val.mean(0) for key, val in mixture.items()}
    terms: dict[str, Tensor] = {}
    fluct = B.fluct

    def add(name: str, value: Tensor) -> None:
        terms[name] = terms.get(name, 0.0) + optimizer.lr * value

    for j in chans:
        Pj = at_n[_index(j)]
        # mean field: Phi_j(n) . A_j(sum_s W(s) Phi(mu_s))
        add(f"mean_field/{j}", Pj * B.mean_T(j, B.hv_all(psi(("mean_field", j), (0, 0)))))
        for k in chans:
            # step covariance: Phi_j(n) . <T_j H_i (Psi xi_i)>, Psi = sum_s W Phi_k(s)
            Psi = psi(("step_covariance", j, k), _index(k))
            if _nonzero(Psi) and _nonzero(Pj):
                HW = B.hv_each(Psi * fluct[k])
                add(f"step_covariance/{j}/{k}", Pj * B.mean_T(j, HW))
            Pjk = at_n[_index(j, k)]
            if not _nonzero(Pjk):
                continue
            # preconditioner covariance: Phi_jk(n) . <zeta_i T_j H_i Psi>
            Psi = psi(("preconditioner_covariance", j, k), (0, 0))
            HW = B.hv_all(Psi)
            add(f"preconditioner_covariance/{j}/{k}", Pjk * B.mean_T(j, HW, fluct[k]))
            # preconditioner-step covariance: E2 (one pass per batch) and S3
            e2 = {
                k2: psi(("preconditioner_step_covariance", j, k, k2, "E2"), _index(k2))
                for k2 in chans
            }
            s3 = {
                k2: psi(("preconditioner_step_covariance", j, k, k2, "S3"), _index(k2))
                for k2 in chans
            }
            total = torch.zeros_like(theta)
            if any(_nonzero(t) for t in e2.values()):
                for i in range(B.m):
                    w = sum(e2[k2] * fluct[k2][i] for k2 in chans)
                    total = total + fluct[k][i] * B.mean_T(j, B.hv_all(w))
                total = total / B.m
            Ws = sum(s3[k2] * fluct[k2] for k2 in chans)
            if _nonzero(Ws):
                total = total + B.mean_T(j, B.hv_each(Ws), fluct[k])
            add(f"preconditioner_step_covariance/{j}/{k}", Pjk * total)
        for k, k2 in [] if gaussian else _unordered(chans):
            half = 0.5 if k == k2 else 1.0
            # preconditioner variance: 1/2 Phi_jkk2(n) E[Z_k Z_k2] at the Hessian's batch
            Pjkk = at_n[_index(j, k, k2)]
            if _nonzero(Pjkk):
                pair = fluct[k] * fluct[k2]
                Ha = B.hv_all(psi(("preconditioner_variance", j, k, k2, "a"), (0, 0)))
                Hb = B.hv_all(psi(("preconditioner_variance", j, k, k2, "b"), (0, 0)))
                value = pair.mean(0) * B.mean_T(j, Ha) + B.mean_T(j, Hb, pair)
                add(f"preconditioner_variance/{j}/{k}{k2}", half * Pjkk * value)
            # step variance: 1/2 Phi_j(n) . T_j H (sum_s W Phi_kk2(s) E[Z_k Z_k2])
            Pa = psi(("step_variance", j, k, k2, "a"), _index(k, k2))
            Pb = psi(("step_variance", j, k, k2, "b"), _index(k, k2))
            if (_nonzero(Pa) or _nonzero(Pb)) and _nonzero(Pj):
                pair = fluct[k] * fluct[k2]
                value = B.mean_T(j, B.hv_all(Pa * pair.mean(0)))
                value = value + B.mean_T(j, B.hv_each(Pb * pair))
                add(f"step_variance/{j}/{k}{k2}", half * Pj * value)
    coefficients = {"/".join(key): float(np.sum(w)) for key, w in W.items()}
    return terms, coefficients


def _variance_factor(K: np.ndarray, law: _Law) -> np.ndarray:
    """``gamma(s)`` with Var(x_s) = gamma(s) <delta^2> per coordinate: ``sum_c K[s, c]^2`` plus
    ``pair`` times the products of distinct positions of one epoch."""
    own = (K * K).sum(1)
    by_epoch = _epoch_sums(K, law.epoch)
    return own + law.pair * ((by_epoch**2).sum(1) - own)


def _group_points(K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct columns of ``K`` (3, S), equal to 13 significant digits: (3, U), index (S,)."""
    scale = np.maximum(np.abs(K), 1e-300)
    keys = np.round(K / 10.0 ** np.floor(np.log10(scale)), 12) * 10.0 ** np.floor(np.log10(scale))
    keys = np.where(K == 0.0, 0.0, keys)
    uniq, index = np.unique(keys.T, axis=0, return_inverse=True)
    first = np.zeros(uniq.shape[0], dtype=np.int64)
    first[index[::-1]] = np.arange(K.shape[1])[::-1]
    return K[:, first], index.reshape(-1)


def noise_aware_prediction(
    problem: Problem,
    optimizer: Optimizer,
    step: int | None,
    probe: Probe | None = None,
    sampling: str = "permute",
) -> NoiseAwarePrediction:
    """:func:`noise_aware_correction` at ``problem.theta`` (arguments already checked); the
    batch gradients and Hessian passes come from ``probe`` (built here if not given)."""
    probe = probe if probe is not None else Probe(problem)
    theta = probe.theta
    B = _Batches(probe)
    if step is None:
        lk = _lag_kernels(optimizer)
        Kq = lk.kappa["q"].sum() if "q" in lk.kappa else 0.0
        K = np.array([[lk.kappa["x"].sum()], [Kq], [lk.P], [(lk.kappa["x"] ** 2).sum()]])
        W = {key: np.array([w]) for key, w in _limit_weights(lk).items()}
        law_pair = 0.0
        left = 0
        current = (float(lk.kappa["x"][0]), float((lk.kappa["x"][1:] ** 2).sum()))
    else:
        n = step
        kern = _finite_kernels(optimizer, n)
        law = _law(sampling, problem.num_batches, n)
        Kq = kern.K["q"].sum(1) if "q" in kern.K else np.zeros(n + 1)
        # the variance of x only enters the Gaussian closure (section 5)
        gamma = _variance_factor(kern.K["x"], law) if _closure(optimizer) else np.zeros(n + 1)
        sums = np.stack([kern.K["x"].sum(1), Kq, kern.P, gamma])
        K, index = _group_points(sums)
        left = int(index[n])
        # step n's own batch: its weight with the mean shift of the rest of its epoch (drawn
        # from the other batches), and the rest's variance chosen so that Var x_n is exact
        row = kern.K["x"][n]
        k_own = row[n] + law.pair * row[:n][law.epoch[:n] == law.epoch[n]].sum()
        gamma_n = _variance_factor(row[None, :], law)[0]
        current = (float(k_own), float(gamma_n - k_own**2))
        W = {}
        for key, w in _finite_weights(kern, law, n).items():
            W[key] = np.bincount(index[:n], weights=w, minlength=K.shape[1])
        law_pair = law.pair
    terms, coefficients = _assemble(B, optimizer, theta, K, left, W, current)
    mean = torch.zeros_like(theta)
    for value in terms.values():
        mean = mean + value
    full = full_batch_prediction(problem, optimizer, step, probe)
    coefficients.update(
        {
            "s_same": 1.0,
            "s_diff": law_pair,
            "num_batches": float(B.m),
            "hessian_passes": float(B.passes),
        }
    )
    return NoiseAwarePrediction(
        mean=mean,
        full_batch_part=full,
        noise_part=mean - full,
        step=step,
        sampling=sampling,
        coefficients=coefficients,
        terms=terms,
    )


def noise_aware_correction(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    optimizer: Optimizer,
    *,
    step: int | None = None,
    sampling: str = "permute",
) -> NoiseAwarePrediction:
    """The noise-aware E[M^(n)] over batch orders at the model's current parameters.

    Eq. (9) expanded around the batch-order mean of the momenta (module docstring): exact for
    heavy ball and Nesterov, exact in the first moment and second order in the second for
    AdamW and NAdamW (either eps convention; NAdamW with ``momentum_decay`` uses its schedule's
    scales at finite n and the paper's in the limit), a Gaussian closure for soft-sign Lion
    (with or without bias correction). ``step=n`` is step n of a run that starts at position
    0 (epochs of ``len(batches)`` steps); ``step=None`` the n -> infinity limit with
    m = n + 1 (Sec. 6.2). ``sampling``: ``"permute"`` or ``"replacement"``. Every argument is
    checked before the model runs.
    """
    n = check_noise_aware_args(optimizer, step, sampling)
    problem = as_problem(model, loss_fn, batches)
    return noise_aware_prediction(problem, optimizer, n, sampling=sampling)


# -- the anti-regularization direction of Sec. 4 ----------------------------------------------
def direction_at(probe: Probe | EnsembleProbe, eps: float, weighted: bool = False) -> Tensor:
    """Sec. 4's direction ``d = grad_theta ||grad L||_{1,eps} = H (g / sqrt(g^2 + eps))``, or
    with ``weighted`` the noise-aware one ``H (g / sqrt(v + eps))``, v = mean_i g_i^2; at
    every point of an :class:`~noisemem.ensemble.EnsembleProbe` (``(P, d)``)."""
    g = probe.full_grad()
    if weighted:
        G = probe.grads  # (m, d), or (P, m, d)
        D = (G * G).mean(-2) + eps
    else:
        D = g * g + eps
    return probe.full_hvp(g * torch.rsqrt(D))


def anti_regularization_direction(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    *,
    eps: float,
    weighted: bool = False,
) -> Tensor:
    """The direction along which AdamW's memory anti-penalizes ``||grad L||_{1,eps}`` (Sec. 4):

        d = grad_theta sum_r sqrt((grad_r L)^2 + eps) = H (g / sqrt(g^2 + eps))

    (``weighted=True``: ``H (g / sqrt(v + eps))`` with ``v = mean_i g_i^2``, the mini-batch
    second moment Adam divides by). Flat ``(d,)``, at the model's current parameters.
    """
    checks.real("eps", eps, low=0.0, low_open=True, allowed="eps must be a finite number > 0")
    checks.flag("weighted", weighted)
    return direction_at(Probe(as_problem(model, loss_fn, batches)), float(eps), weighted)


def signed_projection(vector: Tensor, direction: Tensor) -> float:
    """``<vector, direction> / ||direction||``: the signed length of ``vector`` along it."""
    if vector.shape != direction.shape:
        raise ValueError(
            f"vector and direction must have the same shape; got {tuple(vector.shape)} and "
            f"{tuple(direction.shape)}"
        )
    norm = float(direction.norm())
    if not norm > 0.0:
        raise ValueError("direction=0 is not allowed; it must be a nonzero vector")
    return float(vector @ direction) / norm


__all__ = [
    "NOISE_AWARE_SAMPLINGS",
    "NoiseAwarePrediction",
    "anti_regularization_direction",
    "noise_aware_correction",
    "signed_projection",
]

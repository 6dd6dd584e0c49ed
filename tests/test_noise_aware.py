"""The noise-aware E[M] against oracles written apart from it: the full-batch closed forms
where there is no noise, the exact heavy-ball expectation, every batch order enumerated,
finite differences of its potentials, quadrature, and Monte Carlo (opt-in)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import CountingModel, Tiny, make_tiny, rel_err
from oracles import batch_gradient, flat_loss

from noisemem import expected_correction, full_batch_correction, memory_correction
from noisemem.expectation import pair_coefficients
from noisemem.noise_aware import (
    _partials,
    _smoothed_soft_sign,
    anti_regularization_direction,
    noise_aware_correction,
    noise_aware_prediction,
    signed_projection,
)
from noisemem.optim import (
    AdamW,
    Form,
    HeavyBall,
    Lion,
    MomentumVariable,
    NAdamW,
    Nesterov,
    Optimizer,
    Source,
)
from noisemem.probe import Probe
from noisemem.problem import Problem

OPTIMIZERS = {
    "heavy_ball": HeavyBall(0.1, 0.9),
    "nesterov": Nesterov(0.1, 0.7),
    "adamw_eps_in_sqrt": AdamW(0.01, 0.9, 0.99, 1e-3, weight_decay=0.1),
    "adamw_eps_outside": AdamW(0.01, 0.8, 0.95, 1e-3, weight_decay=0.1, eps_in_sqrt=False),
    "nadamw": NAdamW(0.01, 0.9, 0.99, 1e-3, weight_decay=0.1),
    "nadamw_eps_outside": NAdamW(0.01, 0.9, 0.99, 1e-3, weight_decay=0.1, eps_in_sqrt=False),
    "nadamw_torch_schedule": NAdamW(0.01, 0.9, 0.99, 1e-3, eps_in_sqrt=False, momentum_decay=4e-3),
    "lion_soft": Lion(0.01, 0.9, 0.99, weight_decay=0.1, eps=1e-3),
    "lion_soft_bias_corrected": Lion(
        0.01, 0.9, 0.99, weight_decay=0.1, eps=1e-3, bias_correction=True
    ),
}
NONLINEAR = [k for k in sorted(OPTIMIZERS) if not OPTIMIZERS[k].linear]
LINEAR = {"heavy_ball": OPTIMIZERS["heavy_ball"], "nesterov": OPTIMIZERS["nesterov"]}


# -- no noise: the full-batch closed forms (Appendix E, Lemmas K.1-K.3) ----------------------
@pytest.mark.parametrize("copies", [1, 3])
@pytest.mark.parametrize("step", [None, 4])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_without_noise_it_is_the_full_batch_correction(opt, step, copies):
    """One batch, or copies of one: every fluctuation vanishes and v = g^2, so the mean field
    must be Lemma K.1-K.3 itself and the noise part zero. The closed forms lose a few digits
    to cancellations in their coefficients (a1 - a2 at small n), hence 1e-12, not 1e-15."""
    tiny = make_tiny("gelu_mlp")
    batches = [tiny.batches[0]] * copies
    optimizer = OPTIMIZERS[opt]
    ours = noise_aware_correction(tiny.model, tiny.loss_fn, batches, optimizer, step=step)
    closed = full_batch_correction(tiny.model, tiny.loss_fn, batches, optimizer, step=step)
    assert float(closed.norm()) > 1e-6
    assert rel_err(ours.mean, closed) < 1e-12
    assert torch.equal(ours.full_batch_part, closed)
    assert float(ours.noise_part.norm()) <= 1e-12 * float(closed.norm())


# -- heavy ball and Nesterov: the exact expectation (THEORY §4) -----------------------------
@pytest.mark.parametrize("epochs, step", [(1, None), (2, None), (2, 5), (3, 9)])
@pytest.mark.parametrize("sampling", ["permute", "replacement"])
@pytest.mark.parametrize("opt", sorted(LINEAR))
def test_linear_optimizers_give_the_exact_expectation_at_every_step(opt, sampling, epochs, step):
    """Phi = x has no second derivatives: the expansion is exact, so every coincidence class
    of the step covariance (same position, same epoch, other epochs) must add up to
    C_same s_same + C_epoch s_diff."""
    tiny = make_tiny("gelu_mlp", num_batches=4)
    optimizer = LINEAR[opt]
    exact = expected_correction(
        tiny.model,
        tiny.loss_fn,
        tiny.batches,
        optimizer,
        epochs=epochs,
        step=step,
        sampling=sampling,
    )
    ours = noise_aware_correction(
        tiny.model, tiny.loss_fn, tiny.batches, optimizer, step=exact.step, sampling=sampling
    )
    assert float(exact.noise_part.norm()) > 1e-3 * float(exact.mean.norm())
    assert rel_err(ours.mean, exact.mean) < 1e-12
    assert rel_err(ours.noise_part, exact.noise_part) < 1e-10
    assert rel_err(ours.full_batch_part, exact.full_batch_part) < 1e-12


def dense_moments(tiny: Tiny) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """g, H g, Cov = mean_i (H_i - H)(g_i - g) and the stacked g_i, from dense autograd
    Hessians of each batch (independent of the probe)."""
    theta = tiny.theta
    H_i = torch.stack(
        [
            torch.autograd.functional.hessian(
                lambda t, b=b: flat_loss(tiny.model, tiny.loss_fn, t, b), theta
            )
            for b in tiny.batches
        ]
    )
    G = torch.stack(
        [batch_gradient(tiny.model, tiny.loss_fn, theta.clone(), b).detach() for b in tiny.batches]
    )
    H, g = H_i.mean(0), G.mean(0)
    cov = torch.einsum("irq,iq->r", H_i - H, G - g) / len(G)
    return g, H @ g, cov, G


@pytest.mark.parametrize("opt", sorted(LINEAR))
def test_linear_limit_is_the_large_n_one_epoch_expectation(opt):
    """step=None is Sec. 6.2's limit: one epoch of m = n + 1 batches, n -> infinity, where
    E[M]/h -> (C_same + C_epoch) H g + C_same Cov (the s_diff term C_epoch/n vanishes). The
    C's come from expectation.pair_coefficients at n = 3000 (beta^n below 1e-300), H g and
    Cov from dense Hessians; for heavy ball they are also the paper's closed forms."""
    tiny = make_tiny("gelu_mlp", num_batches=5)
    optimizer = LINEAR[opt]
    C = pair_coefficients(optimizer, 3000, 3001)
    _, Hg, cov, _ = dense_moments(tiny)
    expected = optimizer.lr * ((C["same"] + C["epoch"]) * Hg + C["same"] * cov)
    ours = noise_aware_correction(tiny.model, tiny.loss_fn, tiny.batches, optimizer)
    assert rel_err(ours.mean, expected) < 1e-10
    if opt == "heavy_ball":
        beta = optimizer.beta
        assert math.isclose(C["same"], beta / ((1 - beta) ** 2 * (1 + beta)), rel_tol=1e-12)
        assert math.isclose(C["same"] + C["epoch"], beta / (1 - beta) ** 3, rel_tol=1e-12)


@pytest.mark.parametrize(
    "opt",
    [
        AdamW(0.01, 0.8, 0.9, 1e-3, weight_decay=0.1),
        NAdamW(0.01, 0.8, 0.9, 1e-3, weight_decay=0.1, eps_in_sqrt=False),
        Lion(0.01, 0.8, 0.9, weight_decay=0.1, eps=1e-3),
    ],
    ids=["adamw", "nadamw_eps_outside", "lion_soft"],
)
def test_limit_is_the_large_n_prediction_with_independent_positions(opt):
    """step=None sums its weights over lags in closed form (module docstring, section 4);
    step=n with independent positions (replacement) sums the same weights over positions.
    At n = 400 every kernel's tail is below 0.9^400 = 5e-19 (and the bias corrections have
    converged), so every term must agree."""
    tiny = make_tiny("gelu_mlp")
    limit = noise_aware_correction(tiny.model, tiny.loss_fn, tiny.batches, opt)
    large = noise_aware_correction(
        tiny.model, tiny.loss_fn, tiny.batches, opt, step=400, sampling="replacement"
    )
    assert set(limit.terms) == set(large.terms)
    for key, value in limit.terms.items():
        assert rel_err(value, large.terms[key]) < 1e-9, key


# -- the gradient forms of the noise part (module docstring, section 6) --------------------
def central_difference(f, theta: torch.Tensor, u: torch.Tensor, t: float = 1e-4) -> float:
    """d/dt f(theta + t u) at 0: central differences at t and t/2, Richardson-extrapolated
    (the t^2 error terms cancel)."""

    def central(step: float) -> float:
        return (float(f(theta + step * u)) - float(f(theta - step * u))) / (2 * step)

    return (4 * central(t / 2) - central(t)) / 3


def batch_grads_at(tiny: Tiny, theta: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [batch_gradient(tiny.model, tiny.loss_fn, theta.clone(), b).detach() for b in tiny.batches]
    )


# Richardson-extrapolated central differences, t = 1e-4: truncation O(t^4 f^(5)/f') (below
# 1e-9 unless f varies on a scale under 0.02 along u) and rounding ~1e-16 |f| / (t |f'|),
# about 1e-11 here; 1e-7 leaves two orders of margin.
FD_TOL = 1e-7


def test_heavy_ball_noise_part_is_the_gradient_of_the_variance_regularizer():
    """noise_part = h c Cov = (h c / 2) grad R, R = mean_i ||g_i - g||^2 (THEORY §5), with c
    the step covariance's weight."""
    tiny = make_tiny("gelu_mlp", num_batches=4)
    opt = HeavyBall(0.1, 0.9)
    ours = noise_aware_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, step=7)
    c = ours.coefficients["step_covariance/x/x"]

    def R(theta: torch.Tensor) -> torch.Tensor:
        G = batch_grads_at(tiny, theta)
        return ((G - G.mean(0)) ** 2).sum(1).mean()

    grad_R = 2 * ours.noise_part / (opt.lr * c)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        u = torch.randn(tiny.theta.shape, generator=gen, dtype=torch.float64)
        fd = central_difference(R, tiny.theta, u)
        assert abs(fd - float(grad_R @ u)) <= FD_TOL * abs(fd)


def test_adamw_step_covariance_is_a_preconditioned_gradient():
    """AdamW (eps inside, bias correction): step_covariance/x/x = h W P . grad R_P with
    P = 1/sqrt(v + eps) frozen, R_P = 1/2 mean_i sum_r P_r (g_i - g)_r^2; and
    <H_i (P delta_i)> = grad sum_r sqrt(v_r + eps) - H (P g), the unfrozen potential."""
    tiny = make_tiny("gelu_mlp", num_batches=4)
    eps = 1e-3
    opt = AdamW(0.01, 0.9, 0.99, eps, weight_decay=0.1)
    ours = noise_aware_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, step=7)
    W = ours.coefficients["step_covariance/x/x"]
    term = ours.terms["step_covariance/x/x"]
    g, _, _, G = dense_moments(tiny)
    P = torch.rsqrt((G * G).mean(0) + eps)
    grad_frozen = term / (opt.lr * W * P)  # term = h P . <H_i (W P delta_i)> = h W P . grad R_P
    H = torch.autograd.functional.hessian(
        lambda t: flat_loss(tiny.model, tiny.loss_fn, t, tiny.full[0]), tiny.theta
    )

    def R_frozen(theta: torch.Tensor) -> torch.Tensor:
        Gt = batch_grads_at(tiny, theta)
        return 0.5 * (P * (Gt - Gt.mean(0)) ** 2).sum(1).mean()

    def potential(theta: torch.Tensor) -> torch.Tensor:
        Gt = batch_grads_at(tiny, theta)
        return torch.sqrt((Gt * Gt).mean(0) + eps).sum()

    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        u = torch.randn(tiny.theta.shape, generator=gen, dtype=torch.float64)
        fd = central_difference(R_frozen, tiny.theta, u)
        assert abs(fd - float(grad_frozen @ u)) <= FD_TOL * abs(fd)
        fd = central_difference(potential, tiny.theta, u)
        assert abs(fd - float((grad_frozen + H @ (P * g)) @ u)) <= FD_TOL * abs(fd)


# -- against every batch order ---------------------------------------------------------------
def every_order(tiny: Tiny, batches, optimizer: Optimizer, steps: int, sampling: str):
    """E[M^(steps-1)] by enumeration with Eq. (9) (memory_correction): every product of
    per-epoch permutations of the batches (permute; steps a multiple of their number), or
    every sequence of draws (replacement)."""
    m = len(batches)
    if sampling == "permute":
        perms = list(itertools.permutations(range(m)))
        combos = itertools.product(perms, repeat=steps // m)
        seqs = [[i for p in c for i in p] for c in combos]
    else:
        seqs = [list(s) for s in itertools.product(range(m), repeat=steps)]
    total = None
    for seq in seqs:
        M = memory_correction(tiny.model, tiny.loss_fn, batches, optimizer, seq, tail_tol=0)
        total = M if total is None else total + M
    return total / len(seqs)


def noise_scaled(tiny: Tiny, t: float):
    """Batches whose inputs are x_bar + t (x_i - x_bar), all with the first batch's labels:
    at t = 0 they are identical, and every fluctuation (delta_i, eps_i, H_i - H) is O(t)."""
    X = torch.stack([x for x, _ in tiny.batches])
    Y = tiny.batches[0][1]
    x_bar = X.mean(0)
    return [(x_bar + t * (x - x_bar), Y) for x in X]


ENUMERATED = [
    "adamw_eps_in_sqrt",
    "adamw_eps_outside",
    "nadamw_torch_schedule",
    "lion_soft",
    "lion_soft_bias_corrected",
]


@pytest.mark.parametrize(
    "opt, sampling", [(o, "permute") for o in ENUMERATED] + [("nadamw", "replacement")]
)
def test_closer_than_full_batch_to_the_expectation_over_every_order(opt, sampling):
    """3 batches of 2 samples, noise larger than the mean gradient in most coordinates: the
    noise-aware prediction must beat the full-batch one against the exact E[M]."""
    tiny = make_tiny("gelu_mlp", num_batches=3, batch_size=2, seed=1)
    optimizer = OPTIMIZERS[opt]
    steps = 6 if sampling == "permute" else 4  # 2 epochs of 3 (36 orders); 3^4 draws
    exact = every_order(tiny, tiny.batches, optimizer, steps, sampling)
    step = steps - 1
    ours = noise_aware_correction(
        tiny.model, tiny.loss_fn, tiny.batches, optimizer, step=step, sampling=sampling
    )
    full_error = rel_err(ours.full_batch_part, exact)
    assert full_error > 0.05  # noise matters here
    assert rel_err(ours.mean, exact) < full_error


@pytest.mark.parametrize("opt", ["adamw_eps_in_sqrt", "nadamw", "lion_soft_bias_corrected"])
def test_error_shrinks_one_order_faster_than_the_full_batch_one(opt):
    """Scale every batch-to-batch difference by t (:func:`noise_scaled`). The full-batch
    prediction misses the noise terms, which are second order in the fluctuations: its error
    is O(t^2). The noise-aware one keeps everything to second order and drops third-order
    terms (Adam: in the second-moment fluctuation; Lion: the Gaussian closure's cumulants and
    Hermite orders): O(t^3). Between t = 0.2 and 0.05 the fitted slopes must be 2 and 3, up
    to the next order's O(t) drift (measured: 1.98-1.99 and 3.0-3.6; bounds 2 +- 0.15, > 2.75).
    Exact E[M] over every order of 3 batches, 2 epochs (step 5; all coincidence classes)."""
    tiny = make_tiny("gelu_mlp", num_batches=3, batch_size=2, seed=1)
    optimizer = OPTIMIZERS[opt]
    errors = {}
    for t in (0.2, 0.05):
        batches = noise_scaled(tiny, t)
        exact = every_order(tiny, batches, optimizer, 6, "permute")
        ours = noise_aware_correction(tiny.model, tiny.loss_fn, batches, optimizer, step=5)
        errors[t] = (rel_err(ours.full_batch_part, exact), rel_err(ours.mean, exact))
    slope_full = math.log(errors[0.2][0] / errors[0.05][0]) / math.log(4)
    slope_ours = math.log(errors[0.2][1] / errors[0.05][1]) / math.log(4)
    assert abs(slope_full - 2) < 0.15
    assert slope_ours > 2.75


# -- the parts add up; a shared probe -------------------------------------------------------
@pytest.mark.parametrize("opt", ["adamw_eps_in_sqrt", "lion_soft", "heavy_ball"])
def test_terms_add_up_and_a_shared_probe_changes_nothing(opt):
    tiny = make_tiny("gelu_mlp", num_batches=4)
    optimizer = OPTIMIZERS[opt]
    problem = Problem(tiny.model, tiny.loss_fn, tiny.batches)
    probe = Probe(problem)
    shared = noise_aware_prediction(problem, optimizer, 6, probe)
    fresh = noise_aware_correction(tiny.model, tiny.loss_fn, tiny.batches, optimizer, step=6)
    assert rel_err(shared.mean, fresh.mean) < 1e-13
    assert rel_err(sum(shared.terms.values()), shared.mean) < 1e-13
    assert rel_err(shared.full_batch_part + shared.noise_part, shared.mean) < 1e-13
    assert shared.step == 6 and shared.sampling == "permute"
    assert shared.coefficients["s_diff"] == -1 / 3


# -- Phi's partial derivatives -----------------------------------------------------------------
def phi_of_channels(optimizer: Optimizer, x, q, p):
    """The optimizer's own phi with x in its first gradient momentum, q in the squared one,
    p in the first PARAM one and zeros elsewhere."""
    m, seen = [], set()
    for v in optimizer.variables:
        role = {Source.GRAD_SQ: "q", Source.PARAM: "p"}.get(v.source, "x")
        m.append({"x": x, "q": q, "p": p}[role] if role not in seen else torch.zeros_like(x))
        seen.add(role)
    return optimizer.phi(*m)


@pytest.mark.parametrize(
    "opt", ["heavy_ball", "adamw_eps_in_sqrt", "adamw_eps_outside", "nadamw_eps_outside"]
)
def test_partials_are_the_derivatives_of_the_optimizers_own_phi(opt):
    """Every d^(i+j) Phi/dx^i dq^j, i + j <= 3, against nested forward-mode derivatives of
    optimizer.phi (torch.func.jvp), at random points and at q = 0 (eps outside: the guard of
    _adam_step gives zero derivatives in q there)."""
    from torch.func import jvp

    optimizer = OPTIMIZERS[opt]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(50, generator=gen, dtype=torch.float64)
    q = torch.rand(50, generator=gen, dtype=torch.float64) * 1e-2
    q[:5] = 0.0
    p = torch.randn(50, generator=gen, dtype=torch.float64)
    if all(v.source is not Source.PARAM for v in optimizer.variables):
        p = torch.zeros_like(p)  # no weight decay momentum: the engine's p is 0 then
    ours = _partials(optimizer, x, q, p)
    one, zero = torch.ones_like(x), torch.zeros_like(x)

    def along(f, tangent):
        return lambda a, b: jvp(f, (a, b), tangent)[1]

    for (i, j), value in ours.items():
        f = lambda a, b: phi_of_channels(optimizer, a, b, p)  # noqa: E731
        for _ in range(i):
            f = along(f, (one, zero))
        for _ in range(j):
            f = along(f, (zero, one))
        expected = f(x, q)
        scale = float(expected.abs().max()) + 1.0
        assert float((value - expected).abs().max()) <= 1e-12 * scale, (i, j)


# -- the Gaussian averages of the soft sign ---------------------------------------------------
@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
def test_soft_sign_averages_match_adaptive_quadrature():
    """E[s^(k)(mu + sd Z)], k = 0, 1, 2, against scipy's adaptive quadrature (breakpoints at
    the soft sign's step), over mu and sd from 1e-3 to 1e3 times sqrt(eps), both routes. The
    64-node rules were measured to ~2e-5 of each quantity's scale max(sqrt(eps), sd)^-k over
    that whole plane; 1e-4 is the bound."""
    from scipy import integrate

    eps = 1e-8
    root = math.sqrt(eps)
    cases = [
        (a * root, b * root)
        for a in (-1e3, -30.0, -1.0, 0.0, 0.5, 8.0, 1e3)
        for b in (1e-3, 0.7, 3.0, 40.0, 1e3)
    ]
    mu = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    sd = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    D = _smoothed_soft_sign(eps, mu, sd, torch.zeros_like(mu))
    derivatives = [
        lambda x: x / math.sqrt(x * x + eps),
        lambda x: eps / (x * x + eps) ** 1.5,
        lambda x: -3 * eps * x / (x * x + eps) ** 2.5,
    ]
    for r, (m_, s_) in enumerate(cases):
        scale = max(root, s_)
        w = root / s_
        z0 = -m_ / s_  # where x = 0, the soft sign's step (width w in z)
        points = sorted(z for z in (z0 + k * w for k in (-10, -1, 0, 1, 10)) if abs(z) < 39)
        for k, f in enumerate(derivatives):
            ref, _ = integrate.quad(
                lambda z, f=f, a=m_, b=s_: (
                    f(a + b * z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
                ),
                -40,
                40,
                points=points,
                limit=2000,
                epsabs=0,
                epsrel=1e-10,
            )
            ours = -float(D[(k, 0)][r])  # Phi = -s(x) + p
            assert abs(ours - ref) * scale**k < 1e-4, (m_ / root, s_ / root, k)


# -- Sec. 4's direction ------------------------------------------------------------------------
def test_anti_regularization_direction_is_the_gradient_of_the_one_eps_norm():
    """d = grad_theta ||grad L||_{1,eps} (autograd through the full-batch gradient), and the
    weighted d = H (g / sqrt(v + eps)) with the dense Hessian."""
    tiny = make_tiny("gelu_mlp")
    eps = 1e-4
    theta = tiny.theta.requires_grad_(True)
    g = batch_gradient(tiny.model, tiny.loss_fn, theta, tiny.full[0])
    expected = torch.autograd.grad(torch.sqrt(g * g + eps).sum(), theta)[0]
    ours = anti_regularization_direction(tiny.model, tiny.loss_fn, tiny.batches, eps=eps)
    assert rel_err(ours, expected) < 1e-12
    g, _, _, G = dense_moments(tiny)
    H = torch.autograd.functional.hessian(
        lambda t: flat_loss(tiny.model, tiny.loss_fn, t, tiny.full[0]), tiny.theta
    )
    weighted = anti_regularization_direction(
        tiny.model, tiny.loss_fn, tiny.batches, eps=eps, weighted=True
    )
    assert rel_err(weighted, H @ (g / torch.sqrt((G * G).mean(0) + eps))) < 1e-12
    assert math.isclose(signed_projection(-3.0 * ours, ours), -3.0 * float(ours.norm()))
    assert abs(signed_projection(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))) == 0.0


# -- bad arguments, named before the model runs --------------------------------------------
@dataclass(frozen=True)
class PhiOnly(Optimizer):
    """An optimizer without a closed form (Phi given as a function only)."""

    lr: float = 0.1

    @property
    def variables(self):  # type: ignore[override]
        return (MomentumVariable(Source.GRAD, 0.9),)

    def scales(self, n):
        return np.ones((1, np.size(n)))

    def phi(self, *m):
        return torch.tanh(m[0])


@dataclass(frozen=True)
class DecayingParam(Optimizer):
    """A form whose weight decay has memory (a PARAM momentum with beta > 0)."""

    lr: float = 0.1

    @property
    def variables(self):  # type: ignore[override]
        return (MomentumVariable(Source.GRAD, 0.9), MomentumVariable(Source.PARAM, 0.5))

    @property
    def form(self):
        return Form("sum")

    def scales(self, n):
        return np.ones((2, np.size(n)))


BAD = [
    ({"sampling": "shuffle"}, "sampling='shuffle'"),
    ({"sampling": "reshuffle"}, "sampling='reshuffle'"),
    ({"step": -1}, "step=-1"),
    ({"step": True}, "step=True"),
    ({"step": 2.0}, "step=2.0"),
    ({"optimizer": "sgd"}, "optimizer="),
    ({"optimizer": Lion(0.01, 0.9, 0.99)}, "eps > 0"),
    ({"optimizer": PhiOnly()}, "closed form"),
    ({"optimizer": DecayingParam()}, "PARAM momentum"),
]


@pytest.mark.parametrize("kw, needle", BAD, ids=[n for _, n in BAD])
def test_bad_arguments_are_named_before_any_work(kw, needle):
    tiny = make_tiny("softmax")
    model = CountingModel(tiny.model)
    kw = dict(kw)
    optimizer = kw.pop("optimizer", AdamW(0.01, 0.9, 0.99, 1e-3))
    if optimizer == "sgd":
        optimizer = torch.optim.SGD(tiny.model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as err:
        noise_aware_correction(model, tiny.loss_fn, tiny.batches, optimizer, **kw)
    assert needle in str(err.value)
    assert model.calls == 0


@pytest.mark.parametrize(
    "kw, needle", [({"eps": 0.0}, "eps=0.0"), ({"eps": 1e-8, "weighted": "yes"}, "weighted='yes'")]
)
def test_bad_direction_arguments_are_named_before_any_work(kw, needle):
    tiny = make_tiny("softmax")
    model = CountingModel(tiny.model)
    with pytest.raises(ValueError) as err:
        anti_regularization_direction(model, tiny.loss_fn, tiny.batches, **kw)
    assert needle in str(err.value)
    assert model.calls == 0


# -- Monte Carlo, where orders are too many to enumerate -------------------------------------
def gap_in_standard_errors(opt: Optimizer, permutations: int, seed: int) -> tuple[float, float]:
    """8 batches of 2, 2 epochs (8!^2 orders): |full - MC| - |ours - MC| and the Monte Carlo
    error's norm sqrt(sum_r stderr_r^2)."""
    tiny = make_tiny("gelu_mlp", num_batches=8, batch_size=2, seed=2)
    mc = expected_correction(
        tiny.model,
        tiny.loss_fn,
        tiny.batches,
        opt,
        epochs=2,
        method="monte_carlo",
        permutations=permutations,
        seed=seed,
    )
    ours = noise_aware_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, step=mc.step)
    assert mc.stderr is not None
    gap = float((ours.full_batch_part - mc.mean).norm() - (ours.mean - mc.mean).norm())
    return gap, float(mc.stderr.pow(2).sum().sqrt())


# |x - E| and |x - MC| differ by at most |MC - E|, and |MC - E|^2 = sum_r stderr_r^2 z_r^2
# exceeds 16 sum_r stderr_r^2 with probability below P(chi^2_1 > 16) = 6e-5 even when the z_r
# are fully correlated. A gap above 2 * 4 = 8 Monte Carlo norms therefore means the
# noise-aware prediction is closer to the true E[M] than the full-batch one.
GAP = 8.0


@pytest.mark.parametrize("opt", ["adamw_eps_in_sqrt", "nadamw_torch_schedule"])
def test_closer_than_full_batch_to_monte_carlo_light(opt):
    """150 orders: enough where the full-batch error is large (measured gaps 48-77 Monte
    Carlo norms); Lion's full-batch error is smaller here and is left to the heavy twin."""
    gap, se = gap_in_standard_errors(OPTIMIZERS[opt], 150, seed=1)
    assert gap > GAP * se


@pytest.mark.montecarlo
@pytest.mark.parametrize("opt", NONLINEAR)
def test_closer_than_full_batch_to_monte_carlo_heavy(opt):
    """The opt-in twin, every non-linear optimizer. The gap in Monte Carlo norms grows like
    sqrt(orders): at 150 orders it was 2.5-6 for Lion and 48-77 for the Adam family, so
    4000 orders for Lion (13-31 expected) and 1000 for the others."""
    orders = 4000 if opt.startswith("lion") else 1000
    gap, se = gap_in_standard_errors(OPTIMIZERS[opt], orders, seed=5)
    assert gap > GAP * se

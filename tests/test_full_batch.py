"""Full-batch closed forms (Appendix E, Lemmas K.1-K.3) against Eq. (9) on the full batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny, rel_err
from oracles import batch_gradient, flat_loss, literal_correction

from noisemem import expected_correction, full_batch_correction, memory_correction
from noisemem.expectation import exact_expectation
from noisemem.full_batch import full_batch_prediction, heavy_ball_coefficient, nesterov_coefficient
from noisemem.optim import AdamW, HeavyBall, Lion, NAdamW, Nesterov
from noisemem.probe import Probe
from noisemem.problem import Problem

CLOSED_FORMS = {
    "heavy_ball": HeavyBall(0.1, 0.9),
    "nesterov": Nesterov(0.1, 0.7),
    "adamw_eps_in_sqrt": AdamW(0.01, 0.9, 0.99, 1e-3, weight_decay=0.1),
    "adamw_eps_outside": AdamW(0.01, 0.8, 0.95, 1e-3, weight_decay=0.1, eps_in_sqrt=False),
    "nadamw": NAdamW(0.01, 0.9, 0.99, 1e-3, weight_decay=0.1),
    "nadamw_eps_outside": NAdamW(0.01, 0.9, 0.99, 1e-3, weight_decay=0.1, eps_in_sqrt=False),
    "nadamw_torch_schedule": NAdamW(0.01, 0.9, 0.99, 1e-3, eps_in_sqrt=False, momentum_decay=4e-3),
    "lion_soft": Lion(0.01, 0.9, 0.99, weight_decay=0.1, eps=1e-3),
    "lion_soft_bias_corrected": Lion(
        0.01, 0.8, 0.95, weight_decay=0.1, eps=1e-2, bias_correction=True
    ),
}


@pytest.mark.parametrize("step", [1, 2, 6])
@pytest.mark.parametrize("opt", sorted(CLOSED_FORMS))
def test_finite_n_closed_form_equals_eq9_on_the_full_batch(tiny, opt, step):
    optimizer = CLOSED_FORMS[opt]
    closed = full_batch_correction(tiny.model, tiny.loss_fn, tiny.batches, optimizer, step=step)
    engine = memory_correction(
        tiny.model, tiny.loss_fn, tiny.full, optimizer, [0] * (step + 1), tail_tol=0
    )
    assert float(engine.norm()) > 1e-8
    assert rel_err(closed, engine) < 1e-9


@pytest.mark.parametrize("opt", ["heavy_ball", "adamw_eps_in_sqrt", "lion_soft"])
def test_finite_n_closed_form_equals_literal_eq9(opt):
    tiny = make_tiny("gelu_mlp")
    optimizer = CLOSED_FORMS[opt]
    closed = full_batch_correction(tiny.model, tiny.loss_fn, tiny.batches, optimizer, step=4)
    literal = literal_correction(
        tiny.model, tiny.loss_fn, tiny.full, optimizer, [0] * 5, tiny.theta
    )
    assert rel_err(closed, literal) < 1e-9


@pytest.mark.parametrize("opt", sorted(CLOSED_FORMS))
def test_limit_is_reached_by_long_full_batch_runs(opt):
    tiny = make_tiny("softmax")
    optimizer = CLOSED_FORMS[opt]
    limit = full_batch_correction(tiny.model, tiny.loss_fn, tiny.batches, optimizer)
    if opt == "nadamw_torch_schedule":
        # mu_t -> beta1 only like 0.96^(t psi): compare the paper form's limit instead
        optimizer = NAdamW(0.01, 0.9, 0.99, 1e-3, eps_in_sqrt=False)
        limit_paper = full_batch_correction(tiny.model, tiny.loss_fn, tiny.batches, optimizer)
        assert rel_err(limit, limit_paper) < 1e-12
    long = memory_correction(tiny.model, tiny.loss_fn, tiny.full, optimizer, [0] * 4000, tail_tol=0)
    assert rel_err(limit, long) < 1e-9


def test_heavy_ball_coefficient_is_lemma_k1_double_sum():
    for beta in (0.0, 0.5, 0.9):
        for n in (0, 1, 3, 10):
            literal = sum(
                beta**k * sum((1 - beta ** (s + 1)) / (1 - beta) for s in range(n - k, n))
                for k in range(1, n + 1)
            )
            assert abs(heavy_ball_coefficient(beta, n) - literal) <= 1e-12 * max(1.0, literal)


def test_nesterov_coefficient_is_its_double_sum_and_appendix_e_limit():
    for beta in (0.3, 0.9):
        for n in (0, 1, 4, 12):
            literal = sum(
                beta ** (k + 1) * sum((1 - beta ** (s + 2)) / (1 - beta) for s in range(n - k, n))
                for k in range(1, n + 1)
            )
            assert abs(nesterov_coefficient(beta, n) - literal) <= 1e-12 * max(1.0, literal)
        assert abs(nesterov_coefficient(beta, 3000) - beta**2 / (1 - beta) ** 3) < 1e-9


def test_adamw_limit_is_appendix_e_as_printed():
    """Appendix E: M = h ((b1/(1-b1) - b2/(1-b2))/(g^2+eps)^(1/2) + eps b2/(1-b2)/(g^2+eps)^(3/2))
    (grad||grad L||_{1,eps} + lambda H theta), with autograd for every derivative."""
    tiny = make_tiny("gelu_mlp")
    b1, b2, eps, lam, h = 0.9, 0.99, 1e-3, 0.1, 0.01
    opt = AdamW(h, b1, b2, eps, weight_decay=lam)
    theta = tiny.theta.requires_grad_(True)
    g = batch_gradient(tiny.model, tiny.loss_fn, theta, tiny.full[0])
    norm_1eps = torch.sqrt(g**2 + eps).sum()
    grad_norm = torch.autograd.grad(norm_1eps, theta, retain_graph=True)[0]
    H_theta = torch.autograd.grad(g, theta, grad_outputs=theta.detach())[0]
    g = g.detach()
    D = g**2 + eps
    coef = (b1 / (1 - b1) - b2 / (1 - b2)) / D**0.5 + eps * b2 / (1 - b2) / D**1.5
    expected = h * coef * (grad_norm + lam * H_theta)
    ours = full_batch_correction(tiny.model, tiny.loss_fn, tiny.batches, opt)
    assert rel_err(ours, expected) < 1e-12


def test_lion_limit_is_appendix_e_as_printed():
    """M = -h rho1/(1-rho2) hessK(-g) H [gradK(-g) - lambda theta], K = ||.||_{1,eps}."""
    tiny = make_tiny("gelu_mlp")
    r1, r2, eps, lam, h = 0.9, 0.99, 1e-3, 0.1, 0.01
    opt = Lion(h, r1, r2, weight_decay=lam, eps=eps)
    theta = tiny.theta.requires_grad_(True)
    g = batch_gradient(tiny.model, tiny.loss_fn, theta, tiny.full[0])
    gd = g.detach()
    x = -gd
    grad_K = x / torch.sqrt(x**2 + eps)
    hess_K = torch.diag(eps / (x**2 + eps) ** 1.5)
    H_v = torch.autograd.grad(g, theta, grad_outputs=grad_K - lam * theta.detach())[0]
    expected = -h * r1 / (1 - r2) * hess_K @ H_v
    ours = full_batch_correction(tiny.model, tiny.loss_fn, tiny.batches, opt)
    assert rel_err(ours, expected) < 1e-12


def test_bad_step_and_sign_lion_are_refused():
    tiny = make_tiny("softmax")
    for step in (-1, True, 1.0):
        with pytest.raises(ValueError, match=f"step={step!r}"):
            full_batch_correction(
                tiny.model, tiny.loss_fn, tiny.batches, HeavyBall(0.1, 0.9), step=step
            )
    at_int = full_batch_correction(
        tiny.model, tiny.loss_fn, tiny.batches, HeavyBall(0.1, 0.9), step=3
    )
    at_numpy = full_batch_correction(
        tiny.model, tiny.loss_fn, tiny.batches, HeavyBall(0.1, 0.9), step=np.int64(3)
    )
    assert torch.equal(at_int, at_numpy)
    with pytest.raises(ValueError, match="optimizer="):
        full_batch_correction(
            tiny.model, tiny.loss_fn, tiny.batches, torch.optim.SGD(tiny.model.parameters(), 0.1)
        )
    with pytest.raises(ValueError, match="eps > 0"):
        full_batch_correction(tiny.model, tiny.loss_fn, tiny.batches, Lion(0.1, 0.9, 0.99))


def test_one_probe_serves_every_prediction_and_matches_the_dense_hessian(tiny):
    """The study shares one Probe (one graph of the batch gradients) between the noise
    direction, every full-batch prediction and the exact expectation; its g, H g, Cov and
    H v must equal the dense full-loss Hessian's, and sharing must not change any result."""
    problem = Problem(tiny.model, tiny.loss_fn, tiny.batches)
    theta = problem.theta
    full_batch = tiny.full[0]

    def full_loss(t: torch.Tensor) -> torch.Tensor:
        return flat_loss(tiny.model, tiny.loss_fn, t, full_batch)

    H = torch.autograd.functional.hessian(full_loss, theta)
    g = torch.autograd.functional.jacobian(full_loss, theta)
    H_i = [
        torch.autograd.functional.hessian(
            lambda t, b=b: flat_loss(tiny.model, tiny.loss_fn, t, b), theta
        )
        for b in tiny.batches
    ]
    G = torch.stack(
        [batch_gradient(tiny.model, tiny.loss_fn, theta, b).detach() for b in tiny.batches]
    )
    cov = torch.stack([h @ gi for h, gi in zip(H_i, G, strict=True)]).mean(0) - H @ g

    probe = Probe(problem)
    g_p, Hg_p, cov_p = probe.hessian_moments()
    assert rel_err(g_p, g) < 1e-12
    assert rel_err(Hg_p, H @ g) < 1e-12
    assert float(cov.norm()) > 1e-6 and rel_err(cov_p, cov) < 1e-12
    v = torch.linspace(-1.0, 1.0, theta.numel(), dtype=theta.dtype)
    assert rel_err(probe.full_hvp(v), H @ v) < 1e-12
    assert probe.hessian_moments() is probe.hessian_moments()  # computed once per probe

    for name, optimizer in CLOSED_FORMS.items():
        for step in (None, 3):
            shared = full_batch_prediction(problem, optimizer, step, probe)
            fresh = full_batch_correction(
                tiny.model, tiny.loss_fn, tiny.batches, optimizer, step=step
            )
            assert rel_err(shared, fresh) < 1e-12, (name, step)
    for sampling in ("permute", "reshuffle", "replacement"):
        shared_e = exact_expectation(problem, HeavyBall(0.1, 0.9), sampling, 5, 2, probe)
        fresh_e = expected_correction(
            tiny.model,
            tiny.loss_fn,
            tiny.batches,
            HeavyBall(0.1, 0.9),
            epochs=2,
            step=5,
            sampling=sampling,
        )
        assert rel_err(shared_e.mean, fresh_e.mean) < 1e-12, sampling

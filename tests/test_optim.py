"""Optimizers in history form: torch.optim runs, the literal iteration (1), bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, rel_err
from oracles import literal_memoryful_run
from torch import nn

from noisemem.optim import AdamW, HeavyBall, Lion, NAdamW, Nesterov
from noisemem.trajectory import memoryful_run

SEQUENCE = [0, 2, 1, 3, 3, 0, 1, 2, 0]


def torch_run(tiny, make_opt, sequence):
    """Iterates of a torch.optim optimizer over the batch sequence.

    The default dtype is float64 meanwhile: torch.optim keeps scalar state (step, NAdam's
    mu_product) in the default dtype, and float32 bookkeeping would limit agreement to 1e-9.
    """
    model = tiny.model
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        opt = make_opt(model.parameters())
        out = [tiny.theta]
        for i in sequence:
            x, y = tiny.batches[i]
            opt.zero_grad()
            tiny.loss_fn(model(x), y).backward()
            opt.step()
            out.append(tiny.theta)
    finally:
        torch.set_default_dtype(previous)
    return torch.stack(out)


TORCH_CASES = {
    "sgd_momentum": (
        HeavyBall(0.1, 0.9),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0),
    ),
    "sgd_nesterov": (
        Nesterov(0.1, 0.8),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True),
    ),
    "adam": (
        AdamW(0.01, 0.9, 0.99, 1e-8, eps_in_sqrt=False),
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.99), eps=1e-8),
    ),
    "adamw": (
        AdamW(0.01, 0.8, 0.95, 1e-6, weight_decay=0.3, eps_in_sqrt=False),
        lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3),
    ),
    "nadam_decoupled": (
        NAdamW(0.01, 0.9, 0.99, 1e-8, weight_decay=0.2, eps_in_sqrt=False, momentum_decay=4e-3),
        lambda p: torch.optim.NAdam(
            p,
            lr=0.01,
            betas=(0.9, 0.99),
            eps=1e-8,
            weight_decay=0.2,
            momentum_decay=4e-3,
            decoupled_weight_decay=True,
        ),
    ),
    "nadam_fast_schedule": (
        NAdamW(0.01, 0.7, 0.9, 1e-8, eps_in_sqrt=False, momentum_decay=0.5),
        lambda p: torch.optim.NAdam(
            p,
            lr=0.01,
            betas=(0.7, 0.9),
            eps=1e-8,
            momentum_decay=0.5,
            decoupled_weight_decay=True,
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_memoryful_run_matches_torch_optim_step_by_step(tiny, case):
    ours, make_torch = TORCH_CASES[case]
    run = memoryful_run(tiny.model, tiny.loss_fn, tiny.batches, ours, SEQUENCE)
    reference = torch_run(tiny, make_torch, SEQUENCE)
    assert run.diverged_at is None
    for n in range(len(SEQUENCE) + 1):
        assert rel_err(run.thetas[n], reference[n]) < 1e-12, f"step {n}"


def lion_reference(tiny, lr, rho1, rho2, wd, sequence):
    """Lion as published (Chen et al. 2023, Algorithm 1), sign update, decoupled decay."""
    theta = tiny.theta
    from oracles import batch_gradient

    m = torch.zeros_like(theta)
    out = [theta.clone()]
    for i in sequence:
        g = batch_gradient(tiny.model, tiny.loss_fn, theta.clone(), tiny.batches[i]).detach()
        c = rho1 * m + (1 - rho1) * g
        theta = theta - lr * (torch.sign(c) + wd * theta)
        m = rho2 * m + (1 - rho2) * g
        out.append(theta.clone())
    return torch.stack(out)


def test_sign_lion_matches_the_published_algorithm(tiny):
    ours = Lion(0.01, 0.9, 0.99, weight_decay=0.1)
    run = memoryful_run(tiny.model, tiny.loss_fn, tiny.batches, ours, SEQUENCE)
    reference = lion_reference(tiny, 0.01, 0.9, 0.99, 0.1, SEQUENCE)
    assert rel_err(run.thetas, reference) < 1e-12


HISTORY_CASES = [
    HeavyBall(0.1, 0.9),
    Nesterov(0.1, 0.7),
    AdamW(0.01, 0.9, 0.99, 1e-3, weight_decay=0.1),
    AdamW(0.01, 0.9, 0.99, 1e-3, weight_decay=0.1, eps_in_sqrt=False),
    NAdamW(0.01, 0.9, 0.99, 1e-3, weight_decay=0.1),
    Lion(0.01, 0.9, 0.99, weight_decay=0.1, eps=1e-3),
    Lion(0.01, 0.9, 0.99, weight_decay=0.1, eps=1e-3, bias_correction=True),
]


@pytest.mark.parametrize("opt", HISTORY_CASES, ids=lambda o: repr(o))
def test_memoryful_run_matches_the_literal_history_form(opt):
    tiny = make_tiny("gelu_mlp")
    run = memoryful_run(tiny.model, tiny.loss_fn, tiny.batches, opt, SEQUENCE)
    literal = literal_memoryful_run(
        tiny.model, tiny.loss_fn, tiny.batches, opt, SEQUENCE, tiny.theta
    )
    assert rel_err(run.thetas, torch.stack(literal)) < 1e-12


def test_torch_nadam_scales_with_constant_mu_reduce_to_bias_corrected_paper_form():
    """momentum_decay -> infinity makes mu_t = beta1; torch's scales are then
    c_1 = (1-b1) b1/(1-b1^(n+2)), c_4 = (1-b1)/(1-b1^(n+1)); the paper's (Example 1.4)
    c_1 = b1 (1-b1)/(1-b1^(n+1)), c_4 = 1-b1. Both tend to b1 (1-b1) and 1-b1."""
    import numpy as np

    b1, n = 0.9, np.arange(400.0)
    fast = NAdamW(0.01, b1, 0.99, 1e-8, momentum_decay=1e6).scales(n)
    paper = NAdamW(0.01, b1, 0.99, 1e-8).scales(n)
    assert np.allclose(fast[0], (1 - b1) * b1 / (1 - b1 ** (n + 2)), rtol=1e-13)
    assert np.allclose(fast[3], (1 - b1) / (1 - b1 ** (n + 1)), rtol=1e-13)
    assert np.allclose(paper[0], b1 * (1 - b1) / (1 - b1 ** (n + 1)), rtol=1e-13)
    assert np.allclose(paper[3], 1 - b1, rtol=1e-13)
    assert np.allclose(fast[[0, 3], -1], paper[[0, 3], -1], rtol=1e-13)


BAD = [
    (lambda: HeavyBall(0.1, 1.0), "beta", "[0, 1)"),
    (lambda: HeavyBall(0.1, -0.1), "beta", "[0, 1)"),
    (lambda: HeavyBall(0.0, 0.9), "lr", "> 0"),
    (lambda: Nesterov(-1.0, 0.9), "lr", "> 0"),
    (lambda: AdamW(0.1, 0.9, 1.5, 1e-8), "beta2", "[0, 1)"),
    (lambda: AdamW(0.1, 0.9, 0.99, 0.0), "eps", "> 0"),
    (lambda: AdamW(0.1, 0.9, 0.99, 1e-8, weight_decay=-1.0), "weight_decay", ">= 0"),
    (lambda: NAdamW(0.1, 1.2, 0.99, 1e-8), "beta1", "[0, 1)"),
    (lambda: NAdamW(0.1, 0.9, 0.99, -1e-8), "eps", "> 0"),
    (lambda: Lion(0.1, 0.9, 0.0), "rho2", "(0, 1)"),
    (lambda: Lion(0.1, 1.0, 0.99), "rho1", "[0, 1)"),
    (lambda: Lion(0.1, 0.9, 0.99, eps=0.0), "eps", "> 0"),
    (lambda: AdamW(0.1, 0.9, 0.99, 1e-8, eps_in_sqrt="no"), "eps_in_sqrt", "True or False"),
    (lambda: Lion(0.1, 0.9, 0.99, eps=1e-3, bias_correction="false"), "bias_correction", "True"),
    (lambda: HeavyBall(True, 0.9), "lr", "> 0"),
]


@pytest.mark.parametrize(
    "make, field, allowed", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_hyperparameters_name_the_field_and_the_allowed_values(make, field, allowed):
    with pytest.raises(ValueError) as err:
        make()
    assert f"{field}=" in str(err.value) and allowed in str(err.value)


def test_optimizers_are_immutable_descriptions():
    opt = HeavyBall(0.1, 0.9)
    with pytest.raises(AttributeError):
        opt.beta = 0.5  # type: ignore[misc]
    assert opt == HeavyBall(0.1, 0.9)


def test_nn_module_untouched_by_runs(tiny):
    before = tiny.theta
    memoryful_run(tiny.model, tiny.loss_fn, tiny.batches, HeavyBall(0.1, 0.9), SEQUENCE)
    assert torch.equal(before, nn.utils.parameters_to_vector(tiny.model.parameters()))

"""The variance regularizer R and its gradient 2 Cov against brute force."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, rel_err
from oracles import batch_gradient, flat_loss

from noisemem import noise_regularizer


def test_value_is_mean_squared_deviation_of_batch_gradients(tiny):
    theta = tiny.theta
    g = torch.stack(
        [batch_gradient(tiny.model, tiny.loss_fn, theta.clone(), b).detach() for b in tiny.batches]
    )
    expected = ((g - g.mean(0)) ** 2).sum(1).mean()
    value, _ = noise_regularizer(tiny.model, tiny.loss_fn, tiny.batches)
    assert abs(value - float(expected)) <= 1e-13 * float(expected)


def test_gradient_is_twice_the_covariance_with_explicit_hessians(tiny):
    theta = tiny.theta
    H = [
        torch.autograd.functional.hessian(
            lambda t, b=b: flat_loss(tiny.model, tiny.loss_fn, t, b), theta
        )
        for b in tiny.batches
    ]
    g = [batch_gradient(tiny.model, tiny.loss_fn, theta.clone(), b).detach() for b in tiny.batches]
    Hm, gm = sum(H) / len(H), sum(g) / len(g)
    cov = sum((Hi - Hm) @ (gi - gm) for Hi, gi in zip(H, g, strict=True)) / len(H)
    _, grad = noise_regularizer(tiny.model, tiny.loss_fn, tiny.batches)
    assert rel_err(grad, 2 * cov) < 1e-10


def test_gradient_matches_central_finite_differences():
    tiny = make_tiny("gelu_mlp")
    _, grad = noise_regularizer(tiny.model, tiny.loss_fn, tiny.batches)
    theta = tiny.theta
    eps = 1e-6
    for r in (0, 5, 17, len(theta) - 1):
        vals = []
        for sign in (1, -1):
            t = theta.clone()
            t[r] += sign * eps
            torch.nn.utils.vector_to_parameters(t, tiny.model.parameters())
            vals.append(noise_regularizer(tiny.model, tiny.loss_fn, tiny.batches)[0])
        torch.nn.utils.vector_to_parameters(theta, tiny.model.parameters())
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert abs(fd - float(grad[r])) < 1e-7 * max(1.0, abs(fd))


def test_per_sample_variant_uses_every_sample_as_a_batch():
    tiny = make_tiny("softmax")
    singles = [(x[i : i + 1], y[i : i + 1]) for x, y in tiny.batches for i in range(len(x))]
    a = noise_regularizer(tiny.model, tiny.loss_fn, tiny.batches, per_sample=True)
    b = noise_regularizer(tiny.model, tiny.loss_fn, singles)
    assert abs(a[0] - b[0]) < 1e-14 and rel_err(a[1], b[1]) < 1e-13


def test_per_sample_must_be_a_bool():
    tiny = make_tiny("softmax")
    with pytest.raises(ValueError, match="per_sample='x'"):
        noise_regularizer(tiny.model, tiny.loss_fn, tiny.batches, per_sample="x")

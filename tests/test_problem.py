"""The native gradient order (GradLayout) of a Problem, and Probes that work in it."""

from __future__ import annotations

import pytest
import torch
from conftest import Tiny, make_tiny, rel_err
from torch import Tensor, nn

from noisemem.correction import correction_at
from noisemem.optim import AdamW, HeavyBall
from noisemem.probe import Probe
from noisemem.problem import GradLayout, Problem, storage_order
from noisemem.studies.models import SmallCNN


def identity_layout(problem: Problem) -> GradLayout:
    return GradLayout(tuple(tuple(range(len(s))) for s in problem.shapes), None, None)


def cnn_problem() -> Problem:
    torch.manual_seed(0)
    model = SmallCNN(inputs=16, classes=3, channels=2).double()
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(2, 16, generator=gen, dtype=torch.float64), torch.randint(0, 3, (2,)))
        for _ in range(3)
    ]
    return Problem(model, nn.functional.cross_entropy, batches)


def test_storage_order_reads_permuted_contiguous_tensors() -> None:
    a = torch.zeros(3, 4)
    assert storage_order(a) == (0, 1)
    assert storage_order(a.t()) == (1, 0)
    b = torch.zeros(2, 3, 4, 5).permute(0, 2, 3, 1)  # channels-last style
    assert storage_order(b) == (0, 3, 1, 2)
    assert b.permute(storage_order(b)).is_contiguous()
    assert storage_order(torch.zeros(4, 6)[:, ::2]) == (0, 1)  # not dense: its own order


def test_linear_weights_are_native_transposed() -> None:
    """Autograd hands back a Linear weight's gradient transposed: its native order is the
    weight's transpose, row by row; biases keep theirs."""
    tiny = make_tiny("gelu_mlp")
    problem = Problem(tiny.model, tiny.loss_fn, tiny.batches)
    layout = problem.layout
    assert layout.orders == ((1, 0), (0,), (1, 0), (0,))
    assert layout.index is not None and layout.inverse is not None
    d = problem.theta.numel()
    assert torch.equal(torch.sort(layout.index).values, torch.arange(d))
    W1 = tiny.model[0].weight.detach()
    assert torch.equal(layout.to_native(problem.theta)[: W1.numel()], W1.t().reshape(-1))
    v = torch.randn(5, d, dtype=torch.float64)
    assert torch.equal(layout.to_standard(layout.to_native(v)), v)


@pytest.mark.parametrize("name", ["gelu_mlp", "softmax", "cnn"])
def test_native_loss_and_gradients_match_the_standard_order(name: str) -> None:
    problem = cnn_problem() if name == "cnn" else Problem(*_parts(make_tiny(name)))
    layout = problem.layout
    theta = problem.theta
    chunks = torch.split(layout.to_native(theta), problem.numels)
    x, y = problem.X[0], problem.Y[0]
    assert float(problem.native_loss(chunks, x, y)) == pytest.approx(
        float(problem.loss(theta, x, y)), rel=1e-15
    )
    m = problem.num_batches
    copies = [c.clone().expand(m, -1).requires_grad_(True) for c in chunks]
    G = torch.cat(problem.batch_grads_at(copies), 1).detach()
    assert rel_err(layout.to_standard(G), problem.batch_grads(theta)) < 1e-13


def _parts(tiny: Tiny) -> tuple[nn.Module, object, list[tuple[Tensor, Tensor]]]:
    return tiny.model, tiny.loss_fn, tiny.batches


@pytest.mark.parametrize("name", ["gelu_mlp", "cnn"])
def test_probe_is_the_same_in_any_order(name: str) -> None:
    """A Probe in the native order and one forced to the standard order agree on every
    public quantity: the native order only permutes coordinates inside."""
    problem = cnn_problem() if name == "cnn" else Problem(*_parts(make_tiny(name)))
    tiny_model, loss_fn = problem.model, problem.loss_fn
    batches = list(zip(problem.X, problem.Y, strict=True))
    plain = Problem(tiny_model, loss_fn, batches, layout=identity_layout(problem))
    if name == "gelu_mlp":
        assert problem.layout.index is not None  # the check below is not vacuous
    a, b = Probe(problem), Probe(plain)
    for x, z in zip(a.hessian_moments(), b.hessian_moments(), strict=True):
        assert rel_err(x, z) < 1e-12
    assert rel_err(a.grads, b.grads) < 1e-13
    W = torch.randn(problem.num_batches, problem.theta.numel(), dtype=torch.float64)
    assert rel_err(a.batch_hvps(W), b.batch_hvps(W)) < 1e-12
    assert rel_err(a.summed_hvp(W), b.summed_hvp(W)) < 1e-12
    seq = [0, 2, 1, 1, 0, 2]
    for opt in (HeavyBall(0.1, 0.9), AdamW(1e-3, 0.9, 0.999, 1e-8, 0.01)):
        assert rel_err(a.direction(opt, seq), b.direction(opt, seq)) < 1e-13
        assert rel_err(correction_at(a, opt, seq), correction_at(b, opt, seq)) < 1e-12


def test_views_at_other_parameters_share_one_layout() -> None:
    tiny = make_tiny("gelu_mlp")
    problem = Problem(tiny.model, tiny.loss_fn, tiny.batches)
    view = problem.at(problem.theta + 1.0)
    assert view.layout is problem.layout  # read once, through either
    assert problem.at(problem.theta).layout is problem.layout

"""Probes at many points in one graph (noisemem.ensemble) against one Probe per point and the
literal Eq. (9), on tiny float64 problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny, rel_err
from oracles import literal_correction
from user_optimizers import RMSProp, SoftSignum

from noisemem import budget
from noisemem.correction import correction_at
from noisemem.ensemble import EnsembleProbe, corrections_at
from noisemem.full_batch import closed_form_at, full_batch_prediction
from noisemem.noise_aware import direction_at
from noisemem.optim import AdamW, HeavyBall, Lion, NAdamW, Nesterov
from noisemem.probe import Probe
from noisemem.problem import Problem

OPTIMIZERS = {
    "heavy_ball": HeavyBall(0.1, 0.9),
    "nesterov": Nesterov(0.1, 0.8),
    "adamw": AdamW(1e-2, 0.9, 0.99, 1e-6, 0.01),
    "adamw_eps_in_sqrt": AdamW(1e-2, 0.8, 0.95, 1e-4, 0.0, eps_in_sqrt=True),
    "nadamw": NAdamW(1e-2, 0.9, 0.99, 1e-6, 0.01),
    "lion_soft_sign": Lion(1e-3, 0.9, 0.99, 0.01, eps=1e-4),
    "rmsprop_user": RMSProp(1e-2, 0.9, 1e-6),
    "soft_signum_user": SoftSignum(1e-2, 0.8, 1e-4),
}


def points(name: str, P: int = 3, seed: int = 1):
    tiny = make_tiny(name, num_batches=4, batch_size=3)
    problem = Problem(tiny.model, tiny.loss_fn, tiny.batches)
    gen = torch.Generator().manual_seed(seed)
    d = problem.theta.numel()
    thetas = problem.theta + 0.3 * torch.randn(P, d, generator=gen, dtype=torch.float64)
    return tiny, problem, thetas


def sequences(P: int, m: int, seed: int = 2) -> list[np.ndarray]:
    """Orders of different lengths: two epochs and a part, one step (n = 0: no memory)."""
    rng = np.random.default_rng(seed)
    out = [np.concatenate([rng.permutation(m) for _ in range(3)])[: 5 + 3 * p] for p in range(P)]
    out[-1] = out[-1][:1]
    return out


@pytest.mark.parametrize("where", ["own_points", "one_point"])
@pytest.mark.parametrize("model", ["gelu_mlp", "softmax"])
@pytest.mark.parametrize("opt", OPTIMIZERS, ids=str)
def test_corrections_equal_one_probe_per_sequence(model, opt, where):
    """Each sequence at its own point (epoch ends: one graph for all) or every sequence at
    one point (a fixed probe: one vmapped pass of products for all)."""
    optimizer = OPTIMIZERS[opt]
    _, problem, thetas = points(model, P=4)
    seqs = sequences(4, problem.num_batches)
    if where == "one_point":
        thetas = thetas[:1].expand(4, -1)
        M = corrections_at(Probe(problem.at(thetas[0])), optimizer, seqs)
    else:
        M = EnsembleProbe(problem, thetas).corrections(optimizer, seqs)
    assert M.shape == thetas.shape
    for p in range(4):
        want = correction_at(Probe(problem.at(thetas[p])), optimizer, seqs[p])
        assert rel_err(M[p], want) <= 1e-12, (opt, p)
    assert torch.equal(M[-1], torch.zeros_like(M[-1]))  # n = 0: nothing carries memory
    if where == "one_point":  # a probe that keeps no graph: one sequence at a time
        grouped = Probe(problem.at(thetas[0]), graph_batches=1)
        assert rel_err(corrections_at(grouped, optimizer, seqs), M) <= 1e-10


@pytest.mark.parametrize("opt", ["heavy_ball", "adamw", "lion_soft_sign"])
def test_corrections_equal_the_literal_eq9(opt):
    optimizer = OPTIMIZERS[opt]
    tiny, problem, thetas = points("gelu_mlp", P=2)
    seqs = [np.array([0, 2, 1, 3, 1, 0]), np.array([3, 3, 0, 1])]
    M = EnsembleProbe(problem, thetas).corrections(optimizer, seqs)
    shared = corrections_at(Probe(problem.at(thetas[0])), optimizer, seqs)
    for p in range(2):
        want = literal_correction(
            tiny.model, tiny.loss_fn, tiny.batches, optimizer, seqs[p].tolist(), thetas[p]
        )
        assert rel_err(M[p], want) <= 1e-10, (opt, p)
        at_first = literal_correction(
            tiny.model, tiny.loss_fn, tiny.batches, optimizer, seqs[p].tolist(), thetas[0]
        )
        assert rel_err(shared[p], at_first) <= 1e-10, (opt, p)


@pytest.mark.parametrize("model", ["gelu_mlp", "softmax"])
def test_moments_products_and_directions_equal_one_probe_per_point(model):
    _, problem, thetas = points(model)
    probes = EnsembleProbe(problem, thetas)
    g, Hg, cov = probes.hessian_moments()
    V = torch.randn(thetas.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    HV = probes.full_hvp(V)
    d_plain, d_weighted = direction_at(probes, 1e-4), direction_at(probes, 1e-4, weighted=True)
    for p in range(thetas.shape[0]):
        one = Probe(problem.at(thetas[p]))
        assert rel_err(probes.grads[p], one.grads) <= 1e-14
        for got, want in zip((g[p], Hg[p], cov[p]), one.hessian_moments(), strict=True):
            assert rel_err(got, want) <= 1e-12
        assert rel_err(HV[p], one.full_hvp(V[p])) <= 1e-12
        assert rel_err(d_plain[p], direction_at(one, 1e-4)) <= 1e-12
        assert rel_err(d_weighted[p], direction_at(one, 1e-4, weighted=True)) <= 1e-12


def test_the_covariance_direction_is_the_gradient_of_half_the_variance_regularizer():
    """Cov = grad R / 2, R = mean_i ||g_i - g||^2 (THEORY §5), by central differences."""
    _, problem, thetas = points("gelu_mlp", P=2)
    cov = EnsembleProbe(problem, thetas).hessian_moments()[2]

    def R(theta: torch.Tensor) -> float:
        G = Probe(problem.at(theta)).grads
        return float(((G - G.mean(0)) ** 2).sum(1).mean())

    h = 1e-5
    for p in range(2):
        fd = torch.zeros_like(thetas[p])
        for r in range(thetas.shape[1]):
            e = torch.zeros_like(thetas[p])
            e[r] = h
            fd[r] = (R(thetas[p] + e) - R(thetas[p] - e)) / (2 * h)
        assert rel_err(cov[p], fd / 2) <= 1e-7


@pytest.mark.parametrize("opt", ["heavy_ball", "nesterov", "adamw", "nadamw", "lion_soft_sign"])
@pytest.mark.parametrize("step", [None, 0, 7])
def test_closed_forms_at_every_point_equal_one_probe_per_point(opt, step):
    optimizer = OPTIMIZERS[opt]
    _, problem, thetas = points("gelu_mlp")
    got = closed_form_at(EnsembleProbe(problem, thetas), optimizer, step)
    assert got is not None
    for p in range(thetas.shape[0]):
        at = problem.at(thetas[p])
        assert rel_err(got[p], full_batch_prediction(at, optimizer, step)) <= 1e-12


def test_bad_shapes_and_requests_are_refused():
    _, problem, thetas = points("softmax")
    with pytest.raises(ValueError, match=r"thetas must be \(P, 12\)"):
        EnsembleProbe(problem, thetas[0])
    probes = EnsembleProbe(problem, thetas)
    with pytest.raises(ValueError, match="sequences: one per point"):
        probes.corrections(OPTIMIZERS["heavy_ball"], [np.array([0, 1])])
    with pytest.raises(ValueError, match="requests: one list per point"):
        probes.native_passes([[None]])
    with pytest.raises(ValueError, match="requests: every set needs as many passes"):
        probes.native_passes([[None], [], [None]])
    with pytest.raises(ValueError, match="batched products need the kept graph"):
        Probe(problem, graph_batches=1).native_batched_hvps([[None]])


def test_the_plan_holds_as_many_points_as_the_budget_allows():
    _, problem, _ = points("gelu_mlp")
    opt = OPTIMIZERS["adamw"]
    m, d = problem.num_batches, problem.theta.numel()
    one = budget.PEAK_FACTOR * problem.graph_bytes_per_batch * m
    one += (budget.vector_arrays(opt) + 2) * m * d * 8
    flat = budget.FLAT_VECTORS * d * 8
    plan = budget.ensemble_plan(problem, opt, int(flat + 2.5 * one), 10)
    assert plan is not None and plan.points == 2 and plan.mode == "graph"
    assert plan.estimate is not None and plan.estimate <= plan.budget
    whole = budget.ensemble_plan(problem, opt, int(flat + 100 * one), 10)
    assert whole is not None and whole.points == 10
    assert budget.ensemble_plan(problem, opt, int(flat + 0.9 * one), 10) is None


def test_a_model_whose_backward_cannot_be_vmapped_takes_its_sets_one_at_a_time():
    """GroupNorm's double backward has no batching rule under is_grads_batched: the first
    batched pass says so once, and the same numbers come one set at a time."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3),
        torch.nn.GroupNorm(1, 2),
        torch.nn.GELU(),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * 4 * 4, 3),
    ).double()
    gen = torch.Generator().manual_seed(4)
    batches = [
        (torch.randn(3, 1, 6, 6, generator=gen, dtype=torch.float64), torch.tensor([0, 2, 1]))
        for _ in range(4)
    ]
    problem = Problem(model, torch.nn.functional.cross_entropy, batches)
    seqs = [np.array([0, 1, 2, 3, 2, 1]), np.array([3, 2, 1, 0, 0])]
    for name in ("heavy_ball", "adamw"):
        optimizer = OPTIMIZERS[name]
        want = torch.stack([correction_at(Probe(problem), optimizer, s) for s in seqs])
        if problem.vmapped_backward[0]:
            with pytest.warns(RuntimeWarning, match="a vmapped backward pass failed"):
                got = corrections_at(Probe(problem), optimizer, seqs)
        else:
            got = corrections_at(Probe(problem), optimizer, seqs)
        assert problem.vmapped_backward == [False]
        assert rel_err(got, want) <= 1e-12, name
        thetas = problem.theta + 0.1 * torch.randn(2, problem.theta.numel(), generator=gen)
        together = EnsembleProbe(problem, thetas).corrections(optimizer, seqs)
        for p in range(2):
            one = correction_at(Probe(problem.at(thetas[p])), optimizer, seqs[p])
            assert rel_err(together[p], one) <= 1e-12, name


def test_a_point_that_is_not_finite_leaves_the_others_alone():
    """A run whose parameters blew up shares the graph with the others: its rows are not
    finite (the chunk records it as diverged), theirs are what one probe each gives."""
    _, problem, thetas = points("gelu_mlp", P=3)
    thetas = thetas.clone()
    thetas[1, 0] = float("inf")
    seqs = [*sequences(3, problem.num_batches)[:2], np.array([2, 0, 1, 3])]
    for name in ("heavy_ball", "adamw"):
        probes = EnsembleProbe(problem, thetas)
        M = probes.corrections(OPTIMIZERS[name], seqs)
        cov = probes.hessian_moments()[2]
        assert not bool(torch.isfinite(M[1]).all()) and not bool(torch.isfinite(cov[1]).all())
        for p in (0, 2):
            one = Probe(problem.at(thetas[p]))
            assert rel_err(M[p], correction_at(one, OPTIMIZERS[name], seqs[p])) <= 1e-12
            assert rel_err(cov[p], one.hessian_moments()[2]) <= 1e-12

"""E[M] over batch orders: exact against every ordering, Monte Carlo against exact."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny, rel_err

from noisemem import expected_correction, full_batch_correction, memory_correction
from noisemem.expectation import (
    exact_expectation,
    monte_carlo_moments,
    pair_coefficients,
    sample_run,
)
from noisemem.optim import AdamW, HeavyBall, Lion, Nesterov
from noisemem.probe import Probe
from noisemem.problem import Problem

LINEAR = {"heavy_ball": HeavyBall(0.1, 0.9), "nesterov": Nesterov(0.1, 0.7)}


def average_over(tiny, optimizer, runs):
    """Mean of Eq. (9) over an explicit list of (batches, sequence) runs."""
    total = None
    for batches, seq in runs:
        M = memory_correction(tiny.model, tiny.loss_fn, batches, optimizer, seq, tail_tol=0)
        total = M if total is None else total + M
    return total / len(runs)


@pytest.mark.parametrize("epochs, step", [(1, None), (2, None), (2, 3), (2, 1), (3, 5)])
@pytest.mark.parametrize("opt", sorted(LINEAR))
def test_exact_permute_equals_average_over_every_permutation(opt, epochs, step):
    tiny = make_tiny("gelu_mlp", num_batches=3)
    optimizer = LINEAR[opt]
    exact = expected_correction(
        tiny.model, tiny.loss_fn, tiny.batches, optimizer, epochs=epochs, step=step
    )
    n = exact.step
    perms = list(itertools.permutations(range(3)))
    runs = [
        (tiny.batches, list(itertools.chain(*combo))[: n + 1])
        for combo in itertools.product(perms, repeat=-(-(n + 1) // 3))
    ]
    brute = average_over(tiny, optimizer, runs)
    assert rel_err(exact.mean, brute) < 1e-9
    # the split: the full-batch part is Appendix E's correction at step n (its own test
    # below), so the noise part must be what the orderings add to it
    fb = full_batch_correction(tiny.model, tiny.loss_fn, tiny.batches, optimizer, step=n)
    if n > 0:
        assert float(exact.noise_part.norm()) > 1e-3 * float(brute.norm())
        assert rel_err(exact.noise_part, brute - fb) < 1e-9


@pytest.mark.parametrize("graph_batches", [None, 1])
@pytest.mark.parametrize("sampling", ["permute", "reshuffle", "replacement"])
@pytest.mark.parametrize("opt", sorted(LINEAR))
def test_the_mean_alone_in_one_pass_equals_the_mean_of_the_parts(opt, sampling, graph_batches):
    """parts=False: one backward pass for the combination of H g and mean_i H_i g_i; the
    kept graph and graphs of one batch at a time alike, and the brute force mean."""
    tiny = make_tiny("gelu_mlp", num_batches=3)
    kw = {"epochs": 2, "step": 4, "sampling": sampling, "graph_batches": graph_batches}
    optimizer = LINEAR[opt]
    full = expected_correction(tiny.model, tiny.loss_fn, tiny.batches, optimizer, **kw)
    alone = expected_correction(
        tiny.model, tiny.loss_fn, tiny.batches, optimizer, parts=False, **kw
    )
    assert alone.full_batch_part is None and alone.noise_part is None
    assert alone.coefficients == full.coefficients
    assert rel_err(alone.mean, full.mean) < 1e-12
    if sampling == "permute":
        perms = list(itertools.permutations(range(3)))
        runs = [(tiny.batches, list(a + b)[:5]) for a, b in itertools.product(perms, repeat=2)]
        assert rel_err(alone.mean, average_over(tiny, optimizer, runs)) < 1e-9


def test_the_mean_alone_takes_known_moments_without_a_pass():
    tiny = make_tiny("softmax", num_batches=3)
    problem = Problem(tiny.model, tiny.loss_fn, tiny.batches)
    optimizer = LINEAR["heavy_ball"]
    known = Probe(problem)
    known.hessian_moments()
    passes = []
    original = known.native_hvps
    known.native_hvps = lambda requests: passes.append(len(requests)) or original(requests)
    got = exact_expectation(problem, optimizer, "permute", 4, 2, known, parts=False)
    fresh = exact_expectation(problem, optimizer, "permute", 4, 2, Probe(problem), parts=False)
    assert passes == [] and rel_err(got.mean, fresh.mean) < 1e-12


@pytest.mark.parametrize("opt", sorted(LINEAR))
def test_exact_replacement_equals_average_over_every_draw(opt):
    tiny = make_tiny("softmax", num_batches=3)
    optimizer = LINEAR[opt]
    exact = expected_correction(
        tiny.model, tiny.loss_fn, tiny.batches, optimizer, epochs=2, step=4, sampling="replacement"
    )
    runs = [(tiny.batches, list(seq)) for seq in itertools.product(range(3), repeat=5)]
    assert rel_err(exact.mean, average_over(tiny, optimizer, runs)) < 1e-9


@pytest.mark.parametrize("epochs, step", [(1, None), (2, None), (2, 2)])
@pytest.mark.parametrize("opt", sorted(LINEAR))
def test_exact_reshuffle_equals_average_over_every_sample_ordering(opt, epochs, step):
    """N = 4 samples in batches of 2: every ordering of the samples in every epoch."""
    tiny = make_tiny("gelu_mlp", num_batches=2, batch_size=2)
    optimizer = LINEAR[opt]
    exact = expected_correction(
        tiny.model,
        tiny.loss_fn,
        tiny.batches,
        optimizer,
        epochs=epochs,
        step=step,
        sampling="reshuffle",
    )
    ((X, Y),) = tiny.full
    orders = list(itertools.permutations(range(4)))
    runs = []
    for combo in itertools.product(orders, repeat=epochs):
        rows = np.concatenate(combo).reshape(-1, 2)
        runs.append(([(X[r], Y[r]) for r in rows], list(range(exact.step + 1))))
    assert rel_err(exact.mean, average_over(tiny, optimizer, runs)) < 1e-9


def test_exact_expectation_at_other_parameters_uses_them_for_every_part():
    """problem.at(theta2) must give what a model sitting at theta2 gives, reshuffle included
    (its noise direction is computed on a per-sample view of the problem)."""
    tiny = make_tiny("gelu_mlp", num_batches=2, batch_size=2)
    opt = LINEAR["heavy_ball"]
    theta2 = tiny.theta + 0.3 * torch.randn(tiny.theta.shape, dtype=torch.float64)
    at = Problem(tiny.model, tiny.loss_fn, tiny.batches).at(theta2)
    torch.nn.utils.vector_to_parameters(theta2, tiny.model.parameters())
    for sampling in ("permute", "reshuffle"):
        ours = exact_expectation(at, opt, sampling, 3, 2)
        moved = expected_correction(
            tiny.model, tiny.loss_fn, tiny.batches, opt, epochs=2, sampling=sampling
        )
        assert rel_err(ours.noise_part, moved.noise_part) < 1e-12
        assert rel_err(ours.mean, moved.mean) < 1e-12


@pytest.mark.parametrize("epochs", [1, 3])
def test_full_batch_part_is_the_full_batch_correction_at_step_n(tiny, epochs):
    for optimizer in LINEAR.values():
        exact = expected_correction(
            tiny.model, tiny.loss_fn, tiny.batches, optimizer, epochs=epochs
        )
        fb = full_batch_correction(
            tiny.model, tiny.loss_fn, tiny.batches, optimizer, step=exact.step
        )
        assert rel_err(exact.full_batch_part, fb) < 1e-9


def test_one_epoch_coefficients_are_appendix_g_sums_and_limits():
    """C_same = C3(n), C_epoch = C4(n) (Appendix G, m = n+1 batches, last step n), with
    limits beta/((1-beta)^2(1+beta)) and C3 + C4 -> beta/(1-beta)^3."""
    beta = 0.6
    for n in (1, 4, 9):
        C = pair_coefficients(HeavyBall(0.1, beta), n, n + 1)
        C3 = beta * sum(
            beta**b * sum(beta ** (b + 1 - l) for l in range(1, b + 2)) for b in range(n)
        )
        total = beta * sum(
            beta**k * sum(beta**b for l in range(1, k + 2) for b in range(n - l + 1))
            for k in range(n)
        )
        assert math.isclose(C["same"], C3, rel_tol=1e-12)
        assert math.isclose(C["epoch"], total - C3, rel_tol=1e-12)
        assert C["cross"] == 0.0
    C = pair_coefficients(HeavyBall(0.1, beta), 400, 401)
    assert math.isclose(C["same"], beta / ((1 - beta) ** 2 * (1 + beta)), rel_tol=1e-12)
    assert math.isclose(C["same"] + C["epoch"], beta / (1 - beta) ** 3, rel_tol=1e-12)


def test_heavy_ball_one_epoch_matches_the_paper_asymptotically():
    """E[M]/h -> beta/(1-beta)^3 H g + beta/((1-beta)^2(1+beta)) Cov for many batches."""
    beta = 0.5
    tiny = make_tiny("softmax", num_batches=60, batch_size=2)
    opt = HeavyBall(0.1, beta)
    exact = expected_correction(tiny.model, tiny.loss_fn, tiny.batches, opt)
    C = exact.coefficients
    n = exact.step
    assert math.isclose(C["noise"], C["same"] - C["epoch"] / n, rel_tol=1e-12)
    assert abs(C["full"] - beta / (1 - beta) ** 3) < 1e-12
    assert abs(C["noise"] - beta / ((1 - beta) ** 2 * (1 + beta))) < 0.1  # O(1/n) away


def max_z_against_exact(opt, epochs: int, sampling: str, permutations: int, seed: int) -> float:
    """max over coordinates of |MC mean - exact| / stderr, on 4 GELU-MLP batches."""
    tiny = make_tiny("gelu_mlp", num_batches=4)
    kw = {"epochs": epochs, "sampling": sampling}
    exact = expected_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, **kw)
    mc = expected_correction(
        tiny.model,
        tiny.loss_fn,
        tiny.batches,
        opt,
        method="monte_carlo",
        permutations=permutations,
        seed=seed,
        **kw,
    )
    assert mc.stderr is not None and bool((mc.stderr > 0).all())
    return float(((mc.mean - exact.mean).abs() / mc.stderr).max())


@pytest.mark.parametrize("sampling", ["permute", "reshuffle", "replacement"])
def test_monte_carlo_is_within_four_standard_errors_of_exact(sampling):
    assert max_z_against_exact(HeavyBall(0.1, 0.8), 2, sampling, 200, seed=7) < 4.0


def test_monte_carlo_standard_error_shrinks_like_one_over_sqrt_p():
    """SE(P)/SE(4P) should be 2. The sample variance of P Gaussian draws has relative sd
    sqrt(2/(P-1)) (0.18 at P = 64), so the ratio of square roots is 2 +- ~13% per coordinate;
    pooled over coordinates (sum of squares) the bound 25% is > 3 such deviations. The two
    estimates use different seeds, so their orders are independent."""
    tiny = make_tiny("gelu_mlp", num_batches=5)
    opt = HeavyBall(0.1, 0.8)
    se = {}
    for P, seed in ((64, 3), (256, 4)):
        mc = expected_correction(
            tiny.model,
            tiny.loss_fn,
            tiny.batches,
            opt,
            method="monte_carlo",
            permutations=P,
            seed=seed,
        )
        se[P] = float(mc.stderr.pow(2).sum().sqrt())
    assert abs(se[64] / se[256] / 2 - 1) < 0.25


def test_monte_carlo_is_reproducible_and_works_for_adam_and_lion():
    tiny = make_tiny("softmax")
    for opt in (AdamW(0.01, 0.9, 0.99, 1e-3), Lion(0.01, 0.9, 0.99, eps=1e-3)):
        kw = {"method": "monte_carlo", "permutations": 8, "seed": 11, "epochs": 2}
        a = expected_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, **kw)
        b = expected_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, **kw)
        assert torch.equal(a.mean, b.mean) and torch.equal(a.stderr, b.stderr)
        assert a.full_batch_part is None and float(a.mean.norm()) > 0


@pytest.mark.parametrize("sampling", ["permute", "reshuffle"])
def test_monte_carlo_mean_and_stderr_are_the_sample_mean_and_std_over_sqrt_p(sampling):
    """Against Eq. (9) evaluated by hand on each sampled order: mean, and the sample standard
    deviation (ddof = 1) over sqrt(P), per coordinate."""
    tiny = make_tiny("gelu_mlp", num_batches=3)
    opt, P, seed, epochs = AdamW(0.01, 0.9, 0.99, 1e-3), 9, 21, 2
    mc = expected_correction(
        tiny.model,
        tiny.loss_fn,
        tiny.batches,
        opt,
        epochs=epochs,
        sampling=sampling,
        method="monte_carlo",
        permutations=P,
        seed=seed,
    )
    problem = Problem(tiny.model, tiny.loss_fn, tiny.batches)
    samples = []
    for p in range(P):
        run = sample_run(sampling, 3, 2, epochs * 3, seed, p)
        batches = tiny.batches
        if run.batches is not None:  # fresh batches of the samples, rows of the flat data
            X, Y = problem.X.flatten(0, 1), problem.Y.flatten(0, 1)
            batches = [(X[r], Y[r]) for r in torch.as_tensor(run.batches)]
        samples.append(
            memory_correction(tiny.model, tiny.loss_fn, batches, opt, run.sequence.tolist())
        )
    S = torch.stack(samples)
    assert rel_err(mc.mean, S.mean(0)) < 1e-12
    assert rel_err(mc.stderr, S.std(0, correction=1) / math.sqrt(P)) < 1e-9


def test_monte_carlo_does_not_depend_on_how_orders_are_split():
    """Orders split among workers, each summarised and then merged, give the estimate of
    all of them at once (order p depends only on (seed, p))."""
    tiny = make_tiny("softmax", num_batches=4)
    problem = Problem(tiny.model, tiny.loss_fn, tiny.batches)
    opt = Nesterov(0.1, 0.8)
    whole = monte_carlo_moments(problem, opt, "permute", 7, range(12), seed=2)
    parts = [range(0, 5), range(5, 6), range(6, 12)]
    merged = monte_carlo_moments(problem, opt, "permute", 7, parts[0], seed=2)
    for r in parts[1:]:
        merged = merged.merge(monte_carlo_moments(problem, opt, "permute", 7, r, seed=2))
    assert merged.count == whole.count == 12
    assert rel_err(merged.mean, whole.mean) < 1e-13
    assert rel_err(merged.stderr, whole.stderr) < 1e-10


def test_orders_are_distinct_across_large_seeds():
    """numpy's SeedSequence splits an int >= 2**32 into 32-bit words, so (2**32, 0) would draw
    the order of (0, 1); such seeds are refused."""
    assert sample_run("permute", 6, 1, 6, 0, 1).sequence.tolist() != (
        sample_run("permute", 6, 1, 6, 2**32 - 1, 0).sequence.tolist()
    )
    with pytest.raises(ValueError, match="seed"):
        sample_run("permute", 6, 1, 6, 2**32, 0)
    with pytest.raises(ValueError, match="index"):
        sample_run("permute", 6, 1, 6, 0, 2**32)


BAD = [
    ({"sampling": "shuffle"}, "sampling='shuffle'"),
    ({"method": "closed"}, "method='closed'"),
    ({"epochs": 0}, "epochs=0"),
    ({"epochs": True}, "epochs=True"),
    ({"step": 8}, "step=8"),
    ({"step": True}, "step=True"),
    ({"method": "monte_carlo"}, "permutations=None"),
    ({"method": "monte_carlo", "permutations": 1}, "permutations=1"),
    ({"method": "monte_carlo", "permutations": True}, "permutations=True"),
    ({"method": "monte_carlo", "permutations": 4, "seed": -1}, "seed=-1"),
    ({"method": "monte_carlo", "permutations": 4, "seed": 2**32}, "seed=4294967296"),
    ({"method": "monte_carlo", "permutations": 4, "seed": 1.5}, "seed=1.5"),
    ({"method": "monte_carlo", "permutations": 4, "seed": None}, "seed=None"),
    ({"method": "monte_carlo", "permutations": 4, "seed": True}, "seed=True"),
    ({"parts": "no"}, "parts='no'"),
]


@pytest.mark.parametrize("kw, needle", BAD, ids=[n for _, n in BAD])
def test_bad_arguments_are_named(kw, needle):
    tiny = make_tiny("softmax")
    with pytest.raises(ValueError) as err:
        expected_correction(tiny.model, tiny.loss_fn, tiny.batches, HeavyBall(0.1, 0.9), **kw)
    assert needle in str(err.value)


def test_exact_method_for_adam_is_refused_with_the_alternative():
    tiny = make_tiny("softmax")
    with pytest.raises(ValueError) as err:
        expected_correction(tiny.model, tiny.loss_fn, tiny.batches, AdamW(0.01, 0.9, 0.99, 1e-8))
    assert "method='exact'" in str(err.value) and "monte_carlo" in str(err.value)


@pytest.mark.montecarlo
@pytest.mark.parametrize("sampling", ["permute", "reshuffle", "replacement"])
def test_monte_carlo_heavy_twin_many_permutations(sampling):
    """The opt-in twin of the 200-permutation test: 3000 orders, Nesterov, 3 epochs; every
    coordinate within 4 standard errors of the exact expectation."""
    assert max_z_against_exact(Nesterov(0.1, 0.8), 3, sampling, 3000, seed=5) < 4.0

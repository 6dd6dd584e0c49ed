"""Eq. (9) and the expectations at scale: the blocked scan, the online window, graphs held a
group of batches at a time, and the memory plan, each against the literal Eq. (9) (or the
in-memory path) on tiny float64 problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny, rel_err
from oracles import literal_correction
from test_correction import OPTIMIZERS, SEQUENCES

import noisemem.fused as fused
import noisemem.window as windows
from noisemem import expected_correction, memory_correction
from noisemem.budget import (
    PEAK_FACTOR,
    MemoryPlan,
    parse_budget,
    plan_memory,
    vector_arrays,
)
from noisemem.correction import correction_at
from noisemem.probe import Probe
from noisemem.problem import Problem

LONG = SEQUENCES["two_epochs"] + SEQUENCES["repeats"]  # 15 steps, repeats, 4 batches


_LITERAL: dict[tuple[str, str, tuple[int, ...]], torch.Tensor] = {}


def literal(tiny, optimizer, seq):
    """The literal Eq. (9), computed once per (problem, optimizer, sequence): every tiny
    problem here is ``make_tiny``'s, the same for the same name."""
    key = (tiny.name, repr(optimizer), tuple(int(i) for i in seq))
    if key not in _LITERAL:
        _LITERAL[key] = literal_correction(
            tiny.model, tiny.loss_fn, tiny.batches, optimizer, seq, tiny.theta
        )
    return _LITERAL[key]


CASES = [
    (opt, window, hvp)
    for opt in sorted(OPTIMIZERS)
    for window in ("scan", "online")
    for hvp in ("double_backward", "vmap")
]


@pytest.fixture(params=[True, False], ids=["matrices", "cumsum"])
def block_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both forms of the scan's blocks: matrix products (a CPU's) and cumulative sums (a
    GPU's), forced on this CPU."""
    monkeypatch.setattr(windows, "SCAN_MATRICES", request.param)
    return request.param


@pytest.mark.parametrize("opt, window, hvp", CASES, ids=["-".join(c) for c in CASES])
def test_scan_and_online_windows_match_literal_eq9(opt, window, hvp, block_form):
    tiny = make_tiny("gelu_mlp")
    optimizer = OPTIMIZERS[opt]
    ours = memory_correction(
        tiny.model, tiny.loss_fn, tiny.batches, optimizer, LONG, window=window, hvp=hvp
    )
    assert rel_err(ours, literal(tiny, optimizer, LONG)) < 1e-9


@pytest.mark.parametrize("window", ["scan", "online"])
@pytest.mark.parametrize("opt", ["heavy_ball", "adamw_eps_in_sqrt", "lion_soft", "nadamw"])
def test_blocks_of_one_step_change_nothing(monkeypatch, opt, window, block_form):
    """The scan and the online window in blocks of 1, 2 and 3 steps (the carry between
    blocks, the prefix sums across them, the last block's exact suffix) against one block."""
    tiny = make_tiny("gelu_mlp")
    optimizer = OPTIMIZERS[opt]
    seq = LONG * 2
    whole = memory_correction(
        tiny.model, tiny.loss_fn, tiny.batches, optimizer, seq, window=window, tail_tol=0
    )
    assert rel_err(whole, literal(tiny, optimizer, seq)) < 1e-9
    for rows in (1, 2, 3):
        monkeypatch.setattr(windows, "scan_rows", lambda *a, rows=rows: rows)
        blocked = memory_correction(
            tiny.model, tiny.loss_fn, tiny.batches, optimizer, seq, window=window, tail_tol=0
        )
        assert rel_err(blocked, whole) < 1e-12


@pytest.mark.parametrize("window", ["auto", "scan", "linear", "online"])
def test_every_window_drops_the_same_tail(window, block_form):
    """With a tail tolerance that cuts the window after step 0, every strategy must drop
    exactly the terms the fused kernel and the dense path drop."""
    tiny = make_tiny("gelu_mlp")
    seq = [j * 7 % 4 for j in range(300)]
    opt = OPTIMIZERS["heavy_ball"] if window == "linear" else OPTIMIZERS["adamw_eps_in_sqrt"]
    kw = {"tail_tol": 1e-6}
    ref = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, seq, window="dense", **kw)
    ours = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, seq, window=window, **kw)
    assert rel_err(ours, ref) < 1e-10


#: sequences for a linear optimizer's torch path: (steps, tail_tol); "truncated" starts its
#: window after step 0 (the momenta's sums before it enter the coefficients), "repeats"
#: never visits batch 3
LINEAR_SEQUENCES = {
    "long": (LONG, 1e-12),
    "truncated": ([j * 7 % 4 for j in range(300)], 1e-6),
    "repeats": (SEQUENCES["repeats"], 1e-12),
    "single_step": (SEQUENCES["single_step"] * 2, 1e-12),
}


@pytest.mark.parametrize("hvp", ["double_backward", "vmap"])
@pytest.mark.parametrize("seq", sorted(LINEAR_SEQUENCES))
@pytest.mark.parametrize("opt", ["heavy_ball", "nesterov"])
def test_linear_coefficients_match_the_scan_the_kernel_and_an_oracle(monkeypatch, opt, seq, hvp):
    """Without the fused kernel (a GPU's path) a linear optimizer's cotangent is A G, A from
    the window's steps alone, or the scan: both equal the kernel's (1e-12) and the literal
    Eq. (9) (the dense torch path where the tail is cut: the literal keeps every term)."""
    tiny = make_tiny("gelu_mlp")
    optimizer = OPTIMIZERS[opt]
    sequence, tail_tol = LINEAR_SEQUENCES[seq]

    def M(window: str = "linear") -> torch.Tensor:
        return memory_correction(
            tiny.model, tiny.loss_fn, tiny.batches, optimizer, sequence,
            window=window, hvp=hvp, tail_tol=tail_tol,
        )  # fmt: skip

    kernel = M()
    oracle = M("dense") if tail_tol > 1e-12 else literal(tiny, optimizer, sequence)
    monkeypatch.setattr(fused, "usable", lambda *_: False)
    taken = []
    coefficients = windows.linear_coefficients

    def counted(*args: object) -> np.ndarray:
        taken.append(args)
        return coefficients(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(windows, "linear_coefficients", counted)
    got = {}
    for flag in (True, False):
        monkeypatch.setattr(windows, "LINEAR_COEFFICIENTS", flag)
        got[flag] = M()
    assert len(taken) == 1  # the coefficients once, the scan once
    assert rel_err(got[True], got[False]) < 1e-12
    assert rel_err(got[True], kernel) < 1e-12
    assert rel_err(got[True], oracle) < 1e-9


def test_the_torch_path_takes_the_coefficients_by_their_cost(monkeypatch):
    """m^2 <= ratio K takes A G; beyond it, or beyond MAX_COEFFICIENTS numbers, the scan."""
    tiny = make_tiny("gelu_mlp")
    probe = Probe(Problem(tiny.model, tiny.loss_fn, tiny.batches))  # m = 4
    w = windows.window_of(OPTIMIZERS["heavy_ball"], np.array(LONG), 1e-12, "double_backward")
    assert w is not None and w.K == 14
    ratio = windows.COEFFICIENT_RATIO
    monkeypatch.setattr(windows, "COEFFICIENT_RATIO", {**ratio, "cpu": 2})  # 16 <= 2 * 14
    assert windows.takes_coefficients(probe, w)
    monkeypatch.setattr(windows, "COEFFICIENT_RATIO", {**ratio, "cpu": 1})  # 16 > 14
    assert not windows.takes_coefficients(probe, w)
    monkeypatch.setattr(windows, "COEFFICIENT_RATIO", {**ratio, "cpu": 2})
    monkeypatch.setattr(windows, "MAX_COEFFICIENTS", 4 * 14 - 1)
    assert not windows.takes_coefficients(probe, w)


GROUPED = [
    (opt, window)
    for opt in ("heavy_ball", "nesterov", "adamw_eps_in_sqrt", "lion_soft", "nadamw")
    for window in ("auto", "scan", "dense", "online")
]


@pytest.mark.parametrize("opt, window", GROUPED, ids=["-".join(c) for c in GROUPED])
@pytest.mark.parametrize("groups", [1, 3])
def test_graphs_a_group_at_a_time_match_the_kept_graph_and_literal(opt, window, groups):
    """graph_batches=1 and 3 of 4 batches (a ragged last group): every graph rebuilt for
    each pass of products; the same M as the kept graph (1e-10) and as the literal Eq. (9)."""
    tiny = make_tiny("gelu_mlp")
    optimizer = OPTIMIZERS[opt]
    kept = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, optimizer, LONG, window=window)
    grouped = memory_correction(
        tiny.model, tiny.loss_fn, tiny.batches, optimizer, LONG, window=window,
        graph_batches=groups,
    )  # fmt: skip
    assert rel_err(grouped, kept) < 1e-10
    assert rel_err(grouped, literal(tiny, optimizer, LONG)) < 1e-9


def test_a_probe_reports_its_plan_and_groups_follow_the_budget():
    tiny = make_tiny("gelu_mlp")
    problem = Problem(tiny.model, tiny.loss_fn, tiny.batches)
    per = problem.graph_bytes_per_batch
    assert per > 0
    d, m = problem.theta.numel(), problem.num_batches
    opt = OPTIMIZERS["adamw_eps_in_sqrt"]
    vectors = vector_arrays(opt) * m * d * 8
    assert vector_arrays(opt) == 4 and vector_arrays(OPTIMIZERS["heavy_ball"]) == 2
    assert vector_arrays(None) == 0
    roomy = plan_memory(problem, opt, memory_budget="1GiB")
    assert (roomy.mode, roomy.graph_batches, roomy.chosen_by) == ("graph", m, "budget")
    # room for two batches' graphs at their peak, next to the vectors and flat vectors
    budget = vectors + 16 * d * 8 + int(PEAK_FACTOR * per * 2.5)
    tight = plan_memory(problem, opt, memory_budget=budget)
    assert (tight.mode, tight.graph_batches) == ("grouped", 2)
    assert tight.estimate is not None and tight.estimate <= budget
    row = tight.as_dict()
    assert row["mode"] == "grouped" and row["graph_bytes_per_batch"] == per
    probe = Probe(problem, memory_budget=budget)
    M = correction_at(probe, opt, LONG)
    assert probe.plan == tight
    assert rel_err(M, literal(tiny, opt, LONG)) < 1e-9
    user = Probe(problem, graph_batches=3).plan
    assert (user.mode, user.graph_batches, user.chosen_by) == ("grouped", 3, "user")
    assert isinstance(user, MemoryPlan) and user.graph_bytes_per_batch is None


def test_when_the_vectors_do_not_fit_the_error_names_the_sizes_before_any_work():
    from conftest import CountingModel

    from noisemem.budget import FLAT_VECTORS

    tiny = make_tiny("gelu_mlp")
    model = CountingModel(tiny.model)
    d = tiny.theta.numel()
    opt = OPTIMIZERS["adamw_eps_in_sqrt"]
    per = Problem(tiny.model, tiny.loss_fn, tiny.batches).graph_bytes_per_batch
    flat = FLAT_VECTORS * d * 8
    # the four (m, d) arrays alone exceed it: said before one batch's graph is measured
    with pytest.raises(ValueError) as err:
        memory_correction(model, tiny.loss_fn, tiny.batches, opt, LONG, memory_budget=flat)
    text = str(err.value)
    assert "memory_budget=" in text and "(m, d) arrays" in text and f"d={d}" in text
    assert "window='online'" in text
    assert model.calls <= 1  # at most the layout's pass: nothing of Eq. (9) ran
    # one batch's graph and the flat vectors fit (online needs no more), with half of what
    # the four (m, d) arrays need: said after the graph's measurement (two batches)
    budget = flat + int(PEAK_FACTOR * per) + 4 * 4 * d * 8 // 2
    model.calls = 0
    with pytest.raises(ValueError) as err:
        memory_correction(model, tiny.loss_fn, tiny.batches, opt, LONG, memory_budget=budget)
    text = str(err.value)
    assert "memory_budget=" in text and "(m, d) arrays" in text and f"d={d}" in text
    assert "window='online'" in text and "gradient graph" in text
    assert model.calls <= 2  # the layout's pass and the measurement: no Eq. (9)
    online = memory_correction(
        model, tiny.loss_fn, tiny.batches, opt, LONG, memory_budget=budget, window="online"
    )
    assert rel_err(online, literal(tiny, opt, LONG)) < 1e-9


@pytest.mark.parametrize(
    "value, expected",
    [(1024, 1024), ("8GiB", 8 * 2**30), ("512 MB", 512 * 10**6), ("1.5e3", 1500),
     ("2kib", 2048), (3.5e9, 3_500_000_000), (None, None)],
)  # fmt: skip
def test_memory_budget_spellings(value, expected):
    assert parse_budget(value) == expected


@pytest.mark.parametrize("bad", ["8 parsecs", "", -1, 0, float("nan"), True, "GiB", [1]])
def test_a_bad_memory_budget_is_named(bad):
    tiny = make_tiny("softmax")
    with pytest.raises(ValueError, match="memory_budget="):
        memory_correction(
            tiny.model, tiny.loss_fn, tiny.batches, OPTIMIZERS["heavy_ball"], [0, 1],
            memory_budget=bad,
        )  # fmt: skip


@pytest.mark.parametrize("bad", [0, 5, 1.5, True])
def test_a_bad_graph_batches_is_named(bad):
    tiny = make_tiny("softmax")
    with pytest.raises(ValueError, match="graph_batches="):
        memory_correction(
            tiny.model, tiny.loss_fn, tiny.batches, OPTIMIZERS["heavy_ball"], [0, 1],
            graph_batches=bad,
        )  # fmt: skip


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("sampling", ["permute", "reshuffle", "replacement"])
def test_exact_expectation_a_group_at_a_time_matches_the_kept_graph(sampling, groups):
    tiny = make_tiny("gelu_mlp")
    for name in ("heavy_ball", "nesterov"):
        args = (tiny.model, tiny.loss_fn, tiny.batches, OPTIMIZERS[name])
        kept = expected_correction(*args, epochs=2, sampling=sampling)
        grouped = expected_correction(*args, epochs=2, sampling=sampling, graph_batches=groups)
        for a, b in (
            (grouped.mean, kept.mean),
            (grouped.full_batch_part, kept.full_batch_part),
            (grouped.noise_part, kept.noise_part),
        ):
            assert rel_err(a, b) < 1e-10


def test_probe_quantities_a_group_at_a_time_match_the_kept_graph():
    """Every public Probe quantity with graphs of 1 and 3 batches, in either order of use
    (g first, or the moments first: the grouped moments then take g in their own pass)."""
    tiny = make_tiny("gelu_mlp")
    problem = Problem(tiny.model, tiny.loss_fn, tiny.batches)
    kept = Probe(problem)
    W = torch.randn(4, tiny.theta.numel(), dtype=torch.float64, generator=torch.Generator())
    v = W[0]
    for groups in (1, 3):
        for moments_first in (True, False):
            p = Probe(problem, graph_batches=groups)
            if moments_first:
                for x, y in zip(p.hessian_moments(), kept.hessian_moments(), strict=True):
                    assert rel_err(x, y) < 1e-10
            assert rel_err(p.full_grad(), kept.full_grad()) < 1e-12
            assert rel_err(p.full_hvp(v), kept.full_hvp(v)) < 1e-10
            assert rel_err(p.hessian_gradient(), kept.hessian_gradient()) < 1e-10
            assert rel_err(p.grads, kept.grads) < 1e-12
            assert rel_err(p.batch_hvps(W), kept.batch_hvps(W)) < 1e-10
            assert rel_err(p.summed_hvp(W), kept.summed_hvp(W)) < 1e-10
            for x, y in zip(p.hessian_moments(), kept.hessian_moments(), strict=True):
                assert rel_err(x, y) < 1e-10
            seq = [0, 2, 1, 1, 0, 3]
            for opt in (OPTIMIZERS["heavy_ball"], OPTIMIZERS["adamw_eps_in_sqrt"]):
                assert rel_err(p.direction(opt, seq), kept.direction(opt, seq)) < 1e-12


def test_a_kept_shared_graph_is_upgraded_for_per_batch_products():
    """A probe whose first use needed only sums (the moments) builds the cheaper shared
    graph; a later per-batch product (Adam's squared gradients) must rebuild it with
    per-batch copies and give what a fresh probe gives."""
    tiny = make_tiny("gelu_mlp")
    problem = Problem(tiny.model, tiny.loss_fn, tiny.batches)
    p = Probe(problem)
    p.hessian_moments()
    assert p._kept is not None and p._kept.kind == "shared"
    opt = OPTIMIZERS["adamw_eps_in_sqrt"]
    M = correction_at(p, opt, LONG)
    assert p._kept.kind == "copies"
    assert rel_err(M, correction_at(Probe(problem), opt, LONG)) < 1e-12


def test_many_batches_take_no_m_by_m_coefficients():
    """The linear path's w_i come from a recurrence over the window (O(K d)): 200 batches
    of one sample, 600 steps deep, against the dense torch path."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    gen = torch.Generator().manual_seed(4)
    batches = [
        (torch.randn(1, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (1,)))
        for _ in range(200)
    ]
    rng = np.random.default_rng(0)
    seq = np.concatenate([rng.permutation(200) for _ in range(3)])
    loss = torch.nn.functional.cross_entropy
    for opt in (OPTIMIZERS["heavy_ball"], OPTIMIZERS["nesterov"]):
        a = memory_correction(model, loss, batches, opt, seq, tail_tol=0)
        b = memory_correction(model, loss, batches, opt, seq, tail_tol=0, window="dense")
        c = memory_correction(model, loss, batches, opt, seq, tail_tol=0, window="scan")
        assert rel_err(a, b) < 1e-10 and rel_err(c, b) < 1e-10


@pytest.mark.parametrize("value, expected", [(None, True), ("0", False), ("off", False)])
def test_the_engine_makes_its_allocator_choice_itself_unless_told_not_to(value, expected):
    """A fresh process: building a Problem applies keep_freed_memory (glibc here) unless
    NOISEMEM_KEEP_FREED_MEMORY says 0; nothing else in the process asked for it."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("NOISEMEM_KEEP_FREED_MEMORY", None)
    if value is not None:
        env["NOISEMEM_KEEP_FREED_MEMORY"] = value
    code = (
        "import torch\n"
        "from noisemem import system\n"
        "from noisemem.problem import Problem\n"
        "assert system._engine_choice is None\n"
        "Problem(torch.nn.Linear(2, 2), torch.nn.functional.cross_entropy,"
        " [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))])\n"
        "print(system._engine_choice)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(expected)

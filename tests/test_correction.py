"""Eq. (9): the grouped engine against the literal Jacobians over the whole history."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import CountingModel, Tiny, make_tiny, rel_err
from oracles import literal_correction
from torch import nn

import noisemem.fused as fused
import noisemem.window as windows
from noisemem import memory_correction
from noisemem.correction import correction_at
from noisemem.memory import decay_filter, tail_ratio, truncation_horizon
from noisemem.optim import AdamW, HeavyBall, Lion, NAdamW, Nesterov
from noisemem.probe import Probe
from noisemem.problem import Problem

OPTIMIZERS = {
    "heavy_ball": HeavyBall(0.1, 0.9),
    "nesterov": Nesterov(0.1, 0.7),
    "adamw_eps_in_sqrt": AdamW(0.01, 0.9, 0.99, 1e-3, weight_decay=0.1),
    "adamw_eps_outside": AdamW(0.01, 0.8, 0.95, 1e-3, weight_decay=0.1, eps_in_sqrt=False),
    "nadamw": NAdamW(0.01, 0.9, 0.99, 1e-3, weight_decay=0.1),
    "lion_soft": Lion(0.01, 0.9, 0.99, weight_decay=0.1, eps=1e-3),
    "lion_soft_bias_corrected": Lion(
        0.01, 0.8, 0.95, weight_decay=0.1, eps=1e-2, bias_correction=True
    ),
}
SEQUENCES = {
    "one_epoch": [2, 0, 3, 1],
    "two_epochs": [2, 0, 3, 1, 1, 3, 0, 2],
    "repeats": [1, 1, 1, 0, 1, 2, 2],
    "single_step": [3],
}


@pytest.mark.parametrize("seq", sorted(SEQUENCES))
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_engine_matches_literal_eq9(tiny, opt, seq):
    optimizer, sequence = OPTIMIZERS[opt], SEQUENCES[seq]
    ours = memory_correction(
        tiny.model, tiny.loss_fn, tiny.batches, optimizer, sequence, tail_tol=0
    )
    literal = literal_correction(
        tiny.model, tiny.loss_fn, tiny.batches, optimizer, sequence, tiny.theta
    )
    if len(sequence) == 1:
        assert float(literal.norm()) == 0.0 and float(ours.norm()) == 0.0  # no history yet
    else:
        assert float(literal.norm()) > 1e-6
        assert rel_err(ours, literal) < 1e-9


@pytest.mark.parametrize("hvp", ["vmap", "double_backward"])
def test_both_hvp_paths_agree_with_literal(hvp):
    tiny = make_tiny("gelu_mlp")
    seq = SEQUENCES["two_epochs"]
    for optimizer in (OPTIMIZERS["heavy_ball"], OPTIMIZERS["nesterov"]):
        ours = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, optimizer, seq, hvp=hvp)
        literal = literal_correction(
            tiny.model, tiny.loss_fn, tiny.batches, optimizer, seq, tiny.theta
        )
        assert rel_err(ours, literal) < 1e-9


@pytest.mark.parametrize("opt", ["adamw_eps_in_sqrt", "lion_soft"])
def test_graph_and_vmap_hvps_agree_for_nonlinear_sources(opt):
    tiny = make_tiny("gelu_mlp")
    seq = SEQUENCES["two_epochs"]
    kw = {"tail_tol": 0}
    a = memory_correction(
        tiny.model, tiny.loss_fn, tiny.batches, OPTIMIZERS[opt], seq, hvp="vmap", **kw
    )
    b = memory_correction(
        tiny.model, tiny.loss_fn, tiny.batches, OPTIMIZERS[opt], seq, hvp="double_backward", **kw
    )
    assert rel_err(a, b) < 1e-12


def test_unknown_hvp_mode_is_named():
    tiny = make_tiny("softmax")
    with pytest.raises(ValueError, match="hvp='forward'"):
        memory_correction(
            tiny.model,
            tiny.loss_fn,
            tiny.batches,
            OPTIMIZERS["adamw_eps_in_sqrt"],
            [0, 1, 2],
            hvp="forward",
        )


PATHS = [
    (opt, path)
    for opt in sorted(OPTIMIZERS)
    for path in ("linear", "fused", "dense", "streamed")
    if path != "linear" or OPTIMIZERS[opt].linear
]


@pytest.mark.parametrize("opt, path", PATHS, ids=[f"{o}-{p}" for o, p in PATHS])
def test_every_evaluation_path_matches_literal_eq9(opt, path):
    """linear: scalar coefficients + one summed HVP (heavy ball, Nesterov); fused: the CPU
    kernel of noisemem.fused; dense: coefficient matrices times stacked sources; streamed: a
    recurrence per step (many distinct batches)."""
    optimizer = OPTIMIZERS[opt]
    hvp = "double_backward" if path == "linear" else "vmap"
    assert fused.usable(optimizer, torch.zeros(1, dtype=torch.float64))
    tiny = make_tiny("gelu_mlp")
    seq = SEQUENCES["two_epochs"] + SEQUENCES["repeats"]
    ours = memory_correction(
        tiny.model, tiny.loss_fn, tiny.batches, optimizer, seq, hvp=hvp, window=path
    )
    literal = literal_correction(tiny.model, tiny.loss_fn, tiny.batches, optimizer, seq, tiny.theta)
    assert rel_err(ours, literal) < 1e-9


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "streamed"])
@pytest.mark.parametrize("opt", ["heavy_ball", "adamw_eps_in_sqrt"])
def test_blocked_window_equals_single_block(monkeypatch, opt, dense):
    """Long windows are streamed in blocks (two passes); the result must not change."""
    tiny = make_tiny("gelu_mlp")
    seq = SEQUENCES["two_epochs"] * 2
    window = "dense" if dense else "streamed"  # the torch paths are the ones in blocks
    whole = memory_correction(
        tiny.model, tiny.loss_fn, tiny.batches, OPTIMIZERS[opt], seq, hvp="vmap", window=window
    )
    d = tiny.theta.numel()
    # rows x d summed over the variables: 3 rows per block for AdamW, 9 for heavy ball;
    # either way the 16-step window is split
    monkeypatch.setattr(windows, "MAX_WINDOW_ELEMENTS", 3 * 3 * d)
    blocked = memory_correction(
        tiny.model, tiny.loss_fn, tiny.batches, OPTIMIZERS[opt], seq, hvp="vmap", window=window
    )
    literal = literal_correction(
        tiny.model, tiny.loss_fn, tiny.batches, OPTIMIZERS[opt], seq, tiny.theta
    )
    assert rel_err(blocked, whole) < 1e-12
    assert rel_err(blocked, literal) < 1e-9


def test_tail_ratio_is_the_relative_weight_of_the_dropped_terms():
    beta, K = 0.9, 37
    dropped = sum(k * beta**k for k in range(K + 1, 5000))
    whole = sum(k * beta**k for k in range(1, 5000))
    assert abs(tail_ratio(beta, K) - dropped / whole) < 1e-12 * whole
    K = truncation_horizon(beta, 1e-6, 10_000)
    assert tail_ratio(beta, K) <= 1e-6 < tail_ratio(beta, K - 1)


def test_truncated_correction_stays_within_its_documented_bound():
    """Dropping k > K changes sum_i H_i w_i by at most max_i||H_i||_2 * sum_{k>K} beta^k ||u_k||
    <= max_i||H_i||_2 * tail_ratio(K) * max_s||F^(s)|| * beta/(1-beta)^2 (heavy ball)."""
    from oracles import batch_gradient, flat_loss

    tiny = make_tiny("gelu_mlp")
    seq = [j % 4 for j in range(120)]
    beta, tol = 0.8, 1e-6
    opt = HeavyBall(0.1, beta)
    K = truncation_horizon(beta, tol, len(seq) - 1)
    assert K < len(seq) - 1  # the bound does cut the window
    exact = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, seq, tail_tol=0)
    loose = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, seq, tail_tol=tol)
    theta = tiny.theta
    H_norm = max(
        torch.linalg.matrix_norm(
            torch.autograd.functional.hessian(
                lambda t, b=b: flat_loss(tiny.model, tiny.loss_fn, t, b), theta
            ),
            ord=2,
        )
        for b in tiny.batches
    )
    g = [batch_gradient(tiny.model, tiny.loss_fn, theta.clone(), b).detach() for b in tiny.batches]
    F_max, F = 0.0, torch.zeros_like(theta)
    for i in seq[:-1]:
        F = beta * F + g[i]
        F_max = max(F_max, float(F.norm()))
    bound = opt.lr * H_norm * tail_ratio(beta, K) * F_max * beta / (1 - beta) ** 2
    assert 0 < float((loose - exact).norm()) <= bound
    default = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, seq)
    assert rel_err(default, exact) < 1e-9


def test_memoryless_optimizer_has_no_correction():
    tiny = make_tiny("softmax")
    M = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, HeavyBall(0.1, 0.0), [0, 1, 2, 3])
    assert torch.count_nonzero(M) == 0


def test_result_is_flat_float64_and_model_is_untouched():
    """(The parameter order itself is checked by every comparison with the literal Eq. (9),
    which works in ``parameters_to_vector`` order.)"""
    tiny = make_tiny("gelu_mlp")
    before = tiny.theta
    M = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, OPTIMIZERS["heavy_ball"], [0, 1])
    assert M.shape == before.shape and M.dtype == torch.float64
    assert torch.equal(before, tiny.theta)


BAD_INPUT = [
    ("unequal", "batches"),
    ("feature_shapes", "batches"),
    ("out_of_range", "sequence[2]=4"),
    ("negative", "sequence[0]=-1"),
    ("fractional", "sequence[1]=1.5"),
    ("bool_index", "sequence[1]=True"),
    ("empty", "sequence"),
    ("sign_lion", "eps > 0"),
    ("not_an_optimizer", "optimizer=SGD"),
    ("tail_tol", "tail_tol=2.0"),
    ("tail_tol_nan", "tail_tol=nan"),
    ("tail_tol_bool", "tail_tol=False"),
    ("hvp", "hvp='forward'"),
]


def bad_input(case: str):
    tiny = make_tiny("softmax")
    model = CountingModel(tiny.model)
    batches, seq, opt, kw = tiny.batches, [0, 1, 2], HeavyBall(0.1, 0.9), {}
    if case == "unequal":
        x, y = batches[-1]
        batches = [*batches[:-1], (x[:1], y[:1])]
    elif case == "feature_shapes":
        x, y = batches[-1]
        batches = [*batches[:-1], (torch.cat([x, x], 1), y)]
    elif case == "out_of_range":
        seq = [0, 1, 4]
    elif case == "negative":
        seq = [-1, 0]
    elif case == "fractional":
        seq = [0, 1.5]
    elif case == "bool_index":
        seq = [0, True]
    elif case == "empty":
        seq = []
    elif case == "sign_lion":
        opt = Lion(0.01, 0.9, 0.99)
    elif case == "not_an_optimizer":
        opt = torch.optim.SGD(tiny.model.parameters(), lr=0.1, momentum=0.9)
    elif case == "tail_tol":
        kw = {"tail_tol": 2.0}
    elif case == "tail_tol_nan":
        kw = {"tail_tol": float("nan")}
    elif case == "tail_tol_bool":
        kw = {"tail_tol": False}
    elif case == "hvp":
        kw = {"hvp": "forward"}
    return model, tiny.loss_fn, batches, opt, seq, kw


@pytest.mark.parametrize("case, needle", BAD_INPUT, ids=[c for c, _ in BAD_INPUT])
def test_bad_input_raises_a_clear_value_error_before_any_work(case, needle):
    model, loss_fn, batches, opt, seq, kw = bad_input(case)
    with pytest.raises(ValueError) as err:
        memory_correction(model, loss_fn, batches, opt, seq, **kw)
    assert needle in str(err.value)
    assert model.calls == 0
    if case == "out_of_range":
        assert "[0, 4)" in str(err.value)


PROBE_CASES = [(c, n) for c, n in BAD_INPUT if n != "batches"]


@pytest.mark.parametrize("case, needle", PROBE_CASES, ids=[c for c, _ in PROBE_CASES])
def test_a_probe_checks_its_arguments_too(case, needle):
    """The studies and trajectories call :func:`correction_at` on a probe directly: the same
    checks hold there (a negative index used to wrap around, a fractional one to be cut)."""
    model, loss_fn, batches, opt, seq, kw = bad_input(case)
    probe = Probe(Problem(model, loss_fn, batches))
    with pytest.raises(ValueError) as err:
        correction_at(probe, opt, seq, **kw)
    assert needle in str(err.value)
    if needle.startswith(("optimizer", "sequence")):
        with pytest.raises(ValueError, match=r"optimizer|sequence"):
            probe.direction(opt, seq)


def test_integer_arrays_are_checked_without_a_loop_and_give_the_same_result():
    tiny = make_tiny("gelu_mlp")
    opt = OPTIMIZERS["adamw_eps_in_sqrt"]
    seq = SEQUENCES["two_epochs"]
    probe = Probe(Problem(tiny.model, tiny.loss_fn, tiny.batches))
    as_list = correction_at(probe, opt, seq)
    for form in (np.asarray(seq, dtype=np.int32), torch.tensor(seq)):
        assert torch.equal(correction_at(probe, opt, form), as_list)
    with pytest.raises(ValueError, match=r"sequence\[2\]=4"):
        correction_at(probe, opt, np.array([0, 1, 4, 2]))


def dead_input_twins() -> tuple[Tiny, Tiny, list[int], list[int]]:
    """A GELU MLP on 4 features whose last one is always 0, and the same network without
    that feature. Returns both, the coordinates of the wide model's parameters that the
    narrow one has (in its order), and those of the dead feature's weights."""
    base = make_tiny("gelu_mlp")
    zero = torch.zeros(base.batches[0][0].shape[0], 1, dtype=torch.float64)
    batches = [(torch.cat([x, zero], 1), y) for x, y in base.batches]
    gen = torch.Generator().manual_seed(5)
    wide = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 3)).double()
    narrow = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p in wide.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        narrow[0].weight.copy_(wide[0].weight[:, :3])
        narrow[0].bias.copy_(wide[0].bias)
        narrow[2].weight.copy_(wide[2].weight)
        narrow[2].bias.copy_(wide[2].bias)
    d = sum(p.numel() for p in wide.parameters())
    dead = [o * 4 + 3 for o in range(4)]  # weight[o, 3], row-major
    kept = [j for j in range(d) if j not in dead]
    return Tiny("wide", wide, batches), Tiny("narrow", narrow, base.batches), kept, dead


@pytest.mark.parametrize("path", ["fused", "torch", "vmap"])
@pytest.mark.parametrize("name", ["adamw", "nadamw"])
def test_adam_eps_outside_the_sqrt_is_finite_on_a_dead_input_feature(name, path):
    """Where a coordinate's gradient is 0 in every batch (the digits' always-zero pixels),
    m2 = 0 and sqrt'(0) is infinite; the step m1/(sqrt(m2)+eps) is still smooth there (m1 =
    0 too), and those weights' M is 0, since their F is identically 0 near theta. The other
    coordinates must equal Eq. (9) of the network without the feature (the literal oracle)."""
    cls = AdamW if name == "adamw" else NAdamW
    opt = cls(0.01, 0.8, 0.95, 1e-3, eps_in_sqrt=False)
    wide, narrow, kept, dead = dead_input_twins()
    seq = SEQUENCES["two_epochs"]
    window = "fused" if path == "fused" else "dense"
    hvp = "vmap" if path == "vmap" else "double_backward"
    M = memory_correction(
        wide.model, wide.loss_fn, wide.batches, opt, seq, tail_tol=0, hvp=hvp, window=window
    )
    literal = literal_correction(
        narrow.model, narrow.loss_fn, narrow.batches, opt, seq, narrow.theta
    )
    assert bool(torch.isfinite(M).all())
    assert torch.equal(M[dead], torch.zeros(len(dead), dtype=M.dtype))
    assert float(literal.norm()) > 1e-6
    assert rel_err(M[kept], literal) < 1e-9


class WithUnused(nn.Module):
    """A network with an extra parameter its output never uses."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("hvp", ["double_backward", "vmap"])
@pytest.mark.parametrize("opt", ["heavy_ball", "adamw_eps_in_sqrt"])
def test_a_parameter_the_loss_never_uses_gets_zero_correction(opt, hvp):
    """Its gradient is identically 0, so no history term reaches it (weight decay has no
    memory), and the other coordinates are those of the network without it."""
    tiny = make_tiny("gelu_mlp")
    seq = SEQUENCES["two_epochs"]
    optimizer = OPTIMIZERS[opt]
    expected = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, optimizer, seq)
    model = WithUnused(tiny.model)
    M = memory_correction(model, tiny.loss_fn, tiny.batches, optimizer, seq, hvp=hvp)
    assert next(n for n, _ in model.named_parameters()) == "unused"  # own parameters first
    assert rel_err(M[2:], expected) < 1e-12
    assert torch.equal(M[:2], torch.zeros(2, dtype=M.dtype))


def test_keeping_freed_memory_is_accepted_here_and_changes_no_result():
    from noisemem.system import keep_freed_memory

    tiny = make_tiny("gelu_mlp")
    opt = OPTIMIZERS["adamw_eps_in_sqrt"]
    seq = SEQUENCES["two_epochs"]
    before = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, seq)
    assert keep_freed_memory()  # glibc on these machines
    after = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, seq)
    assert torch.equal(before, after)


def test_per_variable_horizon_keeps_the_default_tolerance_for_adam():
    """beta1 = 0.5 stops contributing after ~50 steps while beta2 = 0.99 spans the window;
    the per-variable cut must not move M beyond the documented relative tolerance."""
    tiny = make_tiny("gelu_mlp")
    seq = [j % 4 for j in range(150)]
    opt = AdamW(0.01, 0.5, 0.99, 1e-3, weight_decay=0.1)
    assert truncation_horizon(0.5, 1e-12, 149) < truncation_horizon(0.99, 1e-12, 149) == 149
    exact = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, seq, tail_tol=0)
    default = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, seq)
    assert 0 < rel_err(default, exact) < 1e-9 or torch.equal(default, exact)


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "serial"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_fused_kernel_in_coordinate_blocks_matches_torch_and_literal(monkeypatch, opt, parallel):
    """Blocks of 16 coordinates (d = 31: a full and a ragged block) in float64, and float32
    against the torch path; heavy ball and Nesterov are forced off the linear path (vmap).
    Both compiled variants (threads over blocks, or one thread) are run."""
    tiny = make_tiny("gelu_mlp")
    optimizer = OPTIMIZERS[opt]
    seq = SEQUENCES["two_epochs"] + SEQUENCES["repeats"]
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 1)
    compiled = fused._kernel
    used = []

    def forced(_: bool):
        used.append(parallel)
        return compiled(parallel)

    monkeypatch.setattr(fused, "_kernel", forced)

    def both(model, batches):
        a, b = (
            memory_correction(model, tiny.loss_fn, batches, optimizer, seq, hvp="vmap", window=w)
            for w in ("fused", "dense")
        )
        return a, b

    ours, torch_path = both(tiny.model, tiny.batches)
    literal = literal_correction(tiny.model, tiny.loss_fn, tiny.batches, optimizer, seq, tiny.theta)
    assert rel_err(ours, literal) < 1e-9
    assert rel_err(ours, torch_path) < 1e-12
    model32 = copy.deepcopy(tiny.model).float()
    batches32 = [(x.float(), y) for x, y in tiny.batches]
    ours32, torch32 = both(model32, batches32)
    assert ours32.dtype == torch.float32
    assert rel_err(ours32.double(), literal) < 1e-4  # float32 rounding over 15 steps
    assert rel_err(ours32, torch32) < 1e-5
    assert used == [parallel, parallel]  # the kernel ran, in float64 and in float32


@pytest.mark.parametrize("hvp", ["double_backward", "vmap"])
@pytest.mark.parametrize("seq", ["repeats", "two_epochs"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_fused_kernel_writes_every_output_row_before_reading_it(monkeypatch, opt, seq, hvp):
    """The kernel's (m, d) outputs are not zeroed first: a row starts at the batch's first
    weighted step. With that memory filled with NaN, M still equals the torch path's, also
    for batch 3, which the "repeats" window never visits (its row is zeroed apart, and the
    graph's backward pass reads it)."""
    tiny = make_tiny("gelu_mlp")
    optimizer, sequence = OPTIMIZERS[opt], SEQUENCES[seq]
    filled = []

    def nan_filled(shape: tuple[int, ...], dtype: type) -> np.ndarray:
        filled.append(shape)
        return np.full(shape, np.nan, dtype=dtype)

    def ours(window: str) -> torch.Tensor:
        return memory_correction(
            tiny.model, tiny.loss_fn, tiny.batches, optimizer, sequence, hvp=hvp, window=window
        )

    monkeypatch.setattr(fused, "uninitialised", nan_filled)
    got = ours("fused")
    assert (len(tiny.batches), tiny.theta.numel()) in filled  # the kernel's outputs were NaN
    assert torch.isfinite(got).all()
    assert rel_err(got, ours("dense")) < 1e-12


def test_fused_kernel_compiles_where_numba_cannot_cache(monkeypatch):
    """A read-only install with no writable home leaves numba no cache location; the kernel
    must then compile without one instead of failing the correction."""
    from numba.core import caching

    tiny = make_tiny("gelu_mlp")
    opt = OPTIMIZERS["adamw_eps_in_sqrt"]
    seq = SEQUENCES["two_epochs"]
    expected = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, seq)
    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    fused._kernel.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="no locator"):  # what numba does on its own
            import numba

            numba.njit(cache=True)(lambda x: x)
        again = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, seq)
    finally:
        fused._kernel.cache_clear()
    assert torch.equal(again, expected)


def test_every_path_truncates_each_variable_at_its_own_horizon():
    """With tail_tol > 0 and a window starting after step 0, beta1 = 0.5 keeps ~30 terms and
    beta2 = 0.9 ~300: the three implementations (fused kernel, torch dense, torch streamed)
    must drop exactly the same terms (float64, 1e-12), and something must be dropped."""
    tiny = make_tiny("gelu_mlp")
    seq = [j * 7 % 4 for j in range(400)]
    opt = AdamW(0.01, 0.5, 0.9, 1e-3, weight_decay=0.1)
    tol = 1e-6
    n = len(seq) - 1
    assert 1 < truncation_horizon(0.5, tol, n) < truncation_horizon(0.9, tol, n) < n

    def correction_via(window: str) -> torch.Tensor:
        return memory_correction(
            tiny.model,
            tiny.loss_fn,
            tiny.batches,
            opt,
            seq,
            tail_tol=tol,
            hvp="vmap",
            window=window,
        )

    paths = {w: correction_via(w) for w in ("fused", "dense", "streamed")}
    assert rel_err(paths["fused"], paths["dense"]) < 1e-12
    assert rel_err(paths["streamed"], paths["dense"]) < 1e-12
    untruncated = memory_correction(
        tiny.model, tiny.loss_fn, tiny.batches, opt, seq, tail_tol=0, hvp="vmap"
    )
    for M in paths.values():
        assert 0 < rel_err(M, untruncated) < 1e-4  # something was dropped, a little


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("rows", [1, 63, 64, 65, 300])
def test_decay_filter_is_the_first_order_recurrence(beta, rows):
    """The momentum coefficients' filter against the row-by-row recurrence and scipy's
    lfilter (2-D with an initial row, 1-D without), across block edges."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 5))
    init = rng.standard_normal(5)
    y = decay_filter(x, beta, init)
    prev, want = init, np.empty_like(x)
    for r in range(rows):
        prev = x[r] + beta * prev
        want[r] = prev
    assert np.abs(y - want).max() <= 1e-13 * np.abs(want).max()
    ref = lfilter([1.0], [1.0, -beta], x, axis=0, zi=beta * init[None, :])[0]
    assert np.abs(y - ref).max() <= 1e-13 * np.abs(ref).max()
    one = decay_filter(x[:, 0], beta)
    assert one.shape == (rows,)
    assert np.abs(one - lfilter([1.0], [1.0, -beta], x[:, 0])).max() <= 1e-13 * np.abs(one).max()

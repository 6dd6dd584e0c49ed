"""E[M^(n)] over random batch orders (paper Sec. 6.2, Appendix G; THEORY §4).

Sampling schemes (``sampling``):

* ``"permute"``: the m fixed batches, in a fresh uniformly random order each epoch (paper).
* ``"reshuffle"``: the N = m b samples shuffled into fresh batches of size b each epoch
  (what ``DataLoader(shuffle=True, drop_last=True)`` does).
* ``"replacement"``: each step draws one of the m fixed batches uniformly, independently.

Exact method (linear optimizers: heavy ball, Nesterov). ``M^(n)/h = sum_{a,c} kappa(a,c)
H_{sigma(a)} g_{sigma(c)}`` over history positions a, c < n with

    kappa(a,c) = d(a) sum_{s=max(a,c)..n-1} f(s,c),
    d(a) = sum_l b_l^(n+1) beta_l^(n-a)  (dF^(n)/dtheta^(a) = d(a) H_{sigma(a)}),
    f(s,c) = sum_l b_l^(s+1) beta_l^(s-c) (F^(s) = sum_c f(s,c) g_{sigma(c)}).

The expectation of ``H_{sigma(a)} g_{sigma(c)}`` depends only on whether a = c, a != c in one
epoch, or a, c in different epochs, so with C_same, C_epoch, C_cross the sums of kappa over
those classes, E_same = H g + s_same V and E_diff = H g + s_diff V (V the noise direction):

    E[M]/h = (C_same + C_epoch + C_cross) H g + (C_same s_same + C_epoch s_diff) V

    permute:     V = Cov = mean_i H_i g_i - H g,   s_same = 1,               s_diff = -1/(m-1)
    reshuffle:   V = Cov_x (per sample, 1/N sum_x), s_same = (N-b)/(b(N-1)), s_diff = -1/(N-1)
    replacement: V = Cov,                           s_same = 1,               s_diff = 0

The first term is ``full_batch_part`` (it equals the full-batch correction at step n), the
second ``noise_part``. Reshuffled batches are sets of samples, so the exact ``reshuffle``
expectation takes each sample as a batch of one: it holds when a batch's loss is the mean of
its samples' losses and the model treats samples independently (no batch norm); Monte Carlo
builds the fresh batches themselves and needs neither.

Monte Carlo (every optimizer): average Eq. (9) over sampled orders, with per-coordinate
standard errors; order p is drawn from ``numpy.random.default_rng([seed,
p])``, so an estimate does not depend on how the orders are split among workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor, nn

from noisemem import checks
from noisemem.budget import parse_budget
from noisemem.checks import SAMPLINGS, SEED_LIMIT
from noisemem.correction import correction_at
from noisemem.memory import TAIL_TOL, decay_filter
from noisemem.optim import Optimizer, require_smooth
from noisemem.probe import Probe
from noisemem.problem import Batch, LossFn, Problem, as_problem
from noisemem.stats import Moments

METHODS = ("exact", "monte_carlo")


@dataclass(frozen=True)
class Expectation:
    """E[M^(n)] (flat ``(d,)`` tensors) and how it was obtained."""

    mean: Tensor
    method: str
    sampling: str
    step: int
    epochs: int
    #: Monte Carlo: per-coordinate standard error of ``mean``; None for the exact method
    stderr: Tensor | None = None
    #: exact method: h (C_same + C_epoch + C_cross) H g and h (C_same s_same + C_epoch s_diff) V
    full_batch_part: Tensor | None = None
    noise_part: Tensor | None = None
    #: exact method: C_same, C_epoch, C_cross and the noise coefficient
    coefficients: dict[str, float] | None = None
    permutations: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class SampledRun:
    """One sampled batch order: ``sequence`` indexes fixed batches, or, for ``reshuffle``,
    the rows of ``batches`` (sample indices of the fresh batches, ``(count, b)``)."""

    sequence: np.ndarray
    batches: np.ndarray | None = None


def sample_run(
    sampling: str, num_batches: int, batch_size: int, steps: int, seed: int, index: int
) -> SampledRun:
    """The ``index``-th random order of ``steps`` steps under ``sampling``."""
    seed, index = checks.seed("seed", seed), checks.seed("index", index)
    rng = np.random.default_rng([int(seed), int(index)])
    m = num_batches
    epochs = -(-steps // m)
    if sampling == "permute":
        return SampledRun(np.concatenate([rng.permutation(m) for _ in range(epochs)])[:steps])
    if sampling == "replacement":
        return SampledRun(rng.integers(0, m, size=steps))
    N = m * batch_size
    orders = np.concatenate([rng.permutation(N) for _ in range(epochs)])
    return SampledRun(np.arange(steps), orders.reshape(-1, batch_size)[:steps])


def pair_coefficients(optimizer: Optimizer, step: int, num_batches: int) -> dict[str, float]:
    """C_same, C_epoch, C_cross of the module docstring, exact, in float64, in O(n L).

    With t = max(a, c) and R_l(t) = sum_{s=t..n-1} b_l^(s+1) beta_l^(s-t),
    kappa(a, c) = d(a) sum_l beta_l^(t-c) R_l(t). For c <= a this is d(a) sum_l beta_l^(a-c)
    R_l(a), a geometric sum over c; for c > a it is d(a) sum_l R_l(c), a difference of prefix
    sums of R_l. Epoch e holds positions [e m, (e+1) m).
    """
    n, m = step, num_batches
    if n == 0:
        return {"same": 0.0, "epoch": 0.0, "cross": 0.0}
    betas = [v.beta for v in optimizer.variables]
    b = optimizer.scales(np.arange(n + 1, dtype=np.float64))  # (L, n+1)
    a = np.arange(n, dtype=np.float64)
    first = (a // m) * m  # first position of a's epoch
    last = np.minimum(first + m - 1, n - 1)  # last position of a's epoch before n
    d = sum(b[l, n] * beta ** (n - a) for l, beta in enumerate(betas))  # dF^(n)/dtheta^(a)
    same = epoch = total = 0.0
    for l, beta in enumerate(betas):
        R = decay_filter(b[l, :n][::-1], beta)[::-1]  # R[t] = b + beta R[t+1]
        prefix = np.concatenate([[0.0], np.cumsum(R)])  # prefix[j] = sum_{c<j} R(c)
        upto_epoch = (1 - beta ** (a - first + 1)) / (1 - beta)  # sum beta^(a-c), c in [first, a]
        upto_all = (1 - beta ** (a + 1)) / (1 - beta)  # c in [0, a]
        after_epoch = prefix[last.astype(int) + 1] - prefix[a.astype(int) + 1]  # c in (a, last]
        after_all = prefix[n] - prefix[a.astype(int) + 1]  # c in (a, n-1]
        same += float((d * R).sum())
        epoch += float((d * (R * upto_epoch + after_epoch)).sum())
        total += float((d * (R * upto_all + after_all)).sum())
    return {"same": same, "epoch": epoch - same, "cross": total - epoch}


def _check_expectation_args(
    optimizer: Optimizer,
    sampling: str,
    method: str,
    epochs: int,
    step: int | None,
    permutations: int | None,
    seed: int,
    num_batches: int,
) -> int:
    checks.choice("sampling", sampling, SAMPLINGS)
    checks.choice("method", method, METHODS)
    checks.integer("epochs", epochs, 1)
    last = epochs * num_batches - 1
    if step is None:
        step = last
    checks.integer(
        "step",
        step,
        0,
        last,
        allowed=f"step must be an int in [0, {last}] ({epochs} epochs of {num_batches} "
        "batches), or None for the last step",
    )
    if method == "exact" and not optimizer.linear:
        raise ValueError(
            f"method='exact' is not available for {optimizer.name}: E[M] has a closed form only "
            "for optimizers linear in the gradients (HeavyBall, Nesterov); use "
            "method='monte_carlo'"
        )
    if method == "monte_carlo":
        checks.integer(
            "permutations",
            permutations,
            2,
            SEED_LIMIT,
            allowed="method='monte_carlo' needs an int in [2, 2**32]",
        )
    checks.seed("seed", seed)
    return int(step)


def noise_scales(sampling: str, num_batches: int, batch_size: int) -> tuple[float, float]:
    """``(s_same, s_diff)`` of the module docstring."""
    m, b = num_batches, batch_size
    if sampling == "permute":
        return 1.0, (-1.0 / (m - 1) if m > 1 else 0.0)
    if sampling == "replacement":
        return 1.0, 0.0
    N = m * b
    if N < 2:
        return 0.0, 0.0
    return (N - b) / (b * (N - 1)), -1.0 / (N - 1)


def exact_expectation(
    problem: Problem,
    optimizer: Optimizer,
    sampling: str,
    step: int,
    epochs: int,
    probe: Probe | None = None,
    parts: bool = True,
) -> Expectation:
    """The exact E[M^(n)] for a linear optimizer (module docstring); g, H g and Cov from
    ``probe`` (a :class:`Probe` of ``problem``; built here if not given). ``parts=False``:
    the mean alone, ``h ((C_full - c_noise) H g + c_noise mean_i H_i g_i)``, in one backward
    pass instead of two (no full-batch and noise parts)."""
    if not optimizer.linear:
        raise ValueError(f"optimizer: {optimizer.name} is not linear in the gradients")
    C = pair_coefficients(optimizer, step, problem.num_batches)
    s_same, s_diff = noise_scales(sampling, problem.num_batches, problem.batch_size)
    probe = probe if probe is not None else Probe(problem)
    probe.require(None, per_batch=False)  # sums of products only: no (m, d) array
    c_full = C["same"] + C["epoch"] + C["cross"]
    c_noise = C["same"] * s_same + C["epoch"] * s_diff
    coefficients = {**C, "noise": c_noise, "full": c_full}
    h = optimizer.lr
    if not parts:  # V = mean H_i g_i - H g (per sample under reshuffle, where H g is the same)
        on = probe if sampling != "reshuffle" else per_sample_probe(probe)
        mean = on.moment_combination(h * c_noise, h * (c_full - c_noise))
        return Expectation(mean, "exact", sampling, step, epochs, coefficients=coefficients)
    if sampling == "reshuffle":
        Hg, V = probe.hessian_gradient(), per_sample_probe(probe).hessian_moments()[2]
    else:
        _, Hg, V = probe.hessian_moments()
    full_part = h * c_full * Hg
    noise_part = h * c_noise * V
    return Expectation(
        mean=full_part + noise_part,
        method="exact",
        sampling=sampling,
        step=step,
        epochs=epochs,
        full_batch_part=full_part,
        noise_part=noise_part,
        coefficients=coefficients,
    )


def per_sample_probe(probe: Probe) -> Probe:
    """A probe of the same samples at the same point, each sample a batch of one."""
    return Probe(probe.problem.per_sample(), probe.theta, **per_sample_memory(probe))


def per_sample_memory(probe: Probe) -> dict[str, int | None]:
    """The memory arguments of ``probe`` for a probe of the same samples in other batches
    (``graph_batches`` scaled to hold as many samples per graph)."""
    q = probe.graph_batches
    samples = q * probe.problem.batch_size if q is not None else None
    return {"memory_budget": probe.memory_budget, "graph_batches": samples}


def sampled_correction(
    problem: Problem,
    probe: Probe,
    optimizer: Optimizer,
    run: SampledRun,
    tail_tol: float = TAIL_TOL,
) -> Tensor:
    """Eq. (9) for one sampled order (fresh batches built from samples for ``reshuffle``)."""
    if run.batches is None:
        return correction_at(probe, optimizer, run.sequence, tail_tol=tail_tol)
    fresh = Probe(
        problem.rebatched(run.batches),
        probe.theta,
        memory_budget=probe.memory_budget,
        graph_batches=probe.graph_batches,
    )
    return correction_at(fresh, optimizer, run.sequence, tail_tol=tail_tol)


def monte_carlo_moments(
    problem: Problem,
    optimizer: Optimizer,
    sampling: str,
    step: int,
    indices: Sequence[int] | range,
    seed: int,
    probe: Probe | None = None,
) -> Moments:
    """Sufficient statistics of M^(step) over the sampled orders ``indices``."""
    probe = probe or Probe(problem)
    acc = Moments.empty(problem.theta.numel())
    for p in indices:
        run = sample_run(sampling, problem.num_batches, problem.batch_size, step + 1, seed, int(p))
        acc.add(sampled_correction(problem, probe, optimizer, run))
    return acc


def expected_correction(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    optimizer: Optimizer,
    *,
    epochs: int = 1,
    sampling: str = "permute",
    method: str = "exact",
    permutations: int | None = None,
    seed: int = 0,
    step: int | None = None,
    memory_budget: int | float | str | None = None,
    graph_batches: int | None = None,
    parts: bool = True,
) -> Expectation:
    """E[M^(n)] over random batch orders at the model's current parameters.

    ``step`` (default: the last step of ``epochs`` epochs) is n. ``method="exact"`` for
    HeavyBall and Nesterov (with ``full_batch_part`` and ``noise_part``); ``"monte_carlo"``
    for every smooth optimizer, averaging Eq. (9) over ``permutations`` sampled orders
    (``stderr`` per coordinate; reproducible from ``seed``, an int in [0, 2**32)); the exact
    method uses neither. ``memory_budget`` and ``graph_batches`` as in
    :func:`~noisemem.correction.memory_correction`; the exact method holds no (m, d) array
    (with the graph a group at a time it takes two passes of graphs instead of one).
    ``parts=False`` (exact method): the mean alone, in one backward pass through the batch
    gradients' graph instead of two; ``full_batch_part`` and ``noise_part`` are then None.
    """
    require_smooth(optimizer)
    parse_budget(memory_budget)
    checks.flag("parts", parts)
    problem = as_problem(model, loss_fn, batches)
    n = _check_expectation_args(
        optimizer, sampling, method, epochs, step, permutations, seed, problem.num_batches
    )
    epochs, seed = int(epochs), int(seed)
    probe = Probe(problem, memory_budget=memory_budget, graph_batches=graph_batches)
    if method == "exact":
        return exact_expectation(problem, optimizer, sampling, n, epochs, probe, parts)
    assert permutations is not None
    permutations = int(permutations)
    acc = monte_carlo_moments(problem, optimizer, sampling, n, range(permutations), seed, probe)
    dtype, device = problem.theta.dtype, problem.theta.device
    return Expectation(
        mean=acc.mean.to(device, dtype),
        stderr=acc.stderr.to(device, dtype),
        method="monte_carlo",
        sampling=sampling,
        step=n,
        epochs=epochs,
        permutations=permutations,
        seed=seed,
    )


__all__ = [
    "METHODS",
    "SAMPLINGS",
    "Expectation",
    "expected_correction",
]

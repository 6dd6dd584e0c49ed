"""The memory correction M^(n) of Eq. (9), computed with the grouping of THEORY §3.

Eq. (9), for step n of a fixed batch sequence sigma, every history slot set to theta:

    M^(n)(theta) = h * sum_{k=1..n} dF^(n)/dtheta^(n-k)(theta) . u_k,
    u_k = sum_{s=n-k..n-1} F^(s)(theta).

With momentum variables (THEORY §2),
``dF^(n)/dtheta^(n-k) . u = sum_l dPhi/dm_l . b_l^(n+1) beta_l^k J[G_l^{sigma(n-k)}] u``, and
since ``J[G_l^i]`` only depends on the batch i, the k's are grouped by the batch they point to:

    w_{l,i} = sum_{k: sigma(n-k)=i} beta_l^k u_k,
    M^(n)   = h * sum_l dPhi/dm_l(m^(n+1)) . b_l^(n+1) sum_i J[G_l^i](theta) w_{l,i}.

Cost: the batch gradients g_i (one vmapped call, graph kept); the momentum rows of the
window of steps (matrix products of float64 coefficients with the stacked sources, or an
O(d) recurrence per step when there are many distinct batches); Phi and the suffix sums,
vectorised; then at most one Hessian-vector product per distinct batch and momentum variable,
all of a variable's in one backward pass through the gradients' graph (each batch has its own
copy of theta, so the H_i w_{l,i} come out separately; for heavy ball this is
``grad_theta sum_i <g_i, w_i>``); and one JVP of Phi. Optimizers linear in the g's reduce to
scalar coefficients and a single summed HVP.

How the window of steps is evaluated is the ``window`` argument, one of the strategies of
:mod:`noisemem.window` (``"auto"`` picks: the linear reduction where it applies, the fused
CPU kernel of :mod:`noisemem.fused`, else the blocked torch scan; all three cost O(K d) for
a window of K steps, however many batches). The tail of the memory is cut as
:mod:`noisemem.memory` documents (``tail_tol``).

Memory (:mod:`noisemem.budget`): the batch gradients' graph is kept whole when it fits in
``memory_budget`` next to the O(m d) arrays, else rebuilt a group of batches at a time for
each pass of products; where the O(m d) arrays themselves do not fit, a ``ValueError`` says
so before any work, and ``window="online"`` computes the same M^(n) in O(L d).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from noisemem import checks
from noisemem import window as windows
from noisemem.budget import parse_budget
from noisemem.memory import TAIL_TOL
from noisemem.optim import Optimizer, require_smooth
from noisemem.probe import Probe
from noisemem.problem import Batch, LossFn, as_problem

#: how Hessian-vector products are taken (see :func:`memory_correction`)
HVP_MODES = ("double_backward", "vmap")
#: how the window of steps is evaluated: "auto" or one of :data:`noisemem.window.STRATEGIES`
WINDOWS = ("auto", *windows.STRATEGIES)


def check_correction_args(
    optimizer: Optimizer, tail_tol: float, hvp: str, window: str = "auto"
) -> None:
    """The arguments of Eq. (9) other than the sequence, checked before any work."""
    require_smooth(optimizer)
    checks.real(
        "tail_tol",
        tail_tol,
        low=0.0,
        high=1.0,
        high_open=True,
        allowed="tail_tol must lie in [0, 1)",
    )
    if hvp not in HVP_MODES:
        raise checks.not_allowed("hvp", hvp, f"use one of {HVP_MODES}")
    if window not in WINDOWS:
        raise checks.not_allowed("window", window, f"use one of {WINDOWS}")


def correction_at(
    probe: Probe,
    optimizer: Optimizer,
    sequence: Sequence[int] | np.ndarray | Tensor,
    *,
    tail_tol: float = TAIL_TOL,
    hvp: str = "double_backward",
    window: str = "auto",
) -> Tensor:
    """``M^(n)`` of Eq. (9) at the probe's point for ``sequence`` (n = len(sequence) - 1),
    in ``parameters_to_vector`` order; arguments as :func:`memory_correction`."""
    check_correction_args(optimizer, tail_tol, hvp, window)
    sig = checks.sequence_array(sequence, probe.problem.num_batches)
    w = windows.window_of(optimizer, sig, tail_tol, hvp)
    if w is None:
        return torch.zeros_like(probe.theta)
    name = windows.choose(probe, optimizer, w) if window == "auto" else window
    why = windows.unavailable(name, probe, optimizer, w)
    if why is not None:
        raise checks.not_allowed("window", window, f"{why}; use window='auto'")
    # the memory plan, checked before any work: the (m, d) arrays of every path but online
    probe.require(
        None if name == "online" else optimizer,
        per_batch=windows.needs_per_batch(optimizer, hvp),
        hvp=hvp,
    )
    return probe.layout.to_standard(windows.STRATEGIES[name](probe, optimizer, w))


def memory_correction(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    optimizer: Optimizer,
    sequence: Sequence[int],
    *,
    tail_tol: float = TAIL_TOL,
    hvp: str = "double_backward",
    window: str = "auto",
    memory_budget: int | float | str | None = None,
    graph_batches: int | None = None,
) -> Tensor:
    """Eq. (9): ``M^(n)`` at the model's current parameters, n = len(sequence) - 1.

    ``sequence[j]`` is the index of the batch used at iteration j (any length: several
    epochs, repeated batches). Returns a flat ``(d,)`` tensor in
    ``parameters_to_vector(model.parameters())`` order, on the parameters' device and dtype.
    ``hvp`` picks how the Hessian-vector products are taken: ``"double_backward"`` (the
    default), one backward pass per momentum variable through the graph of the batch
    gradients, each batch holding its own copy of theta so that every ``H_i w_i`` comes out
    separately; or ``"vmap"``, one vmapped forward-over-reverse call over every (batch,
    variable) pair. ``window`` picks how the window of steps is evaluated (``"auto"``, or one
    of ``"linear"``, ``"fused"``, ``"scan"``, ``"online"``, ``"dense"``, ``"streamed"``:
    :mod:`noisemem.window`). ``memory_budget`` (bytes, a string such as ``"8GiB"``, or None
    for the device's free memory) and ``graph_batches`` (batches per graph, None to choose
    from the budget) set how the batch gradients' graph is held
    (:func:`noisemem.budget.plan_memory` says what they choose). Every argument is checked
    before any work starts.
    """
    check_correction_args(optimizer, tail_tol, hvp, window)
    parse_budget(memory_budget)
    problem = as_problem(model, loss_fn, batches)
    seq = checks.sequence_array(sequence, problem.num_batches)
    probe = Probe(problem, memory_budget=memory_budget, graph_batches=graph_batches)
    return correction_at(probe, optimizer, seq, tail_tol=tail_tol, hvp=hvp, window=window)

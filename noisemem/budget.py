"""How much memory Eq. (9) and the expectations may hold, and how a probe keeps within it.

What a :class:`~noisemem.probe.Probe` holds at its peak is

    graphs  : the autograd graph of the batch gradients it keeps at once (one batch's graph
              costs :attr:`~noisemem.problem.Problem.graph_bytes_per_batch`, the activations
              of a forward pass and of a backward pass with ``create_graph``),
    vectors : O(m d): the batch gradients ``g_i`` and the window's ``w_{l,i}`` (Eq. (9)),
    O(d)    : a few flat vectors.

Two modes (:class:`MemoryPlan`):

* ``"graph"``: one graph of every batch, built once and kept; every pass of Hessian-vector
  products is one backward pass through it (the fastest).
* ``"grouped"``: graphs of ``graph_batches`` batches at a time, built for a pass of products
  and dropped; each pass then costs one more forward and backward pass over the data (the
  batch gradients themselves are computed once, without a graph, and kept).

:func:`plan_memory` picks the mode from ``memory_budget``: the whole graph when it fits next
to the vectors, else as many batches per graph as fit, else a ``ValueError`` that names the
sizes. Where not even the O(m d) vectors fit, Eq. (9) has the window strategy ``"online"``
(:mod:`noisemem.window`), which keeps O(L d) and a graph of a few steps at a time, at the
price of a backward pass per step; the exact expectations need no O(m d) vectors at all.

``memory_budget`` is a number of bytes, a string such as ``"8GiB"`` or ``"512 MB"`` (units
B, kB/KiB, MB/MiB, GB/GiB, TB/TiB), or None: the memory the device has free now (CPU: the
kernel's ``MemAvailable``; CUDA: free device memory plus what torch's caching allocator
holds unused).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from noisemem import checks
from noisemem.optim import Optimizer, Source

if TYPE_CHECKING:
    from noisemem.problem import Problem

#: a pass of backward products holds about this many times the saved graph at its peak
#: (the graph, the backward's own temporaries, the forward of the next group: the peak
#: resident set above the data and the (m, d) arrays was 2.4-2.7 times the graphs' saved
#: bytes for AdamW and the exact E[M] on the CNN of ``benchmarks/bench_scale.py``, and for
#: heavy ball 3.8-4.2 (its peak rose to 93-101 MiB under a 96 MiB budget with 3.5 here)
PEAK_FACTOR = 4.5
#: flat d-vectors a correction holds besides its (m, d) arrays (states, sums, Phi's JVP)
FLAT_VECTORS = 16
MODES = ("graph", "grouped")

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_budget(value: object) -> int | None:
    """``memory_budget`` in bytes (None stays None: the device's free memory, read later)."""
    allowed = (
        'memory_budget must be a number of bytes > 0, a string such as "8GiB" or "512 MB" '
        "(B, kB, KiB, MB, MiB, GB, GiB, TB, TiB), or None for the device's free memory"
    )
    if value is None:
        return None
    if isinstance(value, str):
        match = _BUDGET.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise checks.not_allowed("memory_budget", value, allowed)
        number = float(match.group(1)) * _UNITS[unit]
    elif checks.is_real(value):
        number = float(value)  # type: ignore[arg-type]
    else:
        raise checks.not_allowed("memory_budget", value, allowed)
    if not math.isfinite(number) or number < 1:
        raise checks.not_allowed("memory_budget", value, allowed)
    return int(number)


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: CPU ``MemAvailable`` (``/proc/meminfo``, else the free
    physical pages), CUDA free memory plus the caching allocator's reserved-but-unused."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 62


def vector_arrays(optimizer: Optimizer | None, hvp: str = "double_backward") -> int:
    """How many (m, d) arrays Eq. (9) holds for ``optimizer`` besides the graphs: the batch
    gradients, one ``w_{l,i}`` per momentum variable with memory and a gradient source, and
    the per-batch ``H_i w_i`` of a squared-gradient source (Adam's second moment); with
    ``hvp="vmap"`` the vectors and products of every (variable, batch) pair instead. None
    (the expectations and full-batch predictions): none."""
    if optimizer is None:
        return 0
    memory = [v for v in optimizer.variables if v.beta > 0.0]
    grads = sum(1 for v in memory if v.source.uses_grad)
    if hvp == "vmap":
        return 1 + 3 * grads
    squares = sum(1 for v in memory if v.source is Source.GRAD_SQ)
    return 1 + grads + squares


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryPlan:
    """How a probe holds the graph of the batch gradients (module docstring).

    ``mode``: ``"graph"`` (one graph of all ``num_batches`` batches, kept) or ``"grouped"``
    (graphs of ``graph_batches`` batches, rebuilt for every pass of products).
    ``budget``: the bytes allowed; ``graph_bytes_per_batch``: one batch's graph as measured
    (None when the user set ``graph_batches`` and nothing was measured); ``vector_bytes``:
    the O(m d) arrays reserved (:func:`vector_arrays`); ``estimate``: the peak expected,
    graphs (times ``PEAK_FACTOR``) plus vectors. ``chosen_by``: ``"budget"`` or ``"user"``.
    ``points``: how many points' graphs are held together (1 for a probe;
    :func:`ensemble_plan` for an :class:`~noisemem.ensemble.EnsembleProbe`), each of them
    with the graphs and vectors above.
    """

    mode: str
    graph_batches: int
    num_batches: int
    budget: int
    graph_bytes_per_batch: int | None
    vector_bytes: int
    estimate: int | None
    chosen_by: str
    points: int = 1  # the points whose graphs are held at once (an ensemble: ensemble_plan)

    def as_dict(self) -> dict[str, int | str | None]:
        """The plan as plain values (for a study's store)."""
        return asdict(self)

    def describe(self) -> str:
        per = (
            "?" if self.graph_bytes_per_batch is None else format_bytes(self.graph_bytes_per_batch)
        )
        return (
            f"{self.mode}: graphs of {self.graph_batches} of {self.num_batches} batches "
            f"({per} each), vectors {format_bytes(self.vector_bytes)}, "
            f"budget {format_bytes(self.budget)}"
        )


def plan_memory(
    problem: Problem,
    optimizer: Optimizer | None = None,
    *,
    memory_budget: int | float | str | None = None,
    graph_batches: int | None = None,
    hvp: str = "double_backward",
) -> MemoryPlan:
    """The :class:`MemoryPlan` for Eq. (9) with ``optimizer`` on ``problem`` (None: for the
    exact expectations and full-batch predictions, which hold no (m, d) arrays): what a
    :class:`~noisemem.probe.Probe` with the same arguments does, for a study to record.

    ``graph_batches`` (an int in [1, m]) fixes the batches per graph; otherwise the whole
    graph is kept when ``PEAK_FACTOR`` times it plus the vectors fit in ``memory_budget``,
    else the largest group of batches that fits. Measures one batch's graph once per
    problem (:attr:`~noisemem.problem.Problem.graph_bytes_per_batch`) unless
    ``graph_batches`` is given. ``hvp`` as in :func:`~noisemem.correction.memory_correction`
    (the vmapped products hold more (m, d) arrays). Raises a ``ValueError`` naming the sizes
    when not even one batch's graph fits next to the vectors.
    """
    return plan_for(
        problem,
        vector_arrays(optimizer, hvp),
        parse_budget(memory_budget),
        graph_batches,
        optimizer.name if optimizer is not None else None,
    )


def plan_for(
    problem: Problem,
    arrays: int,
    budget: int | None,
    graph_batches: int | None,
    name: str | None = None,
) -> MemoryPlan:
    """:func:`plan_memory` with ``arrays`` (m, d) arrays reserved and ``budget`` in bytes
    (None: the device's free memory); ``name`` names their user in the error."""
    m = problem.num_batches
    d = problem.theta.numel()
    itemsize = problem.theta.element_size()
    if budget is None:
        budget = available_memory(problem.theta.device)
    vectors = arrays * m * d * itemsize
    flat = FLAT_VECTORS * d * itemsize
    if graph_batches is not None:
        q = checks.integer(
            "graph_batches",
            graph_batches,
            1,
            m,
            allowed=f"graph_batches must be an int in [1, {m}] (the batches per graph) or None",
        )
        mode = "graph" if q == m else "grouped"
        return MemoryPlan(mode, q, m, budget, None, vectors, None, "user")
    what = (
        f"the {arrays} (m, d) arrays of Eq. (9){f' for {name}' if name else ''} "
        f"(m={m}, d={d}, {problem.theta.dtype}: {format_bytes(vectors)})"
    )
    hint = (
        "use window='online' (it keeps O(L d) and the graph of a few steps at a time), "
        "fewer batches, or a larger memory_budget"
    )
    if vectors + flat > budget:  # said before anything is measured
        raise ValueError(
            f"memory_budget={format_bytes(budget)} cannot hold {what} and {FLAT_VECTORS} "
            f"flat d-vectors ({format_bytes(flat)}); {hint}"
        )
    per = problem.graph_bytes_per_batch
    room = budget - vectors - flat
    one = PEAK_FACTOR * per
    if room < one:
        held = what if arrays else "the flat vectors"
        raise ValueError(
            f"memory_budget={format_bytes(budget)} cannot hold {held} plus one batch's "
            f"gradient graph ({format_bytes(per)}, x{PEAK_FACTOR:g} at its peak); "
            + (hint if arrays else "use smaller batches or a larger memory_budget")
        )
    q = min(m, int(room // one))
    mode = "graph" if q == m else "grouped"
    estimate = int(one * q) + vectors + flat
    return MemoryPlan(mode, q, m, budget, per, vectors, estimate, "budget")


def ensemble_plan(
    problem: Problem, optimizer: Optimizer | None, budget: int | None, points: int
) -> MemoryPlan | None:
    """How many of ``points`` points an :class:`~noisemem.ensemble.EnsembleProbe` may hold
    at once within ``budget`` bytes (None: the device's free memory): each point's graph of
    every batch (``PEAK_FACTOR`` times) and its (m, d) arrays, those of Eq. (9) for
    ``optimizer`` (:func:`vector_arrays`) plus the cotangent of a pass and the per-copy
    products of a squared-gradient source. None when not even one point's fits (then one
    :class:`~noisemem.probe.Probe` per point, which may group batches)."""
    m = problem.num_batches
    d = problem.theta.numel()
    itemsize = problem.theta.element_size()
    if budget is None:
        budget = available_memory(problem.theta.device)
    vectors = (vector_arrays(optimizer) + 2) * m * d * itemsize
    per = problem.graph_bytes_per_batch
    one = PEAK_FACTOR * per * m + vectors
    room = budget - FLAT_VECTORS * d * itemsize
    k = min(points, int(room // one)) if room > 0 else 0
    if k < 1:
        return None
    estimate = int(k * one) + FLAT_VECTORS * d * itemsize
    return MemoryPlan("graph", m, m, budget, per, k * vectors, estimate, "budget", k)

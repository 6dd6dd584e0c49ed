"""``noisemem validate``: a spec's expanded grid, its runs and a cost estimate, without Ray.

The estimate counts full-data gradients (one forward and backward of the mean loss over
every sample the batches hold) and turns them into CPU seconds with one such gradient timed
here, on one thread. Per run: training costs ``epochs`` gradients (m batch gradients each
of b samples); each correction of Eq. (9) about 6 gradients for optimizers linear in the
gradients and 10 for the others, and each probe point's batch-gradient graph about 2 (the
engine's benchmarks, ``benchmarks/bench_engine.py``). It is an order of magnitude, not a
promise: the Ray start (seconds), GPUs and the memoryless trajectories are not in it.
"""

from __future__ import annotations

import time

import torch

from noisemem.studies.models import initial_parameters, spec_model
from noisemem.studies.plan import Chunks
from noisemem.studies.prepare import load_data
from noisemem.studies.spec import Config, StudySpec

#: gradients per correction (linear optimizers, others) and per probe point's graph
CORRECTION_COST = (6.0, 10.0)
PROBE_COST = 2.0


def gradients(spec: StudySpec, config: Config) -> float:
    """Full-data gradients one run of ``config`` costs (module notes)."""
    probe_steps = config.epochs  # corrections at the end of every epoch
    per_correction = CORRECTION_COST[0 if config.optimizer.linear else 1]
    fixed = int(spec.probes.init) + len(spec.probes.reference_steps)
    cost = float(config.epochs)  # training
    cost += fixed * probe_steps * per_correction  # each run's M at the fixed points
    if spec.probes.epoch_end:
        cost += probe_steps * (PROBE_COST + per_correction)  # at its own parameters
    return cost


def time_gradient(spec: StudySpec, x: torch.Tensor, y: torch.Tensor, info: object) -> float:
    """Seconds of one full-data gradient of the spec's model here (one thread, median of 3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dtype = torch.float64 if spec.runtime.dtype == "float64" else torch.float32
        model = initial_parameters(spec_model(spec, info), spec.seed[0]).to(dtype)  # type: ignore[arg-type]
        x = x.to(dtype)
        times = []
        for _ in range(4):  # the first is a warm-up
            t0 = time.perf_counter()
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[1]
    finally:
        torch.set_num_threads(threads)


def describe(spec: StudySpec) -> str:
    """The text ``noisemem validate`` prints."""
    x, y, info = load_data(spec)
    chunks = Chunks.of(spec)
    unit = time_gradient(spec, x, y, info)
    P = spec.training.permutations
    lines = [
        f"study {spec.name}: {len(spec.configs)} configs x {P} permutations = "
        f"{len(spec.configs) * P} runs, {len(spec.configs) * chunks.count} chunks of up to "
        f"{chunks.size}",
        f"data: {info.source}, {info.num_samples} samples, {info.num_features} features, "
        f"{info.num_classes} classes; output: {spec.output}",
        f"swept: {', '.join(spec.swept) or 'nothing'}; one full-data gradient here: "
        f"{unit * 1e3:.2f} ms (one thread)",
        "",
    ]
    w = max(len(c.id) for c in spec.configs)
    lines.append(
        f"{'config':<{w}} {'b':>5} {'m':>5} {'steps':>6} {'gradients/run':>14} {'CPU s':>9}"
    )
    total = 0.0
    for c in spec.configs:
        m = info.num_samples // c.batch_size
        g = gradients(spec, c)
        seconds = g * unit * P
        total += seconds
        lines.append(
            f"{c.id:<{w}} {c.batch_size:>5} {m:>5} {c.epochs * m:>6} {g:>14.0f} {seconds:>9.1f}"
        )
    lines += [
        "",
        f"estimated compute: {total:.0f} CPU-seconds ({total / 3600:.2f} CPU-hours) on one "
        "thread, before Ray's start and without the memoryless trajectories",
    ]
    if spec.record.memoryless:
        lines.append("record.memoryless: each run adds its two memoryless trajectories")
    return "\n".join(lines)

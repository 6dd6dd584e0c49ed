"""``noisemem validate``: a spec's expanded grid, its runs and a cost estimate, without Ray.

The estimate counts full-data gradients (one forward and backward of the mean loss over
every sample the batches hold; per run :func:`noisemem.studies.plan.run_work`) and turns
them into CPU seconds with one such gradient timed here, on one thread. It is an order of
magnitude, not a promise: the Ray start (seconds), GPUs and the memoryless trajectories
are not in it.
"""

from __future__ import annotations

import time

import torch

from noisemem.studies.models import initial_parameters, spec_model
from noisemem.studies.plan import Chunks, run_work
from noisemem.studies.prepare import load_data
from noisemem.studies.spec import Config, StudySpec


def gradients(spec: StudySpec, config: Config) -> float:
    """Full-data gradients one run of ``config`` costs."""
    fixed = int(spec.probes.init) + len(spec.probes.reference_steps)
    return run_work(config.epochs, config.optimizer.linear, fixed, spec.probes.epoch_end)


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

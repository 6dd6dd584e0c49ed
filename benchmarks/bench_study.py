"""Study throughput, as ratios measured in one run (CPU; GELU MLP 64-128-10 on digits).

1. Training one chunk (32 permutations, the spec's chunk_size) as one vmapped ensemble
   (noisemem.studies.chunk.train_ensemble) against the same permutations trained one by one with
   torch.optim.SGD(momentum) (target >= 3x).
2. The whole study on a local Ray cluster (1 actor) against the same chunks and predictions
   computed in this process without Ray (target: Ray overhead <= 15%).
3. The study with 2 actors against 1 actor on 2 CPUs (target >= 1.6x).
4. CPU seconds per permutation of the study's work (every chunk and the predictions, in this
   process) against a hand-written loop: torch.optim.SGD(momentum) over the same batch order
   calling noisemem.memory_correction at the same probes (M^(n) at initialisation and at the
   run's own parameters after each epoch), on ``--hand`` permutations (target >= 4x); and
   the study with its runs' probes taken together (``runtime.batched_probes = "on"``, what
   CUDA does by default).

Parts 2 and 3 are repeated ``--rounds`` times (in-process, Ray 1 actor, Ray 2 actors in each
round) and print medians with their ranges: single runs on these machines vary by 20%.

Usage: python benchmarks/bench_study.py [--permutations 256] [--rounds 3] [--hand 8] [--no-ray]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import shutil
import statistics
import tempfile
import time

import ray
import torch

from noisemem import memory_correction
from noisemem.expectation import SampledRun
from noisemem.optim import HeavyBall
from noisemem.studies.chunk import Context, predictions, run_chunk, train_ensemble
from noisemem.studies.data import prepare
from noisemem.studies.driver import launch
from noisemem.studies.plan import Chunks
from noisemem.studies.spec import StudySpec
from noisemem.studies.store import Store
from noisemem.system import keep_freed_memory

SPEC = {
    "name": "bench",
    "data": {"source": "digits"},
    "model": {"kind": "gelu_mlp", "hidden": 128},
    "optimizers": [{"kind": "HeavyBall", "lr": 0.1, "beta": 0.9}],
    "training": {"batch_size": 32, "epochs": 2, "permutations": 256, "chunk_size": 32},
    "probes": {"init": True, "epoch_end": True},
    "record": {"steps": True},
    "runtime": {"cpus_per_actor": 1},
}


def torch_one_by_one(ctx: Context, runs: list, lr: float, beta: float) -> float:
    t0 = time.perf_counter()
    for run in runs:
        model = copy.deepcopy(ctx.model)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta)
        for i in run.sequence:
            x, y = ctx.problem.X[i], ctx.problem.Y[i]
            opt.zero_grad()
            ctx.problem.loss_fn(model(x), y).backward()
            opt.step()
    return time.perf_counter() - t0


def hand_loop(
    ctx: Context, run: SampledRun, optimizer: HeavyBall, probe_steps: list[int], own: bool
) -> None:
    """One permutation as a user would write it: torch.optim training, and Eq. (9) by
    memory_correction at initialisation and (``own``) at the run's own parameters after
    each epoch."""
    initial = copy.deepcopy(ctx.model)
    model = copy.deepcopy(ctx.model)
    sgd = torch.optim.SGD(model.parameters(), lr=optimizer.lr, momentum=optimizer.beta)
    batches = [(ctx.problem.X[i], ctx.problem.Y[i]) for i in range(ctx.problem.num_batches)]
    sequence = [int(i) for i in run.sequence]
    for n, i in enumerate(sequence):
        x, y = batches[i]
        sgd.zero_grad()
        ctx.problem.loss_fn(model(x), y).backward()
        sgd.step()
        if n in probe_steps:
            for at in (initial, model) if own else (initial,):
                memory_correction(at, ctx.problem.loss_fn, batches, optimizer, sequence[: n + 1])


def cpu_per_permutation(ctx: Context, spec: StudySpec, hand: int) -> tuple[float, float]:
    """(study, hand loop) CPU seconds per permutation, in this process, at the spec's
    probes (init, and the epoch ends if the spec has them)."""
    config = spec.configs[0]
    ctx = dataclasses.replace(ctx, spec=spec, _references={}, _last_probe=None, _last_plan=None)
    t0 = time.process_time()
    for chunk in range(Chunks.of(spec).count):
        run_chunk(ctx, config, chunk)
    predictions(ctx, config)
    study = (time.process_time() - t0) / spec.training.permutations
    steps = ctx.probe_steps()
    t0 = time.process_time()
    for p in range(hand):
        run = ctx.run(p)
        hand_loop(ctx, run, config.optimizer, steps, spec.probes.epoch_end)  # type: ignore[arg-type]
    return study, (time.process_time() - t0) / hand


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--permutations", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hand", type=int, default=8, help="permutations of the hand loop")
    parser.add_argument("--no-ray", action="store_true", help="parts 1 and 4 only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as the study actors do (see noisemem.system)
    raw = copy.deepcopy(SPEC)
    raw["training"]["permutations"] = args.permutations
    tmp = tempfile.mkdtemp(prefix="nmbench")
    raw["output"] = f"{tmp}/inproc"
    spec = StudySpec.from_dict(raw)
    x, y, info = prepare("digits")
    ctx = Context.build(spec, x, y, info)
    opt = spec.configs[0].optimizer

    # 1. vmapped ensemble vs torch.optim one by one (same orders), paired repeats
    runs = [ctx.run(p) for p in Chunks.of(spec).indices(0)]
    train_ensemble(ctx, opt, runs[:2])  # warm-up
    ratios = []
    for _ in range(5):
        t0 = time.perf_counter()
        train_ensemble(ctx, opt, runs)
        t_vmap = time.perf_counter() - t0
        t_loop = torch_one_by_one(ctx, runs, opt.lr, opt.beta)
        ratios.append(t_loop / t_vmap)
    print(
        f"{len(runs)} permutations x {ctx.setting.epochs} epochs: "
        "torch.optim one by one / vmapped ensemble = "
        f"{statistics.median(ratios):.2f}x (median of 5 pairs; last {t_loop:.2f} s vs "
        f"{t_vmap:.2f} s)   target >= 3"
    )

    # 4. the study's CPU per permutation against the hand-written loop, paired rounds: at
    # the spec's probes (init and every epoch end: a graph at each run's own parameters,
    # which nothing can share), and at init only (the probe's graph shared by every run)
    fixed_only = dataclasses.replace(spec, probes=dataclasses.replace(spec.probes, epoch_end=False))
    together = dataclasses.replace(
        spec, runtime=dataclasses.replace(spec.runtime, batched_probes="on")
    )
    variants = (
        ("init and each epoch end", spec),
        ("init only", fixed_only),
        (
            "init and each epoch end, runs' probes together (batched_probes, CUDA's default)",
            together,
        ),
    )
    for label, variant in variants:
        cpu = [cpu_per_permutation(ctx, variant, args.hand) for _ in range(max(args.rounds, 1))]
        gains = [hand / study for study, hand in cpu]
        print(
            f"CPU per permutation ({ctx.setting.epochs} epochs, probes at {label}): study "
            f"{statistics.median(c[0] for c in cpu) * 1e3:.0f} ms, hand-written torch.optim + "
            f"memory_correction loop {statistics.median(c[1] for c in cpu) * 1e3:.0f} ms -> "
            f"{statistics.median(gains):.2f}x (median of {len(gains)} rounds, range "
            f"{min(gains):.2f}-{max(gains):.2f})   target >= 4"
        )
    if args.no_ray:
        return

    # 2. and 3., repeated (--rounds) because these machines are noisy: each round times the
    # same work without Ray, in this process (1 thread, like a 1-CPU actor: load the data,
    # build the context, run every chunk, compute the predictions, write every part), then
    # on Ray with 1 actor and with 2; the medians over rounds are printed with their ranges
    config = spec.configs[0]

    def in_process(output: str) -> float:
        t0 = time.perf_counter()
        x, y, info = prepare("digits")
        ctx = Context.build(spec, x, y, info)
        store = Store(output)
        for chunk in range(Chunks.of(spec).count):
            tables = run_chunk(ctx, config, chunk)
            for table in ("steps", "corrections", "moments", "runs"):
                store.write_part(table, config.id, chunk, tables[table])
        store.write_part("predictions", config.id, None, predictions(ctx, config))
        return time.perf_counter() - t0

    inproc: list[float] = []
    ray_times: dict[int, list[float]] = {1: [], 2: []}
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        for r in range(args.rounds):
            inproc.append(in_process(f"{tmp}/inproc{r}"))
            for actors in (1, 2):
                raw["output"] = f"{tmp}/ray{actors}-{r}"
                t0 = time.perf_counter()
                launch(StudySpec.from_dict(raw), actors=actors, log=io.StringIO()).wait()
                ray_times[actors].append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    def summary(values: list[float], fmt: str) -> str:
        med = statistics.median(values)
        return f"{med:{fmt}} (range {min(values):{fmt}}-{max(values):{fmt}})"

    overheads = [100 * (t1 / t0 - 1) for t0, t1 in zip(inproc, ray_times[1], strict=True)]
    seconds = [t1 - t0 for t0, t1 in zip(inproc, ray_times[1], strict=True)]
    speedups = [t1 / t2 for t1, t2 in zip(ray_times[1], ray_times[2], strict=True)]
    print(
        f"{args.permutations} permutations, {Chunks.of(spec).count} chunks, {args.rounds} rounds: "
        f"in-process {summary(inproc, '.1f')} s, Ray 1 actor {summary(ray_times[1], '.1f')} s"
    )
    print(
        f"Ray overhead {summary(overheads, '.1f')} %, i.e. {summary(seconds, '.1f')} s: mostly "
        "one actor's start, a fixed cost, so the ratio falls as the study grows   target <= 15%"
    )
    print(
        f"Ray 2 actors {summary(ray_times[2], '.1f')} s vs 1 actor -> "
        f"{summary(speedups, '.2f')}x   target >= 1.6"
    )


if __name__ == "__main__":
    main()

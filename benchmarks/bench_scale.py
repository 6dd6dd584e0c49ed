"""The engine at scale: peak memory and time in gradients as the number of batches grows.

Two parts, each configuration in a fresh Python process (nothing set first: the engine makes
its own allocator choice, :mod:`noisemem.system`):

1. A CIFAR-style CNN (a small ResNet-style network without batch norm: a stride-2 stem and
   three residual blocks of two 3x3 convolutions, 8-16-32 channels, GELU, global average
   pooling; d below) on synthetic 3x32x32 inputs, 10 classes, in 4, 16 and 64 batches of 32,
   for memory_correction with heavy ball and AdamW one epoch deep and the exact heavy-ball
   E[M], with a fixed ``memory_budget`` (``--budget``): the plan keeps the whole graph
   while it fits and graphs of a group of batches beyond (the table says which).
   Targets: peak memory flat in the number of batches beyond the O(m d) arrays (the
   "graphs" column: peak minus those arrays) and within the budget; heavy ball (M and
   E[M]) <= 8 gradients, AdamW <= 14.
2. The digits MLP (GELU 64-128-10, float32) in 14, 56, 224 and 449 batches (batch sizes
   128, 32, 8, 4), one epoch deep. Targets at every m: heavy ball <= 6, AdamW <= 10,
   exact E[M] <= 8.

Peak memory: the process's resident set (``VmHWM``, reset with ``/proc/self/clear_refs``
just before the call) minus its resident set just before, in the first call of the process
(torch's CPU allocator keeps no statistics and tracemalloc does not see torch's memory). Time:
the median over back-to-back pairs of (call, one full-data gradient) after a warm-up, with
the pairs' interquartile range; one torch thread.

Usage: python benchmarks/bench_scale.py [--budget 96MiB] [--repeats 5] [--part cnn|digits]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with GELU and a skip connection (1x1 where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip: nn.Module = (
            nn.Conv2d(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(nn.functional.gelu(self.conv1(x)))
        return nn.functional.gelu(h + self.skip(x))


def small_resnet(channels: tuple[int, int, int] = (8, 16, 32), classes: int = 10) -> nn.Module:
    """Stem (3x3, stride 2) - three residual blocks - global average pool - linear."""
    c1, c2, c3 = channels
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, 2, 1),
        nn.GELU(),
        ResidualBlock(c1, c1, 1),
        ResidualBlock(c1, c2, 2),
        ResidualBlock(c2, c3, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c3, classes),
    )


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def paired(
    fn: Callable[[], object], unit: Callable[[], object], repeats: int
) -> tuple[float, float, float]:
    fn()
    unit()
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        unit()
        u = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn()
        ratios.append((time.perf_counter() - t0) / u)
    ratios.sort()
    q1, q3 = statistics.quantiles(ratios, n=4)[::2] if len(ratios) >= 4 else (ratios[0], ratios[-1])
    return statistics.median(ratios), q1, q3


def child(cfg: dict) -> None:
    """One configuration, in this fresh process: peak memory of the first call, then time."""
    torch.set_num_threads(1)
    from noisemem import expected_correction, memory_correction
    from noisemem.budget import plan_memory, vector_arrays
    from noisemem.optim import AdamW, HeavyBall
    from noisemem.problem import Problem

    opt = {"heavy_ball": HeavyBall(0.05, 0.9), "adamw": AdamW(1e-3, 0.9, 0.999, 1e-8, 0.01)}
    optimizer = opt[cfg["optimizer"]]
    loss_fn = nn.functional.cross_entropy
    torch.manual_seed(0)
    if cfg["model"] == "cnn":
        model = small_resnet()
        gen = torch.Generator().manual_seed(1)
        m, b = cfg["m"], 32
        x = torch.randn(m * b, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (m * b,), generator=gen)
    else:
        from noisemem.studies.data import digits
        from noisemem.studies.models import gelu_mlp

        model = gelu_mlp()
        x, y = digits(torch.float32)
        b = cfg["batch_size"]
        m = x.shape[0] // b
        x, y = x[: m * b], y[: m * b]
    batches = [(x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]) for i in range(m)]
    problem = Problem(model, loss_fn, batches)
    seq = np.random.default_rng(0).permutation(m)
    budget = cfg.get("budget")
    if cfg["kind"] == "exact":

        def call() -> object:
            return expected_correction(model, loss_fn, problem, optimizer, memory_budget=budget)

    else:

        def call() -> object:
            return memory_correction(model, loss_fn, problem, optimizer, seq, memory_budget=budget)

    # warm-up on two batches: imports, the fused kernel's compilation, torch's first calls
    small = Problem(model, loss_fn, batches[:2])
    memory_correction(model, loss_fn, small, optimizer, [0, 1, 0])
    plan = plan_memory(problem, None if cfg["kind"] == "exact" else optimizer, memory_budget=budget)
    before = rss_kib("VmRSS")
    ok = reset_peak()
    call()
    peak = rss_kib("VmHWM") - before if ok else None

    def full_gradient() -> None:
        model.zero_grad()
        loss_fn(model(x), y).backward()

    ratio, q1, q3 = paired(call, full_gradient, cfg["repeats"])
    d = problem.theta.numel()
    arrays = 0 if cfg["kind"] == "exact" else vector_arrays(optimizer)
    print(json.dumps({
        "m": m, "d": d, "peak_mib": None if peak is None else peak / 1024,
        "vectors_mib": arrays * m * d * 4 / 2**20, "plan": plan.mode,
        "graph_batches": plan.graph_batches, "graph_mib": plan.graph_bytes_per_batch / 2**20,
        "ratio": ratio, "q1": q1, "q3": q3,
    }))  # fmt: skip


def run(cfg: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(cfg)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(out.stdout + out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


KINDS = [("heavy_ball", "M"), ("adamw", "M"), ("heavy_ball", "exact")]
LABEL = {("heavy_ball", "M"): "heavy ball M", ("adamw", "M"): "AdamW M",
         ("heavy_ball", "exact"): "exact HB E[M]"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", default="96MiB", help="memory_budget for the CNN part")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=["cnn", "digits", "both"], default="both")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    print("each row: a fresh process, 1 torch thread, float32; time in full-data gradients,")
    print("median of back-to-back pairs (IQR); peak: resident set above the model and data")
    if args.part in ("cnn", "both"):
        print(f"\nCIFAR-style CNN, 3x32x32 synthetic, batches of 32, memory_budget={args.budget}")
        head = f"{'':16s}{'m':>4s} {'plan':>14s} {'peak MiB':>9s} {'(m,d) MiB':>10s}"
        print(head + f" {'graphs MiB':>11s} {'gradients':>18s}   target")
        for opt, kind in KINDS:
            for m in (4, 16, 64):
                cfg = {"model": "cnn", "m": m, "optimizer": opt, "kind": kind,
                       "budget": args.budget, "repeats": args.repeats}  # fmt: skip
                r = run(cfg)
                plan = f"{r['plan']}/{r['graph_batches']}"
                graphs = r["peak_mib"] - r["vectors_mib"] if r["peak_mib"] is not None else None
                target = {"heavy_ball": "<= 8", "adamw": "<= 14"}[opt]
                print(f"{LABEL[opt, kind]:16s}{m:4d} {plan:>14s} {r['peak_mib']:9.1f} "
                      f"{r['vectors_mib']:10.1f} {graphs:11.1f} {r['ratio']:7.2f}x "
                      f"({r['q1']:.2f}-{r['q3']:.2f})   {target}")  # fmt: skip
        print(
            f"(d = {r['d']}; one batch's graph {r['graph_mib']:.1f} MiB as the engine measures it)"
        )
    if args.part in ("digits", "both"):
        print("\ndigits MLP d = 9610, one epoch deep, default memory_budget (free RAM)")
        print(f"{'':16s}{'m':>4s} {'peak MiB':>9s} {'gradients':>18s}   target")
        for opt, kind in KINDS:
            for b in (128, 32, 8, 4):
                cfg = {"model": "digits", "batch_size": b, "optimizer": opt, "kind": kind,
                       "repeats": 2 * args.repeats + 1}  # fmt: skip
                r = run(cfg)
                target = {("heavy_ball", "M"): "<= 6", ("adamw", "M"): "<= 10",
                          ("heavy_ball", "exact"): "<= 8"}[opt, kind]  # fmt: skip
                print(
                    f"{LABEL[opt, kind]:16s}{r['m']:4d} {r['peak_mib']:9.1f} "
                    f"{r['ratio']:7.2f}x ({r['q1']:.2f}-{r['q3']:.2f})   {target}"
                )


if __name__ == "__main__":
    main()

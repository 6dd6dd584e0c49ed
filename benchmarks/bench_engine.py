"""Engine cost as ratios to one full-data gradient, measured in one run.

GELU MLP 64-128-10 on the 1797 digits in batches of 32 (56 batches), float32. The unit is one
full-data gradient (forward + backward of the mean loss over all 1797 samples, plain
autograd). Each repeat times the unit and then the measured call back to back; the ratio
printed is the median over repeats of those paired ratios (robust to a noisy machine).

Targets: memory_correction for heavy ball 1 and 10 epochs deep <= 6, AdamW 10 epochs deep
<= 15; the literal Eq. (9) loop (O(n) HVPs + O(n^2) sums) >= 20x slower than the engine; the
exact heavy-ball expectation <= 6. Rows marked "info" break the costs down (the torch window
without the fused CPU kernel, the batch gradients with their graph, one backward HVP pass).

Usage: python benchmarks/bench_engine.py [--device cuda] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from noisemem import expected_correction, memory_correction
from noisemem.optim import AdamW, HeavyBall
from noisemem.probe import Probe
from noisemem.problem import Problem
from noisemem.studies.data import digits, split_batches
from noisemem.studies.models import gelu_mlp
from noisemem.system import keep_freed_memory


def once(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def paired_ratio(
    fn: Callable[[], object], unit: Callable[[], object], repeats: int, device: str
) -> tuple[float, float, str]:
    """Median of t(fn)/t(unit) over back-to-back pairs, the median t(fn) in seconds, and the
    pairs' interquartile range of the ratio (how noisy the machine was)."""
    fn()  # warm-up
    unit()
    ratios, times = [], []
    for _ in range(repeats):
        u = once(unit, device)
        t = once(fn, device)
        ratios.append(t / u)
        times.append(t)
    spread = ""
    if len(ratios) >= 4:
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        spread = f"{q1:.2f}-{q3:.2f}"
    return statistics.median(ratios), statistics.median(times), spread


def literal_eq9_heavy_ball(problem: Problem, opt: HeavyBall, seq: list[int]) -> torch.Tensor:
    """Eq. (9) as written: per k, u_k = sum_{s=n-k}^{n-1} F^(s) (F^(s) summed from its own
    history, O(n^2) sums) and one HVP beta^k H_{sigma(n-k)} u_k (O(n) HVPs)."""
    theta = problem.theta
    n = len(seq) - 1
    g = problem.batch_grads(theta)
    F = []
    for s in range(n):
        f = torch.zeros_like(theta)
        for j in range(s + 1):
            f = f + opt.beta ** (s - j) * g[seq[j]]
        F.append(f)
    M = torch.zeros_like(theta)
    for k in range(1, n + 1):
        u = torch.zeros_like(theta)
        for s in range(n - k, n):
            u = u + F[s]
        i = torch.tensor([seq[n - k]], device=theta.device)
        M = M + opt.beta**k * problem.batch_hvps(theta, i, u[None])[0]
    return opt.lr * M


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    dev, rep = args.device, args.repeats
    keep_freed_memory()  # as the study actors do (see noisemem.system)

    torch.manual_seed(0)
    x, y = digits(torch.float32)
    x, y = x.to(dev), y.to(dev)
    batches = split_batches(x, y, 32)
    model = gelu_mlp().to(dev)
    loss_fn = torch.nn.functional.cross_entropy
    problem = Problem(model, loss_fn, batches)
    m = len(batches)
    rng = np.random.default_rng(0)
    seq10 = np.concatenate([rng.permutation(m) for _ in range(10)]).tolist()
    seq1 = seq10[:m]

    def full_gradient() -> None:
        model.zero_grad()
        loss_fn(model(x), y).backward()

    hb, adamw = HeavyBall(0.1, 0.9), AdamW(1e-3, 0.9, 0.999, 1e-8, 0.01)
    rows: list[tuple[str, float, str, str]] = []
    base = paired_ratio(full_gradient, full_gradient, rep, dev)[1]

    def add(name: str, fn: Callable[[], object], target: str, repeats: int = rep) -> float:
        ratio, t, spread = paired_ratio(fn, full_gradient, repeats, dev)
        rows.append((name, ratio, spread, target))
        return t

    add(
        "memory_correction heavy ball, 1 epoch deep (n=55)",
        lambda: memory_correction(model, loss_fn, problem, hb, seq1),
        "<= 6",
    )
    t_hb10 = add(
        "memory_correction heavy ball, 10 epochs deep (n=559)",
        lambda: memory_correction(model, loss_fn, problem, hb, seq10),
        "<= 6",
    )
    add(
        "  same, hvp='vmap' (one vmapped jvp(grad) per batch)",
        lambda: memory_correction(model, loss_fn, problem, hb, seq10, hvp="vmap"),
        "info",
    )
    add(
        "memory_correction AdamW, 10 epochs deep (n=559)",
        lambda: memory_correction(model, loss_fn, problem, adamw, seq10),
        "<= 15",
    )
    if dev == "cpu":
        add(
            "  same, window in torch (no fused CPU kernel)",
            lambda: memory_correction(model, loss_fn, problem, adamw, seq10, window="dense"),
            "info",
        )
    t_lit = add(
        "literal Eq. (9) loop, heavy ball, 10 epochs deep",
        lambda: literal_eq9_heavy_ball(problem, hb, seq10),
        "baseline",
        repeats=1,
    )
    add(
        "exact E[M] heavy ball, 10 epochs",
        lambda: expected_correction(model, loss_fn, problem, hb, epochs=10),
        "<= 6",
    )

    # what the exact expectation is made of: g, H g and Cov need the batch gradients with
    # their graph and two backward passes through it (one per Hessian-vector product)
    add(
        "  batch gradients with their graph, g (Probe.full_grad)",
        lambda: Probe(problem).full_grad(),
        "info",
    )
    probe = Probe(problem)
    g = probe.full_grad()
    add("  one backward pass: H v (Probe.full_hvp)", lambda: probe.full_hvp(g), "info")

    a = memory_correction(model, loss_fn, problem, hb, seq10)
    b = literal_eq9_heavy_ball(problem, hb, seq10)
    rel = float((a - b).norm() / b.norm())
    print(f"device {dev}, float32, d = {problem.theta.numel()}, {m} batches of 32")
    print(f"one full-data gradient: {base * 1e3:.2f} ms (the unit below)")
    print(f"{'':58s} {'median':>9s}  {'pairs IQR':>11s}")
    for name, ratio, spread, target in rows:
        print(f"{name:58s} {ratio:9.2f}x {spread:>11s}   target {target}")
    print(f"literal loop / engine (10 epochs, heavy ball): {t_lit / t_hb10:.1f}x   target >= 20")
    print(
        "(each ratio: median of back-to-back pairs, with their interquartile range; "
        "the literal loop: 1 pair)"
    )
    print(f"engine vs literal loop, relative difference: {rel:.2e} (float32)")


if __name__ == "__main__":
    main()

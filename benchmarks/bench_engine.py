"""Engine cost as ratios to one full-data gradient, measured as a user calls it.

GELU MLP 64-128-10 on the 1797 digits in batches of 32 (56 batches), float32. The unit is one
full-data gradient (forward + backward of the mean loss over all 1797 samples, plain
autograd). Each repeat times the unit and then the measured call back to back; the ratio
printed is the median over repeats of those paired ratios, with their interquartile range
(robust to a noisy machine).

As a user calls it: every column is a fresh Python process that imports noisemem and calls
it, with no process-wide setting made first. The engine makes its own allocator choice on
its first computation (:mod:`noisemem.system`); the second column turns it off
(``NOISEMEM_KEEP_FREED_MEMORY=0``: glibc's defaults), to show what it is worth.

Targets: memory_correction for heavy ball 1 and 10 epochs deep <= 6, AdamW 10 epochs deep
<= 10; the exact heavy-ball expectation <= 6; the same calls with the fused CPU kernel off
(what a GPU takes: heavy ball's linear window in torch, AdamW's torch scan) flat from 1 to 10
epochs deep (10-epoch / 1-epoch <= 1.25); the literal Eq. (9) loop (O(n) HVPs + O(n^2)
sums) >= 20x slower than the engine. Rows marked "info" break the costs down (heavy ball's
``window="scan"``: the scan a linear optimizer's torch path takes where its coefficient
matrix would cost more).

Usage: python benchmarks/bench_engine.py [--device cuda] [--repeats 11] [--threads 1]
       [--only-engine]
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
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from noisemem.optim import HeavyBall, Optimizer
    from noisemem.problem import Problem


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
) -> tuple[float, float, float, float]:
    """Median of t(fn)/t(unit) over back-to-back pairs, its quartiles (the range with fewer
    than 4 pairs), and the median t(fn) in seconds."""
    fn()  # warm-up
    unit()
    ratios, times = [], []
    for _ in range(repeats):
        u = once(unit, device)
        t = once(fn, device)
        ratios.append(t / u)
        times.append(t)
    ordered = sorted(ratios)
    if len(ordered) >= 4:
        q1, q3 = statistics.quantiles(ordered, n=4)[::2]
    else:  # too few pairs for quartiles: their range
        q1, q3 = ordered[0], ordered[-1]
    return statistics.median(ratios), q1, q3, statistics.median(times)


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


def without_fused_kernel(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the fused CPU kernel off: the path a GPU (or a CPU without numba) takes."""
    import noisemem.fused as fused

    def run() -> object:
        usable = fused.usable
        fused.usable = lambda *_: False
        try:
            return fn()
        finally:
            fused.usable = usable

    return run


def child(device: str, repeats: int) -> None:
    """The measurements, in this (fresh) process; one JSON line per row on stdout."""
    from noisemem import expected_correction, memory_correction
    from noisemem.correction import correction_at
    from noisemem.ensemble import EnsembleProbe, corrections_at
    from noisemem.optim import AdamW, HeavyBall
    from noisemem.probe import Probe
    from noisemem.problem import Problem
    from noisemem.studies.data import digits, split_batches
    from noisemem.studies.models import gelu_mlp
    from noisemem.system import engine_allocator

    torch.manual_seed(0)
    x, y = digits(torch.float32)
    x, y = x.to(device), y.to(device)
    batches = split_batches(x, y, 32)
    model = gelu_mlp().to(device)
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

    def emit(name: str, fn: Callable[[], object], target: str, reps: int = repeats) -> float:
        ratio, q1, q3, t = paired_ratio(fn, full_gradient, reps, device)
        print(json.dumps({"name": name, "ratio": ratio, "q1": q1, "q3": q3, "target": target}))
        sys.stdout.flush()
        return t

    base = paired_ratio(full_gradient, full_gradient, repeats, device)[3]
    print(json.dumps({"unit_ms": base * 1e3, "allocator": engine_allocator(), "m": m}))

    def mc(opt: Optimizer, seq: list[int], **kw: str) -> Callable[[], object]:
        return lambda: memory_correction(model, loss_fn, problem, opt, seq, **kw)

    emit("heavy ball, 1 epoch deep (n=55)", mc(hb, seq1), "<= 6")
    t_hb10 = emit("heavy ball, 10 epochs deep (n=559)", mc(hb, seq10), "<= 6")
    emit("  same, hvp='vmap' (vmapped jvp(grad) per batch)", mc(hb, seq10, hvp="vmap"), "info")
    emit("AdamW, 1 epoch deep (n=55)", mc(adamw, seq1), "info")
    emit("AdamW, 10 epochs deep (n=559)", mc(adamw, seq10), "<= 10")
    emit("exact E[M] heavy ball, 10 epochs", lambda: expected_correction(
        model, loss_fn, problem, hb, epochs=10), "<= 6")  # fmt: skip
    emit("  same, the mean alone (parts=False: one pass)", lambda: expected_correction(
        model, loss_fn, problem, hb, epochs=10, parts=False), "info")  # fmt: skip
    # what a GPU takes: the fused CPU kernel off
    for what, opt in (("heavy ball", hb), ("AdamW", adamw)):
        for depth, seq in (("1 epoch", seq1), ("10 epochs", seq10)):
            emit(f"fused kernel off: {what}, {depth} deep", without_fused_kernel(
                mc(opt, seq)), "flat")  # fmt: skip
    emit("  torch scan (window='scan'): heavy ball, 1 epoch deep", mc(
        hb, seq1, window="scan"), "info")  # fmt: skip
    emit("  torch scan (window='scan'): heavy ball, 10 epochs deep", mc(
        hb, seq10, window="scan"), "info")  # fmt: skip
    emit("  old torch window (dense): AdamW, 10 epochs deep", mc(
        adamw, seq10, window="dense"), "info", reps=max(3, repeats // 3))  # fmt: skip
    # the pieces: the batch gradients with their graph, one backward pass through it
    emit("  batch gradients with their graph (Probe.native_grads)", lambda: Probe(
        problem).native_grads, "info")  # fmt: skip
    probe = Probe(problem)
    g = probe.full_grad()
    emit("  one backward pass: H v (Probe.full_hvp)", lambda: probe.full_hvp(g), "info")
    # a study chunk's probes, per run, for 8 runs (runtime.batched_probes; "auto" takes
    # them together on CUDA): at their own parameters (epoch ends) and at one shared point
    runs = 8
    thetas = problem.theta + 0.01 * torch.randn(runs, problem.theta.numel(), device=device)
    seqs = [np.concatenate([rng.permutation(m) for _ in range(2)]) for _ in range(runs)]

    def one_by_one() -> None:
        for t, s in zip(thetas, seqs, strict=True):
            probe = Probe(problem.at(t))
            correction_at(probe, hb, s)
            probe.hessian_moments()

    def together() -> None:
        probes = EnsembleProbe(problem, thetas)
        probes.corrections(hb, seqs)
        probes.hessian_moments()

    shared = Probe(problem)
    shared.native_grads  # noqa: B018 - the graph, built once: what the runs share
    emit(f"  {runs} runs' epoch-end probes (M, Cov), one by one", one_by_one, "info")
    emit("  the same, together (EnsembleProbe)", together, "info")
    emit(f"  {runs} runs' M at one point, one by one", lambda: [
        correction_at(shared, hb, s) for s in seqs], "info")  # fmt: skip
    emit("  the same, together (corrections_at)", lambda: corrections_at(
        shared, hb, seqs), "info")  # fmt: skip
    t_lit = emit(
        "literal Eq. (9) loop, heavy ball, 10 epochs deep",
        lambda: literal_eq9_heavy_ball(problem, hb, seq10),
        "baseline",
        reps=1,
    )
    a = memory_correction(model, loss_fn, problem, hb, seq10)
    b = literal_eq9_heavy_ball(problem, hb, seq10)
    print(json.dumps({"literal_over_engine": t_lit / t_hb10,
                      "rel_diff": float((a - b).norm() / b.norm())}))  # fmt: skip


def run_child(args: argparse.Namespace, keep: bool) -> tuple[dict, list[dict]]:
    """The measurements of one column, in a fresh process."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["NOISEMEM_KEEP_FREED_MEMORY"] = "1" if keep else "0"
    cmd = [sys.executable, __file__, "--child", "--device", args.device]
    cmd += ["--repeats", str(args.repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(out.stdout + out.stderr)
    head: dict = {}
    rows = []
    for line in out.stdout.splitlines():
        rec = json.loads(line)
        if "name" in rec:
            rows.append(rec)
        else:
            head.update(rec)
    return head, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only-engine", action="store_true", help="skip the glibc column")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        child(args.device, args.repeats)
        return
    columns = [("as a user calls it", True)]
    if not args.only_engine:
        columns.append(("glibc defaults", False))
    results = [(label, *run_child(args, keep)) for label, keep in columns]
    head0 = results[0][1]
    print(f"device {args.device}, float32, {head0['m']} batches of 32, {args.threads} thread(s)")
    print("each column: a fresh process that imports noisemem and calls it, nothing set first")
    for label, head, _ in results:
        print(f"  {label}: one full-data gradient {head['unit_ms']:.2f} ms; "
              f"engine keeps freed memory: {head['allocator']}")  # fmt: skip
    title = "".join(f"  {label:>24s}" for label, _, _ in results)
    print(f"{'':52s}{title}   target")
    by_name = [{r["name"]: r for r in rows} for _, _, rows in results]
    for r in results[0][2]:
        cells = ""
        for table in by_name:
            x = table[r["name"]]
            cells += f"  {x['ratio']:7.2f}x ({x['q1']:5.2f}-{x['q3']:5.2f})"
        print(f"{r['name']:52s}{cells}   {r['target']}")
    for label, head, rows in results:
        table = {r["name"]: r["ratio"] for r in rows}
        for what in ("heavy ball", "AdamW"):
            one = table[f"fused kernel off: {what}, 1 epoch deep"]
            ten = table[f"fused kernel off: {what}, 10 epochs deep"]
            print(f"{label}: fused kernel off, {what} 10 / 1 epochs deep: {ten / one:.2f}"
                  "   target <= 1.25")  # fmt: skip
        one = table["  torch scan (window='scan'): heavy ball, 1 epoch deep"]
        ten = table["  torch scan (window='scan'): heavy ball, 10 epochs deep"]
        print(f"{label}: torch scan, heavy ball 10 / 1 epochs deep: {ten / one:.2f}   info")
        print(f"{label}: literal loop / engine (heavy ball, 10 epochs): "
              f"{head['literal_over_engine']:.0f}x   target >= 20; engine vs literal, "
              f"relative difference {head['rel_diff']:.1e} (float32)")  # fmt: skip
    print("(ratios: median of back-to-back pairs (interquartile range); the literal loop: 1 pair)")


if __name__ == "__main__":
    main()

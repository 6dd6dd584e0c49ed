"""The work of a study, with no Ray inside: what one actor does with one chunk.

A chunk is a range of permutation indices of one config. Its runs are trained at once as a
vmapped ensemble (one parameter vector per permutation, same initialisation): at step j,
run p uses the batch its own order gives it. Batch orders come from
``sample_run(sampling, m, b, steps, spec.seed, p)``, so a permutation's results depend on the
spec and its index only, never on the chunking or on which worker ran it; every config sees
the same orders (common random numbers).

Probe points (where Eq. (9) is evaluated, at the end of every epoch e, n = e m - 1):

* ``init`` and ``ref<s>``: fixed parameters (the initialisation; step s of the full-batch
  reference run of the same optimizer). M_p is Eq. (9) at those parameters for run p's order,
  so the mean over p estimates E[M] there; the exact expectation and the full-batch
  prediction at the same point are in the ``predictions`` table.
* ``epoch``: each run's own parameters after epoch e, with its own history; each correction
  row carries its comparison with the full-batch prediction and the noise direction there.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from noisemem.correction import Probe
from noisemem.data import DataInfo, split_batches
from noisemem.expectation import SampledRun, exact_expectation, sample_run, sampled_correction
from noisemem.full_batch import full_batch_prediction
from noisemem.models import build_model, initial_parameters
from noisemem.noise import per_sample_problem
from noisemem.optim import Optimizer
from noisemem.problem import Problem
from noisemem.spec import Config, StudySpec
from noisemem.stats import Moments
from noisemem.trajectory import trajectories


def versions() -> str:
    import pyarrow
    import ray

    return json.dumps(
        {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "numpy": np.__version__,
            "pyarrow": pyarrow.__version__,
        }
    )


def spec_model(spec: StudySpec, info: DataInfo) -> nn.Module:
    """The spec's model for this data (inputs, classes and image shape from ``info``)."""
    return build_model(
        spec.model.kind,
        inputs=info.num_features,
        classes=info.num_classes,
        hidden=spec.model.hidden,
        image_shape=info.image_shape,
        kwargs=spec.model.kwargs,
    )


@dataclass
class Context:
    """Data, model and batches of a study on one device (built once per actor)."""

    spec: StudySpec
    x: Tensor
    y: Tensor
    info: DataInfo
    model: nn.Module
    problem: Problem
    device: str
    _references: dict[str, dict[int, Tensor | None]] = field(default_factory=dict)

    @classmethod
    def build(
        cls, spec: StudySpec, x: Tensor, y: Tensor, info: DataInfo, device: str = "cpu"
    ) -> Context:
        spec.check_combinations()  # from_dict did; a spec made by dataclasses.replace may not
        dtype = torch.float64 if spec.runtime.dtype == "float64" else torch.float32
        model = initial_parameters(spec_model(spec, info), spec.seed).to(device=device, dtype=dtype)
        x, y = x.to(device=device, dtype=dtype), y.to(device)
        batches = split_batches(x, y, spec.training.batch_size)
        problem = Problem(model, nn.functional.cross_entropy, batches)
        return cls(spec, x, y, info, model, problem, device)

    @property
    def m(self) -> int:
        return self.problem.num_batches

    @property
    def steps(self) -> int:
        return self.spec.training.epochs * self.m

    def run(self, p: int) -> SampledRun:
        t = self.spec.training
        return sample_run(t.sampling, self.m, t.batch_size, self.steps, self.spec.seed, p)

    def references(self, config: Config) -> dict[int, Tensor | None]:
        """theta at the spec's reference steps of the full-batch run (None if it diverged)."""
        if config.id not in self._references:
            wanted = self.spec.probes.reference_steps
            out: dict[int, Tensor | None] = {}
            if wanted:
                # the samples the batch split keeps, so that the loss is L = mean_i L_i
                data = [(self.problem.X.flatten(0, 1), self.problem.Y.flatten(0, 1))]
                full = Problem(self.model, self.problem.loss_fn, data)
                opt = config.optimizer
                theta = full.theta.clone()
                state = opt.init(theta)
                for s in range(1, max(wanted) + 1):
                    F, state = opt.update(full.full_grad(theta), state, theta)
                    theta = theta - opt.lr * F
                    if s in wanted:
                        out[s] = theta.clone() if bool(torch.isfinite(theta).all()) else None
            self._references[config.id] = out
        return self._references[config.id]

    def fixed_probes(self, config: Config) -> dict[str, Tensor | None]:
        probes: dict[str, Tensor | None] = {}
        if self.spec.probes.init:
            probes["init"] = self.problem.theta
        for s, theta in self.references(config).items():
            probes[f"ref{s}"] = theta
        return probes

    def noise_direction(self, at: Problem, probe: Probe | None = None) -> Tensor:
        """Cov at ``at.theta``: per batch, or per sample under reshuffling (THEORY §4).
        ``probe`` (a :class:`Probe` of ``at``) lends its batch gradients' graph to the
        per-batch case instead of building a second one."""
        if self.spec.training.sampling == "reshuffle":
            return Probe(per_sample_problem(at)).hessian_moments()[2]
        return (probe if probe is not None else Probe(at)).hessian_moments()[2]

    def probe_steps(self) -> list[int]:
        return [e * self.m - 1 for e in range(1, self.spec.training.epochs + 1)]


@dataclass
class Ensemble:
    """A trained chunk: per-run metrics, divergence and the parameters after each epoch."""

    loss: Tensor  # (steps, P)
    accuracy: Tensor
    grad_norm: Tensor
    batch: np.ndarray  # (steps, P) batch index (sample-batch row for reshuffle)
    diverged_at: list[int | None]  # first iterate with non-finite parameters or gradient
    epoch_thetas: list[Tensor]  # per epoch, (P, d)


def _loss_and_accuracy(
    model: nn.Module, problem: Problem, theta: Tensor, x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    out = functional_call(model, (problem.unflatten(theta), problem.buffers), (x,))
    loss = problem.loss_fn(out, y)
    return loss, (out.argmax(-1) == y).to(out.dtype).mean()


def train_ensemble(ctx: Context, optimizer: Optimizer, runs: Sequence[SampledRun]) -> Ensemble:
    """The memoryful runs of ``runs`` trained at once (vmap over runs), same initial theta."""
    P = len(runs)
    problem = ctx.problem
    theta = problem.theta.expand(P, -1).clone()  # (P, d)
    state = optimizer.init(theta)
    X_all = problem.X.flatten(0, 1)  # (N', f): the samples kept by the batch split
    Y_all = problem.Y.flatten(0, 1)

    def loss_fn(t: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return _loss_and_accuracy(ctx.model, problem, t, x, y)  # (loss, accuracy as aux)

    batched_loss = vmap(loss_fn)

    def step_fn(t: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # run p's loss depends on its own row of t only, so one backward pass of the summed
        # losses gives every run's gradient (plain autograd: torch.func.grad would import
        # torch._dynamo, 1.2 s at each study actor's start)
        with torch.enable_grad():
            leaf = t.detach().requires_grad_(True)
            loss, acc = batched_loss(leaf, x, y)
            (g,) = torch.autograd.grad(loss.sum(), leaf)
        return g, (loss.detach(), acc)

    steps = ctx.steps
    losses = torch.empty(steps, P, dtype=theta.dtype, device=theta.device)
    accs = torch.empty_like(losses)
    norms = torch.empty(steps, P, dtype=torch.float64, device=theta.device)
    batch_idx = np.zeros((steps, P), dtype=np.int64)
    finite = torch.empty(steps, P, dtype=torch.bool, device=theta.device)
    epoch_thetas = []
    fixed = runs[0].batches is None
    if fixed:  # which batch each run uses at each step: (steps, P)
        batch_idx[:] = np.stack([r.sequence[:steps] for r in runs], axis=1)
        order = torch.as_tensor(batch_idx, device=theta.device)
    else:  # reshuffle: the sample rows of each run's fresh batch: (steps, P, b)
        batch_idx[:] = np.arange(steps)[:, None]
        rows = np.stack([r.batches[:steps] for r in runs], axis=1)  # type: ignore[index]
        order = torch.as_tensor(rows, device=theta.device)
    for j in range(steps):
        if fixed:
            xj, yj = problem.X[order[j]], problem.Y[order[j]]  # (P, b, ...)
        else:
            xj, yj = X_all[order[j]], Y_all[order[j]]
        g, (loss, acc) = step_fn(theta, xj, yj)
        # in float64: a float32 norm overflows while g is finite (and would flag divergence)
        grad_norm = torch.linalg.vector_norm(g, dim=1, dtype=torch.float64)
        losses[j], accs[j], norms[j] = loss, acc, grad_norm
        F, state = optimizer.update(g, state, theta)
        theta = theta - optimizer.lr * F
        # the gradient norm is not finite once theta^(j) or its gradient is not (cheaper
        # than scanning theta at every step)
        finite[j] = torch.isfinite(norms[j])
        if (j + 1) % ctx.m == 0:
            epoch_thetas.append(theta.clone())
    # diverged_at: the first iterate j whose parameters or gradient were not finite
    bad = (~finite).cpu().numpy()
    last_bad = (~torch.isfinite(theta).all(dim=1)).cpu().numpy()
    diverged = [
        int(np.argmax(bad[:, p])) if bad[:, p].any() else (steps if last_bad[p] else None)
        for p in range(P)
    ]
    return Ensemble(losses, accs, norms, batch_idx, diverged, epoch_thetas)


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan


def _comparison(M: Tensor, full_batch: Tensor, noise: Tensor) -> dict[str, float]:
    """|M|, l_inf, and M against the full-batch prediction and the noise direction. In
    float64 whatever the study's dtype: a float32 M of entries ~1e19 is finite but its norm
    (a sum of squares) is not."""
    M, full_batch, noise = M.double(), full_batch.double(), noise.double()
    fb = float(full_batch.norm())
    return {
        "norm": float(M.norm()),
        "linf": float(M.abs().max()),
        "full_batch_norm": fb,
        "proj_full_batch": float(M @ full_batch) / fb**2 if fb > 0 else math.nan,
        "cos_full_batch": _cos(M, full_batch),
        "cos_noise": _cos(M, noise),
    }


def _prefix(run: SampledRun, steps: int) -> SampledRun:
    return SampledRun(run.sequence[:steps], None if run.batches is None else run.batches[:steps])


def run_chunk(
    ctx: Context, config: Config, chunk: int, worker: str = "local"
) -> dict[str, list[dict[str, Any]]]:
    """Rows of ``runs``, ``steps``, ``corrections`` and ``moments`` for one chunk."""
    spec, opt = ctx.spec, config.optimizer
    indices = list(spec.chunk_indices(chunk))
    t0 = time.perf_counter()
    runs = [ctx.run(p) for p in indices]
    ens = train_ensemble(ctx, opt, runs)
    statuses = ["ok" if d is None else "diverged" for d in ens.diverged_at]
    corrections: list[dict[str, Any]] = []
    moments: list[dict[str, Any]] = []
    steps_of = ctx.probe_steps()
    with_vectors = spec.record.vectors

    def record(probe: str, n: int, p: int, M: Tensor, fb: Tensor, noise: Tensor) -> None:
        row = {"config": config.id, "permutation": p, "probe": probe, "step": n}
        row.update(_comparison(M, fb, noise))
        row["vector"] = M.double().cpu().tolist() if with_vectors else None
        corrections.append(row)

    def add_moments(probe: str, n: int, acc: Moments) -> None:
        moments.append(
            {
                "config": config.id,
                "probe": probe,
                "step": n,
                "chunk": chunk,
                "count": acc.count,
                "mean": acc.mean.tolist(),
                "m2": acc.m2.tolist(),
            }
        )

    d = ctx.problem.theta.numel()
    for name, theta in ctx.fixed_probes(config).items():
        if theta is None:  # the reference run diverged before this step
            continue
        at = ctx.problem.at(theta)
        probe = Probe(at)
        noise = ctx.noise_direction(at, probe)
        for n in steps_of:
            fb = full_batch_prediction(at, opt, n, probe)
            acc = Moments.empty(d)
            for p, run in zip(indices, runs, strict=True):
                M = sampled_correction(at, probe, opt, _prefix(run, n + 1))
                if bool(torch.isfinite(M).all()):
                    acc.add(M)
                record(name, n, p, M, fb, noise)
            add_moments(name, n, acc)
    if spec.probes.epoch_end:
        for e, n in enumerate(steps_of):
            acc = Moments.empty(d)
            for j, (p, run) in enumerate(zip(indices, runs, strict=True)):
                div = ens.diverged_at[j]
                if div is not None and div <= n + 1:
                    continue
                at = ctx.problem.at(ens.epoch_thetas[e][j])
                probe = Probe(at)
                noise = ctx.noise_direction(at, probe)
                M = sampled_correction(at, probe, opt, _prefix(run, n + 1))
                fb = full_batch_prediction(at, opt, n, probe)
                if bool(torch.isfinite(M).all()):
                    acc.add(M)
                record("epoch", n, p, M, fb, noise)
            add_moments("epoch", n, acc)

    linf: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if spec.record.memoryless:  # the spec allows it only with fixed batches (not reshuffle)
        for j, (p, run) in enumerate(zip(indices, runs, strict=True)):
            if ens.diverged_at[j] is None:
                tr = trajectories(ctx.model, ctx.problem.loss_fn, ctx.problem, opt, run.sequence)
                linf[p] = (tr.linf_first[1:].cpu().numpy(), tr.linf_second[1:].cpu().numpy())
    step_rows: list[dict[str, Any]] = []
    if spec.record.steps:
        loss, accuracy, gnorm = (
            t.double().cpu().numpy() for t in (ens.loss, ens.accuracy, ens.grad_norm)
        )
        for j, p in enumerate(indices):
            first, second = linf.get(p, (None, None))
            for s in range(ctx.steps):
                step_rows.append(
                    {
                        "config": config.id,
                        "permutation": p,
                        "step": s,
                        "epoch": s // ctx.m,
                        "batch": int(ens.batch[s, j]),
                        "loss": float(loss[s, j]),
                        "accuracy": float(accuracy[s, j]),
                        "grad_norm": float(gnorm[s, j]),
                        "linf_first": None if first is None else float(first[s]),
                        "linf_second": None if second is None else float(second[s]),
                    }
                )
    seconds = (time.perf_counter() - t0) / max(len(indices), 1)
    run_rows = [
        run_row(
            spec,
            config,
            chunk,
            p,
            status=status,
            diverged_at=ens.diverged_at[j],
            seconds=seconds,
            worker=worker,
            device=ctx.device,
        )
        for j, (p, status) in enumerate(zip(indices, statuses, strict=True))
    ]
    return {"runs": run_rows, "steps": step_rows, "corrections": corrections, "moments": moments}


def run_row(spec: StudySpec, config: Config, chunk: int, p: int, **fields: Any) -> dict[str, Any]:
    """One ``runs`` row; ``fields`` sets status, error, diverged_at, seconds, worker, device."""
    opt = config.optimizer
    row = {
        "study": spec.name,
        "config": config.id,
        "chunk": chunk,
        "permutation": p,
        "seed": spec.seed,
        "optimizer": opt.name,
        "hyperparameters": json.dumps(config.hyperparameters, sort_keys=True),
        "lr": opt.lr,
        "batch_size": spec.training.batch_size,
        "epochs": spec.training.epochs,
        "sampling": spec.training.sampling,
        "status": "ok",
        "error": None,
        "diverged_at": None,
        "seconds": None,
        "worker": None,
        "device": None,
        "versions": versions(),
    }
    row.update(fields)
    return row


def failed_chunk_rows(
    spec: StudySpec, config: Config, chunk: int, error: str, worker: str
) -> list[dict[str, Any]]:
    """``runs`` rows recording that a chunk failed (kept, so nothing is silently lost)."""
    return [
        run_row(spec, config, chunk, p, status="failed", error=error, worker=worker)
        for p in spec.chunk_indices(chunk)
    ]


def predictions(ctx: Context, config: Config) -> list[dict[str, Any]]:
    """Rows of ``predictions`` for every fixed probe and probe step of ``config``."""
    opt = config.optimizer
    rows: list[dict[str, Any]] = []

    def add(probe: str, n: int | None, kind: str, v: Tensor, coef: dict[str, float]) -> None:
        rows.append(
            {
                "config": config.id,
                "probe": probe,
                "step": -1 if n is None else n,
                "kind": kind,
                "norm": float(v.double().norm()),
                "coefficients": json.dumps(coef),
                "vector": v.double().cpu().tolist(),
            }
        )

    for name, theta in ctx.fixed_probes(config).items():
        if theta is None:
            continue
        at = ctx.problem.at(theta)
        probe = Probe(at)  # one graph of the batch gradients, shared by every prediction
        add(name, None, "noise_direction", ctx.noise_direction(at, probe), {})
        add(name, None, "full_batch_limit", full_batch_prediction(at, opt, None, probe), {})
        for n in ctx.probe_steps():
            add(name, n, "full_batch", full_batch_prediction(at, opt, n, probe), {})
            if opt.linear:
                ex = exact_expectation(
                    at, opt, ctx.spec.training.sampling, n, ctx.spec.training.epochs, probe
                )
                coef = dict(ex.coefficients or {})
                assert ex.full_batch_part is not None and ex.noise_part is not None
                add(name, n, "exact_mean", ex.mean, coef)
                add(name, n, "exact_full_batch_part", ex.full_batch_part, coef)
                add(name, n, "exact_noise_part", ex.noise_part, coef)
    return rows

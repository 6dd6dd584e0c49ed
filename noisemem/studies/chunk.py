"""The work of a study, with no Ray inside: what one actor does with one chunk.

A chunk is a range of permutation indices of one config. Its runs are trained at once as a
vmapped ensemble (one parameter vector per permutation, same initialisation): at step j,
run p uses the batch its own order gives it. Batch orders come from
``sample_run(sampling, m, b, steps, seed, p)`` with the config's training setting, so a
permutation's results depend on the config and its index only, never on the chunking or on
which worker ran it; configs that share a setting see the same orders (common random
numbers).

Probe points (where Eq. (9) is evaluated, at the end of every epoch e, n = e m - 1):

* ``init`` and ``ref<s>``: fixed parameters (the initialisation; step s of the full-batch
  reference run of the same optimizer). M_p is Eq. (9) at those parameters for run p's order,
  so the mean over p estimates E[M] there; the exact expectation and the full-batch
  prediction at the same point are in the ``predictions`` table.
* ``epoch``: each run's own parameters after epoch e, with its own history; each correction
  row carries its comparison with the full-batch prediction and the noise direction there.

With ``runtime.batched_probes`` (on CUDA by default) the runs are taken together at each
probe (:mod:`noisemem.ensemble`): at the epoch ends the graphs of as many runs as the memory
budget holds are one graph, at a fixed probe every run's passes of products go through the
probe's graph in one vmapped pass; the rows are those of one run at a time, to rounding.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from noisemem.budget import available_memory, ensemble_plan, parse_budget
from noisemem.ensemble import EnsembleProbe, corrections_at
from noisemem.expectation import SampledRun, exact_expectation, sample_run, sampled_correction
from noisemem.full_batch import NoClosedForm, closed_form_at, full_batch_prediction
from noisemem.noise_aware import check_noise_aware_args, direction_at, noise_aware_prediction
from noisemem.optim import Optimizer
from noisemem.probe import Probe
from noisemem.problem import Problem
from noisemem.stats import Moments
from noisemem.studies import rows
from noisemem.studies.data import DataInfo, split_batches
from noisemem.studies.models import initial_parameters, spec_model
from noisemem.studies.plan import Chunks
from noisemem.studies.spec import Config, Setting, StudySpec
from noisemem.trajectory import memoryful_steps, trajectories


@dataclass
class Context:
    """Model and batches of a study for one training setting on one device (an actor
    builds one per setting it meets, once)."""

    spec: StudySpec
    setting: Setting
    model: nn.Module
    problem: Problem
    device: str
    _references: dict[str, dict[int, Tensor | None]] = field(default_factory=dict)
    # the last probe, weakly (a kept probe would hold its graph between chunks), and the
    # plan of the last one that made one
    _last_probe: weakref.ref[Probe] | None = field(default=None, repr=False)
    _last_plan: str | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        spec: StudySpec,
        x: Tensor,
        y: Tensor,
        info: DataInfo,
        device: str = "cpu",
        setting: Setting | None = None,
    ) -> Context:
        """The context of ``setting`` (by default the spec's only one)."""
        spec.check_combinations()  # from_dict did; a spec made by dataclasses.replace may not
        if setting is None:
            (setting,) = spec.settings  # a sweep has several: name one
        dtype = torch.float64 if spec.runtime.dtype == "float64" else torch.float32
        model = initial_parameters(spec_model(spec, info), setting.seed)
        model = model.to(device=device, dtype=dtype)
        x, y = x.to(device=device, dtype=dtype), y.to(device)
        batches = split_batches(x, y, setting.batch_size)
        problem = Problem(model, nn.functional.cross_entropy, batches)
        return cls(spec, setting, model, problem, device)

    @property
    def m(self) -> int:
        return self.problem.num_batches

    def probe(self, at: Problem) -> Probe:
        """A :class:`Probe` of ``at`` under the spec's ``runtime.memory_budget`` and
        ``runtime.graph_batches``; its plan, once made, is :attr:`memory_plan`."""
        self._remember_plan()
        r = self.spec.runtime
        q = r.graph_batches if r.graph_batches and r.graph_batches <= at.num_batches else None
        probe = Probe(at, memory_budget=self.memory_budget, graph_batches=q)
        self._last_probe = weakref.ref(probe)
        return probe

    def _remember_plan(self) -> None:
        probe = self._last_probe() if self._last_probe is not None else None
        if probe is not None and probe.planned is not None:
            self._last_plan = json.dumps(probe.planned.as_dict(), sort_keys=True)

    @property
    def memory_budget(self) -> int | str | None:
        """What this actor's probes may hold: ``runtime.memory_budget``; without one, on a
        GPU shared by several actors (``runtime.gpus_per_actor`` < 1), this actor's share of
        the device's free memory (each would otherwise plan for all of it); else None, the
        device's free memory."""
        r = self.spec.runtime
        if r.memory_budget is not None:
            return r.memory_budget
        if self.device.startswith("cuda") and r.gpus_per_actor < 1:
            return max(1, int(available_memory(torch.device(self.device)) * r.gpus_per_actor))
        return None

    def ensemble_points(self, optimizer: Optimizer, runs: int, remember: bool = True) -> int:
        """How many runs' probes to take together (:mod:`noisemem.ensemble`): at the epoch
        ends, their graphs in one; at a fixed probe, their passes of products in one vmapped
        pass. 0 for one probe per run, which ``runtime.batched_probes`` asks for
        (``"auto"``: on CUDA), which reshuffled batches need (each run has batches of its
        own), and which a budget too small for one run's whole graph leaves. The plan is
        remembered (``remember``) as the chunk's."""
        mode = self.spec.runtime.batched_probes
        wanted = mode == "on" or (mode == "auto" and self.device.startswith("cuda"))
        if not wanted or self.setting.sampling == "reshuffle" or self.spec.runtime.graph_batches:
            return 0
        budget = parse_budget(self.memory_budget)
        plan = ensemble_plan(self.problem, optimizer, budget, runs)
        if plan is None:
            return 0
        if remember:
            self._last_probe = None
            self._last_plan = json.dumps(plan.as_dict(), sort_keys=True)
        return plan.points

    @property
    def memory_plan(self) -> str | None:
        """How the last probe that planned held its graphs (``budget.MemoryPlan`` as JSON),
        or None."""
        self._remember_plan()
        return self._last_plan

    @property
    def steps(self) -> int:
        return self.setting.epochs * self.m

    def run(self, p: int) -> SampledRun:
        s = self.setting
        return sample_run(s.sampling, self.m, s.batch_size, self.steps, s.seed, p)

    def references(self, config: Config) -> dict[int, Tensor | None]:
        """theta at the spec's reference steps of the full-batch run (None if it diverged)."""
        if config.id not in self._references:
            wanted = self.spec.probes.reference_steps
            out: dict[int, Tensor | None] = {}
            if wanted:
                # the samples the batch split keeps, so that the loss is L = mean_i L_i
                full = self.problem.full_batch()
                steps = memoryful_steps(
                    config.optimizer, full.theta, lambda _, t: full.full_grad(t), max(wanted)
                )
                for n, _, theta in steps:
                    if n + 1 in wanted:
                        out[n + 1] = theta.clone() if bool(torch.isfinite(theta).all()) else None
            self._references[config.id] = out
        return self._references[config.id]

    def fixed_probes(self, config: Config) -> dict[str, Tensor | None]:
        probes: dict[str, Tensor | None] = {}
        if self.spec.probes.init:
            probes["init"] = self.problem.theta
        for s, theta in self.references(config).items():
            probes[f"ref{s}"] = theta
        return probes

    def noise(self, at: Problem, probe: Probe | None = None) -> tuple[Tensor, float]:
        """``(Cov, R)`` at ``at.theta``: the noise direction (THEORY §4) and the mini-batch
        variance regularizer ``R = mean_i ||g_i - g||^2`` (THEORY §5, grad R = 2 Cov), per
        batch, or per sample under reshuffling. ``probe`` (a :class:`Probe` of ``at``) lends
        its batch gradients' graph to the per-batch case instead of building a second one."""
        if self.setting.sampling == "reshuffle":
            probe = self.probe(at.per_sample())
        elif probe is None:
            probe = self.probe(at)
        G = probe.grads.double()
        R = float((G * G).sum(1).mean() - (G.mean(0) ** 2).sum())
        return probe.hessian_moments()[2], R

    def noise_direction(self, at: Problem, probe: Probe | None = None) -> Tensor:
        """Cov at ``at.theta`` (see :meth:`noise`)."""
        return self.noise(at, probe)[0]

    def probe_steps(self) -> list[int]:
        return [e * self.m - 1 for e in range(1, self.setting.epochs + 1)]


def anti_direction(optimizer: Optimizer, probe: Probe | EnsembleProbe) -> Tensor | None:
    """Sec. 4's direction ``d = grad ||grad L||_{1,eps} = H (g / sqrt(g^2 + eps))`` at the
    probe's point, for optimizers whose Phi has an eps (Adam's quotient, the soft sign);
    None for the others."""
    form = optimizer.form
    if form is None or form.kind not in ("adam", "soft_sign") or not form.eps > 0:
        return None
    return direction_at(probe, form.eps)


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
    theta0 = problem.theta.expand(P, -1).clone()  # (P, d)
    X_all, Y_all = problem.samples()  # the samples kept by the batch split

    def loss_fn(t: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return _loss_and_accuracy(ctx.model, problem, t, x, y)  # (loss, accuracy as aux)

    batched_loss = vmap(loss_fn)
    steps = len(runs[0].sequence)
    losses = torch.empty(steps, P, dtype=theta0.dtype, device=theta0.device)
    accs = torch.empty_like(losses)
    norms = torch.empty(steps, P, dtype=torch.float64, device=theta0.device)
    batch_idx = np.zeros((steps, P), dtype=np.int64)
    fixed = runs[0].batches is None
    if fixed:  # which batch each run uses at each step: (steps, P)
        batch_idx[:] = np.stack([r.sequence[:steps] for r in runs], axis=1)
        order = torch.as_tensor(batch_idx, device=theta0.device)
    else:  # reshuffle: the sample rows of each run's fresh batch: (steps, P, b)
        batch_idx[:] = np.arange(steps)[:, None]
        rows_ = np.stack([r.batches[:steps] for r in runs], axis=1)  # type: ignore[index]
        order = torch.as_tensor(rows_, device=theta0.device)

    def gradient(j: int, theta: Tensor) -> Tensor:
        """Every run's gradient at step j, and its loss, accuracy and gradient norm."""
        if fixed:
            xj, yj = problem.X[order[j]], problem.Y[order[j]]  # (P, b, ...)
        else:
            xj, yj = X_all[order[j]], Y_all[order[j]]
        # run p's loss depends on its own row of theta only, so one backward pass of the
        # summed losses gives every run's gradient (plain autograd: torch.func.grad would
        # import torch._dynamo, 1.2 s at each study actor's start)
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            loss, acc = batched_loss(leaf, xj, yj)
            (g,) = torch.autograd.grad(loss.sum(), leaf)
        # in float64: a float32 norm overflows while g is finite (and would flag divergence)
        losses[j], accs[j] = loss.detach(), acc
        norms[j] = torch.linalg.vector_norm(g, dim=1, dtype=torch.float64)
        return g

    epoch_thetas = []
    theta = theta0
    for j, _, theta in memoryful_steps(optimizer, theta0, gradient, steps):
        if (j + 1) % ctx.m == 0:
            epoch_thetas.append(theta.clone())
    # diverged_at: the first iterate j whose parameters, gradient or loss were not finite
    # (the gradient norm is not finite once theta^(j) or its gradient is not: cheaper than
    # scanning theta at every step)
    bad = (~(torch.isfinite(norms) & torch.isfinite(losses))).cpu().numpy()
    last_bad = (~torch.isfinite(theta).all(dim=1)).cpu().numpy()
    diverged = [
        int(np.argmax(bad[:, p])) if bad[:, p].any() else (steps if last_bad[p] else None)
        for p in range(P)
    ]
    return Ensemble(losses, accs, norms, batch_idx, diverged, epoch_thetas)


def _fixed_corrections(
    ctx: Context, optimizer: Optimizer, at: Problem, probe: Probe, runs: list[SampledRun], n: int
) -> list[Tensor]:
    """Each run's M^(n) at a fixed probe: every run's passes of products at once through the
    probe's graph where the runs are taken together (:meth:`Context.ensemble_points`), else
    one run at a time."""
    group = ctx.ensemble_points(optimizer, len(runs), remember=False)
    if not group:
        return [sampled_correction(at, probe, optimizer, _prefix(r, n + 1)) for r in runs]
    found: list[Tensor] = []
    for lo in range(0, len(runs), group):
        found.extend(
            corrections_at(probe, optimizer, [r.sequence[: n + 1] for r in runs[lo : lo + group]])
        )
    return found


def _epoch_probes(
    ctx: Context,
    optimizer: Optimizer,
    n: int,
    thetas: Tensor,
    live: list[tuple[int, int, SampledRun]],
) -> Iterator[tuple[int, Tensor, Tensor, Tensor, Tensor | None]]:
    """``(p, M, full-batch prediction, noise direction, Sec. 4's d or None)`` for each live
    run ``(j, p, run)`` at its own parameters ``thetas[j]`` after step n: in groups that
    share one graph where the runs are taken together, else one probe per run."""
    group = ctx.ensemble_points(optimizer, len(live))
    if group:
        for lo in range(0, len(live), group):
            part = live[lo : lo + group]
            points = torch.stack([thetas[j] for j, _, _ in part])
            found = _epoch_probes_together(ctx, optimizer, n, points, [r for _, _, r in part])
            for (_, p, _), values in zip(part, found, strict=True):
                yield (p, *values)
        return
    for j, p, run in live:
        at = ctx.problem.at(thetas[j])
        probe = ctx.probe(at)
        noise, anti = ctx.noise_direction(at, probe), anti_direction(optimizer, probe)
        fb = full_batch_prediction(at, optimizer, n, probe)
        yield p, sampled_correction(at, probe, optimizer, _prefix(run, n + 1)), fb, noise, anti


def _epoch_probes_together(
    ctx: Context, optimizer: Optimizer, n: int, thetas: Tensor, runs: Sequence[SampledRun]
) -> list[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
    """``(M, full-batch prediction, noise direction, Sec. 4's d or None)`` at each run's own
    parameters ``thetas[k]`` after step n, for fixed batches: every run's graph in one
    :class:`~noisemem.ensemble.EnsembleProbe`, each pass of products for all of them at
    once (the numbers of one probe per run, to rounding)."""
    probes = EnsembleProbe(ctx.problem, thetas)
    M = probes.corrections(optimizer, [r.sequence[: n + 1] for r in runs])
    noise = probes.hessian_moments()[2]
    anti = anti_direction(optimizer, probes)
    fb = closed_form_at(probes, optimizer, n)
    if fb is None:  # no closed form: Eq. (9) on the full batch, point by point
        fb = torch.stack([full_batch_prediction(ctx.problem.at(t), optimizer, n) for t in thetas])
    return [(M[k], fb[k], noise[k], None if anti is None else anti[k]) for k in range(len(runs))]


def _prefix(run: SampledRun, steps: int) -> SampledRun:
    return SampledRun(run.sequence[:steps], None if run.batches is None else run.batches[:steps])


def run_chunk(
    ctx: Context, config: Config, chunk: int, worker: str = "local"
) -> dict[str, list[dict[str, Any]]]:
    """Rows of ``runs``, ``steps``, ``corrections`` and ``moments`` for one chunk (``ctx``
    is the context of the config's training setting)."""
    assert ctx.setting == config.setting, (ctx.setting, config.setting)
    spec, opt = ctx.spec, config.optimizer
    indices = list(Chunks.of(spec).indices(chunk))
    t0 = time.perf_counter()
    runs = [ctx.run(p) for p in indices]
    ens = train_ensemble(ctx, opt, runs)
    corrections: list[dict[str, Any]] = []
    moments: list[dict[str, Any]] = []
    steps_of = ctx.probe_steps()
    d = ctx.problem.theta.numel()
    # the step at which each run diverged: its training (parameters, gradient or loss not
    # finite), or the first probe step at which one of its corrections was not finite
    diverged: dict[int, int | None] = dict(zip(indices, ens.diverged_at, strict=True))

    def record(
        name: str,
        n: int,
        p: int,
        M: Tensor,
        fb: Tensor,
        noise: Tensor,
        anti: Tensor | None,
        acc: Moments,
    ) -> None:
        if bool(torch.isfinite(M).all()):
            acc.add(M)
        elif diverged[p] is None or n < diverged[p]:  # type: ignore[operator]
            diverged[p] = n
        corrections.append(
            rows.correction_row(config, name, n, p, M, fb, noise, anti, vector=spec.record.vectors)
        )

    for name, theta in ctx.fixed_probes(config).items():
        if theta is None:  # the reference run diverged before this step
            continue
        at = ctx.problem.at(theta)
        probe = ctx.probe(at)
        noise, anti = ctx.noise_direction(at, probe), anti_direction(opt, probe)
        for n in steps_of:
            fb = full_batch_prediction(at, opt, n, probe)
            acc = Moments.empty(d)
            found = _fixed_corrections(ctx, opt, at, probe, runs, n)
            for p, M in zip(indices, found, strict=True):
                record(name, n, p, M, fb, noise, anti, acc)
            moments.append(rows.moments_row(config, name, n, chunk, acc, len(indices)))
    if spec.probes.epoch_end:
        for e, n in enumerate(steps_of):
            acc = Moments.empty(d)
            live = [
                (j, p, run)
                for j, (p, run) in enumerate(zip(indices, runs, strict=True))
                if ens.diverged_at[j] is None or ens.diverged_at[j] > n + 1  # type: ignore[operator]
            ]
            for p, M, fb, noise, anti in _epoch_probes(ctx, opt, n, ens.epoch_thetas[e], live):
                record("epoch", n, p, M, fb, noise, anti, acc)
            moments.append(rows.moments_row(config, "epoch", n, chunk, acc, len(indices)))
    step_rows = _step_rows(ctx, config, indices, runs, ens) if spec.record.steps else []
    seconds = (time.perf_counter() - t0) / max(len(indices), 1)
    run_rows = [
        rows.run_row(
            spec,
            config,
            chunk,
            p,
            status="ok" if diverged[p] is None else "diverged",
            diverged_at=diverged[p],
            seconds=seconds,
            worker=worker,
            device=ctx.device,
            memory_plan=ctx.memory_plan,
        )
        for p in indices
    ]
    return {"runs": run_rows, "steps": step_rows, "corrections": corrections, "moments": moments}


def _step_rows(
    ctx: Context, config: Config, indices: list[int], runs: list[SampledRun], ens: Ensemble
) -> list[dict[str, Any]]:
    """Per-step metrics of each run, with the l_inf distances to its memoryless runs when
    recorded (the spec allows that only with fixed batches, not reshuffle)."""
    linf: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if ctx.spec.record.memoryless:
        for j, (p, run) in enumerate(zip(indices, runs, strict=True)):
            if ens.diverged_at[j] is None:
                tr = trajectories(
                    ctx.model, ctx.problem.loss_fn, ctx.problem, config.optimizer, run.sequence
                )
                linf[p] = (tr.linf_first[1:].cpu().numpy(), tr.linf_second[1:].cpu().numpy())
    loss, accuracy, gnorm = (
        t.double().cpu().numpy() for t in (ens.loss, ens.accuracy, ens.grad_norm)
    )
    out = []
    for j, p in enumerate(indices):
        first, second = linf.get(p, (None, None))
        for s in range(ctx.steps):
            out.append(
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
    return out


def predictions(ctx: Context, config: Config) -> list[dict[str, Any]]:
    """Rows of ``predictions`` for every fixed probe and probe step of ``config``: the
    full-batch predictions, the exact expectation (linear optimizers), the noise-aware
    prediction (:mod:`noisemem.noise_aware`), the noise direction and Sec. 4's direction d.
    A prediction an optimizer has no form of gets a row with no vector (NaN norm,
    ``{"no_closed_form": 1}``): recorded, not failed."""
    opt = config.optimizer
    out: list[dict[str, Any]] = []
    for name, theta in ctx.fixed_probes(config).items():
        if theta is None:
            continue
        at = ctx.problem.at(theta)
        probe = ctx.probe(at)  # one graph of the batch gradients, shared by every prediction
        cov, R = ctx.noise(at, probe)
        out.append(rows.prediction_row(config, name, None, "noise_direction", cov, {"R": R}))
        anti = anti_direction(opt, probe)
        if anti is not None:
            eps = {"eps": float(opt.form.eps)}  # type: ignore[union-attr]
            out.append(rows.prediction_row(config, name, None, "anti_regularization", anti, eps))
        try:
            limit = full_batch_prediction(at, opt, None, probe)
            out.append(rows.prediction_row(config, name, None, "full_batch_limit", limit, {}))
        except NoClosedForm:
            out.append(rows.missing_prediction_row(config, name, None, "full_batch_limit"))
        for n in ctx.probe_steps():
            fb = full_batch_prediction(at, opt, n, probe)
            out.append(rows.prediction_row(config, name, n, "full_batch", fb, {}))
            out += _noise_aware_rows(ctx, config, name, n, at, probe)
            if opt.linear:
                ex = exact_expectation(at, opt, ctx.setting.sampling, n, ctx.setting.epochs, probe)
                coef = dict(ex.coefficients or {})
                assert ex.full_batch_part is not None and ex.noise_part is not None
                for kind, v in (
                    ("exact_mean", ex.mean),
                    ("exact_full_batch_part", ex.full_batch_part),
                    ("exact_noise_part", ex.noise_part),
                ):
                    out.append(rows.prediction_row(config, name, n, kind, v, coef))
    return out


def _noise_aware_rows(
    ctx: Context, config: Config, name: str, n: int, at: Problem, probe: Probe
) -> list[dict[str, Any]]:
    """The noise-aware prediction's rows at probe ``name``, step n (its mean, full-batch
    part and noise part), or one row saying there is none for this optimizer or sampling."""
    try:
        check_noise_aware_args(config.optimizer, n, ctx.setting.sampling)
    except ValueError:
        return [rows.missing_prediction_row(config, name, n, "noise_aware_mean")]
    na = noise_aware_prediction(at, config.optimizer, n, probe, ctx.setting.sampling)
    coef = {k: float(v) for k, v in na.coefficients.items()}
    parts = (
        ("noise_aware_mean", na.mean),
        ("noise_aware_full_batch_part", na.full_batch_part),
        ("noise_aware_noise_part", na.noise_part),
    )
    return [rows.prediction_row(config, name, n, kind, v, coef) for kind, v in parts]

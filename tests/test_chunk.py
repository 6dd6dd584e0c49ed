"""The work of one chunk (no Ray): vmapped ensembles, chunk rows, predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import rel_err

from noisemem import (
    budget,
    expected_correction,
    full_batch_correction,
    memory_correction,
    noise_regularizer,
)
from noisemem.stats import Moments
from noisemem.studies.chunk import Context, predictions, run_chunk, train_ensemble
from noisemem.studies.data import prepare
from noisemem.studies.plan import Chunks
from noisemem.studies.spec import StudySpec
from noisemem.trajectory import memoryful_run


def small_spec(**training) -> StudySpec:
    raw = {
        "name": "small",
        "output": "/tmp/noisemem-unused",
        "data": {"source": "digits", "limit": 96},
        "model": {"kind": "gelu_mlp", "hidden": 4},
        "optimizers": [
            {"kind": "HeavyBall", "lr": 0.1, "beta": 0.9},
            {"kind": "AdamW", "lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-6},
        ],
        "training": {"batch_size": 32, "epochs": 2, "permutations": 4, "chunk_size": 2, **training},
        "probes": {"init": True, "epoch_end": True, "reference_steps": [2]},
        "runtime": {"dtype": "float64"},
    }
    return StudySpec.from_dict(raw)


@pytest.fixture(scope="module")
def data():
    return prepare("digits", limit=96)


def context(spec: StudySpec, data) -> Context:
    return Context.build(spec, *data)


@pytest.mark.parametrize("sampling", ["permute", "reshuffle", "replacement"])
@pytest.mark.parametrize("config", [0, 1], ids=["heavy_ball", "adamw"])
def test_ensemble_equals_separate_memoryful_runs(data, config, sampling):
    spec = small_spec(sampling=sampling)
    ctx = context(spec, data)
    opt = spec.configs[config].optimizer
    runs = [ctx.run(p) for p in range(3)]
    ens = train_ensemble(ctx, opt, runs)
    for j, run in enumerate(runs):
        if run.batches is None:
            batches, seq = ctx.problem, run.sequence
        else:
            X, Y = ctx.problem.X.flatten(0, 1), ctx.problem.Y.flatten(0, 1)
            batches, seq = [(X[r], Y[r]) for r in run.batches], list(range(len(run.batches)))
        alone = memoryful_run(ctx.model, ctx.problem.loss_fn, batches, opt, seq)
        for e, theta in enumerate(ens.epoch_thetas):
            assert rel_err(theta[j], alone.thetas[(e + 1) * ctx.m]) < 1e-12


def test_chunk_corrections_are_eq9_for_each_permutation(data):
    spec = small_spec()
    ctx = context(spec, data)
    config = spec.configs[0]
    rows = run_chunk(ctx, config, chunk=1)
    assert [r["permutation"] for r in rows["runs"]] == [2, 3]
    n = ctx.m - 1
    direct = [
        memory_correction(
            ctx.model,
            ctx.problem.loss_fn,
            ctx.problem,
            config.optimizer,
            ctx.run(p).sequence[: n + 1],
        )
        for p in (2, 3)
    ]
    init_rows = [r for r in rows["corrections"] if r["probe"] == "init" and r["step"] == n]
    assert [r["norm"] for r in init_rows] == pytest.approx(
        [float(M.norm()) for M in direct], rel=1e-12
    )
    (mom,) = [r for r in rows["moments"] if r["probe"] == "init" and r["step"] == n]
    assert mom["count"] == 2
    mean = (direct[0] + direct[1]).numpy() / 2
    assert np.allclose(mom["mean"], mean, rtol=1e-12, atol=0)
    half_diff = (direct[0] - direct[1]).numpy() / 2
    assert np.allclose(mom["m2"], 2 * half_diff**2, rtol=1e-10, atol=1e-300)
    assert {r["probe"] for r in rows["corrections"]} == {"init", "ref2", "epoch"}
    assert len(rows["steps"]) == 2 * ctx.steps


def test_moments_do_not_depend_on_the_chunking(data):
    merged = {}
    for chunk_size in (1, 2, 4):
        spec = small_spec(chunk_size=chunk_size)
        ctx = context(spec, data)
        acc: dict[tuple[str, int], Moments] = {}
        for chunk in range(Chunks.of(spec).count):
            for r in run_chunk(ctx, spec.configs[1], chunk)["moments"]:
                mean, m2 = (torch.tensor(r[k], dtype=torch.float64) for k in ("mean", "m2"))
                m = Moments(r["count"], mean, m2)
                key = (r["probe"], r["step"])
                acc[key] = acc[key].merge(m) if key in acc else m
        merged[chunk_size] = acc
    for key, m in merged[4].items():
        for other in (merged[1], merged[2]):
            # equal up to rounding: errors relative to the vector's scale (a coordinate's mean
            # may cancel to far below the runs' own values)
            assert other[key].count == m.count
            assert (other[key].mean - m.mean).abs().max() <= 1e-13 * m.mean.abs().max()
            assert (other[key].m2 - m.m2).abs().max() <= 1e-11 * m.m2.abs().max()


@pytest.mark.parametrize("by", ["user", "budget"])
def test_a_chunk_under_a_memory_budget_equals_the_kept_graph_and_records_its_plan(data, by):
    kept = small_spec()
    # predictions and chunk 0 of AdamW (both of its probes' kinds: fixed and epoch-end)
    ref_ctx, config = context(kept, data), kept.configs[1]
    want = run_chunk(ref_ctx, config, 0)
    ref_plan = json.loads(want["runs"][0]["memory_plan"])
    if by == "user":
        runtime = {"graph_batches": 1}
    else:  # room for AdamW's (m, d) arrays, the flat vectors and 1.5 batch graphs at their peak
        m, d = ref_ctx.problem.num_batches, ref_ctx.problem.theta.numel()
        vectors = (
            (budget.vector_arrays(config.optimizer, "double_backward") * m + budget.FLAT_VECTORS)
            * d
            * 8
        )
        one = budget.PEAK_FACTOR * ref_plan["graph_bytes_per_batch"]
        runtime = {"memory_budget": int(vectors + 1.5 * one)}
    spec = StudySpec.from_dict({**kept.raw, "runtime": {**kept.raw["runtime"], **runtime}})
    ctx = context(spec, data)
    got = run_chunk(ctx, spec.configs[1], 0)
    for a, b in zip(want["moments"], got["moments"], strict=True):
        assert (a["probe"], a["step"], a["count"]) == (b["probe"], b["step"], b["count"])
        mean = np.asarray(a["mean"])
        assert np.abs(np.asarray(b["mean"]) - mean).max() <= 1e-10 * np.abs(mean).max()
    for a, b in zip(predictions(ref_ctx, config), predictions(ctx, config), strict=True):
        assert (a["kind"], a["probe"], a["step"]) == (b["kind"], b["probe"], b["step"])
        if a["vector"] is not None:
            v = np.asarray(a["vector"])
            assert np.abs(np.asarray(b["vector"]) - v).max() <= 1e-10 * max(np.abs(v).max(), 1e-300)
    plans = {json.loads(r["memory_plan"])["mode"] for r in want["runs"]}
    assert plans == {"graph"}
    plan = json.loads(got["runs"][0]["memory_plan"])
    assert plan["mode"] == "grouped" and plan["num_batches"] == 3
    assert plan["graph_batches"] < 3
    assert plan["chosen_by"] == by


@pytest.mark.parametrize("config", [0, 1], ids=["heavy_ball", "adamw"])
def test_epoch_end_probes_taken_together_equal_one_probe_per_run(data, config):
    """runtime.batched_probes = "on" (what "auto" does on CUDA): every run's epoch-end graph
    in one ensemble, and at a fixed probe every run's passes of products in one vmapped
    pass; the rows are those of one probe per run, to rounding."""
    off = small_spec(permutations=3, chunk_size=3)
    on = StudySpec.from_dict({**off.raw, "runtime": {**off.raw["runtime"], "batched_probes": "on"}})
    want = run_chunk(context(off, data), off.configs[config], 0)
    got = run_chunk(context(on, data), on.configs[config], 0)
    pairs = list(zip(want["corrections"], got["corrections"], strict=True))
    # every row: the fixed probes' (init, ref2: one vmapped pass for the three runs) and the
    # epoch ends' (one graph for the three runs)
    assert sum(a["probe"] == "epoch" for a, _ in pairs) == 3 * 2
    assert {a["probe"] for a, _ in pairs} == {"init", "ref2", "epoch"}
    for a, b in pairs:
        assert (a["probe"], a["step"], a["permutation"]) == (
            b["probe"],
            b["step"],
            b["permutation"],
        )
        for key in ("norm", "linf", "full_batch_norm", "cos_full_batch", "cos_noise", "proj_anti"):
            x, y = a[key], b[key]
            assert (np.isnan(x) and np.isnan(y)) or abs(x - y) <= 1e-10 * max(abs(x), 1.0), key
    for a, b in zip(want["moments"], got["moments"], strict=True):
        mean = np.asarray(a["mean"])
        assert np.abs(np.asarray(b["mean"]) - mean).max() <= 1e-10 * np.abs(mean).max()
    plan = json.loads(got["runs"][0]["memory_plan"])
    assert plan["points"] == 3 and plan["mode"] == "graph"
    assert json.loads(want["runs"][0]["memory_plan"])["points"] == 1


def test_a_budget_too_small_for_the_ensemble_takes_one_probe_per_run(data):
    base = small_spec(permutations=2, chunk_size=2)
    ctx = context(base, data)
    opt = base.configs[0].optimizer
    one = budget.ensemble_plan(ctx.problem, opt, 1 << 40, 1)
    assert one is not None
    per_point = one.estimate - budget.FLAT_VECTORS * ctx.problem.theta.numel() * 8
    runtime = {"batched_probes": "on", "memory_budget": int(one.estimate + 0.5 * per_point)}
    spec = StudySpec.from_dict({**base.raw, "runtime": {**base.raw["runtime"], **runtime}})
    ctx = context(spec, data)
    assert ctx.ensemble_points(opt, 2) == 1  # room for one run's graph, not two
    tight = {**runtime, "memory_budget": int(0.5 * one.estimate)}
    spec = StudySpec.from_dict({**base.raw, "runtime": {**base.raw["runtime"], **tight}})
    assert context(spec, data).ensemble_points(opt, 2) == 0  # one probe per run, grouped
    reshuffled = small_spec(sampling="reshuffle")
    spec = StudySpec.from_dict(
        {**reshuffled.raw, "runtime": {**reshuffled.raw["runtime"], "batched_probes": "on"}}
    )
    assert context(spec, data).ensemble_points(opt, 2) == 0  # each run has its own batches


def test_actors_sharing_a_gpu_plan_within_their_share_of_its_free_memory(data, monkeypatch):
    import dataclasses

    import noisemem.studies.chunk as chunk

    free = 10 * 2**30
    monkeypatch.setattr(chunk, "available_memory", lambda device: free)
    base = small_spec()
    shared = {**base.raw["runtime"], "gpus_per_actor": 0.25}
    spec = StudySpec.from_dict({**base.raw, "runtime": shared})
    ctx = dataclasses.replace(context(spec, data), device="cuda:0")  # the rule, not a GPU
    assert ctx.memory_budget == free // 4
    whole = dataclasses.replace(context(base, data), device="cuda:0")
    assert whole.memory_budget is None  # the device's free memory, read by each probe
    assert context(spec, data).memory_budget is None  # a CPU actor: the machine's
    given = StudySpec.from_dict({**base.raw, "runtime": {**shared, "memory_budget": "1GiB"}})
    assert dataclasses.replace(context(given, data), device="cuda:0").memory_budget == "1GiB"


def test_divergent_runs_are_recorded_not_crashed(data):
    raw_spec = small_spec()
    raw = dict(raw_spec.raw)
    raw["optimizers"] = [{"kind": "HeavyBall", "lr": 1e300, "beta": 0.99}]
    spec = StudySpec.from_dict(raw)
    ctx = context(spec, data)
    rows = run_chunk(ctx, spec.configs[0], chunk=0)
    statuses = {r["status"] for r in rows["runs"]}
    assert statuses == {"diverged"}
    assert all(r["diverged_at"] >= 1 for r in rows["runs"])
    assert not [r for r in rows["corrections"] if r["probe"] == "epoch"]
    assert all(r["count"] == 0 for r in rows["moments"] if r["probe"] == "epoch")


def test_summaries_of_a_finite_float32_correction_are_finite(data):
    # lr = 1e20 in float32: M at the initialisation has entries ~7e18, finite, but a float32
    # sum of their squares overflows, which made the corrections' norm inf
    raw = dict(small_spec().raw)
    raw["optimizers"] = [{"kind": "HeavyBall", "lr": 1e20, "beta": 0.9}]
    raw["training"] = {"batch_size": 32, "epochs": 1, "permutations": 2, "chunk_size": 2}
    raw["probes"] = {"init": True}
    raw["record"] = {"vectors": True}
    raw["runtime"] = {"dtype": "float32"}
    spec = StudySpec.from_dict(raw)
    ctx = context(spec, data)
    rows = run_chunk(ctx, spec.configs[0], chunk=0)
    assert {r["probe"] for r in rows["corrections"]} == {"init"}
    for r in rows["corrections"]:
        M = np.asarray(r["vector"])
        assert np.isfinite(M).all() and np.abs(M).max() > 1e18
        assert r["norm"] == pytest.approx(np.linalg.norm(M), rel=1e-6)
        assert np.isfinite([r["full_batch_norm"], r["proj_full_batch"], r["cos_noise"]]).all()
    first = [r["grad_norm"] for r in rows["steps"] if r["step"] == 1]
    assert np.isfinite(first).all() and min(first) > 1e18  # finite g^(1), its norm too


def test_predictions_match_the_engine(data):
    spec = small_spec()
    ctx = context(spec, data)
    config = spec.configs[0]
    rows = {(r["probe"], r["step"], r["kind"]): r for r in predictions(ctx, config)}
    n = 2 * ctx.m - 1
    exact = expected_correction(
        ctx.model, ctx.problem.loss_fn, ctx.problem, config.optimizer, epochs=2
    )
    fb = full_batch_correction(
        ctx.model, ctx.problem.loss_fn, ctx.problem, config.optimizer, step=n
    )
    assert (
        rel_err(
            torch.tensor(rows[("init", n, "exact_mean")]["vector"], dtype=torch.float64), exact.mean
        )
        < 1e-12
    )
    assert (
        rel_err(torch.tensor(rows[("init", n, "full_batch")]["vector"], dtype=torch.float64), fb)
        < 1e-12
    )
    coef = json.loads(rows[("init", n, "exact_mean")]["coefficients"])
    assert coef["same"] == pytest.approx(exact.coefficients["same"])
    R, _ = noise_regularizer(ctx.model, ctx.problem.loss_fn, ctx.problem)
    noise = json.loads(rows[("init", -1, "noise_direction")]["coefficients"])
    assert noise["R"] == pytest.approx(R, rel=1e-12)
    adam_rows = predictions(ctx, spec.configs[1])
    assert not [r for r in adam_rows if r["kind"].startswith("exact")]  # no closed form


def test_runs_with_non_finite_corrections_are_diverged_counted_and_excluded(data):
    """Heavy ball at lr = 1e6 in float32: the parameters stay finite while the loss grows
    past 1e27, and some runs' corrections at their own parameters are NaN. Such a run is
    marked diverged at the first step with a non-finite correction, and every moments row
    says how many runs it left out."""
    raw = dict(small_spec().raw)
    raw["model"] = {"kind": "gelu_mlp", "hidden": 8}
    raw["optimizers"] = [{"kind": "HeavyBall", "lr": 1e6, "beta": 0.9}]
    raw["training"] = {"batch_size": 32, "epochs": 2, "permutations": 8, "chunk_size": 8}
    raw["probes"] = {"init": True, "epoch_end": True}
    raw["runtime"] = {"dtype": "float32"}
    spec = StudySpec.from_dict(raw)
    ctx = context(spec, data)
    rows = run_chunk(ctx, spec.configs[0], chunk=0)
    runs = {r["permutation"]: r for r in rows["runs"]}
    bad = [r for r in rows["corrections"] if not np.isfinite(r["norm"])]
    assert bad, "the setting no longer produces non-finite corrections"
    for r in bad:
        run = runs[r["permutation"]]
        assert run["status"] == "diverged" and run["diverged_at"] <= r["step"]
    for p, run in runs.items():  # diverged at the first such step, or during training
        steps = [r["step"] for r in bad if r["permutation"] == p]
        if steps:
            assert run["diverged_at"] == min(steps)
    assert any(r["status"] == "ok" for r in runs.values())
    for m in rows["moments"]:
        assert m["count"] + m["excluded"] == 8
        here = [
            r for r in rows["corrections"] if (r["probe"], r["step"]) == (m["probe"], m["step"])
        ]
        assert m["count"] == sum(np.isfinite(r["norm"]) for r in here)


def test_noise_aware_and_anti_regularization_rows_match_the_engine(data):
    """The study writes the noise-aware prediction at every fixed probe and step, Sec. 4's
    direction d where the optimizer has an eps, and each run's M along d."""
    from noisemem.noise_aware import anti_regularization_direction, noise_aware_correction

    spec = small_spec(permutations=2, chunk_size=2)
    ctx = context(spec, data)
    heavy, adam = spec.configs
    rows = {(r["probe"], r["step"], r["kind"]): r for r in predictions(ctx, adam)}
    model, loss = ctx.model, ctx.problem.loss_fn
    for n in ctx.probe_steps():
        na = noise_aware_correction(model, loss, ctx.problem, adam.optimizer, step=n)
        for kind, want in (
            ("noise_aware_mean", na.mean),
            ("noise_aware_full_batch_part", na.full_batch_part),
            ("noise_aware_noise_part", na.noise_part),
        ):
            got = torch.tensor(rows[("init", n, kind)]["vector"], dtype=torch.float64)
            assert rel_err(got, want) < 1e-12, (n, kind)
    d = anti_regularization_direction(model, loss, ctx.problem, eps=adam.optimizer.eps)
    got = torch.tensor(rows[("init", -1, "anti_regularization")]["vector"], dtype=torch.float64)
    assert rel_err(got, d) < 1e-12
    assert not [r for r in predictions(ctx, heavy) if r["kind"] == "anti_regularization"]
    raw = dict(spec.raw)
    raw["record"] = {"vectors": True}
    spec_v = StudySpec.from_dict(raw)
    chunk = run_chunk(context(spec_v, data), spec_v.configs[1], 0)
    for r in chunk["corrections"]:
        if r["probe"] == "init":
            M = torch.tensor(r["vector"], dtype=torch.float64)
            assert r["proj_anti"] == pytest.approx(float(M @ d / d.norm()), rel=1e-10)
    heavy_rows = run_chunk(context(spec_v, data), spec_v.configs[0], 0)["corrections"]
    assert all(np.isnan(r["proj_anti"]) for r in heavy_rows)  # heavy ball has no eps

"""E[M] against the exact expectation and the stored predictions, on stores whose answers
are known: moments made from given vectors, and a heavy-ball study whose exact expectation
is recomputed here with ``noisemem.expected_correction``."""

from __future__ import annotations

import numpy as np
import pytest
import stores
import torch
from scipy import stats as sps

import noisemem
from noisemem.analysis.compare import agreement, comparison_table, noise_parts, prediction_fits
from noisemem.analysis.results import analyse
from noisemem.studies.data import prepare, split_batches
from noisemem.studies.models import initial_parameters, spec_model
from noisemem.studies.tables import load

D = 40
RAW = {**stores.TINY, "training": {**stores.TINY["training"], "permutations": 64,
                                   "chunk_size": 16}}  # fmt: skip


def draws(rng: np.random.Generator, mu: np.ndarray, scale: np.ndarray, chunks: int, n: int):
    return [mu + scale * rng.normal(size=(n, mu.size)) for _ in range(chunks)]


def jackknife_se(chunks: list[np.ndarray], statistic) -> float:
    """The delete-one-chunk jackknife SE, straight from the raw vectors."""
    K = len(chunks)
    loo = np.array([statistic(np.concatenate(chunks[:k] + chunks[k + 1 :])) for k in range(K)])
    return float(np.sqrt((K - 1) / K * ((loo - loo.mean()) ** 2).sum()))


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A heavy-ball config whose 64 runs' M are mu + noise, its exact expectation mu."""
    rng = np.random.default_rng(0)
    mu = rng.normal(size=D)
    scale = rng.uniform(0.2, 1.0, size=D)
    chunks = draws(rng, mu, scale, 4, 16)
    config = "c000-HeavyBall-lr0.1-beta0.9"
    full_batch = mu + rng.normal(scale=0.3, size=D)
    noise_part = mu - full_batch
    preds = [
        stores.prediction_row(config, "exact_mean", mu, {"noise": 2.0}),
        stores.prediction_row(config, "exact_full_batch_part", full_batch),
        stores.prediction_row(config, "exact_noise_part", noise_part),
        stores.prediction_row(config, "full_batch", full_batch),
        stores.prediction_row(config, "full_batch_limit", 2 * full_batch, step=-1),
        stores.prediction_row(
            config, "noise_direction", noise_part / 0.1 / 2.0, {"R": 0.7}, step=-1
        ),
    ]
    uri, _ = stores.synthetic(
        tmp_path_factory.mktemp("known"), {config: chunks}, {config: preds}, raw=RAW
    )
    return load(uri), chunks, mu, full_batch, noise_part


def test_agreement_reads_the_z_scores_of_the_pooled_runs(known):
    tables, chunks, mu, _, _ = known
    (row,) = agreement(tables).itertuples(index=False)
    x = np.concatenate(chunks)
    z = (x.mean(0) - mu) / (x.std(0, ddof=1) / np.sqrt(len(x)))
    assert row.P == 64 and row.chunks == 4 and row.d == D
    assert row.rms_z == pytest.approx(np.sqrt(np.mean(z**2)), rel=1e-10)
    assert row.max_abs_z == pytest.approx(np.abs(z).max(), rel=1e-10)
    assert row.beyond_4se == int((np.abs(z) > 4).sum())
    assert row.rms_z_expected == pytest.approx(np.sqrt(63 / 61))
    assert row.beyond_4se_expected == pytest.approx(D * 2 * sps.t.sf(4, 63))

    def along(v: np.ndarray) -> float:
        return float(v.mean(0) @ mu) / float(mu @ mu)

    assert row.proj_exact == pytest.approx(along(x), rel=1e-12)
    se = jackknife_se(chunks, along)
    assert row.proj_z == pytest.approx((along(x) - 1) / se, rel=1e-9)
    half = sps.t.ppf(0.975, 3) * se
    assert (row.proj_exact_low, row.proj_exact_high) == pytest.approx(
        (along(x) - half, along(x) + half), rel=1e-9
    )
    assert row.within_4se  # drawn around mu: the check passes (fixed seed)


def test_an_exact_value_off_by_ten_percent_is_caught(tmp_path):
    rng = np.random.default_rng(1)
    mu = rng.normal(size=D)
    chunks = draws(rng, mu, np.full(D, 0.05), 4, 16)
    config = "c000-HeavyBall-lr0.1-beta0.9"
    preds = [stores.prediction_row(config, "exact_mean", 0.9 * mu)]
    uri, _ = stores.synthetic(tmp_path, {config: chunks}, {config: preds}, raw=RAW)
    tables = load(uri)
    (row,) = agreement(tables).itertuples(index=False)
    assert row.proj_exact == pytest.approx(1 / 0.9, rel=0.01)
    assert row.proj_z > 4 and not row.within_4se
    claims = analyse(tables, uri).claims
    (claim,) = claims[claims["claim"] == "exact_expectation"].itertuples(index=False)
    assert claim.verdict == "contradicted" and claim.subject == config


def test_every_prediction_of_e_m_is_compared(known):
    tables, chunks, mu, full_batch, noise_part = known
    fits = prediction_fits(tables).set_index("prediction")
    assert list(fits.index) == [
        "full_batch",
        "full_batch_limit",
        "full_batch+exact_noise_part",
        "exact_mean",
    ]  # the parts and the noise direction are not predictions of E[M]
    x = np.concatenate(chunks)
    mean = x.mean(0)
    noise2 = float((x.var(0, ddof=1) / len(x)).sum())
    compared = {
        "full_batch": full_batch,
        "full_batch_limit": 2 * full_batch,
        "exact_mean": mu,
        "full_batch+exact_noise_part": full_batch + noise_part,
    }
    for name, v in compared.items():
        r = fits.loc[name]
        cos = mean @ v / np.linalg.norm(mean) / np.linalg.norm(v)
        assert r.cos == pytest.approx(cos, rel=1e-12)
        norm2 = mean @ mean - noise2
        rel = np.sqrt(max((mean - v) @ (mean - v) - noise2, 0)) / np.sqrt(norm2)
        assert r.rel_err == pytest.approx(rel, rel=1e-9, abs=1e-12)
        assert r.explained == pytest.approx(1 - ((mean - v) @ (mean - v) - noise2) / norm2)
        assert r.norm_mc == pytest.approx(np.sqrt(norm2), rel=1e-12)
        assert r.proj == pytest.approx(mean @ v / (v @ v), rel=1e-12)
        assert r.cos_low <= r.cos <= r.cos_high <= 1
        se = jackknife_se(chunks, lambda y, v=v: float(y.mean(0) @ v / (v @ v)))
        assert r.proj_high - r.proj_low == pytest.approx(2 * sps.t.ppf(0.975, 3) * se, rel=1e-9)


def test_the_comparison_table_reads_the_noise_aware_prediction(tmp_path):
    rng = np.random.default_rng(3)
    mu = rng.normal(size=D)
    chunks = draws(rng, mu, np.full(D, 0.5), 4, 16)
    config = "c000-HeavyBall-lr0.1-beta0.9"
    aware = mu + rng.normal(scale=0.05, size=D)
    full_batch = mu + rng.normal(scale=0.5, size=D)
    preds = [
        stores.prediction_row(config, "full_batch", full_batch),
        stores.prediction_row(config, "noise_aware_mean", aware),
    ]
    uri, _ = stores.synthetic(tmp_path, {config: chunks}, {config: preds}, raw=RAW)
    (row,) = comparison_table(load(uri)).to_dict("records")
    mean = np.concatenate(chunks).mean(0)
    for name, v in (("full-batch", full_batch), ("noise-aware", aware)):
        cos = mean @ v / np.linalg.norm(mean) / np.linalg.norm(v)
        assert row[f"cos(MC, {name})"] == pytest.approx(cos, rel=1e-12)
        rel = np.linalg.norm(mean - v) / np.linalg.norm(v)
        assert row[f"rel(MC - {name})"] == pytest.approx(rel, rel=1e-9)
    assert np.isnan(row["|E[M]| exact"])  # no exact expectation stored


def test_noise_part_and_its_coefficient_along_cov(known):
    tables, chunks, _, full_batch, noise_part = known
    (r,) = noise_parts(tables).itertuples(index=False)
    x = np.concatenate(chunks)
    cov = noise_part / 0.1 / 2.0  # noise part = h c_noise Cov with h = 0.1, c_noise = 2
    assert r.R == 0.7 and r.c_noise_exact == 2.0 and r.lr == 0.1
    assert r.noise_exact == pytest.approx(np.linalg.norm(noise_part))
    assert r.c_noise_mc == pytest.approx((x.mean(0) - full_batch) @ cov / (0.1 * cov @ cov))
    assert r.c_noise_large_n == pytest.approx(0.9 / (0.1**2 * 1.9))
    se = (r.c_noise_mc_high - r.c_noise_mc_low) / (2 * sps.t.ppf(0.975, 3))
    assert abs(r.c_noise_mc - 2.0) <= 4 * se


def test_no_finite_runs_a_diverged_run_and_missing_chunks_are_reported(tmp_path):
    raw = {**stores.TINY, "optimizers": [{"kind": "HeavyBall", "lr": [0.1, 0.2], "beta": 0.9}]}
    rng = np.random.default_rng(2)
    mu = rng.normal(size=D)
    good, empty = "c000-HeavyBall-lr0.1-beta0.9", "c001-HeavyBall-lr0.2-beta0.9"
    chunks = {
        # run 1 diverged (chunk 0 holds one finite run), chunk 3 never written
        good: [mu + rng.normal(size=(1, D)), *draws(rng, mu, np.ones(D), 2, 2)],
        empty: [np.zeros((0, D))] * 4,  # every run left out
    }
    preds = {c: [stores.prediction_row(c, "exact_mean", mu)] for c in (good, empty)}
    statuses = {(good, 1): "diverged"} | {(empty, p): "diverged" for p in range(8)}
    uri, _ = stores.synthetic(tmp_path, chunks, preds, statuses=statuses, raw=raw)
    tables = load(uri)
    assert any(f"chunk 3 of {good}" in p and "missing" in p for p in tables.problems)
    rows = agreement(tables).set_index("config")
    assert rows.loc[good, "P"] == 5 and rows.loc[good, "excluded"] == 1
    assert rows.loc[empty, "P"] == 0 and np.isnan(rows.loc[empty, "rms_z"])
    a = analyse(tables, uri)
    claim = a.claims[(a.claims["claim"] == "exact_expectation") & (a.claims["subject"] == empty)]
    assert list(claim["verdict"]) == ["not measured"]


@pytest.fixture(scope="module")
def heavy_ball_store(tmp_path_factory):
    raw = {
        "name": "exact_check",
        "seed": 3,
        "data": {"source": "digits", "limit": 128},
        "model": {"kind": "gelu_mlp", "hidden": 4},
        "optimizers": [{"kind": "HeavyBall", "lr": 0.1, "beta": 0.9}],
        "training": {"batch_size": 32, "epochs": 2, "permutations": 24, "chunk_size": 6},
        "probes": {"init": True, "reference_steps": [2]},
        "record": {"steps": False},
        "runtime": {"dtype": "float64"},
    }
    spec = stores.StudySpec.from_dict({**raw, "output": str(tmp_path_factory.mktemp("hb"))})
    return spec, stores.build(spec)


def test_heavy_ball_mc_agrees_with_expected_correction(heavy_ball_store):
    """The store's exact predictions are noisemem.expected_correction at the probe, and the
    Monte Carlo mean of 24 runs lies within 4 SE of them."""
    spec, uri = heavy_ball_store
    tables = load(uri)
    x, y, info = prepare("digits", limit=128)
    model = initial_parameters(spec_model(spec, info), 3).double()
    batches = split_batches(x.double(), y, 32)
    opt = spec.configs[0].optimizer
    rows = agreement(tables)
    init = rows[rows["probe"] == "init"]
    assert sorted(init["step"]) == [3, 7]
    preds = tables.predictions
    for step in (3, 7):
        ex = noisemem.expected_correction(
            model, torch.nn.functional.cross_entropy, batches, opt, epochs=2, step=step
        )
        stored = preds[(preds["probe"] == "init") & (preds["step"] == step)]
        vec = np.asarray(stored[stored["kind"] == "exact_mean"]["vector"].iloc[0])
        assert np.allclose(vec, ex.mean.numpy(), rtol=1e-10, atol=1e-14)
        noise = noise_parts(tables)
        (c,) = noise[(noise["probe"] == "init") & (noise["step"] == step)].itertuples(index=False)
        assert c.c_noise_exact == pytest.approx(ex.coefficients["noise"], rel=1e-12)
    assert rows["within_4se"].all(), rows
    assert set(rows["probe"]) == {"init", "ref2"}

"""The sweep laws: the without-replacement variance by enumeration, the large-n noise
coefficient against the exact finite-n one, and the trends read from stores whose
answers are set in advance."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import stores
from scipy import stats as sps

from noisemem.analysis import laws
from noisemem.analysis.results import analyse
from noisemem.expectation import noise_scales, pair_coefficients
from noisemem.full_batch import adam_memory_weight
from noisemem.optim import HeavyBall
from noisemem.studies import rows
from noisemem.studies.tables import load

D = 12


@pytest.mark.parametrize(("N", "b"), [(6, 2), (6, 3), (8, 1), (7, 4)])
def test_without_replacement_is_the_variance_of_a_batch_mean(N, b):
    """Over every b-subset of N values, the mean squared deviation of the subset mean from
    the population mean is (N-b)/(b(N-1)) times the population variance (1/N)."""
    rng = np.random.default_rng(N * 10 + b)
    values = rng.normal(size=N)
    subsets = np.array([values[list(s)].mean() for s in itertools.combinations(range(N), b)])
    ratio = np.mean((subsets - values.mean()) ** 2) / np.var(values)
    assert ratio == pytest.approx(laws.without_replacement(N, b), rel=1e-12)


def test_exact_noise_coefficient_tends_to_the_papers_large_n_one():
    """One epoch of m = n + 1 permuted batches: C_same - C_epoch/(m-1) (THEORY §4) tends to
    beta/((1-beta)^2(1+beta)); at beta = 0.99 with 56 batches it is far from it (THEORY §8)."""

    def exact(beta: float, m: int) -> float:
        C = pair_coefficients(HeavyBall(lr=1.0, beta=beta), m - 1, m)
        s_same, s_diff = noise_scales("permute", m, 1)
        return C["same"] * s_same + C["epoch"] * s_diff

    for beta in (0.5, 0.9):
        assert exact(beta, 4000) == pytest.approx(laws.large_n_noise_coefficient(beta), rel=0.01)
    assert laws.large_n_noise_coefficient(0.99) > 5 * exact(0.99, 56)


def test_anti_regularization_coefficient_is_lemma_k2s():
    assert laws.anti_regularization_coefficient(0.9, 0.999, None) == pytest.approx(999 - 9)
    n = 55
    assert laws.anti_regularization_coefficient(0.9, 0.999, n) == pytest.approx(
        adam_memory_weight(0.999, n) - adam_memory_weight(0.9, n)
    )
    # finite n: a_j = b^(n+1) sum_k k beta^k, summed here term by term
    a = [
        (1 - b) / (1 - b ** (n + 1)) * sum(k * b**k for k in range(1, n + 1)) for b in (0.9, 0.999)
    ]
    assert laws.anti_regularization_coefficient(0.9, 0.999, n) == pytest.approx(a[1] - a[0])


SWEEP = {
    **stores.TINY,
    "data": {"source": "digits", "limit": 64},
    "training": {"batch_size": [4, 8, 16, 32], "epochs": 1, "permutations": 8, "chunk_size": 2},
}


def sweep_store(tmp_path, shape: str = "law", optimizers=None) -> tuple[str, object]:
    """A batch-size sweep whose R, noise part and MC vectors follow the without-replacement
    law exactly (``shape="law"``) or grow with the batch (``shape="reversed"``)."""
    raw = {**SWEEP, "optimizers": optimizers or SWEEP["optimizers"]}
    spec = stores.StudySpec.from_dict({**raw, "output": str(tmp_path / "spec-only")})
    rng = np.random.default_rng(7)
    cov1 = rng.normal(size=D)  # per-sample Cov
    fb = rng.normal(size=D)
    chunks, preds, steps = {}, {}, {}
    for c in spec.configs:
        b = c.batch_size
        m = 64 // b
        s = laws.without_replacement(64, b) if shape == "law" else b / 64
        coef = 1.0 + 0.1 * m  # any finite-n coefficient the law must carry along
        noise = 0.1 * coef * s * cov1
        mean = fb + noise
        chunks[c.id] = [mean + 1e-4 * rng.normal(size=(2, D)) for _ in range(4)]
        step = m - 1
        steps[c.id] = step
        preds[c.id] = [
            stores.prediction_row(c.id, "full_batch", fb, step=step),
            stores.prediction_row(c.id, "exact_mean", mean, {"noise": coef}, step=step),
            stores.prediction_row(c.id, "exact_noise_part", noise, step=step),
            stores.prediction_row(c.id, "noise_direction", s * cov1, {"R": 3.0 * s}, step=-1),
        ]
    uri, _ = stores.synthetic(tmp_path / shape, {}, {}, raw=raw)
    # each config's moments at its own probe step (m - 1), written with the store's API
    store = stores.Store(uri)
    for c in spec.configs:
        store.write_predictions(c.id, preds[c.id])
        for k, v in enumerate(chunks[c.id]):
            row = stores.moments_row(c.id, k, v, step=steps[c.id])
            runs = [rows.run_row(spec, c, k, p) for p in range(2 * k, 2 * k + 2)]
            store.write_chunk(c.id, k, {"runs": runs, "moments": [row]}, worker="test")
    return uri, spec


def test_batch_size_trend_follows_the_law_it_was_built_on(tmp_path):
    uri, _ = sweep_store(tmp_path)
    tables = load(uri)
    trend = laws.batch_size_trend(tables)
    assert list(trend["batch_size"]) == [4, 8, 16, 32]
    assert trend["R_ratio"].to_numpy() == pytest.approx(1.0, rel=1e-12)
    law = trend["noise_law"].to_numpy()
    assert trend["noise_exact"].to_numpy() / law == pytest.approx(1.0, rel=1e-12)
    # the Monte Carlo noise part (runs spread 1e-4 around it) is on the law within 4 of its
    # jackknife standard errors (4 chunks: 3 degrees of freedom)
    se = (trend["noise_ratio_high"] - trend["noise_ratio_low"]) / (2 * sps.t.ppf(0.975, 3))
    assert ((trend["noise_ratio"] - 1).abs() <= 4 * se).all()
    assert set(trend["law"]) == {"h c_noise s_b"}
    assert laws.decreasing(trend["noise_exact"])
    claims = analyse(tables, uri).claims.set_index("claim")
    assert claims.loc["noise_grows", "verdict"] == "supported"
    assert claims.loc["variance_law", "verdict"] == "supported"


def test_noise_growing_with_the_batch_is_contradicted(tmp_path):
    uri, _ = sweep_store(tmp_path, shape="reversed")
    claims = analyse(load(uri), uri).claims.set_index("claim")
    assert claims.loc["noise_grows", "verdict"] == "contradicted"
    assert claims.loc["variance_law", "verdict"] == "contradicted"


def test_families_group_configs_that_differ_in_one_field(tmp_path):
    raw = {
        **stores.TINY,
        "optimizers": [
            {"kind": "HeavyBall", "lr": 0.1, "beta": [0.5, 0.9]},
            {"kind": "HeavyBall", "lr": 0.2, "beta": [0.5, 0.9]},
            {"kind": "Nesterov", "lr": 0.1, "beta": 0.9},
        ],
    }
    uri, _ = stores.synthetic(tmp_path, {}, {}, raw=raw)
    fam = laws.families(load(uri), "beta")
    assert sorted(fam["family"].unique()) == ["HeavyBall(lr=0.1)", "HeavyBall(lr=0.2)"]
    assert len(fam) == 4  # Nesterov has one beta: no family
    assert laws.families(load(uri), "batch_size").empty


def test_anti_regularization_reads_the_sign_along_d(tmp_path):
    raw = {
        **stores.TINY,
        "optimizers": [
            {"kind": "AdamW", "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
            {"kind": "Lion", "lr": 1e-3, "rho1": 0.9, "rho2": 0.99, "eps": 1e-6},
        ],
    }
    rng = np.random.default_rng(9)
    d = rng.normal(size=D)
    u = d / np.linalg.norm(d)
    other = rng.normal(size=D)
    other -= (other @ u) * u
    adam, lion = (c.id for c in stores.StudySpec.from_dict(raw).configs)
    chunks = {
        adam: [-2.0 * u + other + 0.05 * rng.normal(size=(2, D)) for _ in range(4)],
        lion: [0.3 * u + other + 0.05 * rng.normal(size=(2, D)) for _ in range(4)],
    }
    preds = {
        c: [
            stores.prediction_row(c, "anti_regularization", d, step=-1),
            stores.prediction_row(c, "full_batch", -u),
        ]
        for c in chunks
    }
    uri, _ = stores.synthetic(tmp_path, chunks, preds, raw=raw)
    tables = load(uri)
    anti = laws.anti_regularization(tables).set_index("config")
    assert anti.loc[adam, "verdict"] == "anti-regularizes"
    assert anti.loc[adam, "proj_mc"] == pytest.approx(-2.0, abs=0.05)
    assert anti.loc[adam, "coefficient"] == pytest.approx(
        laws.anti_regularization_coefficient(0.9, 0.999, 3)
    )
    assert anti.loc[lion, "verdict"] == "regularizes" and np.isnan(anti.loc[lion, "coefficient"])
    claims = analyse(tables, uri).claims.set_index("claim")
    assert claims.loc["adamw_anti", "verdict"] == "supported"
    assert claims.loc["lion_none", "verdict"] == "supported"


@pytest.mark.parametrize(
    "low, high, full_batch, effect",
    [
        (-20.0, -10.0, -300.0, "weakens"),  # the main job's AdamW: same sign, far smaller
        (-400.0, -200.0, -300.0, "keeps"),
        (-600.0, -400.0, -300.0, "strengthens"),
        (-5.0, 5.0, -300.0, "removes"),
        (10.0, 20.0, -300.0, "flips"),
        (float("nan"), 1.0, -300.0, "not measured"),
    ],
)
def test_what_noise_does_to_the_anti_regularization(low, high, full_batch, effect):
    from noisemem.analysis.laws import noise_effect

    assert noise_effect(low, high, full_batch) == effect
    if effect not in ("removes", "not measured"):  # the same rule, mirrored
        assert noise_effect(-high, -low, -full_batch) == effect

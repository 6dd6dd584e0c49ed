"""Figure 1's slopes and regimes on l_inf distances built with known orders in h."""

from __future__ import annotations

import numpy as np
import pytest
import stores
from scipy import stats as sps

from noisemem.analysis import figure1
from noisemem.analysis.results import analyse
from noisemem.studies.tables import load

LRS = [1e-4, 3e-4, 1e-3]
STEPS = 40
SCALES = np.random.default_rng(1).uniform(0.5, 2.0, size=(4, 2))
RAW = {
    **stores.TINY,
    "optimizers": [
        # family 1: lr only; family 2: lr and weight decay 1e-3/lr (lambda h fixed)
        {"kind": "AdamW", "lr": LRS, "beta1": 0.5, "beta2": 0.9, "eps": 1e-6},
        {
            "kind": "AdamW",
            "lr": 1e-4,
            "beta1": 0.9,
            "beta2": 0.999,
            "eps": 1e-6,
            "weight_decay": 10.0,
        },
        {
            "kind": "AdamW",
            "lr": 1e-3,
            "beta1": 0.9,
            "beta2": 0.999,
            "eps": 1e-6,
            "weight_decay": 1.0,
        },
    ],
    "training": {"batch_size": 16, "epochs": 1, "permutations": 4, "chunk_size": 2},
}


def distances(rng, p: int, lr: float, early: int | None):
    """Per-step distances whose per-step errors are h^2 (first order) and h^3 (second):
    over a fixed horizon T = n h they sum to O(h) and O(h^2); over a fixed number of steps
    to O(h^2) and O(h^3). Each permutation has its own constants, and each run a 5% jitter
    of them. ``early``: the second-order run is closer only up to that step."""
    a, c = SCALES[p] * (1 + 0.05 * rng.normal(size=2))
    n = np.arange(1, STEPS + 1)
    first = a * lr**2 * n
    second = c * lr**3 * n
    if early is not None:
        second = np.where(n <= early, 0.5 * first, 2.0 * first)
    return first, second


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    spec = stores.StudySpec.from_dict({**RAW, "output": "unused"})
    steps = {}
    for c in spec.configs:
        lr = c.optimizer.lr
        long_memory = c.optimizer.beta2 == 0.999
        rows = []
        for p in range(4):
            first, second = distances(rng, p, lr, early=5 if long_memory else None)
            rows += [stores.step_row(c.id, p, s, first[s], second[s]) for s in range(STEPS)]
        steps[c.id] = rows
    empty = {c.id: [np.zeros((0, 3))] * 2 for c in spec.configs}  # two chunks, no moments
    uri, _ = stores.synthetic(tmp_path_factory.mktemp("f1"), empty, {}, raw=RAW, steps=steps)
    return load(uri), spec


def per_permutation_slopes(tables, configs: list[str], column: str, upto: dict[str, int]):
    s = tables.steps
    out = []
    for p in range(4):
        h, dist = [], []
        for c in configs:
            q = s[(s["config"] == c) & (s["permutation"] == p) & (s["step"] < upto[c])]
            h.append(float(c.split("-lr")[1].split("-")[0]))
            dist.append(q[column].max())
        out.append(np.polyfit(np.log(h), np.log(dist), 1)[0])
    return np.array(out)


def test_slopes_are_the_orders_the_distances_were_built_with(store):
    tables, spec = store
    slopes = figure1.figure1_slopes(tables).set_index(["family", "horizon", "order"])
    families = sorted({f for f, _, _ in slopes.index})
    assert families == ["AdamW(beta1=0.5, beta2=0.9, weight_decay*lr=0)",
                        "AdamW(beta1=0.9, beta2=0.999, weight_decay*lr=0.001)"]  # fmt: skip
    short = families[0]
    for horizon, (first, second) in {"fixed_time": (1, 2), "fixed_steps": (2, 3)}.items():
        for order, expected in (("first", first), ("second", second)):
            row = slopes.loc[(short, horizon, order)]
            assert row["slope"] == pytest.approx(expected, abs=0.1)
            assert row["slope_low"] < row["slope"] < row["slope_high"]
    # T = 40 steps x 1e-4: the configs of lr 3e-4 and 1e-3 go to steps 13 and 4
    configs = [c.id for c in spec.configs[:3]]
    upto = dict(zip(configs, [40, 13, 4], strict=True))
    got = per_permutation_slopes(tables, configs, "linf_first", upto)
    row = slopes.loc[(short, "fixed_time", "first")]
    half = sps.t.ppf(0.975, 3) * got.std(ddof=1) / 2
    assert row["slope"] == pytest.approx(got.mean(), abs=1e-12)
    assert (row["slope_low"], row["slope_high"]) == pytest.approx(
        (got.mean() - half, got.mean() + half), abs=1e-9
    )
    assert row["T"] == pytest.approx(40 * 1e-4)
    a = analyse(tables, "")
    orders = a.claims[a.claims["claim"] == "figure1_orders"].set_index("subject")
    assert orders.loc[f"{short} [fixed_time]", "verdict"] == "supported"
    assert orders.loc[f"{short} [fixed_steps]", "verdict"] == "contradicted"


def test_regimes_say_when_the_second_order_run_is_closer(store):
    tables, spec = store
    regimes = figure1.figure1_regimes(tables).set_index("config")
    short, long_ = spec.configs[0].id, spec.configs[3].id
    assert regimes.loc[short, "behaviour"] == "second order closer throughout"
    assert regimes.loc[short, "memory"] == pytest.approx(10.0)
    assert regimes.loc[short, "memory_regime"] == "short against the horizon"
    assert regimes.loc[long_, "behaviour"] == "second order closer only early (until step 5 of 40)"
    assert regimes.loc[long_, "memory_regime"] == "long against the horizon"
    assert regimes.loc[long_, "closer_share"] == pytest.approx(5 / 40)
    assert regimes.loc[long_, "h_memory"] == pytest.approx(1e-4 * 1000)
    a = analyse(tables, "")
    closer = a.claims[a.claims["claim"] == "figure1_closer"].set_index("subject")
    assert closer.loc[short, "verdict"] == "supported" and closer.loc[long_, "verdict"] == "mixed"


def test_a_store_without_distances_has_no_slopes(tmp_path):
    uri, _ = stores.synthetic(tmp_path, {}, {})
    tables = load(uri)
    assert figure1.figure1_slopes(tables).empty and figure1.figure1_regimes(tables).empty
    claims = analyse(tables, uri).claims
    assert set(claims[claims["claim"] == "figure1_orders"]["verdict"]) == {"not measured"}

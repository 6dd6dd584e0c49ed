"""The report of a heavy-ball + AdamW batch-size sweep (the ready spec, shrunk): the claims
it states with their intervals, summary.parquet, what it says of a damaged store, URIs."""

from __future__ import annotations

import html
import itertools
import re

import numpy as np
import pytest
import stores
import torch

import noisemem
from noisemem.analysis.report import SUMMARY, read_summary, write_report
from noisemem.analysis.results import SUMMARY_COLUMNS, analyse
from noisemem.studies.data import prepare, split_batches
from noisemem.studies.models import initial_parameters, spec_model
from noisemem.studies.schema import TABLES
from noisemem.studies.store import Store
from noisemem.studies.tables import load


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    uri = stores.ready("batch_size_sweep", tmp_path_factory.getbasetemp())
    return uri, write_report(uri)


def test_the_report_is_written_into_the_store(sweep):
    uri, report = sweep
    assert report == f"{uri}/report.html"
    store = Store(uri)
    assert store.exists("report.html") and store.exists(SUMMARY)
    summary = read_summary(uri)
    assert list(summary.columns) == [c for c, _, _ in SUMMARY_COLUMNS]
    # the store still reads as it did: the report's files are no part of any table
    tables = load(uri)
    assert not tables.problems and len(tables.runs) == 8 * 8


def test_heavy_balls_mc_e_m_is_within_4_se_of_the_exact_value(sweep):
    uri, _ = sweep
    summary = read_summary(uri)
    claims = summary[(summary["section"] == "claims") & (summary["subject"] == "exact_expectation")]
    verdicts = claims[claims["quantity"] == "verdict"].set_index("config")["text"]
    heavy = [c for c in load(uri).configs["config"] if "HeavyBall" in c]
    assert sorted(verdicts.index) == sorted(heavy) and set(verdicts) == {"supported"}
    values = claims[claims["quantity"] == "value"]
    assert (values["low"] <= 1).all() and (values["high"] >= 1).all()  # E[M] = 1 x exact
    agreement = summary[(summary["section"] == "agreement") & (summary["quantity"] == "proj_z")]
    assert (agreement["value"].abs() <= 4).all()


def test_the_noise_part_grows_as_the_batch_shrinks_next_to_its_law(sweep):
    """The report's exact noise parts are expected_correction's, recomputed here for each
    batch size; they shrink as b grows, and the report says so next to the law."""
    uri, _ = sweep
    spec = stores.shrunken("batch_size_sweep", "unused")
    x, y, info = prepare("digits", limit=256)
    model = initial_parameters(spec_model(spec, info), 0)
    norms = {}
    for c in spec.configs:
        if c.optimizer.name != "HeavyBall":
            continue
        batches = split_batches(x, y, c.batch_size)
        ex = noisemem.expected_correction(
            model, torch.nn.functional.cross_entropy, batches, c.optimizer
        )
        norms[c.batch_size] = float(ex.noise_part.double().norm())
    sizes = sorted(norms)
    assert all(norms[a] > norms[b] for a, b in itertools.pairwise(sizes))
    summary = read_summary(uri)
    batch = summary[(summary["section"] == "batch_size") & (summary["quantity"] == "noise_exact")]
    batch = batch[batch["probe"] == "init"]
    heavy = batch[batch["family"] == "HeavyBall"]
    got = dict(zip(heavy["config"].str.extract(r"batch_size(\d+)")[0].astype(int),
                   heavy["value"], strict=True))  # fmt: skip
    assert got == pytest.approx(norms, rel=1e-4)  # float32 study, float64 norms
    claims = summary[(summary["section"] == "claims") & (summary["subject"] == "noise_grows")]
    verdicts = claims[claims["quantity"] == "verdict"].set_index("family")["text"]
    assert verdicts["HeavyBall"] == "supported"
    law = summary[(summary["section"] == "batch_size") & (summary["quantity"] == "noise_law")]
    assert law["value"].notna().all() and (law["value"] > 0).all()


def test_every_number_of_the_claims_is_in_the_page(sweep):
    uri, _ = sweep
    page = Store(uri).read_text("report.html")
    a = analyse(load(uri), uri)
    for r in a.claims.itertuples(index=False):
        assert html.escape(r.evidence, quote=True) in page
        assert html.escape(r.statement, quote=True) in page
    # figures are embedded, nothing is fetched from elsewhere
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page
    for table in TABLES:  # the column reference of every table
        assert f'id="columns-{table}"' in page
    assert "batch_size = [" in page  # the resolved spec
    assert 'id="versions-table"' in page and torch.__version__ in page


def test_a_damaged_store_is_named_in_the_report(tmp_path):
    raw = {**stores.TINY, "optimizers": [{"kind": "HeavyBall", "lr": [0.1, 0.2], "beta": 0.9}]}
    rng = np.random.default_rng(0)
    mu = rng.normal(size=6)
    good, empty = "c000-HeavyBall-lr0.1-beta0.9", "c001-HeavyBall-lr0.2-beta0.9"
    chunks = {
        good: [mu + rng.normal(size=(1, 6)), mu + rng.normal(size=(2, 6))],  # chunks 2, 3 lost
        empty: [np.zeros((0, 6))] * 4,
    }
    preds = {good: [stores.prediction_row(good, "exact_mean", mu)]}  # c001's predictions lost
    statuses = {(good, 0): "diverged"} | {(empty, p): "diverged" for p in range(8)}
    uri, _ = stores.synthetic(tmp_path / "s", chunks, preds, statuses=statuses, raw=raw)
    write_report(uri)
    page = html.unescape(Store(uri).read_text("report.html"))
    for problem in load(uri).problems:
        assert problem in page
    assert f"chunk 2 of {good}: missing" in page and f"predictions of {empty}" in page
    assert "Configs with no finite run" in page and empty in page
    assert 'id="diverged"' in page
    summary = read_summary(uri)
    assert "claims" in set(summary["section"])


def test_the_report_goes_to_a_filesystem_uri(tmp_path):
    mu = np.ones(4)
    chunks = {"c000-HeavyBall-lr0.1-beta0.9": [mu + 0.1 * np.eye(4)[:2]] * 2}
    uri, _ = stores.synthetic(tmp_path / "u", chunks, {})
    target = f"file://{uri}"
    report = write_report(target, out_dir=tmp_path / "copy")
    assert report == f"{target}/report.html"
    assert (tmp_path / "u" / "report.html").exists() and (tmp_path / "copy" / SUMMARY).exists()
    assert read_summary(target).equals(read_summary(uri))

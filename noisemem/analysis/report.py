"""A study's report: every result of the analysis next to the paper's claims.

:func:`write_report` reads a store (any path or pyarrow filesystem URI the store supports)
and writes two files into it, atomically (:meth:`Store.write_bytes`):

* ``report.html``, self-contained (figures embedded as base64 PNG): each claim of the paper
  in words next to the number that supports or contradicts it, with its 95% interval; the
  tables and figures behind them; the store's state (missing, failed or damaged chunks,
  diverged runs, configs with no finite run); the resolved spec (``study.toml``); the
  library versions of the runs; what the analysis assumed; the column reference of every
  table (:func:`noisemem.studies.schema.reference`) and of ``summary.parquet``.
* ``summary.parquet``: every number of the report in one tidy table (:data:`SUMMARY_COLUMNS`).

Every number comes from :func:`analyse`, which reads the store's tables through the
analysis modules (:mod:`~noisemem.analysis.compare`, :mod:`~noisemem.analysis.laws`,
:mod:`~noisemem.analysis.figure1`); the page only formats them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, overload

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from noisemem.analysis import figure1, figures, laws
from noisemem.analysis import html as H
from noisemem.analysis.compare import (
    CHANCE,
    Z_OFF,
    agreement,
    chunk_stats,
    comparison_table,
    epoch_corrections,
    epoch_summary,
    noise_parts,
    prediction_fits,
)
from noisemem.analysis.intervals import LEVEL
from noisemem.studies.schema import reference
from noisemem.studies.store import Store
from noisemem.studies.tables import StudyTables, load

NAN = float("nan")
REPORT = "report.html"
SUMMARY = "summary.parquet"
#: a slope counts as the expected order when within this of it (or its interval holds it)
SLOPE_TOLERANCE = 0.25
#: the large-n coefficient counts as the exact one within this relative error
LARGE_N_TOLERANCE = 0.10
#: R counts as following the without-replacement law within this factor at every batch size
LAW_FACTOR = 1.5
VERDICTS = ("supported", "contradicted", "mixed", "inconclusive", "measured", "not measured")

#: summary.parquet: (name, type, meaning)
SUMMARY_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("section", pa.string(), "the analysis table the row comes from (claims: the claims)"),
    ("config", pa.string(), "config id, null for family-level rows"),
    ("family", pa.string(), "the sweep family (configs differing in one field), or null"),
    ("probe", pa.string(), "probe point, or null"),
    ("step", pa.int32(), "n of M^(n), or null"),
    ("subject", pa.string(), "what the row is about: prediction, order/horizon, claim id"),
    ("quantity", pa.string(), "the column of the analysis table"),
    ("value", pa.float64(), "its value (null for text)"),
    ("low", pa.float64(), "lower end of its 95% interval, null where it has none"),
    ("high", pa.float64(), "upper end of its 95% interval, null where it has none"),
    ("text", pa.string(), "a text value (verdict, regime, law, evidence), else null"),
)
SUMMARY_SCHEMA = pa.schema([(n, t) for n, t, _ in SUMMARY_COLUMNS])


@dataclass(frozen=True)
class Analysis:
    """Every table of the report, computed once from a store's tables."""

    tables: StudyTables
    uri: str = ""
    agreement: pd.DataFrame = field(default_factory=pd.DataFrame)
    fits: pd.DataFrame = field(default_factory=pd.DataFrame)
    noise: pd.DataFrame = field(default_factory=pd.DataFrame)
    epoch: pd.DataFrame = field(default_factory=pd.DataFrame)
    batch: pd.DataFrame = field(default_factory=pd.DataFrame)
    beta: pd.DataFrame = field(default_factory=pd.DataFrame)
    anti: pd.DataFrame = field(default_factory=pd.DataFrame)
    run_anti: pd.DataFrame = field(default_factory=pd.DataFrame)
    f1_points: pd.DataFrame = field(default_factory=pd.DataFrame)
    f1_slopes: pd.DataFrame = field(default_factory=pd.DataFrame)
    f1_regimes: pd.DataFrame = field(default_factory=pd.DataFrame)
    claims: pd.DataFrame = field(default_factory=pd.DataFrame)

    #: the analysis tables of summary.parquet: (section, attribute, id columns)
    SECTIONS = (
        ("agreement", "agreement", ("config", "probe", "step")),
        ("prediction_fit", "fits", ("config", "probe", "step", "prediction")),
        ("noise_part", "noise", ("config", "probe", "step")),
        ("epoch", "epoch", ("config", "step")),
        ("batch_size", "batch", ("family", "config", "probe", "step")),
        ("beta", "beta", ("family", "config", "probe", "step")),
        ("anti_regularization", "anti", ("family", "config", "probe", "step")),
        ("run_anti_regularization", "run_anti", ("config", "probe", "step")),
        ("figure1_slope", "f1_slopes", ("family", "order", "horizon")),
        ("figure1_regime", "f1_regimes", ("family", "config")),
    )


def analyse(tables: StudyTables, uri: str = "") -> Analysis:
    """Every analysis table of ``tables`` and the claims read from them."""
    parts = {
        "agreement": agreement(tables),
        "fits": prediction_fits(tables),
        "noise": noise_parts(tables),
        "epoch": epoch_corrections(tables),
        "batch": laws.batch_size_trend(tables),
        "beta": laws.beta_trend(tables),
        "anti": laws.anti_regularization(tables),
        "run_anti": laws.run_anti_regularization(tables),
        "f1_points": figure1.figure1_points(tables),
        "f1_slopes": figure1.figure1_slopes(tables),
        "f1_regimes": figure1.figure1_regimes(tables),
    }
    partial = Analysis(tables, uri, **parts)
    return Analysis(tables, uri, **parts, claims=claims(partial))


# -- the claims --------------------------------------------------------------------------------
CLAIM_COLUMNS = [
    "claim",
    "source",
    "statement",
    "subject",
    "evidence",
    "value",
    "low",
    "high",
    "verdict",
]

STATEMENTS = {
    "exact_expectation": (
        "Sec. 6.2, App. G; THEORY §4",
        "For heavy ball (and Nesterov) E[M] over batch orders has a closed form: the Monte "
        "Carlo mean lies within 4 standard errors of the exact expectation.",
    ),
    "noise_grows": (
        "Sec. 6.2; THEORY §4-5",
        "The noise part of E[M] (the implicit regularization by mini-batch noise) grows as "
        "the batch shrinks, as the without-replacement variance (N-b)/(b(N-1)) does (for "
        "heavy ball times the exact noise coefficient h c_noise(n, m)).",
    ),
    "variance_law": (
        "THEORY §5",
        "The mini-batch variance regularizer R = E|g_i - g|^2 scales as (N-b)/(b(N-1)) with "
        "the batch size (batches drawn without replacement).",
    ),
    "full_batch_adam": (
        "App. A (open); THEORY §8",
        "For Adam the full-batch prediction (Lemma K.2) stops explaining E[M] as the batch "
        "shrinks: its cosine with E[M] falls.",
    ),
    "large_n": (
        "Sec. 6.2; THEORY §4, §8",
        "Heavy ball's noise coefficient is beta/((1-beta)^2(1+beta)) for large n; the exact "
        "finite-n one agrees only when n >> 1/(1-beta).",
    ),
    "adamw_anti": (
        "Sec. 4",
        "With beta2 > beta1 memory anti-regularizes AdamW: E[M] points against "
        "d = grad ||grad L||_{1,eps}, so the memoryless iteration climbs ||grad L||_1.",
    ),
    "lion_none": (
        "Sec. 4",
        "Memory does not anti-regularize Lion: E[M] does not point against "
        "d = grad ||grad L||_{1,eps}.",
    ),
    "figure1_orders": (
        "Corollary 3.3; Sec. 5, Figure 1",
        "Over a fixed horizon the memoryful run is O(h) from the first-order memoryless run "
        "and O(h^2) from the second-order one (4): log-log slopes 1 and 2 against h.",
    ),
    "figure1_closer": (
        "Sec. 5, Figure 1",
        "The second-order memoryless iteration (4) stays closer to the memoryful run than "
        "the first-order one.",
    ),
    "explained": (
        "Appendix E, Lemmas K.1-K.3; THEORY §8",
        "How much of E[M] each prediction explains (share of |E[M]|^2, debiased).",
    ),
}


def _claim(
    claim: str,
    subject: str,
    evidence: str,
    verdict: str,
    value: float = NAN,
    low: float = NAN,
    high: float = NAN,
) -> dict[str, Any]:
    source, statement = STATEMENTS[claim]
    assert verdict in VERDICTS, verdict
    return {
        "claim": claim,
        "source": source,
        "statement": statement,
        "subject": subject,
        "evidence": evidence,
        "value": float(value),
        "low": float(low),
        "high": float(high),
        "verdict": verdict,
    }


n = H.number
iv = H.interval


def _last_fixed(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows at each config's first fixed probe (init first) and its last step there."""
    if frame.empty:
        return frame
    probes = frame.assign(_rank=(frame["probe"] != "init").astype(int))
    best = probes.sort_values(["config", "_rank", "probe", "step"])
    first_probe = best.groupby("config")["probe"].transform("first")
    best = best[best["probe"] == first_probe]
    last = best.groupby("config")["step"].transform("max")
    return best[best["step"] == last].drop(columns="_rank")


def _exact_claims(a: Analysis) -> list[dict[str, Any]]:
    g = a.agreement
    if g.empty:
        return [
            _claim(
                "exact_expectation",
                "",
                "no config with an exact expectation (heavy ball, Nesterov) in this store",
                "not measured",
            )
        ]
    out = []
    for config, rows in g.groupby("config", sort=True):
        rows = rows[rows["P"] >= 2]
        if rows.empty:
            out.append(_claim("exact_expectation", config, "no finite runs", "not measured"))
            continue
        z = rows["proj_z"].abs().fillna(-1)
        w = rows.loc[z.idxmax()]
        ok = int(rows["within_4se"].sum())
        along = iv(w.proj_exact, w.proj_exact_low, w.proj_exact_high)
        evidence = (
            f"{ok} of {len(rows)} probe points within 4 SE. Farthest, {w.probe} step {w.step}: "
            f"along the exact direction E[M] = {along} x exact (z = {n(w.proj_z, 3)}); "
            f"rms z {n(w.rms_z, 3)} (agreement: {n(w.rms_z_expected, 3)}); {w.beyond_4se} of "
            f"{w.d} coordinates beyond 4 SE (chance allows {w.beyond_4se_allowed}); max |z| "
            f"{n(w.max_abs_z, 3)} (chance maximum {n(w.max_abs_z_chance, 3)}); P = {w.P} runs "
            f"in {w.chunks} chunks."
        )
        verdict = "supported" if ok == len(rows) else "contradicted"
        out.append(
            _claim(
                "exact_expectation",
                config,
                evidence,
                verdict,
                w.proj_exact,
                w.proj_exact_low,
                w.proj_exact_high,
            )
        )
    return out


def _first_probe_epoch(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    probe = "init" if (frame["probe"] == "init").any() else sorted(frame["probe"])[0]
    t = frame[frame["probe"] == probe]
    return t[t["epoch"] == t["epoch"].min()]


def _batch_claims(a: Analysis) -> list[dict[str, Any]]:
    t = _first_probe_epoch(a.batch)
    if t.empty:
        return [
            _claim("noise_grows", "", "no batch-size sweep in this store", "not measured"),
            _claim("variance_law", "", "no batch-size sweep in this store", "not measured"),
        ]
    out = []
    for family, g in t.groupby("family", sort=True):
        g = g.sort_values("batch_size")
        exact = g["law"].iloc[0] == "h c_noise s_b"
        values = g["noise_exact" if exact else "noise_mc"].to_numpy(float)
        shrinking = laws.decreasing(values)
        growing = laws.decreasing(values[::-1])
        small, large = g.iloc[0], g.iloc[-1]
        separated = small.noise_mc_low > large.noise_mc_high
        reversed_ = large.noise_mc_low > small.noise_mc_high
        if exact:
            verdict = "supported" if shrinking else "contradicted"
        elif shrinking and separated:
            verdict = "supported"
        elif growing and reversed_:
            verdict = "contradicted"
        else:
            verdict = "inconclusive"
        points = "; ".join(
            f"b={r.batch_size}: "
            + (f"exact {n(r.noise_exact, 3)}, " if exact else "")
            + f"MC {iv(r.noise_mc, r.noise_mc_low, r.noise_mc_high)}, law {n(r.noise_law, 3)}"
            for r in g.itertuples(index=False)
        )
        growth = values[0] / values[-1] if values[-1] > 0 else NAN
        law_growth = small.noise_law / large.noise_law if large.noise_law > 0 else NAN
        evidence = (
            f"{small.probe}, end of epoch {small.epoch}: {points}. From b={large.batch_size} to "
            f"b={small.batch_size} the {'exact' if exact else 'MC'} noise part grows x"
            f"{n(growth, 3)}, the law (shape {small.law}, one fitted scale) x{n(law_growth, 3)}; "
            f"MC/law ratios {n(g['noise_ratio'].min(), 3)} to {n(g['noise_ratio'].max(), 3)}."
        )
        low = high = NAN
        if not exact and large.noise_mc_high > 0 and large.noise_mc_low > 0:
            low = small.noise_mc_low / large.noise_mc_high
            high = small.noise_mc_high / large.noise_mc_low
        out.append(_claim("noise_grows", family, evidence, verdict, growth, low, high))
        ratios = g["R_ratio"].to_numpy(float)
        ok = bool(np.all((ratios <= LAW_FACTOR) & (ratios >= 1 / LAW_FACTOR)))
        r_growth = small.R / large.R if large.R > 0 else NAN
        s_growth = small.s_b / large.s_b if large.s_b > 0 else NAN
        evidence = (
            f"R from b={large.batch_size} to b={small.batch_size}: x{n(r_growth, 3)}, law "
            f"(N-b)/(b(N-1)) x{n(s_growth, 3)}; R/law {n(ratios.min(), 3)} to "
            f"{n(ratios.max(), 3)} (one fixed split of the data, not a fresh random one)."
        )
        out.append(
            _claim(
                "variance_law", family, evidence, "supported" if ok else "contradicted", r_growth
            )
        )
    return out


def _adam_batch_claims(a: Analysis) -> list[dict[str, Any]]:
    t = _first_probe_epoch(a.batch)
    fits = a.fits[a.fits["prediction"] == "full_batch"] if len(a.fits) else a.fits
    t = t[t["optimizer"].isin(laws.ADAM_LIKE)] if len(t) else t
    out = []
    for family, g in t.groupby("family", sort=True):
        g = g.sort_values("batch_size")
        rows = [
            fits[
                (fits["config"] == r.config) & (fits["probe"] == r.probe) & (fits["step"] == r.step)
            ]
            for r in g.itertuples(index=False)
        ]
        if any(r.empty for r in rows):
            continue
        cos = [r.iloc[0] for r in rows]
        small, large = cos[0], cos[-1]
        falls = small.cos_high < large.cos_low
        rises = small.cos_low > large.cos_high
        verdict = "supported" if falls else ("contradicted" if rises else "inconclusive")
        evidence = "; ".join(
            f"b={b}: cos {iv(c.cos, c.cos_low, c.cos_high)}, explained "
            f"{iv(c.explained, c.explained_low, c.explained_high)}"
            for b, c in zip(g["batch_size"], cos, strict=True)
        )
        out.append(
            _claim(
                "full_batch_adam",
                family,
                evidence,
                verdict,
                small.cos,
                small.cos_low,
                small.cos_high,
            )
        )
    return out


def _beta_claims(a: Analysis) -> list[dict[str, Any]]:
    t = a.beta
    if t.empty:
        return [
            _claim("large_n", "", "no sweep of heavy ball's beta in this store", "not measured")
        ]
    t = t[t["probe"] == ("init" if (t["probe"] == "init").any() else sorted(t["probe"])[0])]
    t = t[t["step"] == t.groupby("config")["step"].transform("max")]
    out = []
    for family, g in t.groupby("family", sort=True):
        g = g.sort_values("beta")
        close = (g["large_n_over_exact"] - 1).abs() <= LARGE_N_TOLERANCE
        verdict = "supported" if close.all() else ("contradicted" if not close.any() else "mixed")
        evidence = "; ".join(
            f"beta={n(r.beta, 3)} (m={r.num_batches}, n={r.step}): exact {n(r.c_noise_exact, 4)},"
            f" large-n {n(r.c_noise_large_n, 4)} (x{n(r.large_n_over_exact, 3)}), measured "
            f"{iv(r.c_noise_mc, r.c_noise_mc_low, r.c_noise_mc_high)}"
            for r in g.itertuples(index=False)
        )
        worst = g.loc[(g["large_n_over_exact"] - 1).abs().idxmax()]
        out.append(_claim("large_n", family, evidence, verdict, worst.large_n_over_exact))
    return out


def _anti_claims(a: Analysis) -> list[dict[str, Any]]:
    hyper = {r.config: r.hp for r in laws.config_frame(a.tables).itertuples(index=False)}
    adam = [
        c
        for c, hp in hyper.items()
        if hp.get("kind") in laws.ADAM_LIKE
        and float(hp.get("beta2", 0)) > float(hp.get("beta1", 1))
    ]
    lion = [c for c, hp in hyper.items() if hp.get("kind") == "Lion"]
    t = _last_fixed(a.anti)
    out = []
    for claim, configs, what in (
        ("adamw_anti", adam, "AdamW/NAdamW config with beta2 > beta1"),
        ("lion_none", lion, "Lion config"),
    ):
        if not configs:
            out.append(_claim(claim, "", f"no {what} in this study", "not measured"))
            continue
        for config in configs:
            hit = t[t["config"] == config] if len(t) else t
            if hit.empty:
                out.append(
                    _claim(
                        claim,
                        config,
                        "this store has no anti_regularization prediction (the direction d) for it",
                        "not measured",
                    )
                )
                continue
            r = hit.iloc[0]
            sign = r.verdict
            if claim == "adamw_anti":
                verdict = {"anti-regularizes": "supported", "regularizes": "contradicted"}.get(
                    sign, "inconclusive"
                )
            else:
                verdict = "contradicted" if sign == "anti-regularizes" else "supported"
            proj = iv(r.proj_mc, r.proj_mc_low, r.proj_mc_high)
            cos = iv(r.cos_mc, r.cos_mc_low, r.cos_mc_high)
            evidence = (
                f"{r.probe} step {r.step}: <E[M], d>/|d| = {proj} ({sign}); cos(E[M], d) = "
                f"{cos}; full-batch prediction {n(r.proj_full_batch, 3)}"
            )
            if claim == "adamw_anti":
                a2a1 = n(r.coefficient, 4)
                evidence += f"; a2 - a1 = {a2a1} (limit {n(r.coefficient_limit, 4)})"
            evidence += f"; P = {r.P}."
            out.append(
                _claim(claim, config, evidence, verdict, r.proj_mc, r.proj_mc_low, r.proj_mc_high)
            )
    return out


def _figure1_claims(a: Analysis) -> list[dict[str, Any]]:
    s = a.f1_slopes
    if s.empty:
        evidence = (
            "no configs differing only in lr (or lr and a weight decay scaled as 1/lr) with "
            "recorded l_inf distances (record.memoryless) in this store"
        )
        out = [_claim("figure1_orders", "", evidence, "not measured")]
    else:
        out = []
        for (family, horizon), g in s.groupby(["family", "horizon"], sort=True):
            parts, ok = [], []
            for r in g.sort_values("order").itertuples(index=False):
                holds = abs(r.slope - r.expected) <= SLOPE_TOLERANCE or (
                    r.slope_low <= r.expected <= r.slope_high
                )
                ok.append(bool(holds))
                parts.append(
                    f"{r.order} order: slope {iv(r.slope, r.slope_low, r.slope_high)} "
                    f"(expected {n(r.expected)}; slope of the mean {n(r.slope_of_mean, 3)})"
                )
            r0 = g.iloc[0]
            where = f"T = {n(r0['T'], 3)}" if horizon == "fixed_time" else "every recorded step"
            evidence = (
                f"{horizon.replace('_', ' ')} ({where}), h in {{{r0['lrs']}}}, "
                f"{r0['permutations']} permutations: " + "; ".join(parts) + "."
            )
            verdict = "supported" if all(ok) else ("contradicted" if not any(ok) else "mixed")
            subject = f"{family} [{horizon}]"
            second = g[g["order"] == "second"]
            value = float(second["slope"].iloc[0]) if len(second) else NAN
            low = float(second["slope_low"].iloc[0]) if len(second) else NAN
            high = float(second["slope_high"].iloc[0]) if len(second) else NAN
            out.append(_claim("figure1_orders", subject, evidence, verdict, value, low, high))
    for r in a.f1_regimes.itertuples(index=False):
        b = r.behaviour
        verdict = (
            "supported"
            if b.endswith("throughout")
            else "contradicted"
            if "never" in b
            else "not measured"
            if b == "not measured"
            else "mixed"
        )
        evidence = (
            f"{b}; memory L = {n(r.memory, 4)} steps, horizon {r.steps} steps = "
            f"{n(r.memory_lengths, 3)} memory lengths ({r.memory_regime}), h L = "
            f"{n(r.h_memory, 3)}; closer at {n(r.closer_share, 3)} of steps; final "
            f"second/first distance {n(r.final_ratio, 3)}."
        )
        out.append(_claim("figure1_closer", r.config, evidence, verdict, r.closer_share))
    return out


def _explained_claims(a: Analysis) -> list[dict[str, Any]]:
    f = _last_fixed(a.fits)
    out = []
    for config, g in f.groupby("config", sort=True):
        parts = [
            f"{r.prediction}: {iv(r.explained, r.explained_low, r.explained_high)} "
            f"(cos {iv(r.cos, r.cos_low, r.cos_high)})"
            for r in g.itertuples(index=False)
        ]
        r0 = g.iloc[0]
        evidence = f"{r0.probe} step {r0.step}, P = {r0.P}: " + "; ".join(parts) + "."
        out.append(_claim("explained", config, evidence, "measured"))
    return out


def claims(a: Analysis) -> pd.DataFrame:
    """The paper's claims, each in words next to the numbers of ``a`` that support or
    contradict it, with a verdict (:data:`VERDICTS`) per config or family."""
    rows: list[dict[str, Any]] = []
    for build in (
        _exact_claims,
        _batch_claims,
        _adam_batch_claims,
        _beta_claims,
        _anti_claims,
        _figure1_claims,
        _explained_claims,
    ):
        rows += build(a)
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


# -- summary.parquet ---------------------------------------------------------------------------
def _melt(section: str, frame: pd.DataFrame, ids: tuple[str, ...]) -> list[dict[str, Any]]:
    """One summary row per (row of ``frame``, value column): intervals from ``x_low`` and
    ``x_high``, text columns as ``text``."""
    if frame.empty:
        return []
    names = set(frame.columns)
    skip = set(ids) | {
        c for c in names if c.endswith(("_low", "_high")) and c.rsplit("_", 1)[0] in names
    }
    subject_col = next((c for c in ("prediction", "order") if c in ids), None)
    out = []
    for rec in frame.to_dict("records"):
        base = {
            "section": section,
            "config": rec.get("config"),
            "family": rec.get("family") or None,
            "probe": rec.get("probe"),
            "step": int(rec["step"]) if "step" in rec and pd.notna(rec["step"]) else None,
            "subject": None,
        }
        if subject_col is not None:
            base["subject"] = str(rec[subject_col])
            if "horizon" in rec:
                base["subject"] += f" [{rec['horizon']}]"
        for col in frame.columns:
            if col in skip or col == "hp":
                continue
            v = rec[col]
            row = {**base, "quantity": col, "value": None, "low": None, "high": None, "text": None}
            if isinstance(v, bool | np.bool_):
                row["value"] = float(v)
            elif isinstance(v, int | float | np.integer | np.floating):
                row["value"] = float(v)
                if f"{col}_low" in names:
                    row["low"], row["high"] = float(rec[f"{col}_low"]), float(rec[f"{col}_high"])
            elif v is None:
                continue
            else:
                row["text"] = str(v)
            out.append(row)
    return out


def summary_frame(a: Analysis) -> pd.DataFrame:
    """Every number of the report, tidy (:data:`SUMMARY_COLUMNS`): each analysis table
    melted, and each claim with its verdict (quantity ``verdict``) and headline number."""
    rows: list[dict[str, Any]] = []
    for section, attr, ids in Analysis.SECTIONS:
        rows += _melt(section, getattr(a, attr), ids)
    for r in a.claims.itertuples(index=False):
        base = {
            "section": "claims",
            "config": None,
            "family": None,
            "probe": None,
            "step": None,
            "subject": r.claim,
        }
        is_config = r.subject in set(a.tables.configs["config"]) if len(a.tables.configs) else False
        base["config" if is_config else "family"] = r.subject or None
        rows.append(
            {
                **base,
                "quantity": "verdict",
                "value": None,
                "low": None,
                "high": None,
                "text": r.verdict,
            }
        )
        rows.append(
            {
                **base,
                "quantity": "value",
                "value": r.value,
                "low": r.low,
                "high": r.high,
                "text": r.evidence,
            }
        )
    frame = pd.DataFrame(rows, columns=[c for c, _, _ in SUMMARY_COLUMNS])
    for col in ("value", "low", "high"):
        frame[col] = frame[col].astype(float)
    return frame


def summary_parquet(frame: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(frame, schema=SUMMARY_SCHEMA, preserve_index=False)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# -- report.html -------------------------------------------------------------------------------
def _versions(runs: pd.DataFrame) -> pd.DataFrame:
    """Library versions of the runs (``runs.versions``): one row per library and version."""
    rows: dict[tuple[str, str], int] = {}
    for text in runs["versions"].dropna() if "versions" in runs else []:
        try:
            versions = json.loads(text)
        except (TypeError, ValueError):
            continue
        for lib, version in versions.items():
            rows[(lib, str(version))] = rows.get((lib, str(version)), 0) + 1
    return pd.DataFrame(
        [{"library": k[0], "version": k[1], "runs": v} for k, v in sorted(rows.items())],
        columns=["library", "version", "runs"],
    )


def _no_finite_runs(tables: StudyTables) -> list[str]:
    """Configs none of whose runs gave a finite M anywhere (or that have no moments)."""
    stats = chunk_stats(tables.moments)
    counts: dict[str, int] = {}
    for (config, _, _), s in stats.items():
        counts[config] = counts.get(config, 0) + int(s.counts.sum())
    return [c for c in tables.configs["config"] if counts.get(c, 0) == 0]


def _status(a: Analysis, chunks: int) -> tuple[str, pd.DataFrame]:
    t = a.tables
    m = t.manifest
    configs = len(m.get("configs", []))
    bad_chunks = sum(1 for p in t.problems if p.startswith("chunk "))
    bad_preds = sum(1 for p in t.problems if p.startswith("predictions "))
    counts = t.runs["status"].value_counts().to_dict() if len(t.runs) else {}
    facts = pd.DataFrame(
        [
            ("study", m.get("study")),
            ("store", a.uri),
            ("schema version", m.get("schema_version")),
            ("marked complete", m.get("complete")),
            ("configs", configs),
            ("permutations per config", m.get("permutations")),
            ("chunks done", f"{configs * chunks - bad_chunks} of {configs * chunks}"),
            ("predictions done", f"{configs - bad_preds} of {configs} configs"),
            ("runs by status", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"),
            ("data", json.dumps(m.get("data", {}))),
        ],
        columns=["what", "value"],
    )
    lines = []
    if t.problems:
        lines.append(
            f"<p>{len(t.problems)} missing, failed or damaged items (left out of "
            "every number below):</p>" + H.items(t.problems)
        )
    else:
        lines.append(
            "<p>Every chunk and every config's predictions are present and verified "
            "against their records.</p>"
        )
    empty = _no_finite_runs(t)
    if empty:
        lines.append(
            "<p>Configs with no finite run (no Monte Carlo estimate):</p>" + H.items(empty)
        )
    return "".join(lines), facts


ASSUMPTIONS = [
    "E[M] is estimated by the mean of Eq. (9) over the runs' batch orders; chunks are pooled "
    "exactly from their count, mean and M2; per-coordinate standard errors are "
    "sqrt(M2/(P-1)/P).",
    f"Intervals are {LEVEL:.0%}: for scalars of the Monte Carlo mean, the delete-one-chunk "
    "jackknife with t quantiles on K-1 degrees of freedom (K chunks with runs); for means "
    "over runs (corrections at each run's own parameters, Figure 1 slopes per permutation), "
    "the t interval over runs. Chunks of unequal size make the jackknife approximate; with "
    "one chunk there is no interval.",
    "Norms of E[M] and of E[M] minus a prediction are debiased: |mean|^2 - sum stderr^2 "
    "(negative values read as 0). Cosines are not debiased: Monte Carlo noise pulls them "
    "towards 0. rel_err = |E[M] - prediction|/|E[M]|; explained = 1 - rel_err^2.",
    f"Agreement with the exact expectation: z = (MC - exact)/stderr is t with P-1 dof; "
    f"'within 4 SE' means E[M] along the exact direction is within {Z_OFF:g} jackknife SE of "
    f"it and no more coordinates lie beyond {Z_OFF:g} SE than the binomial "
    f"{CHANCE:.0%} quantile for d independent t's allows (with thousands of coordinates "
    f"some exceed {Z_OFF:g} by chance). Coordinates with zero spread count as z = 0 "
    "when MC equals the exact value there.",
    "The noise part is E[M] minus the full-batch prediction at the same step (the exact "
    "full-batch part for heavy ball and Nesterov). Its coefficient c_noise is measured as "
    "<E[M] - full-batch, Cov>/(h |Cov|^2) with Cov the stored noise direction.",
    "Batch-size law: (N-b)/(b(N-1)) (b of N samples without replacement) times, for heavy "
    "ball and Nesterov, h c_noise(n, m) from the exact predictions; the per-sample size is "
    f"fitted (one scale per family). R follows the law when within a factor {LAW_FACTOR:g} "
    "at every batch size. A store's batches are one fixed split of the data, for which the "
    "law holds on average over splits, not exactly.",
    f"Heavy ball's large-n coefficient counts as the exact one within {LARGE_N_TOLERANCE:.0%}.",
    "Anti-regularization: the sign of <E[M], d>/|d|, d = grad ||grad L||_{1,eps} (the store's "
    "anti_regularization prediction); negative with its interval below 0 is "
    "anti-regularization. a2 - a1 is Lemma K.2's coefficient at the probe step.",
    f"Figure 1: families are configs differing only in lr, or in lr and a weight decay with "
    f"lr x weight decay fixed. The distance over a horizon is its largest l_inf value; "
    f"'fixed time' uses steps n + 1 <= T/h with T the shortest run's steps x h, 'fixed steps' "
    f"every recorded step. Slopes are least squares of log distance on log h per "
    f"permutation, averaged over permutations; a slope counts as its order within "
    f"{SLOPE_TOLERANCE:g} or when its interval holds it. Memory L = 1/(1 - max beta) steps; "
    f"short against the horizon from {figure1.SHORT_MEMORY:g} L on. Distances below "
    f"{figure1.TIE:g} of a run's largest first-order distance are ties.",
    "Runs marked diverged are in the runs table; their corrections after divergence are not "
    "in the moments (the moments' excluded column counts them).",
]

SECTIONS_NAV = [
    ("claims", "Claims"), ("status", "Store"), ("exact", "E[M] vs exact"),
    ("predictions", "Predictions"), ("noise", "Noise part"), ("sweeps", "Sweeps"),
    ("figure1", "Figure 1"), ("own", "Runs' own parameters"), ("convergence", "Convergence"),
    ("spec", "Spec"), ("versions", "Versions"), ("assumptions", "Assumptions"),
    ("columns", "Column reference"),
]  # fmt: skip

DROP = {"hp"}


def _section(anchor: str, title: str, *content: str) -> str:
    return f'<section id="{anchor}"><h2>{H.esc(title)}</h2>{"".join(content)}</section>'


def _frame_or_note(
    frame: pd.DataFrame,
    table_id: str,
    caption: str,
    absent: str,
    text_columns: tuple[str, ...] = (),
) -> str:
    if frame.empty:
        return H.paragraphs([absent], "note")
    frame = frame.drop(columns=[c for c in DROP if c in frame.columns])
    return H.table(frame, table_id, caption, text_columns=text_columns)


def _figure(data: bytes | None, alt: str, caption: str, figure_id: str) -> str:
    return H.image(data, alt, caption, figure_id) if data else ""


def render(a: Analysis, spec_text: str | None, chunks: int) -> str:
    """The report as one HTML document (numbers from ``a``; ``spec_text`` the store's
    ``study.toml``)."""
    t = a.tables
    m = t.manifest
    name = str(m.get("study", "study"))
    try:
        version = metadata.version("noisemem")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        version = "unknown"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = "<nav>" + "".join(f'<a href="#{k}">{H.esc(v)}</a>' for k, v in SECTIONS_NAV) + "</nav>"
    head = (
        f"<h1>noisemem study <code>{H.esc(name)}</code></h1>"
        f'<p class="note">Store {H.esc(a.uri)}; report by noisemem {H.esc(version)}, {when}. '
        'Every column is explained in the <a href="#columns">column reference</a>; every '
        f"number is also in <code>{SUMMARY}</code> beside this file.</p>{nav}"
    )
    claims_html = H.table(
        a.claims.drop(columns=["value", "low", "high"]),
        "claims",
        "Each claim of the paper, the numbers of this store that bear on it, and the verdict",
        text_columns=("evidence", "statement", "subject", "source", "claim", "verdict"),
        classes=[v.replace(" ", "-") for v in a.claims["verdict"]],
    )
    status_html, facts = _status(a, chunks)
    diverged = t.runs[t.runs["status"] == "diverged"] if len(t.runs) else t.runs
    diverged_html = (
        H.table(
            diverged[["config", "chunk", "permutation", "diverged_at"]],
            "diverged",
            f"Runs marked diverged ({len(diverged)})",
        )
        if len(diverged)
        else H.paragraphs(["No run diverged."], "note")
    )
    failed = t.runs[t.runs["status"] == "failed"] if len(t.runs) else t.runs
    failed_html = ""
    if len(failed):
        errors = failed.assign(error=failed["error"].fillna("").map(_last_line))
        failed_html = H.table(
            errors[["config", "chunk", "permutation", "error"]],
            "failed",
            f"Runs of failed chunks ({len(failed)})",
            text_columns=("error",),
        )
    dist = figure1.linf_distances(t)
    fam = figure1.figure1_families(t)
    body = [
        head,
        _section("claims", "The paper's claims next to the numbers", claims_html),
        _section(
            "status",
            "What the store holds",
            H.table(facts, "status-table", "The store", text_columns=("what", "value")),
            status_html,
            diverged_html,
            failed_html,
        ),
        _section(
            "exact",
            "Monte Carlo E[M] against the exact expectation",
            _frame_or_note(
                a.agreement,
                "agreement",
                "z-scores of MC E[M] against the exact expectation (heavy ball, Nesterov)",
                "No exact expectation in this store (only heavy ball and Nesterov have one).",
            ),
            _figure(
                figures.coordinates(t),
                "measured vs predicted coordinates",
                "MC E[M] against the prediction, coordinate by coordinate (exact, else "
                "noise-aware, else full-batch; 2-SE bars), first fixed probe, last step.",
                "figure-coordinates",
            ),
        ),
        _section(
            "predictions",
            "How much of E[M] each prediction explains",
            _frame_or_note(
                a.fits,
                "prediction-fits",
                "MC E[M] against every prediction stored beside it",
                "No predictions at fixed probes in this store.",
            ),
        ),
        _section(
            "noise",
            "The noise part against the full-batch part, and the variance regularizer R",
            _frame_or_note(
                a.noise,
                "noise-parts",
                "Noise part = MC E[M] - full-batch prediction; R = E|g_i - g|^2",
                "No full-batch predictions in this store.",
            ),
        ),
        _section(
            "sweeps",
            "Trends across sweeps, next to their laws",
            "<h3>Batch size: the without-replacement law</h3>",
            _frame_or_note(
                a.batch,
                "batch-size",
                "Noise part and R across batch sizes",
                "No batch-size sweep in this store.",
            ),
            _figure(
                figures.batch_size_figure(a.batch),
                "noise part vs batch size",
                "Noise part (MC with 95% intervals; exact where it exists) and R against "
                "the batch size, with the law (N-b)/(b(N-1)) fitted by one scale.",
                "figure-batch-size",
            ),
            "<h3>Heavy ball's beta: exact finite-n and large-n noise coefficients</h3>",
            _frame_or_note(
                a.beta,
                "beta",
                "The noise coefficient across beta",
                "No sweep of heavy ball's beta in this store.",
            ),
            _figure(
                figures.beta_figure(a.beta),
                "noise coefficient vs beta",
                "Exact finite-n, the paper's large-n and the measured noise coefficient.",
                "figure-beta",
            ),
            "<h3>AdamW's anti-regularization (Sec. 4) and Lion</h3>",
            _frame_or_note(
                a.anti,
                "anti-regularization",
                "E[M] along d = grad ||grad L||_{1,eps}",
                "This store has no anti_regularization predictions "
                "(the direction d): the sign of E[M] along d is not measurable "
                "from it.",
            ),
            _frame_or_note(
                a.run_anti,
                "run-anti-regularization",
                "Per-run projections on d (corrections.proj_anti)",
                "No per-run projections on d (corrections.proj_anti) in this store.",
            ),
            _figure(
                figures.anti_regularization_figure(a.anti),
                "anti-regularization",
                "<E[M], d>/|d| against a2 - a1 (Lemma K.2).",
                "figure-anti",
            ),
        ),
        _section(
            "figure1",
            "Figure 1: distance to the memoryless runs against h",
            _frame_or_note(
                a.f1_slopes,
                "figure1-slopes",
                "Log-log slopes of the largest l_inf distance against h (mean over permutations)",
                "No family of configs differing only in lr with l_inf distances in this store.",
            ),
            _frame_or_note(
                a.f1_regimes,
                "figure1-regimes",
                "Per config: memory, horizon, and when the second-order run is closer",
                "No l_inf distances (record.memoryless) in this store.",
                text_columns=("behaviour", "memory_regime", "family"),
            ),
            _figure(
                figures.linf_vs_step(dist, fam),
                "l_inf distance vs step",
                "l_inf distance of the memoryful run to the first-order (solid) and "
                "second-order (dashed) memoryless runs, mean over permutations.",
                "figure-linf-step",
            ),
            _figure(
                figures.linf_vs_h(a.f1_points, a.f1_slopes),
                "l_inf distance vs h",
                "Largest distance over the horizon against h, one point per permutation, "
                "with the fitted slopes and their 95% intervals.",
                "figure-linf-h",
            ),
        ),
        _section(
            "own",
            "Corrections at each run's own parameters (end of each epoch)",
            _frame_or_note(
                a.epoch,
                "epoch-corrections",
                "Mean over runs with t intervals",
                "No epoch-end probes in this store.",
            ),
            _figure(
                figures.loss_figure(t),
                "batch loss",
                "Batch loss, mean over permutations.",
                "figure-loss",
            ),
        ),
        _section(
            "convergence",
            "Convergence of the Monte Carlo estimate in P",
            _figure(
                figures.convergence(t),
                "convergence in P",
                "E[M] along its reference direction as chunks are merged, with the "
                "1/sqrt(P) band of the final standard error (95%).",
                "figure-convergence",
            ),
            H.table(comparison_table(t), "comparison", "The short comparison of noisemem show")
            if len(t.moments)
            else "",
        ),
        _section(
            "spec",
            "The resolved spec (study.toml)",
            f"<pre>{H.esc(spec_text or 'no study.toml in this store')}</pre>",
        ),
        _section(
            "versions",
            "Library versions of the runs",
            _frame_or_note(
                _versions(t.runs),
                "versions",
                "runs.versions",
                "No runs with recorded versions.",
                text_columns=("library", "version"),
            ),
        ),
        _section("assumptions", "What the analysis assumed", H.items(ASSUMPTIONS)),
        _section(
            "columns",
            "Column reference",
            "<p>The store's tables (noisemem.studies.schema.reference()):</p>",
            H.markdown_tables(reference(), "columns-"),
            f"<p><code>{SUMMARY}</code>:</p>",
            H.table(
                pd.DataFrame(
                    [(c, str(ty), m_) for c, ty, m_ in SUMMARY_COLUMNS],
                    columns=["column", "type", "meaning"],
                ),
                "columns-summary",
                SUMMARY,
                text_columns=("column", "type", "meaning"),
            ),
            "<p>The analysis tables' columns are described in the docstrings of "
            "noisemem.analysis.compare, .laws and .figure1; x_low and x_high are the 95% "
            "interval of x.</p>",
        ),
    ]
    return H.document(f"noisemem study {name}", "".join(body))


def _last_line(error: str) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- the entry points --------------------------------------------------------------------------
@overload
def write_report(store: str, out_dir: str | Path | None = None) -> str: ...
@overload
def write_report(store: StudyTables, out_dir: str | Path) -> Path: ...
def write_report(store: str | StudyTables, out_dir: str | Path | None = None) -> str | Path:
    """Write ``report.html`` and ``summary.parquet`` into the store at ``store`` (a path or
    pyarrow filesystem URI) and return the report's location (``<store>/report.html``);
    with ``out_dir``, copies of both go there too.

    Given a :class:`StudyTables` instead (the earlier form), writes the Markdown report
    ``report.md`` into ``out_dir`` and returns its path (:func:`write_markdown`)."""
    if isinstance(store, StudyTables):
        if out_dir is None:
            raise ValueError("out_dir: a StudyTables report needs a directory to go to")
        return write_markdown(store, out_dir)
    tables = load(store)
    target = Store(store)
    analysis = analyse(tables, target.uri)
    spec_text = target.read_text("study.toml") if target.exists("study.toml") else None
    chunks = int(tables.manifest.get("chunks", 0) or 0)
    page = render(analysis, spec_text, chunks).encode()
    summary = summary_parquet(summary_frame(analysis))
    target.write_bytes(page, REPORT)
    target.write_bytes(summary, SUMMARY)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT).write_bytes(page)
        (out / SUMMARY).write_bytes(summary)
    return f"{target.uri.rstrip('/')}/{REPORT}"


def read_summary(store: str) -> pd.DataFrame:
    """The ``summary.parquet`` a report wrote into the store at ``store``."""
    return pq.read_table(pa.BufferReader(Store(store).read_bytes(SUMMARY))).to_pandas()


INTERPRETATION = [
    "E[M] is the expected memory correction of Eq. (9) over batch orders; the full-batch "
    "prediction is the memoryless correction of Appendix E / Lemmas K.1-K.3 at the same step.",
    "Heavy ball: the exact expectation = full-batch part + a noise part along the gradient of "
    "the mini-batch gradient variance, an implicit regularizer (Sec. 6.2).",
    "Adam(W): no closed form; MC minus the full-batch prediction is the correction mini-batch "
    "noise adds. With beta2 > beta1 AdamW's memory anti-regularizes (Sec. 4); Lion does not.",
]


def write_markdown(tables: StudyTables, out_dir: str | Path) -> Path:
    """``report.md`` (the comparison tables and how to read them) and ``loss.png`` in
    ``out_dir``: the short report, for a terminal or a repository."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = tables.manifest
    lines = [
        f"# noisemem study `{m['study']}`",
        "",
        f"Data: `{json.dumps(m['data'])}`; {m['permutations']} permutations per config.",
        "",
        "## Monte Carlo E[M] vs exact vs full-batch prediction",
        "",
        comparison_table(tables).to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
    summary = epoch_summary(tables)
    if not summary.empty:
        lines += ["## Corrections at each run's parameters after each epoch", ""]
        lines += [summary.to_markdown(index=False, floatfmt=".4g"), ""]
    status = tables.runs["status"].value_counts().to_dict() if len(tables.runs) else {}
    lines += [f"Runs by status: {status}", "", "## Reading the numbers", ""]
    lines += [f"- {t}" for t in INTERPRETATION]
    loss = figures.loss_figure(tables)
    if loss:
        (out / "loss.png").write_bytes(loss)
        lines += ["", "![loss](loss.png)"]
    if tables.problems:
        lines += ["", "## Left out", ""] + [f"- {p}" for p in tables.problems]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


__all__ = [
    "SUMMARY_COLUMNS",
    "Analysis",
    "analyse",
    "claims",
    "read_summary",
    "render",
    "summary_frame",
    "write_markdown",
    "write_report",
]

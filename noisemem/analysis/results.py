"""Every analysis table of a store, computed once, and the tidy summary of them all.

:func:`analyse` runs the analysis modules on a store's tables (:class:`Analysis` holds what
they return, and the claims read from them); :func:`summary_frame` melts every table into
the one tidy table a report writes as ``summary.parquet`` (:data:`SUMMARY_COLUMNS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from noisemem.analysis import figure1, laws
from noisemem.analysis.claims import claims
from noisemem.analysis.compare import (
    agreement,
    epoch_corrections,
    noise_parts,
    prediction_fits,
)
from noisemem.studies.tables import StudyTables

NAN = float("nan")

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

"""Trends across a sweep, each next to the law it should follow.

A *family* is a set of configs that differ in one field only (``batch_size``, ``beta``,
``beta2``, ...); :func:`families` finds them in the ``configs`` table. The laws:

* **batch size** (THEORY §4-5): a batch of b of N samples drawn without replacement has
  mean-gradient variance ``(N - b)/(b (N - 1))`` times the per-sample one, so for batches
  that partition the data at random E[R_b] = s_b R_1 with ``s_b = (N-b)/(b(N-1))``
  (:func:`without_replacement`), and the exact noise part of heavy ball and Nesterov,
  ``h c_noise(n, m) Cov_b``, scales as ``h c_noise(n, m) s_b``. The per-sample size (R_1,
  |Cov_1|) is not in the store: it is fitted, one scale per family (the geometric mean of
  measured/shape), so the law fixes the *shape* across batch sizes and ``*_ratio`` columns
  say how far each batch size is from it. A store's batches are one fixed split, not a
  fresh random one: the law holds for them on average, not exactly.
* **beta** (heavy ball): the exact finite-n noise coefficient the exact predictions store
  (``coefficients["noise"]``) against the paper's large-n ``beta/((1-beta)^2(1+beta))``,
  which needs n >> 1/(1-beta) (THEORY §8), and the measured one, <MC - full-batch, Cov>/(h |Cov|^2).
* **beta2 - beta1** (AdamW, Sec. 4): memory anti-regularizes AdamW when beta2 > beta1: the
  correction is ``h (a1 - a2 + eps a2/D) D^{-1/2} (grad ||grad L||_{1,eps} + lambda H theta)``
  (Lemma K.2, a_j = beta_j/(1-beta_j) - (n+1) beta_j^(n+1)/(1-beta_j^(n+1)), ->
  beta_j/(1-beta_j)), so with a2 > a1 E[M] points against d = grad ||grad L||_{1,eps} and the
  memoryless iteration theta - h(F + M) climbs ||grad L||_1: :func:`anti_regularization`
  reads the projection <E[M], d>/|d| (negative: anti-regularization) from a store's
  ``anti_regularization`` predictions (d) where it has them. Lion's correction has the
  coefficient ``+rho1/(1-rho2) eps/(g^2+eps)^{3/2}`` on the same gradient: no
  anti-regularization (a projection >= 0, and small with eps).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from noisemem.analysis.compare import (
    Predictions,
    chunk_stats,
    columns,
    hyperparameters,
    is_fixed,
    large_n_noise_coefficient,
    noise_parts,
)
from noisemem.analysis.intervals import cosine_with, jackknife, mean_interval, projection
from noisemem.full_batch import adam_memory_weight
from noisemem.studies.tables import StudyTables

NAN = float("nan")
SETTING = ("batch_size", "epochs", "sampling", "seed")
#: the Adam-like optimizers whose Sec. 4 correction has the (beta2 - beta1) anti-regularization
ADAM_LIKE = ("AdamW", "NAdamW")


def without_replacement(num_samples: int, batch_size: int) -> float:
    """``(N - b)/(b (N - 1))``: the variance of the mean of b of N values drawn without
    replacement, in units of their population variance (1/N convention)."""
    N, b = int(num_samples), int(batch_size)
    return (N - b) / (b * (N - 1)) if N > 1 else NAN


def anti_regularization_coefficient(beta1: float, beta2: float, step: int | None) -> float:
    """``a2 - a1`` of Lemma K.2 at step n (``None``: the limit beta2/(1-beta2) -
    beta1/(1-beta1), the paper's (*) of Sec. 4): positive means anti-regularization."""
    return adam_memory_weight(beta2, step) - adam_memory_weight(beta1, step)


# -- families ----------------------------------------------------------------------------------
def config_frame(tables: StudyTables) -> pd.DataFrame:
    """One row per config: id, optimizer, hyperparameters (dict), the training setting, N
    (samples the batches hold) and m (batches per epoch)."""
    hyper = hyperparameters(tables)
    total = int(tables.manifest.get("data", {}).get("num_samples", 0) or 0)
    rows = []
    for r in tables.configs.itertuples(index=False):
        row = r._asdict()
        b = int(row["batch_size"]) if pd.notna(row.get("batch_size")) else 0
        m = row.get("num_batches")
        if m is None or pd.isna(m):  # stores before schema 3
            m = total // b if b else 0
        n = row.get("num_samples")
        if n is None or pd.isna(n):
            n = int(m) * b
        rows.append(
            {
                "config": str(row["config"]),
                "optimizer": row.get("optimizer"),
                "hp": hyper.get(str(row["config"]), {}),
                "batch_size": b,
                "epochs": row.get("epochs"),
                "sampling": row.get("sampling"),
                "seed": row.get("seed"),
                "num_samples": int(n),
                "num_batches": int(m),
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "config",
            "optimizer",
            "hp",
            "batch_size",
            "epochs",
            "sampling",
            "seed",
            "num_samples",
            "num_batches",
        ],
    )


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def families(tables: StudyTables, vary: str, *, scaled: Sequence[str] = ()) -> pd.DataFrame:
    """The configs that differ from another config in ``vary`` only (a hyperparameter or a
    training field), grouped: columns ``family`` (a label of what the group shares),
    ``config`` and ``value`` (its ``vary``). ``scaled`` names hyperparameters allowed to
    change with ``vary`` as long as their product with it does not (Figure 1's weight decay
    10^-3/h): the product is part of the family instead."""
    cf = config_frame(tables)
    constant = {k for k in SETTING if cf[k].nunique(dropna=False) <= 1}
    groups: dict[tuple, list[tuple[str, Any]]] = {}
    shared: dict[tuple, dict[str, Any]] = {}  # what a family's configs share, by key
    for r in cf.itertuples(index=False):
        hp = dict(r.hp)
        setting = {k: getattr(r, k) for k in SETTING}
        if vary in hp:
            value = hp.pop(vary)
        elif vary in setting:
            value = setting.pop(vary)
        else:
            continue
        for name in scaled:
            if name in hp:
                hp[f"{name}*{vary}"] = float(f"{float(hp.pop(name)) * float(value):.9g}")
        hp.setdefault("kind", r.optimizer)
        fields_ = {**hp, **{k: v for k, v in setting.items() if k not in constant}}
        key = tuple((k, json.dumps(v, default=str)) for k, v in sorted(fields_.items()))
        groups.setdefault(key, []).append((r.config, value))
        shared[key] = fields_
    groups = {
        k: v for k, v in groups.items() if len({json.dumps(x, default=str) for _, x in v}) > 1
    }
    labels = _labels({k: shared[k] for k in groups})
    rows = [
        {"family": labels[key], "config": config, "value": value}
        for key, members in groups.items()
        for config, value in members
    ]
    return pd.DataFrame(rows, columns=["family", "config", "value"])


def _labels(shared: dict[tuple, dict[str, Any]]) -> dict[tuple, str]:
    """Short family labels: the optimizer and the fields in which families of the same
    optimizer differ (``lr*weight_decay`` and the like included)."""
    by_kind: dict[Any, list[tuple]] = {}
    for key, fields_ in shared.items():
        by_kind.setdefault(fields_.get("kind"), []).append(key)
    labels = {}
    for kind, keys in by_kind.items():
        names = sorted({n for k in keys for n in shared[k]} - {"kind"})
        differ = [
            n for n in names if len({json.dumps(shared[k].get(n), default=str) for k in keys}) > 1
        ]
        for key in keys:
            shown = ", ".join(f"{n}={_fmt(shared[key].get(n))}" for n in differ)
            labels[key] = f"{kind}({shown})" if shown else str(kind)
    return labels


def _geometric_scale(measured: np.ndarray, shape: np.ndarray) -> float:
    """exp(mean log(measured/shape)) over the finite, positive pairs: the one-scale fit of
    a law's shape to measurements, relative errors weighted alike."""
    ok = np.isfinite(measured) & np.isfinite(shape) & (measured > 0) & (shape > 0)
    return float(np.exp(np.mean(np.log(measured[ok] / shape[ok])))) if ok.any() else NAN


# -- batch size --------------------------------------------------------------------------------
BATCH_COLUMNS = [
    "family", "config", "optimizer", "batch_size", "num_samples", "num_batches", "probe",
    "epoch", "step", "P", "s_b", "R", "R_law", "R_ratio", "c_noise_exact", "noise_exact",
    "noise_mc", "noise_mc_low", "noise_mc_high", "noise_law", "noise_ratio",
    "noise_ratio_low", "noise_ratio_high", "law",
]  # fmt: skip


def batch_size_trend(tables: StudyTables) -> pd.DataFrame:
    """The noise part and R across batch sizes, per family, fixed probe and epoch (the step
    that ends epoch e differs with the batch size), next to the without-replacement law
    (module docstring). ``law`` says which shape the noise part was held to: ``h c_noise
    s_b`` (exact coefficients stored: heavy ball, Nesterov) or ``s_b`` (the variance
    scaling, a reference for optimizers without a closed form). ``noise_ratio`` (with its
    interval) is the Monte Carlo noise part over the law."""
    fam = families(tables, "batch_size")
    if fam.empty:
        return pd.DataFrame(columns=BATCH_COLUMNS)
    cf = config_frame(tables).set_index("config")
    parts = noise_parts(tables)
    rows = []
    for r in parts.itertuples(index=False):
        hit = fam[fam["config"] == r.config]
        if hit.empty:
            continue
        c = cf.loc[r.config]
        m = int(c["num_batches"])
        rows.append(
            {
                "family": hit.iloc[0]["family"],
                "config": r.config,
                "optimizer": r.optimizer,
                "batch_size": int(c["batch_size"]),
                "num_samples": int(c["num_samples"]),
                "num_batches": m,
                "probe": r.probe,
                "epoch": (int(r.step) + 1) // m if m else -1,
                "step": int(r.step),
                "P": r.P,
                "s_b": without_replacement(int(c["num_samples"]), int(c["batch_size"])),
                "R": r.R,
                "c_noise_exact": r.c_noise_exact,
                "noise_exact": r.noise_exact,
                "noise_mc": r.noise_mc,
                "noise_mc_low": r.noise_mc_low,
                "noise_mc_high": r.noise_mc_high,
                "lr": r.lr,
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=BATCH_COLUMNS)
    out = []
    for _, g in frame.groupby(["family", "probe", "epoch"], sort=True):
        g = g.sort_values("batch_size").copy()
        s = g["s_b"].to_numpy(dtype=float)
        R = g["R"].to_numpy(dtype=float)
        g["R_law"] = _geometric_scale(R, s) * s
        g["R_ratio"] = R / g["R_law"]
        coef = g["c_noise_exact"].to_numpy(dtype=float)
        exact_law = bool(np.all(np.isfinite(coef)))
        shape = g["lr"].to_numpy(dtype=float) * coef * s if exact_law else s
        measured = g["noise_exact" if exact_law else "noise_mc"].to_numpy(dtype=float)
        g["noise_law"] = _geometric_scale(measured, shape) * shape
        for col in ("", "_low", "_high"):
            g[f"noise_ratio{col}"] = g[f"noise_mc{col}"] / g["noise_law"]
        g["law"] = "h c_noise s_b" if exact_law else "s_b"
        out.append(g)
    return pd.concat(out, ignore_index=True)[BATCH_COLUMNS]


def decreasing(values: Sequence[float]) -> bool:
    """Whether ``values`` (ordered by growing batch size) strictly decrease."""
    v = np.asarray(values, dtype=float)
    return bool(v.size >= 2 and np.all(np.isfinite(v)) and np.all(np.diff(v) < 0))


# -- beta --------------------------------------------------------------------------------------
BETA_COLUMNS = [
    "family", "config", "optimizer", "beta", "num_batches", "probe", "step", "P",
    "c_noise_exact", "c_noise_large_n", "large_n_over_exact", "c_noise_mc", "c_noise_mc_low",
    "c_noise_mc_high", "noise_exact", "noise_mc", "noise_mc_low", "noise_mc_high",
]  # fmt: skip


def beta_trend(tables: StudyTables) -> pd.DataFrame:
    """Heavy ball's (and Nesterov's) noise coefficient across beta: the exact finite-n one,
    the paper's large-n one (heavy ball) and their ratio, and the measured one with its
    interval, per family, fixed probe and step."""
    fam = families(tables, "beta")
    if fam.empty:
        return pd.DataFrame(columns=BETA_COLUMNS)
    cf = config_frame(tables).set_index("config")
    parts = noise_parts(tables).merge(fam, on="config")
    if parts.empty:
        return pd.DataFrame(columns=BETA_COLUMNS)
    parts["beta"] = parts["value"].astype(float)
    parts["num_batches"] = [int(cf.loc[c, "num_batches"]) for c in parts["config"]]
    parts["large_n_over_exact"] = parts["c_noise_large_n"] / parts["c_noise_exact"]
    parts = parts.sort_values(["family", "probe", "step", "beta"]).reset_index(drop=True)
    return parts[BETA_COLUMNS]


# -- anti-regularization (Sec. 4) --------------------------------------------------------------
ANTI_COLUMNS = [
    "config", "optimizer", "probe", "step", "P", "beta1", "beta2", "coefficient",
    "coefficient_limit", "proj_mc", "proj_mc_low", "proj_mc_high", "cos_mc", "cos_mc_low",
    "cos_mc_high", "proj_full_batch", "proj_noise_aware", "verdict", "noise_effect", "family",
]  # fmt: skip


def noise_effect(low: float, high: float, full_batch: float) -> str:
    """What mini-batch noise does to Sec. 4's conclusion, read off the interval
    ``[low, high]`` of <E[M], d>/|d| against the full-batch prediction's projection:
    ``flips`` (the interval excludes 0 on the other side), ``removes`` (it holds 0),
    ``weakens`` / ``strengthens`` (same sign, the whole interval smaller / larger in size),
    ``keeps`` (same sign, the interval holds the full-batch value); ``not measured``."""
    if not (np.isfinite(low) and np.isfinite(high) and np.isfinite(full_batch)):
        return "not measured"
    if full_batch == 0 or low <= 0 <= high:
        return "removes" if full_batch != 0 else "not measured"
    if (low > 0) != (full_batch > 0):
        return "flips"
    small, large = sorted((abs(low), abs(high)))
    if large < abs(full_batch):
        return "weakens"
    if small > abs(full_batch):
        return "strengthens"
    return "keeps"


def _memory_pair(hp: dict[str, Any]) -> tuple[float, float]:
    """(beta1, beta2) of an Adam-like optimizer; (rho1, rho2) of Lion."""
    if "beta1" in hp and "beta2" in hp:
        return float(hp["beta1"]), float(hp["beta2"])
    if "rho1" in hp and "rho2" in hp:
        return float(hp["rho1"]), float(hp["rho2"])
    return NAN, NAN


def sign_verdict(low: float, high: float) -> str:
    """``anti-regularizes`` when the interval of <E[M], d> lies below 0, ``regularizes``
    above it, ``no sign`` when it holds 0, ``not measured`` without an interval."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "not measured"
    if high < 0:
        return "anti-regularizes"
    if low > 0:
        return "regularizes"
    return "no sign"


def anti_regularization(tables: StudyTables) -> pd.DataFrame:
    """Per (config, fixed probe, step) whose store holds an ``anti_regularization``
    prediction (the direction d = grad ||grad L||_{1,eps}): E[M] projected on d/|d| and its
    cosine with d (jackknife intervals), the full-batch prediction's projection, the
    coefficient a2 - a1 of Lemma K.2 at that step (Adam-like optimizers; positive: the
    theory says anti-regularization) and its limit (*), the verdict on the sign, and the
    family of configs differing only in beta2 (or beta1). Empty for stores without d."""
    preds = Predictions(tables.predictions)
    hyper = hyperparameters(tables)
    fam = pd.concat([families(tables, "beta2"), families(tables, "beta1")], ignore_index=True)
    fam = fam.drop_duplicates("config")
    rows = []
    for key, stats in chunk_stats(tables.moments).items():
        config, probe, step = key
        if not is_fixed(probe):
            continue
        d = preds.vector(*key, "anti_regularization")
        if d is None:
            d = preds.vector(config, probe, -1, "anti_regularization")
        if d is None or not np.linalg.norm(d) > 0:
            continue
        u = d / np.linalg.norm(d)
        hp = hyper.get(config, {})
        kind = hp.get("kind")
        b1, b2 = _memory_pair(hp)
        adam = kind in ADAM_LIKE
        proj = jackknife(stats, partial(projection, direction=u))
        fb = preds.vector(*key, "full_batch")
        na = preds.vector(*key, "noise_aware_mean")
        hit = fam[fam["config"] == config]
        rows.append(
            {
                "config": config,
                "optimizer": kind,
                "probe": probe,
                "step": step,
                "P": stats.pooled().count,
                "beta1": b1,
                "beta2": b2,
                "coefficient": anti_regularization_coefficient(b1, b2, step) if adam else NAN,
                "coefficient_limit": anti_regularization_coefficient(b1, b2, None) if adam else NAN,
                **columns("proj_mc", proj),
                **columns(
                    "cos_mc", jackknife(stats, partial(cosine_with, vector=u), bounds=(-1, 1))
                ),
                "proj_full_batch": float(fb @ u) if fb is not None else NAN,
                "proj_noise_aware": float(na @ u) if na is not None else NAN,
                "verdict": sign_verdict(proj.low, proj.high),
                "noise_effect": noise_effect(
                    proj.low, proj.high, float(fb @ u) if fb is not None else NAN
                ),
                "family": hit.iloc[0]["family"] if len(hit) else "",
            }
        )
    return pd.DataFrame(rows, columns=ANTI_COLUMNS)


RUN_ANTI_COLUMNS = [
    "config",
    "optimizer",
    "probe",
    "step",
    "runs",
    "proj_anti",
    "proj_anti_low",
    "proj_anti_high",
    "verdict",
]


def run_anti_regularization(tables: StudyTables) -> pd.DataFrame:
    """The per-run projection of M on d/|d| (``corrections.proj_anti``, where the store has
    it) averaged over runs per (config, probe, step), with the t interval over runs."""
    c = tables.corrections
    if "proj_anti" not in c.columns or c["proj_anti"].notna().sum() == 0:
        return pd.DataFrame(columns=RUN_ANTI_COLUMNS)
    hyper = hyperparameters(tables)
    rows = []
    for (config, probe, step), g in c.groupby(["config", "probe", "step"], sort=True):
        iv = mean_interval(g["proj_anti"].to_numpy(dtype=float))
        if iv.groups == 0:
            continue
        rows.append(
            {
                "config": config,
                "optimizer": hyper.get(config, {}).get("kind"),
                "probe": probe,
                "step": int(step),
                "runs": iv.groups,
                **columns("proj_anti", iv),
                "verdict": sign_verdict(iv.low, iv.high),
            }
        )
    return pd.DataFrame(rows, columns=RUN_ANTI_COLUMNS)


__all__ = [
    "anti_regularization",
    "anti_regularization_coefficient",
    "batch_size_trend",
    "beta_trend",
    "config_frame",
    "decreasing",
    "families",
    "large_n_noise_coefficient",
    "run_anti_regularization",
    "without_replacement",
]

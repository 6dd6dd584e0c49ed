"""Compare Monte Carlo E[M] with the exact expectation and every prediction stored beside it.

Tidy frames, one row per (config, probe, step) or per (config, probe, step, prediction), each
scalar with its 95% interval from the delete-one-chunk jackknife
(:mod:`noisemem.analysis.intervals`; columns ``x``, ``x_low``, ``x_high``):

* :func:`agreement`: MC E[M] against the exact expectation (heavy ball, Nesterov) in units
  of its standard error: z-scores per coordinate and along the exact direction.
* :func:`prediction_fits`: MC E[M] against each prediction of it (full-batch, its n -> oo
  limit, full-batch plus a noise part, exact, noise-aware, any other kind a store holds):
  cosine, relative error, the share of |E[M]|^2 explained, the projection.
* :func:`noise_parts`: the noise part (MC E[M] minus the full-batch prediction) against the
  full-batch part, the variance regularizer R, and the noise coefficient along Cov.
* :func:`epoch_corrections`: per-run corrections at each run's own parameters.

:func:`comparison_table` is the short table of ``noisemem show`` (columns below).

``comparison_table`` columns: ``P`` permutations merged; ``|E[M]| MC`` the norm of the Monte
Carlo mean; ``rms z`` and ``max |z|`` of (MC - exact)/stderr over coordinates (rms ~1 when
they agree, t-distributed with P-1 dof; the max over d coordinates grows like
sqrt(2 log d)); ``cos`` and ``rel`` of MC against the full-batch prediction at the same step;
``|noise part| exact`` of the exact expectation (heavy ball, Nesterov).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from noisemem.analysis.intervals import (
    ChunkStats,
    Pooled,
    columns,
    cosine_with,
    debiased_norm,
    debiased_norm2,
    jackknife,
    mean_interval,
    projection,
    scaled_norm,
)
from noisemem.stats import chan_merge
from noisemem.stats import cosine as engine_cosine
from noisemem.studies.tables import StudyTables

NAN = float("nan")
#: the probe points with fixed parameters: predictions are stored there
FIXED = "fixed"
#: kinds that are directions, not predictions of E[M]
DIRECTION_KINDS = ("noise_direction", "anti_regularization")
#: kinds that are parts of a prediction (a full-batch part and a noise part)
PART_KINDS = (
    "exact_full_batch_part",
    "exact_noise_part",
    "noise_aware_full_batch_part",
    "noise_aware_noise_part",
)
NOISE_PART_KINDS = ("exact_noise_part", "noise_aware_noise_part")
#: predictions of E[M] in the order reports list them; kinds a store holds beyond these
#: (written by a newer noisemem) follow in name order
PREDICTION_ORDER = (
    "full_batch",
    "full_batch_limit",
    "full_batch+exact_noise_part",
    "exact_mean",
    "full_batch+noise_aware_noise_part",
    "noise_aware_mean",
)
#: z beyond which a coordinate counts as off (the "within 4 SE" claim)
Z_OFF = 4.0
#: chance level of the z checks: agreement is doubted only past the 99% quantile
CHANCE = 0.99


def is_fixed(probe: str) -> bool:
    """``init`` and ``ref<s>`` have fixed parameters (and predictions); ``epoch`` does not."""
    return probe == "init" or probe.startswith("ref")


# -- the store's predictions -------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    vector: np.ndarray | None
    coefficients: dict[str, float]
    norm: float


class Predictions:
    """The ``predictions`` table indexed by (config, probe, step, kind)."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.index: dict[tuple[str, str, int, str], Prediction] = {}
        for r in frame.itertuples(index=False):
            vector = None if r.vector is None else np.asarray(r.vector, dtype=np.float64)
            try:
                coef = json.loads(r.coefficients) if r.coefficients else {}
            except (TypeError, ValueError):
                coef = {}
            key = (str(r.config), str(r.probe), int(r.step), str(r.kind))
            self.index[key] = Prediction(vector, coef, float(r.norm))

    def get(self, config: str, probe: str, step: int, kind: str) -> Prediction | None:
        return self.index.get((config, probe, step, kind))

    def vector(self, config: str, probe: str, step: int, kind: str) -> np.ndarray | None:
        hit = self.get(config, probe, step, kind)
        return None if hit is None else hit.vector

    def kinds(self, config: str, probe: str, step: int) -> list[str]:
        return sorted(k for (c, p, s, k) in self.index if (c, p, s) == (config, probe, step))

    def of_mean(self, config: str, probe: str, step: int) -> dict[str, np.ndarray]:
        """Every prediction of E[M] at (config, probe, step) that has a vector, by name:
        the stored kinds that predict E[M] itself, the n -> oo full-batch limit (step -1),
        and the full-batch prediction plus each stored noise part."""
        out: dict[str, np.ndarray] = {}
        for kind in self.kinds(config, probe, step):
            if kind in DIRECTION_KINDS or kind in PART_KINDS:
                continue
            v = self.vector(config, probe, step, kind)
            if v is not None:
                out[kind] = v
        limit = self.vector(config, probe, -1, "full_batch_limit")
        if limit is not None:
            out["full_batch_limit"] = limit
        fb = out.get("full_batch")
        for kind in NOISE_PART_KINDS:
            part = self.vector(config, probe, step, kind)
            if fb is not None and part is not None:
                out[f"full_batch+{kind}"] = fb + part
        order = {k: i for i, k in enumerate(PREDICTION_ORDER)}
        return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def chunk_stats(moments: pd.DataFrame) -> dict[tuple[str, str, int], ChunkStats]:
    """The chunks of every (config, probe, step) of the ``moments`` table."""
    out = {}
    for (config, probe, step), group in moments.groupby(["config", "probe", "step"], sort=True):
        out[(str(config), str(probe), int(step))] = ChunkStats.from_rows(group)
    return out


def hyperparameters(tables: StudyTables) -> dict[str, dict[str, Any]]:
    """Every config's hyperparameters (``kind`` included), from the ``configs`` table."""
    out = {}
    for r in tables.configs.itertuples(index=False):
        try:
            out[str(r.config)] = dict(json.loads(r.hyperparameters))
        except (TypeError, ValueError):
            out[str(r.config)] = {}
    return out


def _keys(tables: StudyTables, fixed_only: bool) -> Iterator[tuple[tuple[str, str, int], Any]]:
    for key, stats in chunk_stats(tables.moments).items():
        if not fixed_only or is_fixed(key[1]):
            yield key, stats


def _base(key: tuple[str, str, int], stats: ChunkStats, pooled: Pooled) -> dict[str, Any]:
    config, probe, step = key
    return {
        "config": config,
        "probe": probe,
        "step": step,
        "P": pooled.count,
        "chunks": int(stats.with_runs.size),
        "excluded": stats.excluded,
    }


# -- MC against the exact expectation ----------------------------------------------------------
AGREEMENT_COLUMNS = [
    "config", "probe", "step", "P", "chunks", "excluded", "d",
    "norm_mc", "norm_mc_low", "norm_mc_high", "norm_exact",
    "rms_z", "rms_z_expected", "max_abs_z", "max_abs_z_chance",
    "beyond_4se", "beyond_4se_expected", "beyond_4se_allowed", "zero_spread",
    "proj_exact", "proj_exact_low", "proj_exact_high", "proj_z", "within_4se",
]  # fmt: skip


def z_scores(p: Pooled, exact: np.ndarray) -> np.ndarray:
    """(MC - exact)/stderr per coordinate; 0 where every run gave the same value and it is
    the exact one (a coordinate M never moves, e.g. the weights of a constant input), inf
    where it is another."""
    diff = p.mean - exact
    se = p.stderr
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff == 0, 0.0, np.inf))
    return z


def agreement(tables: StudyTables) -> pd.DataFrame:
    """Monte Carlo E[M] against the exact expectation, per (config, probe, step) where the
    store has one. Columns (:data:`AGREEMENT_COLUMNS`):

    * ``rms_z`` over coordinates of z = (MC - exact)/stderr, t-distributed with P-1 dof when
      they agree: ``rms_z_expected = sqrt((P-1)/(P-3))``;
    * ``max_abs_z`` and ``max_abs_z_chance``, the level the largest of d independent |t_{P-1}|
      stays under with probability 0.99;
    * ``beyond_4se``: coordinates with |z| > 4, ``beyond_4se_expected`` = d P(|t_{P-1}| > 4)
      and ``beyond_4se_allowed`` its binomial 99% quantile;
    * ``proj_exact`` = <MC, exact>/|exact|^2 (1 when they agree) with its jackknife interval,
      and ``proj_z`` = (proj_exact - 1)/SE (SE from the jackknife: coordinates' correlations
      included);
    * ``within_4se``: |proj_z| <= 4 and no more coordinates beyond 4 SE than chance allows.
    """
    preds = Predictions(tables.predictions)
    rows = []
    for key, stats in _keys(tables, fixed_only=True):
        exact = preds.vector(*key, "exact_mean")
        if exact is None:
            continue
        p = stats.pooled()
        row = _base(key, stats, p)
        d = stats.dim
        row["d"] = d
        row.update(columns("norm_mc", jackknife(stats, debiased_norm, bounds=(0, np.inf))))
        row["norm_exact"] = float(np.linalg.norm(exact))
        dof = p.count - 1
        if p.count < 2:
            rows.append(row)
            continue
        z = z_scores(p, exact)
        tail = float(2 * sps.t.sf(Z_OFF, dof))
        row.update(
            rms_z=float(np.sqrt(np.mean(z**2))),
            rms_z_expected=float(np.sqrt(dof / (dof - 2))) if dof > 2 else NAN,
            max_abs_z=float(np.max(np.abs(z))),
            max_abs_z_chance=float(sps.t.isf((1 - CHANCE ** (1 / d)) / 2, dof)),
            beyond_4se=int(np.sum(np.abs(z) > Z_OFF)),
            beyond_4se_expected=d * tail,
            beyond_4se_allowed=int(sps.binom.ppf(CHANCE, d, tail)),
            zero_spread=int(np.sum(~(p.stderr > 0))),
        )
        e2 = float(exact @ exact)
        if e2 > 0:
            proj = jackknife(stats, partial(projection, direction=exact, scale=e2))
            row.update(columns("proj_exact", proj))
            row["proj_z"] = (proj.value - 1.0) / proj.se if proj.se > 0 else NAN
        ok_proj = not np.isfinite(row.get("proj_z", NAN)) or abs(row["proj_z"]) <= Z_OFF
        row["within_4se"] = bool(ok_proj and row["beyond_4se"] <= row["beyond_4se_allowed"])
        rows.append(row)
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


# -- MC against every prediction ---------------------------------------------------------------
FIT_COLUMNS = [
    "config", "probe", "step", "prediction", "P", "chunks",
    "norm_mc", "norm_mc_low", "norm_mc_high", "norm_prediction",
    "cos", "cos_low", "cos_high", "rel_err", "rel_err_low", "rel_err_high",
    "explained", "explained_low", "explained_high", "proj", "proj_low", "proj_high",
]  # fmt: skip


def _rel_err(p: Pooled, pred: np.ndarray) -> float:
    """|E[M] - pred| / |E[M]|, both debiased for Monte Carlo noise."""
    den = debiased_norm(p)
    return debiased_norm(p, pred) / den if den > 0 else NAN


def _explained(p: Pooled, pred: np.ndarray) -> float:
    """1 - |E[M] - pred|^2 / |E[M]|^2 (debiased): the share of |E[M]|^2 ``pred`` explains."""
    den = debiased_norm2(p)
    return 1.0 - debiased_norm2(p, pred) / den if den > 0 else NAN


def prediction_fits(tables: StudyTables) -> pd.DataFrame:
    """Monte Carlo E[M] against each prediction of it, one row per (config, probe, step,
    prediction) (:meth:`Predictions.of_mean` names them). Columns (:data:`FIT_COLUMNS`),
    each with its jackknife interval: ``norm_mc`` |E[M]| debiased; ``cos`` the cosine of
    MC with the prediction (Monte Carlo noise pulls it towards 0); ``rel_err`` |E[M] -
    pred|/|E[M]| and ``explained`` = 1 - rel_err^2, both debiased; ``proj`` <MC, pred>/|pred|^2,
    E[M] along the prediction in its units (1: the prediction's size is right)."""
    preds = Predictions(tables.predictions)
    rows = []
    for key, stats in _keys(tables, fixed_only=True):
        p = stats.pooled()
        norm = jackknife(stats, debiased_norm, bounds=(0, np.inf))
        for name, v in preds.of_mean(*key).items():
            row = {**_base(key, stats, p), "prediction": name}
            row.update(columns("norm_mc", norm))
            row["norm_prediction"] = float(np.linalg.norm(v))
            v2 = float(v @ v)
            for column, statistic, bounds in (
                ("cos", partial(cosine_with, vector=v), (-1.0, 1.0)),
                ("rel_err", partial(_rel_err, pred=v), (0.0, np.inf)),
                ("explained", partial(_explained, pred=v), (-np.inf, 1.0)),
                ("proj", partial(projection, direction=v, scale=v2), (-np.inf, np.inf)),
            ):
                if column == "proj" and not v2 > 0:
                    continue
                row.update(columns(column, jackknife(stats, statistic, bounds=bounds)))
            rows.append(row)
    return pd.DataFrame(rows, columns=FIT_COLUMNS)


# -- the noise part ----------------------------------------------------------------------------
NOISE_COLUMNS = [
    "config", "probe", "step", "optimizer", "lr", "P", "chunks",
    "norm_full_batch", "noise_mc", "noise_mc_low", "noise_mc_high", "noise_exact",
    "noise_aware", "noise_to_full_mc", "noise_to_full_mc_low", "noise_to_full_mc_high",
    "noise_to_full_exact", "R", "cov_norm", "cos_noise_cov", "cos_noise_cov_low",
    "cos_noise_cov_high", "c_noise_mc", "c_noise_mc_low", "c_noise_mc_high", "c_noise_exact",
    "c_noise_large_n",
]  # fmt: skip


def large_n_noise_coefficient(beta: float) -> float:
    """The paper's large-n noise coefficient of heavy ball (Sec. 6.2, THEORY §4):
    E[M]/h ~ beta/(1-beta)^3 H g + beta/((1-beta)^2 (1+beta)) Cov."""
    return beta / ((1 - beta) ** 2 * (1 + beta))


def noise_parts(tables: StudyTables) -> pd.DataFrame:
    """The noise part of E[M], per (config, probe, step) with a full-batch prediction.

    The Monte Carlo noise part is MC E[M] minus the full-batch prediction at the same step
    (for heavy ball and Nesterov that is the exact full-batch part); ``noise_mc`` is its
    norm debiased, ``noise_exact`` the exact one's and ``noise_aware`` the noise-aware one's
    (where stored), ``noise_to_full_*`` those over |full-batch|. ``R`` = E|g_i - g|^2 and
    ``cov_norm`` = |Cov| at the probe (the ``noise_direction`` row); ``cos_noise_cov`` the
    cosine of the MC noise part with Cov; ``c_noise_mc`` = <MC - full-batch, Cov>/(h |Cov|^2),
    the measured noise coefficient, against ``c_noise_exact`` (the exact finite-n one the
    exact predictions store) and ``c_noise_large_n`` (the paper's, heavy ball only)."""
    preds = Predictions(tables.predictions)
    hyper = hyperparameters(tables)
    rows = []
    for key, stats in _keys(tables, fixed_only=True):
        config, probe, _ = key
        fb = preds.vector(*key, "full_batch")
        if fb is None:
            continue
        hp = hyper.get(config, {})
        lr = float(hp.get("lr", NAN))
        p = stats.pooled()
        row: dict[str, Any] = {**_base(key, stats, p), "optimizer": hp.get("kind"), "lr": lr}
        fb_norm = float(np.linalg.norm(fb))
        row["norm_full_batch"] = fb_norm
        row.update(
            columns(
                "noise_mc", jackknife(stats, partial(scaled_norm, reference=fb), bounds=(0, np.inf))
            )
        )
        exact = preds.vector(*key, "exact_noise_part")
        aware = preds.vector(*key, "noise_aware_noise_part")
        row["noise_exact"] = float(np.linalg.norm(exact)) if exact is not None else NAN
        row["noise_aware"] = float(np.linalg.norm(aware)) if aware is not None else NAN
        if fb_norm > 0:
            noise_ratio = partial(scaled_norm, reference=fb, scale=fb_norm)
            ratio = jackknife(stats, noise_ratio, bounds=(0, np.inf))
            row.update(columns("noise_to_full_mc", ratio))
            row["noise_to_full_exact"] = row["noise_exact"] / fb_norm
        direction = preds.get(config, probe, -1, "noise_direction")
        if direction is not None:
            row["R"] = float(direction.coefficients.get("R", NAN))
            cov = direction.vector
            if cov is not None:
                c2 = float(cov @ cov)
                row["cov_norm"] = float(np.sqrt(c2))
                row.update(
                    columns(
                        "cos_noise_cov",
                        jackknife(
                            stats, partial(cosine_with, vector=cov, offset=fb), bounds=(-1, 1)
                        ),
                    )
                )
                if c2 > 0 and lr > 0:
                    along = partial(projection, direction=cov, offset=fb, scale=lr * c2)
                    coef = jackknife(stats, along)
                    row.update(columns("c_noise_mc", coef))
        exact_row = preds.get(*key, "exact_mean")
        if exact_row is not None and "noise" in exact_row.coefficients:
            row["c_noise_exact"] = float(exact_row.coefficients["noise"])
        if hp.get("kind") == "HeavyBall" and "beta" in hp:
            row["c_noise_large_n"] = large_n_noise_coefficient(float(hp["beta"]))
        rows.append(row)
    return pd.DataFrame(rows, columns=NOISE_COLUMNS)


# -- corrections at each run's own parameters --------------------------------------------------
EPOCH_COLUMNS = [
    "config", "step", "runs", "norm", "norm_low", "norm_high",
    "cos_full_batch", "cos_full_batch_low", "cos_full_batch_high",
    "cos_noise", "cos_noise_low", "cos_noise_high",
    "proj_full_batch", "proj_full_batch_low", "proj_full_batch_high",
]  # fmt: skip
#: per-run columns a newer store may hold (averaged like the others when present)
OPTIONAL_RUN_COLUMNS = ("cos_noise_aware", "proj_anti")


def epoch_corrections(tables: StudyTables) -> pd.DataFrame:
    """Per (config, epoch-end step) at each run's own parameters: the mean over runs of |M|
    and of M's cosine with the full-batch prediction and with Cov, and M in units of the
    full-batch prediction, each with the t interval over runs (runs are independent);
    ``cos_noise_aware`` and ``proj_anti`` too where the store has them."""
    c = tables.corrections
    c = c[c["probe"] == "epoch"] if len(c) else c
    extra = [col for col in OPTIONAL_RUN_COLUMNS if col in c.columns]
    cols = EPOCH_COLUMNS + [f"{x}{s}" for x in extra for s in ("", "_low", "_high")]
    rows = []
    for (config, step), g in c.groupby(["config", "step"], sort=True) if len(c) else []:
        row: dict[str, Any] = {"config": config, "step": int(step), "runs": len(g)}
        for col in ("norm", "cos_full_batch", "cos_noise", "proj_full_batch", *extra):
            row.update(columns(col, mean_interval(g[col].to_numpy(dtype=float))))
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


# -- the short table (noisemem show) -----------------------------------------------------------
def comparison(
    mean: np.ndarray,
    stderr: np.ndarray,
    count: int,
    exact: np.ndarray | None = None,
    full_batch: np.ndarray | None = None,
    noise_part: np.ndarray | None = None,
    noise_aware: np.ndarray | None = None,
) -> dict[str, Any]:
    """The comparison columns for one Monte Carlo E[M] (``mean``, ``stderr`` over ``count``
    orders) against the predictions given (None: not available, NaN columns); ``rel``
    columns are |MC - prediction| / |prediction|."""
    z = None
    if exact is not None:
        z = (mean - exact) / np.where(stderr > 0, stderr, np.inf)
    return {
        "P": count,
        "|E[M]| MC": float(np.linalg.norm(mean)),
        "|E[M]| exact": float(np.linalg.norm(exact)) if exact is not None else NAN,
        "rms z": float(np.sqrt(np.mean(z**2))) if z is not None else NAN,
        "max |z|": float(np.max(np.abs(z))) if z is not None else NAN,
        "|full-batch|": float(np.linalg.norm(full_batch)) if full_batch is not None else NAN,
        "cos(MC, full-batch)": engine_cosine(mean, full_batch) if full_batch is not None else NAN,
        "rel(MC - full-batch)": (
            float(np.linalg.norm(mean - full_batch) / np.linalg.norm(full_batch))
            if full_batch is not None
            else NAN
        ),
        "|noise part| exact": float(np.linalg.norm(noise_part)) if noise_part is not None else NAN,
        "cos(MC, noise-aware)": (
            engine_cosine(mean, noise_aware) if noise_aware is not None else NAN
        ),
        "rel(MC - noise-aware)": (
            float(np.linalg.norm(mean - noise_aware) / np.linalg.norm(noise_aware))
            if noise_aware is not None
            else NAN
        ),
    }


def comparison_table(tables: StudyTables) -> pd.DataFrame:
    """The comparison of every (config, probe, step) the store's moments hold."""
    rows = []
    preds = Predictions(tables.predictions)
    for r in merged_moments(tables.moments).itertuples(index=False):
        key = (r.config, r.probe, r.step)
        rows.append(
            {
                "config": r.config,
                "probe": r.probe,
                "step": r.step,
                **comparison(
                    np.asarray(r.mean),
                    np.asarray(r.stderr),
                    r.count,
                    exact=preds.vector(*key, "exact_mean"),
                    full_batch=preds.vector(*key, "full_batch"),
                    noise_part=preds.vector(*key, "exact_noise_part"),
                    noise_aware=preds.vector(*key, "noise_aware_mean"),
                ),
            }
        )
    return pd.DataFrame(rows)


def epoch_summary(tables: StudyTables) -> pd.DataFrame:
    """Per (config, epoch-end step): the number of runs with a correction there, their mean
    |M|, and the mean cosine of each run's M with its full-batch prediction and with the
    noise direction (both at the run's own parameters). :func:`epoch_corrections` has the
    same with intervals."""
    c = tables.corrections
    c = c[c["probe"] == "epoch"]
    if c.empty:
        return pd.DataFrame()
    return (
        c.groupby(["config", "step"])
        .agg(
            runs=("norm", "size"),
            mean_norm=("norm", "mean"),
            cos_full_batch=("cos_full_batch", "mean"),
            cos_noise=("cos_noise", "mean"),
        )
        .reset_index()
    )


def merged_moments(moments: pd.DataFrame) -> pd.DataFrame:
    """E[M] and its per-coordinate standard error per (config, probe, step), merged over
    chunks (in chunk order) from each part's count, mean and M2 with Chan et al.'s pairwise
    formula (:func:`noisemem.stats.chan_merge`): ``stderr = sqrt(M2 / (count - 1) / count)``,
    NaN when count < 2; ``mean`` is NaN when count is 0."""
    rows = []
    for (config, probe, step), group in moments.groupby(["config", "probe", "step"], sort=True):
        count, mean, m2 = 0, None, None
        for part in group.sort_values("chunk").itertuples(index=False):
            mean_p = np.asarray(part.mean, dtype=np.float64)
            m2_p = np.asarray(part.m2, dtype=np.float64)
            if mean is None:
                count, mean, m2 = int(part.count), mean_p, m2_p
            else:
                count, mean, m2 = chan_merge(count, mean, m2, int(part.count), mean_p, m2_p)
        assert mean is not None and m2 is not None
        if count == 0:
            mean = np.full_like(mean, np.nan)
        stderr = np.sqrt(m2 / (count - 1) / count) if count >= 2 else np.full_like(m2, np.nan)
        rows.append(
            {
                "config": config,
                "probe": probe,
                "step": int(step),
                "count": count,
                "mean": mean,
                "stderr": stderr,
            }
        )
    return pd.DataFrame(rows, columns=["config", "probe", "step", "count", "mean", "stderr"])

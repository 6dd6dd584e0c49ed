"""Compare Monte Carlo E[M] with the exact expectation and the full-batch prediction.

One row per (config, probe, step). Columns: ``P`` permutations merged; ``|E[M]| MC`` the norm
of the Monte Carlo mean; ``rms z`` and ``max |z|`` of (MC - exact)/stderr over coordinates
(rms ~1 when they agree, t-distributed with P-1 dof; the max over d coordinates grows like
sqrt(2 log d)); ``cos`` and ``rel`` of MC against the full-batch prediction at the same step
(how much of E[M] it explains; the remainder is the correction mini-batch noise adds);
``|noise part| exact`` of the exact expectation (heavy ball, Nesterov).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from noisemem.stats import chan_merge, cosine
from noisemem.studies.tables import StudyTables

NAN = float("nan")


def comparison(
    mean: np.ndarray,
    stderr: np.ndarray,
    count: int,
    exact: np.ndarray | None = None,
    full_batch: np.ndarray | None = None,
    noise_part: np.ndarray | None = None,
) -> dict[str, Any]:
    """The comparison columns for one Monte Carlo E[M] (``mean``, ``stderr`` over ``count``
    orders) against the predictions given (None: not available, NaN columns)."""
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
        "cos(MC, full-batch)": cosine(mean, full_batch) if full_batch is not None else NAN,
        "rel(MC - full-batch)": (
            float(np.linalg.norm(mean - full_batch) / np.linalg.norm(full_batch))
            if full_batch is not None
            else NAN
        ),
        "|noise part| exact": float(np.linalg.norm(noise_part)) if noise_part is not None else NAN,
    }


def _vector(predictions: pd.DataFrame, config: str, probe: str, step: int, kind: str) -> Any:
    hit = predictions[
        (predictions["config"] == config)
        & (predictions["probe"] == probe)
        & (predictions["step"] == step)
        & (predictions["kind"] == kind)
    ]
    if hit.empty or hit.iloc[0]["vector"] is None:  # absent, or no closed form
        return None
    return np.asarray(hit.iloc[0]["vector"])


def comparison_table(tables: StudyTables) -> pd.DataFrame:
    """The comparison of every (config, probe, step) the store's moments hold."""
    rows = []
    p = tables.predictions
    for r in merged_moments(tables.moments).itertuples(index=False):
        rows.append(
            {
                "config": r.config,
                "probe": r.probe,
                "step": r.step,
                **comparison(
                    np.asarray(r.mean),
                    np.asarray(r.stderr),
                    r.count,
                    exact=_vector(p, r.config, r.probe, r.step, "exact_mean"),
                    full_batch=_vector(p, r.config, r.probe, r.step, "full_batch"),
                    noise_part=_vector(p, r.config, r.probe, r.step, "exact_noise_part"),
                ),
            }
        )
    return pd.DataFrame(rows)


def epoch_summary(tables: StudyTables) -> pd.DataFrame:
    """Per (config, epoch-end step): the number of runs with a correction there, their mean
    |M|, and the mean cosine of each run's M with its full-batch prediction and with the
    noise direction (both at the run's own parameters)."""
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

"""Figure 1: how far the memoryful run is from its memoryless approximations, against h.

The ``steps`` table's ``linf_first`` and ``linf_second`` are the l_inf distances, after
step n, of the memoryful run (1) to the first-order memoryless run and to the second-order
one (4) on the same batch order. Corollary 3.3: over a fixed horizon T (n <= T/h) they are
O(h) and O(h^2). A *family* is the configs that differ only in the learning rate h, or in h
and a weight decay scaled as 1/h (lambda h fixed, the paper's 10^-3/h).

:func:`figure1_slopes` fits, per family, order and permutation, the log-log slope of the
largest distance over the horizon against h, and gives the mean slope over permutations
with its t interval (each permutation's batch order is shared by the family's configs:
common random numbers). Two horizons: ``fixed_time`` (the corollary's: T = the shortest
run's n h, each config up to step T/h) and ``fixed_steps`` (every recorded step).

:func:`figure1_regimes` says per config which regime the data show: how long its memory
is (L = 1/(1 - max beta_l) steps, against the horizon of S steps, and h L), and whether the
second-order run is closer than the first-order one throughout, only early, or never. The
orders 1 and 2 can only show where the memory is short against the horizon and h L small;
with the paper's beta2 = 0.999 over 300 steps neither holds, and the data are reported as
they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from noisemem.analysis.intervals import columns, mean_interval
from noisemem.analysis.laws import config_frame, families
from noisemem.studies.tables import StudyTables

NAN = float("nan")
ORDERS = {"first": "linf_first", "second": "linf_second"}
HORIZONS = ("fixed_time", "fixed_steps")
#: memory counts as short against the horizon from this many memory lengths on
SHORT_MEMORY = 3.0


def linf_distances(tables: StudyTables) -> pd.DataFrame:
    """The steps rows that hold both l_inf distances: config, permutation, step, lr,
    linf_first, linf_second."""
    s = tables.steps
    cols = ["config", "permutation", "step", "lr", "linf_first", "linf_second"]
    if s.empty or "linf_first" not in s.columns:
        return pd.DataFrame(columns=cols)
    s = s[s["linf_first"].notna() & s["linf_second"].notna()]
    if s.empty:
        return pd.DataFrame(columns=cols)
    lr = {c: float(hp.get("lr", NAN)) for c, hp in _hyper(tables).items()}
    s = s.assign(lr=s["config"].map(lr))
    return s[cols].sort_values(["config", "permutation", "step"]).reset_index(drop=True)


def _hyper(tables: StudyTables) -> dict[str, dict[str, Any]]:
    return {r.config: r.hp for r in config_frame(tables).itertuples(index=False)}


def figure1_families(tables: StudyTables) -> pd.DataFrame:
    """The configs with l_inf distances grouped by family (configs differing only in lr,
    or in lr and a weight decay scaled as 1/lr): family, config, lr."""
    dist = linf_distances(tables)
    fam = families(tables, "lr", scaled=("weight_decay",))
    fam = fam[fam["config"].isin(set(dist["config"]))]
    fam = fam.rename(columns={"value": "lr"})
    counts = fam.groupby("family")["config"].transform("size")
    return fam[counts >= 2].reset_index(drop=True)


def _largest(d: pd.DataFrame, column: str, last_step: int | None) -> pd.Series:
    """Per permutation, the largest distance over steps 0..last_step - 1 (all: None)."""
    if last_step is not None:
        d = d[d["step"] < last_step]
    return d.groupby("permutation")[column].max()


SLOPE_COLUMNS = [
    "family", "order", "horizon", "T", "configs", "lrs", "permutations", "slope",
    "slope_low", "slope_high", "slope_of_mean", "expected",
]  # fmt: skip


def slope(lrs: np.ndarray, distances: np.ndarray) -> float:
    """The least-squares slope of log(distance) on log(h) (NaN with fewer than 2 positive
    points)."""
    ok = np.isfinite(distances) & (distances > 0) & (lrs > 0)
    if np.unique(lrs[ok]).size < 2:
        return NAN
    return float(np.polyfit(np.log(lrs[ok]), np.log(distances[ok]), 1)[0])


def horizon_steps(
    dist: pd.DataFrame, configs: list[str], lrs: dict[str, float]
) -> tuple[float, dict[str, int]]:
    """T = min over the configs of (recorded steps) x h, and each config's steps up to T/h
    (at least 1)."""
    steps = {c: int(dist.loc[dist["config"] == c, "step"].max()) + 1 for c in configs}
    T = min(steps[c] * lrs[c] for c in configs)
    return T, {c: max(1, int(np.floor(T / lrs[c] + 1e-9))) for c in configs}


def figure1_points(tables: StudyTables) -> pd.DataFrame:
    """The points the slopes are fitted to: per family, horizon, order, config and
    permutation, the largest distance over the horizon (``distance``) with the config's lr
    and the steps used."""
    dist = linf_distances(tables)
    fam = figure1_families(tables)
    rows = []
    for family, g in fam.groupby("family", sort=True):
        configs = list(g["config"])
        lrs = {c: float(v) for c, v in zip(g["config"], g["lr"], strict=True)}
        T, upto = horizon_steps(dist, configs, lrs)
        for horizon in HORIZONS:
            for order, column in ORDERS.items():
                for c in configs:
                    last = upto[c] if horizon == "fixed_time" else None
                    largest = _largest(dist[dist["config"] == c], column, last)
                    for p, value in largest.items():
                        rows.append(
                            {
                                "family": family,
                                "horizon": horizon,
                                "T": T if horizon == "fixed_time" else NAN,
                                "order": order,
                                "config": c,
                                "lr": lrs[c],
                                "permutation": int(p),
                                "steps": last
                                if last is not None
                                else int(dist.loc[dist["config"] == c, "step"].max()) + 1,
                                "distance": float(value),
                            }
                        )
    return pd.DataFrame(
        rows,
        columns=[
            "family",
            "horizon",
            "T",
            "order",
            "config",
            "lr",
            "permutation",
            "steps",
            "distance",
        ],
    )


def figure1_slopes(tables: StudyTables) -> pd.DataFrame:
    """Per family, order (first, second) and horizon: the log-log slope of the largest l_inf
    distance against h, the mean over permutations with its t interval, the slope of the
    mean distance, and the order Corollary 3.3 expects (1, 2)."""
    pts = figure1_points(tables)
    rows = []
    for (family, horizon, order), g in pts.groupby(["family", "horizon", "order"], sort=True):
        per_perm = []
        for _, q in g.groupby("permutation"):
            per_perm.append(slope(q["lr"].to_numpy(float), q["distance"].to_numpy(float)))
        mean = g.groupby("lr")["distance"].mean()
        iv = mean_interval(np.asarray(per_perm))
        rows.append(
            {
                "family": family,
                "order": order,
                "horizon": horizon,
                "T": float(g["T"].iloc[0]),
                "configs": int(g["config"].nunique()),
                "lrs": ", ".join(f"{v:.3g}" for v in sorted(g["lr"].unique())),
                "permutations": iv.groups,
                **columns("slope", iv),
                "slope_of_mean": slope(mean.index.to_numpy(float), mean.to_numpy(float)),
                "expected": 1.0 if order == "first" else 2.0,
            }
        )
    return pd.DataFrame(rows, columns=SLOPE_COLUMNS)


REGIME_COLUMNS = [
    "config", "family", "lr", "memory", "steps", "memory_lengths", "h_memory", "closer_share",
    "closer_until", "final_ratio", "max_first", "max_second", "memory_regime", "behaviour",
]  # fmt: skip


def memory_length(hp: dict[str, Any]) -> float:
    """1/(1 - beta) steps for the slowest-decaying momentum variable of the optimizer
    (beta, beta1, beta2, rho2 as its hyperparameters name them)."""
    betas = [float(hp[k]) for k in ("beta", "beta1", "beta2", "rho2") if k in hp]
    if not betas:
        return NAN
    b = max(betas)
    return 1.0 / (1.0 - b) if b < 1 else float("inf")


#: distances below this fraction of a run's largest first-order distance count as ties (at
#: step 0 every run takes the same step; they differ there by rounding only)
TIE = 1e-6


def _live(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The steps at which the distances are not a tie at 0 (see :data:`TIE`)."""
    top = float(np.nanmax(first)) if first.size else 0.0
    return np.maximum(first, second) > TIE * top


def _first_crossing(first: np.ndarray, second: np.ndarray) -> int:
    """The number of leading steps (ties skipped) in which the second-order run is
    closer: the step before which it always was."""
    live = _live(first, second)
    closer = (second < first) | ~live
    bad = np.flatnonzero(~closer)
    return int(bad[0]) if bad.size else int(first.size)


def behaviour(share: float, until: float, steps: int) -> str:
    """In words: when the second-order run is closer than the first-order one."""
    if not np.isfinite(share):
        return "not measured"
    if share >= 0.95:
        return "second order closer throughout"
    if share <= 0.05:
        return "second order never closer"
    if np.isfinite(until) and until >= 1 and share < 0.5:
        return f"second order closer only early (until step {int(until)} of {steps})"
    return f"mixed (second order closer at {share:.0%} of steps)"


def figure1_regimes(tables: StudyTables) -> pd.DataFrame:
    """Per config with l_inf distances: its memory length L (steps), the horizon S (steps),
    S/L, h L, the share of steps at which the second-order run is closer (ties skipped:
    :data:`TIE`), the step until which it always
    was (median over permutations), the final ratio second/first (median), the largest
    distances, and the regime in words: ``memory_regime`` (short: S >= 3 L) and
    ``behaviour``."""
    dist = linf_distances(tables)
    if dist.empty:
        return pd.DataFrame(columns=REGIME_COLUMNS)
    hyper = _hyper(tables)
    fam = figure1_families(tables).set_index("config")["family"].to_dict()
    rows = []
    for config, g in dist.groupby("config", sort=True):
        hp = hyper.get(config, {})
        L = memory_length(hp)
        steps = int(g["step"].max()) + 1
        shares, untils, finals = [], [], []
        for _, q in g.groupby("permutation"):
            q = q.sort_values("step")
            first, second = q["linf_first"].to_numpy(float), q["linf_second"].to_numpy(float)
            live = _live(first, second)
            shares.append(float(np.mean(second[live] < first[live])) if live.any() else NAN)
            untils.append(_first_crossing(first, second))
            finals.append(second[-1] / first[-1] if first[-1] > 0 else NAN)
        share = float(np.nanmean(shares)) if np.isfinite(shares).any() else NAN
        until = float(np.median(untils))
        lr = float(hp.get("lr", NAN))
        ratio = steps / L if np.isfinite(L) and L > 0 else NAN
        rows.append(
            {
                "config": config,
                "family": fam.get(config, ""),
                "lr": lr,
                "memory": L,
                "steps": steps,
                "memory_lengths": ratio,
                "h_memory": lr * L,
                "closer_share": share,
                "closer_until": until,
                "final_ratio": float(np.nanmedian(finals)) if np.isfinite(finals).any() else NAN,
                "max_first": float(g["linf_first"].max()),
                "max_second": float(g["linf_second"].max()),
                "memory_regime": (
                    "short against the horizon"
                    if ratio >= SHORT_MEMORY
                    else "long against the horizon"
                )
                if np.isfinite(ratio)
                else "unknown",
                "behaviour": behaviour(share, until, steps),
            }
        )
    return pd.DataFrame(rows, columns=REGIME_COLUMNS)

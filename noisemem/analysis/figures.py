"""The report's figures (matplotlib, Agg), each drawn from the analysis frames and returned
as PNG bytes (None when the store has nothing to draw).

* :func:`convergence`: the Monte Carlo E[M] along its reference direction as chunks are
  merged in, against P, with the 1/sqrt(P) band of the final standard error.
* :func:`coordinates`: measured against predicted E[M], coordinate by coordinate.
* :func:`batch_size_figure`, :func:`beta_figure`, :func:`anti_regularization_figure`: sweep
  curves with their theory lines (:mod:`noisemem.analysis.laws`).
* :func:`linf_vs_step`, :func:`linf_vs_h`: Figure 1, the l_inf distances against the step
  and against h, with the fitted slopes (:mod:`noisemem.analysis.figure1`).
* :func:`loss_figure`: the mean batch loss per config.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from noisemem.analysis.compare import Predictions, chunk_stats, is_fixed
from noisemem.analysis.intervals import jackknife, projection
from noisemem.studies.tables import StudyTables

#: the most panels a small-multiples figure draws (the rest are named in its title)
MAX_PANELS = 12
#: the most coordinates a scatter draws per panel (an even subsample of the rest)
MAX_POINTS = 600


@contextmanager
def _pyplot() -> Iterator[Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7}):
        yield plt


def png(fig: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    return buf.getvalue()


def short(config: str, width: int = 38) -> str:
    """A config id short enough for a panel title."""
    return config if len(config) <= width else config[: width - 1] + "…"


def _grid(plt: Any, count: int, width: float = 3.2, height: float = 2.6) -> tuple[Any, list]:
    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _interval_bars(
    ax: Any, x: np.ndarray, g: pd.DataFrame, column: str, color: str, label: str
) -> None:
    """Squares at ``g[column]`` with bars to its 95% interval (``column_low``/``_high``)."""
    y = g[column].to_numpy(float)
    err = np.vstack([y - g[f"{column}_low"], g[f"{column}_high"] - y])
    ax.errorbar(x, y, yerr=err, fmt="s", color=color, ms=4, capsize=2, label=label)


def _last_fixed_keys(tables: StudyTables) -> list[tuple[str, str, int]]:
    """Per config, its first fixed probe (``init`` first) at its last probe step."""
    keys: dict[str, tuple[str, str, int]] = {}
    for config, probe, step in sorted(chunk_stats(tables.moments)):
        if not is_fixed(probe):
            continue
        best = keys.get(config)
        rank = (probe != "init", probe, -step)
        if best is None or rank < (best[1] != "init", best[1], -best[2]):
            keys[config] = (config, probe, step)
    return list(keys.values())


def _reference(
    preds: Predictions,
    key: tuple[str, str, int],
    kinds: tuple[str, ...] = ("exact_mean", "noise_aware_mean", "full_batch"),
) -> tuple[str, np.ndarray | None]:
    for kind in kinds:
        v = preds.vector(*key, kind)
        if v is not None and np.linalg.norm(v) > 0:
            return kind, v
    return "final MC", None


def convergence(tables: StudyTables) -> bytes | None:
    """E[M] along the reference direction u (exact, else noise-aware, else the final MC
    mean), in units of |reference|, as the chunks are merged one by one;
    the band is final +- 1.96 sigma/sqrt(P) with sigma = the final jackknife SE x sqrt(P)."""
    stats = chunk_stats(tables.moments)
    preds = Predictions(tables.predictions)
    keys = [k for k in _last_fixed_keys(tables) if stats[k].with_runs.size >= 1]
    if not keys:
        return None
    with _pyplot() as plt:
        fig, axes = _grid(plt, min(len(keys), MAX_PANELS))
        for ax, key in zip(axes, keys, strict=False):
            s = stats[key]
            name, ref = _reference(preds, key, ("exact_mean", "noise_aware_mean"))
            final = s.pooled()
            if ref is None:
                ref = final.mean
            scale = float(np.linalg.norm(ref))
            if not scale > 0:
                continue
            u = ref / scale
            cum = s.cumulative()
            P = np.array([c.count for c in cum], dtype=float)
            y = np.array([float(c.mean @ u) / scale for c in cum])
            ax.plot(P, y, "o-", ms=3, label="MC, chunks merged")
            jk = jackknife(s, partial(projection, direction=u, scale=scale))
            sigma = jk.se * math.sqrt(final.count) if np.isfinite(jk.se) else float("nan")
            if np.isfinite(sigma):
                grid = np.linspace(P.min(), P.max(), 100)
                band = 1.96 * sigma / np.sqrt(grid)
                ax.fill_between(grid, y[-1] - band, y[-1] + band, alpha=0.2, label="1/sqrt(P) band")
            if name != "final MC":
                ax.axhline(1.0, color="k", lw=0.8, ls="--", label=name)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
            ax.set_xticks(P)
            ax.set_xlabel("P (runs merged)")
            ax.set_ylabel(f"<E[M], u>/|{name}|")
            ax.set_title(f"{short(key[0])}\n{key[1]} step {key[2]}")
        axes[0].legend(loc="best")
        fig.tight_layout()
        return png(fig)


def coordinates(tables: StudyTables) -> bytes | None:
    """Per config (first fixed probe, last step): MC E[M]_j against the prediction's j-th
    coordinate (exact, else noise-aware, else full-batch), with 2-SE error bars."""
    stats = chunk_stats(tables.moments)
    preds = Predictions(tables.predictions)
    keys = [k for k in _last_fixed_keys(tables) if _reference(preds, k)[1] is not None]
    keys = [k for k in keys if stats[k].pooled().count >= 2]
    if not keys:
        return None
    with _pyplot() as plt:
        fig, axes = _grid(plt, min(len(keys), MAX_PANELS))
        for ax, key in zip(axes, keys, strict=False):
            name, ref = _reference(preds, key)
            assert ref is not None
            p = stats[key].pooled()
            idx = np.arange(ref.size)
            if idx.size > MAX_POINTS:
                idx = np.linspace(0, ref.size - 1, MAX_POINTS).astype(int)
            ax.errorbar(
                ref[idx], p.mean[idx], yerr=2 * p.stderr[idx], fmt=".", ms=2, lw=0.5, alpha=0.6
            )
            lo = float(np.nanmin([ref[idx].min(), p.mean[idx].min()]))
            hi = float(np.nanmax([ref[idx].max(), p.mean[idx].max()]))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_xlabel(f"{name} (coordinate)")
            ax.set_ylabel("MC E[M] (coordinate)")
            ax.set_title(f"{short(key[0])}\n{key[1]} step {key[2]}, P={p.count}")
        fig.tight_layout()
        return png(fig)


def batch_size_figure(trend: pd.DataFrame) -> bytes | None:
    """Noise part and R against the batch size (log-log), per family, with the law lines
    (first fixed probe, first epoch)."""
    if trend.empty:
        return None
    probe = "init" if (trend["probe"] == "init").any() else sorted(trend["probe"])[0]
    t = trend[(trend["probe"] == probe) & (trend["epoch"] == trend["epoch"].min())]
    with _pyplot() as plt:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        drawn: set[tuple] = set()
        for i, (family, g) in enumerate(t.groupby("family", sort=True)):
            color = f"C{i % 10}"
            b = g["batch_size"].to_numpy(float)
            _interval_bars(ax1, b, g, "noise_mc", color, f"MC: {short(family, 50)}")
            if g["noise_exact"].notna().any():
                ax1.plot(b, g["noise_exact"], "o", mfc="none", color=color, label="exact")
            ax1.plot(b, g["noise_law"], "-", color=color, lw=1, label=f"law ({g['law'].iloc[0]})")
            series = tuple(np.round(g["R"].to_numpy(float), 12))
            if series not in drawn:  # R is the optimizer's only at a probe it alone reaches
                drawn.add(series)
                ax2.plot(b, g["R"], "o", color=color, label=short(family, 50))
                ax2.plot(b, g["R_law"], "-", color=color, lw=1, label="(N-b)/(b(N-1)) x fit")
        for ax, what in ((ax1, "|noise part of E[M]|"), (ax2, "R = E|g_i - g|^2")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size b")
            ax.set_ylabel(what)
            ax.legend(loc="best")
        ax1.set_title(f"noise part at {probe}, end of epoch 1")
        ax2.set_title(f"variance regularizer at {probe}")
        fig.tight_layout()
        return png(fig)


def beta_figure(trend: pd.DataFrame) -> bytes | None:
    """The noise coefficient against beta: exact finite-n, the paper's large-n, measured."""
    if trend.empty:
        return None
    probe = "init" if (trend["probe"] == "init").any() else sorted(trend["probe"])[0]
    t = trend[trend["probe"] == probe]
    t = t[t["step"] == t.groupby("config")["step"].transform("max")]
    with _pyplot() as plt:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for i, (family, g) in enumerate(t.groupby("family", sort=True)):
            color = f"C{i % 10}"
            g = g.sort_values("beta")
            beta = g["beta"].to_numpy(float)
            ax.plot(beta, g["c_noise_exact"], "o-", color=color, label="exact finite n")
            ax.plot(
                beta,
                g["c_noise_large_n"],
                "--",
                color=color,
                label="beta/((1-beta)^2(1+beta)) (large n)",
            )
            _interval_bars(ax, beta, g, "c_noise_mc", color, f"MC: {short(family, 40)}")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("beta")
        ax.set_ylabel("noise coefficient c_noise")
        ax.set_title(f"noise part / (h Cov) at {probe}, last probe step")
        ax.legend(loc="best")
        fig.tight_layout()
        return png(fig)


def anti_regularization_figure(anti: pd.DataFrame) -> bytes | None:
    """<E[M], d>/|d| against a2 - a1 (Adam-like) with intervals; Lion at 0 on the x axis."""
    if anti.empty:
        return None
    with _pyplot() as plt:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for i, (kind, g) in enumerate(anti.groupby("optimizer", sort=True)):
            x = g["coefficient"].fillna(0.0).to_numpy(float)
            y = g["proj_mc"].to_numpy(float)
            err = np.vstack([y - g["proj_mc_low"], g["proj_mc_high"] - y])
            ax.errorbar(x, y, yerr=err, fmt="o", color=f"C{i}", capsize=2, label=f"MC: {kind}")
            ax.plot(x, g["proj_full_batch"], "x", color=f"C{i}", label=f"full-batch: {kind}")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xlabel("a2 - a1 (Lemma K.2 at the probe step; > 0: anti-regularization)")
        ax.set_ylabel("<E[M], d>/|d|,  d = grad ||grad L||_{1,eps}")
        ax.legend(loc="best")
        fig.tight_layout()
        return png(fig)


def linf_vs_step(dist: pd.DataFrame, fam: pd.DataFrame) -> bytes | None:
    """Per family: the mean over permutations of the l_inf distance to the first-order
    (solid) and second-order (dashed) memoryless runs against the step, one colour per h."""
    if dist.empty:
        return None
    groups = list(fam.groupby("family", sort=True)) or [
        ("every config", pd.DataFrame({"config": sorted(dist["config"].unique())}))
    ]
    with _pyplot() as plt:
        fig, axes = _grid(plt, min(len(groups), MAX_PANELS), width=4.5, height=3.4)
        for ax, (family, g) in zip(axes, groups, strict=False):
            for i, config in enumerate(g["config"]):
                d = dist[dist["config"] == config]
                mean = d.groupby("step")[["linf_first", "linf_second"]].mean()
                lr = d["lr"].iloc[0]
                ax.plot(
                    mean.index + 1,
                    mean["linf_first"],
                    "-",
                    color=f"C{i}",
                    label=f"h={lr:.3g} first order",
                )
                ax.plot(
                    mean.index + 1,
                    mean["linf_second"],
                    "--",
                    color=f"C{i}",
                    label=f"h={lr:.3g} second order",
                )
            ax.set_yscale("log")
            ax.set_xlabel("step n + 1")
            ax.set_ylabel("l_inf distance to memoryless run")
            ax.set_title(short(family, 60))
            ax.legend(loc="best")
        fig.tight_layout()
        return png(fig)


def linf_vs_h(points: pd.DataFrame, slopes: pd.DataFrame) -> bytes | None:
    """Per family and horizon: the largest l_inf distance against h (log-log), one point
    per permutation, with the fitted lines and their slopes."""
    if points.empty:
        return None
    panels = list(points.groupby(["family", "horizon"], sort=True))
    with _pyplot() as plt:
        fig, axes = _grid(plt, min(len(panels), MAX_PANELS), width=4.2, height=3.4)
        for ax, ((family, horizon), g) in zip(axes, panels, strict=False):
            for i, (order, q) in enumerate(g.groupby("order", sort=True)):
                ax.plot(q["lr"], q["distance"], "o", color=f"C{i}", ms=3, alpha=0.6)
                mean = q.groupby("lr")["distance"].mean()
                h = mean.index.to_numpy(float)
                hit = slopes[
                    (slopes["family"] == family)
                    & (slopes["horizon"] == horizon)
                    & (slopes["order"] == order)
                ]
                s = float(hit["slope"].iloc[0]) if len(hit) else float("nan")
                lo = float(hit["slope_low"].iloc[0]) if len(hit) else float("nan")
                hi = float(hit["slope_high"].iloc[0]) if len(hit) else float("nan")
                ok = mean.to_numpy(float) > 0
                if ok.sum() >= 2 and np.isfinite(s):
                    c = np.exp(np.mean(np.log(mean.to_numpy(float)[ok]) - s * np.log(h[ok])))
                    ax.plot(
                        h,
                        c * h**s,
                        "-",
                        color=f"C{i}",
                        label=f"{order} order: slope {s:.2f} [{lo:.2f}, {hi:.2f}]",
                    )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("h (lr)")
            ax.set_ylabel("max l_inf distance over the horizon")
            ax.set_title(f"{short(family, 50)}\n{horizon.replace('_', ' ')}")
            ax.legend(loc="best")
        fig.tight_layout()
        return png(fig)


def loss_figure(tables: StudyTables) -> bytes | None:
    """The batch loss (mean over permutations) against the step, per config."""
    steps = tables.steps
    if steps.empty:
        return None
    mean = steps.groupby(["config", "step"])["loss"].mean().reset_index()
    with _pyplot() as plt:
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        for config, g in mean.groupby("config", sort=True):
            ax.plot(g["step"], g["loss"], label=short(str(config), 50), lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("batch loss (mean over permutations)")
        ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        return png(fig)

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

Every number comes from :func:`noisemem.analysis.results.analyse`, which reads the store's
tables through the analysis modules (:mod:`~noisemem.analysis.compare`,
:mod:`~noisemem.analysis.laws`, :mod:`~noisemem.analysis.figure1`) and reads the claims off
them (:mod:`~noisemem.analysis.claims`); the page only formats them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import overload

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from noisemem.analysis import figure1, figures
from noisemem.analysis import html as H
from noisemem.analysis.claims import LARGE_N_TOLERANCE, LAW_FACTOR, SLOPE_TOLERANCE
from noisemem.analysis.compare import (
    CHANCE,
    Z_OFF,
    chunk_stats,
    comparison_table,
    epoch_summary,
)
from noisemem.analysis.intervals import LEVEL
from noisemem.analysis.results import (
    SUMMARY_COLUMNS,
    Analysis,
    analyse,
    summary_frame,
    summary_parquet,
)
from noisemem.studies.schema import reference
from noisemem.studies.store import Store
from noisemem.studies.tables import StudyTables, load

NAN = float("nan")
REPORT = "report.html"
SUMMARY = "summary.parquet"


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
    ``study.toml``), section by section in the order of the navigation bar."""
    name = str(a.tables.manifest.get("study", "study"))
    body = [
        _head(a, name),
        _claims_section(a),
        _status_section(a, chunks),
        _exact_section(a),
        _predictions_section(a),
        _noise_section(a),
        _sweeps_section(a),
        _figure1_section(a),
        _own_section(a),
        _convergence_section(a),
        _spec_section(spec_text),
        _versions_section(a),
        _assumptions_section(),
        _columns_section(),
    ]
    return H.document(f"noisemem study {name}", "".join(body))


def _head(a: Analysis, name: str) -> str:
    """The title, the store, the version and the navigation bar."""
    try:
        version = metadata.version("noisemem")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        version = "unknown"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = "<nav>" + "".join(f'<a href="#{k}">{H.esc(v)}</a>' for k, v in SECTIONS_NAV) + "</nav>"
    return (
        f"<h1>noisemem study <code>{H.esc(name)}</code></h1>"
        f'<p class="note">Store {H.esc(a.uri)}; report by noisemem {H.esc(version)}, {when}. '
        'Every column is explained in the <a href="#columns">column reference</a>; every '
        f"number is also in <code>{SUMMARY}</code> beside this file.</p>{nav}"
    )


def _claims_section(a: Analysis) -> str:
    """Each claim of the paper with its evidence and verdict."""
    shown = a.claims.assign(claim=a.claims["statement"] + " (" + a.claims["source"] + ")")
    claims_html = H.grouped_table(
        shown[["claim", "subject", "evidence", "verdict"]],
        "claims-table",
        "Each claim of the paper, the numbers of this store that bear on it, and the verdict",
        group=("claim",),
        classes=[v.replace(" ", "-") for v in a.claims["verdict"]],
    )
    return _section("claims", "The paper's claims next to the numbers", claims_html)


def _status_section(a: Analysis, chunks: int) -> str:
    """What the store holds; diverged runs and failed chunks."""
    t = a.tables
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
    return _section(
        "status",
        "What the store holds",
        H.table(facts, "status-table", "The store", text_columns=("what", "value")),
        status_html,
        diverged_html,
        failed_html,
    )


def _exact_section(a: Analysis) -> str:
    """Monte Carlo E[M] against the exact expectation."""
    t = a.tables
    return _section(
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
    )


def _predictions_section(a: Analysis) -> str:
    """How much of E[M] each prediction explains."""
    return _section(
        "predictions",
        "How much of E[M] each prediction explains",
        _frame_or_note(
            a.fits,
            "prediction-fits",
            "MC E[M] against every prediction stored beside it",
            "No predictions at fixed probes in this store.",
        ),
    )


def _noise_section(a: Analysis) -> str:
    """The noise part and the variance regularizer R."""
    return _section(
        "noise",
        "The noise part against the full-batch part, and the variance regularizer R",
        _frame_or_note(
            a.noise,
            "noise-parts",
            "Noise part = MC E[M] - full-batch prediction; R = E|g_i - g|^2",
            "No full-batch predictions in this store.",
        ),
    )


def _sweeps_section(a: Analysis) -> str:
    """Trends across sweeps (batch size, beta, beta2 - beta1) next to their laws."""
    return _section(
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
        _frame_or_note(
            a.batch_predictions,
            "batch-size-predictions",
            "How far each prediction is from MC E[M] across batch sizes "
            "(the full-batch one ignores the noise)",
            "No predictions in a batch-size sweep of this store.",
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
    )


def _figure1_section(a: Analysis) -> str:
    """Figure 1: slopes, regimes and the l_inf distances."""
    t = a.tables
    dist = figure1.linf_distances(t)
    fam = figure1.figure1_families(t)
    return _section(
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
    )


def _own_section(a: Analysis) -> str:
    """Corrections at each run's own parameters after each epoch."""
    t = a.tables
    return _section(
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
    )


def _convergence_section(a: Analysis) -> str:
    """Convergence of the Monte Carlo estimate in P, and the short comparison."""
    t = a.tables
    return _section(
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
    )


def _spec_section(spec_text: str | None) -> str:
    """The resolved spec as the store holds it."""
    return _section(
        "spec",
        "The resolved spec (study.toml)",
        f"<pre>{H.esc(spec_text or 'no study.toml in this store')}</pre>",
    )


def _versions_section(a: Analysis) -> str:
    """The library versions the runs recorded."""
    t = a.tables
    return _section(
        "versions",
        "Library versions of the runs",
        _frame_or_note(
            _versions(t.runs),
            "versions-table",
            "runs.versions",
            "No runs with recorded versions.",
            text_columns=("library", "version"),
        ),
    )


def _assumptions_section() -> str:
    """What the analysis assumed."""
    return _section("assumptions", "What the analysis assumed", H.items(ASSUMPTIONS))


def _columns_section() -> str:
    """The column reference of the store's tables and of summary.parquet."""
    return _section(
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
    )


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


__all__ = ["read_summary", "render", "write_markdown", "write_report"]

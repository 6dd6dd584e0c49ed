"""A study's report: the comparison tables, the batch loss, and how to read the numbers."""

from __future__ import annotations

import json
from pathlib import Path

from noisemem.analysis.compare import comparison_table, epoch_summary
from noisemem.studies.tables import StudyTables

INTERPRETATION = [
    "E[M] is the expected memory correction of Eq. (9) over batch orders; the full-batch "
    "prediction is the memoryless correction of Appendix E / Lemmas K.1-K.3 at the same step.",
    "Heavy ball: the exact expectation = full-batch part + a noise part along the gradient of "
    "the mini-batch gradient variance, an implicit regularizer (Sec. 6.2).",
    "Adam(W): no closed form; MC minus the full-batch prediction is the correction mini-batch "
    "noise adds. With beta2 > beta1 AdamW's memory anti-regularizes (Sec. 4); Lion does not.",
]


def write_report(tables: StudyTables, out_dir: str | Path) -> Path:
    """``report.md`` (tables and interpretation) and ``loss.png`` in ``out_dir``."""
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
    if len(tables.steps):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        mean_loss = tables.steps.groupby(["config", "step"])["loss"].mean().reset_index()
        for config, g in mean_loss.groupby("config"):
            ax.plot(g["step"], g["loss"], label=config)
        ax.set_xlabel("step")
        ax.set_ylabel("batch loss (mean over permutations)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=120)
        plt.close(fig)
        lines += ["", "![loss](loss.png)"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report

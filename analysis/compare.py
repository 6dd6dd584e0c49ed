"""Compare Monte Carlo E[M] with the exact expectation and the full-batch prediction.

One row per (optimizer, probe): norms, the Monte Carlo distance to the exact expectation in
standard errors, and how much of E[M] the full-batch prediction explains (cosine, and the
relative size of the remainder -- the correction that mini-batch noise adds).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor


@dataclass(frozen=True)
class Comparison:
    """The measured and predicted vectors for one (optimizer, probe)."""

    optimizer: str
    probe: str
    monte_carlo: Tensor
    stderr: Tensor
    permutations: int
    full_batch: Tensor
    exact: Tensor | None = None
    noise_part: Tensor | None = None


def _z(r: Comparison) -> Tensor:
    assert r.exact is not None
    return (r.monte_carlo - r.exact).double() / r.stderr.double().clamp_min(1e-300)


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def comparison_table(rows: list[Comparison]) -> pd.DataFrame:
    """The comparison table, one row per (optimizer, probe)."""
    nan = float("nan")
    records = []
    for r in rows:
        rec = {
            "optimizer": r.optimizer,
            "probe": r.probe,
            "P": r.permutations,
            "|E[M]| MC": float(r.monte_carlo.norm()),
            "|E[M]| exact": float(r.exact.norm()) if r.exact is not None else nan,
            # z per coordinate; rms z should be ~1 (t-distributed with P-1 dof), the max over
            # d coordinates grows like sqrt(2 log d)
            "MC-exact rms z": _z(r).pow(2).mean().sqrt().item() if r.exact is not None else nan,
            "MC-exact max |z|": _z(r).abs().max().item() if r.exact is not None else nan,
            "|full-batch|": float(r.full_batch.norm()),
            "cos(MC, full-batch)": _cos(r.monte_carlo, r.full_batch),
            "|MC - full-batch|/|full-batch|": _rel(r.monte_carlo, r.full_batch),
            "|noise part| exact": float(r.noise_part.norm()) if r.noise_part is not None else nan,
        }
        records.append(rec)
    return pd.DataFrame.from_records(records)


def markdown_report(table: pd.DataFrame, title: str, notes: list[str]) -> str:
    """A self-contained Markdown report: the table and the interpretation notes."""
    lines = [f"# {title}", "", table.to_markdown(index=False, floatfmt=".4g"), ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"

"""The store's schema: every table, every column (name, type, unit, meaning), the history.

:data:`COLUMNS` is the one place the columns are written down: the Arrow schemas
(:data:`SCHEMAS`), the column reference of the README and of every report
(:func:`reference`) are made from it. Vectors (``mean``, ``m2``, ``vector``) are
``list<float64>`` in ``parameters_to_vector`` order; steps count from 0 (step n is the
(n+1)-th update, so the end of epoch e is step e m - 1); ``step = -1`` in ``predictions``
is the n -> infinity limit.

Schema history:

* version 3: a ``configs`` table (one row per config, one typed column per
  hyperparameter, the training setting: configs may sweep batch size, epochs, sampling
  and seed); ``moments.excluded``; ``corrections.proj_anti``; the noise-aware and the
  anti-regularization predictions; per-chunk records (``_chunks/``) listing every part with
  its row count and checksum; temporary files named ``.<part>.tmp-<hex>``.
* version 2: ``moments`` keeps ``mean`` and ``m2`` (centred sum of squares).
* version 1: ``moments`` kept ``sum`` and ``sum_sq``. Version-1 parts still load: the store
  converts each on reading (:func:`moments_from_v1`: ``mean = sum / count``,
  ``m2 = sum_sq - sum**2 / count``, as exact as the stored sums allow). Columns a part of
  an older version lacks read as null.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 3
#: versions the store reads (older parts are converted on reading)
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
#: the tables of one chunk, in the order they are written (the chunk's record last)
CHUNK_TABLES = ("steps", "corrections", "moments", "runs")
TABLES = ("configs", "runs", "steps", "corrections", "moments", "predictions")

_VECTOR = pa.list_(pa.float64())


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    unit: str
    meaning: str


C = Column
#: every table's columns; ``configs`` also has one column per hyperparameter (below)
COLUMNS: dict[str, tuple[Column, ...]] = {
    "configs": (
        C("config", pa.string(), "", "config id: c<index>-<optimizer>-<grid values>[-<swept>]"),
        C("index", pa.int32(), "", "position of the config in the study's product"),
        C("optimizer", pa.string(), "", "optimizer class name (noisemem.optim or a user's)"),
        C("hyperparameters", pa.string(), "", "every hyperparameter as JSON (also typed below)"),
        C("batch_size", pa.int32(), "samples", "mini-batch size b"),
        C("epochs", pa.int32(), "epochs", "epochs per run"),
        C("sampling", pa.string(), "", "permute | reshuffle | replacement (THEORY §4)"),
        C("seed", pa.int64(), "", "seed of the initialisation and of the batch orders"),
        C("num_batches", pa.int32(), "batches", "m = N // b batches per epoch"),
        C("num_samples", pa.int32(), "samples", "N, the samples the batches hold (m b)"),
        C("steps", pa.int32(), "steps", "updates per run: epochs x m"),
        C("swept", pa.string(), "", "the training fields the study sweeps, comma-separated"),
    ),
    "runs": (
        C("study", pa.string(), "", "study name"),
        C("config", pa.string(), "", "config id (see configs)"),
        C("chunk", pa.int32(), "", "chunk of permutations the run was computed in"),
        C("permutation", pa.int32(), "", "index p of the run's batch order"),
        C("seed", pa.int64(), "", "the config's seed"),
        C("optimizer", pa.string(), "", "optimizer class name"),
        C("hyperparameters", pa.string(), "", "the optimizer's hyperparameters as JSON"),
        C("lr", pa.float64(), "", "learning rate h"),
        C("batch_size", pa.int32(), "samples", "mini-batch size b"),
        C("epochs", pa.int32(), "epochs", "epochs per run"),
        C("sampling", pa.string(), "", "batch-order scheme"),
        C("status", pa.string(), "", "ok | diverged (see diverged_at) | failed (see error)"),
        C("error", pa.string(), "", "traceback of a failed chunk, else null"),
        C(
            "diverged_at",
            pa.int32(),
            "step",
            "first step whose parameters, gradient, loss or "
            "correction was not finite; null for runs that did not diverge",
        ),
        C("seconds", pa.float64(), "s", "wall time of the chunk per run (training and probes)"),
        C("worker", pa.string(), "", "host:pid of the actor"),
        C("device", pa.string(), "", "cpu | cuda"),
        C("versions", pa.string(), "", "library versions and device name as JSON"),
        C(
            "memory_plan",
            pa.string(),
            "",
            "how the chunk's probes held the batch gradients' graph, as JSON "
            "(noisemem.budget.MemoryPlan: mode graph | grouped, graph_batches, budget and "
            "estimate in bytes, points: the runs whose epoch-end graphs were held together "
            "under runtime.batched_probes, else 1; the budget is the actor's free memory unless "
            "runtime.memory_budget is set, so it differs between machines and runs); null "
            "in stores written before it was recorded",
        ),
    ),
    "steps": (
        C("config", pa.string(), "", "config id"),
        C("permutation", pa.int32(), "", "run index p"),
        C("step", pa.int32(), "step", "update n (0-based)"),
        C("epoch", pa.int32(), "epoch", "epoch of the step (0-based)"),
        C("batch", pa.int32(), "", "batch used (for reshuffle: the fresh batch's row)"),
        C("loss", pa.float64(), "nats", "mini-batch loss at theta^(n) (mean cross-entropy)"),
        C("accuracy", pa.float64(), "fraction", "mini-batch accuracy at theta^(n)"),
        C("grad_norm", pa.float64(), "", "|g^(n)| of the mini-batch gradient, float64"),
        C(
            "linf_first",
            pa.float64(),
            "",
            "l_inf distance to the first-order memoryless run "
            "after step n (Figure 1), when recorded",
        ),
        C("linf_second", pa.float64(), "", "same for the second-order memoryless run (4)"),
    ),
    "corrections": (
        C("config", pa.string(), "", "config id"),
        C("permutation", pa.int32(), "", "run index p"),
        C(
            "probe",
            pa.string(),
            "",
            "init | ref<s> (step s of the full-batch reference run) | "
            "epoch (the run's own parameters after each epoch)",
        ),
        C("step", pa.int32(), "step", "n of M^(n): the last step of an epoch"),
        C("norm", pa.float64(), "", "|M_p| of Eq. (9) for the run's order, float64"),
        C("linf", pa.float64(), "", "max_j |M_p,j|"),
        C("full_batch_norm", pa.float64(), "", "|full-batch prediction| at the same point"),
        C("proj_full_batch", pa.float64(), "", "<M_p, fb>/|fb|^2: M_p in units of fb"),
        C("cos_full_batch", pa.float64(), "", "cosine of M_p with the full-batch prediction"),
        C("cos_noise", pa.float64(), "", "cosine of M_p with the noise direction Cov"),
        C(
            "proj_anti",
            pa.float64(),
            "",
            "<M_p, d>/|d|: M_p along Sec. 4's direction d = grad ||grad L||_{1,eps} at the "
            "same point (optimizers with an eps in Phi: Adam's family, soft-sign Lion; NaN "
            "for the others); negative: anti-regularizing",
        ),
        C("vector", _VECTOR, "", "M_p itself when record.vectors, else null"),
    ),
    "moments": (
        C("config", pa.string(), "", "config id"),
        C("probe", pa.string(), "", "probe point (as in corrections)"),
        C("step", pa.int32(), "step", "n of M^(n)"),
        C("chunk", pa.int32(), "", "chunk the statistics are over"),
        C("count", pa.int64(), "runs", "runs of the chunk with a finite M there"),
        C("mean", _VECTOR, "", "mean of M over those runs (NaN when count is 0)"),
        C(
            "m2",
            _VECTOR,
            "",
            "centred sum of squares sum_p (M_p - mean)^2; merge chunks "
            "with Chan et al.'s formula (noisemem.stats.chan_merge)",
        ),
        C(
            "excluded",
            pa.int64(),
            "runs",
            "runs of the chunk left out there: M not finite, or "
            "the run had diverged (null in stores before version 3)",
        ),
    ),
    "predictions": (
        C("config", pa.string(), "", "config id"),
        C("probe", pa.string(), "", "init | ref<s>"),
        C("step", pa.int32(), "step", "n; -1 for the n -> infinity limit"),
        C(
            "kind",
            pa.string(),
            "",
            "full_batch | full_batch_limit | exact_mean | exact_full_batch_part | "
            "exact_noise_part (heavy ball, Nesterov) | noise_aware_mean | "
            "noise_aware_full_batch_part | noise_aware_noise_part (noisemem.noise_aware) | "
            "noise_direction (Cov, with R in coefficients) | anti_regularization (d, step -1)",
        ),
        C("norm", pa.float64(), "", "|vector| (NaN with no vector)"),
        C(
            "coefficients",
            pa.string(),
            "",
            'the scalar coefficients used, as JSON ({"no_closed_form": 1} where there is none)',
        ),
        C("vector", _VECTOR, "", "the prediction, null where the optimizer has no closed form"),
    ),
}
del C

SCHEMAS: dict[str, pa.Schema] = {
    table: pa.schema([(c.name, c.type) for c in columns]) for table, columns in COLUMNS.items()
}
#: what a ``configs`` hyperparameter column holds: numbers as float64, flags as bool, the
#: rest as strings; null where a config's optimizer has no such hyperparameter
HYPERPARAMETER_TYPES = {bool: pa.bool_(), int: pa.float64(), float: pa.float64()}


def hyperparameter_type(value: object) -> pa.DataType:
    return HYPERPARAMETER_TYPES.get(type(value), pa.string())


def reference() -> str:
    """Every table's columns as Markdown (name, type, unit, meaning)."""
    lines = []
    for table, columns in COLUMNS.items():
        lines += [f"### `{table}`", "", "| column | type | unit | meaning |", "|---|---|---|---|"]
        lines += [f"| `{c.name}` | {c.type} | {c.unit} | {c.meaning} |" for c in columns]
        if table == "configs":
            lines.append(
                "| *each hyperparameter* | float64, bool or string | | one column per field "
                "of the study's optimizers (null where a config's optimizer lacks it) |"
            )
        lines.append("")
    return "\n".join(lines)


#: the ``moments`` table of schema version 1 (converted on reading)
MOMENTS_V1 = pa.schema(
    [
        ("config", pa.string()),
        ("probe", pa.string()),
        ("step", pa.int32()),
        ("chunk", pa.int32()),
        ("count", pa.int64()),
        ("sum", _VECTOR),
        ("sum_sq", _VECTOR),
    ]
)


def moments_from_v1(table: pa.Table) -> pa.Table:
    """A version-1 ``moments`` table (count, sum, sum_sq) in the current schema (count, mean,
    m2; ``excluded`` null): ``mean = sum / count`` and ``m2 = max(sum_sq - sum**2 / count,
    0)``; a count of 0 gives a NaN mean and a zero m2, a count of 1 a zero m2."""
    table = table.select(MOMENTS_V1.names).cast(MOMENTS_V1)
    means, m2s = [], []
    for count, total, squares in zip(
        table.column("count").to_pylist(),
        table.column("sum").to_pylist(),
        table.column("sum_sq").to_pylist(),
        strict=True,
    ):
        total_a, squares_a = np.asarray(total, dtype=np.float64), np.asarray(squares, np.float64)
        if count == 0:
            means.append(np.full_like(total_a, np.nan).tolist())
            m2s.append(np.zeros_like(total_a).tolist())
            continue
        m2 = np.zeros_like(total_a) if count == 1 else squares_a - total_a * total_a / count
        means.append((total_a / count).tolist())
        m2s.append(np.clip(m2, 0.0, None).tolist())
    columns = {n: table.column(n) for n in ("config", "probe", "step", "chunk", "count")}
    columns["mean"] = pa.array(means, _VECTOR)
    columns["m2"] = pa.array(m2s, _VECTOR)
    columns["excluded"] = pa.nulls(len(table), pa.int64())
    return pa.table(columns, schema=SCHEMAS["moments"])


def upgrade(table: str, part: pa.Table) -> pa.Table:
    """A part of an older version in the current schema: columns it lacks are null."""
    schema = SCHEMAS[table]
    missing = [f for f in schema if f.name not in part.column_names]
    for f in missing:
        part = part.append_column(f, pa.nulls(len(part), f.type))
    return part.select(schema.names).cast(schema)

"""The store's schema: its tables, their columns and the schema history.

Schema version 2. Vectors (``mean``, ``m2``, ``vector``) are ``list<float64>`` in
``parameters_to_vector`` order. Tables:

* ``runs``: one row per (config, permutation): seeds, optimizer and hyperparameters (JSON),
  status (ok / diverged / failed) with the error, the step it diverged at, timings, versions.
* ``steps``: per (config, permutation, step): batch loss and accuracy, gradient norm, and the
  l_inf distances to the first/second-order memoryless runs when recorded.
* ``corrections``: per (config, permutation, probe, step): |M|, l_inf, and projections and
  cosines against the full-batch prediction and the noise direction at the same parameters
  (computed in float64 whatever the study's dtype).
* ``moments``: per (config, probe, step, chunk), over the chunk's runs with a finite M:
  ``count``; ``mean``, the mean of M (NaN when count is 0); ``m2``, the centred sum of squares
  ``sum_p (M_p - mean)^2`` (float64). Parts merge with Chan et al.'s pairwise formula
  (:func:`noisemem.stats.chan_merge`, :func:`noisemem.analysis.compare.merged_moments`),
  which stays accurate when the
  spread across permutations is tiny against the mean.
* ``predictions``: per (config, probe, step, kind): full-batch and exact-expectation vectors
  with their norms and coefficients.

Schema history: version 1 stored ``sum`` and ``sum_sq`` (sums of M and of M**2) in
``moments`` instead of ``mean`` and ``m2``; every other table is the same. Version-1 parts
still load: the store converts each such part on reading (:func:`moments_from_v1`:
``mean = sum / count``, ``m2 = sum_sq - sum**2 / count``, as exact as the stored sums allow),
so a version-1 store,
or one a newer noisemem resumed (parts of both versions), reads as version 2.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 2
#: versions :func:`load` reads (older parts are converted on reading, see the module notes)
READABLE_SCHEMA_VERSIONS = (1, 2)
TABLES = ("runs", "steps", "corrections", "moments", "predictions")

SCHEMAS: dict[str, pa.Schema] = {
    "runs": pa.schema(
        [
            ("study", pa.string()),
            ("config", pa.string()),
            ("chunk", pa.int32()),
            ("permutation", pa.int32()),
            ("seed", pa.int64()),
            ("optimizer", pa.string()),
            ("hyperparameters", pa.string()),
            ("lr", pa.float64()),
            ("batch_size", pa.int32()),
            ("epochs", pa.int32()),
            ("sampling", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("diverged_at", pa.int32()),
            ("seconds", pa.float64()),
            ("worker", pa.string()),
            ("device", pa.string()),
            ("versions", pa.string()),
        ]
    ),
    "steps": pa.schema(
        [
            ("config", pa.string()),
            ("permutation", pa.int32()),
            ("step", pa.int32()),
            ("epoch", pa.int32()),
            ("batch", pa.int32()),
            ("loss", pa.float64()),
            ("accuracy", pa.float64()),
            ("grad_norm", pa.float64()),
            ("linf_first", pa.float64()),
            ("linf_second", pa.float64()),
        ]
    ),
    "corrections": pa.schema(
        [
            ("config", pa.string()),
            ("permutation", pa.int32()),
            ("probe", pa.string()),
            ("step", pa.int32()),
            ("norm", pa.float64()),
            ("linf", pa.float64()),
            ("full_batch_norm", pa.float64()),
            ("proj_full_batch", pa.float64()),
            ("cos_full_batch", pa.float64()),
            ("cos_noise", pa.float64()),
            ("vector", pa.list_(pa.float64())),
        ]
    ),
    "moments": pa.schema(
        [
            ("config", pa.string()),
            ("probe", pa.string()),
            ("step", pa.int32()),
            ("chunk", pa.int32()),
            ("count", pa.int64()),
            ("mean", pa.list_(pa.float64())),
            ("m2", pa.list_(pa.float64())),
        ]
    ),
    "predictions": pa.schema(
        [
            ("config", pa.string()),
            ("probe", pa.string()),
            ("step", pa.int32()),
            ("kind", pa.string()),
            ("norm", pa.float64()),
            ("coefficients", pa.string()),
            ("vector", pa.list_(pa.float64())),
        ]
    ),
}

#: the ``moments`` table of schema version 1 (converted to version 2 on reading)
MOMENTS_V1 = pa.schema(
    [
        ("config", pa.string()),
        ("probe", pa.string()),
        ("step", pa.int32()),
        ("chunk", pa.int32()),
        ("count", pa.int64()),
        ("sum", pa.list_(pa.float64())),
        ("sum_sq", pa.list_(pa.float64())),
    ]
)


def moments_from_v1(table: pa.Table) -> pa.Table:
    """A version-1 ``moments`` table (count, sum, sum_sq) as version 2 (count, mean, m2):
    ``mean = sum / count`` and ``m2 = max(sum_sq - sum**2 / count, 0)``; a count of 0 gives a
    NaN mean and a zero m2, a count of 1 a zero m2."""
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
    columns["mean"] = pa.array(means, pa.list_(pa.float64()))
    columns["m2"] = pa.array(m2s, pa.list_(pa.float64()))
    return pa.table(columns, schema=SCHEMAS["moments"])

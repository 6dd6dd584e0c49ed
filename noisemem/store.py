"""The study store: versioned Parquet tables in tidy long form, on any pyarrow filesystem.

Layout of a study directory (a local path or a URI such as ``s3://bucket/study``)::

    study.toml                       the resolved spec
    manifest.json                    schema version, study name, spec digest, data record,
                                     batch split, configs, chunk and permutation counts, and
                                     whether the study finished with no failed chunk
    runs/<config>/chunk-00003.parquet
    steps/<config>/chunk-00003.parquet
    corrections/<config>/chunk-00003.parquet
    moments/<config>/chunk-00003.parquet
    predictions/<config>/predictions.parquet

Every part is keyed by (config, chunk) and written atomically (a temporary file
``<part>.tmp-<hex>`` beside it, then a rename), so a retried chunk replaces its part and never
duplicates rows, and a write that fails midway leaves the previous part (or none) visible;
readers list only ``*.parquet`` names, so a temporary file a crashed process left behind is
never read. The ``runs`` part is written last: a chunk is complete exactly when its ``runs``
part exists, which is what a resumed study checks. Vectors (``mean``, ``m2``, ``vector``) are
``list<float64>`` in ``parameters_to_vector`` order. Tables and columns (schema version 2):

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
  (:func:`noisemem.stats.chan_merge`, :func:`merged_moments`), which stays accurate when the
  spread across permutations is tiny against the mean.
* ``predictions``: per (config, probe, step, kind): full-batch and exact-expectation vectors
  with their norms and coefficients.

Schema history: version 1 stored ``sum`` and ``sum_sq`` (sums of M and of M**2) in
``moments`` instead of ``mean`` and ``m2``; every other table is the same. Version-1 parts
still load: :meth:`Store.read` converts each such part on reading (``mean = sum / count``,
``m2 = sum_sq - sum**2 / count``, as exact as the stored sums allow), so a version-1 store,
or one a newer noisemem resumed (parts of both versions), reads as version 2.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

if TYPE_CHECKING:  # pandas is imported where frames are built: study actors never need it
    import pandas as pd

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
    import numpy as np

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


def _split(uri: str) -> tuple[pafs.FileSystem, str]:
    filesystem, path = pafs.FileSystem.from_uri(uri if "://" in uri else _absolute(uri))
    return filesystem, path.rstrip("/")


def _absolute(path: str) -> str:
    from pathlib import Path

    return str(Path(path).resolve())


@dataclass
class Store:
    """A study directory on a pyarrow filesystem."""

    uri: str

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri.strip():
            raise ValueError(
                f"output={self.uri!r} is not allowed; give a directory path or a URI "
                "(an empty path would silently mean the working directory)"
            )
        self.fs, self.root = _split(self.uri)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def _atomic_bytes(self, data: bytes, *parts: str) -> None:
        final = self.path(*parts)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"  # not *.parquet: readers never list it
        try:
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, final)  # a rename: readers see the old part or the new one
        except BaseException:
            try:  # best effort; a file left by a killed process is ignored by readers
                self.fs.delete_file(tmp)
            except (OSError, pa.ArrowException):
                pass
            raise

    def write_text(self, text: str, *parts: str) -> None:
        self._atomic_bytes(text.encode(), *parts)

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read().decode()

    def part_name(self, table: str, config: str, chunk: int | None) -> tuple[str, str, str]:
        name = "predictions.parquet" if chunk is None else f"chunk-{chunk:05d}.parquet"
        return (table, config, name)

    def write_part(
        self, table: str, config: str, chunk: int | None, rows: list[dict[str, Any]]
    ) -> None:
        """Write one (config, chunk) part of ``table`` atomically with the table's schema."""
        schema = SCHEMAS[table]
        arrow = pa.Table.from_pylist(rows, schema=schema)
        sink = pa.BufferOutputStream()
        pq.write_table(arrow, sink)
        self._atomic_bytes(sink.getvalue().to_pybytes(), *self.part_name(table, config, chunk))

    def chunk_done(self, config: str, chunk: int) -> bool:
        """True when the chunk's ``runs`` part (written last) exists and is not a record of
        a failed chunk; failed chunks run again when the study is resumed."""
        parts = self.part_name("runs", config, chunk)
        if not self.exists(*parts):
            return False
        try:
            status = pq.read_table(self.path(*parts), filesystem=self.fs, columns=["status"])
        except (OSError, pa.ArrowException):  # unreadable (e.g. a crash mid-write): redo it
            return False
        return "failed" not in set(status.column("status").to_pylist())

    def parts(self, table: str) -> list[str]:
        base = self.path(table)
        if self.fs.get_file_info(base).type == pafs.FileType.NotFound:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return sorted(
            i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
        )

    def read_part(self, table: str, path: str) -> pa.Table:
        """One part of ``table`` in the current schema (version-1 moments are converted)."""
        if table == "moments" and "sum_sq" in pq.read_schema(path, filesystem=self.fs).names:
            return moments_from_v1(pq.read_table(path, filesystem=self.fs, schema=MOMENTS_V1))
        return pq.read_table(path, filesystem=self.fs, schema=SCHEMAS[table])

    def read(self, table: str) -> pd.DataFrame:
        paths = self.parts(table)
        if not paths:
            return SCHEMAS[table].empty_table().to_pandas()
        return pa.concat_tables([self.read_part(table, p) for p in paths]).to_pandas()

    # -- manifest -----------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        if not self.exists("manifest.json"):
            return None
        return json.loads(self.read_text("manifest.json"))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.write_text(json.dumps(manifest, indent=2, sort_keys=True), "manifest.json")


@dataclass(frozen=True)
class StudyTables:
    """What :func:`load` returns: one pandas DataFrame per table, plus the manifest."""

    runs: pd.DataFrame
    steps: pd.DataFrame
    corrections: pd.DataFrame
    moments: pd.DataFrame
    predictions: pd.DataFrame
    manifest: dict[str, Any]

    def __getitem__(self, name: str) -> pd.DataFrame:
        return getattr(self, name)


def load(path: str) -> StudyTables:
    """Read a study store (local path or pyarrow URI) into pandas DataFrames."""
    store = Store(path)
    manifest = store.read_manifest()
    if manifest is None:
        raise ValueError(f"path={path!r} holds no noisemem study (no manifest.json)")
    if manifest.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(
            f"path={path!r}: schema version {manifest.get('schema_version')} is not one this "
            f"noisemem reads ({', '.join(map(str, READABLE_SCHEMA_VERSIONS))})"
        )
    frames = {t: store.read(t) for t in TABLES}
    return StudyTables(manifest=manifest, **complete_rows(frames))


def complete_rows(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Keep only rows of chunks whose ``runs`` part says they finished (status ok or
    diverged): parts an interrupted or failed chunk left behind are not results."""
    runs = frames["runs"]
    finished = runs[runs["status"] != "failed"]
    chunks = set(zip(finished["config"], finished["chunk"], strict=True))
    perms = set(zip(finished["config"], finished["permutation"], strict=True))
    out = dict(frames)
    for table in ("steps", "corrections"):
        df = frames[table]
        keep = [k in perms for k in zip(df["config"], df["permutation"], strict=True)]
        out[table] = df[keep].reset_index(drop=True) if len(df) else df
    df = frames["moments"]
    keep = [k in chunks for k in zip(df["config"], df["chunk"], strict=True)]
    out["moments"] = df[keep].reset_index(drop=True) if len(df) else df
    return out


def merged_moments(moments: pd.DataFrame) -> pd.DataFrame:
    """E[M] and its per-coordinate standard error per (config, probe, step), merged over
    chunks (in chunk order) from each part's count, mean and M2 with Chan et al.'s pairwise
    formula (:func:`noisemem.stats.chan_merge`): ``stderr = sqrt(M2 / (count - 1) / count)``,
    NaN when count < 2; ``mean`` is NaN when count is 0."""
    import numpy as np
    import pandas as pd

    from noisemem.stats import chan_merge

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

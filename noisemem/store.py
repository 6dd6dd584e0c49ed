"""The study store: versioned Parquet tables in tidy long form, on any pyarrow filesystem.

Layout of a study directory (a local path or a URI such as ``s3://bucket/study``)::

    study.toml                       the resolved spec
    manifest.json                    schema version, spec digest, data record, parts written
    runs/<config>/chunk-00003.parquet
    steps/<config>/chunk-00003.parquet
    corrections/<config>/chunk-00003.parquet
    moments/<config>/chunk-00003.parquet
    predictions/<config>/predictions.parquet

Every part is keyed by (config, chunk) and written atomically (a temporary file, then a
rename), so a retried chunk replaces its part and never duplicates rows. The ``runs`` part is
written last: a chunk is complete exactly when its ``runs`` part exists, which is what a
resumed study checks. Vectors (``sum``, ``sum_sq``, ``vector``) are ``list<float64>`` in
``parameters_to_vector`` order. Tables and columns (schema version 1):

* ``runs``: one row per (config, permutation): seeds, optimizer and hyperparameters (JSON),
  status (ok / diverged / failed) with the error, the step it diverged at, timings, versions.
* ``steps``: per (config, permutation, step): batch loss and accuracy, gradient norm, and the
  l_inf distances to the first/second-order memoryless runs when recorded.
* ``corrections``: per (config, permutation, probe, step): |M|, l_inf, and projections and
  cosines against the full-batch prediction and the noise direction at the same parameters.
* ``moments``: per (config, probe, step, chunk): count, sum and sum of squares of M (float64).
* ``predictions``: per (config, probe, step, kind): full-batch and exact-expectation vectors
  with their norms and coefficients.
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

SCHEMA_VERSION = 1
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
            ("sum", pa.list_(pa.float64())),
            ("sum_sq", pa.list_(pa.float64())),
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
        self.fs, self.root = _split(self.uri)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def _atomic_bytes(self, data: bytes, *parts: str) -> None:
        final = self.path(*parts)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, final)

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

    def read(self, table: str) -> pd.DataFrame:
        paths = self.parts(table)
        if not paths:
            return SCHEMAS[table].empty_table().to_pandas()
        tables = [pq.read_table(p, filesystem=self.fs, schema=SCHEMAS[table]) for p in paths]
        return pa.concat_tables(tables).to_pandas()

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
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"path={path!r}: schema version {manifest.get('schema_version')} is not "
            f"{SCHEMA_VERSION}, the one this noisemem reads"
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
    chunks from the sufficient statistics (count, sum, sum of squares)."""
    import numpy as np
    import pandas as pd

    rows = []
    for (config, probe, step), group in moments.groupby(["config", "probe", "step"], sort=True):
        count = int(group["count"].sum())
        total = np.sum(np.stack(group["sum"].to_numpy()), axis=0)
        squares = np.sum(np.stack(group["sum_sq"].to_numpy()), axis=0)
        mean = total / count
        var = np.clip((squares - total * total / count) / max(count - 1, 1), 0.0, None)
        rows.append(
            {
                "config": config,
                "probe": probe,
                "step": int(step),
                "count": count,
                "mean": mean,
                "stderr": np.sqrt(var / count),
            }
        )
    return pd.DataFrame(rows, columns=["config", "probe", "step", "count", "mean", "stderr"])

"""Reading a study store back: every chunk checked against its record, into pandas.

:func:`inspect` says, for every chunk and config the manifest expects, whether it is done,
missing, failed or damaged (and why); :func:`load` returns the tables of the chunks that
are done, the recorded failures, and the list of what it left out, so that nothing missing
or damaged is read or dropped without a word. Stores of schema versions 1 and 2 (no
records) are read by their older rule (:mod:`noisemem.studies.store`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pyarrow import fs as pafs

from noisemem.studies.schema import (
    CHUNK_TABLES,
    READABLE_SCHEMA_VERSIONS,
    SCHEMAS,
    moments_from_v1,
    upgrade,
)
from noisemem.studies.store import RECORDS, Store, StoreError

if TYPE_CHECKING:  # pandas is imported where frames are built: study actors never need it
    import pandas as pd


@dataclass(frozen=True)
class Inspection:
    """What a store holds against what its manifest expects."""

    uri: str
    manifest: dict[str, Any]
    #: (config, chunk) -> "done" | "missing" | "failed" | "damaged"; chunk None: predictions
    status: dict[tuple[str, int | None], str]
    #: one line per missing, failed or damaged item, naming it and what is wrong
    problems: list[str]
    #: the tables of the done items, by table
    parts: dict[str, list[pa.Table]] = field(default_factory=dict)

    def count(self, state: str, predictions: bool = False) -> int:
        return sum(
            1 for (_, k), s in self.status.items() if s == state and (k is None) == predictions
        )

    @property
    def complete(self) -> bool:
        return all(s == "done" for s in self.status.values())

    def summary(self) -> str:
        chunks = sum(1 for _, k in self.status if k is not None)
        configs = sum(1 for _, k in self.status if k is None)
        return (
            f"chunks: {self.count('done')} of {chunks} done, {self.count('missing')} missing, "
            f"{self.count('failed')} failed, {self.count('damaged')} damaged; predictions: "
            f"{self.count('done', True)} of {configs} configs"
        )


def open_manifest(path: str) -> tuple[Store, dict[str, Any]]:
    """The store at ``path`` and its manifest; a StoreError naming the path otherwise."""
    store = Store(path)
    info = store.fs.get_file_info(store.root)
    if info.type == pafs.FileType.NotFound:
        raise StoreError(f"path={path!r} does not exist")
    if info.type == pafs.FileType.File:
        raise StoreError(f"path={path!r} is a file, not a study store (a directory)")
    manifest = store.read_manifest()
    if manifest is None:
        raise StoreError(f"path={path!r} holds no noisemem study (no manifest.json)")
    version = manifest.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise StoreError(
            f"path={path!r}: schema version {version} is not one this noisemem reads "
            f"({', '.join(map(str, READABLE_SCHEMA_VERSIONS))})"
        )
    for key in ("study", "configs", "permutations"):
        if key not in manifest:
            raise StoreError(f"path={path!r}: its manifest.json has no {key!r}; it is damaged")
    return store, manifest


def _expected(manifest: Mapping[str, Any]) -> tuple[list[str], int]:
    configs = [c["id"] for c in manifest["configs"]]
    return configs, int(manifest.get("chunks", 0))


def inspect(path: str, *, read: bool = False) -> Inspection:
    """Check every chunk and config's predictions of the store at ``path`` against its
    record (schema 3) or the older rule; with ``read``, keep the done items' tables."""
    store, manifest = open_manifest(path)
    configs, count = _expected(manifest)
    items: list[tuple[str, int | None]] = [(c, k) for c in configs for k in range(count)]
    items += [(c, None) for c in configs]
    status: dict[tuple[str, int | None], str] = {}
    problems: list[str] = []
    parts: dict[str, list[pa.Table]] = {t: [] for t in (*CHUNK_TABLES, "predictions")}
    version = manifest["schema_version"]
    for config, chunk in items:
        what = f"predictions of {config}" if chunk is None else f"chunk {chunk} of {config}"
        if version < 3:
            state, why, tables = _old_item(store, config, chunk)
        else:
            state, why, tables = _item(store, store.record(config, chunk))
        status[(config, chunk)] = state
        if why:
            problems.append(f"{what}: {why}")
        if read:
            for table, arrow in tables.items():
                parts[table].append(arrow)
    return Inspection(store.uri, manifest, status, problems, parts if read else {})


def _item(store: Store, record: Mapping[str, Any] | None) -> tuple[str, str, dict[str, pa.Table]]:
    """(state, what is wrong, tables) of one item of a schema-3 store. A failed chunk's
    ``runs`` rows (the failure and its error) are kept as they are: they are results."""
    if record is None:
        return "missing", "missing (no record)", {}
    tables, wrong = {}, []
    for table, entry in dict(record.get("tables", {})).items():
        got = store.read_entry(entry)
        if isinstance(got, str):
            wrong.append(got)
        else:
            tables[table] = got
    if wrong:
        return "damaged", "; ".join(wrong), {}
    if record.get("status") != "ok":
        failed = {t: a for t, a in tables.items() if t == "runs"}
        return "failed", f"failed ({_first_error(failed.get('runs'))})", failed
    return "done", "", tables


def _first_error(runs: pa.Table | None) -> str:
    if runs is None or "error" not in runs.column_names or runs.num_rows == 0:
        return "no error recorded"
    error = runs.column("error")[0].as_py() or ""
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error recorded"


def _old_item(store: Store, config: str, chunk: int | None) -> tuple[str, str, dict[str, pa.Table]]:
    """(state, what is wrong, tables) by the rule of stores before schema 3."""
    if chunk is None:
        parts = store.part_name("predictions", config, None)
        if not store.exists(*parts):
            return "missing", "missing", {}
        return "done", "", {"predictions": store.read_part("predictions", store.path(*parts))}
    if not store.chunk_done(config, chunk, version=2):
        runs = store.part_name("runs", config, chunk)
        return ("failed" if store.exists(*runs) else "missing"), "not finished", {}
    tables = {}
    for table in CHUNK_TABLES:
        parts = store.part_name(table, config, chunk)
        if store.exists(*parts):
            tables[table] = store.read_part(table, store.path(*parts))
    return "done", "", tables


@dataclass(frozen=True)
class StudyTables:
    """What :func:`load` returns: one pandas DataFrame per table, the manifest, and what was
    left out (missing, failed or damaged items, one line each)."""

    configs: pd.DataFrame
    runs: pd.DataFrame
    steps: pd.DataFrame
    corrections: pd.DataFrame
    moments: pd.DataFrame
    predictions: pd.DataFrame
    manifest: dict[str, Any]
    problems: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> pd.DataFrame:
        return getattr(self, name)


def load(path: str) -> StudyTables:
    """Read a study store (local path or pyarrow URI) into pandas DataFrames: the rows of
    every done chunk (checked against its record), the ``runs`` rows of failed chunks, and
    in ``problems`` every chunk or prediction that is missing, failed or damaged."""
    found = inspect(path, read=True)
    frames = {}
    for table, arrows in found.parts.items():
        arrows = [_current(table, a) for a in arrows]
        frames[table] = (
            pa.concat_tables(arrows) if arrows else SCHEMAS[table].empty_table()
        ).to_pandas()
    store = Store(path)
    return StudyTables(
        configs=_configs(store, found.manifest, frames["runs"]),
        manifest=found.manifest,
        problems=tuple(found.problems),
        **frames,
    )


def _current(table: str, arrow: pa.Table) -> pa.Table:
    if table == "moments" and "sum_sq" in arrow.column_names:
        return moments_from_v1(arrow)
    return upgrade(table, arrow)


def _configs(store: Store, manifest: Mapping[str, Any], runs: pd.DataFrame) -> pd.DataFrame:
    """The ``configs`` table; for stores before schema 3, made from the manifest's configs
    and each config's runs rows (its training setting)."""
    import pandas as pd

    if store.exists("configs", "configs.parquet"):
        try:
            entry = json.loads(store.read_text(RECORDS, "configs.json"))["tables"]["configs"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StoreError(
                f"{store.uri}: the configs table has no readable record ({err})"
            ) from err
        got = store.read_entry(entry)
        if isinstance(got, str):
            raise StoreError(f"{store.uri}: configs table {got}")
        return got.to_pandas()
    rows = []
    for index, c in enumerate(manifest["configs"]):
        hyper = {k: v for k, v in c.items() if k not in ("id", "kind")}
        row = {"config": c["id"], "index": index, "optimizer": c.get("kind"), **hyper}
        row["hyperparameters"] = json.dumps({k: v for k, v in c.items() if k != "id"})
        mine = runs[runs["config"] == c["id"]]
        for key in ("batch_size", "epochs", "sampling", "seed"):
            row[key] = mine[key].iloc[0] if len(mine) else None
        rows.append(row)
    return pd.DataFrame(rows)

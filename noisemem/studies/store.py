"""The study store: versioned Parquet tables in tidy long form, on any pyarrow filesystem.

The store owns everything about the store: where it lives (:func:`location`, the one rule),
its layout and schema (:mod:`noisemem.studies.schema`), its atomic writes, its manifest and
header, which study it holds (:meth:`Store.check_resumable`: digests, the older scheme of
schema-1 stores), whether it is complete (:meth:`Store.check_complete`) and how it is read
back (:func:`load`).

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
part exists, which is what a resumed study checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import tomli_w
from pyarrow import fs as pafs

from noisemem.studies.schema import (
    MOMENTS_V1,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    SCHEMAS,
    TABLES,
    moments_from_v1,
)

if TYPE_CHECKING:  # pandas is imported where frames are built: study actors never need it
    import pandas as pd


class StudySpec(Protocol):
    """What the store reads of a study spec (:class:`noisemem.studies.spec.StudySpec`, which
    itself takes :func:`location` and :func:`fingerprint` from here)."""

    name: str
    output: str
    raw: Mapping[str, Any]
    configs: tuple[Any, ...]
    training: Any
    runtime: Any

    @property
    def digest(self) -> str: ...

    def as_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StudySpec: ...


def location(output: Any, *, error: type[ValueError] = ValueError) -> str:
    """Where a store lives, the one rule every process applies alike: a URI untouched, a
    relative path made absolute against this process's working directory (actors run in
    their own, where a relative path would name another place)."""
    if not isinstance(output, str) or not output.strip():
        raise error(
            f"output={output!r} is not allowed; give a directory path or a pyarrow filesystem "
            "URI such as s3://bucket/study (an empty path would silently mean the working "
            "directory)"
        )
    if "://" in output:
        return output
    return os.path.abspath(output)


def fingerprint(data: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``data`` as canonical JSON: a spec's digest."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class IncompleteStoreError(RuntimeError):
    """Every work item reported success, but the store the driver reads lacks rows."""


@dataclass
class Store:
    """A study directory on a pyarrow filesystem."""

    uri: str

    def __post_init__(self) -> None:
        self.uri = location(self.uri)
        self.fs, path = pafs.FileSystem.from_uri(self.uri)  # a URI or an absolute path
        self.root = path.rstrip("/")

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

    # -- which study the store holds, its header and its completeness ----------------------
    def check_resumable(self, spec: StudySpec) -> None:
        """Refuse to resume into a store this noisemem cannot read, or of another study.

        A store of an older schema version it reads is resumed: its parts are converted
        one by one when read (:func:`load`) and the manifest is rewritten at the current
        version, so nothing computed before is lost or computed again. Its digest may be
        of the older scheme; the stored ``study.toml`` then decides (:func:`same_study`)."""
        manifest = self.read_manifest()
        if manifest is None:
            return
        version = manifest.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(
                f"output={spec.output!r} holds a store of schema version {version!r}, "
                f"but this noisemem reads schema versions {READABLE_SCHEMA_VERSIONS} and writes "
                f"{SCHEMA_VERSION}: choose another output directory (or finish "
                "that study with the noisemem that started it)"
            )
        stored_toml = self.read_text("study.toml") if self.exists("study.toml") else None
        if not same_study(spec, manifest.get("spec_digest"), stored_toml):
            raise ValueError(
                f"output={spec.output!r} holds a different study "
                f"(digest {manifest.get('spec_digest')} != {spec.digest}); "
                "choose another output directory"
            )

    def write_header(self, spec: StudySpec, data: Mapping[str, Any], chunks: int) -> None:
        """``study.toml`` and a manifest that says the study is not complete yet."""
        self.write_text(study_toml(spec), "study.toml")
        self.write_manifest(
            {
                "schema_version": SCHEMA_VERSION,
                "study": spec.name,
                "spec_digest": spec.digest,
                "data": dict(data),
                "batch_split": "consecutive: batch i = samples [i b, (i+1) b), last partial "
                "batch dropped",
                "configs": [{"id": c.id, **c.hyperparameters} for c in spec.configs],
                "chunks": chunks,
                "permutations": spec.training.permutations,
                "complete": False,
            }
        )

    def check_complete(self, spec: StudySpec) -> None:
        """Every (config, permutation) has its ``runs`` row and every config its predictions,
        as this process reads the store; else the actors wrote where it cannot see."""
        expected = {(c.id, p) for c in spec.configs for p in range(spec.training.permutations)}
        runs = self.read("runs")
        found = expected & set(zip(runs["config"], runs["permutation"], strict=True))
        predicted = [
            c.id for c in spec.configs if self.exists(*self.part_name("predictions", c.id, None))
        ]
        if len(found) == len(expected) and len(predicted) == len(spec.configs):
            return
        raise IncompleteStoreError(
            f"the store at {self.uri!r} holds {len(found)} of the {len(expected)} expected "
            f"runs rows ({len(spec.configs)} configs x {spec.training.permutations} "
            f"permutations) and the predictions of {len(predicted)} of {len(spec.configs)} "
            "configs, although every actor reported its work written: the actors wrote "
            "somewhere this driver cannot read. On a multi-node cluster, output must be "
            "storage every node shares: a shared filesystem path mounted at the same place "
            "on every node, or a URI such as s3://bucket/study (set output in the spec, or "
            "--output)"
        )

    def mark_complete(self, complete: bool) -> None:
        manifest = self.read_manifest() or {}
        manifest["complete"] = complete
        self.write_manifest(manifest)


def study_toml(spec: StudySpec) -> str:
    """The resolved spec as the store's ``study.toml`` (TOML has no null: None is left out)."""
    return tomli_w.dumps(_toml_safe(spec.as_dict()))


def _toml_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_toml_safe(v) for v in value]
    return value


def legacy_digest(spec: StudySpec) -> str:
    """The digest noisemem wrote before the resolved one (schema version 1 stores): a hash
    of the ``model`` and ``optimizers`` sections as written, with the rest resolved. Only
    :func:`same_study` uses it, to recognise such stores."""
    d = spec.as_dict()
    d.pop("output", None)
    if "model" in spec.raw:
        d["model"] = spec.raw["model"]
    else:
        d.pop("model")
    d["runtime"] = {"dtype": spec.runtime.dtype}
    return fingerprint(d)


def same_study(spec: StudySpec, stored_digest: str | None, stored_toml: str | None = None) -> bool:
    """Whether a store whose manifest holds ``stored_digest`` (and whose ``study.toml``
    holds ``stored_toml``) holds the study ``spec``, so that it may be resumed.

    True when the digests are equal. A store written before digests were resolved holds a
    :func:`legacy_digest`, which equivalent specs may not share; then its ``study.toml``
    decides: when that file is the spec the stored digest was made of (its own digest,
    either scheme, equals ``stored_digest``) and it resolves to ``spec``'s digest, the study
    is the same. Anything unreadable counts as different (the caller refuses to resume
    rather than mixing two studies' rows)."""
    if stored_digest == spec.digest:
        return True
    if stored_digest is None or stored_toml is None:
        return False
    try:
        stored = type(spec).from_dict(tomllib.loads(stored_toml))
    except (ValueError, tomllib.TOMLDecodeError):  # a SpecError is a ValueError
        return False
    if stored_digest not in (stored.digest, legacy_digest(stored)):
        return False
    return stored.digest == spec.digest


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

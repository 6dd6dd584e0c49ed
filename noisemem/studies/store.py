"""The study store: versioned Parquet tables in tidy long form, on any pyarrow filesystem.

The store owns everything about the store: where it lives (:func:`location`, the one rule),
its layout and schema (:mod:`noisemem.studies.schema`), its atomic writes, the record that
makes a chunk count as done, its manifest, which study it holds (:func:`check_resumable`:
digests, and the older scheme of schema-1 stores), and whether it is complete
(:func:`check_complete`). Reading it back, verified part by part, is
:mod:`noisemem.studies.tables`.

Layout of a study directory (a local path or a URI such as ``s3://bucket/study``)::

    manifest.json                    schema version, study name, spec digest, data record,
                                     batch split, configs, chunk and permutation counts
    study.toml                       the resolved spec
    configs/configs.parquet          one row per config (typed hyperparameter columns)
    runs/<config>/chunk-00003.parquet
    steps/<config>/chunk-00003.parquet
    corrections/<config>/chunk-00003.parquet
    moments/<config>/chunk-00003.parquet
    predictions/<config>/predictions.parquet
    _chunks/<config>/chunk-00003.json   the chunk's record: each part with its row count,
    _chunks/<config>/predictions.json   size and SHA-256, written after its parts
    _chunks/configs.json
    _lock                            the driver holding the study (local filesystems)

Every part is keyed by (config, chunk) and written atomically (a temporary file
``.<part>.tmp-<hex>`` beside it, then a rename), so a retried chunk replaces its part and
never duplicates rows, and a write that fails midway leaves the previous part (or none)
visible. A chunk is done only when its record exists, says ``ok`` and every part it lists is
present with that size and checksum: a deleted, truncated or rewritten part makes the chunk
not done, and a resumed study computes it again. Names that begin with ``.`` or ``_`` are
skipped by pyarrow datasets, DuckDB and Polars, so temporary files and records never look
like data. Stores of schema versions 1 and 2 had no records: there a chunk is done when its
``runs`` part (written last) is readable and not a record of a failure.

The manifest is created with an exclusive create where the filesystem has one (local
disks: a hard link that fails if the file exists), before anything else is written, so two
drivers cannot fill one new store with two studies; on object stores (S3, GCS) pyarrow has
no exclusive create, so run one driver per store there.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import tomli_w
from pyarrow import fs as pafs

from noisemem.studies.plan import Chunks
from noisemem.studies.schema import (
    CHUNK_TABLES,
    MOMENTS_V1,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    SCHEMAS,
    hyperparameter_type,
    moments_from_v1,
    upgrade,
)

if TYPE_CHECKING:  # pandas is imported where frames are built: study actors never need it
    import pandas as pd

RECORDS = "_chunks"
LOCK = "_lock"


def driver_identity() -> dict[str, Any]:
    """Who a driver is, for the study's lock: host, process and a unique id."""
    host, pid = socket.gethostname(), os.getpid()
    return {"driver": f"{host}:{pid}:{uuid.uuid4().hex[:8]}", "host": host, "pid": pid}


def _alive(holder: Mapping[str, Any], stale_after: float) -> bool:
    """Whether the driver ``holder`` still holds its lock: it refreshed it within
    ``stale_after`` seconds and, on this host, its process still exists."""
    if time.time() - float(holder.get("heartbeat", 0.0)) > stale_after:
        return False
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OSError):
            return True
    return True


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

    @property
    def swept(self) -> tuple[str, ...]: ...

    def as_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StudySpec: ...


def location(output: Any, *, error: type[ValueError] = ValueError) -> str:
    """Where a store lives, the one rule every process applies alike: a URI untouched, a
    path with ``~`` expanded and made absolute against this process's working directory
    (actors run in their own, where a relative path would name another place)."""
    if not isinstance(output, str) or not output.strip():
        raise error(
            f"output={output!r} is not allowed; give a directory path or a pyarrow filesystem "
            "URI such as s3://bucket/study (an empty path would silently mean the working "
            "directory)"
        )
    if "://" in output:
        return output
    return os.path.abspath(os.path.expanduser(output))


def fingerprint(data: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``data`` as canonical JSON: a spec's digest."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class IncompleteStoreError(RuntimeError):
    """Every work item reported success, but the store the driver reads lacks rows."""


class StoreError(ValueError):
    """A path holds no readable study store, or a damaged one."""


@dataclass
class Store:
    """A study directory on a pyarrow filesystem."""

    uri: str

    def __post_init__(self) -> None:
        self.uri = location(self.uri)
        self.fs, path = pafs.FileSystem.from_uri(self.uri)  # a URI or an absolute path
        self.root = path.rstrip("/")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def _atomic_bytes(self, data: bytes, *parts: str) -> None:
        final = self.path(*parts)
        folder, name = final.rsplit("/", 1)
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex}"  # a hidden name: no reader lists it
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

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write ``data`` at ``parts`` atomically (a report, a figure)."""
        self._atomic_bytes(data, *parts)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def create_exclusive(self, text: str, *parts: str) -> bool:
        """Write ``text`` at ``parts`` only if nothing is there: True if this call created
        it. Exclusive on local filesystems (a hard link, which fails if the name exists);
        elsewhere a check then a write (see the module notes on object stores)."""
        if not self.local:
            if self.exists(*parts):
                return False
            self.write_text(text, *parts)
            return True
        final = self.path(*parts)
        folder, name = final.rsplit("/", 1)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            os.link(tmp, final)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    # -- the driver's lock ------------------------------------------------------------------
    def lock(self, owner: Mapping[str, Any], stale_after: float) -> dict[str, Any] | None:
        """Take the study's lock for ``owner`` (a driver); None when taken, else the record
        of the driver that holds it. A lock whose holder stopped refreshing it for
        ``stale_after`` seconds, or whose process on this host is gone, is taken over."""
        for _ in range(3):
            if self.create_exclusive(json.dumps({**owner, "heartbeat": time.time()}), LOCK):
                return None
            holder = self.lock_holder()
            if holder is None:  # released meanwhile
                continue
            if not _alive(holder, stale_after):
                try:
                    self.fs.delete_file(self.path(LOCK))
                except (OSError, pa.ArrowException):
                    pass
                continue
            return holder
        return self.lock_holder() or {"driver": "unknown"}

    def lock_holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.read_text(LOCK))
        except (OSError, pa.ArrowException, ValueError):
            return None

    def refresh_lock(self, owner: Mapping[str, Any]) -> None:
        holder = self.lock_holder()
        if holder is not None and holder.get("driver") == owner.get("driver"):
            self.write_text(json.dumps({**owner, "heartbeat": time.time()}), LOCK)

    def unlock(self, owner: Mapping[str, Any]) -> None:
        holder = self.lock_holder()
        if holder is not None and holder.get("driver") == owner.get("driver"):
            try:
                self.fs.delete_file(self.path(LOCK))
            except (OSError, pa.ArrowException):
                pass

    # -- parts and records -------------------------------------------------------------------
    def part_name(self, table: str, config: str, chunk: int | None) -> tuple[str, str, str]:
        name = "predictions.parquet" if chunk is None else f"chunk-{chunk:05d}.parquet"
        return (table, config, name)

    def record_name(self, config: str, chunk: int | None) -> tuple[str, str, str]:
        name = "predictions.json" if chunk is None else f"chunk-{chunk:05d}.json"
        return (RECORDS, config, name)

    def _write_table(self, arrow: pa.Table, *parts: str) -> dict[str, Any]:
        """Write ``arrow`` as Parquet at ``parts``; its entry in a record."""
        sink = pa.BufferOutputStream()
        pq.write_table(arrow, sink)
        data = sink.getvalue().to_pybytes()
        self._atomic_bytes(data, *parts)
        return {
            "path": "/".join(parts),
            "rows": arrow.num_rows,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    def write_part(
        self, table: str, config: str, chunk: int | None, rows: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Write one (config, chunk) part of ``table`` atomically with the table's schema;
        returns its entry for the chunk's record."""
        arrow = pa.Table.from_pylist(rows, schema=SCHEMAS[table])
        return self._write_table(arrow, *self.part_name(table, config, chunk))

    def write_record(self, config: str, chunk: int | None, record: dict[str, Any]) -> None:
        self.write_text(
            json.dumps(record, indent=1, sort_keys=True), *self.record_name(config, chunk)
        )

    def write_chunk(
        self,
        config: str,
        chunk: int,
        tables: Mapping[str, list[dict[str, Any]]],
        *,
        status: str = "ok",
        worker: str = "",
    ) -> None:
        """Every part of a chunk (the tables given, in the order of ``CHUNK_TABLES``), then
        its record: the chunk is done from that moment, and not before."""
        entries = {
            t: self.write_part(t, config, chunk, tables[t]) for t in CHUNK_TABLES if t in tables
        }
        record = {"config": config, "chunk": chunk, "status": status, "worker": worker}
        self.write_record(config, chunk, {**record, "tables": entries})

    def write_predictions(self, config: str, rows: list[dict[str, Any]]) -> None:
        entry = self.write_part("predictions", config, None, rows)
        self.write_record(
            config, None, {"config": config, "status": "ok", "tables": {"predictions": entry}}
        )

    def write_configs(self, spec: StudySpec, num_samples: int) -> None:
        """The ``configs`` table: one row per config, one typed column per hyperparameter."""
        rows, extra = [], {}
        for c in spec.configs:
            m = num_samples // c.batch_size
            row = {
                "config": c.id,
                "index": c.index,
                "optimizer": c.optimizer.name,
                "hyperparameters": json.dumps(c.hyperparameters, sort_keys=True),
                "batch_size": c.batch_size,
                "epochs": c.epochs,
                "sampling": c.sampling,
                "seed": c.seed,
                "num_batches": m,
                "num_samples": m * c.batch_size,
                "steps": c.epochs * m,
                "swept": ",".join(spec.swept),
            }
            for key, value in c.hyperparameters.items():
                if key == "kind":
                    continue
                column = key if key not in SCHEMAS["configs"].names else f"hp_{key}"
                extra.setdefault(column, hyperparameter_type(value))
                row[column] = value
            rows.append(row)
        schema = SCHEMAS["configs"]
        for column, kind in extra.items():
            schema = schema.append(pa.field(column, kind))
        for row in rows:
            for column, kind in extra.items():
                value = row.get(column)
                if value is not None and kind == pa.string():
                    row[column] = str(value)
        entry = self._write_table(
            pa.Table.from_pylist(rows, schema=schema), "configs", "configs.parquet"
        )
        self.write_text(
            json.dumps({"status": "ok", "tables": {"configs": entry}}, indent=1),
            RECORDS,
            "configs.json",
        )

    def record(self, config: str, chunk: int | None) -> dict[str, Any] | None:
        """The chunk's record, or None when there is none or it cannot be read."""
        parts = self.record_name(config, chunk)
        try:
            return json.loads(self.read_text(*parts))
        except (OSError, pa.ArrowException, ValueError):
            return None

    def read_entry(self, entry: Mapping[str, Any]) -> pa.Table | str:
        """The part a record entry lists, checked against its size, checksum and row count;
        a one-line description of what is wrong otherwise."""
        path = str(entry.get("path", ""))
        try:
            data = self.read_bytes(*path.split("/"))
        except (OSError, pa.ArrowException):
            return f"{path}: missing"
        if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get(
            "sha256"
        ):
            return f"{path}: damaged ({len(data)} bytes, checksum differs from its record)"
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (OSError, pa.ArrowException) as err:
            return f"{path}: unreadable ({err})"
        if table.num_rows != entry.get("rows"):
            return f"{path}: {table.num_rows} rows, its record says {entry.get('rows')}"
        return table

    def check_record(self, record: Mapping[str, Any] | None) -> list[str]:
        """What is wrong with a chunk by its record (nothing: the chunk is done)."""
        if record is None:
            return ["no record"]
        if record.get("status") != "ok":
            return [f"recorded as {record.get('status')}"]
        problems = []
        for entry in dict(record.get("tables", {})).values():
            got = self.read_entry(entry)
            if isinstance(got, str):
                problems.append(got)
        return problems

    @property
    def version(self) -> int | None:
        manifest = self.read_manifest()
        return None if manifest is None else manifest.get("schema_version")

    def chunk_done(self, config: str, chunk: int, version: int | None = None) -> bool:
        """Whether the chunk is done (module notes: its record verifies; in stores before
        version 3, its ``runs`` part is readable and records no failure). Failed, missing
        and damaged chunks run again when the study is resumed. ``version``: the store's
        schema version, if the caller has read it."""
        version = self.version if version is None else version
        if version is not None and version >= 3:
            return not self.check_record(self.record(config, chunk))
        parts = self.part_name("runs", config, chunk)
        if not self.exists(*parts):
            return False
        try:
            status = pq.read_table(self.path(*parts), filesystem=self.fs, columns=["status"])
        except (OSError, pa.ArrowException):  # unreadable (e.g. a crash mid-write): redo it
            return False
        return "failed" not in set(status.column("status").to_pylist())

    def done_chunks(self, configs: list[str], count: int) -> set[tuple[str, int]]:
        """The (config, chunk) pairs among ``configs`` x ``range(count)`` that are done."""
        version = self.version
        return {(c, k) for c in configs for k in range(count) if self.chunk_done(c, k, version)}

    def adopt(self, configs: list[str], count: int) -> int:
        """Give the done chunks of a store written before records (schema 1 or 2) a record
        of the parts they have, as they are, so that a store resumed by this noisemem loses
        and recomputes nothing; returns how many chunks were adopted."""
        done = self.done_chunks(configs, count)
        for config, chunk in sorted(done):
            entries = {}
            for table in CHUNK_TABLES:
                parts = self.part_name(table, config, chunk)
                if self.exists(*parts):
                    data = self.read_bytes(*parts)
                    rows = pq.read_metadata(pa.BufferReader(data)).num_rows
                    entries[table] = {
                        "path": "/".join(parts),
                        "rows": rows,
                        "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
            self.write_record(
                config,
                chunk,
                {
                    "config": config,
                    "chunk": chunk,
                    "status": "ok",
                    "worker": "adopted",
                    "tables": entries,
                },
            )
        return len(done)

    def parts(self, table: str) -> list[str]:
        """Every ``*.parquet`` part of ``table`` (hidden names skipped)."""
        base = self.path(table)
        if self.fs.get_file_info(base).type == pafs.FileType.NotFound:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and i.path.endswith(".parquet")
            and not i.base_name.startswith((".", "_"))
        )

    def read_part(self, table: str, path: str) -> pa.Table:
        """One part of ``table`` in the current schema (older versions converted)."""
        if table == "moments" and "sum_sq" in pq.read_schema(path, filesystem=self.fs).names:
            return moments_from_v1(pq.read_table(path, filesystem=self.fs, schema=MOMENTS_V1))
        return upgrade(table, pq.read_table(path, filesystem=self.fs))

    def read(self, table: str) -> pd.DataFrame:
        """Every part of ``table`` as it is on disk, records not checked (what a reader that
        lists files sees; :func:`noisemem.studies.tables.load` reads only done chunks)."""
        paths = self.parts(table)
        arrows = [self.read_part(table, p) for p in paths]
        return (pa.concat_tables(arrows) if arrows else SCHEMAS[table].empty_table()).to_pandas()

    # -- manifest ---------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest; None when there is none; a StoreError when it is not readable."""
        if not self.exists("manifest.json"):
            return None
        try:
            manifest = json.loads(self.read_text("manifest.json"))
        except (ValueError, UnicodeDecodeError) as err:
            raise StoreError(
                f"{self.path('manifest.json')} is not a readable manifest ({err}); restore it "
                "or choose another output directory"
            ) from err
        if not isinstance(manifest, dict):
            raise StoreError(f"{self.path('manifest.json')} is not a manifest (not a JSON object)")
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.write_text(json.dumps(manifest, indent=2, sort_keys=True), "manifest.json")


# -- which study a store holds ---------------------------------------------------------------
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


def check_resumable(store: Store, spec: StudySpec, manifest: Mapping[str, Any] | None) -> None:
    """Refuse to resume into a store this noisemem cannot read, or of another study.

    A store of an older schema version it reads is resumed: its parts are converted one by
    one when read and the manifest is rewritten at the current version, so nothing computed
    before is lost or computed again. Its digest may be of the older scheme; the stored
    ``study.toml`` then decides (:func:`same_study`)."""
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
    stored_toml = store.read_text("study.toml") if store.exists("study.toml") else None
    if not same_study(spec, manifest.get("spec_digest"), stored_toml):
        raise ValueError(
            f"output={spec.output!r} holds a different study "
            f"(digest {manifest.get('spec_digest')} != {spec.digest}); "
            "choose another output directory"
        )


def manifest_of(spec: StudySpec, data: Mapping[str, Any], chunks: int) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "study": spec.name,
        "spec_digest": spec.digest,
        "data": dict(data),
        "batch_split": "consecutive: batch i = samples [i b, (i+1) b), last partial batch dropped",
        "configs": [{"id": c.id, **c.hyperparameters} for c in spec.configs],
        "chunks": chunks,
        "permutations": spec.training.permutations,
        "complete": False,
    }


def open_for(store: Store, spec: StudySpec, data: Mapping[str, Any], chunks: int) -> None:
    """Claim the store for ``spec``, before anything else is written: create its manifest
    exclusively when the store is new, else check that it holds the same study (and bring
    an older store's manifest to the current version). Then ``study.toml`` and the
    ``configs`` table. Refuses an existing directory that holds files but no study."""
    manifest = manifest_of(spec, data, chunks)
    text = json.dumps(manifest, indent=2, sort_keys=True)
    if not store.exists("manifest.json"):
        refuse_foreign_files(store, spec)
        if store.create_exclusive(text, "manifest.json"):
            _write_header(store, spec, data)
            return
    stored = store.read_manifest()
    check_resumable(store, spec, stored)
    assert stored is not None
    if stored.get("schema_version", SCHEMA_VERSION) < 3:  # records came with version 3
        store.adopt([c.id for c in spec.configs], chunks)
    if stored != manifest:  # a resumed older store, or a study not marked complete again
        store.write_manifest(manifest)
    _write_header(store, spec, data)


def _write_header(store: Store, spec: StudySpec, data: Mapping[str, Any]) -> None:
    store.write_text(study_toml(spec), "study.toml")
    store.write_configs(spec, int(data["num_samples"]))


def refuse_foreign_files(store: Store, spec: StudySpec) -> None:
    """A new store goes into a new or empty directory, never among a user's files. A
    manifest that appears while the directory is read is another driver's new study, not
    a user's file: its identity is checked next (:func:`check_resumable`)."""
    info = store.fs.get_file_info(store.root)
    if info.type == pafs.FileType.File:
        raise ValueError(
            f"output={spec.output!r} is a file; give a directory (new or empty) for the store"
        )
    if info.type != pafs.FileType.Directory:
        return
    entries = store.fs.get_file_info(pafs.FileSelector(store.root))
    visible = [e.base_name for e in entries if not e.base_name.startswith(".")]
    if visible and "manifest.json" not in visible:
        raise ValueError(
            f"output={spec.output!r} is a directory that holds files but no noisemem study "
            f"({', '.join(sorted(visible)[:3])}{', ...' if len(visible) > 3 else ''}); give a "
            "new or empty directory"
        )


def check_complete(store: Store, spec: StudySpec, done: set[tuple[str, int]]) -> None:
    """Every chunk of every config is done (``done``: the (config, chunk) pairs the store
    holds, as this process reads it) and every config has its predictions; else the actors
    wrote where the driver cannot see."""
    chunks = Chunks.of(spec)  # type: ignore[arg-type]
    expected = {(c.id, p) for c in spec.configs for p in range(spec.training.permutations)}
    found = {
        (config, p) for config, k in done for p in chunks.indices(k) if (config, p) in expected
    }
    predicted = [c.id for c in spec.configs if not store.check_record(store.record(c.id, None))]
    if len(found) == len(expected) and len(predicted) == len(spec.configs):
        return
    raise IncompleteStoreError(
        f"the store at {store.uri!r} holds {len(found)} of the {len(expected)} expected "
        f"runs rows ({len(spec.configs)} configs x {spec.training.permutations} "
        f"permutations) and the predictions of {len(predicted)} of {len(spec.configs)} "
        "configs, although every actor reported its work written: the actors wrote "
        "somewhere this driver cannot read. On a multi-node cluster, output must be "
        "storage every node shares: a shared filesystem path mounted at the same place "
        "on every node, or a URI such as s3://bucket/study (set output in the spec, or "
        "--output)"
    )

"""The Parquet store without Ray: atomic keyed parts, completeness, load and merging."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from noisemem.analysis.compare import merged_moments
from noisemem.studies.schema import MOMENTS_V1, SCHEMA_VERSION, SCHEMAS
from noisemem.studies.store import Store
from noisemem.studies.tables import load


def runs_rows(config: str, chunk: int, perms: list[int], status: str = "ok") -> list[dict]:
    return [
        {"study": "s", "config": config, "chunk": chunk, "permutation": p, "status": status}
        for p in perms
    ]


def moments_row(config: str, chunk: int, vectors: list[np.ndarray]) -> dict:
    v = np.stack(vectors)
    mean = v.mean(0)
    return {
        "config": config,
        "probe": "init",
        "step": 3,
        "chunk": chunk,
        "count": len(vectors),
        "mean": mean.tolist(),
        "m2": ((v - mean) ** 2).sum(0).tolist(),
    }


def moments_row_v1(config: str, chunk: int, vectors: list[np.ndarray]) -> dict:
    """A ``moments`` row as schema version 1 stored it: count, sum, sum of squares."""
    v = np.stack(vectors)
    row = moments_row(config, chunk, vectors)
    del row["mean"], row["m2"]
    return {**row, "sum": v.sum(0).tolist(), "sum_sq": (v * v).sum(0).tolist()}


def write_v1_moments(store: Store, config: str, chunk: int, rows: list[dict]) -> None:
    """What noisemem with schema version 1 wrote (same path, version-1 columns)."""
    path = store.path(*store.part_name("moments", config, chunk))
    store.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MOMENTS_V1), path, filesystem=store.fs)


def all_files(store: Store) -> list[str]:
    """Every file under the study directory, whatever its name."""
    infos = store.fs.get_file_info(pafs.FileSelector(store.root, recursive=True))
    return sorted(i.path.removeprefix(store.root + "/") for i in infos if i.is_file)


@pytest.fixture
def store(tmp_path) -> Store:
    """A store of schema version 2, written part by part (no chunk records): the rule of
    the stores written before version 3, which this noisemem still reads and resumes."""
    s = Store(str(tmp_path / "study"))
    manifest = {"schema_version": 2, "study": "s", "permutations": 4, "chunks": 4}
    s.write_manifest({**manifest, "configs": [{"id": "c0", "kind": "HeavyBall"}]})
    return s


def test_rewriting_a_part_replaces_it_and_leaves_no_temporary_files(store):
    store.write_part("runs", "c0", 0, runs_rows("c0", 0, [0, 1]))
    store.write_part("runs", "c0", 0, runs_rows("c0", 0, [0, 1]))
    assert len(store.read("runs")) == 2
    assert all_files(store) == ["manifest.json", "runs/c0/chunk-00000.parquet"]


class CrashingStream:
    """An output stream that writes half of what it is given, then fails (a disk full, a
    killed process): what a reader would see of a part written in place."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()

    def write(self, data) -> None:
        data = bytes(data)
        self.stream.write(data[: len(data) // 2])
        self.stream.flush()
        raise OSError("simulated crash mid-write")

    def close(self) -> None:
        self.stream.close()


class CrashingFileSystem:
    """The store's filesystem, except that every file opened for writing crashes midway."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs
        self.opened: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self.fs, name)

    def open_output_stream(self, path: str, *args, **kwargs) -> CrashingStream:
        self.opened.append(path)
        return CrashingStream(self.fs.open_output_stream(path, *args, **kwargs))


def test_a_write_that_crashes_midway_leaves_the_previous_part_or_none(store, monkeypatch):
    store.write_part("runs", "c0", 0, runs_rows("c0", 0, [0, 1]))
    store.write_part("moments", "c0", 0, [moments_row("c0", 0, [np.ones(3), np.zeros(3)])])
    before = all_files(store)
    crashing = CrashingFileSystem(store.fs)
    with monkeypatch.context() as m:
        m.setattr(store, "fs", crashing)
        with pytest.raises(OSError, match="simulated crash"):  # a retry rewriting chunk 0
            store.write_part("runs", "c0", 0, runs_rows("c0", 0, [0, 1], status="failed"))
        with pytest.raises(OSError, match="simulated crash"):  # chunk 1's first write
            store.write_part("runs", "c0", 1, runs_rows("c0", 1, [2, 3]))
    # the writer did open a file (half of a part went somewhere) ...
    assert len(crashing.opened) == 2
    # ... but not the part itself: readers and resume see chunk 0 as it was, no chunk 1, and
    # the temporary files are gone
    assert all_files(store) == before
    assert store.chunk_done("c0", 0) and not store.chunk_done("c0", 1)
    tables = load(store.uri)
    assert sorted(tables.runs["permutation"]) == [0, 1]
    assert set(tables.runs["status"]) == {"ok"} and len(tables.moments) == 1


def test_a_temporary_file_left_by_a_killed_writer_is_never_read(store):
    store.write_part("runs", "c0", 0, runs_rows("c0", 0, [0, 1]))
    final = store.path(*store.part_name("runs", "c0", 1))
    # a process killed between writing its temporary file and the rename leaves this behind
    store.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
    table = pa.Table.from_pylist(
        runs_rows("c0", 1, [2, 3]),
        schema=pq.read_schema(store.path(*store.part_name("runs", "c0", 0)), filesystem=store.fs),
    )
    with store.fs.open_output_stream(final + ".tmp-deadbeef") as out:
        pq.write_table(table, out)
    assert "runs/c0/chunk-00001.parquet.tmp-deadbeef" in all_files(store)
    assert store.parts("runs") == [store.path(*store.part_name("runs", "c0", 0))]
    assert not store.chunk_done("c0", 1)
    assert sorted(load(store.uri).runs["permutation"]) == [0, 1]


def test_load_keeps_only_rows_of_finished_chunks_and_merges_moments(store):
    rng = np.random.default_rng(0)
    vecs = [rng.normal(size=5) for _ in range(6)]
    store.write_part("runs", "c0", 0, runs_rows("c0", 0, [0, 1]))
    store.write_part("moments", "c0", 0, [moments_row("c0", 0, vecs[:2])])
    store.write_part("runs", "c0", 1, runs_rows("c0", 1, [2, 3]))
    store.write_part("moments", "c0", 1, [moments_row("c0", 1, vecs[2:4])])
    # chunk 2 was interrupted after its moments part, chunk 3 failed after a partial write
    store.write_part("moments", "c0", 2, [moments_row("c0", 2, vecs[4:5])])
    store.write_part("runs", "c0", 3, runs_rows("c0", 3, [5], status="failed"))
    store.write_part("moments", "c0", 3, [moments_row("c0", 3, vecs[5:])])
    assert store.chunk_done("c0", 0) and not store.chunk_done("c0", 2)
    assert not store.chunk_done("c0", 3)
    tables = load(store.uri)
    assert sorted(tables.moments["chunk"]) == [0, 1]
    (merged,) = merged_moments(tables.moments).itertuples(index=False)
    x = np.stack(vecs[:4])
    assert merged.count == 4
    assert np.allclose(merged.mean, x.mean(0), rtol=1e-14)
    assert np.allclose(merged.stderr, x.std(0, ddof=1) / 2, rtol=1e-12)


@pytest.mark.parametrize("relative_spread", [1e-6, 1e-9])
def test_merged_stderr_is_accurate_when_the_spread_is_tiny_against_the_mean(store, relative_spread):
    # nearly identical corrections around a large mean, in 3 chunks of 4: the version-1
    # merge (sum, sum of squares) gave stderrs between 0 and 36x the true one here
    rng = np.random.default_rng(0)
    center = rng.uniform(1e2, 1e4, size=5)
    x = center + relative_spread * center * rng.normal(size=(12, 5))
    for chunk in range(3):
        store.write_part("runs", "c0", chunk, runs_rows("c0", chunk, [0, 1, 2, 3]))
        vectors = list(x[4 * chunk : 4 * chunk + 4])
        store.write_part("moments", "c0", chunk, [moments_row("c0", chunk, vectors)])
    (merged,) = merged_moments(load(store.uri).moments).itertuples(index=False)
    reference = x.std(0, ddof=1) / np.sqrt(12)
    assert merged.count == 12
    assert np.allclose(merged.mean, x.mean(0), rtol=1e-13)
    assert np.allclose(merged.stderr, reference, rtol=1e-12 + 100 * 2.2e-16 / relative_spread)


def write_moments(store: Store, chunk: int, vectors: list[np.ndarray], version: int) -> None:
    """Chunk ``chunk``'s moments of ``vectors`` (5-vectors; none: every run diverged) as
    noisemem with schema ``version`` wrote them."""
    v = np.stack(vectors) if vectors else np.zeros((0, 5))
    if version == 1:
        row = {**moments_row_v1("c0", chunk, [np.zeros(5)]), "count": len(v)}
        write_v1_moments(store, "c0", chunk, [{**row, "sum": v.sum(0), "sum_sq": (v * v).sum(0)}])
        return
    mean = v.mean(0) if len(v) else np.full(5, np.nan)  # Moments.empty's mean is NaN
    m2 = ((v - mean) ** 2).sum(0) if len(v) else np.zeros(5)
    row = {**moments_row("c0", chunk, [np.zeros(5)]), "count": len(v), "mean": mean, "m2": m2}
    store.write_part("moments", "c0", chunk, [row])


def test_a_version_1_store_loads_with_the_same_merged_moments(tmp_path):
    rng = np.random.default_rng(2)
    vecs = [rng.normal(size=5) + 3.0 for _ in range(7)]
    chunks = [vecs[:3], vecs[3:4], vecs[4:], []]  # chunk 3: every run diverged
    # the moments part's schema version per chunk; "mixed": a version-1 store resumed by
    # this noisemem, whose chunks 2 and 3 were computed after the upgrade
    versions = {"v1": [1, 1, 1, 1], "v2": [2, 2, 2, 2], "mixed": [1, 1, 2, 2]}
    x = np.stack(vecs)
    for name, per_chunk in versions.items():
        store = Store(str(tmp_path / name))
        manifest = {"schema_version": per_chunk[0], "study": "s", "permutations": 7}
        store.write_manifest({**manifest, "chunks": 4, "configs": [{"id": "c0"}]})
        for chunk, (part, version) in enumerate(zip(chunks, per_chunk, strict=True)):
            store.write_part("runs", "c0", chunk, runs_rows("c0", chunk, [chunk]))
            write_moments(store, chunk, part, version)
        moments = load(store.uri).moments
        assert list(moments.columns) == list(SCHEMAS["moments"].names), name
        (merged,) = merged_moments(moments).itertuples(index=False)
        assert merged.count == 7, name
        assert np.allclose(merged.mean, x.mean(0), rtol=1e-13), name
        assert np.allclose(merged.stderr, x.std(0, ddof=1) / np.sqrt(7), rtol=1e-10), name


def test_load_refuses_an_unknown_schema_version(store):
    store.write_manifest({"schema_version": 99, "study": "s", "configs": [], "permutations": 1})
    with pytest.raises(ValueError, match="schema version 99 is not one this noisemem reads"):
        load(store.uri)


def test_unreadable_runs_part_counts_as_not_done(store):
    store.write_text("not parquet", *store.part_name("runs", "c0", 0))
    assert not store.chunk_done("c0", 0)


def test_load_refuses_a_directory_without_a_study(tmp_path):
    with pytest.raises(ValueError, match="no noisemem study"):
        load(str(tmp_path))


@pytest.mark.parametrize("uri", ["", "  "])
def test_an_empty_store_path_is_refused(uri):
    with pytest.raises(ValueError, match="output="):
        Store(uri)


def chunk_tables(config: str, chunk: int, perms: list[int]) -> dict[str, list[dict]]:
    rng = np.random.default_rng(chunk)
    vectors = [rng.normal(size=3) for _ in perms]
    return {
        "runs": runs_rows(config, chunk, perms),
        "steps": [{"config": config, "permutation": p, "step": 0, "loss": 1.0} for p in perms],
        "corrections": [
            {"config": config, "permutation": p, "probe": "init", "step": 3, "norm": 1.0}
            for p in perms
        ],
        "moments": [{**moments_row(config, chunk, vectors), "excluded": 0}],
    }


@pytest.fixture
def store3(tmp_path) -> Store:
    """A store of the current schema, two chunks of config c0 written as actors write them."""
    s = Store(str(tmp_path / "study3"))
    manifest = {"schema_version": SCHEMA_VERSION, "study": "s", "permutations": 4, "chunks": 2}
    s.write_manifest({**manifest, "configs": [{"id": "c0", "kind": "HeavyBall"}]})
    s.write_chunk("c0", 0, chunk_tables("c0", 0, [0, 1]))
    s.write_chunk("c0", 1, chunk_tables("c0", 1, [2, 3]))
    s.write_predictions("c0", [])
    return s


def test_a_chunk_is_done_when_its_record_verifies(store3):
    from noisemem.studies.tables import inspect

    assert store3.chunk_done("c0", 0) and store3.chunk_done("c0", 1)
    found = inspect(store3.uri)
    assert found.complete and found.problems == []
    tables = load(store3.uri)
    assert sorted(tables.runs["permutation"]) == [0, 1, 2, 3] and len(tables.moments) == 2
    assert tables.problems == ()
    # records and temporary files never look like data to a reader that lists files
    names = all_files(store3)
    assert "_chunks/c0/chunk-00000.json" in names
    assert not [n for n in names if ".tmp-" in n]


@pytest.mark.parametrize("table", ["runs", "steps", "corrections", "moments"])
@pytest.mark.parametrize("damage", ["delete", "truncate", "rewrite"])
def test_a_missing_truncated_or_rewritten_part_makes_its_chunk_not_done(store3, table, damage):
    from noisemem.studies.tables import inspect

    parts = store3.part_name(table, "c0", 1)
    path = store3.path(*parts)
    if damage == "delete":
        store3.fs.delete_file(path)
    elif damage == "truncate":
        data = store3.read_bytes(*parts)
        with store3.fs.open_output_stream(path) as out:
            out.write(data[: len(data) // 2])
    else:  # a valid part, but not the one the record lists (another writer's)
        store3.write_part(table, "c0", 1, chunk_tables("c0", 1, [3])[table])
    assert store3.chunk_done("c0", 0) and not store3.chunk_done("c0", 1)
    found = inspect(store3.uri)
    assert not found.complete and found.status[("c0", 1)] == "damaged"
    (problem,) = found.problems
    assert problem.startswith(f"chunk 1 of c0: {'/'.join(parts)}: ")
    assert ("missing" in problem) == (damage == "delete")
    tables = load(store3.uri)  # the damaged chunk is left out, and said to be
    assert sorted(tables.runs["permutation"]) == [0, 1]
    assert list(tables.moments["chunk"]) == [0]
    assert tables.problems == (problem,)


def test_a_failed_chunk_keeps_its_failure_rows_and_is_not_done(store3):
    from noisemem.studies.tables import inspect

    failed = [
        {**r, "status": "failed", "error": "Traceback\nOSError: boom"}
        for r in runs_rows("c0", 1, [2, 3])
    ]
    store3.write_chunk("c0", 1, {"runs": failed}, status="failed")
    assert not store3.chunk_done("c0", 1)
    found = inspect(store3.uri)
    assert found.status[("c0", 1)] == "failed"
    assert found.problems == ["chunk 1 of c0: failed (OSError: boom)"]
    tables = load(store3.uri)
    assert list(tables.runs["status"]) == ["ok", "ok", "failed", "failed"]
    assert list(tables.moments["chunk"]) == [0]


def test_the_manifest_is_created_exclusively(tmp_path):
    store = Store(str(tmp_path / "new"))
    assert store.create_exclusive('{"a": 1}', "manifest.json")
    assert not store.create_exclusive('{"a": 2}', "manifest.json")
    assert store.read_manifest() == {"a": 1}
    assert [n for n in all_files(store)] == ["manifest.json"]


def test_an_automatic_chunk_size_resumes_with_the_stored_one(tmp_path):
    """A store made with one chunk size is resumed with it by a spec that leaves the size to
    the work, whatever that would choose now (the chunks of a store must not change)."""
    from noisemem.studies.prepare import stored_chunking
    from noisemem.studies.spec import StudySpec
    from noisemem.studies.store import study_toml

    raw = {
        "name": "auto",
        "output": str(tmp_path / "s"),
        "optimizers": [{"kind": "HeavyBall", "lr": 0.1, "beta": 0.9}],
        "training": {"permutations": 64},
    }
    spec = StudySpec.from_dict(raw)
    assert spec.auto_chunks and spec.training.chunk_size == 8
    made = StudySpec.from_dict({**raw, "training": {"permutations": 64, "chunk_size": 16}})
    store = Store(spec.output)
    store.write_text(study_toml(made), "study.toml")
    resumed = stored_chunking(store, spec)
    assert resumed.training.chunk_size == 16 and resumed.digest == made.digest
    explicit = StudySpec.from_dict({**raw, "training": {"permutations": 64, "chunk_size": 4}})
    assert stored_chunking(store, explicit) is explicit  # a size written out is kept


def test_a_study_created_while_the_directory_is_read_is_not_a_users_files(tmp_path):
    """Between a driver's "no manifest yet" and its listing of the directory, another
    driver may create its study: the listing then holds that study's manifest, and the
    refusal is the identity check's (another study), not the one for a user's files."""
    import stores

    from noisemem.studies.spec import StudySpec
    from noisemem.studies.store import open_for, refuse_foreign_files

    a = StudySpec.from_dict({**stores.TINY, "output": str(tmp_path / "store")})
    b = StudySpec.from_dict({**stores.TINY, "output": str(tmp_path / "store"), "seed": 1})
    store = Store(a.output)
    open_for(store, a, {"source": "digits", "num_samples": 64}, 4)
    refuse_foreign_files(store, b)  # the manifest is there: not foreign files
    with pytest.raises(ValueError, match="holds a different study"):
        open_for(store, b, {"source": "digits", "num_samples": 64}, 4)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files but no noisemem study"):
        refuse_foreign_files(Store(str(tmp_path / "user")), b)

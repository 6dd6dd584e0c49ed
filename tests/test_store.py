"""The Parquet store without Ray: atomic keyed parts, completeness, load and merging."""

from __future__ import annotations

import numpy as np
import pytest

from noisemem.store import SCHEMA_VERSION, Store, load, merged_moments


def runs_rows(config: str, chunk: int, perms: list[int], status: str = "ok") -> list[dict]:
    return [
        {"study": "s", "config": config, "chunk": chunk, "permutation": p, "status": status}
        for p in perms
    ]


def moments_row(config: str, chunk: int, vectors: list[np.ndarray]) -> dict:
    v = np.stack(vectors)
    return {
        "config": config,
        "probe": "init",
        "step": 3,
        "chunk": chunk,
        "count": len(vectors),
        "sum": v.sum(0).tolist(),
        "sum_sq": (v * v).sum(0).tolist(),
    }


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(str(tmp_path / "study"))
    s.write_manifest(
        {"schema_version": SCHEMA_VERSION, "study": "s", "configs": [], "permutations": 4}
    )
    return s


def test_rewriting_a_part_replaces_it_and_leaves_no_temporary_files(store):
    store.write_part("runs", "c0", 0, runs_rows("c0", 0, [0, 1]))
    store.write_part("runs", "c0", 0, runs_rows("c0", 0, [0, 1]))
    assert len(store.read("runs")) == 2
    files = [p for p in store.parts("runs")]
    assert len(files) == 1 and not any(".tmp-" in f for f in files)


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


def test_unreadable_runs_part_counts_as_not_done(store):
    store.write_text("not parquet", *store.part_name("runs", "c0", 0))
    assert not store.chunk_done("c0", 0)


def test_load_refuses_a_directory_without_a_study(tmp_path):
    with pytest.raises(ValueError, match="no noisemem study"):
        load(str(tmp_path))

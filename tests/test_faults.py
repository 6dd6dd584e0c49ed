"""Fault injection on a real local Ray cluster: killed actors, a killed driver, damaged
parts, two drivers on one store, requests no node can meet, and a soak. Each ends equal to a
clean run (every permutation once, result columns byte-equal) or in a clear refusal, within
a bounded time."""

from __future__ import annotations

import copy
import io
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import tomli_w

from noisemem.studies import driver
from noisemem.studies.driver import launch
from noisemem.studies.spec import StudySpec
from noisemem.studies.store import Store
from noisemem.studies.tables import inspect, load

#: columns that describe the machine a chunk ran on, not its results
TIMING = ["seconds", "worker", "memory_plan"]
TABLES = ("runs", "steps", "corrections", "moments", "predictions")

RAW = {
    "name": "faults",
    "data": {"source": "digits", "limit": 96},
    "model": {"kind": "gelu_mlp", "hidden": 4},
    "optimizers": [
        {"kind": "HeavyBall", "lr": 0.1, "beta": 0.9},
        {"kind": "AdamW", "lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-6},
    ],
    "training": {"batch_size": 32, "epochs": 2, "permutations": 6, "chunk_size": 2},
    "probes": {"init": True, "epoch_end": True},
    "runtime": {"dtype": "float64", "start_timeout": 60},
}


def spec_at(path, **changes) -> StudySpec:
    raw = copy.deepcopy(RAW)
    raw["output"] = str(path)
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            raw[section] = {**raw.get(section, {}), field: value}
        else:
            raw[key] = value
    return StudySpec.from_dict(raw)


def comparable(tables, name: str) -> pd.DataFrame:
    df = tables[name].drop(columns=[c for c in TIMING if c in tables[name].columns])
    keys = [c for c in ("config", "permutation", "probe", "step", "chunk", "kind") if c in df]
    df = df.sort_values(keys).reset_index(drop=True)
    return df.map(lambda v: tuple(v) if hasattr(v, "__len__") and not isinstance(v, str) else v)


def assert_same_as(clean, tables) -> None:
    assert tables.problems == ()
    assert not tables.runs.duplicated(["config", "permutation"]).any()
    for name in TABLES:
        pd.testing.assert_frame_equal(comparable(clean, name), comparable(tables, name))


@pytest.fixture(scope="module")
def clean(ray_local, tmp_path_factory):
    """The reference: an uninterrupted run of RAW."""
    path = tmp_path_factory.mktemp("clean") / "store"
    return load(launch(spec_at(path), actors=2, log=io.StringIO()).wait(timeout=600))


#: (table, config index, chunk or None for predictions, how): each table's part deleted in
#: one place and truncated in another, spread over four of the six chunks
DAMAGE = [
    ("runs", 0, 0, "delete"),
    ("steps", 0, 0, "truncate"),
    ("corrections", 0, 1, "delete"),
    ("moments", 0, 1, "truncate"),
    ("runs", 1, 0, "truncate"),
    ("steps", 1, 0, "delete"),
    ("corrections", 1, 1, "truncate"),
    ("moments", 1, 1, "delete"),
    ("predictions", 0, None, "delete"),
    ("predictions", 1, None, "truncate"),
]


def test_deleted_and_truncated_parts_of_every_table_are_computed_again(clean, tmp_path):
    spec = spec_at(tmp_path / "store")
    path = launch(spec, actors=2, log=io.StringIO()).wait(timeout=600)
    store = Store(path)
    for table, ci, chunk, how in DAMAGE:
        parts = store.part_name(table, spec.configs[ci].id, chunk)
        if how == "delete":
            store.fs.delete_file(store.path(*parts))
        else:
            data = store.read_bytes(*parts)
            with store.fs.open_output_stream(store.path(*parts)) as out:
                out.write(data[: len(data) // 3])
    found = inspect(path)
    damaged = {(spec.configs[ci].id, chunk) for _, ci, chunk, _ in DAMAGE}
    assert {k for k, v in found.status.items() if v == "damaged"} == damaged
    assert len(found.problems) == len(damaged)
    loaded = load(path)  # what a reader sees meanwhile: the intact chunks, and the list
    assert sorted(set(loaded.moments["chunk"])) == [2] and len(loaded.problems) == 6
    handle = launch(spec, actors=2, log=io.StringIO())
    assert handle.progress.done == 2 * 2  # only the two intact chunks were kept
    assert_same_as(clean, load(handle.wait(timeout=600)))


def test_an_actor_killed_mid_chunk_is_replaced_and_the_store_is_a_clean_one(clean, tmp_path):
    import ray

    spec = spec_at(tmp_path / "store")
    log = io.StringIO()
    handle = launch(spec, actors=2, log=log)
    store = Store(handle.path)
    deadline = time.monotonic() + 120
    while not store.exists("_chunks") and time.monotonic() < deadline:
        time.sleep(0.05)
    ray.kill(handle.pool.actors[0])  # busy with a chunk or predictions
    assert_same_as(clean, load(handle.wait(timeout=600)))
    assert "lost (ActorDiedError); retrying" in log.getvalue()


DRIVER = """
import io, sys
import ray
from noisemem.studies.driver import launch
from noisemem.studies.spec import StudySpec
ray.init(address=sys.argv[2])
launch(StudySpec.from_toml(sys.argv[1]), actors=1, log=sys.stdout).wait(timeout=600)
"""


def test_a_killed_driver_leaves_a_store_that_resumes_to_a_clean_one(clean, ray_local, tmp_path):
    spec = spec_at(tmp_path / "store")
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(tomli_w.dumps({**copy.deepcopy(RAW), "output": spec.output}))
    address = ray_local.get_runtime_context().gcs_address
    child = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(spec_file), address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        store = Store(spec.output)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and child.poll() is None:
            if len(store.parts("runs")) >= 2:  # some chunks done, others not
                break
            time.sleep(0.05)
        assert child.poll() is None, child.stdout.read() if child.stdout else ""
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    found = inspect(spec.output)
    assert not found.complete and found.count("done") >= 1
    handle = launch(spec, actors=2, log=io.StringIO())  # its lock is stale: the pid is gone
    assert 0 < handle.progress.done < 12
    assert_same_as(clean, load(handle.wait(timeout=600)))


def slowed_device_check(monkeypatch, seconds: float) -> None:
    """The device check takes ``seconds`` (a GPU cluster's CUDA check may take up to 120 s):
    the window in which two drivers could both find the store empty."""
    original = driver.choose_device

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(driver, "choose_device", slow)


def race(*specs: StudySpec) -> list[object]:
    """Launch each spec from its own thread at the same moment; each thread's outcome: the
    store path, or the exception."""
    outcomes: list[object] = [None] * len(specs)
    barrier = threading.Barrier(len(specs))

    def go(i: int, spec: StudySpec) -> None:
        barrier.wait()
        try:
            outcomes[i] = launch(spec, actors=1, log=io.StringIO()).wait(timeout=600)
        except Exception as err:
            outcomes[i] = err

    threads = [threading.Thread(target=go, args=(i, s)) for i, s in enumerate(specs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    return outcomes


def test_two_drivers_with_different_specs_cannot_fill_one_store(ray_local, tmp_path, monkeypatch):
    slowed_device_check(monkeypatch, 1.5)
    a = spec_at(tmp_path / "store")
    b = spec_at(tmp_path / "store", seed=1)
    outcomes = race(a, b)
    refused = [o for o in outcomes if isinstance(o, ValueError)]
    finished = [o for o in outcomes if isinstance(o, str)]
    assert len(refused) == 1 and len(finished) == 1, outcomes
    assert "holds a different study" in str(refused[0])
    tables = load(finished[0])
    assert len(tables.runs) == 12 and tables.problems == ()
    assert not tables.runs.duplicated(["config", "permutation"]).any()


def test_a_second_driver_of_the_same_study_waits_and_duplicates_nothing(
    clean, tmp_path, monkeypatch
):
    slowed_device_check(monkeypatch, 0.5)
    spec = spec_at(tmp_path / "store")
    outcomes = race(spec, spec)
    assert outcomes == [spec.output, spec.output], outcomes
    assert_same_as(clean, load(spec.output))


@pytest.mark.parametrize(
    "change, asked",
    [({"runtime.cpus_per_actor": 64}, "64 CPU"), ({"runtime.gpu": "always"}, "1 CPU, 1 GPU")],
    ids=["cpus", "gpu"],
)
def test_a_request_no_node_can_meet_is_refused_in_bounded_time(ray_local, tmp_path, change, asked):
    spec = spec_at(tmp_path / "now", **change, **{"runtime.start_timeout": 0})
    t0 = time.monotonic()
    with pytest.raises(ValueError) as err:
        launch(spec, log=io.StringIO())
    assert time.monotonic() - t0 < 30
    assert f"each study actor asks for {asked}" in str(err.value)
    assert "no node of the cluster has that (nodes: 2 CPU)" in str(err.value)
    assert not Store(spec.output).exists("manifest.json")  # refused before anything was written
    # an autoscaling cluster might grow: the driver waits runtime.start_timeout, then says so
    spec = spec_at(tmp_path / "later", **change, **{"runtime.start_timeout": 3})
    t0 = time.monotonic()
    log = io.StringIO()
    handle = launch(spec, log=log)
    with pytest.raises(driver.StudyInterrupted) as err:
        handle.wait(timeout=120)
    assert 3 <= time.monotonic() - t0 < 60
    assert "no study actor started within 3 s (runtime.start_timeout)" in str(err.value)
    assert "waiting up to 3 s" in log.getvalue()


SOAK = {
    "name": "soak",
    "data": {"source": "digits", "limit": 64},
    "model": {"kind": "softmax"},
    "optimizers": [{"kind": "HeavyBall", "lr": 0.1, "beta": 0.9}],
    "training": {"batch_size": 32, "epochs": 1, "permutations": 400, "chunk_size": 2},
    "probes": {"init": True},
    "record": {"steps": False},
    "runtime": {"dtype": "float64"},
}


def test_soak_200_chunks_with_actors_killed_every_few_seconds(ray_local, tmp_path):
    import ray

    spec = StudySpec.from_dict({**SOAK, "output": str(tmp_path / "soak")})
    assert len(spec.configs) * -(-400 // 2) == 200
    rng = np.random.default_rng(0)
    log = io.StringIO()
    handle = launch(spec, actors=2, log=log)
    kills, deadline = 0, time.monotonic() + 25
    while not handle._done.is_set() and time.monotonic() < deadline:
        time.sleep(rng.uniform(1.0, 3.0))
        actors = list(handle.pool.actors)
        ray.kill(actors[rng.integers(len(actors))])
        kills += 1
    try:
        handle.wait(timeout=600)
        stopped = None
    except ray.exceptions.RayError as err:  # retries spent: stopped, resumable
        stopped = err
        assert "run the same command again to resume it" in err.__notes__[-1]
    assert kills >= 5
    if stopped is not None:
        launch(spec, actors=2, log=io.StringIO()).wait(timeout=600)
    tables = load(spec.output)
    assert tables.problems == () and tables.manifest["complete"] is True
    assert sorted(tables.runs["permutation"]) == list(range(400))
    assert set(tables.runs["status"]) == {"ok"}
    merged = tables.moments.groupby(["probe", "step"])["count"].sum()
    assert (merged == 400).all()


def test_every_permutation_of_the_soak_has_its_clean_value(tmp_path):
    """What the soak's rows are checked against: a chunk computed in one piece (no Ray)
    equals the same chunk computed after the chunking changed (it depends on the index
    only); the soak test checks completeness, this one the values."""
    from noisemem.studies.chunk import Context, run_chunk
    from noisemem.studies.data import prepare

    data = prepare("digits", limit=64)
    a = StudySpec.from_dict({**SOAK, "output": str(tmp_path / "a")})
    raw_b = copy.deepcopy(SOAK)
    raw_b["training"] = {**SOAK["training"], "chunk_size": 4}
    b = StudySpec.from_dict({**raw_b, "output": str(tmp_path / "b")})
    ca, cb = Context.build(a, *data), Context.build(b, *data)
    rows_a = (
        run_chunk(ca, a.configs[0], 1)["corrections"]
        + run_chunk(ca, a.configs[0], 0)["corrections"]
    )
    rows_b = run_chunk(cb, b.configs[0], 0)["corrections"]
    key = lambda r: (r["permutation"], r["probe"], r["step"])  # noqa: E731
    assert sorted(map(key, rows_a)) == sorted(map(key, rows_b))
    for x, y in zip(sorted(rows_a, key=key), sorted(rows_b, key=key), strict=True):
        assert x["norm"] == y["norm"] and x["cos_noise"] == y["cos_noise"]

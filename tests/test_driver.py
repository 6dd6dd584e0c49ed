"""Studies on a local Ray cluster: scheduling-independent results, resume, early errors."""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import pandas as pd
import pytest

from noisemem.studies import devices, driver, rows
from noisemem.studies.driver import launch
from noisemem.studies.plan import Chunks, Item
from noisemem.studies.schema import SCHEMA_VERSION, SCHEMAS
from noisemem.studies.spec import SpecError, StudySpec
from noisemem.studies.store import (
    IncompleteStoreError,
    Store,
    legacy_digest,
    location,
    study_toml,
)
from noisemem.studies.tables import load

#: columns that describe the machine a chunk ran on, not its results
TIMING = ["seconds", "worker", "memory_plan"]

RAW = {
    "name": "ray_small",
    "data": {"source": "digits", "limit": 128},
    "model": {"kind": "gelu_mlp", "hidden": 4},
    "optimizers": [
        {"kind": "HeavyBall", "lr": 0.1, "beta": 0.9},
        {"kind": "AdamW", "lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-6},
    ],
    "training": {"batch_size": 32, "epochs": 2, "permutations": 6, "chunk_size": 2},
    "probes": {"init": True, "epoch_end": True},
    "runtime": {"dtype": "float64", "cpus_per_actor": 1},
}


def spec_at(path, **changes) -> StudySpec:
    raw = copy.deepcopy(RAW)
    raw["output"] = str(path)
    raw.update(changes)
    return StudySpec.from_dict(raw)


def comparable(tables, name: str) -> pd.DataFrame:
    df = tables[name].drop(columns=[c for c in TIMING if c in tables[name].columns])
    keys = [c for c in ("config", "permutation", "probe", "step", "chunk", "kind") if c in df]
    df = df.sort_values(keys).reset_index(drop=True)
    return df.map(lambda v: tuple(v) if hasattr(v, "__len__") and not isinstance(v, str) else v)


def test_one_and_two_actors_give_identical_tables(ray_local, tmp_path):
    log = io.StringIO()
    one = launch(spec_at(tmp_path / "one"), actors=1, log=log).wait(timeout=600)
    two = launch(spec_at(tmp_path / "two"), actors=2, log=log).wait(timeout=600)
    a, b = load(one), load(two)
    assert len(a.runs) == 2 * 6 and set(a.runs["status"]) == {"ok"}
    for name in ("runs", "steps", "corrections", "moments", "predictions"):
        pd.testing.assert_frame_equal(comparable(a, name), comparable(b, name))
    assert "permutations 12/12" in log.getvalue()
    assert a.manifest["complete"] is True


def test_interrupted_study_resumes_with_exactly_the_same_rows(ray_local, tmp_path):
    spec = spec_at(tmp_path / "resume")
    path = launch(spec, actors=2, log=io.StringIO()).wait(timeout=600)
    before = load(path)
    store = Store(path)
    config = spec.configs[1].id
    # an interruption after chunk 1 wrote its corrections but before its runs marker,
    # and a lost chunk 2 entirely
    store.fs.delete_file(store.path(*store.part_name("runs", config, 1)))
    for table in ("runs", "steps", "corrections", "moments"):
        store.fs.delete_file(store.path(*store.part_name(table, config, 2)))
    handle = launch(spec, actors=2, log=io.StringIO())
    assert handle.progress.done == 12 - 4  # only the two unfinished chunks run again
    after = load(handle.wait(timeout=600))
    for name in ("runs", "steps", "corrections", "moments", "predictions"):
        pd.testing.assert_frame_equal(comparable(before, name), comparable(after, name))


def test_schema_is_the_documented_one(ray_local, tmp_path):
    path = launch(spec_at(tmp_path / "schema"), actors=2, log=io.StringIO()).wait(timeout=600)
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Store(path)
    for table, schema in SCHEMAS.items():
        parts = store.parts(table)
        assert parts, table
        if table == "configs":  # the documented columns, then one per hyperparameter
            (part,) = parts
            got = pq.read_schema(part, filesystem=store.fs).remove_metadata()
            fixed = len(schema)
            assert pa.schema(list(got)[:fixed]).equals(schema)
            names = {k for c in spec_at(tmp_path / "x").configs for k in c.hyperparameters}
            assert set(got.names[fixed:]) == names - {"kind"}
            continue
        for part in parts:
            assert pq.read_schema(part, filesystem=store.fs).remove_metadata().equals(schema), part


def test_bad_spec_fails_before_any_actor_starts(ray_local, tmp_path, monkeypatch):
    def no_actors(*args, **kwargs):
        raise AssertionError("an actor was started")

    monkeypatch.setattr(driver.Pool, "start", no_actors)
    bad = spec_at(tmp_path / "bad", training={**RAW["training"], "batch_size": 500})
    with pytest.raises(SpecError, match=r"training.batch_size=500"):
        launch(bad)


def test_another_study_in_the_same_output_is_refused(ray_local, tmp_path):
    launch(spec_at(tmp_path / "same"), actors=1, log=io.StringIO()).wait(timeout=600)
    other = spec_at(tmp_path / "same", seed=1)
    with pytest.raises(ValueError, match="holds a different study"):
        launch(other)


def test_failed_chunks_run_again_on_resume_and_uris_work(ray_local, tmp_path):
    spec = spec_at(f"file://{tmp_path / 'uri'}")
    path = launch(spec, actors=2, log=io.StringIO()).wait(timeout=600)
    store = Store(path)
    config = spec.configs[0]
    store.write_part("runs", config.id, 0, rows.failed_chunk_rows(spec, config, 0, "boom", "w"))
    assert not store.chunk_done(config.id, 0)
    handle = launch(spec, actors=2, log=io.StringIO())
    assert handle.progress.done == 12 - 2
    tables = load(handle.wait(timeout=600))
    assert set(tables.runs["status"]) == {"ok"} and len(tables.runs) == 12


def test_cli_status_and_show(ray_local, tmp_path, capsys):
    from noisemem.cli import main

    path = launch(spec_at(tmp_path / "cli"), actors=2, log=io.StringIO()).wait(timeout=600)
    assert main(["status", path]) == 0
    out = capsys.readouterr().out
    assert "complete=True" in out and "runs: 12 of 12" in out
    assert main(["show", path]) == 0
    out = capsys.readouterr().out
    assert "c000-HeavyBall" in out and "rms z" in out


def test_bad_model_fails_before_any_actor_starts(ray_local, tmp_path, monkeypatch):
    def no_actors(*args, **kwargs):
        raise AssertionError("an actor was started")

    monkeypatch.setattr(driver.Pool, "start", no_actors)
    bad = spec_at(
        tmp_path / "badmodel", model={"kind": "torch.nn:Linear", "kwargs": {"bias": True}}
    )
    with pytest.raises(SpecError, match=r"model.kwargs=\{'bias': True\} do not fit"):
        launch(bad)
    cnn = spec_at(tmp_path / "badcnn", model={"kind": "cnn", "kwargs": {"channels": 0}})
    with pytest.raises(SpecError, match=r"model.kwargs.channels=0"):
        launch(cnn)


class FakeRef:
    def __init__(self, outcome):
        self.outcome = outcome


class FakeActor:
    """Takes one outcome per call from a shared script, in submission order: an exception
    (what ``ray.get`` raises) or "ok", on which it writes the item's part like a real actor
    (``write=False``: it claims success and writes nothing, like an actor on another node
    writing a local path)."""

    def __init__(self, spec, store, script, write=True):
        self.spec, self.store, self.script, self.write = spec, store, script, write

        class Method:
            def __init__(self, fn):
                self.remote = fn

        self.run_chunk = Method(lambda ci, chunk: self._call(ci, chunk))
        self.predictions = Method(lambda ci: self._call(ci, None))
        self.ready = Method(lambda: FakeRef("ready"))

    def _call(self, ci, chunk):
        outcome = self.script.pop(0)
        if isinstance(outcome, Exception):
            return FakeRef(outcome)
        spec, store = self.spec, self.store
        config = spec.configs[ci]
        if chunk is None:
            if self.write:
                store.write_predictions(config.id, [])
            return FakeRef(config.id)
        if self.write:
            written = [rows.run_row(spec, config, chunk, p) for p in Chunks.of(spec).indices(chunk)]
            store.write_chunk(config.id, chunk, {"runs": written})
        return FakeRef({"status": "ok"})


def fake_handle(monkeypatch, tmp_path, script, actors=1, write=True, chunks=(0, 1)):
    """A StudyHandle whose driver loop talks to FakeActors (no Ray): 1 config, 2 chunks
    (or the ``chunks`` given), the config's predictions first."""

    def fake_get(ref):
        if isinstance(ref, list):
            return [fake_get(r) for r in ref]
        if isinstance(ref.outcome, Exception):
            raise ref.outcome
        return ref.outcome

    monkeypatch.setattr(
        driver.ray, "wait", lambda refs, num_returns, timeout=None: (refs[:1], refs[1:])
    )
    monkeypatch.setattr(driver.ray, "get", fake_get)
    monkeypatch.setattr(driver.ray, "kill", lambda actor: None)
    training = {**RAW["training"], "permutations": 4}
    spec = spec_at(tmp_path / "fake", optimizers=RAW["optimizers"][:1], training=training)
    store = Store(spec.output)
    store.write_manifest({"schema_version": SCHEMA_VERSION})
    new_actors = []

    def new_actor():
        new_actors.append(FakeActor(spec, store, script, write))
        return new_actors[-1]

    pool = driver.Pool([FakeActor(spec, store, script, write) for _ in range(actors)], new_actor)
    items = [Item(0)] + [Item(0, c) for c in chunks]
    handle = driver.StudyHandle(spec, store, pool, items, driver.Progress(total=4), io.StringIO())
    handle.new_actors = new_actors
    return handle


def test_driver_retries_a_chunk_whose_task_raised_and_keeps_the_actor(monkeypatch, tmp_path):
    """A store write failing (a RayTaskError) is retried on the same, healthy actor; beyond
    MAX_RETRIES the error surfaces."""
    import ray

    task_error = ray.exceptions.RayTaskError("run_chunk", "OSError: disk hiccup", OSError("x"))
    # the one actor takes the predictions first, then the chunks
    script = ["ok", task_error, "ok", "ok"]
    handle = fake_handle(monkeypatch, tmp_path, script)
    handle.run()
    assert handle._error is None and handle.progress.done == 4
    assert "chunk 0 of c000-HeavyBall-lr0.1-beta0.9 lost (RayTaskError); retrying" in (
        handle.log.getvalue()
    )
    assert handle.new_actors == [] and not script

    script[:] = ["ok"] + [task_error] * (driver.MAX_RETRIES + 1)
    handle = fake_handle(monkeypatch, tmp_path, script, chunks=(0,))
    handle.run()
    assert isinstance(handle._error, ray.exceptions.RayTaskError)


def test_predictions_whose_actor_died_are_retried_on_a_new_actor(monkeypatch, tmp_path):
    """The predictions go through the chunks' retry path: a dead actor is replaced and the
    study completes (it used to fail at the end, after every chunk was written)."""
    import ray

    script = [ray.exceptions.ActorDiedError(), "ok", "ok", "ok"]
    handle = fake_handle(monkeypatch, tmp_path, script)
    handle.run()
    assert handle._error is None and handle.progress.done == 4
    assert "predictions of c000-HeavyBall-lr0.1-beta0.9 lost (ActorDiedError); retrying" in (
        handle.log.getvalue()
    )
    assert len(handle.new_actors) == 1 and not script
    assert handle.store.read_manifest()["complete"] is True


def test_an_actor_failing_in_init_is_not_retried(monkeypatch, tmp_path):
    """An exception in an actor's __init__ is the same on every try: the driver stops at
    once with it instead of starting replacement actors."""
    import ray

    cause = ray.exceptions.RayTaskError(
        "StudyWorker.__init__", "RuntimeError: Torch not compiled with CUDA enabled", OSError()
    )
    script = [ray.exceptions.ActorDiedError(cause), "ok", "ok", "ok"]
    handle = fake_handle(monkeypatch, tmp_path, script)
    handle.run()
    assert isinstance(handle._error, driver.StudyActorError)
    assert "Torch not compiled with CUDA enabled" in str(handle._error)
    assert "retrying" not in handle.log.getvalue() and handle.new_actors == []


def test_driver_refuses_a_store_that_lacks_rows(monkeypatch, tmp_path):
    """Actors that write where the driver cannot read (another node's disk) report success;
    the driver counts the rows and says why they are missing."""
    handle = fake_handle(monkeypatch, tmp_path, ["ok"] * 3, write=False)
    handle.run()
    err = handle._error
    assert isinstance(err, IncompleteStoreError)
    message = str(err)
    assert repr(handle.path) in message
    assert "0 of the 4 expected runs rows (1 configs x 4 permutations)" in message
    assert "predictions of 0 of 1 configs" in message
    assert "multi-node" in message and "s3://" in message
    assert handle.store.read_manifest().get("complete") is not True


class Check:
    """A stand-in for the CUDA check on a GPU node that records that it ran."""

    def __init__(self, answer):
        self.answer, self.calls = answer, 0

    def __call__(self):
        self.calls += 1
        return self.answer


@pytest.mark.parametrize(
    ("gpu", "gpus", "answer", "device", "checked"),
    [
        ("never", 4, (True, "A100"), "cpu", False),
        ("auto", 0, (True, "A100"), "cpu", False),
        ("auto", 2, (True, "A100"), "cuda", True),
        ("auto", 1, (False, "torch 2.13.0+cpu there is a CPU-only build"), "cpu", True),
        ("auto", 1, (None, "no answer from a GPU node within 120 s"), "cpu", True),
        ("always", 0, (False, "never asked"), "cuda", False),  # autoscaling from zero
        ("always", 1, (True, "A100"), "cuda", True),
        ("always", 1, (None, "no answer from a GPU node within 120 s"), "cuda", True),
    ],
)
def test_device_follows_what_torch_can_do_where_the_gpu_is(gpu, gpus, answer, device, checked):
    check, log = Check(answer), io.StringIO()
    assert devices.choose_device(gpu, gpus, check=check, log=log) == device
    assert check.calls == int(checked)
    if device == "cpu" and checked:  # a GPU was there but is not used: say why
        assert "runtime.gpu='auto'" in log.getvalue() and answer[1] in log.getvalue()


def test_gpu_always_without_usable_cuda_fails_before_any_actor():
    check = Check((False, "torch 2.13.0+cpu there is a CPU-only build"))
    with pytest.raises(ValueError, match=r"runtime.gpu='always' is not possible.*CPU-only"):
        devices.choose_device("always", 1, check=check, log=io.StringIO())


FAKE_GPU_SCRIPT = """
import io, json, sys, time
import ray
from noisemem.studies.driver import launch
from noisemem.studies.spec import StudySpec
from noisemem.studies.tables import load

raw = json.loads(sys.argv[1])
# Ray reports a GPU (a laptop with an NVIDIA GPU, say); torch here is a build without CUDA
ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, _temp_dir=sys.argv[2])
try:
    log = io.StringIO()
    path = launch(StudySpec.from_dict(raw), log=log).wait(timeout=300)
    runs = load(path).runs
    print("AUTO", len(runs), sorted(set(runs["status"])), sorted(set(runs["device"])))
    print(log.getvalue())
    raw["runtime"] = {"gpu": "always"}
    raw["output"] += "-always"
    t0 = time.perf_counter()
    try:
        launch(StudySpec.from_dict(raw), log=log)
    except ValueError as err:
        print(f"ALWAYS {time.perf_counter() - t0:.1f} s: {err}")
finally:
    ray.shutdown()
"""


def test_gpu_auto_falls_back_to_cpu_when_torch_there_cannot_use_cuda(tmp_path):
    """The review's case: Ray counts a GPU, torch is the CPU build. ``auto`` warns and runs
    on CPU actors; ``always`` fails before any actor, naming runtime.gpu."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile

    import torch

    if torch.cuda.is_available():
        pytest.skip("torch here can use CUDA: the fallback needs a GPU torch cannot use")
    raw = {
        "name": "fake_gpu",
        "output": str(tmp_path / "store"),
        "data": {"source": "digits", "limit": 64},
        "model": {"kind": "softmax"},
        "optimizers": [{"kind": "HeavyBall", "lr": 0.1, "beta": 0.9}],
        "training": {"batch_size": 32, "permutations": 2, "chunk_size": 2},
        "record": {"steps": False},
    }
    temp = tempfile.mkdtemp(prefix="nmgpu", dir="/tmp")  # short: Ray's socket paths
    try:
        done = subprocess.run(
            [sys.executable, "-c", FAKE_GPU_SCRIPT, json.dumps(raw), temp],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled"},
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "AUTO 2 ['ok'] ['cpu']" in out, out
    assert "warning: runtime.gpu='auto': the cluster has 1 GPU(s), but torch" in out
    assert "CPU-only build" in out
    assert "ALWAYS" in out and "runtime.gpu='always' is not possible" in out, out


def test_killed_actors_are_replaced_and_their_predictions_retried(ray_local, tmp_path):
    """Every actor dies right after the start (what a lost node does): the predictions and
    the chunk each held run again on new actors and the study completes."""
    import ray

    training = {**RAW["training"], "epochs": 1, "permutations": 4}
    spec = spec_at(tmp_path / "killed", optimizers=RAW["optimizers"][:1], training=training)
    log = io.StringIO()
    handle = launch(spec, actors=2, log=log)
    for actor in list(handle.pool.actors):
        ray.kill(actor)
    tables = load(handle.wait(timeout=600))
    assert "predictions of c000-HeavyBall-lr0.1-beta0.9 lost (ActorDiedError)" in log.getvalue()
    assert len(tables.runs) == 4 and set(tables.runs["status"]) == {"ok"}
    assert not tables.runs.duplicated(["config", "permutation"]).any()
    assert set(tables.predictions["config"]) == {spec.configs[0].id}
    assert tables.manifest["complete"] is True


def test_an_actor_failing_in_init_stops_the_study_at_once(ray_local, tmp_path, monkeypatch):
    """A real actor whose __init__ raises (here: a device torch does not know): one error,
    naming the cause, and no replacement actors."""
    monkeypatch.setattr(driver, "choose_device", lambda *args, **kwargs: "nodevice")
    log = io.StringIO()
    handle = launch(spec_at(tmp_path / "initfail"), actors=1, log=log)
    with pytest.raises(driver.StudyActorError, match="nodevice"):
        handle.wait(timeout=300)
    assert "retrying" not in log.getvalue()


def test_resume_refuses_a_store_of_another_schema_version(ray_local, tmp_path, monkeypatch):
    def no_actors(*args, **kwargs):
        raise AssertionError("an actor was started")

    monkeypatch.setattr(driver.Pool, "start", no_actors)
    spec = spec_at(tmp_path / "oldschema")
    store = Store(spec.output)
    other = SCHEMA_VERSION + 1  # whatever store.py's version is, a newer one
    manifest = {"schema_version": other, "study": spec.name, "spec_digest": spec.digest}
    store.write_manifest(manifest)
    with pytest.raises(ValueError, match=rf"schema version {other}, but .* {SCHEMA_VERSION}"):
        launch(spec)
    assert store.read_manifest() == manifest  # left as it was


def test_a_version_1_store_is_resumed_without_losing_or_redoing_anything(ray_local, tmp_path):
    """A store written by noisemem before schema 2 (moments as sums and sums of squares, the
    digest of the spec as written, study.toml with the model as written), interrupted: the
    resumed study runs only the missing chunk and its tables equal an uninterrupted run's."""
    import tomllib

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tomli_w

    from noisemem.analysis.compare import merged_moments
    from noisemem.studies.schema import MOMENTS_V1

    spec = spec_at(tmp_path / "v1")
    path = launch(spec, actors=2, log=io.StringIO()).wait(timeout=600)
    before = load(path)
    store = Store(path)
    # what the schema-1 noisemem left: version-1 moments parts, its manifest and study.toml
    old_toml = {**tomllib.loads(study_toml(spec)), "model": spec.raw["model"]}
    store.write_text(tomli_w.dumps(old_toml), "study.toml")
    manifest = {**store.read_manifest(), "schema_version": 1, "spec_digest": legacy_digest(spec)}
    manifest["complete"] = False
    store.write_manifest(manifest)
    assert legacy_digest(spec) != spec.digest
    for part in store.parts("moments"):
        rows = store.read_part("moments", part).to_pylist()
        for row in rows:
            n, mean, m2 = row["count"], np.asarray(row.pop("mean")), np.asarray(row.pop("m2"))
            row["sum"], row["sum_sq"] = (n * mean).tolist(), (m2 + n * mean * mean).tolist()
        pq.write_table(pa.Table.from_pylist(rows, schema=MOMENTS_V1), part, filesystem=store.fs)
    config = spec.configs[0].id
    for table in ("runs", "steps", "corrections", "moments"):
        store.fs.delete_file(store.path(*store.part_name(table, config, 1)))
    handle = launch(spec, actors=2, log=io.StringIO())
    assert handle.progress.done == 12 - 2  # only the lost chunk runs again
    after = load(handle.wait(timeout=600))
    assert after.manifest["schema_version"] == SCHEMA_VERSION and after.manifest["complete"]
    for name in ("runs", "steps", "corrections", "predictions"):
        pd.testing.assert_frame_equal(comparable(before, name), comparable(after, name))
    keys = ["config", "probe", "step"]
    a = merged_moments(before.moments).sort_values(keys).reset_index(drop=True)
    b = merged_moments(after.moments).sort_values(keys).reset_index(drop=True)
    assert len(a) == len(b) > 0 and (a["count"] == b["count"]).all()
    for col in ("mean", "stderr"):
        x, y = np.stack(a[col]), np.stack(b[col])
        assert np.allclose(x, y, rtol=1e-9, atol=1e-12, equal_nan=True), col


def test_bad_actor_counts_and_outputs_are_refused(ray_local, tmp_path):
    with pytest.raises(ValueError, match=r"actors=-1 is not allowed"):
        launch(spec_at(tmp_path / "neg"), actors=-1)
    with pytest.raises(ValueError, match=r"actors=True is not allowed"):
        launch(spec_at(tmp_path / "bool"), actors=True)
    with pytest.raises(ValueError, match=r"output='' is not allowed"):
        location("")
    assert location("s3://bucket/study") == "s3://bucket/study"
    assert location("rel/store") == str(Path.cwd() / "rel" / "store")


def write_spec(path, **changes) -> str:
    import tomli_w

    raw = copy.deepcopy(RAW)
    raw.update(changes)
    path.write_text(tomli_w.dumps(raw))
    return str(path)


def test_cli_overrides_are_validated_and_the_output_made_absolute(tmp_path, monkeypatch, capsys):
    """--output goes through the spec's own checks: a relative path is made absolute where
    the command runs (actors resolve paths in their own working directory), a URI stays as
    it is, an empty one is refused; --gpu sets runtime.gpu without changing the digest."""
    from noisemem.cli import main

    seen: list[StudySpec] = []

    def fake_launch(spec, actors=None):
        seen.append(spec)
        raise ValueError("stop here")

    monkeypatch.setattr(driver, "launch", fake_launch)
    spec_file = write_spec(tmp_path / "s.toml", output="from/spec")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert main(["run", spec_file, "--output", "rel/store"]) == 2
    assert seen[-1].output == str(tmp_path / "cwd" / "rel" / "store")
    assert main(["run", spec_file, "--output", "s3://bucket/study", "--gpu", "always"]) == 2
    assert seen[-1].output == "s3://bucket/study" and seen[-1].runtime.gpu == "always"
    assert seen[-1].digest == StudySpec.from_toml(spec_file).digest
    assert main(["run", spec_file]) == 2 and seen[-1].output == str(tmp_path / "cwd/from/spec")
    capsys.readouterr()
    calls = len(seen)
    assert main(["run", spec_file, "--output", ""]) == 2
    assert "output=''" in capsys.readouterr().err and len(seen) == calls
    with pytest.raises(SystemExit):
        main(["run", spec_file, "--gpu", "sometimes"])
    assert "--gpu: invalid choice: 'sometimes'" in capsys.readouterr().err


def test_cli_run_reports_an_incomplete_store_and_fails(tmp_path, monkeypatch, capsys):
    """The driver's completeness check reaches the command line as an error and exit 1,
    not as an empty comparison table and exit 0."""
    from noisemem.cli import main

    class Handle:
        def wait(self):
            raise IncompleteStoreError("the store at '/x' holds 0 of the 12 ...")

    monkeypatch.setattr(driver, "launch", lambda spec, actors=None: Handle())
    assert main(["run", write_spec(tmp_path / "s.toml", output=str(tmp_path / "o"))]) == 1
    captured = capsys.readouterr()
    assert "noisemem: the store at '/x' holds 0 of the 12" in captured.err
    assert captured.out == ""


def test_cli_run_with_a_relative_output_from_another_directory(
    ray_local, tmp_path, monkeypatch, capsys
):
    """`noisemem run --output REL` in a directory other than the actors': every row lands in
    the store the command names and reads."""
    from noisemem.cli import main

    spec_file = write_spec(
        tmp_path / "s.toml",
        optimizers=RAW["optimizers"][:1],
        training={**RAW["training"], "epochs": 1, "permutations": 4},
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    argv = ["run", spec_file, "--output", "rel", "--actors", "1", "--report-dir", "reports"]
    assert main(argv) == 0
    store = tmp_path / "elsewhere" / "rel"
    assert f"store: {store}" in capsys.readouterr().out
    tables = load(str(store))
    assert len(tables.runs) == 4 and tables.manifest["complete"] is True


def test_analysis_notebook_runs_on_a_store(ray_local, tmp_path, monkeypatch):
    """Every code cell of analysis/study.ipynb, in order, against a fresh store."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    path = launch(spec_at(tmp_path / "nb"), actors=2, log=io.StringIO()).wait(timeout=600)
    monkeypatch.setenv("NOISEMEM_STORE", path)
    notebook = json.loads((Path(__file__).parents[1] / "analysis" / "study.ipynb").read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])  # a string, or a list of lines
            exec(compile(source, "study.ipynb", "exec"), namespace)
    assert len(namespace["comparison"]) == 2 * 2 * 2  # configs x probes x steps
    assert namespace["loss"].shape[1] == 2

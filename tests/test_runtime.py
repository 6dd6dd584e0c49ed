"""Studies on a local Ray cluster: scheduling-independent results, resume, early errors."""

from __future__ import annotations

import copy
import io

import pandas as pd
import pytest

from noisemem import runtime
from noisemem.runtime import launch
from noisemem.spec import SpecError, StudySpec
from noisemem.store import SCHEMAS, Store, load

TIMING = ["seconds", "worker"]

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
    import pyarrow.parquet as pq

    store = Store(path)
    for table, schema in SCHEMAS.items():
        parts = store.parts(table)
        assert parts, table
        for part in parts:
            assert pq.read_schema(part, filesystem=store.fs).remove_metadata().equals(schema), part


def test_bad_spec_fails_before_any_actor_starts(ray_local, tmp_path, monkeypatch):
    def no_actors(*args, **kwargs):
        raise AssertionError("an actor was started")

    monkeypatch.setattr(runtime.StudyHandle, "_start_actors", no_actors)
    bad = spec_at(tmp_path / "bad", training={**RAW["training"], "batch_size": 500})
    with pytest.raises(SpecError, match=r"training.batch_size=500"):
        launch(bad)


def test_another_study_in_the_same_output_is_refused(ray_local, tmp_path):
    launch(spec_at(tmp_path / "same"), actors=1, log=io.StringIO()).wait(timeout=600)
    other = spec_at(tmp_path / "same", seed=1)
    with pytest.raises(ValueError, match="holds a different study"):
        launch(other)


def test_failed_chunks_run_again_on_resume_and_uris_work(ray_local, tmp_path):
    from noisemem import study

    spec = spec_at(f"file://{tmp_path / 'uri'}")
    path = launch(spec, actors=2, log=io.StringIO()).wait(timeout=600)
    store = Store(path)
    config = spec.configs[0]
    store.write_part("runs", config.id, 0, study.failed_chunk_rows(spec, config, 0, "boom", "w"))
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

    monkeypatch.setattr(runtime.StudyHandle, "_start_actors", no_actors)
    bad = spec_at(
        tmp_path / "badmodel", model={"kind": "torch.nn:Linear", "kwargs": {"bias": True}}
    )
    with pytest.raises(SpecError, match=r"model.kwargs=\{'bias': True\} do not fit"):
        launch(bad)
    cnn = spec_at(tmp_path / "badcnn", model={"kind": "cnn", "kwargs": {"channels": 0}})
    with pytest.raises(SpecError, match=r"model.kwargs.channels=0"):
        launch(cnn)


class FakeRef:
    def __init__(self, item, outcome):
        self.item, self.outcome = item, outcome


class FakeActor:
    """Records the chunks it is asked for; outcomes come from a shared script."""

    def __init__(self, script):
        self.script = script

        class Method:
            def __init__(self, fn):
                self.remote = fn

        self.run_chunk = Method(lambda ci, chunk: FakeRef((ci, chunk), self.script.pop(0)))
        self.predictions = Method(lambda ci: FakeRef(None, {"status": "ok"}))


def test_driver_retries_a_chunk_whose_task_raised_and_keeps_the_actor(monkeypatch, tmp_path):
    """A store write failing (a RayTaskError) or an actor dying is retried, the healthy actor
    goes back to the pool, and a dead one is replaced; beyond MAX_RETRIES the error surfaces."""
    import threading

    import ray

    ok = {"status": "ok"}
    task_error = ray.exceptions.RayTaskError("run_chunk", "OSError: disk hiccup", OSError("x"))
    script = [task_error, ok, ok]

    def fake_get(ref):
        if isinstance(ref, list):
            return [fake_get(r) for r in ref]
        if isinstance(ref.outcome, Exception):
            raise ref.outcome
        return ref.outcome

    monkeypatch.setattr(runtime.ray, "wait", lambda refs, num_returns: (refs[:1], refs[1:]))
    monkeypatch.setattr(runtime.ray, "get", fake_get)
    monkeypatch.setattr(runtime.ray, "kill", lambda actor: None)
    handle = object.__new__(runtime.StudyHandle)
    handle.spec = spec_at(tmp_path / "fake")
    handle.store = Store(str(tmp_path / "fake"))
    handle.store.write_manifest({"schema_version": 1})
    handle.log = io.StringIO()
    handle._error = None
    handle._done = threading.Event()
    handle._todo = [(0, 0), (0, 1)]
    handle._per_chunk = {0: 2, 1: 2}
    handle.progress = runtime.Progress(total=4)
    handle._actors = [FakeActor(script)]
    handle._drive()
    assert handle._error is None and handle.progress.done == 4
    assert "retrying" in handle.log.getvalue()

    script[:] = [task_error] * (runtime.MAX_RETRIES + 1)
    handle._done.clear()
    handle._todo = [(0, 0)]
    handle.progress = runtime.Progress(total=2)
    handle._drive()
    assert isinstance(handle._error, ray.exceptions.RayTaskError)


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

"""Studies on Ray: a pool of actors, the driver's bookkeeping, ``launch`` and its handle.

The work itself lives in :mod:`noisemem.study` (no Ray there); :class:`StudyWorker` is the
thin remote shell: it holds the data once (passed by reference from ``ray.put``), builds its
:class:`~noisemem.study.Context` on its device (a GPU when the cluster has them, else CPU,
with torch threads = its CPUs) and writes one Parquet part per chunk. The driver splits each
config's permutations into chunks, skips chunks the store already holds (resume), keeps every
actor busy with one chunk at a time, and reports progress (permutations done, rate, ETA).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import ray
import tomli_w
import torch

from noisemem import study
from noisemem.data import prepare
from noisemem.spec import SpecError, StudySpec
from noisemem.store import SCHEMA_VERSION, Store
from noisemem.system import keep_freed_memory


class StudyWorker:
    """One actor's state: the study context, built once, and the chunk loop."""

    def __init__(self, spec: StudySpec, data: tuple[Any, Any, Any], device: str, cpus: int):
        keep_freed_memory()
        torch.set_num_threads(cpus)
        x, y, info = data
        self.device = device
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.ctx = study.Context.build(spec, x, y, info, device)
        self.store = Store(spec.output)

    def run_chunk(self, config_index: int, chunk: int) -> dict[str, Any]:
        spec = self.ctx.spec
        config = spec.configs[config_index]
        t0 = time.perf_counter()
        try:
            tables = study.run_chunk(self.ctx, config, chunk, worker=self.name)
        except Exception:  # recorded in the store as failed, never silently dropped
            error = traceback.format_exc(limit=8)
            rows = study.failed_chunk_rows(spec, config, chunk, error, self.name)
            self.store.write_part("runs", config.id, chunk, rows)
            return {"config": config.id, "chunk": chunk, "status": "failed", "error": error}
        for table in ("steps", "corrections", "moments", "runs"):  # runs last: the marker
            self.store.write_part(table, config.id, chunk, tables[table])
        return {
            "config": config.id,
            "chunk": chunk,
            "status": "ok",
            "permutations": len(tables["runs"]),
            "seconds": time.perf_counter() - t0,
        }

    def predictions(self, config_index: int) -> str:
        config = self.ctx.spec.configs[config_index]
        self.store.write_part("predictions", config.id, None, study.predictions(self.ctx, config))
        return config.id


RemoteWorker = ray.remote(StudyWorker)
#: how often a chunk whose actor died is tried again on another actor
MAX_RETRIES = 2


def check_model(spec: StudySpec, info: Any) -> None:
    """Build the spec's model once on the CPU, so that a bad model fails before any actor."""
    try:
        study.spec_model(spec, info)
    except TypeError as err:
        raise SpecError(
            f"model.kwargs={dict(spec.model.kwargs)!r} do not fit model.kind="
            f"{spec.model.kind!r}: {err}"
        ) from err
    except ValueError as err:
        raise SpecError(str(err)) from err


def _cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


@dataclass
class Progress:
    total: int
    done: int = 0
    failed_chunks: int = 0
    started: float = field(default_factory=time.perf_counter)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = f"{eta:.0f} s" if eta != float("inf") else "?"
        return (
            f"[noisemem] permutations {self.done}/{self.total} "
            f"({rate:.2f}/s, ETA {eta_s}, failed chunks {self.failed_chunks})"
        )


class StudyHandle:
    """A running (or finished) study: ``status()``, ``wait()``, and where its store is."""

    def __init__(self, spec: StudySpec, actors: int | None = None, log: Any = None) -> None:
        self.spec = spec
        self.path = spec.output
        self.store = Store(spec.output)
        self.log = log or sys.stdout
        self._error: BaseException | None = None
        self._done = threading.Event()
        x, y, info = prepare(
            spec.data.source,
            limit=spec.data.limit,
            normalize=spec.data.normalize,
            label_column=spec.data.label_column,
            split=spec.data.split,
            seed=spec.seed,
        )
        spec.check_data_size(info.num_samples)  # before any actor starts
        check_model(spec, info)
        self.info = info
        self._write_header()
        todo = [
            (ci, chunk)
            for ci, config in enumerate(spec.configs)
            for chunk in range(spec.num_chunks)
            if not self.store.chunk_done(config.id, chunk)
        ]
        per_chunk = {chunk: len(spec.chunk_indices(chunk)) for chunk in range(spec.num_chunks)}
        total = len(spec.configs) * spec.training.permutations
        skipped = total - sum(per_chunk[c] for _, c in todo)
        self.progress = Progress(total=total, done=skipped)
        self._todo = todo
        self._per_chunk = per_chunk
        self._actors = self._start_actors((x, y, info), actors, len(todo))
        self._thread = threading.Thread(target=self._drive, daemon=True)
        self._thread.start()

    def _write_header(self) -> None:
        manifest = self.store.read_manifest()
        if manifest is not None and manifest.get("spec_digest") != self.spec.digest:
            raise ValueError(
                f"output={self.spec.output!r} holds a different study "
                f"(digest {manifest.get('spec_digest')} != {self.spec.digest}); "
                "choose another output directory"
            )
        self.store.write_text(tomli_w.dumps(_toml_safe(self.spec.to_toml_dict())), "study.toml")
        self.store.write_manifest(
            {
                "schema_version": SCHEMA_VERSION,
                "study": self.spec.name,
                "spec_digest": self.spec.digest,
                "data": self.info.as_dict(),
                "batch_split": "consecutive: batch i = samples [i b, (i+1) b), last partial "
                "batch dropped",
                "configs": [{"id": c.id, **c.hyperparameters} for c in self.spec.configs],
                "chunks": self.spec.num_chunks,
                "permutations": self.spec.training.permutations,
                "complete": False,
            }
        )

    def _start_actors(self, data: tuple[Any, Any, Any], actors: int | None, work: int) -> list[Any]:
        """The pool. ``gpu="auto"`` looks at the GPUs the cluster has now (an autoscaling
        cluster whose GPU workers are at zero gets CPU actors: use ``gpu="always"``)."""
        rt = self.spec.runtime
        use_gpu = rt.gpu == "always" or (rt.gpu == "auto" and _cluster_gpus() >= 1)
        if actors is None:
            actors = rt.actors
        if actors == 0:
            pool = _cluster_gpus() if use_gpu else ray.cluster_resources().get("CPU", 1)
            actors = max(1, int(pool // (1 if use_gpu else rt.cpus_per_actor)))
        actors = max(1, min(actors, work)) if work else 1
        self._data_ref = ray.put(data)
        self._options = {"num_cpus": rt.cpus_per_actor, "num_gpus": 1 if use_gpu else 0}
        self._device = "cuda" if use_gpu else "cpu"
        return [self._new_actor() for _ in range(actors)]

    def _new_actor(self) -> Any:
        rt = self.spec.runtime
        return RemoteWorker.options(**self._options).remote(
            self.spec, self._data_ref, self._device, rt.cpus_per_actor
        )

    def _drive(self) -> None:
        try:
            pending: dict[Any, tuple[Any, tuple[int, int]]] = {}
            todo = list(self._todo)
            idle = list(self._actors)
            # predictions first, one per config, spread over the actors
            pred = [
                self._actors[i % len(self._actors)].predictions.remote(i)
                for i in range(len(self.spec.configs))
            ]
            retries: dict[tuple[int, int], int] = {}
            while todo or pending:
                while idle and todo:
                    actor = idle.pop()
                    item = todo.pop(0)
                    pending[actor.run_chunk.remote(*item)] = (actor, item)
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    actor, item = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as err:
                        # run_chunk records its own failures; this is the actor dying or
                        # a store write failing: try the chunk again, a bounded number of times
                        retries[item] = retries.get(item, 0) + 1
                        if retries[item] > MAX_RETRIES:
                            raise
                        print(
                            f"[noisemem] chunk {item} lost ({type(err).__name__}); retrying",
                            file=self.log,
                            flush=True,
                        )
                        if isinstance(err, ray.exceptions.RayActorError):
                            self._actors.remove(actor)
                            actor = self._new_actor()
                            self._actors.append(actor)
                        idle.append(actor)
                        todo.append(item)
                        continue
                    idle.append(actor)
                    if result["status"] == "ok":
                        self.progress.done += self._per_chunk[item[1]]
                    else:
                        self.progress.failed_chunks += 1
                        print(f"[noisemem] chunk failed: {result['error']}", file=self.log)
                    print(self.progress.line(), file=self.log, flush=True)
            ray.get(pred)
            manifest = self.store.read_manifest() or {}
            manifest["complete"] = self.progress.failed_chunks == 0
            self.store.write_manifest(manifest)
        except BaseException as err:  # surfaced by wait()
            self._error = err
        finally:
            for actor in self._actors:
                ray.kill(actor)
            self._done.set()

    def status(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "permutations_done": self.progress.done,
            "permutations_total": self.progress.total,
            "failed_chunks": self.progress.failed_chunks,
            "finished": self._done.is_set(),
            "progress": self.progress.line(),
        }

    def wait(self, timeout: float | None = None) -> str:
        """Block until the study finishes; returns the store path. Raises the driver's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"study {self.spec.name!r} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self.path


def _toml_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_toml_safe(v) for v in value]
    return value


def launch(spec: StudySpec | str, *, actors: int | None = None, log: Any = None) -> StudyHandle:
    """Start a study on the current Ray cluster (a local one is started if none is running).

    ``spec`` is a :class:`StudySpec` or a path to its TOML file. Returns at once; the handle's
    ``wait()`` blocks until every chunk is written.
    """
    if not isinstance(spec, StudySpec):
        spec = StudySpec.from_toml(spec)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    return StudyHandle(spec, actors=actors, log=log)

"""Studies on Ray: a pool of actors, the driver's bookkeeping, ``launch`` and its handle.

The work itself lives in :mod:`noisemem.study` (no Ray there); :class:`StudyWorker` is the
thin remote shell: it holds the data once (passed by reference from ``ray.put``), builds its
:class:`~noisemem.study.Context` on its device (a GPU when the spec asks for one and torch can
use CUDA there, else CPU, with torch threads = its CPUs) and writes one Parquet part per
chunk. The driver splits each config's permutations into chunks, skips chunks the store
already holds (resume), keeps every actor busy with one work item at a time (a config's
predictions or a chunk), retries items whose actor died, and reports progress (permutations
done, rate, ETA). At the end it checks that the store it reads holds every expected row: the
actors write the store themselves, so on a multi-node cluster ``output`` must be storage that
every node shares (a shared filesystem path or a URI such as ``s3://bucket/study``).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import tomli_w
import torch

from noisemem import store as store_module
from noisemem import study
from noisemem.data import prepare
from noisemem.spec import SpecError, StudySpec, absolute_output
from noisemem.store import Store
from noisemem.system import keep_freed_memory

#: a work item: (config index, chunk); chunk None is the config's predictions
Item = tuple[int, int | None]


def cuda_report() -> tuple[bool, str]:
    """Whether torch in this process can compute on a CUDA device, and what it found.

    Run where the GPU is (a Ray task holding one): the driver's node may have no GPU, and a
    GPU node may carry a CPU-only torch (``torch==2.13.0`` as the README pins it)."""
    version = torch.__version__
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return False, f"torch {version} there is a CPU-only build (not compiled with CUDA)"
        return False, f"torch {version} (CUDA {torch.version.cuda}) there finds no usable GPU"
    try:
        torch.ones(2, device="cuda").sum().item()
    except Exception as err:  # e.g. no kernel image for this GPU, driver too old
        return False, f"torch {version} there cannot compute on the GPU: {err}"
    return True, f"torch {version} on {torch.cuda.get_device_name()}"


class StudyWorker:
    """One actor's state: the study context, built once, and the work loop."""

    def __init__(self, spec: StudySpec, data: tuple[Any, Any, Any], device: str, cpus: int):
        keep_freed_memory()
        torch.set_num_threads(cpus)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        if device == "cuda":
            usable, found = cuda_report()
            if not usable:  # raised in __init__: the driver stops instead of retrying
                raise RuntimeError(
                    f"runtime.gpu={spec.runtime.gpu!r}: actor {self.name} holds a GPU but "
                    f"{found}; install a CUDA build of torch on the GPU nodes, or set "
                    "runtime.gpu = 'never'"
                )
        x, y, info = data
        self.device = device
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
#: how often a work item whose actor died (or whose store write failed) is tried again
MAX_RETRIES = 2
#: how long the driver waits for the CUDA check on a GPU node (a worker start and
#: ``import torch``: seconds normally); without an answer, ``gpu="auto"`` runs on CPUs
CUDA_CHECK_TIMEOUT_S = 120.0


class StudyActorError(RuntimeError):
    """A study actor failed in its ``__init__``: deterministic, so it is not retried."""


class IncompleteStoreError(RuntimeError):
    """Every work item reported success, but the store the driver reads lacks rows."""


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


def check_actors(actors: Any) -> None:
    """``actors`` overrides ``runtime.actors``: None, or an integer >= 0 (0: one per CPU/GPU)."""
    if actors is None:
        return
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 0:
        raise ValueError(
            f"actors={actors!r} is not allowed; give an integer >= 0 (0: one per available "
            "CPU or GPU) or None (use the spec's runtime.actors)"
        )


def _cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def _cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))


def _remote_cuda_check(timeout: float = CUDA_CHECK_TIMEOUT_S) -> tuple[bool | None, str]:
    """:func:`cuda_report` in a Ray task that holds one GPU; (None, why) without an answer."""
    task = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(cuda_report)
    ref = task.remote()
    ready, _ = ray.wait([ref], timeout=timeout)
    if not ready:
        ray.cancel(ref, force=True)
        return None, f"no answer from a GPU node within {timeout:.0f} s"
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:
        return False, f"the check failed on the GPU node: {err}"


def choose_device(
    gpu: str,
    cluster_gpus: float,
    check: Callable[[], tuple[bool | None, str]] = _remote_cuda_check,
    log: Any = None,
) -> str:
    """``"cuda"`` or ``"cpu"`` for the study actors, from ``runtime.gpu``.

    ``never``: CPU. ``auto``: CUDA when the cluster has a GPU now and ``check()`` (a task on a
    GPU node) says torch there can use it; else CPU, with a warning when a GPU was there but
    unusable. ``always``: CUDA; a ValueError when the check says CUDA is unusable. With no GPU
    in the cluster yet (workers autoscaling from zero) ``always`` skips the check; each actor
    checks CUDA when it starts and fails without retries when it cannot use it."""
    log = log or sys.stdout
    if gpu == "never" or (gpu == "auto" and cluster_gpus < 1):
        return "cpu"
    if cluster_gpus < 1:
        return "cuda"
    usable, found = check()
    if usable:
        return "cuda"
    if gpu == "always":
        if usable is None:  # busy or slow GPU nodes: the actors check for themselves
            print(
                f"[noisemem] runtime.gpu='always': {found}; starting GPU actors",
                file=log,
                flush=True,
            )
            return "cuda"
        raise ValueError(
            f"runtime.gpu='always' is not possible on this cluster: it has "
            f"{cluster_gpus:g} GPU(s), but {found}; install a CUDA build of torch on the "
            "GPU nodes, or set runtime.gpu to 'auto' or 'never'"
        )
    print(
        f"[noisemem] warning: runtime.gpu='auto': the cluster has {cluster_gpus:g} GPU(s), "
        f"but {found}; the study runs on CPU actors",
        file=log,
        flush=True,
    )
    return "cpu"


def _init_failed(err: BaseException) -> bool:
    """True for an actor that raised in ``__init__`` (not one that died or was killed)."""
    if not isinstance(err, ray.exceptions.RayActorError):
        return False
    flag = getattr(err, "actor_init_failed", None)
    if flag is not None:
        return bool(flag)
    return "raised in its creation task" in str(err)  # Ray versions without the flag


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
        check_actors(actors)
        output = absolute_output(spec.output)
        if output != spec.output:
            spec = dataclasses.replace(spec, output=output)
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
        self._check_store()
        device = self._choose_device()
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
        self._actors = self._start_actors((x, y, info), actors, len(todo), device)
        self._thread = threading.Thread(target=self._drive, daemon=True)
        self._thread.start()

    def _check_store(self) -> None:
        """Refuse to resume into a store this noisemem cannot read, or of another study.

        A store of an older schema version it reads is resumed: its parts are converted
        one by one when read (:func:`noisemem.store.load`) and the manifest is rewritten at
        the current version, so nothing computed before is lost or computed again. Its
        digest may be of the older scheme; the stored ``study.toml`` then decides
        (:meth:`StudySpec.same_study`)."""
        manifest = self.store.read_manifest()
        if manifest is None:
            return
        readable = store_module.READABLE_SCHEMA_VERSIONS
        version = manifest.get("schema_version")
        if version not in readable:
            raise ValueError(
                f"output={self.spec.output!r} holds a store of schema version {version!r}, "
                f"but this noisemem reads schema versions {readable} and writes "
                f"{store_module.SCHEMA_VERSION}: choose another output directory (or finish "
                "that study with the noisemem that started it)"
            )
        stored_toml = None
        if self.store.exists("study.toml"):
            stored_toml = self.store.read_text("study.toml")
        if not self.spec.same_study(manifest.get("spec_digest"), stored_toml):
            raise ValueError(
                f"output={self.spec.output!r} holds a different study "
                f"(digest {manifest.get('spec_digest')} != {self.spec.digest}); "
                "choose another output directory"
            )

    def _write_header(self) -> None:
        self.store.write_text(tomli_w.dumps(_toml_safe(self.spec.to_toml_dict())), "study.toml")
        self.store.write_manifest(
            {
                "schema_version": store_module.SCHEMA_VERSION,
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

    def _choose_device(self) -> str:
        gpus = _cluster_gpus()
        return choose_device(self.spec.runtime.gpu, gpus, check=_remote_cuda_check, log=self.log)

    def _start_actors(
        self, data: tuple[Any, Any, Any], actors: int | None, work: int, device: str
    ) -> list[Any]:
        """The pool: ``actors`` (else ``runtime.actors``; 0: one per GPU or per
        ``cpus_per_actor`` CPUs the cluster has now), at most one per work item."""
        rt = self.spec.runtime
        use_gpu = device == "cuda"
        if actors is None:
            actors = rt.actors
        if actors == 0:
            pool = _cluster_gpus() if use_gpu else _cluster_cpus()
            actors = int(pool // (1 if use_gpu else rt.cpus_per_actor))
            if actors < 1:
                kind = "GPUs" if use_gpu else f"{rt.cpus_per_actor} free CPU(s)"
                print(
                    f"[noisemem] warning: runtime.actors=0 and the cluster has no {kind} now "
                    "(workers autoscaling from zero?): starting 1 actor; set runtime.actors "
                    "or --actors to the number the cluster can grow to",
                    file=self.log,
                    flush=True,
                )
                actors = 1
        actors = max(1, min(actors, work + len(self.spec.configs)))
        self._data_ref = ray.put(data)
        self._options = {"num_cpus": rt.cpus_per_actor, "num_gpus": 1 if use_gpu else 0}
        self._device = device
        return [self._new_actor() for _ in range(actors)]

    def _new_actor(self) -> Any:
        rt = self.spec.runtime
        return RemoteWorker.options(**self._options).remote(
            self.spec, self._data_ref, self._device, rt.cpus_per_actor
        )

    def _drive(self) -> None:
        try:
            pending: dict[Any, tuple[Any, Item]] = {}
            # predictions first, one item per config, then the chunks; both retried alike
            todo: list[Item] = [(ci, None) for ci in range(len(self.spec.configs))]
            todo += list(self._todo)
            idle = list(self._actors)
            retries: dict[Item, int] = {}
            while todo or pending:
                while idle and todo:
                    actor = idle.pop()
                    item = todo.pop(0)
                    pending[self._submit(actor, item)] = (actor, item)
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    actor, item = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as err:
                        if _init_failed(err):
                            raise StudyActorError(
                                f"a study actor failed while starting (an error in its "
                                f"__init__, the same on every try: not retried): {err}"
                            ) from err
                        # run_chunk records its own failures; this is the actor dying or
                        # a store write failing: try the item again, a bounded number of times
                        retries[item] = retries.get(item, 0) + 1
                        if retries[item] > MAX_RETRIES:
                            raise
                        print(
                            f"[noisemem] {self._describe(item)} lost ({type(err).__name__}); "
                            "retrying",
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
                    chunk = item[1]
                    if chunk is None:
                        continue
                    if result["status"] == "ok":
                        self.progress.done += self._per_chunk[chunk]
                    else:
                        self.progress.failed_chunks += 1
                        print(f"[noisemem] chunk failed: {result['error']}", file=self.log)
                    print(self.progress.line(), file=self.log, flush=True)
            self._check_complete()
            manifest = self.store.read_manifest() or {}
            manifest["complete"] = self.progress.failed_chunks == 0
            self.store.write_manifest(manifest)
        except BaseException as err:  # surfaced by wait()
            self._error = err
        finally:
            for actor in self._actors:
                ray.kill(actor)
            self._done.set()

    def _submit(self, actor: Any, item: Item) -> Any:
        config_index, chunk = item
        if chunk is None:
            return actor.predictions.remote(config_index)
        return actor.run_chunk.remote(config_index, chunk)

    def _describe(self, item: Item) -> str:
        config_index, chunk = item
        config = self.spec.configs[config_index].id
        return f"predictions of {config}" if chunk is None else f"chunk {chunk} of {config}"

    def _check_complete(self) -> None:
        """Every (config, permutation) has its ``runs`` row and every config its predictions,
        as this driver reads the store; else the actors wrote where the driver cannot see."""
        spec = self.spec
        expected = {(c.id, p) for c in spec.configs for p in range(spec.training.permutations)}
        runs = self.store.read("runs")
        found = expected & set(zip(runs["config"], runs["permutation"], strict=True))
        predicted = [
            c.id
            for c in spec.configs
            if self.store.exists(*self.store.part_name("predictions", c.id, None))
        ]
        if len(found) == len(expected) and len(predicted) == len(spec.configs):
            return
        raise IncompleteStoreError(
            f"the store at {self.path!r} holds {len(found)} of the {len(expected)} expected "
            f"runs rows ({len(spec.configs)} configs x {spec.training.permutations} "
            f"permutations) and the predictions of {len(predicted)} of {len(spec.configs)} "
            "configs, although every actor reported its work written: the actors wrote "
            "somewhere this driver cannot read. On a multi-node cluster, output must be "
            "storage every node shares: a shared filesystem path mounted at the same place "
            "on every node, or a URI such as s3://bucket/study (set output in the spec, or "
            "--output)"
        )

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

    ``spec`` is a :class:`StudySpec` or a path to its TOML file; ``actors`` overrides
    ``runtime.actors``. Returns at once; the handle's ``wait()`` blocks until every chunk is
    written and raises if the store lacks any expected row. On a multi-node cluster the
    spec's ``output`` must be storage every node shares (a shared filesystem or a URI).
    """
    check_actors(actors)
    if not isinstance(spec, StudySpec):
        spec = StudySpec.from_toml(spec)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    return StudyHandle(spec, actors=actors, log=log)

"""Studies on Ray: the driver plans the work, keeps a pool of actors busy, and reports.

:func:`launch` checks everything it can before any actor starts (the spec, the data, the
model, the store: :meth:`~noisemem.studies.store.Store.check_resumable`), chooses the device
(:mod:`noisemem.studies.devices`), writes the store's header, plans the work items that the
store does not hold yet (:mod:`noisemem.studies.plan`: resume) and starts a :class:`Pool` of
study actors (:mod:`noisemem.studies.worker`). The returned :class:`StudyHandle` hands out
one work item per idle actor, retries items whose actor died (on a new actor) or whose store
write failed (on the same one), reports progress (permutations done, rate, ETA), and at the
end asks the store whether it holds every expected row: the actors write the store
themselves, so on a multi-node cluster ``output`` must be storage that every node shares (a
shared filesystem path or a URI such as ``s3://bucket/study``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from noisemem.studies.data import prepare
from noisemem.studies.devices import choose_device, cuda_report
from noisemem.studies.models import check_model
from noisemem.studies.plan import Chunks, Item, work
from noisemem.studies.spec import StudySpec
from noisemem.studies.store import Store, check_complete, check_resumable, open_for
from noisemem.studies.worker import RemoteWorker

#: how often a work item whose actor died (or whose store write failed) is tried again
MAX_RETRIES = 2
#: how long the driver waits for the CUDA check on a GPU node (a worker start and
#: ``import torch``: seconds normally); without an answer, ``gpu="auto"`` runs on CPUs
CUDA_CHECK_TIMEOUT_S = 120.0


class StudyActorError(RuntimeError):
    """A study actor failed in its ``__init__``: deterministic, so it is not retried."""


def check_actors(actors: Any) -> None:
    """``actors`` overrides ``runtime.actors``: None, or an integer >= 0 (0: one per CPU/GPU)."""
    if actors is None:
        return
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 0:
        raise ValueError(
            f"actors={actors!r} is not allowed; give an integer >= 0 (0: one per available "
            "CPU or GPU) or None (use the spec's runtime.actors)"
        )


def _cluster(resource: str) -> float:
    return float(ray.cluster_resources().get(resource, 0.0))


def remote_cuda_check(timeout: float = CUDA_CHECK_TIMEOUT_S) -> tuple[bool | None, str]:
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


def ship_user_code(spec: StudySpec) -> list[str]:
    """Send the user's own optimizer modules to the actors by value.

    An optimizer of ``kind = "package.module:Class"`` travels to the actors inside the spec,
    pickled by reference: an actor imports its module by name, which a worker (another
    node, another working directory) often cannot. A module that is the user's own file, not
    an installed package (nor the standard library, nor noisemem), is therefore registered
    with Ray's cloudpickle to travel by value. Returns the modules so registered."""
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    shipped = []
    for config in spec.configs:
        module = sys.modules.get(type(config.optimizer).__module__)
        path = getattr(module, "__file__", None)
        if module is None or path is None or module.__name__.split(".")[0] == "noisemem":
            continue
        if any(os.path.abspath(path).startswith(os.path.abspath(p) + os.sep) for p in installed):
            continue
        ray.cloudpickle.register_pickle_by_value(module)
        shipped.append(module.__name__)
    return sorted(set(shipped))


def _init_failed(err: BaseException) -> bool:
    """True for an actor that raised in ``__init__`` (not one that died or was killed)."""
    if not isinstance(err, ray.exceptions.RayActorError):
        return False
    flag = getattr(err, "actor_init_failed", None)
    if flag is not None:
        return bool(flag)
    return "raised in its creation task" in str(err)  # Ray versions without the flag


class Pool:
    """The study actors: the ones running, and how to start another (``factory``)."""

    def __init__(self, actors: list[Any], factory: Callable[[], Any]) -> None:
        self.actors = actors
        self.factory = factory

    @classmethod
    def start(
        cls,
        spec: StudySpec,
        data: tuple[Any, Any, Any],
        device: str,
        actors: int | None,
        work_items: int,
        log: Any,
    ) -> Pool:
        """``actors`` (else ``runtime.actors``; 0: one per GPU or per ``cpus_per_actor``
        CPUs the cluster has now), at most one per work item."""
        rt = spec.runtime
        use_gpu = device == "cuda"
        count = rt.actors if actors is None else actors
        if count == 0:
            per = 1 if use_gpu else rt.cpus_per_actor
            count = int(_cluster("GPU" if use_gpu else "CPU") // per)
            if count < 1:
                kind = "GPUs" if use_gpu else f"{rt.cpus_per_actor} free CPU(s)"
                print(
                    f"[noisemem] warning: runtime.actors=0 and the cluster has no {kind} now "
                    "(workers autoscaling from zero?): starting 1 actor; set runtime.actors "
                    "or --actors to the number the cluster can grow to",
                    file=log,
                    flush=True,
                )
                count = 1
        count = max(1, min(count, work_items))
        data_ref = ray.put(data)
        options = {"num_cpus": rt.cpus_per_actor, "num_gpus": 1 if use_gpu else 0}

        def factory() -> Any:
            return RemoteWorker.options(**options).remote(spec, data_ref, device, rt.cpus_per_actor)

        return cls([factory() for _ in range(count)], factory)

    def replace(self, actor: Any) -> Any:
        """A new actor in place of ``actor``, which died."""
        self.actors.remove(actor)
        self.actors.append(self.factory())
        return self.actors[-1]

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


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

    def __init__(
        self,
        spec: StudySpec,
        store: Store,
        pool: Pool,
        items: list[Item],
        progress: Progress,
        log: Any,
    ) -> None:
        self.spec = spec
        self.store = store
        self.path = store.uri
        self.pool = pool
        self.items = items
        self.progress = progress
        self.log = log
        self._chunks = Chunks.of(spec)
        self._error: BaseException | None = None
        self._done = threading.Event()

    def start(self) -> StudyHandle:
        threading.Thread(target=self.run, daemon=True).start()
        return self

    def run(self) -> None:
        """Hand out every item, retry the lost ones, then check the store (errors are
        kept for :meth:`wait`)."""
        try:
            self._schedule()
            done = self.store.done_chunks([c.id for c in self.spec.configs], self._chunks.count)
            check_complete(self.store, self.spec, done)
            manifest = self.store.read_manifest() or {}
            self.store.write_manifest({**manifest, "complete": self.progress.failed_chunks == 0})
        except BaseException as err:  # surfaced by wait()
            self._error = err
        finally:
            self.pool.kill()
            self._done.set()

    def _schedule(self) -> None:
        todo = list(self.items)
        idle = list(self.pool.actors)
        pending: dict[Any, tuple[Any, Item]] = {}
        retries: dict[Item, int] = {}
        while todo or pending:
            while idle and todo:
                actor, item = idle.pop(), todo.pop(0)
                pending[self._submit(actor, item)] = (actor, item)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                actor, item = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as err:
                    retries[item] = retries.get(item, 0) + 1
                    idle.append(self._lost(actor, item, err, retries[item]))
                    todo.append(item)
                    continue
                idle.append(actor)
                if item.chunk is not None:
                    self._report(item.chunk, result)

    def _lost(self, actor: Any, item: Item, err: BaseException, tries: int) -> Any:
        """The actor to use next after ``item`` was lost on ``actor``; raises when the loss
        is deterministic (an actor failing in ``__init__``) or the retries are spent.

        ``run_chunk`` records its own failures; this is the actor dying or a store write
        failing: the item runs again, a bounded number of times."""
        if _init_failed(err):
            raise StudyActorError(
                f"a study actor failed while starting (an error in its __init__, the same on "
                f"every try: not retried): {err}"
            ) from err
        if tries > MAX_RETRIES:
            raise err
        print(
            f"[noisemem] {self._describe(item)} lost ({type(err).__name__}); retrying",
            file=self.log,
            flush=True,
        )
        if isinstance(err, ray.exceptions.RayActorError):
            return self.pool.replace(actor)
        return actor

    def _report(self, chunk: int, result: dict[str, Any]) -> None:
        if result["status"] == "ok":
            self.progress.done += len(self._chunks.indices(chunk))
        else:
            self.progress.failed_chunks += 1
            print(f"[noisemem] chunk failed: {result['error']}", file=self.log)
        print(self.progress.line(), file=self.log, flush=True)

    def _submit(self, actor: Any, item: Item) -> Any:
        if item.chunk is None:
            return actor.predictions.remote(item.config)
        return actor.run_chunk.remote(item.config, item.chunk)

    def _describe(self, item: Item) -> str:
        config = self.spec.configs[item.config].id
        return (
            f"predictions of {config}" if item.chunk is None else f"chunk {item.chunk} of {config}"
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


def load_data(spec: StudySpec) -> tuple[Any, Any, Any]:
    """The spec's data, checked against the spec and the model (before any actor starts)."""
    x, y, info = prepare(
        spec.data.source,
        limit=spec.data.limit,
        normalize=spec.data.normalize,
        label_column=spec.data.label_column,
        split=spec.data.split,
        seed=spec.seed[0],  # mnist1d is generated from it; the same data for every seed
    )
    spec.check_data_size(info.num_samples)
    check_model(spec, info)
    return x, y, info


def start(spec: StudySpec, actors: int | None = None, log: Any = None) -> StudyHandle:
    """Check, plan and start ``spec`` on the connected Ray cluster (see :func:`launch`)."""
    check_actors(actors)
    log = log or sys.stdout
    store = Store(spec.output)
    if store.uri != spec.output:  # a spec made by dataclasses.replace with a relative path
        spec = dataclasses.replace(spec, output=store.uri)
    data = load_data(spec)
    chunks = Chunks.of(spec)
    check_resumable(store, spec, store.read_manifest())  # before the device check, which is slow
    device = choose_device(spec.runtime.gpu, _cluster("GPU"), check=remote_cuda_check, log=log)
    open_for(store, spec, data[2].as_dict(), chunks.count)
    done = store.done_chunks([c.id for c in spec.configs], chunks.count)
    items = work(spec, lambda config, chunk: (config, chunk) in done)
    chunk_items = [i for i in items if i.chunk is not None]
    total = len(spec.configs) * spec.training.permutations
    done = total - sum(len(chunks.indices(i.chunk)) for i in chunk_items)  # type: ignore[arg-type]
    ship_user_code(spec)
    pool = Pool.start(spec, data, device, actors, len(items), log)
    return StudyHandle(spec, store, pool, items, Progress(total=total, done=done), log).start()


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
    return start(spec, actors=actors, log=log)

"""Studies on Ray: the driver plans the work, keeps a pool of actors busy, and reports.

:func:`launch` first checks everything it can without Ray (:mod:`noisemem.studies.prepare`:
the output, the store's identity, the data, the model), then chooses the device
(:mod:`noisemem.studies.devices`), refuses requests no node can meet, claims the store
(:func:`~noisemem.studies.store.open_for`: an exclusively created manifest) and its lock (a
second driver of the same study waits for the first), plans the work items the store does
not hold yet (:mod:`noisemem.studies.plan`: resume) and starts a :class:`Pool` of study
actors (:mod:`noisemem.studies.worker`). The returned :class:`StudyHandle` hands out one
work item per idle actor, retries items whose actor died (on a new actor) or whose store
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

from noisemem.studies.devices import choose_device, cuda_report
from noisemem.studies.plan import Chunks, Item, work
from noisemem.studies.prepare import Prepared, check_actors, prepare_study
from noisemem.studies.spec import StudySpec
from noisemem.studies.store import Store, check_complete, driver_identity, open_for
from noisemem.studies.worker import RemoteWorker

#: how often a work item whose actor died (or whose store write failed) is tried again
MAX_RETRIES = 2
#: how long the driver waits for the CUDA check on a GPU node (a worker start and
#: ``import torch``: seconds normally); without an answer, ``gpu="auto"`` runs on CPUs
CUDA_CHECK_TIMEOUT_S = 120.0
#: the driver refreshes its lock this often; a lock not refreshed for LOCK_STALE_S is free
LOCK_REFRESH_S = 10.0
LOCK_STALE_S = 60.0


class StudyActorError(RuntimeError):
    """A study actor failed in its ``__init__``: deterministic, so it is not retried."""


class StudyInterrupted(RuntimeError):
    """The study stopped before every chunk was done (its store can be resumed)."""


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


def actor_resources(spec: StudySpec, device: str) -> dict[str, float]:
    """What each study actor asks of the cluster."""
    need = {"CPU": float(spec.runtime.cpus_per_actor)}
    if device == "cuda":
        need["GPU"] = spec.runtime.gpus_per_actor
    return need


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items())) or "nothing"


def check_resources(need: dict[str, float], grows: bool, log: Any, timeout: float) -> None:
    """Refuse an actor no node of the cluster can hold (``grows``: the cluster may add nodes,
    so the driver waits for them instead, at most ``runtime.start_timeout``)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if any(all(n["Resources"].get(k, 0.0) >= v for k, v in need.items()) for n in nodes):
        return
    have = (
        "; ".join(
            _describe({k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")})
            for n in nodes
        )
        or "no node"
    )
    message = (
        f"each study actor asks for {_describe(need)} (runtime.cpus_per_actor, runtime.gpu, "
        f"runtime.gpus_per_actor) and no node of the cluster has that (nodes: {have})"
    )
    if not grows or timeout <= 0:
        raise ValueError(f"{message}; lower the request, or run on a cluster that has it")
    print(
        f"[noisemem] {message}; waiting up to {timeout:g} s (runtime.start_timeout) for the "
        "cluster to grow",
        file=log,
        flush=True,
    )


class Pool:
    """The study actors: the ones running, and how to start another (``factory``)."""

    def __init__(
        self, actors: list[Any], factory: Callable[[], Any], need: dict[str, float] | None = None
    ) -> None:
        self.actors = actors
        self.factory = factory
        self.need = need or {"CPU": 1.0}  # what each actor asks of the cluster

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
        """``actors`` (else ``runtime.actors``; 0: as many as the cluster's GPUs or CPUs
        hold now), at most one per work item."""
        rt = spec.runtime
        need = actor_resources(spec, device)
        count = rt.actors if actors is None else actors
        if count == 0:
            count = int(min(_cluster(k) // v for k, v in need.items()))
            if count < 1:
                print(
                    f"[noisemem] warning: runtime.actors=0 and the cluster has room for no "
                    f"actor of {_describe(need)} now (workers autoscaling from zero?): "
                    "starting 1 actor; set runtime.actors or --actors to the number the "
                    "cluster can grow to",
                    file=log,
                    flush=True,
                )
                count = 1
        count = max(1, min(count, work_items))
        data_ref = ray.put(data)
        options = {"num_cpus": need["CPU"], "num_gpus": need.get("GPU", 0)}

        def factory() -> Any:
            return RemoteWorker.options(**options).remote(spec, data_ref, device, rt.cpus_per_actor)

        return cls([factory() for _ in range(count)], factory, need)

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
    """Permutations done of ``total``; ``resumed`` of them were in the store already, so
    the rate and the ETA count only this run's work."""

    total: int
    done: int = 0
    failed_chunks: int = 0
    resumed: int = 0
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.resumed = max(self.resumed, self.done)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        new = self.done - self.resumed
        rate = new / elapsed if elapsed > 0 else 0.0
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
        owner: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.store = store
        self.path = store.uri
        self.pool = pool
        self.items = items
        self.progress = progress
        self.log = log
        self.owner = owner  # this driver's lock record (None: no lock taken)
        self._chunks = Chunks.of(spec)
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._refreshed = time.monotonic()

    def start(self) -> StudyHandle:
        threading.Thread(target=self.run, daemon=True).start()
        return self

    def run(self) -> None:
        """Wait for the first actor, hand out every item, retry the lost ones, then check
        the store (errors are kept for :meth:`wait`)."""
        try:
            self._await_actors()
            self._schedule()
            done = self.store.done_chunks([c.id for c in self.spec.configs], self._chunks.count)
            check_complete(self.store, self.spec, done)
            manifest = self.store.read_manifest() or {}
            self.store.write_manifest({**manifest, "complete": self.progress.failed_chunks == 0})
        except BaseException as err:  # surfaced by wait()
            self._error = err
        finally:
            self.pool.kill()
            if self.owner is not None:
                self.store.unlock(self.owner)
            self._done.set()

    def _await_actors(self) -> None:
        """Until one actor is up (or ``runtime.start_timeout`` passes: then a clear error)."""
        timeout = self.spec.runtime.start_timeout
        refs = [actor.ready.remote() for actor in self.pool.actors]
        ready, _ = ray.wait(refs, num_returns=1, timeout=max(timeout, 1.0))
        if not ready:
            raise StudyInterrupted(
                f"no study actor started within {timeout:g} s (runtime.start_timeout): each "
                f"asks for {_describe(self.pool.need)} and the "
                f"cluster has {_describe({k: _cluster(k) for k in ('CPU', 'GPU')})} in all; "
                f"nothing was computed, and the store at {self.path!r} can be resumed"
            )
        try:
            ray.get(ready[0])
        except ray.exceptions.RayError as err:
            if _init_failed(err):
                raise StudyActorError(
                    f"a study actor failed while starting (an error in its __init__, the same "
                    f"on every try: not retried): {err}"
                ) from err

    def _schedule(self) -> None:
        todo = list(self.items)
        idle = list(self.pool.actors)
        pending: dict[Any, tuple[Any, Item]] = {}
        retries: dict[Item, int] = {}
        print(self.progress.line(), file=self.log, flush=True)
        while todo or pending:
            while idle and todo:
                actor, item = idle.pop(), todo.pop(0)
                pending[self._submit(actor, item)] = (actor, item)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=LOCK_REFRESH_S)
            self._refresh_lock()
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

    def _refresh_lock(self) -> None:
        if self.owner is not None and time.monotonic() - self._refreshed > LOCK_REFRESH_S:
            self.store.refresh_lock(self.owner)
            self._refreshed = time.monotonic()

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
        if tries > MAX_RETRIES:  # Ray's own error, with a note that says what to do
            cause = str(err).strip().splitlines()
            err.add_note(
                f"{self._describe(item)} was lost {tries} times ({type(err).__name__}: "
                f"{cause[0] if cause else 'no detail'}); the study stopped, and the store at "
                f"{self.path!r} keeps every chunk finished so far: run the same command again "
                "to resume it"
            )
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
        if item.chunk is None:
            return f"predictions of {config}"
        return f"chunk {item.chunk} of {config}"

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


def _take_lock(store: Store, log: Any) -> dict[str, Any]:
    """This driver's lock on the store; waits while another driver of the same study holds
    it (the store's manifest already says it is this study), taking over a stale lock."""
    owner = driver_identity()
    said = False
    while (holder := store.lock(owner, LOCK_STALE_S)) is not None:
        if not said:
            print(
                f"[noisemem] another driver ({holder.get('driver', '?')}) is running this "
                f"study in {store.uri!r}; waiting for it to finish (or stop) before resuming",
                file=log,
                flush=True,
            )
            said = True
        time.sleep(2.0)
    return owner


def start(
    prepared: Prepared, actors: int | None = None, log: Any = None, grows: bool = True
) -> StudyHandle:
    """Plan and start a prepared study on the connected Ray cluster (see :func:`launch`);
    ``grows``: whether the cluster may add nodes (false for one this process started)."""
    log = log or sys.stdout
    spec, store, data = prepared.spec, prepared.store, prepared.data
    if store.uri != spec.output:  # a spec made by dataclasses.replace with a relative path
        spec = dataclasses.replace(spec, output=store.uri)
    chunks = Chunks.of(spec)
    device = choose_device(spec.runtime.gpu, _cluster("GPU"), check=remote_cuda_check, log=log)
    check_resources(actor_resources(spec, device), grows, log, spec.runtime.start_timeout)
    open_for(store, spec, data[2].as_dict(), chunks.count)
    owner = _take_lock(store, log)
    try:
        done = store.done_chunks([c.id for c in spec.configs], chunks.count)
        items = work(spec, lambda config, chunk: (config, chunk) in done)
        total = len(spec.configs) * spec.training.permutations
        resumed = sum(len(chunks.indices(k)) for _, k in done)
        ship_user_code(spec)
        pool = Pool.start(spec, data, device, actors, len(items), log)
    except BaseException:
        store.unlock(owner)
        raise
    progress = Progress(total=total, done=resumed)
    return StudyHandle(spec, store, pool, items, progress, log, owner).start()


def launch(spec: StudySpec | str, *, actors: int | None = None, log: Any = None) -> StudyHandle:
    """Start a study on the current Ray cluster (a local one is started if none is running).

    ``spec`` is a :class:`StudySpec` or a path to its TOML file; ``actors`` overrides
    ``runtime.actors``. Everything that needs no Ray is checked first. Returns at once; the
    handle's ``wait()`` blocks until every chunk is written and raises if the store lacks
    any expected row. On a multi-node cluster the spec's ``output`` must be storage every
    node shares (a shared filesystem or a URI).
    """
    check_actors(actors)
    if not isinstance(spec, StudySpec):
        spec = StudySpec.from_toml(spec)
    prepared = prepare_study(spec, actors)
    grows = True
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # the cluster it names
            ray.init(address=os.environ["RAY_ADDRESS"], include_dashboard=False)
        else:
            try:  # a cluster running on this machine
                ray.init(address="auto", include_dashboard=False)
            except ConnectionError:  # none: start one here, which never grows
                ray.init(address="local", include_dashboard=False)
                grows = False
    return start(prepared, actors=actors, log=log, grows=grows)

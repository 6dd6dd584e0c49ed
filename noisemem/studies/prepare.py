"""Everything a study checks before Ray starts: the actors override, the output, the data and
the model, and which study the store holds. No Ray here: a bad input costs seconds, not the
start of a cluster, and is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import tomllib
from dataclasses import dataclass
from typing import Any

from pyarrow import fs as pafs

from noisemem import checks
from noisemem.budget import plan_memory
from noisemem.studies.chunk import Context
from noisemem.studies.data import DataInfo, prepare
from noisemem.studies.models import check_model
from noisemem.studies.spec import SpecError, StudySpec
from noisemem.studies.store import Store, StoreError, check_resumable, refuse_foreign_files


@dataclass(frozen=True)
class Prepared:
    """A study ready to start: its spec, store, data (``x``, ``y``, ``info``)."""

    spec: StudySpec
    store: Store
    data: tuple[Any, Any, DataInfo]


def check_actors(actors: Any) -> None:
    """``actors`` overrides ``runtime.actors``: None, or an integer >= 0 (0: one per CPU/GPU)."""
    if actors is None:
        return
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 0:
        raise ValueError(
            f"actors={actors!r} is not allowed; give an integer >= 0 (0: one per available "
            "CPU or GPU) or None (use the spec's runtime.actors)"
        )


def open_store(spec: StudySpec) -> Store:
    """The spec's store, reachable and writable: ``output`` is not a file, does not lie under
    a file, and (on a local disk) its first existing folder is writable."""
    try:
        store = Store(spec.output)
        info = store.fs.get_file_info(store.root)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"output={spec.output!r} cannot be reached ({checks.first_line(err)}); check the URI "
            "and its credentials, or give a local path"
        ) from err
    if info.type == pafs.FileType.File:
        raise ValueError(f"output={spec.output!r} is a file; give a directory for the store")
    if store.local:
        folder = store.root
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise ValueError(
                f"output={spec.output!r} lies under {folder!r}, which is a file; give a "
                "directory path"
            )
        if not _writable(folder):
            raise ValueError(
                f"output={spec.output!r} cannot be written ({folder!r} is not writable); give "
                "a directory you can write"
            )
    if info.type == pafs.FileType.Directory and not store.exists("manifest.json"):
        refuse_foreign_files(store, spec)
    return store


def _writable(folder: str) -> bool:
    """Whether a file can be made in ``folder`` (tried: permission bits say nothing to root,
    nor about read-only or virtual filesystems)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_writable_dir(name: str, path: str) -> None:
    """A local directory the run will write into later (e.g. ``--report-dir``), checked now."""
    folder = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not _writable(folder):
        raise ValueError(f"{name}={path!r} cannot be written ({folder!r} is not a writable folder)")


def load_data(spec: StudySpec) -> tuple[Any, Any, DataInfo]:
    """The spec's data, checked against the spec and the model."""
    import datasets

    # its loaders log the errors they raise; the one line below says what went wrong
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    try:
        x, y, info = prepare(
            spec.data.source,
            limit=spec.data.limit,
            normalize=spec.data.normalize,
            label_column=spec.data.label_column,
            split=spec.data.split,
            seed=spec.seed[0],  # mnist1d is generated from it; the same data for every seed
        )
    except SpecError:
        raise
    except ValueError as err:
        if str(err).startswith("data."):  # noisemem's loaders name the field
            raise SpecError(str(err)) from err
        raise SpecError(_unreadable(spec, err)) from err
    except Exception as err:  # a file datasets cannot parse, for instance
        raise SpecError(_unreadable(spec, err)) from err
    spec.check_data_size(info.num_samples)
    check_model(spec, info)
    check_memory(spec, x, y, info)
    return x, y, info


def check_memory(spec: StudySpec, x: Any, y: Any, info: DataInfo) -> None:
    """With a ``runtime.memory_budget`` given, the memory plan of every config (one batch's
    gradient graph measured here, on the CPU): a budget that cannot hold even one batch's
    graph next to the O(m d) vectors is refused before any actor starts. Without one, each
    actor plans for the memory its own device has free."""
    r = spec.runtime
    if r.memory_budget is None:
        return
    for setting in spec.settings:
        ctx = Context.build(spec, x, y, info, "cpu", setting)
        q = r.graph_batches or None
        uses: list[tuple[Any, Any, str]] = [
            (ctx.problem, c.optimizer, c.id) for c in spec.configs if c.setting == setting
        ]
        if setting.sampling == "reshuffle":  # the noise direction's per-sample probe
            uses.append((ctx.problem.per_sample(), None, "the per-sample noise direction"))
        for problem, optimizer, what in uses:
            try:
                plan_memory(
                    problem,
                    optimizer,
                    memory_budget=r.memory_budget,
                    graph_batches=q if q is None or q <= problem.num_batches else None,
                )
            except ValueError as err:
                raise SpecError(
                    f"runtime.memory_budget={r.memory_budget!r} is too small for {what}: {err}"
                ) from err


def _unreadable(spec: StudySpec, err: BaseException) -> str:
    return (
        f"data.source={spec.data.source!r} cannot be read ({type(err).__name__}: "
        f"{checks.first_line(err)})"
    )


def stored_chunking(store: Store, spec: StudySpec) -> StudySpec:
    """A spec that leaves its chunk size to the work resumes a store with the chunk size the
    store was made with (the work-based choice may differ between versions; the chunks of a
    store must not)."""
    if not spec.auto_chunks or not store.exists("study.toml"):
        return spec
    try:
        stored = tomllib.loads(store.read_text("study.toml"))["training"]["chunk_size"]
    except (KeyError, TypeError, ValueError, tomllib.TOMLDecodeError):
        return spec  # the identity check says what is wrong with it
    if not checks.is_integer(stored) or stored < 1 or stored == spec.training.chunk_size:
        return spec
    training = dataclasses.replace(spec.training, chunk_size=int(stored))
    return dataclasses.replace(spec, training=training)


def prepare_study(spec: StudySpec, actors: int | None = None) -> Prepared:
    """Every check that needs no Ray, in the order that costs least: the actors override,
    the output, the store's identity, then the data and the model."""
    check_actors(actors)
    store = open_store(spec)
    spec = stored_chunking(store, spec)
    try:
        check_resumable(store, spec, store.read_manifest())
    except StoreError as err:
        raise ValueError(f"output={spec.output!r}: {err}") from err
    return Prepared(spec, store, load_data(spec))

"""The study actor: a thin Ray shell around the chunk work of :mod:`noisemem.studies.chunk`.

It holds the data once (passed by reference from ``ray.put``), builds its
:class:`~noisemem.studies.chunk.Context` on its device (a GPU when the driver chose CUDA and
torch can use it there, else CPU, with torch threads = its CPUs) and writes one Parquet part
per table and chunk, the ``runs`` part last.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any

import ray
import torch

from noisemem.studies import chunk, rows
from noisemem.studies.devices import cuda_report
from noisemem.studies.spec import Config, Setting, StudySpec
from noisemem.studies.store import Store
from noisemem.system import keep_freed_memory


class StudyWorker:
    """One actor's state: the study context, built once, and the work it is handed."""

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
        self.spec, self.data, self.device = spec, data, device
        self.contexts: dict[Setting, chunk.Context] = {}
        self.context(spec.configs[0])  # the first setting at once: bad data fails here
        self.store = Store(spec.output)

    def ready(self) -> str:
        """Answers once the actor is up (its context built): the driver waits for one."""
        return self.name

    def context(self, config: Config) -> chunk.Context:
        """The context of the config's training setting, built on first use."""
        if config.setting not in self.contexts:
            x, y, info = self.data
            self.contexts[config.setting] = chunk.Context.build(
                self.spec, x, y, info, self.device, config.setting
            )
        return self.contexts[config.setting]

    def run_chunk(self, config_index: int, index: int) -> dict[str, Any]:
        spec = self.spec
        config = spec.configs[config_index]
        t0 = time.perf_counter()
        try:
            tables = chunk.run_chunk(self.context(config), config, index, worker=self.name)
        except Exception:  # recorded in the store as failed, never silently dropped
            error = traceback.format_exc(limit=8)
            failed = rows.failed_chunk_rows(spec, config, index, error, self.name)
            self.store.write_chunk(
                config.id, index, {"runs": failed}, status="failed", worker=self.name
            )
            return {"config": config.id, "chunk": index, "status": "failed", "error": error}
        self.store.write_chunk(config.id, index, tables, worker=self.name)  # parts, then record
        return {
            "config": config.id,
            "chunk": index,
            "status": "ok",
            "permutations": len(tables["runs"]),
            "seconds": time.perf_counter() - t0,
        }

    def predictions(self, config_index: int) -> str:
        config = self.spec.configs[config_index]
        self.store.write_predictions(config.id, chunk.predictions(self.context(config), config))
        return config.id


RemoteWorker = ray.remote(StudyWorker)

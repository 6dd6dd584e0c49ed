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
from noisemem.studies.spec import StudySpec
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
        x, y, info = data
        self.device = device
        self.ctx = chunk.Context.build(spec, x, y, info, device)
        self.store = Store(spec.output)

    def run_chunk(self, config_index: int, index: int) -> dict[str, Any]:
        spec = self.ctx.spec
        config = spec.configs[config_index]
        t0 = time.perf_counter()
        try:
            tables = chunk.run_chunk(self.ctx, config, index, worker=self.name)
        except Exception:  # recorded in the store as failed, never silently dropped
            error = traceback.format_exc(limit=8)
            failed = rows.failed_chunk_rows(spec, config, index, error, self.name)
            self.store.write_part("runs", config.id, index, failed)
            return {"config": config.id, "chunk": index, "status": "failed", "error": error}
        for table in ("steps", "corrections", "moments", "runs"):  # runs last: the marker
            self.store.write_part(table, config.id, index, tables[table])
        return {
            "config": config.id,
            "chunk": index,
            "status": "ok",
            "permutations": len(tables["runs"]),
            "seconds": time.perf_counter() - t0,
        }

    def predictions(self, config_index: int) -> str:
        config = self.ctx.spec.configs[config_index]
        self.store.write_part("predictions", config.id, None, chunk.predictions(self.ctx, config))
        return config.id


RemoteWorker = ray.remote(StudyWorker)

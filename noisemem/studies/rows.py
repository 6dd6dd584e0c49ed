"""The rows a chunk writes, one builder per table (columns: :mod:`noisemem.studies.schema`)."""

from __future__ import annotations

import json
import math
import platform
from functools import cache
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from noisemem.stats import Moments, cosine
from noisemem.studies.plan import Chunks

if TYPE_CHECKING:
    from noisemem.studies.spec import Config, StudySpec


@cache
def versions(device: str = "cpu") -> str:
    """The library versions a row was computed with (JSON; Ray's and pyarrow's read without
    importing them), torch's CUDA version and the name of the device computed on."""

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:  # pragma: no cover - both are dependencies
            return "missing"

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or platform.machine()
    return json.dumps(
        {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "ray": version("ray"),
            "numpy": np.__version__,
            "pyarrow": version("pyarrow"),
            "device_name": name,
        }
    )


def run_row(spec: StudySpec, config: Config, chunk: int, p: int, **fields: Any) -> dict[str, Any]:
    """One ``runs`` row; ``fields`` sets status, error, diverged_at, seconds, worker, device."""
    opt = config.optimizer
    row = {
        "study": spec.name,
        "config": config.id,
        "chunk": chunk,
        "permutation": p,
        "seed": config.seed,
        "optimizer": opt.name,
        "hyperparameters": json.dumps(config.hyperparameters, sort_keys=True),
        "lr": opt.lr,
        "batch_size": config.batch_size,
        "epochs": config.epochs,
        "sampling": config.sampling,
        "status": "ok",
        "error": None,
        "diverged_at": None,
        "seconds": None,
        "worker": None,
        "device": None,
        "versions": None,
        "memory_plan": None,
    }
    row.update(fields)
    row["versions"] = versions(row["device"] or "cpu")
    return row


def failed_chunk_rows(
    spec: StudySpec, config: Config, chunk: int, error: str, worker: str
) -> list[dict[str, Any]]:
    """``runs`` rows recording that a chunk failed (kept, so nothing is silently lost)."""
    return [
        run_row(spec, config, chunk, p, status="failed", error=error, worker=worker)
        for p in Chunks.of(spec).indices(chunk)
    ]


def correction_row(
    config: Config,
    probe: str,
    n: int,
    p: int,
    M: Tensor,
    full_batch: Tensor,
    noise: Tensor,
    anti: Tensor | None = None,
    *,
    vector: bool,
) -> dict[str, Any]:
    """A ``corrections`` row: |M|, l_inf, and M against the full-batch prediction, the noise
    direction and (where the optimizer has one) Sec. 4's anti-regularization direction d.
    In float64 whatever the study's dtype: a float32 M of entries ~1e19 is finite but its
    norm (a sum of squares) is not."""
    M, full_batch, noise = M.double(), full_batch.double(), noise.double()
    fb = float(full_batch.norm())
    d = None if anti is None else anti.double()
    d_norm = 0.0 if d is None else float(d.norm())
    return {
        "config": config.id,
        "permutation": p,
        "probe": probe,
        "step": n,
        "norm": float(M.norm()),
        "linf": float(M.abs().max()),
        "full_batch_norm": fb,
        "proj_full_batch": float(M @ full_batch) / fb**2 if fb > 0 else math.nan,
        "cos_full_batch": cosine(M, full_batch),
        "cos_noise": cosine(M, noise),
        "proj_anti": float(M @ d) / d_norm if d is not None and d_norm > 0 else math.nan,
        "vector": M.cpu().tolist() if vector else None,
    }


def moments_row(
    config: Config, probe: str, n: int, chunk: int, acc: Moments, runs: int
) -> dict[str, Any]:
    """A ``moments`` row: the chunk's count, mean and M2 of M at (probe, step), and how many
    of its ``runs`` were left out (M not finite there, or the run had diverged)."""
    return {
        "config": config.id,
        "probe": probe,
        "step": n,
        "chunk": chunk,
        "count": acc.count,
        "mean": acc.mean.tolist(),
        "m2": acc.m2.tolist(),
        "excluded": runs - acc.count,
    }


def prediction_row(
    config: Config, probe: str, n: int | None, kind: str, v: Tensor, coef: dict[str, float]
) -> dict[str, Any]:
    """A ``predictions`` row (step -1: the n -> infinity limit)."""
    return {
        "config": config.id,
        "probe": probe,
        "step": -1 if n is None else n,
        "kind": kind,
        "norm": float(v.double().norm()),
        "coefficients": json.dumps(coef),
        "vector": v.double().cpu().tolist(),
    }


def missing_prediction_row(config: Config, probe: str, n: int | None, kind: str) -> dict[str, Any]:
    """A ``predictions`` row saying the optimizer has no closed form for ``kind`` there: no
    vector, a NaN norm, coefficients ``{"no_closed_form": 1}``."""
    return {
        "config": config.id,
        "probe": probe,
        "step": -1 if n is None else n,
        "kind": kind,
        "norm": math.nan,
        "coefficients": json.dumps({"no_closed_form": 1}),
        "vector": None,
    }

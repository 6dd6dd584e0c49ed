"""Study stores for the analysis tests, made without Ray.

:func:`build` computes a study in this process with the engine's own chunk work
(:func:`noisemem.studies.chunk.run_chunk` and ``predictions``) and writes it with the
store's own API, so the tables are those a Ray study writes. :func:`shrunken` is a ready
study (``jobs/studies/<name>.toml``) made small enough for CI: little data, a small model,
few permutations. :func:`synthetic` writes a store whose moments and predictions are given
vectors, for answers known in advance.
"""

from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisemem.studies import rows
from noisemem.studies.chunk import Context, predictions, run_chunk
from noisemem.studies.plan import Chunks
from noisemem.studies.prepare import load_data
from noisemem.studies.spec import StudySpec
from noisemem.studies.store import Store, open_for

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "jobs" / "studies"

#: the ResNet studies' AdamW (at beta2 = 0.999 only) and Lion, as in their specs
RESNET_OPTIMIZERS = [
    {"kind": "AdamW", "lr": 10**-3.5, "beta1": 0.99, "beta2": 0.999, "eps": 1e-6,
     "weight_decay": 0.005},
    {"kind": "Lion", "lr": 10**-3.5, "rho1": 0.9, "rho2": 0.99, "weight_decay": 0.005,
     "eps": 1e-8},
]  # fmt: skip

#: how each ready study is shrunk for CI, over the common shrinking in :func:`shrunken`
SHRINK: dict[str, dict[str, Any]] = {
    # batches of 16..128 of 512 samples: 32 down to 4 batches per epoch
    "batch_size_sweep": {"data": {"limit": 256}},
    "beta_sweep": {"data": {"limit": 256}, "training": {"epochs": 2}},
    "digits_heavy_ball_adam": {"data": {"limit": 256}},
    # 4 batches of 64 per epoch, 5 epochs: 20 steps of every lr, 4 permutations
    "figure1_digits": {
        "data": {"limit": 256},
        "training": {"batch_size": 64, "epochs": 5, "permutations": 4},
    },
    # the Hub cannot be reached in CI: the embedded digits stand in for MNIST, one batch
    # of all of them per step as in the paper's full-batch setting
    "figure1_mnist10k": {
        "data": {"source": "digits", "limit": 256, "normalize": "unit"},
        "training": {"batch_size": 256, "epochs": 10, "permutations": 2},
        "runtime": {"gpu": "never", "actors": 0},
    },
    # ResNet-18 at width 2 (GroupNorm of 2 groups) on 32 generated CIFAR-shaped images, two
    # batches of 16, 4 orders in 2 chunks; AdamW at the larger beta2 and Lion (2 configs)
    "resnet_cifar10": {
        "data": {"source": "synthetic:cifar10", "limit": 32},
        "model": {"kwargs": {"width": 2, "groups": 2}},
        "optimizers": RESNET_OPTIMIZERS,
        "training": {"batch_size": 16, "permutations": 4, "chunk_size": 2},
        "runtime": {"gpu": "never"},
    },
    "resnet_synthetic": {
        "data": {"limit": 32},
        "model": {"kwargs": {"width": 2, "groups": 2}},
        "optimizers": RESNET_OPTIMIZERS,
        "training": {"batch_size": 16, "permutations": 4, "chunk_size": 2},
    },
}


def raw_spec(name: str) -> dict[str, Any]:
    return tomllib.loads((STUDIES / f"{name}.toml").read_text())


def merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with the tables of ``changes`` merged in (one level deep)."""
    out = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def shrunken(name: str, output: str | Path, **changes: Any) -> StudySpec:
    """The ready study ``name``, small: hidden width 8, 8 permutations in chunks of 2, the
    data and epochs of :data:`SHRINK`, written to ``output``."""
    raw = raw_spec(name)
    raw = merge(
        raw,
        {
            "output": str(output),
            "model": {"hidden": 8},
            "training": {"permutations": 8, "chunk_size": 2},
        },
    )
    raw = merge(raw, SHRINK.get(name, {}))
    raw = merge(raw, changes)
    return StudySpec.from_dict(raw)


_READY: dict[str, str] = {}


def ready(name: str, root: Path, **changes: Any) -> str:
    """The shrunken study ``name`` built once per test session under ``root`` (the tests
    that read it share it): its store's URI."""
    key = f"{name}{sorted(changes.items())!r}"
    if key not in _READY:
        folder = root / f"{name}-{len(_READY)}"
        _READY[key] = build(shrunken(name, folder, **changes))
    return _READY[key]


def build(
    spec: StudySpec,
    *,
    skip: Callable[[str, int | None], bool] = lambda config, chunk: False,
) -> str:
    """Compute and write ``spec``'s store in this process; ``skip(config, chunk)`` leaves a
    chunk (``None``: the config's predictions) out, as an interrupted study would. Returns
    the store's URI."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared machine
    try:
        return _build(spec, skip)
    finally:
        torch.set_num_threads(threads)


def _build(spec: StudySpec, skip: Callable[[str, int | None], bool]) -> str:
    x, y, info = load_data(spec)  # as a study loads it, checked against the spec
    chunks = Chunks.of(spec)
    store = Store(spec.output)
    open_for(store, spec, info.as_dict(), chunks.count)
    contexts: dict[Any, Context] = {}
    complete = True
    for config in spec.configs:
        if config.setting not in contexts:
            contexts[config.setting] = Context.build(spec, x, y, info, "cpu", config.setting)
        ctx = contexts[config.setting]
        if skip(config.id, None):
            complete = False
        else:
            store.write_predictions(config.id, predictions(ctx, config))
        for chunk in range(chunks.count):
            if skip(config.id, chunk):
                complete = False
                continue
            store.write_chunk(config.id, chunk, run_chunk(ctx, config, chunk), worker="test")
    manifest = store.read_manifest() or {}
    store.write_manifest({**manifest, "complete": complete})
    return store.uri


# -- stores of given vectors -------------------------------------------------------------------
TINY = {
    "name": "synthetic",
    "data": {"source": "digits", "limit": 64},
    "model": {"kind": "softmax"},
    "optimizers": [{"kind": "HeavyBall", "lr": 0.1, "beta": 0.9}],
    "training": {"batch_size": 16, "epochs": 1, "permutations": 8, "chunk_size": 2},
    "probes": {"init": True},
}


def moments_row(
    config: str, chunk: int, vectors: np.ndarray, probe: str = "init", step: int = 3
) -> dict[str, Any]:
    """A ``moments`` row of the vectors ``(n, d)`` (n = 0: every run left out)."""
    n = len(vectors)
    mean = vectors.mean(0) if n else np.full(vectors.shape[1], np.nan)
    m2 = ((vectors - mean) ** 2).sum(0) if n else np.zeros(vectors.shape[1])
    return {
        "config": config,
        "probe": probe,
        "step": step,
        "chunk": chunk,
        "count": n,
        "mean": mean.tolist(),
        "m2": m2.tolist(),
        "excluded": 0,
    }


def step_row(config: str, p: int, step: int, first: float, second: float) -> dict[str, Any]:
    """A ``steps`` row with the two l_inf distances (the other metrics are placeholders)."""
    return {
        "config": config,
        "permutation": p,
        "step": step,
        "epoch": 0,
        "batch": 0,
        "loss": 0.0,
        "accuracy": 0.0,
        "grad_norm": 0.0,
        "linf_first": first,
        "linf_second": second,
    }


def prediction_row(
    config: str,
    kind: str,
    vector: np.ndarray | None,
    coefficients: Mapping[str, float] | None = None,
    probe: str = "init",
    step: int = 3,
) -> dict[str, Any]:
    return {
        "config": config,
        "probe": probe,
        "step": step,
        "kind": kind,
        "norm": float(np.linalg.norm(vector)) if vector is not None else float("nan"),
        "coefficients": json.dumps(dict(coefficients or {})),
        "vector": None if vector is None else np.asarray(vector, dtype=float).tolist(),
    }


def synthetic(
    output: str | Path,
    chunk_vectors: Mapping[str, Iterable[np.ndarray]],
    prediction_rows: Mapping[str, list[dict[str, Any]]],
    *,
    raw: Mapping[str, Any] | None = None,
    statuses: Mapping[tuple[str, int], str] | None = None,
    probe: str = "init",
    step: int = 3,
    steps: Mapping[str, list[dict[str, Any]]] | None = None,
) -> tuple[str, StudySpec]:
    """A store of the study ``raw`` (default :data:`TINY`) whose chunks hold the given
    vectors: ``chunk_vectors[config]`` lists one ``(n, d)`` array per chunk (their moments at
    (``probe``, ``step``)), ``prediction_rows[config]`` the config's predictions rows;
    ``statuses[(config, p)]`` marks a run diverged; ``steps[config]`` are its ``steps``
    rows (each in its permutation's chunk). Chunks beyond the arrays given are left out
    (missing)."""
    spec = StudySpec.from_dict({**(raw or TINY), "output": str(output)})
    store = Store(spec.output)
    open_for(store, spec, {"source": "synthetic", "num_samples": 64}, Chunks.of(spec).count)
    chunks = Chunks.of(spec)
    statuses = dict(statuses or {})
    for config in spec.configs:
        if config.id in prediction_rows:
            store.write_predictions(config.id, prediction_rows[config.id])
        for chunk, vectors in enumerate(chunk_vectors.get(config.id, [])):
            runs = []
            for p in chunks.indices(chunk):
                status = statuses.get((config.id, p), "ok")
                diverged = 1 if status == "diverged" else None
                runs.append(
                    rows.run_row(spec, config, chunk, p, status=status, diverged_at=diverged)
                )
            tables: dict[str, list[dict[str, Any]]] = {"runs": runs}
            vectors = np.asarray(vectors)
            if vectors.ndim == 2 and vectors.shape[1] > 0:
                row = moments_row(config.id, chunk, vectors, probe, step)
                row["excluded"] = len(runs) - row["count"]
                tables["moments"] = [row]
            mine = set(chunks.indices(chunk))
            tables["steps"] = [
                r for r in (steps or {}).get(config.id, []) if r["permutation"] in mine
            ]
            store.write_chunk(config.id, chunk, tables, worker="test")
    return store.uri, spec

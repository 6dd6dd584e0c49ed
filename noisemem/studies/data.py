"""Data sets, through Hugging Face ``datasets``.

* ``digits`` (the embedded default): scikit-learn's bundled copy of the UCI digits, 1797 real
  8x8 handwritten images, no download.
* ``mnist1d``: the MNIST-1D benchmark generated locally (``mnist1d.data.make_dataset``).
* ``synthetic:cifar10``: CIFAR-shaped data generated from the seed (3x32x32 images in 10
  classes, each a class pattern plus noise; 1024 samples unless ``limit`` says otherwise):
  the shape and cost of CIFAR-10 with no download, for tests and laptops.
* a local Parquet, CSV, Arrow or JSON file, or a ``save_to_disk`` folder.
* ``hub:<name>``: a Hugging Face Hub data set, when the network allows. Offline (or with
  ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set) this fails within seconds, with a message
  saying how to use a local copy instead.

Inputs are every column but the label, flattened to float vectors (a list/array or image
column, or numeric columns). ``limit`` keeps the first N samples (a deterministic subset,
e.g. MNIST-10K). Normalisation: ``unit`` divides by the largest absolute input value,
``standardize`` subtracts the per-feature mean and divides by the per-feature std (0 -> 1),
``none`` leaves inputs as they are. Batches are consecutive: batch i holds samples
[i b, (i+1) b); the incomplete last batch is dropped. All of this is recorded in
:class:`DataInfo`, which the store keeps.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from noisemem.checks import is_integer

HUB_HOST = ("huggingface.co", 443)


@dataclass(frozen=True)
class DataInfo:
    """What was loaded and how it was prepared (kept in the store's manifest)."""

    source: str
    num_samples: int
    num_features: int
    num_classes: int
    image_shape: tuple[int, ...] | None
    normalize: str
    scale: float | None = None
    limit: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _digits_dataset() -> Any:
    import datasets
    from sklearn.datasets import load_digits

    raw = load_digits()
    return datasets.Dataset.from_dict({"pixels": raw.data.astype(np.float32), "label": raw.target})


def _mnist1d_dataset(seed: int) -> Any:
    import datasets
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    raw = make_dataset(args)  # generated locally; get_dataset would try a download first
    return datasets.Dataset.from_dict(
        {"x": raw["x"].astype(np.float32), "label": raw["y"].astype(np.int64)}
    )


def _synthetic_cifar(seed: int, limit: int) -> Any:
    """CIFAR-shaped images: sample j of class c = pattern_c + noise, 3x32x32, from ``seed``."""
    import datasets

    n = limit or 1024
    rng = np.random.default_rng([seed, 10_32_32])
    patterns = rng.normal(size=(10, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, size=n)
    images = patterns[labels] + rng.normal(scale=2.0, size=(n, 3, 32, 32)).astype(np.float32)
    return datasets.Dataset.from_dict({"image": list(images), "label": labels})


def _offline() -> bool:
    return any(
        os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_dataset(name: str, split: str) -> Any:
    import datasets

    hint = (
        f"data.source='hub:{name}': the Hugging Face Hub cannot be reached ({{why}}); load it "
        f"where there is network (datasets.load_dataset({name!r}).save_to_disk(DIR)) and set "
        "data.source to DIR"
    )
    if not _offline():
        try:
            socket.create_connection(HUB_HOST, timeout=3).close()
        except OSError as err:
            raise ValueError(hint.format(why=f"no network: {err}")) from err
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types; all mean "not available here"
        why = "offline mode is set" if _offline() else type(err).__name__
        raise ValueError(hint.format(why=why) + f"; the loader said: {err}") from err


def _local_dataset(path: Path, split: str) -> Any:
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    kinds = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".json": "json"}
    kinds[".jsonl"] = "json"
    kind = kinds.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"data.source={str(path)!r}: unknown file type {path.suffix!r}; "
            f"use one of {', '.join(sorted(kinds))} or a save_to_disk folder"
        )
    return datasets.load_dataset(kind, data_files=str(path), split="train")


SYNTHETIC = ("synthetic:cifar10",)


def load_dataset(source: str, *, split: str = "train", seed: int = 0, limit: int = 0) -> Any:
    """The ``datasets.Dataset`` behind a spec's ``data.source``."""
    if source == "digits":
        return _digits_dataset()
    if source == "synthetic:cifar10":
        return _synthetic_cifar(seed, limit)
    if source == "mnist1d":
        return _mnist1d_dataset(seed)
    if source.startswith("hub:"):
        return _hub_dataset(source.removeprefix("hub:"), split)
    return _local_dataset(Path(source), split)


def _features(ds: Any, label_column: str) -> tuple[np.ndarray, tuple[int, ...] | None]:
    columns = [c for c in ds.column_names if c != label_column]
    if not columns:
        raise ValueError(f"data: no input columns besides the label column {label_column!r}")
    if len(columns) == 1:
        values = ds.with_format("numpy")[columns[0]]
        if len(values) and not isinstance(values[0], np.ndarray):  # e.g. PIL images
            values = [np.asarray(v) for v in ds[columns[0]]]
        arr = np.stack([np.asarray(v, dtype=np.float32) for v in values])
        if arr.ndim == 4 and arr.shape[-1] <= 4 < arr.shape[1]:
            arr = arr.transpose(0, 3, 1, 2)  # PIL images are H x W x C: channels first
        shape = tuple(arr.shape[1:]) if arr.ndim >= 3 else None
        return arr.reshape(len(arr), -1), shape
    table = ds.with_format("numpy")
    arr = np.stack([np.asarray(table[c], dtype=np.float32) for c in columns], axis=1)
    return arr, None


def prepare(
    source: str,
    *,
    limit: int = 0,
    normalize: str = "unit",
    label_column: str = "label",
    split: str = "train",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, DataInfo]:
    """Inputs ``(N, features)``, integer labels ``(N,)`` and the record of how."""
    ds = load_dataset(source, split=split, seed=seed, limit=limit)
    if label_column not in ds.column_names:
        raise ValueError(
            f"data.label_column={label_column!r} is not a column; columns: {ds.column_names}"
        )
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    x, image_shape = _features(ds, label_column)
    labels = np.asarray(ds.with_format("numpy")[label_column]).astype(np.int64)
    scale = None
    if normalize == "unit":
        scale = float(np.abs(x).max()) or 1.0
        x = x / scale
    elif normalize == "standardize":
        std = x.std(0)
        x = (x - x.mean(0)) / np.where(std > 0, std, 1.0)
    if source == "digits":
        image_shape = (8, 8)
    info = DataInfo(
        source=source,
        num_samples=len(x),
        num_features=x.shape[1],
        num_classes=int(labels.max()) + 1,
        image_shape=image_shape,
        normalize=normalize,
        scale=scale,
        limit=limit,
    )
    return torch.as_tensor(x, dtype=dtype), torch.as_tensor(labels), info


def digits(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """All 1797 digits: inputs ``(1797, 64)`` in [0, 1] and integer labels ``(1797,)``."""
    x, y, _ = prepare("digits", dtype=dtype)
    return x, y


def split_batches(x: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Consecutive batches of ``batch_size`` samples; the incomplete last batch is dropped."""
    if not is_integer(batch_size) or not 1 <= batch_size <= len(x):
        raise ValueError(
            f"batch_size={batch_size!r} is not allowed; it must be an int in [1, {len(x)}]"
        )
    m = len(x) // batch_size
    return [
        (x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size])
        for i in range(m)
    ]

"""Which device the study actors compute on: what torch can do where the GPUs are.

No Ray here: :func:`choose_device` takes the cluster's GPU count and a ``check`` that runs
:func:`cuda_report` on a GPU node (the driver passes one that does it in a Ray task).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch


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


def choose_device(
    gpu: str,
    cluster_gpus: float,
    check: Callable[[], tuple[bool | None, str]],
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

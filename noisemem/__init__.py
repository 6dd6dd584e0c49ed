"""noisemem: how mini-batch noise and optimizer memory implicitly modify the loss.

The engine (no Ray inside): optimizers in history form (:mod:`noisemem.optim`), the memory
correction of Eq. (9), its exact and Monte Carlo expectations over batch orders, the
full-batch memoryless predictions and the mini-batch variance regularizer. Studies on Ray:
:func:`launch` a :class:`StudySpec`, then :func:`load` its Parquet store into pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from noisemem import optim
from noisemem.correction import memory_correction
from noisemem.expectation import Expectation, expected_correction
from noisemem.full_batch import full_batch_correction
from noisemem.noise import noise_regularizer
from noisemem.spec import StudySpec
from noisemem.stats import Moments
from noisemem.store import load
from noisemem.trajectory import Trajectories, memoryful_run, memoryless_run, trajectories

if TYPE_CHECKING:
    from noisemem.runtime import StudyHandle

__version__ = "0.1.0"


def launch(spec: StudySpec | str, *, actors: int | None = None, log: Any = None) -> StudyHandle:
    """Start a study on Ray (see :func:`noisemem.runtime.launch`; imports Ray lazily)."""
    from noisemem.runtime import launch as _launch

    return _launch(spec, actors=actors, log=log)


__all__ = [
    "Expectation",
    "Moments",
    "StudySpec",
    "Trajectories",
    "expected_correction",
    "full_batch_correction",
    "launch",
    "load",
    "memory_correction",
    "memoryful_run",
    "memoryless_run",
    "noise_regularizer",
    "optim",
    "trajectories",
]

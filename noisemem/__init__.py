"""noisemem: how mini-batch noise and optimizer memory implicitly modify the loss.

The engine (this package's modules; no Ray, pyarrow or pandas inside): optimizers in history
form (:mod:`noisemem.optim`), the memory correction of Eq. (9) (:mod:`noisemem.correction`
over a :class:`~noisemem.probe.Probe` and the windows of :mod:`noisemem.window`), its exact
and Monte Carlo expectations over batch orders, the full-batch memoryless predictions, the
mini-batch variance regularizer and the memoryful/memoryless trajectories.

The study service (:mod:`noisemem.studies`): :func:`launch` a :class:`StudySpec` on Ray,
then :func:`load` its Parquet store into pandas; :mod:`noisemem.analysis` compares what it
holds with the predictions. These three names are imported on first use, so that
``import noisemem`` loads the engine alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from noisemem import optim
from noisemem.correction import memory_correction
from noisemem.expectation import Expectation, expected_correction
from noisemem.full_batch import full_batch_correction
from noisemem.noise import noise_regularizer
from noisemem.noise_aware import (
    NoiseAwarePrediction,
    anti_regularization_direction,
    noise_aware_correction,
    signed_projection,
)
from noisemem.stats import Moments
from noisemem.trajectory import Trajectories, memoryful_run, memoryless_run, trajectories

if TYPE_CHECKING:
    from noisemem.studies.driver import StudyHandle
    from noisemem.studies.spec import StudySpec
    from noisemem.studies.tables import StudyTables

__version__ = "0.1.0"


def launch(spec: StudySpec | str, *, actors: int | None = None, log: Any = None) -> StudyHandle:
    """Start a study on Ray (see :func:`noisemem.studies.driver.launch`)."""
    from noisemem.studies.driver import launch as _launch

    return _launch(spec, actors=actors, log=log)


def load(path: str) -> StudyTables:
    """Read a study store into pandas (see :func:`noisemem.studies.tables.load`)."""
    from noisemem.studies.tables import load as _load

    return _load(path)


def __getattr__(name: str) -> Any:
    if name == "StudySpec":
        from noisemem.studies.spec import StudySpec

        return StudySpec
    raise AttributeError(f"module 'noisemem' has no attribute {name!r}")


__all__ = [
    "Expectation",
    "Moments",
    "NoiseAwarePrediction",
    "StudySpec",
    "Trajectories",
    "anti_regularization_direction",
    "expected_correction",
    "full_batch_correction",
    "launch",
    "load",
    "memory_correction",
    "memoryful_run",
    "memoryless_run",
    "noise_aware_correction",
    "noise_regularizer",
    "optim",
    "signed_projection",
    "trajectories",
]

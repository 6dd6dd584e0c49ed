"""noisemem: how mini-batch noise and optimizer memory implicitly modify the loss.

The engine (no Ray inside): optimizers in history form (:mod:`noisemem.optim`), the memory
correction of Eq. (9), its exact and Monte Carlo expectations over batch orders, the
full-batch memoryless predictions and the mini-batch variance regularizer.
"""

from noisemem import optim
from noisemem.correction import memory_correction
from noisemem.expectation import Expectation, expected_correction
from noisemem.full_batch import full_batch_correction
from noisemem.noise import noise_regularizer
from noisemem.stats import Moments
from noisemem.trajectory import Trajectories, memoryful_run, memoryless_run, trajectories

__version__ = "0.1.0"

__all__ = [
    "Expectation",
    "Moments",
    "Trajectories",
    "expected_correction",
    "full_batch_correction",
    "memory_correction",
    "memoryful_run",
    "memoryless_run",
    "noise_regularizer",
    "optim",
    "trajectories",
]

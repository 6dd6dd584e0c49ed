"""How a study's work is split: chunks of permutations, and the work items a driver hands out.

A config's permutations ``0..P-1`` are cut into chunks of ``training.chunk_size``
consecutive indices (the last one may be shorter). A work item is a config's predictions
(``chunk=None``) or one chunk of it. Batch orders depend only on the seed and the
permutation index, so results never depend on the chunking or on which actor ran an item.

The work of a run is counted in full-data gradients (:func:`run_work`: training costs one
per epoch; each correction of Eq. (9) about 6 for optimizers linear in the gradients and 10
for the others, each probe point's graph of batch gradients about 2: the engine's
benchmarks). ``chunk_size = "auto"`` (the default) follows it (:func:`auto_chunk_size`): a
chunk of about ``AUTO_CHUNK_WORK`` gradients, so that Ray's fixed cost per item (tens of
milliseconds, an actor's start once) stays small against it, but at least ``MIN_CHUNKS``
chunks per config, for the jackknife over chunks and for the actors to share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from noisemem.studies.spec import StudySpec


#: full-data gradients per correction (optimizers linear in the gradients, others) and per
#: probe point's graph of batch gradients
CORRECTION_COST = (6.0, 10.0)
PROBE_COST = 2.0
#: an automatic chunk holds about this many gradients of work, and each config at least
#: MIN_CHUNKS chunks, of at most MAX_AUTO_CHUNK runs
AUTO_CHUNK_WORK = 1000.0
MIN_CHUNKS = 8
MAX_AUTO_CHUNK = 64


def run_work(epochs: int, linear: bool, fixed_probes: int, epoch_end: bool) -> float:
    """Full-data gradients one run costs (module notes): training, its corrections at the
    ``fixed_probes`` points and (``epoch_end``) at its own parameters, at every epoch's end."""
    per_correction = CORRECTION_COST[0 if linear else 1]
    work = float(epochs) + fixed_probes * epochs * per_correction
    if epoch_end:
        work += epochs * (PROBE_COST + per_correction)
    return work


def auto_chunk_size(permutations: int, work: float) -> int:
    """The chunk size ``"auto"`` resolves to, for runs of ``work`` gradients each."""
    by_work = max(1, round(AUTO_CHUNK_WORK / max(work, 1e-9)))
    by_groups = max(1, permutations // MIN_CHUNKS)
    return max(1, min(by_work, by_groups, MAX_AUTO_CHUNK))


@dataclass(frozen=True)
class Chunks:
    """Permutations ``0..permutations-1`` in chunks of ``size``."""

    permutations: int
    size: int

    @classmethod
    def of(cls, spec: StudySpec) -> Chunks:
        return cls(spec.training.permutations, spec.training.chunk_size)

    @property
    def count(self) -> int:
        return -(-self.permutations // self.size)

    def indices(self, chunk: int) -> range:
        """The permutation indices of ``chunk``."""
        return range(chunk * self.size, min((chunk + 1) * self.size, self.permutations))


@dataclass(frozen=True)
class Item:
    """A work item: config ``config`` (its index in the spec) and ``chunk``, or its
    predictions when ``chunk`` is None."""

    config: int
    chunk: int | None = None


def work(spec: StudySpec, done: Callable[[str, int], bool]) -> list[Item]:
    """Every config's predictions, then the chunks ``done(config_id, chunk)`` says are
    not in the store yet, in config and chunk order."""
    chunks = Chunks.of(spec)
    items = [Item(c.index) for c in spec.configs]
    items += [
        Item(c.index, chunk)
        for c in spec.configs
        for chunk in range(chunks.count)
        if not done(c.id, chunk)
    ]
    return items

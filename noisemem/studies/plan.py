"""How a study's work is split: chunks of permutations, and the work items a driver hands out.

A config's permutations ``0..P-1`` are cut into chunks of ``training.chunk_size``
consecutive indices (the last one may be shorter). A work item is a config's predictions
(``chunk=None``) or one chunk of it. Batch orders depend only on the seed and the
permutation index, so results never depend on the chunking or on which actor ran an item.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from noisemem.studies.spec import StudySpec


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

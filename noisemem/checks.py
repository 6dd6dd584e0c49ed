"""Argument checks shared by the engine and the study service: one spelling of each rule.

Every check raises ``error`` (``ValueError`` unless the caller passes a subclass, as the
study spec does with its ``SpecError``) with one line of the form

    [OWNER: ]NAME=VALUE is not allowed; WHAT IS ALLOWED

before any work starts. Integers are Python or numpy integers, never bools (``True`` is not
a count); real numbers are ints or floats, never bools.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

#: batch orders (THEORY §4): fixed batches permuted each epoch; samples reshuffled into fresh
#: batches each epoch; batches drawn independently with replacement
SAMPLINGS = ("permute", "reshuffle", "replacement")
#: seeds and order indices lie in [0, 2^32): numpy's SeedSequence splits a larger integer
#: into 32-bit words, so (2^32, 0) and (0, 1) would give the same entropy, the same order
SEED_LIMIT = 1 << 32

_BOOLS = (bool, np.bool_)


def not_allowed(
    name: str, value: object, allowed: str, *, owner: str = "", error: type[ValueError] = ValueError
) -> ValueError:
    """The one-line error every check raises (returned, so that callers ``raise`` it)."""
    prefix = f"{owner}: " if owner else ""
    return error(f"{prefix}{name}={value!r} is not allowed; {allowed}")


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def is_integer(value: object) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, _BOOLS)


def is_real(value: object) -> bool:
    """An int or a float (numpy's included), not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, _BOOLS
    )


def integer(
    name: str,
    value: object,
    low: int = 0,
    high: float = math.inf,
    *,
    allowed: str | None = None,
    owner: str = "",
    error: type[ValueError] = ValueError,
) -> int:
    """``value`` as an int in ``[low, high]``."""
    if not (is_integer(value) and low <= value <= high):  # type: ignore[operator]
        if allowed is None:
            allowed = f"it must be an integer >= {low}"
            if high != math.inf:
                allowed = f"it must be an integer in [{low}, {high:g}]"
        raise not_allowed(name, value, allowed, owner=owner, error=error)
    return int(value)  # type: ignore[call-overload]


def seed(name: str, value: object, *, error: type[ValueError] = ValueError) -> int:
    """A seed or order index: an int in [0, 2**32) (see :data:`SEED_LIMIT`)."""
    return integer(
        name, value, 0, SEED_LIMIT - 1, allowed="it must be an int in [0, 2**32)", error=error
    )


def real(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    allowed: str,
    owner: str = "",
    error: type[ValueError] = ValueError,
) -> float:
    """A finite real number in the interval given by ``low``/``high`` (open where said)."""
    ok = is_real(value) and math.isfinite(value)  # type: ignore[arg-type]
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        raise not_allowed(name, value, allowed, owner=owner, error=error)
    return float(value)  # type: ignore[arg-type]


def flag(
    name: str,
    value: object,
    *,
    words: str = "True or False",
    owner: str = "",
    error: type[ValueError] = ValueError,
) -> bool:
    """A bool (``words``: how the caller's users spell the two values)."""
    if not isinstance(value, bool):
        raise not_allowed(name, value, f"it must be {words}", owner=owner, error=error)
    return value


def choice(
    name: str, value: object, allowed: Sequence[str], *, error: type[ValueError] = ValueError
) -> str:
    """One of the strings ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise not_allowed(name, value, f"use one of {', '.join(allowed)}", error=error)
    return value


def check_sequence(sequence: Sequence[int] | Tensor, num_batches: int) -> list[int]:
    """A batch sequence: non-empty, integer indices in ``[0, num_batches)``."""
    seq = sequence.tolist() if isinstance(sequence, Tensor) else list(sequence)
    if len(seq) == 0:
        raise ValueError("sequence: got an empty batch sequence; give at least one batch index")
    for j, i in enumerate(seq):
        if not is_integer(i):
            try:  # integral floats (2.0) are taken; bools are not indices
                ok = int(i) == i and not isinstance(i, _BOOLS)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"sequence[{j}]={i!r} is not an integer batch index")
            i = int(i)
        if not 0 <= i < num_batches:
            raise ValueError(
                f"sequence[{j}]={i} is out of range; batch indices must lie in "
                f"[0, {num_batches}) (there are {num_batches} batches)"
            )
    return [int(i) for i in seq]


def sequence_array(sequence: Sequence[int] | Tensor | np.ndarray, num_batches: int) -> np.ndarray:
    """:func:`check_sequence` as an int64 array; integer arrays and tensors are checked
    without a Python loop (the engine takes one sequence per sampled order)."""
    if isinstance(sequence, Tensor):
        sequence = sequence.detach().cpu().numpy()
    if isinstance(sequence, np.ndarray):
        arr = sequence
    else:  # a list of Python ints (numpy would take a bool among them as 0 or 1)
        items = list(sequence)
        arr = None
        if not set(_BOOLS).intersection(map(type, items)):
            try:
                arr = np.asarray(items)
            except (TypeError, ValueError):
                arr = None
    if arr is not None and arr.ndim == 1 and arr.dtype.kind in "iu" and arr.size:
        if 0 <= arr.min() and arr.max() < num_batches:
            return arr.astype(np.int64, copy=False)
    return np.asarray(check_sequence(sequence, num_batches), dtype=np.int64)

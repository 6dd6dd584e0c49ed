"""The engine's one process-level choice: glibc keeps freed memory for reuse.

Why the allocator matters. A double backward pass through the batch gradients' graph, the
window of Eq. (9) and the kernel's outputs allocate and free many temporaries of 0.1 to
tens of MB (activations of every batch, (m, d) arrays). By default glibc serves blocks
above 128 KiB (a threshold that grows only to the largest block freed so far) with a fresh
``mmap`` and returns them on ``free``, and trims the heap's top whenever more than twice
that threshold is free there. Every such temporary then costs one page fault per 4 KiB page
when first written, which on the virtual machines measured here is about 0.5 ns a byte,
several times the cost of writing it: a GELU double backward on the digits MLP's
activations ran at 2 ns an element instead of 0.2, a 3-op Phi evaluation 10 epochs deep took
26 ms instead of 4.7, and Eq. (9) cost 10-30% more gradients in a fresh process than after
the setting below (``benchmarks/bench_engine.py`` measures both ways).

The fix is not one the engine can make buffer by buffer (most temporaries are autograd's
own), so the engine makes it once for the process, on its first computation
(:func:`engine_allocator`, called when a :class:`~noisemem.problem.Problem` is built):
:func:`keep_freed_memory` raises glibc's mmap threshold to 32 MiB and its trim threshold to
1 GiB, so freed blocks stay in the heap and later temporaries reuse warm pages. The cost:
up to about 1 GiB of freed memory stays with the process instead of going back to the OS
(it is reused by the next allocation; ``malloc_trim`` releases it). Set the environment
variable ``NOISEMEM_KEEP_FREED_MEMORY=0`` before the first computation to keep glibc's
defaults. It does nothing off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
#: glibc's largest allowed mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2)
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; True if glibc accepted the settings."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    ok &= mallopt(M_TOP_PAD, 64 * 1024 * 1024) == 1
    return bool(ok)


#: set to 0 (or false, no, off) to keep glibc's defaults (read on the first computation)
ENV_KEEP_FREED_MEMORY = "NOISEMEM_KEEP_FREED_MEMORY"
_engine_choice: bool | None = None


def engine_allocator() -> bool:
    """Apply :func:`keep_freed_memory` once per process unless ``NOISEMEM_KEEP_FREED_MEMORY``
    says 0 (module docstring); True if the setting is in force. Later calls return the
    first answer at once."""
    global _engine_choice
    if _engine_choice is None:
        off = os.environ.get(ENV_KEEP_FREED_MEMORY, "1").strip().lower()
        _engine_choice = off not in ("0", "false", "no", "off") and keep_freed_memory()
    return _engine_choice

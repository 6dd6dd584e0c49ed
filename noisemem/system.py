"""Process-level settings that make the engine's large temporaries cheap.

The engine's window computations allocate and free many temporaries of tens of MB (for the
digits MLP 10 epochs deep, 559 x 9610 floats = 21 MB each). glibc hands blocks that large to
the OS on free and maps fresh pages on the next allocation, so every temporary pays one page
fault per 4 KiB page; on the virtual machines measured here that made a 3-op Phi evaluation
cost 26 ms instead of 4.7 ms. :func:`keep_freed_memory` asks glibc to serve such blocks from
the heap and keep freed memory, so later temporaries reuse warm pages. It is a process-wide
setting: the study actors, the job entry point and the benchmarks call it; call it yourself
in a notebook if you like. It does nothing off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

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

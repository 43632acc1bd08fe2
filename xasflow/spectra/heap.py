"""Keep the heap that batched preparation frees, for its next batch (glibc's ``mallopt``).

A 64-row page of 1,000-point spectra makes arrays of 512 kB by the dozen, several MB live at
once. With glibc's defaults the heap above 1 MB free is handed back to the system after each
batch (the trim threshold follows the largest array freed, twice it) and every page of the
next batch's arrays is faulted in anew: 1,100 page faults per 64-row ``prepare_batch``, 15-18 %
of its time in the kernel (``bench/prepare_batch.py``'s page). Fixed thresholds keep arrays
under 32 MB on the heap (glibc's own ceiling for its sliding threshold) and up to 64 MB of it
for reuse. The numbers computed do not change; only where their memory comes from.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "retain_heap"]

#: bytes: allocations below this come from the heap, not a fresh mapping each
MMAP_THRESHOLD = 32 * 2**20
#: bytes: free heap above this is handed back to the system
TRIM_THRESHOLD = 64 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
#: the environment's own malloc settings, which are left to stand
_USER_SET = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


@cache
def retain_heap() -> bool:
    """Set the thresholds once per process (glibc only); whether they were set. Left alone
    where the environment sets malloc's own (``MALLOC_*_`` or ``GLIBC_TUNABLES``)."""
    if any(key in os.environ for key in _USER_SET) or "malloc" in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library: glibc, musl (a stub)
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )

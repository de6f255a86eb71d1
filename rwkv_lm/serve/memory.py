"""Handing freed memory back to the operating system, where the C library keeps it.

The prefix cache drops states (135 KB to a few MB each) as it keeps to its budget, and glibc's malloc keeps the
freed memory in its arenas (one per thread that allocated) for reuse instead of returning it: after a soak of
3,300 streams the server's RSS stood 23% above its start plus the cache's full budget (bench/RESULTS.md, issue
18). `malloc_trim` returns the free pages of every arena; it is called after every `TRIM_EVERY` bytes dropped,
not per entry, as it walks the heaps.
"""
from __future__ import annotations

import ctypes
import ctypes.util

TRIM_EVERY = 64 << 20  # bytes freed between two trims


def _malloc_trim():
    """glibc's malloc_trim, or None on another C library (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class FreedMemory:
    """Counts bytes freed and trims the heap once they add up to TRIM_EVERY."""

    _trim = _malloc_trim()

    def __init__(self):
        self.pending = 0

    def freed(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= TRIM_EVERY and self._trim is not None:
            self.pending = 0
            self._trim(0)

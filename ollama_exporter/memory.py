"""Allocator settings that let the memory of a burst go back to the operating system afterwards.

A burst (thousands of model names coming and going, a connection flood) raises the exporter's memory
for its duration; when it is over, the Python objects are freed, but glibc's malloc keeps the freed
space in its heaps, fragmented by the few objects still alive, so the resident size stayed at the
burst's high-water mark. benchmarks/bench_soak.py measured it: 1 000 names and 450 flooding connections
left 4.8 MB free inside malloc's heaps (mallinfo2) and RSS 13-18 % above a fresh start, with the live
Python objects back where they started. With every block of 16 KB or more in its own mapping (returned
to the system when freed; glibc's default threshold grows up to 32 MB with the sizes it sees) and at
most two heaps for all threads (one per thread that allocates, by default), that space goes back.

Only glibc has mallopt(); elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD = 16 * 1024  # a response chunk, a rendered family, a body: each its own mapping
ARENA_MAX = 2


def tune_allocator() -> bool:
    """Apply the settings (call before starting threads: arenas are per thread); True if glibc took them."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_ARENA_MAX, ARENA_MAX) == 1
    if not ok:
        log.debug("malloc settings not applied", extra={"reason": "mallopt refused them"})
    return ok

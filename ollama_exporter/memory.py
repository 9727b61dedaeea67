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

The cyclic garbage collector is the other thing a burst of work sets off: at 2 000 models a full
collection walks every object the exporter holds (the parsed inventory, the rendered sections) for
~20 ms with the interpreter lock held, and a scrape that lands in it waits that long. Nearly all of
those objects are long-lived and free of cycles, so after every poll they are moved out of the
collector's sight (gc.freeze: it then walks only what is new), and once every FULL_COLLECT_EVERY they
are given back to it for one full collection, so cycles among them are still reclaimed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD = 16 * 1024  # a response chunk, a rendered family, a body: each its own mapping
ARENA_MAX = 2
FULL_COLLECT_EVERY = 600.0  # seconds between full collections of what polls left frozen


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


class QuietCollector:
    """Keeps long-lived objects out of the cyclic collector's walks; see the module's docstring."""

    def __init__(self, full_every: float = FULL_COLLECT_EVERY, clock=time.monotonic):
        self.full_every = full_every
        self.clock = clock
        self._last_full = clock()

    def after_poll(self) -> None:
        """Call when a poll has published: what it built is long-lived now."""
        if self.clock() - self._last_full >= self.full_every:
            gc.unfreeze()
            gc.collect()
            self._last_full = self.clock()
        gc.freeze()

"""Allocator settings that let the memory of a burst go back to the operating system afterwards.

A burst (thousands of model names coming and going, a connection flood) raises the exporter's memory
for its duration; when it is over, the Python objects are freed, but glibc's malloc keeps the freed
space in its heaps, fragmented by the few objects still alive, so the resident size stayed at the
burst's high-water mark. benchmarks/bench_soak.py measured it: 1 000 names and 450 flooding connections
left 4.8 MB free inside malloc's heaps (mallinfo2) and RSS 13-18 % above a fresh start, with the live
Python objects back where they started. With every block of 16 KB or more in its own mapping (returned
to the system when freed; glibc's default threshold grows up to 32 MB with the sizes it sees) and at
most two heaps for all threads (one per thread that allocates, by default), that space goes back.

What stays in malloc's heaps after a burst is space freed in the middle of a heap, which glibc gives
back only from a heap's top; so after a poll, at most every TRIM_EVERY, once at least TRIM_ABOVE more
is free in the heaps than after the last trim, malloc_trim() gives back every free page in them
(0.4 MB of the 1.2 MB a 1 000-name smoke of bench_soak.py left in the main heap).

Only glibc has mallopt(), mallinfo2() and malloc_trim(); elsewhere (musl, macOS) this does nothing.

When the poller forgets models, what a burst of names built is being freed, and two things would keep
part of it resident: the interpreter's free lists (up to 2 000 tuples of each length, ready for reuse,
and the last ones freed are the burst's) and the heaps' free pages below live blocks. So after a poll
that forgot models (at most every AFTER_FORGET) a full collection empties the free lists, and the heaps
are trimmed whatever the amount freed.

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
from typing import Callable, Optional

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD = 16 * 1024  # a response chunk, a rendered family, a body: each its own mapping
ARENA_MAX = 2
FULL_COLLECT_EVERY = 600.0  # seconds between full collections of what polls left frozen
TRIM_EVERY = 10.0  # seconds between looks at how much the heaps hold free
TRIM_ABOVE = 1 << 20  # bytes freed in the heaps since the last trim that are worth a trim
AFTER_FORGET = 10.0  # seconds: the least between two clean-ups after polls that forgot models


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc_function(name: str, restype, argtypes: list):
    """A function of the C library, or None where there is none by that name (not glibc)."""
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.restype, function.argtypes = restype, argtypes
    return function


def tune_allocator() -> bool:
    """Apply the settings (call before starting threads: arenas are per thread); True if glibc took them."""
    mallopt = _libc_function("mallopt", ctypes.c_int, [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_ARENA_MAX, ARENA_MAX) == 1
    if not ok:
        log.debug("malloc settings not applied", extra={"reason": "mallopt refused them"})
    return ok


class HeapTrimmer:
    """Gives the free pages of malloc's heaps back once a burst has freed enough; see the module's docstring."""

    def __init__(self, every: float = TRIM_EVERY, above: int = TRIM_ABOVE, clock=time.monotonic):
        self.every, self.above, self.clock = every, above, clock
        self._info = _libc_function("mallinfo2", _MallInfo2, [])
        self._trim = _libc_function("malloc_trim", ctypes.c_int, [ctypes.c_size_t])
        self._looked = clock()
        self._low: Optional[int] = None  # the least free in the heaps since the last trim
        self._released = False  # told a burst was freed since the last trim
        self.trims = 0

    def after_poll(self, released: bool = False) -> None:
        """`released`: a burst's objects were just freed (models forgotten): the next look trims
        whatever the amount."""
        self._released = self._released or released
        if self._info is None or self._trim is None or self.clock() - self._looked < self.every:
            return
        self._looked = self.clock()
        free = self._info().fordblks
        self._low = free if self._low is None else min(self._low, free)
        if self._released or free - self._low >= self.above:
            self._trim(0)
            self.trims += 1
            self._released = False
            self._low = self._info().fordblks  # trimmed pages still count as free: measure from here


class QuietCollector:
    """Keeps long-lived objects out of the cyclic collector's walks; see the module's docstring."""

    def __init__(self, full_every: float = FULL_COLLECT_EVERY, clock=time.monotonic):
        self.full_every = full_every
        self.clock = clock
        self._last_full = clock()

    def after_poll(self, released: bool = False) -> None:
        """Call when a poll has published: what it built is long-lived now. `released`: a burst's objects
        were just freed (models forgotten): a full collection also empties the free lists."""
        if self.clock() - self._last_full >= self.full_every or released:
            gc.unfreeze()
            gc.collect()  # the oldest generation: the interpreter's free lists are emptied too
            self._last_full = self.clock()
        gc.freeze()


def after_each_poll(forgotten: Callable[[], int] = lambda: 0, clock=time.monotonic) -> Callable[[], None]:
    """What the daemon runs after every poll: what the poll left alive is frozen, then the heaps are
    trimmed if a burst freed enough in them; after polls that forgot models (`forgotten()`: how many
    so far), at most every AFTER_FORGET, a full collection and a trim (see the module's docstring)."""
    collector, trimmer = QuietCollector(), HeapTrimmer()
    seen = [forgotten(), clock()]  # forgotten() at the last clean-up, and when that was

    def after_poll() -> None:
        count, now = forgotten(), clock()
        released = count != seen[0] and now - seen[1] >= AFTER_FORGET
        if released:
            seen[:] = [count, now]
        collector.after_poll(released)
        trimmer.after_poll(released)
    return after_poll

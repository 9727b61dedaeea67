"""One copy of each equal immutable value, for the values thousands of models repeat.

Each row of /api/tags or /api/ps and each /api/show answer decodes its own copies of the server's few
formats, families, quantizations and capability lists, and each model its own tuple of event counts;
kept per model, those are a dozen small objects that outlive the poll, and in a burst of names they set
how much memory the burst leaves behind (the allocator keeps what a burst's high-water mark touched).
"""

from __future__ import annotations

from typing import Any


class SharedValues:
    """Hands out the copy of a value handed out before, if an equal one was; else remembers the value.
    Only for values that are equal exactly when they are interchangeable (strings, tuples of strings or
    of ints, frozen dataclasses of those: never 1 and 1.0 together). Bounded: emptied when `limit`
    values are held, so a source sending ever new values cannot grow it. Safe across threads (a race
    at worst hands out two copies)."""

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self._table: dict = {}

    def __call__(self, value: Any) -> Any:
        got = self._table.get(value)
        if got is None:
            if len(self._table) >= self.limit:
                self._table.clear()
            got = self._table.setdefault(value, value)
        return got

    def __len__(self) -> int:
        return len(self._table)

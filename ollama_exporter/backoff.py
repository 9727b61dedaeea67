"""Retry timing shared by every source that retries: a delay that doubles from `first` up to `cap`."""

from __future__ import annotations

MAX_SECONDS = 300.0


class Backoff:
    """After each failure, wait twice as long as last time (at least `first`, at most `cap`)."""

    def __init__(self, first: float, cap: float = MAX_SECONDS):
        self.first, self.cap = first, cap
        self.delay = 0.0  # the current wait; 0 after a success
        self.until = 0.0  # no retry before this time

    def ready(self, now: float) -> bool:
        return now >= self.until

    def fail(self, now: float) -> float:
        """Record a failure at `now`; returns the wait before the next try."""
        self.delay = min(max(self.first, self.delay * 2), self.cap)
        self.until = now + self.delay
        return self.delay

    def reset(self) -> None:
        self.delay, self.until = 0.0, 0.0

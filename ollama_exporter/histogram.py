"""A histogram the exporter fills itself (probes, log traffic); its value is a snapshot.HistogramValue.

Counts are kept per bucket (one `bisect` per observation) and made cumulative only when a value is
taken; `counts` and `sum` are plain numbers, so the log source can persist them and restore them.
"""

from __future__ import annotations

import bisect
from typing import Optional

from ollama_exporter.snapshot import HistogramValue


class Histogram:
    def __init__(self, buckets: tuple[float, ...], counts: Optional[list[int]] = None, total: float = 0.0):
        self.buckets = buckets
        self.counts = counts if counts is not None else [0] * (len(buckets) + 1)  # per bucket, then +Inf
        self.sum = total

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def value(self) -> HistogramValue:
        cumulative, running = [], 0
        for c in self.counts[:-1]:
            running += c
            cumulative.append(running)
        return HistogramValue(self.buckets, tuple(cumulative), running + self.counts[-1], self.sum)

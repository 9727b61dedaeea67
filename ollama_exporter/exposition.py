"""Render the exposition once per snapshot and hand the same bytes to every scrape.

Rendering thousands of series with prometheus_client costs tens of milliseconds, and the data only
changes once per poll, so a scrape must not pay for it. `Exposition.update` renders, in the poll thread,
every format scrapers have negotiated so far (text 0.0.4 always; OpenMetrics, which Prometheus asks for,
once it has been asked for), plain and gzipped as they were requested.
"""

from __future__ import annotations

import gzip
import threading
from typing import Callable

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder

from ollama_exporter.metrics import SnapshotCollector
from ollama_exporter.snapshot import Snapshot

MAX_VARIANTS = 8  # content types are client-chosen; bound what one snapshot may hold


def render(snapshot: Snapshot, accept: str = "") -> tuple[bytes, str]:
    """Encode one snapshot alone (no runtime metrics) in the format `accept` negotiates; for --once."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(SnapshotCollector(lambda: snapshot))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


class Exposition:
    """The registry the daemon serves, and a per-snapshot cache of its rendered bodies.

    The registry holds the snapshot collector plus the process/Python runtime collectors. Every render
    happens under one lock with `_current` fixed, so each cached body describes exactly one snapshot.
    """

    def __init__(self, runtime_metrics: bool = True):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(SnapshotCollector(lambda: self._current))
        if runtime_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self._lock = threading.Lock()
        self._current = Snapshot.empty()
        self._cache: dict[tuple[str, bool], bytes] = {}  # (content type, gzipped) -> body of _current
        encoder, self._default = choose_encoder("")
        self._encoders: dict[str, Callable] = {self._default: encoder}  # content type -> encoder, once kept
        self.update(Snapshot.empty())  # until the first poll: ollama_up 0 and the exporter's own metrics

    @property
    def snapshot(self) -> Snapshot:
        return self._current

    def update(self, snapshot: Snapshot) -> None:
        """Take a new snapshot and render every variant scrapers have asked for (the default always)."""
        with self._lock:
            self._current = snapshot
            wanted, self._cache = list(self._cache) or [(self._default, False), (self._default, True)], {}
            for content_type, gzipped in wanted:
                self._render(content_type, gzipped, self._encoders[content_type])

    def get(self, accept: str = "", accept_encoding: str = "") -> tuple[bytes, str, bool]:
        """The body for a scrape: (bytes, content type, gzipped?).

        A variant is rendered here only the first time any scraper asks for it; from the next snapshot on,
        update() renders it in the poll thread, so a scrape only copies bytes.
        """
        encoder, content_type = choose_encoder(accept)
        gzipped = "gzip" in (accept_encoding or "")
        with self._lock:
            body = self._cache.get((content_type, gzipped)) or self._render(content_type, gzipped, encoder)
        return body, content_type, gzipped

    def _render(self, content_type: str, gzipped: bool, encoder: Callable) -> bytes:
        """Render one variant of the current snapshot (under the lock) and keep it, up to MAX_VARIANTS."""
        body = self._cache.get((content_type, False))
        if body is None:
            body = encoder(self.registry)
            if self._remember((content_type, False), body):
                self._encoders[content_type] = encoder
        if gzipped:
            body = gzip.compress(body, 6)
            self._remember((content_type, True), body)
        return body

    def _remember(self, key: tuple[str, bool], body: bytes) -> bool:
        if len(self._cache) >= MAX_VARIANTS:
            return False  # content types are client-chosen: past the bound, render without keeping
        self._cache[key] = body
        return True

"""Render the exposition once per snapshot and hand the same bytes to every scrape.

Rendering thousands of series with prometheus_client costs tens of milliseconds, and the data only
changes once per poll, so a scrape must not pay for it. `Exposition.update` renders the default text
format (and its gzip) when the poller publishes a snapshot; other negotiated formats (OpenMetrics,
text 1.0.0) are rendered on first request and kept until the next snapshot.
"""

from __future__ import annotations

import gzip
import threading

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
        self._cache: dict[tuple[str, bool], bytes] = {}
        self.update(Snapshot.empty())  # until the first poll: ollama_up 0 and the exporter's own metrics

    @property
    def snapshot(self) -> Snapshot:
        return self._current

    def update(self, snapshot: Snapshot) -> None:
        """Take a new snapshot and pre-render the default format, plain and gzipped."""
        encoder, content_type = choose_encoder("")
        with self._lock:
            self._current = snapshot
            body = encoder(self.registry)
            self._cache = {(content_type, False): body, (content_type, True): gzip.compress(body, 6)}

    def get(self, accept: str = "", accept_encoding: str = "") -> tuple[bytes, str, bool]:
        """The body for a scrape: (bytes, content type, gzipped?). Renders at most once per variant."""
        encoder, content_type = choose_encoder(accept)
        gzipped = "gzip" in (accept_encoding or "")
        with self._lock:
            body = self._cache.get((content_type, gzipped))
            if body is None:
                body = self._cache.get((content_type, False))
                if body is None:
                    body = encoder(self.registry)
                    self._remember((content_type, False), body)
                if gzipped:
                    body = gzip.compress(body, 6)
                    self._remember((content_type, True), body)
        return body, content_type, gzipped

    def _remember(self, key: tuple[str, bool], body: bytes) -> None:
        if len(self._cache) < MAX_VARIANTS:
            self._cache[key] = body

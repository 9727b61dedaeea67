"""Render the exposition once per snapshot and hand the same bytes to every scrape.

Rendering thousands of series with prometheus_client costs tens of milliseconds, and the data only
changes once per poll, so a scrape must not pay for it. `Exposition.update` renders the default text
format (and its gzip) when the poller publishes a snapshot; other negotiated formats (OpenMetrics,
text 1.0.0) are rendered on first request and kept until the next snapshot.
"""

from __future__ import annotations

import gzip
import threading
from typing import Iterable, Optional

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ollama_exporter import metrics
from ollama_exporter.snapshot import Snapshot

MAX_VARIANTS = 8  # content types are client-chosen; bound what one snapshot may hold


class _Families(Collector):
    """A fixed list of families, shaped like a registry for prometheus_client's encoders."""

    def __init__(self, families: Iterable):
        self._families = list(families)

    def collect(self):
        return iter(self._families)


def runtime_registry() -> CollectorRegistry:
    """The process and Python runtime metrics (process_*, python_*), read at render time."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _all_families(snapshot: Snapshot, runtime: Optional[CollectorRegistry]) -> list:
    families = list(metrics.collect(snapshot))
    if runtime is not None:
        families.extend(runtime.collect())
    return families


def render(snapshot: Snapshot, accept: str = "", runtime: Optional[CollectorRegistry] = None) -> tuple[bytes, str]:
    """Encode one snapshot (plus runtime metrics) in the format `accept` negotiates."""
    encoder, content_type = choose_encoder(accept)
    return encoder(_Families(_all_families(snapshot, runtime))), content_type


class Exposition:
    """Per-snapshot cache of rendered bodies keyed by (content type, gzip)."""

    def __init__(self, runtime: Optional[CollectorRegistry] = None):
        self._runtime = runtime
        self._lock = threading.Lock()
        self._snapshot = Snapshot.empty()
        self._cache: dict[tuple[str, bool], bytes] = {}
        self._families: list = []
        self.update(Snapshot.empty())  # until the first poll: ollama_up 0 and the exporter's own metrics

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def update(self, snapshot: Snapshot) -> None:
        """Take a new snapshot and pre-render the default format, plain and gzipped."""
        families = _all_families(snapshot, self._runtime)
        encoder, content_type = choose_encoder("")
        body = encoder(_Families(families))
        with self._lock:
            self._snapshot, self._families = snapshot, families
            self._cache = {(content_type, False): body, (content_type, True): gzip.compress(body, 6)}

    def get(self, accept: str = "", accept_encoding: str = "") -> tuple[bytes, str, bool]:
        """The body for a scrape: (bytes, content type, gzipped?). Renders at most once per variant."""
        encoder, content_type = choose_encoder(accept)
        gzipped = "gzip" in (accept_encoding or "")
        key = (content_type, gzipped)
        with self._lock:
            body = self._cache.get(key)
            if body is None:
                body = self._cache.get((content_type, False))
                if body is None:
                    body = encoder(_Families(self._families))
                    self._remember((content_type, False), body)
                if gzipped:
                    body = gzip.compress(body, 6)
                    self._remember(key, body)
        return body, content_type, gzipped

    def _remember(self, key: tuple[str, bool], body: bytes) -> None:
        if len(self._cache) < MAX_VARIANTS:
            self._cache[key] = body

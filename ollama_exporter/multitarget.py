"""Multi-target mode: `GET /probe?target=<ollama>&module=<name>` scrapes another Ollama on request, the
way blackbox_exporter and snmp_exporter do, so one exporter can serve a fleet found by Prometheus's
service discovery.

An open /probe would let anyone make the exporter connect anywhere (SSRF), so a target must match one of
`multi_target.allow`'s glob patterns, and a refused (403) or malformed (400) target never reaches the
network. The exporter's own Ollama (`ollama.url`) is answered from the local view, GPU, runners, logs
and probes included, so one service discovery can list every host alike. Each other target gets its own
poller (the API sources only: version, ps, tags, show, as its module
says; GPU, runners and logs are the local Ollama's alone), kept in a bounded LRU so its /api/show cache,
counters and probe state survive between scrapes while a service discovery gone wild cannot grow memory
without bound. The deadline is the module's timeout, else Prometheus's scrape timeout
(X-Prometheus-Scrape-Timeout-Seconds) less half a second, as blackbox does. Scrapes run in the server's
worker pool, so a hung target only ever costs its own scrape.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlsplit

from ollama_exporter.config import Config, ConfigError, Module, parse_url, redact_url
from ollama_exporter.exposition import render
from ollama_exporter.ollama import make_client
from ollama_exporter.poller import Poller
from ollama_exporter.prober import Prober
from ollama_exporter.server import Request, Response

log = logging.getLogger(__name__)

TIMEOUT_OFFSET = 0.5  # seconds kept back from Prometheus's scrape timeout for the answer to travel
DEFAULT_TIMEOUT = 10.0  # without the header (a scrape by hand)
MAX_TIMEOUT = 300.0


class TargetError(ValueError):
    """A target or module that is refused: `status` 400 (malformed) or 403 (not allowed)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def target_url(raw: str) -> str:
    """`host:port` means http://host:port; a URL must be http(s), with a host, no credentials or query."""
    text = raw.strip()
    if not text or len(text) > 2048 or any(c.isspace() or ord(c) < 32 for c in text):
        raise TargetError(400, "target: expected host:port or an http(s) URL")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.username is not None or parts.password is not None:
        raise TargetError(400, "target: credentials in a target URL are not accepted")
    try:
        url = parse_url("target", text)
    except ConfigError as exc:
        raise TargetError(400, str(exc)) from None
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


def allowed(url: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(url, pattern) for pattern in patterns)


def deadline_seconds(module: Module, header: Optional[str]) -> float:
    """The module's timeout if set, else the scrape timeout less TIMEOUT_OFFSET (at least 0.1 s)."""
    if module.timeout is not None:
        return module.timeout
    try:
        scrape = float(header) if header else DEFAULT_TIMEOUT + TIMEOUT_OFFSET
    except ValueError:
        scrape = DEFAULT_TIMEOUT + TIMEOUT_OFFSET
    if scrape != scrape or scrape <= 0:  # NaN or nonsense
        scrape = DEFAULT_TIMEOUT + TIMEOUT_OFFSET
    return max(0.1, min(MAX_TIMEOUT, scrape - TIMEOUT_OFFSET))


@dataclass
class _Target:
    poller: Poller
    stop: threading.Event
    lock: threading.Lock


class MultiTarget:
    """The targets scraped through /probe, least recently scraped dropped first past cache_size."""

    def __init__(self, config: Config, local: Optional[Callable[[str], tuple[bytes, str]]] = None):
        self.config = config
        self.local = local  # accept header -> the local Ollama's exposition (the poll loop's latest)
        self._lock = threading.Lock()
        self._targets: "OrderedDict[tuple[str, str], _Target]" = OrderedDict()

    def configure(self, config: Config) -> None:
        """A reload: settings apply to the next scrape; targets whose module changed start afresh."""
        with self._lock:
            old, self.config = self.config, config
            for key in list(self._targets):
                if config.module(key[1]) != old.module(key[1]):
                    self._drop(key)
            self._trim()

    def handle(self, request: Request) -> Response:
        """The /probe endpoint."""
        config = self.config
        try:
            targets, modules = request.query.get("target", []), request.query.get("module", ["default"])
            if len(targets) != 1 or len(modules) != 1:
                raise TargetError(400, "expected one target= parameter (and at most one module=)")
            module = config.module(modules[0])
            if module is None:
                raise TargetError(400, f"unknown module {modules[0][:64]!r}")
            url = target_url(targets[0])
            if not allowed(url, config.multi_target_allow):
                raise TargetError(403, f"target {redact_url(url)} is not allowed by multi_target.allow")
        except TargetError as exc:
            log.debug("probe refused", extra={"status": exc.status, "error": str(exc)})
            return Response.text(exc.status, str(exc))
        accept = request.headers.get("accept", "")
        if self.local is not None and url == target_url(config.ollama_url):
            return Response(200, *self.local(accept))
        seconds = deadline_seconds(module, request.headers.get("x-prometheus-scrape-timeout-seconds"))
        body, content_type = self.scrape(url, module, seconds, accept)
        return Response(200, body, content_type)

    def scrape(self, url: str, module: Module, seconds: float, accept: str = "") -> tuple[bytes, str]:
        deadline = time.monotonic() + seconds
        target = self._target(url, module, seconds)
        if not target.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            snapshot = target.poller.snapshot  # another scrape of it is under way: its last result
        else:
            try:
                target.poller.client.timeout = max(0.05, seconds - 0.2)
                snapshot = target.poller.poll_once(deadline - 0.1)
            finally:
                target.lock.release()
        return render(snapshot, accept)

    def _target(self, url: str, module: Module, seconds: float) -> _Target:
        key = (url, module.name)
        with self._lock:
            target = self._targets.get(key)
            if target is not None:
                self._targets.move_to_end(key)
                return target
            config = self.config
            client = make_client(config, url, max(0.05, seconds - 0.2))  # marked as not user traffic
            poller = Poller(client, config.poll_interval, forget_after=config.poll_forget_after)
            poller.sources = module.sources
            stop = threading.Event()
            if module.probes and config.probes_enabled:
                prober = Prober(client, config, lambda p=poller: p.snapshot, shows="show" in module.sources)
                poller.probe_stats = prober.stats
                threading.Thread(target=prober.run, args=(stop,), name="probe-target", daemon=True).start()
            target = self._targets[key] = _Target(poller, stop, threading.Lock())
            self._trim()
            return target

    def _trim(self) -> None:
        while len(self._targets) > self.config.multi_target_cache_size:
            self._drop(next(iter(self._targets)))

    def _drop(self, key: tuple[str, str]) -> None:
        target = self._targets.pop(key)
        target.stop.set()

    def __len__(self) -> int:
        return len(self._targets)

    def close(self) -> None:
        with self._lock:
            for key in list(self._targets):
                self._drop(key)

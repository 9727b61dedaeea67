"""The polling loop: reads every source with a deadline, builds a Snapshot and swaps it in.

Polling (rather than fetching at scrape time) bounds the load on Ollama however often it is scraped,
sees loads and unloads that happen between scrapes, and means a scrape never waits on Ollama.

Each source call runs in its own daemon thread with a deadline, so a hung endpoint costs at most one
timeout per poll and never delays the other sources; a call still stuck from an earlier poll is not
started again (no pile-up of threads on a wedged server). /api/show is only called for manifest
digests it has not seen, and its answers are cached by digest until the model disappears from
/api/tags, so a steady state makes no /api/show calls at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional

from ollama_exporter import runners
from ollama_exporter.backoff import Backoff
from ollama_exporter.gpu import GpuSource
from ollama_exporter.ollama import OllamaClient
from ollama_exporter.snapshot import (
    ERROR_REASONS,
    GPU_ERROR_REASONS,
    GpuDevice,
    GpuState,
    InstalledModel,
    LoadedModel,
    ReloadStatus,
    ShowInfo,
    Snapshot,
    SourceError,
    SourceStatus,
    frozen_map,
)

log = logging.getLogger(__name__)

API_SOURCES = ("version", "ps", "tags", "show")  # Ollama's endpoints; "show" covers every /api/show call
SOURCES = API_SOURCES + ("gpu",)
SHOW_CONCURRENCY = 4


@dataclass
class Outcome:
    value: Any = None
    error: Optional[SourceError] = None
    duration: float = 0.0


class _Call:
    """One source call in a daemon thread; `wait` returns its Outcome or a timeout at the deadline."""

    def __init__(self, key: str, fn: Callable[[], Any], busy: dict[str, threading.Thread],
                 unexpected: str = "invalid_response"):
        self.key, self.outcome, self.started = key, Outcome(), time.monotonic()
        self.thread: Optional[threading.Thread] = None
        previous = busy.get(key)
        if previous is not None and previous.is_alive():
            self.outcome.error = SourceError("timeout", f"{key}: the previous call has still not returned")
            return
        self.thread = threading.Thread(target=self._run, args=(fn, unexpected), name=f"poll-{key}", daemon=True)
        busy[key] = self.thread
        self.thread.start()

    def _run(self, fn: Callable[[], Any], unexpected: str) -> None:
        try:
            self.outcome.value = fn()
        except SourceError as exc:
            self.outcome.error = exc
        except Exception as exc:  # a bug must not kill the loop; report it under the source's catch-all reason
            log.exception("unexpected error in %s", self.key)
            self.outcome.error = SourceError(unexpected, f"{self.key}: {exc}")
        self.outcome.duration = time.monotonic() - self.started

    def wait(self, deadline: float) -> Outcome:
        if self.thread is not None:
            self.thread.join(max(0.0, deadline - time.monotonic()))
            if self.thread.is_alive():
                return Outcome(error=SourceError("timeout", f"{self.key}: no answer before the poll deadline"),
                               duration=time.monotonic() - self.started)
        return self.outcome


class Poller:
    """Polls Ollama (and the GPU, when `gpu` is given) and publishes a Snapshot per poll.

    `gpu_off_state` is what the snapshot carries when there is no GPU source: None when GPU metrics are
    disabled, GpuState(nvml_up=False) when they were wanted but NVML is not on this machine.
    """

    def __init__(self, client: OllamaClient, interval: float, clock: Callable[[], float] = time.time,
                 gpu: Optional[GpuSource] = None, gpu_off_state: Optional[GpuState] = None,
                 probe_stats: Optional[Callable[[set], Mapping]] = None):
        self.client = client
        self.probe_stats = probe_stats  # prober.Prober.stats, copied into each snapshot
        self.interval = interval
        self.clock = clock
        self.gpu = gpu
        self.gpu_off_state = gpu_off_state
        self._last_gpu: Optional[GpuState] = None
        self._snapshot = Snapshot.empty()
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._busy: dict[str, threading.Thread] = {}  # source -> its call's thread, to avoid pile-ups
        self._show_cache: dict[str, ShowInfo] = {}
        self._show_retry: dict[str, Backoff] = {}  # digest -> when /api/show may be tried again
        self._status: dict[str, SourceStatus] = {}
        self._errors: Counter = Counter({(s, r): 0 for s in API_SOURCES for r in ERROR_REASONS})
        if gpu is not None:
            self._errors.update({("gpu", r): 0 for r in GPU_ERROR_REASONS})
        self._loads: Counter = Counter()
        self._unloads: Counter = Counter()
        self._downgrades: Counter = Counter()
        self._previous_loaded: Optional[dict[str, LoadedModel]] = None
        self._version: Optional[str] = None
        self._installed: tuple[InstalledModel, ...] = ()
        self.reload_status: Optional[ReloadStatus] = None  # set by the daemon, copied into each snapshot
        self._wake = threading.Event()
        self._heartbeat: Optional[float] = None  # monotonic time the last poll finished (the loop is alive)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, listener: Callable[[Snapshot], None]) -> None:
        """Call `listener` with every new snapshot (from the poll thread)."""
        self._listeners.append(listener)

    def stalled_for(self) -> Optional[float]:
        """Seconds since the last poll finished, when that is far longer than a poll can take; else None."""
        if self._heartbeat is None:
            return None
        since = time.monotonic() - self._heartbeat
        return since if since > 3 * self.interval + self.client.timeout + 30 else None

    def wake(self) -> None:
        """Poll now rather than at the end of the interval (after a reload, say)."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Poll every `interval` until `stop` is set; an exception in one poll never ends the loop."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.poll_once()
            except Exception:
                log.exception("poll failed unexpectedly")
            self._heartbeat = time.monotonic()
            self._wake.wait(max(0.0, self.interval - (time.monotonic() - started)))
            self._wake.clear()

    def poll_once(self) -> Snapshot:
        deadline = time.monotonic() + self.client.timeout + 0.5
        calls = {
            "version": _Call("version", self.client.version, self._busy),
            "ps": _Call("ps", self.client.ps, self._busy),
            "tags": _Call("tags", self.client.tags, self._busy),
        }
        if self.gpu is not None:
            calls["gpu"] = _Call("gpu", self.gpu.sample, self._busy, unexpected="unknown")
        outcomes = {name: call.wait(deadline) for name, call in calls.items()}
        now = self.clock()
        for name, outcome in outcomes.items():
            self._record(name, outcome, now)

        if outcomes["version"].error is None:
            self._version = outcomes["version"].value
        if outcomes["tags"].error is None:
            self._installed = tuple(outcomes["tags"].value)
            self._evict_show_cache()
            self._record("show", self._fetch_show(now), now)
        installed = tuple(self._with_show(m) for m in self._installed)

        loaded: tuple[LoadedModel, ...] = ()
        if outcomes["ps"].error is None:
            loaded = tuple(outcomes["ps"].value)
            self._count_transitions(loaded, now)

        for name in [m.name for m in installed] + [m.name for m in loaded]:
            self._loads[name] += 0
            self._unloads[name] += 0
            self._downgrades[name] += 0

        gpu = self._gpu_state(outcomes.get("gpu"))
        model_gpu, unattributed = (), {}
        if gpu is not None and gpu.nvml_up and outcomes["ps"].error is None:
            processes = [p for d in gpu.devices for p in d.processes]
            model_gpu, unattributed = runners.attribute(processes, loaded, installed)

        snapshot = Snapshot(
            timestamp=now,
            ready=True,
            up=outcomes["version"].error is None and outcomes["ps"].error is None,
            version=self._version,
            installed=installed,
            loaded=loaded,
            sources=tuple(self._status[s] for s in SOURCES if s in self._status),
            loads_total=frozen_map(self._loads),
            unloads_total=frozen_map(self._unloads),
            keep_alive_downgrades_total=frozen_map(self._downgrades),
            errors_total=frozen_map(self._errors),
            gpu=gpu,
            model_gpu_memory=model_gpu,
            gpu_unattributed=frozen_map(unattributed),
            probes=self.probe_stats(self._known_names(loaded)) if self.probe_stats else None,
            reload=self.reload_status,
        )
        self._snapshot = snapshot
        for listener in self._listeners:
            listener(snapshot)
        return snapshot

    # --- helpers ---

    def _known_names(self, loaded: tuple[LoadedModel, ...]) -> Optional[set]:
        """Installed or loaded model names, or None while /api/tags has never answered (nothing is known gone)."""
        tags = self._status.get("tags")
        if not tags or tags.last_success is None:
            return None
        return {m.name for m in self._installed} | {m.name for m in loaded}

    def _gpu_state(self, outcome: Optional[Outcome]) -> Optional[GpuState]:
        """This poll's GPU state; after a failed sample, the GPUs last seen are reported down."""
        if outcome is None:
            return self.gpu_off_state
        if outcome.error is None:
            self._last_gpu = outcome.value
            for reason in outcome.value.errors:
                self._errors[("gpu", reason)] += 1
            return outcome.value
        last = self._last_gpu.devices if self._last_gpu else ()
        return GpuState(nvml_up=False, driver_version=self._last_gpu.driver_version if self._last_gpu else "",
                        devices=tuple(GpuDevice(d.index, d.uuid, d.name, d.pci_bus_id, up=False) for d in last))

    def _record(self, name: str, outcome: Outcome, now: float) -> None:
        previous = self._status.get(name)
        last_success = previous.last_success if previous else None
        if outcome.error is None:
            status = SourceStatus(name, True, outcome.duration, now)
            if previous is not None and not previous.up:
                log.info("source %s recovered", name)
        else:
            self._errors[(name, outcome.error.reason)] += 1
            status = SourceStatus(name, False, outcome.duration, last_success, outcome.error.reason, str(outcome.error))
            if previous is None or previous.up or previous.error != status.error:
                log.warning("source %s failed (%s): %s", name, outcome.error.reason, outcome.error)
        self._status[name] = status

    def _evict_show_cache(self) -> None:
        digests = {m.digest for m in self._installed}
        for digest in list(self._show_cache):
            if digest not in digests:
                del self._show_cache[digest]
        for digest in list(self._show_retry):
            if digest not in digests:
                del self._show_retry[digest]

    def _fetch_show(self, now: float) -> Outcome:
        """Call /api/show for digests not yet cached (bounded concurrency); one Outcome for them all."""
        wanted: dict[str, str] = {}
        for model in self._installed:
            retry = self._show_retry.get(model.digest)
            if model.digest not in self._show_cache and model.digest not in wanted and (not retry or retry.ready(now)):
                wanted[model.digest] = model.name
        started, first_error = time.monotonic(), None
        items = list(wanted.items())
        for i in range(0, len(items), SHOW_CONCURRENCY):
            batch = items[i : i + SHOW_CONCURRENCY]
            deadline = time.monotonic() + self.client.timeout + 0.5
            calls = [(d, _Call(f"show {n}", lambda n=n: self.client.show(n), self._busy)) for d, n in batch]
            for digest, call in calls:
                outcome = call.wait(deadline)
                if outcome.error is None:
                    self._show_cache[digest] = outcome.value
                    self._show_retry.pop(digest, None)
                else:
                    self._show_retry.setdefault(digest, Backoff(self.interval)).fail(now)
                    first_error = first_error or outcome.error
        return Outcome(error=first_error, duration=time.monotonic() - started)

    def _with_show(self, model: InstalledModel) -> InstalledModel:
        info = self._show_cache.get(model.digest)
        return replace(model, show=info) if info is not None else model

    def _count_transitions(self, loaded: tuple[LoadedModel, ...], now: float) -> None:
        current = {m.name: m for m in loaded}
        previous = self._previous_loaded
        if previous is not None:
            for name, row in current.items():
                before = previous.get(name)
                if before is None:
                    self._loads[name] += 1
                    log.info("model %s loaded", name)
                    continue
                if before.identity != row.identity:  # replaced between polls: a reload
                    self._unloads[name] += 1
                    self._loads[name] += 1
                    log.info("model %s reloaded", name)
                if before.pinned(now) and not row.pinned(now) and not row.stopping(now):
                    # a runner that a reload without keep_alive replaced, or a client that set a finite one
                    self._downgrades[name] += 1
                    log.warning("pinned model became finite", extra={"model": name, "expires_at": row.expires_at})
            for name in previous.keys() - current.keys():
                self._unloads[name] += 1
                log.info("model %s unloaded", name)
        self._previous_loaded = current

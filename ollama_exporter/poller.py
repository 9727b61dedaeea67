"""The polling loop: reads every source with a deadline, builds a Snapshot and swaps it in.

Polling (rather than fetching at scrape time) bounds the load on Ollama however often it is scraped,
sees loads and unloads that happen between scrapes, and means a scrape never waits on Ollama.

Each source call runs in its own daemon thread with a deadline (the HTTP client enforces it to the
byte, so a call cannot outlive it; NVML can, and a call still stuck from an earlier poll is not started
again). /api/show is fetched in the background (showcache.py), only for manifest digests it has not
seen, so a slow /api/show never holds up a poll and a steady state makes no /api/show calls at all.

A model name that has been in neither /api/tags nor /api/ps for `forget_after` seconds is forgotten
(its counters and probe results go), so names that come and go cannot pile up series; rows an answer
could not give (over `max_models`, invalid, duplicated) are counted in
ollama_exporter_dropped_models_total and said once in the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional

from ollama_exporter import runners
from ollama_exporter.config import API_SOURCES
from ollama_exporter.gpu import GpuSource
from ollama_exporter.logfollow import LogFollower
from ollama_exporter.ollama import DROP_REASONS, OllamaClient, Rows
from ollama_exporter.runner_slots import RunnerSource, RunnersState
from ollama_exporter.showcache import ShowCache
from ollama_exporter.snapshot import (
    ERROR_REASONS,
    GPU_ERROR_REASONS,
    GpuDevice,
    GpuState,
    InstalledModel,
    LoadedModel,
    ReloadStatus,
    Snapshot,
    SourceError,
    SourceStatus,
    frozen_map,
)

log = logging.getLogger(__name__)

SOURCES = API_SOURCES + ("gpu", "runners")
SHOW_CONCURRENCY = 4
STALL_GRACE = 30.0  # seconds beyond 3 intervals and a timeout before a loop that publishes nothing is stalled
MAX_WAIT = 3600.0  # the longest wait between polls (Event.wait overflows on absurd intervals)
_SHOW_POOL: Optional[ThreadPoolExecutor] = None


def show_pool() -> ThreadPoolExecutor:
    """The process-wide pool /api/show calls run in (for every poller and multi-target view)."""
    global _SHOW_POOL
    if _SHOW_POOL is None:
        _SHOW_POOL = ThreadPoolExecutor(SHOW_CONCURRENCY, thread_name_prefix="show")
    return _SHOW_POOL


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
            log.exception("unexpected error in a source", extra={"source": self.key})
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
                 probe_stats: Optional[Callable[[set], Mapping]] = None, forget_after: float = 3600.0,
                 pool: Optional[Executor] = None,
                 logs: Optional[LogFollower] = None,
                 runner_source: Optional[RunnerSource] = None, runners_required: bool = False):
        self.client = client
        self.probe_stats = probe_stats  # prober.Prober.stats, copied into each snapshot
        self.logs = logs  # the logs source: its published counters are copied into each snapshot
        self.runner_source = runner_source  # sampled once per poll, after /api/ps
        self.runners_required = runners_required  # runners.enabled true: report the source even with no runner
        self.interval = interval
        self.forget_after = forget_after
        self.clock = clock
        self.gpu = gpu
        self.gpu_off_state = gpu_off_state
        self._last_gpu: Optional[GpuState] = None
        self._snapshot = Snapshot.empty()
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._busy: dict[str, threading.Thread] = {}  # source -> its call's thread, to avoid pile-ups
        self.shows = ShowCache(lambda name: self.client.show(name), pool or show_pool(), interval, clock)
        self.settle_shows = False  # wait for new /api/show answers within the poll (--once, probe command)
        self.sources: tuple[str, ...] = API_SOURCES  # which of Ollama's endpoints to read (multi-target modules)
        self._seen: dict[str, float] = {}  # model name -> when it was last in /api/tags or /api/ps
        self.forgotten = 0  # model names forgotten so far (what they held was freed: see memory.after_each_poll)
        self._dropped: Counter = Counter({(s, r): 0 for s in ("ps", "tags") for r in DROP_REASONS})
        self._status: dict[str, SourceStatus] = {}
        self._errors: Counter = Counter({(s, r): 0 for s in API_SOURCES for r in ERROR_REASONS})
        if gpu is not None:
            self._errors.update({("gpu", r): 0 for r in GPU_ERROR_REASONS})
        if runner_source is not None:
            self._errors.update({("runners", r): 0 for r in ERROR_REASONS})
        self._loads: Counter = Counter()
        self._unloads: Counter = Counter()
        self._downgrades: Counter = Counter()
        self._previous_loaded: Optional[dict[str, LoadedModel]] = None
        self._version: Optional[str] = None
        self._installed: tuple[InstalledModel, ...] = ()
        self._joined: tuple[InstalledModel, ...] = ()  # _installed with show info, as last published
        self._joined_memo: dict[str, tuple] = {}  # model name -> (tags row, its ShowInfo, the two joined)
        self._frozen_last: dict[str, Mapping] = {}
        self.reload_status: Optional[ReloadStatus] = None  # set by the daemon, copied into each snapshot
        self.after_poll: Optional[Callable[[], None]] = None  # run by the loop after each poll (the daemon's GC)
        self._wake = threading.Event()
        self._heartbeat: Optional[float] = None  # monotonic time the last poll finished (the loop is alive)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, listener: Callable[[Snapshot], None]) -> None:
        """Call `listener` with every new snapshot (from the poll thread)."""
        self._listeners.append(listener)

    def stalled_for(self) -> Optional[float]:
        """Seconds since the loop last published a snapshot (or started), when that is far longer than a
        poll can take; else None. A loop that hangs, or whose every poll raises, is stalled: the data is
        frozen, whatever the thread is doing."""
        if self._heartbeat is None:
            return None
        since = time.monotonic() - self._heartbeat
        return since if since > 3 * self.interval + self.client.timeout + STALL_GRACE else None

    def wake(self) -> None:
        """Poll now rather than at the end of the interval (after a reload, say)."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Poll every `interval` until `stop` is set; an exception in one poll never ends the loop."""
        self._heartbeat = time.monotonic()  # a first poll that never ends is a stall too
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.poll_once()
                self._heartbeat = time.monotonic()
                if self.after_poll is not None:
                    self.after_poll()
            except Exception:
                log.exception("poll failed unexpectedly")
            self._wake.wait(min(MAX_WAIT, max(0.0, self.interval - (time.monotonic() - started))))
            self._wake.clear()

    def poll_once(self, deadline: Optional[float] = None) -> Snapshot:
        """One poll of the sources in `sources`, within `deadline` (time.monotonic; default: the timeout)."""
        mark = self.logs.stats.poll_mark() if self.logs is not None else -1
        started = time.time()  # wall clock, as the log sources stamp their reads
        deadline = deadline if deadline is not None else time.monotonic() + self.client.timeout + 0.5
        calls = {name: _Call(name, getattr(self.client, name), self._busy)
                 for name in ("version", "ps", "tags") if name in self.sources}
        if self.gpu is not None:
            calls["gpu"] = _Call("gpu", self.gpu.sample, self._busy, unexpected="unknown")
        outcomes = {name: call.wait(deadline) for name, call in calls.items()}
        now = self.clock()
        for name, outcome in outcomes.items():
            self._record(name, outcome, now)
        answered = {name for name, outcome in outcomes.items() if outcome.error is None}

        if "version" in answered:
            self._version = outcomes["version"].value
        if "tags" in answered:
            self._installed = tuple(outcomes["tags"].value)
            self._count_dropped("tags", outcomes["tags"].value)
            if "show" in self.sources:
                self.shows.update(self._installed)
                if self.settle_shows:
                    self.settle(max(0.0, min(self.client.timeout + 0.5, deadline - time.monotonic())))
        self._record_shows(now)
        installed = self._join_shows()

        loaded: tuple[LoadedModel, ...] = ()
        if "ps" in answered:
            loaded = tuple(outcomes["ps"].value)
            self._count_dropped("ps", outcomes["ps"].value)
            self._count_transitions(loaded, now)

        self._remember(now, [m.name for m in installed] if "tags" in answered else [], [m.name for m in loaded])
        up = all(name in answered for name in ("version", "ps") if name in self.sources) and bool(answered)

        runner_state = self._sample_runners(loaded, installed) if "ps" in answered else None
        if self.logs is not None:
            self._feed_logs(mark, started, loaded if "ps" in answered else None, installed, runner_state)

        gpu = self._gpu_state(outcomes.get("gpu"))
        model_gpu, unattributed = (), {}
        if gpu is not None and gpu.nvml_up and "ps" in answered:
            processes = [p for d in gpu.devices for p in d.processes]
            model_gpu, unattributed = runners.attribute(processes, loaded, installed)

        log_errors = {("logs", r): n for r, n in self.logs.errors().items()} if self.logs is not None else {}
        snapshot = Snapshot(
            timestamp=now,
            ready=True,
            up=up,
            version=self._version,
            installed=installed,
            loaded=loaded,
            sources=tuple(self._status[s] for s in SOURCES if s in self._status)
            + ((self.logs.status(),) if self.logs is not None else ()),
            loads_total=self._frozen("loads", self._loads),
            unloads_total=self._frozen("unloads", self._unloads),
            keep_alive_downgrades_total=self._frozen("downgrades", self._downgrades),
            errors_total=frozen_map({**self._errors, **log_errors}),
            dropped_total=frozen_map(self._dropped),
            gpu=gpu,
            model_gpu_memory=model_gpu,
            gpu_unattributed=frozen_map(unattributed),
            probes=self.probe_stats(set(self._seen)) if self.probe_stats else None,
            reload=self.reload_status,
            traffic=self.logs.value() if self.logs is not None else None,
            runners=runner_state,
        )
        self._snapshot = snapshot
        for listener in self._listeners:
            listener(snapshot)
        return snapshot

    # --- helpers ---

    def _sample_runners(self, loaded: tuple[LoadedModel, ...], installed: tuple[InstalledModel, ...]
                        ) -> Optional[RunnersState]:
        """Each loaded model's runner slots; recorded as the `runners` source once a runner was seen."""
        if self.runner_source is None:
            return None
        call = _Call("runners", lambda: self.runner_source.sample(loaded, installed), self._busy)
        outcome = call.wait(time.monotonic() + self.runner_source.timeout + 0.5)
        state: Optional[RunnersState] = outcome.value if outcome.error is None else None
        if state is not None:
            failed = next((r for r in state.runners if r.error), None)
            if failed is not None:
                outcome = Outcome(error=SourceError(failed.error, f"runner of {failed.model}: {failed.message}"),
                                  duration=outcome.duration)
            elif self.runners_required and loaded and not state.runners:
                outcome = Outcome(error=SourceError("connection", "no runner process of a loaded model is visible "
                                                    "(is Ollama in another PID namespace?)"), duration=outcome.duration)
            elif not state.found and not self.runners_required and "runners" not in self._status:
                return state  # auto, and no runner ever seen: nothing to report yet
        self._record("runners", outcome, self.clock())
        return state

    def _feed_logs(self, mark: int, started: float, loaded: Optional[tuple[LoadedModel, ...]],
                   installed: tuple[InstalledModel, ...], runner_state: Optional[RunnersState]) -> None:
        """Tell the log statistics what this poll saw, for attributing llama-server lines to models."""
        stats = self.logs.stats
        if stats.forget_models(self._known_models()):
            self.logs.touch()
        if loaded is None:
            return  # /api/ps failed: nothing is known about the runners
        names_by_blob: dict[str, list[str]] = {}
        for m in installed:
            if m.show is not None and m.show.weights_blob:
                names_by_blob.setdefault(m.show.weights_blob, []).append(m.name)
        in_flight = runner_state.in_flight() if runner_state is not None else None
        stats.observe_poll(mark, started, time.time(), [m.name for m in loaded], names_by_blob, in_flight)

    def _known_models(self) -> Optional[set]:
        """Models seen within poll.forget_after, or None while /api/tags has never answered (then nothing is
        known gone: the log's counters restored at start survive an Ollama that is down)."""
        tags = self._status.get("tags")
        return set(self._seen) if tags and tags.last_success is not None else None

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
                log.info("source recovered", extra={"source": name})
        else:
            self._errors[(name, outcome.error.reason)] += 1
            status = SourceStatus(name, False, outcome.duration, last_success, outcome.error.reason, str(outcome.error))
            if previous is None or previous.up or previous.error != status.error:
                log.warning("source failed", extra={"source": name, "reason": outcome.error.reason,
                                                     "error": str(outcome.error)})
        self._status[name] = status

    def settle(self, timeout: float) -> None:
        """Wait (up to `timeout`) for the /api/show calls under way: for --once and the probe command."""
        deadline = time.monotonic() + timeout
        while self.shows.pending and time.monotonic() < deadline:
            time.sleep(0.01)

    def _record_shows(self, now: float) -> None:
        """The show source's status from the calls that finished since the last poll (if any did)."""
        outcomes = self.shows.drain()
        if not outcomes:
            return
        failed = next((o for o in reversed(outcomes) if not o.ok), None)
        self._record("show", Outcome(error=failed.error if failed else None,
                                     duration=max(o.duration for o in outcomes)), now)
        for outcome in outcomes[:-1]:
            if not outcome.ok and outcome is not failed:
                self._errors[("show", outcome.error.reason)] += 1

    def _join_shows(self) -> tuple[InstalledModel, ...]:
        """The installed models with their /api/show info: the same objects (and the same tuple) as in
        the last snapshot for what did not change, so the metrics of an unchanged inventory are reused
        rather than rendered again."""
        joined, memo = [], {}
        for model in self._installed:
            info = self.shows.get(model.digest)
            if info is None:
                joined.append(model)
                continue
            last = self._joined_memo.get(model.name)  # names are unique in /api/tags rows (duplicates dropped)
            if last is None or last[0] is not model or last[1] is not info:
                last = (model, info, replace(model, show=info))
            memo[model.name] = last
            joined.append(last[2])
        self._joined_memo = memo
        previous = self._joined
        if len(previous) != len(joined) or any(a is not b for a, b in zip(previous, joined)):
            self._joined = tuple(joined)
        return self._joined

    def _frozen(self, name: str, counts: Mapping) -> Mapping:
        """A read-only copy of `counts` for the snapshot: the same one as last poll while nothing changed."""
        last = self._frozen_last.get(name)
        if last is None or last != counts:
            last = self._frozen_last[name] = frozen_map(counts)
        return last

    def _count_dropped(self, source: str, rows: Rows) -> None:
        for reason, count in getattr(rows, "dropped", {}).items():
            if count and not self._dropped[(source, reason)]:
                log.warning("model rows dropped", extra={"source": source, "reason": reason, "count": count,
                                                        "limit": self.client.max_models})
            self._dropped[(source, reason)] += count

    def _remember(self, now: float, installed: list[str], loaded: list[str]) -> None:
        """Note the names seen now; forget those unseen for `forget_after` seconds (counters included)."""
        for name in installed + loaded:
            if name not in self._seen:
                for counter in (self._loads, self._unloads, self._downgrades):
                    counter[name] += 0  # counters start at 0, so increase() counts the first event too
            self._seen[name] = now
        gone = [n for n, seen in self._seen.items() if now - seen > self.forget_after]
        for name in gone:
            del self._seen[name]
            for counter in (self._loads, self._unloads, self._downgrades):
                counter.pop(name, None)
            if self._previous_loaded is not None:
                self._previous_loaded.pop(name, None)
        self.forgotten += len(gone)
        if gone:  # a dict keeps the table it grew to (thousands of names after a burst): copies fit what is left
            self._seen = dict(self._seen)
            self._loads, self._unloads, self._downgrades = (Counter(c) for c in (self._loads, self._unloads,
                                                                                 self._downgrades))

    def _count_transitions(self, loaded: tuple[LoadedModel, ...], now: float) -> None:
        current = {m.name: m for m in loaded}
        previous = self._previous_loaded
        if previous is not None:
            for name, row in current.items():
                before = previous.get(name)
                if before is None:
                    self._loads[name] += 1
                    log.info("model loaded", extra={"model": name})
                    continue
                if before.identity != row.identity:  # replaced between polls: a reload
                    self._unloads[name] += 1
                    self._loads[name] += 1
                    log.info("model reloaded", extra={"model": name})
                if before.pinned(now) and not row.pinned(now) and not row.stopping(now):
                    # a runner that a reload without keep_alive replaced, or a client that set a finite one
                    self._downgrades[name] += 1
                    log.warning("pinned model became finite", extra={"model": name, "expires_at": row.expires_at})
            for name in previous.keys() - current.keys():
                self._unloads[name] += 1
                log.info("model unloaded", extra={"model": name})
        self._previous_loaded = current

"""The `logs` source: a daemon thread that reads Ollama's log, counts it, and checkpoints what it counted.

The thread reads batches of lines from a logsources source, feeds them to TrafficStats, and once per
`commit_interval` writes the position and the counters to the state file together. Only a committed
copy is published (`value()`), so whatever a scrape has seen is on disk: after a crash the exporter
resumes from exactly the counters Prometheus saw, re-reading the lines it had not yet published.
Reading never blocks a poll or a scrape: they only take the published copy. A failing source (file
missing, journalctl gone, no permission) is retried with a doubling delay and reported as the `logs`
source's errors; counting resumes where it stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Callable, Optional

from ollama_exporter.backoff import Backoff
from ollama_exporter.logsources import LOG_ERROR_REASONS, SourceFailure
from ollama_exporter.logstate import StateFile
from ollama_exporter.snapshot import SourceStatus
from ollama_exporter.traffic import TrafficStats, TrafficValue

log = logging.getLogger(__name__)

STATE_VERSION = 1
READ_WAIT = 0.25


class LogFollower:
    def __init__(self, source, stats: TrafficStats, state_file: Optional[StateFile] = None,
                 commit_interval: float = 1.0, clock: Callable[[], float] = time.time):
        self.source = source
        self.stats = stats
        self.state_file = state_file
        self.commit_interval = commit_interval
        self.clock = clock
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._published: TrafficValue = stats.value()
        self._errors: Counter = Counter(dict.fromkeys(LOG_ERROR_REASONS, 0))
        self._status = SourceStatus("logs", False, 0.0, None, "not_found", "not started")
        self._failing: Optional[str] = None
        self._touched = False  # the counters changed outside the thread (a model forgotten): commit them

    # --- lifecycle ---

    def restore(self) -> None:
        """Load the state file (if any): counters, and the position when it is for this same source."""
        position = None
        if self.state_file is not None:
            try:
                saved = self.state_file.load()
            except ValueError as exc:
                log.warning("log state file unreadable, starting afresh", extra={"path": self.state_file.path,
                                                                                 "error": str(exc)})
                saved = None
            if saved is not None:
                position = self._restore(saved)
        self.source.open(position)
        with self._lock:
            self._published = self.stats.value()

    def _restore(self, saved: dict) -> Optional[dict]:
        if saved.get("version") != STATE_VERSION:
            log.warning("log state file from another version, starting afresh", extra={"path": self.state_file.path})
            return None
        try:
            self.stats.restore(saved.get("stats") or {})
        except ValueError as exc:  # the position alone is still right: counters restart, nothing is re-read
            log.warning("log state counters unreadable, counting from zero", extra={"error": str(exc)})
        if saved.get("source") != self.source.identity:
            log.info("log source changed since the state was saved, starting at its end",
                     extra={"source": self.source.identity})
            return None
        position = saved.get("position")
        return position if isinstance(position, dict) else None

    def start(self) -> "LogFollower":
        self.restore()
        self._thread = threading.Thread(target=self.run, name="logs", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading and write a last checkpoint (the thread does it on its way out)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def touch(self) -> None:
        """The statistics changed without a new line (models forgotten): publish them at the next commit."""
        self._touched = True

    # --- what the poller reads ---

    def value(self) -> TrafficValue:
        with self._lock:
            return self._published

    def status(self) -> SourceStatus:
        with self._lock:
            return self._status

    def errors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._errors)

    # --- the thread ---

    def run(self) -> None:
        backoff = Backoff(0.5, 30.0)
        dirty, last_commit = False, self.clock()
        try:
            while not self._stop.is_set():
                try:
                    batch = self.source.read(READ_WAIT)
                except SourceFailure as exc:
                    self._fail(exc.reason, str(exc))
                    self._stop.wait(backoff.fail(self.clock()))
                    continue
                except OSError as exc:
                    self._fail("unknown", f"{self.source.identity}: {exc.strerror or exc}")
                    self._stop.wait(backoff.fail(self.clock()))
                    continue
                started = time.monotonic()
                backoff.reset()
                if batch.dropped:
                    self.stats.dropped(batch.dropped, "overflow")
                    dirty = True
                if batch.lines:
                    self.stats.feed_many(batch.lines)
                    dirty = True
                if batch.caught_up:
                    self.stats.caught_up(batch.read_at)
                self._ok(time.monotonic() - started)
                if (dirty or self._touched) and self.clock() - last_commit >= self.commit_interval:
                    self._touched = False
                    self.commit()
                    dirty, last_commit = False, self.clock()
        finally:
            self.commit()
            self.source.close()

    def commit(self) -> None:
        """Persist the position and the counters together, then publish those counters."""
        state, value = self.stats.checkpoint()
        if self.state_file is not None:
            data = {"version": STATE_VERSION, "source": self.source.identity, "position": self.source.position(),
                    "stats": state}
            try:
                self.state_file.save(data)
            except OSError as exc:
                self._fail("state_file", f"{self.state_file.path}: cannot write: {exc.strerror or exc}")
            else:
                with self._lock:
                    if self._failing == "state_file":
                        self._failing = None
        with self._lock:
            self._published = value

    def _ok(self, duration: float) -> None:
        with self._lock:
            if self._failing == "state_file":  # reading works; the failed save stays reported until one works
                return
            if self._failing is not None:
                log.info("log source recovered", extra={"source": self.source.identity})
            self._failing = None
            self._status = SourceStatus("logs", True, duration, self.clock())

    def _fail(self, reason: str, message: str) -> None:
        with self._lock:
            self._errors[reason] += 1
            if self._failing != reason:
                log.warning("log source failed", extra={"source": self.source.identity, "reason": reason,
                                                        "error": message})
            self._failing = reason
            previous = self._status
            self._status = SourceStatus("logs", False, 0.0, previous.last_success, reason, message)

"""/api/show answers, cached by manifest digest and fetched in the background.

What /api/show says (training context, parameter count, capabilities, the weights blob) never changes
for a digest, so it is asked once per digest and kept while the model is installed. The calls run in a
small shared pool, each with the client's deadline, and a poll only reads what has arrived: a slow or
failing /api/show can never hold up a poll (before, 40 models with a show slower than the timeout
delayed the first snapshot by 50 s and the /api/ps reads with it). Failed digests back off.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ollama_exporter.backoff import Backoff
from ollama_exporter.snapshot import InstalledModel, ShowInfo, SourceError


@dataclass(frozen=True)
class ShowOutcome:
    ok: bool
    duration: float
    error: Optional[SourceError] = None


class ShowCache:
    def __init__(self, fetch: Callable[[str], ShowInfo], pool: Executor, retry_after: float,
                 clock: Callable[[], float] = time.time):
        self.fetch = fetch
        self.pool = pool
        self.retry_after = retry_after
        self.clock = clock
        self._lock = threading.Lock()
        self._info: dict[str, ShowInfo] = {}  # digest -> answer
        self._pending: set[str] = set()  # digests with a call queued or running
        self._retry: dict[str, Backoff] = {}  # digest -> when it may be asked again
        self._wanted: set[str] = set()  # digests of the models installed now
        self._outcomes: list[ShowOutcome] = []  # finished calls since the last drain()

    def update(self, installed: Iterable[InstalledModel]) -> None:
        """Forget digests no longer installed and start calls for new ones (not for remote models)."""
        now = self.clock()
        wanted: dict[str, str] = {}
        for model in installed:
            if model.digest and not model.remote:
                wanted.setdefault(model.digest, model.name)
        with self._lock:
            self._wanted = set(wanted)
            if not (wanted.keys() >= self._info.keys() and wanted.keys() >= self._retry.keys()):
                # copies rather than deletions: a dict keeps the table it grew to (a burst of names)
                self._info = {d: v for d, v in self._info.items() if d in wanted}
                self._retry = {d: v for d, v in self._retry.items() if d in wanted}
            start = [(d, n) for d, n in wanted.items() if d not in self._info and d not in self._pending
                     and (d not in self._retry or self._retry[d].ready(now))]
            self._pending.update(d for d, _ in start)
        for digest, name in start:
            try:
                self.pool.submit(self._call, digest, name)
            except RuntimeError:  # the pool is shut down: the exporter is stopping
                with self._lock:
                    self._pending.discard(digest)

    def _call(self, digest: str, name: str) -> None:
        started = time.monotonic()
        try:
            info, error = self.fetch(name), None
        except SourceError as exc:
            info, error = None, exc
        except Exception as exc:  # noqa: BLE001 - a bug must not leave the digest pending forever
            info, error = None, SourceError("invalid_response", f"/api/show: {type(exc).__name__}: {exc}")
        with self._lock:
            self._pending.discard(digest)
            if digest in self._wanted:
                if info is not None:
                    self._info[digest] = info
                    self._retry.pop(digest, None)
                else:
                    self._retry.setdefault(digest, Backoff(self.retry_after)).fail(self.clock())
            if len(self._outcomes) < 10_000:
                self._outcomes.append(ShowOutcome(info is not None, time.monotonic() - started, error))

    def get(self, digest: str) -> Optional[ShowInfo]:
        return self._info.get(digest)

    def drain(self) -> list[ShowOutcome]:
        """The calls that finished since the last drain."""
        with self._lock:
            outcomes, self._outcomes = self._outcomes, []
        return outcomes

    @property
    def pending(self) -> int:
        return len(self._pending)

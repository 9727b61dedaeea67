"""Active latency probes: time to first token, time per output token and end-to-end time, as a user
sees them, measured without changing what is measured.

Every inference request is a "use" in Ollama's scheduler and Ollama has no "only if loaded" flag: a
request restarts the model's idle timer, loads a model that is not loaded, reloads one whose stored
load-time options differ from the request's (with OLLAMA_KEEP_ALIVE, which unpins a keep_alive -1
model), and on v0.1.48 and older resets keep_alive. So a probe (tests/fakes/ollama.py emulates each
version it has to be safe on):
- is sent only if an /api/ps read made right before it, inside the worker's slot, shows the model
  resident with the identity it was planned for, not about to expire and not remote (`_preflight`);
- never sends keep_alive (a resident runner keeps the user's duration on v0.2.0+); below v0.2.0 every
  request without one resets it, so probes are off there;
- sends the num_ctx that matches the runner's stored options on that version (`num_ctx_choices`);
- counts a load_duration of 0.1 s or more on a model the fresh read showed resident as a load it
  caused, restores at once a pin it broke, tries the other num_ctx once and then leaves the model
  alone (`reload_risk`) until a user changes it;
- waits for a pause: a model is probed only once its expires_at has been still for about one probe
  interval, and one with a finite keep_alive only if real traffic moved expires_at since our last
  probe, so an idle model unloads no later than one interval after it would have without us;
- reads /api/ps after itself until expires_at has moved (Ollama restarts the timer only after the
  response has ended), so its own touch is never taken for a user's;
- runs on a fixed pool of `probes.concurrency` workers (default 1), and a model whose probe had to
  queue for a slot behind a user is left alone for a while.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from ollama_exporter.backoff import Backoff
from ollama_exporter.config import Config
from ollama_exporter.histogram import Histogram
from ollama_exporter.ollama import OllamaClient, OllamaError
from ollama_exporter.snapshot import HistogramValue, InstalledModel, LoadedModel, Snapshot

log = logging.getLogger(__name__)

SEED = 42  # fixed, with temperature 0, so every probe asks for the same work
DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
                    45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
TPOT_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FAILURE_REASONS = ("not_found", "out_of_memory", "context_length", "busy", "timeout", "truncated_stream",
                   "stream_error", "http_4xx", "http_5xx", "connection")
SKIP_REASONS = ("not_loaded", "idle", "active", "backoff", "in_progress", "unsupported", "unsupported_version",
                "remote", "reload_risk")
MIN_VERSION = (0, 2, 0)  # v0.1.48 and older reset keep_alive on every request without one
NEWEST = (1_000_000, 0, 0)  # source builds report 0.0.0; treat them (and unreadable versions) as the newest
TOUCH_TOLERANCE_SECONDS = 0.001  # expires_at values closer than this are the same timer
LOAD_SECONDS = 0.1  # load_duration at least this long on a resident model: the probe went through a (re)load
WAIT_SECONDS = 0.1  # a queue wait longer than this: a user was using the model's slot
SETTLE_TRIES = 5  # reads of /api/ps after a probe until expires_at moves ...
SETTLE_DELAY = 0.2  # ... this far apart
MAX_DURATION_NS = 10**14  # about 28 hours: a final chunk's duration beyond this is not a real figure
MAX_COUNT = 10**9  # tokens
_NOT_OURS = object()  # _ModelState.own when the runner is not one a probe loaded


def parse_version(text: Optional[str]) -> tuple[int, int, int]:
    """/api/version's `version` as (major, minor, patch): ``0.33.0-rc2`` and ``0.32.15-12-gabc1234`` are
    read leniently; source builds (``0.0.0``) and anything unreadable count as the newest version."""
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", text or "")
    version = (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (0, 0, 0)
    return NEWEST if version == (0, 0, 0) else version


def num_ctx_choices(version: tuple[int, int, int], kind: str, ps_context: Optional[int],
                    train: Optional[int]) -> tuple[Optional[int], ...]:
    """The num_ctx values a probe may send, best first (None: leave it out). A second one is given only
    when the first is a guess, so that after the first reloaded the model the other may still fit.

    Ollama reloads a runner when the request's load-time options differ from the stored ones, and /api/ps
    shows only `context_length`. What that is, and what needsReload compares it with, depends on the
    version (ollama server/sched.go, llm/server.go):
    - before v0.10: ps has no context_length, so the probe can only leave num_ctx out;
    - v0.10-v0.15.4: ps shows the stored value: send it (exact);
    - v0.15.5-v0.24: ps shows the value clamped to the training context, needsReload compares the
      unclamped stored one. Below the training context nothing was clamped: send it (exact). At the
      training context it may hide any larger value (the VRAM-tier default 262144, say): leave num_ctx
      out, which matches an automatic runner, else try ps;
    - v0.30+: needsReload clamps too: generate sends ps (exact); embed follows the v0.15.5 rule, because
      an embedding request's num_ctx also sets num_batch = min(2048, num_ctx), which is compared.
    """
    if not ps_context or version < (0, 10, 0):
        return (None,)
    if needs_training_context(version, kind) and train and ps_context >= train:
        return (None, ps_context)
    return (ps_context,)


def needs_training_context(version: tuple[int, int, int], kind: str) -> bool:
    """Whether ps's context_length may be clamped to the training context, so that choosing num_ctx needs
    the training context (/api/show): without it a probe could reload the model."""
    return version >= (0, 15, 5) and (version < (0, 30, 0) or kind == "embed")


@dataclass
class ProbeResult:
    model: str
    kind: str  # "generate" or "embed"
    ok: bool
    reason: str = ""  # one of FAILURE_REASONS when not ok and sent
    message: str = ""
    skipped: str = ""  # one of SKIP_REASONS when the pre-flight read said not to send it
    ttft: Optional[float] = None  # seconds, client-observed
    tpot: Optional[float] = None
    duration: Optional[float] = None  # end to end
    tokens: int = 0  # token chunks the client saw
    load_duration: float = 0.0  # Ollama's own figures from the final chunk, in seconds
    prompt_eval_duration: float = 0.0
    eval_duration: float = 0.0
    prompt_eval_count: int = 0
    eval_count: int = 0
    queue_wait: Optional[float] = None  # total - load - prompt eval - eval: waiting for a slot
    num_ctx: Optional[int] = None  # what the probe sent (None: left out)
    caused_load: bool = False
    keep_alive_restored: bool = False


@dataclass(frozen=True)
class ModelProbeStats:
    """Cumulative probe results for one model, as copied into a Snapshot."""

    kind: str
    ttft: HistogramValue
    tpot: HistogramValue
    duration: HistogramValue
    queue_wait: HistogramValue
    prompt_eval_tokens: int
    prompt_eval_seconds: float
    eval_tokens: int
    eval_seconds: float
    load_seconds: float
    probes: int
    failures: Mapping[str, int]
    skipped: Mapping[str, int]
    caused_loads: int
    keep_alive_restores: int
    last_success: Optional[bool]
    last_timestamp: Optional[float]


class _ModelStats:
    def __init__(self, kind: str = "generate"):
        self.kind = kind
        self.ttft, self.tpot = Histogram(DURATION_BUCKETS), Histogram(TPOT_BUCKETS)
        self.duration, self.queue_wait = Histogram(DURATION_BUCKETS), Histogram(QUEUE_WAIT_BUCKETS)
        self.prompt_eval_tokens = self.eval_tokens = self.probes = self.caused_loads = self.keep_alive_restores = 0
        self.prompt_eval_seconds = self.eval_seconds = self.load_seconds = 0.0
        self.failures = {r: 0 for r in FAILURE_REASONS}
        self.skipped = {r: 0 for r in SKIP_REASONS}
        self.last_success: Optional[bool] = None
        self.last_timestamp: Optional[float] = None
        self._value: Optional[ModelProbeStats] = None  # value() until the next change

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        self._value = None

    def record(self, r: ProbeResult, now: float) -> None:
        self._value = None
        self.kind = r.kind
        self.probes += 1
        self.caused_loads += r.caused_load
        self.keep_alive_restores += r.keep_alive_restored
        self.last_success, self.last_timestamp = r.ok, now
        if not r.ok:
            self.failures[r.reason] += 1
            return
        self.duration.observe(r.duration)
        if r.kind == "embed":
            return  # embeddings have no tokens to time: end-to-end only
        if r.ttft is not None:
            self.ttft.observe(r.ttft)
        if r.tpot is not None:
            self.tpot.observe(r.tpot)
        if r.queue_wait is not None:
            self.queue_wait.observe(r.queue_wait)
        self.prompt_eval_tokens += r.prompt_eval_count
        self.eval_tokens += r.eval_count
        self.prompt_eval_seconds += r.prompt_eval_duration
        self.eval_seconds += r.eval_duration
        self.load_seconds += r.load_duration

    def value(self) -> ModelProbeStats:
        """The stats as an immutable value: the same object until they change, so the metrics of a
        model that was not probed since the last snapshot are not rendered again."""
        if self._value is None:
            self._value = self._build()
        return self._value

    def _build(self) -> ModelProbeStats:
        return ModelProbeStats(
            self.kind, self.ttft.value(), self.tpot.value(), self.duration.value(), self.queue_wait.value(),
            self.prompt_eval_tokens, self.prompt_eval_seconds, self.eval_tokens, self.eval_seconds,
            self.load_seconds, self.probes, dict(self.failures), dict(self.skipped), self.caused_loads,
            self.keep_alive_restores, self.last_success, self.last_timestamp)


@dataclass
class _ModelState:
    """What the gate remembers about one model between probes."""

    backoff: Backoff
    identity: Optional[tuple] = None  # LoadedModel.identity last seen
    seen: Optional[float] = None  # expires_at last seen
    seen_since: float = 0.0  # since when it has had that value (at the latest)
    baseline: Optional[float] = None  # expires_at as our last probe (or first sight) left it; None: used since
    adopt: bool = False  # our probe's own expires_at was never seen: take the next snapshot's as the baseline
    probed_at: float = -math.inf
    queued: bool = False  # a job for it is queued or running
    tried: set = field(default_factory=set)  # num_ctx choices that caused a load for this identity
    own: object = _NOT_OURS  # the num_ctx a probe reloaded the runner with, until a user uses it again
    risky: set = field(default_factory=set)  # identities every choice reloaded: not probed again
    safe_size: Optional[int] = None  # before v0.10: the runner size at which a probe loaded nothing
    last_duration: float = 0.0
    last_skip: str = ""
    last_skip_at: float = -math.inf


@dataclass
class Job:
    model: str
    kind: str
    row: Optional[LoadedModel]  # the /api/ps row it was planned on; None for an allowed cold load
    train: Optional[int] = None  # training context from /api/show
    version: tuple[int, int, int] = NEWEST
    jitter: float = 0.0
    paused: bool = True  # re-check in the pre-flight read that nobody used it since planning


def classify(exc: OllamaError) -> str:
    """A failed inference request's reason, from the status code and Ollama's error text."""
    text = exc.detail.lower()
    if exc.status == 404:
        return "not_found"
    if exc.status == 503:
        return "busy"
    if "out of memory" in text or "cudamalloc" in text or "oom" in text.replace(":", " ").split():
        return "out_of_memory"
    if "context" in text and any(w in text for w in ("exceed", "too long", "context length", "context size")):
        return "context_length"
    if exc.status is not None:
        return "http_5xx" if exc.status >= 500 else "http_4xx"
    return exc.reason if exc.reason in ("timeout", "connection") else "stream_error"


def kind_of(model: Optional[InstalledModel]) -> Optional[str]:
    """generate for completion models, embed for embedding-only ones, None for neither.

    Servers older than v0.6.4 report no capabilities; their models are probed as completion models.
    """
    caps = model.merged_capabilities if model is not None else ()
    if not caps or "completion" in caps:
        return "generate"
    if "embedding" in caps:
        return "embed"
    return None


@dataclass(frozen=True)
class Target:
    """A model a probe round considers, with what it takes to probe it."""

    model: str
    kind: Optional[str]  # kind_of(): generate, embed, or None for neither
    row: Optional[LoadedModel]  # its /api/ps row; None when it is not resident
    installed: bool
    train: Optional[int] = None  # training context from /api/show; None: not answered yet, 0: it has none
    remote: bool = False  # a cloud model: a probe would be a request to another server

    def refusal(self, allow_cold_load: bool) -> str:
        """Why it must not be probed at all ("unsupported", "remote", "not_loaded"), or "" if it may be."""
        if self.kind is None:
            return "unsupported"
        if self.remote:
            return "remote"
        if self.row is None and not (allow_cold_load and self.installed):
            return "not_loaded"
        return ""


def targets(snapshot: Snapshot, models: tuple[str, ...]) -> list[Target]:
    """`models` (as Ollama reads the names), or else every resident model, each with its probe kind."""
    installed = {m.name: m for m in snapshot.installed}
    by_digest = {m.digest: m for m in snapshot.installed}
    loaded = {m.name: m for m in snapshot.loaded}
    result = []
    for name in [normalise_name(n) for n in models] or list(loaded):
        row = loaded.get(name)
        model = installed.get(name) or (by_digest.get(row.digest) if row else None)
        train = (model.show.context_length or 0) if model is not None and model.show is not None else None
        remote = (row is not None and row.remote) or (model is not None and model.is_remote)
        result.append(Target(name, kind_of(model), row, name in installed, train, remote))
    return result


class _Implausible(Exception):
    """A figure in a final chunk that cannot be real (negative, not a number, absurdly large)."""


def _figure(line: dict, key: str, limit: int) -> int:
    value = line.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= limit:
        raise _Implausible(f"implausible {key} {str(value)[:40]!r} in the final chunk")
    return int(value)


def _same(a: Optional[float], b: Optional[float]) -> bool:
    return a == b or (a is not None and b is not None and abs(a - b) <= TOUCH_TOLERANCE_SECONDS)


class _Workers:
    """`size` daemon threads, started as needed, taking jobs from one queue in order: however many models
    are due, never more probes in flight nor more threads (daemons: a probe stuck in a read must never
    hold up shutdown)."""

    def __init__(self, size: int):
        self.size = size
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[[], ProbeResult]) -> Future:
        future: Future = Future()
        self._queue.put((future, fn))
        with self._lock:
            if len(self._threads) < self.size and not self._closed:
                thread = threading.Thread(target=self._work, name=f"probe-{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)
        return future

    def resize(self, size: int) -> None:
        """Workers beyond the new size end after their current job; missing ones start with the next."""
        with self._lock:
            self.size = size

    def _work(self) -> None:
        while True:
            with self._lock:
                if len(self._threads) > self.size:
                    self._threads.remove(threading.current_thread())
                    return
            item = self._queue.get()
            if item is None:
                return
            future, fn = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # surfaced through the future; the worker goes on
                future.set_exception(exc)

    def close(self) -> None:
        """Cancel the queued jobs and let the workers end after the one they are running."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in threads:
            self._queue.put(None)


class Prober:
    def __init__(self, client: OllamaClient, config: Config, latest: Callable[[], Snapshot],
                 clock: Callable[[], float] = time.time, shows: bool = True):
        self.client = client
        self.shows = shows  # /api/show is read for these models, so a training context not known yet will be
        self.latest = latest
        self.clock = clock
        self.settle_tries, self.settle_delay = SETTLE_TRIES, SETTLE_DELAY
        self._lock = threading.Lock()
        self._stats: dict[str, _ModelStats] = {}
        self._state: dict[str, _ModelState] = {}
        self._workers = _Workers(config.probes_concurrency)
        self.config = config
        self._last_snapshot: Optional[Snapshot] = None
        self._previous_poll: Optional[float] = None
        self._version_refused: Optional[str] = None

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """Take a (reloaded) configuration: interval, jitter, header and the size of the worker pool."""
        self._config = config
        self.interval = config.probes_interval
        self.jitter_max = min(config.probes_interval * 0.1, 2.0)
        self.headers = {"X-Forwarded-For": config.probes_forwarded_for}  # probes are not user traffic
        self._workers.resize(config.probes_concurrency)

    # --- the loop ---

    def run(self, stop: threading.Event) -> None:
        """Plan on every new snapshot (so a model is probed as soon as its pause is long enough)."""
        tick = max(0.02, min(self.config.poll_interval, self.interval) / 2)
        try:
            while not stop.wait(tick):
                try:
                    self.tick()
                except Exception:
                    log.exception("probe round failed unexpectedly")
        finally:
            self.close()

    def tick(self) -> list[Future]:
        """Plan from the latest snapshot, if it is new, and queue its probes; returns their futures."""
        snapshot = self.latest()
        if not snapshot.ready or not snapshot.up or snapshot is self._last_snapshot:
            return []  # no current /api/ps: nothing is known to be resident
        self._last_snapshot = snapshot
        with self._lock:
            jobs = self.plan(snapshot)
        return [self._workers.submit(lambda job=job: self._run_job(job)) for job in jobs]

    def close(self) -> None:
        self._workers.close()

    def stats(self, known: Optional[set]) -> dict[str, ModelProbeStats]:
        """A consistent copy for the Snapshot. Everything about a model not in `known` (installed or loaded
        models, as the poller still knows them) nor in probes.models is forgotten, counters included."""
        with self._lock:
            if known is not None:
                keep = set(known) | {normalise_name(m) for m in self.config.probes_models}
                for table in (self._stats, self._state):
                    for name in [n for n in table if n not in keep]:
                        del table[name]
            return {name: s.value() for name, s in self._stats.items()}

    # --- planning: which models to probe now, and why the others are skipped ---

    def plan(self, snapshot: Snapshot) -> list[Job]:
        now = self.clock()
        first = self._previous_poll is None
        since = now if first else self._previous_poll  # a change seen now happened after the previous poll
        self._previous_poll = snapshot.timestamp
        version = parse_version(snapshot.version)
        wanted = targets(snapshot, self.config.probes_models)
        if version < MIN_VERSION:
            if self._version_refused != snapshot.version:
                self._version_refused = snapshot.version
                log.warning("probes disabled: this Ollama resets keep_alive on every request without one",
                            extra={"version": snapshot.version, "reason": "unsupported_version"})
            for t in wanted:
                self._skip(t.model, "unsupported_version", now)
            return []
        jobs = []
        for t in wanted:
            state = self._state_of(t.model)
            if t.row is not None:
                self._observe(state, t.row, now, since, first)
            reason = t.refusal(self.config.probes_allow_cold_load) or self._gate(t.row, state, now)
            if not reason and self.shows and t.row is not None and t.row.context_length and t.train is None \
                    and needs_training_context(version, t.kind or "generate"):
                reason = "wait"  # /api/show has not answered yet (it runs in the background): next poll
            if reason == "wait":
                continue
            if reason:
                self._skip(t.model, reason, now)
                continue
            state.queued = True
            jobs.append(Job(t.model, t.kind, t.row, t.train, version, random.uniform(0, self.jitter_max)))
        return jobs

    def _observe(self, state: _ModelState, row: LoadedModel, now: float, since: float, first: bool) -> None:
        """Follow the model's expires_at: when it last changed (a use), and the baseline our probe left."""
        if state.identity != row.identity:
            at_start = first and state.identity is None  # resident when we started: when was it last used?
            state.identity, state.seen, state.adopt = row.identity, row.expires_at, False
            state.seen_since = now if at_start else since  # a (re)load is a use, and so the start of a pause
            state.baseline = row.expires_at if at_start else None
            state.safe_size, state.own = None, _NOT_OURS
            if row.identity not in state.risky:
                state.tried.clear()
            return
        if state.adopt:
            state.baseline, state.adopt = row.expires_at, False
        if not _same(row.expires_at, state.seen):
            state.seen, state.seen_since = row.expires_at, since
            state.own = _NOT_OURS  # used: its runner may be the user's again

    def _gate(self, row: Optional[LoadedModel], state: _ModelState, now: float) -> str:
        """"" to probe now, "wait" when it is just not due yet (not counted), else the skip reason."""
        if state.queued:
            return "in_progress"
        if row is None:
            return ""  # an allowed cold load
        if row.identity in state.risky:
            return "reload_risk"
        if not state.backoff.ready(now):
            return "backoff"
        if row.expires_at is not None and row.expires_at - now < self._margin(state):
            return "not_loaded"  # stopping, or about to expire: a probe would delay that, or load it again
        if now - state.probed_at < self.interval:
            return "wait"
        if self.config.probes_idle_models == "skip" and not row.pinned(now) and state.baseline is not None \
                and _same(row.expires_at, state.baseline):
            return "idle"  # nobody used it since our last probe: let it expire
        if now - state.seen_since < self._quiet(state):
            return "active"  # used recently: wait for the pause
        return ""

    def _quiet(self, state: _ModelState) -> float:
        """The pause a model's use must have had before a probe: one interval, less what may pass between the
        end of that pause and the probe's end (planning happens on each poll, half a poll's tick, the jitter,
        the probe itself), so that a finite-keep_alive model it touches still unloads no later than one
        interval after it would have; at least half an interval."""
        slack = 1.5 * self.config.poll_interval + self.jitter_max + state.last_duration
        return max(self.interval / 2, self.interval - slack)

    def _margin(self, state: _ModelState) -> float:
        """How long before its expiry a model is left alone: two polls, or the last probe if it took longer."""
        return max(2 * self.config.poll_interval, state.last_duration)

    def _skip(self, name: str, reason: str, now: float) -> None:
        """Count a skip, at most once per probe interval per model and reason (planning runs every poll)."""
        state = self._state_of(name)
        if reason != state.last_skip or now - state.last_skip_at >= self.interval:
            state.last_skip, state.last_skip_at = reason, now
            self._stats.setdefault(name, _ModelStats()).skip(reason)

    def _state_of(self, name: str) -> _ModelState:
        state = self._state.get(name)
        if state is None:
            state = self._state[name] = _ModelState(Backoff(2 * self.interval, 16 * self.interval))
        return state

    # --- running one probe ---

    def _run_job(self, job: Job) -> ProbeResult:
        """A queued job: whatever happens, the model's state is released (one bad stream must never stop
        its probes for good) and an unexpected error is a stream_error."""
        try:
            time.sleep(job.jitter)
            return self.probe_safely(job)
        except Exception as exc:
            log.exception("probe failed unexpectedly", extra={"model": job.model})
            result = ProbeResult(job.model, job.kind, False, "stream_error", f"unexpected error: {exc!r}")
            with self._lock:
                if job.model in self._state:
                    self._stats.setdefault(job.model, _ModelStats(job.kind)).record(result, self.clock())
            return result
        finally:
            with self._lock:
                state = self._state.get(job.model)
                if state is not None:
                    state.queued = False

    def probe_now(self, target: Target, version: tuple[int, int, int]) -> ProbeResult:
        """One probe of `target` now, through the same pre-flight read, num_ctx choice, caused-load handling
        and pin restore as the daemon's, without waiting for a pause (the probe command: you asked)."""
        if version < MIN_VERSION:
            return ProbeResult(target.model, target.kind or "generate", False, skipped="unsupported_version")
        with self._lock:
            self._state_of(target.model)
        return self.probe_safely(Job(target.model, target.kind, target.row, target.train, version, paused=False))

    def probe_safely(self, job: Job) -> ProbeResult:
        """Pre-flight /api/ps read, the probe, /api/ps until our touch shows, then what it caused."""
        rows = self._ps_rows()
        row = rows.get(job.model) if rows is not None else None
        with self._lock:
            state = self._state_of(job.model)
            reason = "not_loaded" if rows is None else self._preflight(job, row, state)
            num_ctx = self._choose(job, row, state)
            if not reason and num_ctx is _NOT_OURS:
                state.risky.add(row.identity)
                reason = "reload_risk"
            if reason:
                self._skip(job.model, reason, self.clock())
                return ProbeResult(job.model, job.kind, False, skipped=reason)
        result = self.probe_once(job.model, job.kind, num_ctx)
        after, after_rows, moved = self._settle(job.model, row)
        self._caused(job, row, rows, after, after_rows, result)
        if result.caused_load and row is not None and row.pinned(self.clock()):
            result.keep_alive_restored = self._restore_pin(job.model, job.kind, num_ctx)
            if result.keep_alive_restored:
                after, _, moved = self._settle(job.model, after)
        self._conclude(job, row, after, moved, result)
        return result

    def _choose(self, job: Job, row: Optional[LoadedModel], state: _ModelState) -> object:
        """The num_ctx to send: the one a probe reloaded the runner with while nobody used it since (it fits
        that runner), else the first choice that has not reloaded it; _NOT_OURS when none is left."""
        if row is None:
            return None
        if state.own is not _NOT_OURS:
            return state.own
        left = [c for c in num_ctx_choices(job.version, job.kind, row.context_length, job.train)
                if c not in state.tried]
        return left[0] if left else _NOT_OURS

    def _preflight(self, job: Job, row: Optional[LoadedModel], state: _ModelState) -> str:
        """Why the fresh /api/ps row says not to send it after all ("" = send)."""
        if job.row is None:
            return ""  # an allowed cold load
        now = self.clock()
        if row is None or row.identity != job.row.identity:
            return "not_loaded"  # stopped, evicted, expired or reloaded by a user since the plan
        if row.remote:
            return "remote"
        if row.expires_at is not None and row.expires_at - now < self._margin(state):
            return "not_loaded"  # about to expire: a probe would keep it, or load it again
        if job.paused and not _same(row.expires_at, job.row.expires_at):
            return "active"  # used since the plan
        if row.identity in state.risky:
            return "reload_risk"
        if job.version < (0, 10, 0) and state.safe_size is not None and row.size != state.safe_size:
            return "reload_risk"  # no context_length before v0.10; another size means other options
        return ""

    def _settle(self, name: str, before: Optional[LoadedModel]) -> tuple[Optional[LoadedModel], dict, bool]:
        """Read /api/ps until the model's expires_at differs from `before`'s (a bounded number of times):
        Ollama restarts the idle timer only after the response has ended. Returns the last row (None: gone),
        all rows, and whether it moved."""
        rows: dict = {}
        for attempt in range(self.settle_tries):
            if attempt:
                time.sleep(self.settle_delay)
            rows = self._ps_rows() or {}
            row = rows.get(name)
            if row is None or before is None or not _same(row.expires_at, before.expires_at):
                return row, rows, True
        return rows.get(name), rows, False

    def _caused(self, job: Job, row: Optional[LoadedModel], rows: Optional[dict], after: Optional[LoadedModel],
                after_rows: dict, result: ProbeResult) -> None:
        """Did the probe make Ollama load the model? A long load_duration on a model the fresh read showed
        resident says so whatever ps shows afterwards, unless the user replaced the model meanwhile or
        (up to v0.11.4, where every request queued behind loads) another model was loading."""
        if not result.ok or result.load_duration < LOAD_SECONDS:
            return
        if row is not None and after is not None and after.digest != row.digest:
            return  # a user pulled or replaced it meanwhile
        if job.version < (0, 11, 5) and rows is not None:
            others = {n: r.identity for n, r in after_rows.items() if n != job.model}
            if any(rows.get(n) is None or rows[n].identity != identity for n, identity in others.items()):
                log.info("probe waited behind another model's load", extra={"model": job.model})
                return
        result.caused_load = True

    def _restore_pin(self, model: str, kind: str, num_ctx: Optional[int]) -> bool:
        """The probe reloaded a keep_alive -1 model, whose new runner got OLLAMA_KEEP_ALIVE: pin it again with
        one load-only request carrying the same options (it generates nothing)."""
        path, payload = ("/api/embed", {"model": model, "input": ""}) if kind == "embed" \
            else ("/api/generate", {"model": model})
        payload.update(keep_alive=-1, options=self._options(kind, num_ctx))
        try:
            self.client.post(path, payload, self.config.probes_timeout, self.headers)
        except OllamaError as exc:
            log.error("could not restore the pin a probe broke", extra={"model": model, "error": str(exc)})
            return False
        log.warning("probe reloaded a pinned model; pin restored", extra={"model": model})
        return True

    def _conclude(self, job: Job, row: Optional[LoadedModel], after: Optional[LoadedModel], moved: bool,
                  result: ProbeResult) -> None:
        with self._lock:
            state = self._state.get(job.model)
            if state is None:
                return  # forgotten meanwhile (gone from tags and ps)
            now = self.clock()
            state.probed_at = now
            if after is not None:
                state.identity, state.seen = after.identity, after.expires_at  # our touch is not a use
                state.baseline, state.adopt = (after.expires_at, False) if moved else (state.baseline, True)
            if result.ok:
                state.last_duration = result.duration or 0.0
            if result.caused_load and row is not None:
                state.tried.add(result.num_ctx)
                state.own = result.num_ctx  # the runner now has the probe's options
                left = [c for c in num_ctx_choices(job.version, job.kind, row.context_length, job.train)
                        if c not in state.tried]
                extra = {"model": job.model, "duration": result.load_duration,
                         "reason": "caused_load" if left else "reload_risk"}
                if left:
                    log.warning("probe caused a reload; the other num_ctx is tried after the next use", extra=extra)
                else:
                    state.risky.update({row.identity} | ({after.identity} if after else set()))
                    log.error("probes of this model stop: every num_ctx reloaded it", extra=extra)
            elif result.ok and row is not None and job.version < (0, 10, 0):
                state.safe_size = row.size
            if result.queue_wait is not None and result.queue_wait > WAIT_SECONDS:
                state.backoff.fail(now)  # it was busy: leave it alone for a while
            elif result.ok:
                state.backoff.reset()
            self._stats.setdefault(job.model, _ModelStats(job.kind)).record(result, now)
        if not result.ok:
            log.info("probe failed", extra={"model": job.model, "reason": result.reason, "error": result.message})

    def _ps_rows(self) -> Optional[dict[str, LoadedModel]]:
        try:
            return {m.name: m for m in self.client.ps()}
        except OllamaError as exc:
            log.debug("probe could not read /api/ps", extra={"error": str(exc)})
            return None

    # --- one request ---

    def _options(self, kind: str, num_ctx: Optional[int]) -> dict:
        options: dict = {"num_ctx": num_ctx} if num_ctx else {}
        if kind != "embed":
            options.update(num_predict=self.config.probes_num_predict, temperature=0, seed=SEED)
        return options

    def probe_once(self, model: str, kind: str, num_ctx: Optional[int]) -> ProbeResult:
        """Send one probe and time it; never raises for an Ollama failure or a broken answer (it is the result)."""
        options = self._options(kind, num_ctx)
        try:
            result = self._embed(model, options) if kind == "embed" else self._generate(model, options)
        except OllamaError as exc:
            result = ProbeResult(model, kind, False, classify(exc), str(exc))
        except _Implausible as exc:
            result = ProbeResult(model, kind, False, "stream_error", str(exc))
        result.num_ctx = num_ctx
        return result

    def _generate(self, model: str, options: dict) -> ProbeResult:
        payload = {"model": model, "prompt": self.config.probes_prompt, "stream": True, "options": options}
        started = time.monotonic()
        first = last = None
        tokens = lines = 0
        stream = self.client.stream("/api/generate", payload, self.config.probes_timeout, self.headers)
        while True:
            try:
                arrived, line = next(stream)
            except StopIteration:
                break
            except OllamaError as exc:
                if lines and exc.reason == "connection":  # the server hung up mid-stream
                    break
                raise
            lines += 1
            if not isinstance(line, dict):
                return ProbeResult(model, "generate", False, "stream_error", f"unexpected stream line {line!r:.80}")
            if "error" in line:
                return ProbeResult(model, "generate", False, "stream_error", str(line["error"])[:200])
            if line.get("response") or line.get("thinking"):
                tokens += 1
                first = arrived if first is None else first
                last = arrived
            if line.get("done"):
                total, load, prompt, evals = (_figure(line, k, MAX_DURATION_NS) for k in (
                    "total_duration", "load_duration", "prompt_eval_duration", "eval_duration"))
                return ProbeResult(
                    model, "generate", True,
                    ttft=None if first is None else first - started,
                    tpot=(last - first) / (tokens - 1) if tokens > 1 else None,
                    duration=arrived - started, tokens=tokens,
                    load_duration=load / 1e9, prompt_eval_duration=prompt / 1e9, eval_duration=evals / 1e9,
                    prompt_eval_count=_figure(line, "prompt_eval_count", MAX_COUNT),
                    eval_count=_figure(line, "eval_count", MAX_COUNT),
                    queue_wait=max(0, total - load - prompt - evals) / 1e9 if total else None)
        return ProbeResult(model, "generate", False, "truncated_stream",
                           f"the stream ended after {tokens} tokens without a done line")

    def _embed(self, model: str, options: dict) -> ProbeResult:
        payload: dict = {"model": model, "input": self.config.probes_prompt}
        if options:
            payload["options"] = options
        started = time.monotonic()
        body = self.client.embed(payload, self.config.probes_timeout, self.headers)
        return ProbeResult(model, "embed", True, duration=time.monotonic() - started,
                           load_duration=_figure(body, "load_duration", MAX_DURATION_NS) / 1e9,
                           prompt_eval_count=_figure(body, "prompt_eval_count", MAX_COUNT))


def normalise_name(name: str) -> str:
    """`qwen3` means `qwen3:latest`, as Ollama reads it; /api/ps always shows the tag."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"

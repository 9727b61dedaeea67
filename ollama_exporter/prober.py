"""Active latency probes: time to first token, time per output token and end-to-end time, as a user
sees them, measured without changing what is measured.

Every inference request is a "use" in Ollama's scheduler: it restarts the model's idle timer, a
`keep_alive` in it overwrites the user's choice, a different `num_ctx` reloads the model, and a model
that is not loaded gets loaded. So a probe:
- only targets models resident in the latest /api/ps (unless probes.allow_cold_load and listed);
- never sends keep_alive;
- sends options.num_ctx equal to the context_length /api/ps reports, so the runner's options match;
- probes a model with a finite keep_alive only when real traffic touched it since the previous probe
  (its expires_at moved past the value our own probe left), so an idle model unloads at most about one
  probe interval later than it would have without the exporter; "forever" models are probed each time;
- checks /api/ps after each probe; if the probe caused a (re)load it is counted, the model is left
  alone for a backoff period, and the other num_ctx strategy (omit it) is tried next time.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from ollama_exporter.config import Config
from ollama_exporter.ollama import OllamaClient, OllamaError
from ollama_exporter.snapshot import HistogramValue, InstalledModel, LoadedModel, Snapshot

log = logging.getLogger(__name__)

SEED = 42  # fixed, with temperature 0, so every probe asks for the same work
DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
                    45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
TPOT_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
FAILURE_REASONS = ("not_found", "out_of_memory", "context_length", "busy", "timeout", "truncated_stream",
                   "stream_error", "http_4xx", "http_5xx", "connection")
SKIP_REASONS = ("not_loaded", "idle", "backoff", "in_progress", "unsupported")
FOREVER_SECONDS = 20 * 365 * 86400  # an expiry further away than this is keep_alive -1
TOUCH_TOLERANCE_SECONDS = 1.0  # expires_at later than our probe left it by more than this: real traffic
LOAD_SECONDS = 0.1  # a load_duration at least this long, with /api/ps changed, means the probe loaded it
STRATEGIES = ("num_ctx", "omit")


@dataclass
class ProbeResult:
    model: str
    kind: str  # "generate" or "embed"
    ok: bool
    reason: str = ""  # one of FAILURE_REASONS when not ok
    message: str = ""
    ttft: Optional[float] = None  # seconds, client-observed
    tpot: Optional[float] = None
    duration: Optional[float] = None  # end to end
    tokens: int = 0  # token chunks the client saw
    load_duration: float = 0.0  # Ollama's own figures from the final chunk, in seconds
    prompt_eval_duration: float = 0.0
    eval_duration: float = 0.0
    prompt_eval_count: int = 0
    eval_count: int = 0


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.count, self.sum = buckets, [0] * len(buckets), 0, 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def value(self) -> HistogramValue:
        return HistogramValue(self.buckets, tuple(self.counts), self.count, self.sum)


@dataclass(frozen=True)
class ModelProbeStats:
    """Cumulative probe results for one model, as copied into a Snapshot."""

    kind: str
    ttft: HistogramValue
    tpot: HistogramValue
    duration: HistogramValue
    prompt_eval_tokens: int
    prompt_eval_seconds: float
    eval_tokens: int
    eval_seconds: float
    load_seconds: float
    probes: int
    failures: Mapping[str, int]
    skipped: Mapping[str, int]
    caused_loads: int
    last_success: Optional[bool]
    last_timestamp: Optional[float]


class _ModelStats:
    def __init__(self, kind: str = "generate"):
        self.kind = kind
        self.ttft, self.tpot = _Histogram(DURATION_BUCKETS), _Histogram(TPOT_BUCKETS)
        self.duration = _Histogram(DURATION_BUCKETS)
        self.prompt_eval_tokens = self.eval_tokens = self.probes = self.caused_loads = 0
        self.prompt_eval_seconds = self.eval_seconds = self.load_seconds = 0.0
        self.failures = {r: 0 for r in FAILURE_REASONS}
        self.skipped = {r: 0 for r in SKIP_REASONS}
        self.last_success: Optional[bool] = None
        self.last_timestamp: Optional[float] = None

    def record(self, r: ProbeResult, now: float) -> None:
        self.kind = r.kind
        self.probes += 1
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
        self.prompt_eval_tokens += r.prompt_eval_count
        self.eval_tokens += r.eval_count
        self.prompt_eval_seconds += r.prompt_eval_duration
        self.eval_seconds += r.eval_duration
        self.load_seconds += r.load_duration

    def value(self) -> ModelProbeStats:
        return ModelProbeStats(
            self.kind, self.ttft.value(), self.tpot.value(), self.duration.value(), self.prompt_eval_tokens,
            self.prompt_eval_seconds, self.eval_tokens, self.eval_seconds, self.load_seconds, self.probes,
            dict(self.failures), dict(self.skipped), self.caused_loads, self.last_success, self.last_timestamp)


@dataclass
class _ModelState:
    """What the gate remembers about one model between probes."""

    identity: Optional[tuple] = None  # LoadedModel.identity last seen
    baseline: Optional[float] = None  # expires_at as our last probe (or first sight) left it
    running: bool = False
    backoff_until: float = 0.0
    strategy: str = "num_ctx"  # kept until it causes a load: what works is what is remembered


@dataclass
class Job:
    model: str
    kind: str
    row: Optional[LoadedModel]  # the /api/ps row before the probe; None for an allowed cold load
    num_ctx: Optional[int] = None
    jitter: float = 0.0


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

    def refusal(self, allow_cold_load: bool) -> str:
        """Why it must not be probed at all ("unsupported", "not_loaded"), or "" if it may be."""
        if self.kind is None:
            return "unsupported"
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
        result.append(Target(name, kind_of(model), row, name in installed))
    return result


def _seconds(value) -> float:
    return value / 1e9 if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Prober:
    def __init__(self, client: OllamaClient, config: Config, latest: Callable[[], Snapshot],
                 clock: Callable[[], float] = time.time):
        self.client = client
        self.config = config
        self.latest = latest
        self.clock = clock
        self.jitter_max = min(config.probes_interval * 0.1, 2.0)
        self.backoff_seconds = max(10 * config.probes_interval, 300.0)
        self._lock = threading.Lock()
        self._stats: dict[str, _ModelStats] = {}
        self._state: dict[str, _ModelState] = {}
        self._planned_before = False
        self._slots = threading.BoundedSemaphore(config.probes_concurrency)

    # --- the loop ---

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.config.probes_interval):
            try:
                self.tick()
            except Exception:
                log.exception("probe round failed unexpectedly")

    def tick(self) -> list[Future]:
        """Plan one round from the latest snapshot and start its probes; returns their futures."""
        snapshot = self.latest()
        if not snapshot.ready or not snapshot.up:
            return []  # no current /api/ps: nothing is known to be resident
        with self._lock:
            jobs = self.plan(snapshot)
        return [self._start(job) for job in jobs]

    def _start(self, job: Job) -> Future:
        """Run a job in a daemon thread (a probe stuck in a read must never hold up shutdown)."""
        future: Future = Future()

        def work() -> None:
            with self._slots:
                try:
                    future.set_result(self._run_job(job))
                except BaseException as exc:  # surfaced through the future; the loop goes on
                    log.exception("probe failed unexpectedly", extra={"model": job.model})
                    future.set_exception(exc)

        threading.Thread(target=work, name=f"probe {job.model}", daemon=True).start()
        return future

    def stats(self, installed: Optional[set[str]]) -> dict[str, ModelProbeStats]:
        """A consistent copy for the Snapshot; models no longer installed are forgotten."""
        with self._lock:
            for name in [n for n in self._stats if installed is not None and n not in installed]:
                del self._stats[name]
                self._state.pop(name, None)
            return {name: s.value() for name, s in self._stats.items()}

    # --- planning: which models to probe now, and why the others are skipped ---

    def plan(self, snapshot: Snapshot) -> list[Job]:
        now = self.clock()
        jobs = []
        for t in targets(snapshot, self.config.probes_models):
            state = self._state.setdefault(t.model, _ModelState())
            reason = t.refusal(self.config.probes_allow_cold_load) or (self._gate(t.row, state, now) if t.row else "")
            if reason:
                self._skip(t.model, reason)
                continue
            state.running = True
            num_ctx = t.row.context_length if t.row and state.strategy == "num_ctx" else None
            jobs.append(Job(t.model, t.kind, t.row, num_ctx, random.uniform(0, self.jitter_max)))
        self._planned_before = True
        return jobs

    def _gate(self, row: LoadedModel, state: _ModelState, now: float) -> str:
        """"" to probe now, else the skip reason."""
        if state.running:
            return "in_progress"
        if now < state.backoff_until:
            return "backoff"
        if row.expires_at is not None and row.expires_at - now > FOREVER_SECONDS:
            return ""  # keep_alive -1: probing cannot keep it loaded any longer than the user asked
        if self.config.probes_idle_models == "probe":
            return ""
        if state.identity != row.identity:
            first_sight = state.identity is None and not self._planned_before
            state.identity = row.identity
            if first_sight:  # resident when we started: we cannot tell when it was last used
                state.baseline = row.expires_at
                return "idle"
            return ""  # (re)loaded since we last looked: a real request did that
        if row.expires_at is not None and state.baseline is not None \
                and row.expires_at > state.baseline + TOUCH_TOLERANCE_SECONDS:
            return ""  # real traffic restarted its idle timer since our last probe
        return "idle"

    def _skip(self, name: str, reason: str) -> None:
        self._stats.setdefault(name, _ModelStats()).skipped[reason] += 1

    # --- running one probe ---

    def _run_job(self, job: Job) -> ProbeResult:
        time.sleep(job.jitter)
        result = self.probe_once(job.model, job.kind, job.num_ctx)
        after = self._ps_row(job.model)
        with self._lock:
            state = self._state.setdefault(job.model, _ModelState())
            stats = self._stats.setdefault(job.model, _ModelStats(job.kind))
            state.running = False
            if after is not None:
                state.baseline, state.identity = after.expires_at, after.identity
            changed = after is not None and (job.row is None or (after.context_length, after.size) !=
                                             (job.row.context_length, job.row.size))
            if changed and result.load_duration >= LOAD_SECONDS:
                stats.caused_loads += 1
                if job.row is not None:  # it was resident: our request made it reload
                    state.backoff_until = self.clock() + self.backoff_seconds
                    state.strategy = STRATEGIES[1 - STRATEGIES.index(state.strategy)]
                    log.warning("probe caused a reload, pausing the model's probes", extra={
                        "model": job.model, "duration": self.backoff_seconds,
                        "num_ctx": "omitted" if state.strategy == "omit" else "from /api/ps"})
            stats.record(result, self.clock())
        if not result.ok:
            log.info("probe failed", extra={"model": job.model, "reason": result.reason, "error": result.message})
        return result

    def _ps_row(self, name: str) -> Optional[LoadedModel]:
        try:
            return next((m for m in self.client.ps() if m.name == name), None)
        except OllamaError:
            return None

    def probe_once(self, model: str, kind: str, num_ctx: Optional[int]) -> ProbeResult:
        """Send one probe and time it; never raises for an Ollama failure (it is the result)."""
        options: dict = {"num_ctx": num_ctx} if num_ctx else {}
        try:
            if kind == "embed":
                return self._embed(model, options)
            options.update(num_predict=self.config.probes_num_predict, temperature=0, seed=SEED)
            return self._generate(model, options)
        except OllamaError as exc:
            return ProbeResult(model, kind, False, classify(exc), str(exc))

    def _generate(self, model: str, options: dict) -> ProbeResult:
        payload = {"model": model, "prompt": self.config.probes_prompt, "stream": True, "options": options}
        started = time.monotonic()
        first = last = None
        tokens = lines = 0
        stream = self.client.stream("/api/generate", payload, self.config.probes_timeout)
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
                return ProbeResult(model, "generate", False, "stream_error", f"unexpected stream line {line!r}")
            if "error" in line:
                return ProbeResult(model, "generate", False, "stream_error", str(line["error"]))
            if line.get("response") or line.get("thinking"):
                tokens += 1
                first = arrived if first is None else first
                last = arrived
            if line.get("done"):
                return ProbeResult(
                    model, "generate", True,
                    ttft=None if first is None else first - started,
                    tpot=(last - first) / (tokens - 1) if tokens > 1 else None,
                    duration=arrived - started, tokens=tokens,
                    load_duration=_seconds(line.get("load_duration")),
                    prompt_eval_duration=_seconds(line.get("prompt_eval_duration")),
                    eval_duration=_seconds(line.get("eval_duration")),
                    prompt_eval_count=_count(line.get("prompt_eval_count")),
                    eval_count=_count(line.get("eval_count")))
        return ProbeResult(model, "generate", False, "truncated_stream",
                           f"the stream ended after {tokens} tokens without a done line")

    def _embed(self, model: str, options: dict) -> ProbeResult:
        payload = {"model": model, "input": self.config.probes_prompt}
        if options:
            payload["options"] = options
        started = time.monotonic()
        body = self.client.embed(payload, self.config.probes_timeout)
        return ProbeResult(model, "embed", True, duration=time.monotonic() - started,
                           load_duration=_seconds(body.get("load_duration")),
                           prompt_eval_count=_count(body.get("prompt_eval_count")))


def normalise_name(name: str) -> str:
    """`qwen3` means `qwen3:latest`, as Ollama reads it; /api/ps always shows the tag."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"

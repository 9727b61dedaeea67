"""Cumulative real-traffic statistics from Ollama's log, and the rules that attribute lines to models.

`TrafficStats.feed` takes one raw line, parses it (logparse) and updates counters under a lock;
`state()`/`restore()` turn everything (counters and attribution state) into JSON so that the follower
can persist it together with its log position, and `value()` returns a frozen copy for the Snapshot.

Model attribution of llama-server's per-request lines (they carry a slot and a task id, never a
model, port or pid; task ids restart at 0 in every runner). A request gets a model only when it is
certain, otherwise the label `_unattributed`:
1. The sole runner. `loaded runners count=1` right after a load means the runner just loaded is the
   only one; it stays so until the next `starting llama-server` (a new runner always prints one first).
   Also, when a poll saw exactly one model in /api/ps, with no load in progress and no load line read
   since just before that poll, then once the follower has read everything written up to the poll's end
   (plus LAG_SECONDS for the log's own latency), every later line comes from that model's runner.
2. The /slots join. When every runner answered /slots in a poll, a request launched before the poll
   started, still running in the log, whose (slot, task) is in flight on exactly one runner and on no
   other request in the log, belongs to that runner's model, applied at the same catch-up point.
A request that starts and ends between two polls with several runners loaded stays unattributed.
Requests are counted when their lines arrive, so the model a request is booked under never changes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from ollama_exporter import logparse as lp
from ollama_exporter.histogram import Histogram
from ollama_exporter.snapshot import HistogramValue

UNATTRIBUTED = "_unattributed"
LAG_SECONDS = 1.0  # a line reaches the log (journald, a file, a pipe) within this long of its event
MAX_INFLIGHT = 4096  # requests in flight in the log; more means lost release lines: forget the oldest
LINE_RESULTS = ("parsed", "ignored", "malformed")
DROP_REASONS = ("overflow", "journal_rate_limit")
DISCONNECT_STAGES = ("scheduling_or_load", "waiting_for_slot")
STATE_VERSION = 1

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                600.0, 1200.0, 1800.0, 3600.0)
LOAD_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PREFILL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TPOT_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class TrafficValue:
    """Everything the log source has counted, as copied into a Snapshot; keys are label tuples."""

    lines: Mapping[str, int]
    dropped: Mapping[str, int]
    requests: Mapping[tuple[str, str, str], int]  # (route, method, code)
    durations: Mapping[tuple[str, str], HistogramValue]  # (route, code_class)
    own_requests: Mapping[tuple[str, str], int]  # (route, code) of the exporter's own requests
    disconnects: Mapping[str, int]  # stage
    load_durations: Mapping[str, HistogramValue]  # model
    load_failures: Mapping[tuple[str, str], int]  # (model, reason)
    runner_crashes: Mapping[str, int]
    runtime_ooms: int
    prompt_truncations: int
    prompt_tokens: Mapping[tuple[str, str], int]  # (model, cache)
    generated_tokens: Mapping[str, int]
    prefill: Mapping[str, HistogramValue]
    tpot: Mapping[str, HistogramValue]
    completions: Mapping[tuple[str, str], int]  # (model, truncated)
    without_timings: Mapping[str, int]


@dataclass
class _Request:
    """A request in flight in the log, keyed by (slot, task)."""

    model: Optional[str]  # None: not known yet (the /slots join may settle it); UNATTRIBUTED: never
    launched_at: float  # when its launch line was read; inf when its launch line was never seen
    prompt_tokens: Optional[int] = None
    timed: bool = False  # its timing lines were printed (a normal stop)
    collided: bool = False  # another request had the same (slot, task) at the same time

    @property
    def label(self) -> str:
        return UNATTRIBUTED if self.model is None or self.collided else self.model


@dataclass
class _Epoch:
    """The latest runner start: what it loads, and how its load went."""

    blob: str
    llama_server: bool
    name: str = ""  # from `template selection` (v0.30.1+)
    load_seconds: Optional[float] = None
    observed: bool = False  # its load time went into the histogram
    failed: bool = False


@dataclass
class _PollView:
    mark: int
    finished: float
    sole: Optional[str]  # the only loaded model in /api/ps, if exactly one
    slots: Optional[dict]  # (slot, task) -> model or None (on several runners); None: not every runner answered
    started: float


@dataclass
class _Counters:
    lines: dict = field(default_factory=lambda: dict.fromkeys(LINE_RESULTS, 0))
    dropped: dict = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    requests: dict = field(default_factory=dict)
    durations: dict = field(default_factory=dict)
    own_requests: dict = field(default_factory=dict)
    disconnects: dict = field(default_factory=lambda: dict.fromkeys(DISCONNECT_STAGES, 0))
    load_durations: dict = field(default_factory=dict)
    load_failures: dict = field(default_factory=dict)
    runner_crashes: dict = field(default_factory=dict)
    runtime_ooms: int = 0
    prompt_truncations: int = 0
    prompt_tokens: dict = field(default_factory=dict)
    generated_tokens: dict = field(default_factory=dict)
    prefill: dict = field(default_factory=dict)
    tpot: dict = field(default_factory=dict)
    completions: dict = field(default_factory=dict)
    without_timings: dict = field(default_factory=dict)


_COUNTER_DICTS = ("requests", "own_requests", "load_failures", "runner_crashes", "prompt_tokens", "generated_tokens",
                  "completions", "without_timings")
_HISTOGRAMS = {"durations": HTTP_BUCKETS, "load_durations": LOAD_BUCKETS, "prefill": PREFILL_BUCKETS,
               "tpot": TPOT_BUCKETS}
_PER_MODEL = ("load_durations", "load_failures", "runner_crashes", "prompt_tokens", "generated_tokens", "prefill",
              "tpot", "completions", "without_timings")


def _key(labels: Any) -> Any:
    return labels[0] if isinstance(labels, tuple) and len(labels) == 1 else labels


class TrafficStats:
    """Counters and attribution state; every method is thread-safe."""

    def __init__(self, own_client: str = "", clock: Callable[[], float] = time.time):
        self.parser = lp.LineParser(own_client)
        self.clock = clock
        self._lock = threading.Lock()
        self._c = _Counters()
        self._inflight: dict[tuple[int, int], _Request] = {}
        self._epoch: Optional[_Epoch] = None
        self._loading = False
        self._sole: Optional[str] = None  # model of the only runner, when certain
        self._changes = 0  # runner topology changes seen in the log (starts, ends, crashes, restarts)
        self._views: list[_PollView] = []  # polls waiting for the log to catch up with them
        self._names_by_blob: dict[str, tuple[str, ...]] = {}
        self._loaded: frozenset = frozenset()

    # --- input ---

    def feed(self, line: Optional[bytes]) -> None:
        """One raw line (without its newline); None stands for a line too long to keep."""
        result = lp.MALFORMED if line is None else self.parser.parse(line.decode("utf-8", "replace"))
        with self._lock:
            self._apply(result)

    def feed_many(self, lines: Iterable[Optional[bytes]]) -> None:
        parse = self.parser.parse
        results = [lp.MALFORMED if ln is None else parse(ln.decode("utf-8", "replace")) for ln in lines]
        with self._lock:
            for result in results:
                self._apply(result)

    def dropped(self, count: int, reason: str) -> None:
        """Lines lost before parsing: every certainty about which runner is which goes with them."""
        with self._lock:
            self._c.dropped[reason] += count
            self._forget_attribution()

    def poll_mark(self) -> int:
        """Taken just before a poll reads /api/ps: the log's runner-change count (-1 while a load runs)."""
        with self._lock:
            return -1 if self._loading else self._changes

    def observe_poll(self, mark: int, started: float, finished: float, loaded: Iterable[str],
                     names_by_blob: Mapping[str, Iterable[str]], slots: Optional[Mapping] = None) -> None:
        """What a poll saw between `started` and `finished`: /api/ps names, blob -> installed names, and
        `slots` {(slot, task): model} of requests in flight on the runners (None unless every runner
        answered /slots; a key on several runners maps to None)."""
        loaded = frozenset(loaded)
        with self._lock:
            self._names_by_blob = {b: tuple(sorted(n)) for b, n in names_by_blob.items()}
            self._loaded = loaded
            if len(loaded) != 1:
                self._sole = None if len(loaded) > 1 else self._sole
            if mark < 0 or mark != self._changes:
                return  # a load began or ended around this poll: what it saw may be stale already
            sole = next(iter(loaded)) if len(loaded) == 1 else None
            self._views = self._views[-3:] + [_PollView(mark, finished, sole, dict(slots) if slots else None, started)]

    def caught_up(self, now: Optional[float] = None) -> None:
        """The follower has read everything the log holds at `now`: apply the polls it has overtaken."""
        reached = (self.clock() if now is None else now) - LAG_SECONDS
        with self._lock:
            while self._views and self._views[0].finished <= reached:
                view = self._views.pop(0)
                if view.mark != self._changes:
                    continue
                if view.sole is not None:  # every request still in flight is on that one runner
                    self._sole = view.sole
                    for request in self._inflight.values():
                        if request.model is None and not request.collided:
                            request.model = view.sole
                if view.slots:
                    self._join(view)

    def forget_models(self, installed: Optional[set]) -> bool:
        """Drop the series of models no longer installed (None: /api/tags never answered, keep all); True
        when something was dropped."""
        if installed is None:
            return False
        keep, dropped = set(installed) | {UNATTRIBUTED}, False
        with self._lock:
            for name in _PER_MODEL:
                table = getattr(self._c, name)
                for labels in [k for k in table if (k[0] if isinstance(k, tuple) else k) not in keep]:
                    del table[labels]
                    dropped = True
        return dropped

    # --- output ---

    def value(self) -> TrafficValue:
        with self._lock:
            return self._value()

    def checkpoint(self) -> tuple[dict, TrafficValue]:
        """`state()` and `value()` of the same moment, for a commit."""
        with self._lock:
            return self._state(), self._value()

    def state(self) -> dict:
        """Counters and attribution state as JSON-ready data (polls in progress are not kept)."""
        with self._lock:
            return self._state()

    def _value(self) -> TrafficValue:
        c = self._c
        hist = {name: {k: h.value() for k, h in getattr(c, name).items()} for name in _HISTOGRAMS}
        return TrafficValue(
            lines=dict(c.lines), dropped=dict(c.dropped), requests=dict(c.requests),
            durations=hist["durations"], own_requests=dict(c.own_requests), disconnects=dict(c.disconnects),
            load_durations=hist["load_durations"], load_failures=dict(c.load_failures),
            runner_crashes=dict(c.runner_crashes), runtime_ooms=c.runtime_ooms,
            prompt_truncations=c.prompt_truncations, prompt_tokens=dict(c.prompt_tokens),
            generated_tokens=dict(c.generated_tokens), prefill=hist["prefill"], tpot=hist["tpot"],
            completions=dict(c.completions), without_timings=dict(c.without_timings))

    def _state(self) -> dict:
        c = self._c
        counters: dict[str, Any] = {"lines": dict(c.lines), "dropped": dict(c.dropped),
                                    "disconnects": dict(c.disconnects), "runtime_ooms": c.runtime_ooms,
                                    "prompt_truncations": c.prompt_truncations}
        for name in _COUNTER_DICTS:
            counters[name] = [[*_labels(k), v] for k, v in getattr(c, name).items()]
        for name in _HISTOGRAMS:
            counters[name] = [[*_labels(k), h.counts, h.sum] for k, h in getattr(c, name).items()]
        epoch = self._epoch
        return {
            "version": STATE_VERSION,
            "counters": counters,
            "inflight": [[s, t, r.model, r.launched_at if r.launched_at != float("inf") else None,
                          r.prompt_tokens, r.timed, r.collided] for (s, t), r in self._inflight.items()],
            "epoch": None if epoch is None else [epoch.blob, epoch.llama_server, epoch.name, epoch.load_seconds,
                                                 epoch.observed, epoch.failed],
            "loading": self._loading,
            "sole": self._sole,
        }

    def restore(self, state: Mapping) -> None:
        """Continue from `state()` output; raises ValueError (naming the problem) when it does not fit."""
        try:
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"state version {state.get('version')!r} is not {STATE_VERSION}")
            counters, c = state["counters"], _Counters()
            for name in ("lines", "dropped", "disconnects"):
                getattr(c, name).update({str(k): int(v) for k, v in counters[name].items()})
            c.runtime_ooms, c.prompt_truncations = int(counters["runtime_ooms"]), int(counters["prompt_truncations"])
            for name in _COUNTER_DICTS:
                setattr(c, name, {_key(tuple(map(str, row[:-1]))): int(row[-1]) for row in counters[name]})
            for name, buckets in _HISTOGRAMS.items():
                table = {}
                for row in counters[name]:
                    counts = [int(n) for n in row[-2]]
                    if len(counts) != len(buckets) + 1:
                        raise ValueError(f"{name}: {len(counts)} buckets, expected {len(buckets) + 1}")
                    table[_key(tuple(map(str, row[:-2])))] = Histogram(buckets, counts, float(row[-1]))
                setattr(c, name, table)
            inflight = {}
            for s, t, model, launched, prompt, timed, collided in state["inflight"][-MAX_INFLIGHT:]:
                inflight[(int(s), int(t))] = _Request(model, float("inf") if launched is None else float(launched),
                                                      prompt, bool(timed), bool(collided))
            epoch = state["epoch"]
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"unexpected content ({type(exc).__name__}: {exc})") from None
        with self._lock:
            self._c, self._inflight = c, inflight
            self._epoch = None if epoch is None else _Epoch(*epoch)
            self._loading, self._sole = bool(state.get("loading")), state.get("sole")
            self._views = []

    # --- event handling (lock held) ---

    def _apply(self, result: lp.Result) -> None:
        c = self._c
        if isinstance(result, str):
            c.lines[result] += 1
            return
        c.lines["parsed"] += 1
        handler = _HANDLERS.get(type(result))
        if handler is not None:
            handler(self, result)

    def _gin(self, e: lp.GinRequest) -> None:
        c = self._c
        if e.own:
            key = (e.route, e.code)
            c.own_requests[key] = c.own_requests.get(key, 0) + 1
            return
        key3 = (e.route, e.method, e.code)
        c.requests[key3] = c.requests.get(key3, 0) + 1
        key2 = (e.route, e.code[0] + "xx" if e.code != lp.OTHER else lp.OTHER)
        h = c.durations.get(key2)
        if h is None:
            h = c.durations[key2] = Histogram(HTTP_BUCKETS)
        h.observe(e.seconds)
        if e.code == "499":
            c.disconnects["scheduling_or_load"] += 1

    def _server_start(self, e: lp.ServerStart) -> None:
        self._forget_attribution()
        self._inflight.clear()  # its runners died with it: their requests will never end in the log
        self._epoch, self._loading = None, False

    def _load_start(self, e: lp.LoadStart) -> None:
        self._finish_load()
        self._epoch = _Epoch(e.blob, e.llama_server)
        self._loading, self._sole = True, None
        self._changes += 1

    def _load_done(self, e: lp.LoadDone) -> None:
        epoch = self._epoch
        if epoch is None or epoch.failed or epoch.load_seconds is not None:
            return  # printed twice or more per load: only the first after a start counts
        epoch.load_seconds = e.seconds
        if not epoch.llama_server:  # before v0.30 the model's name never follows; resolve it now
            self._finish_load()

    def _template(self, e: lp.TemplateSelection) -> None:
        if self._epoch is not None:
            self._epoch.name = e.model
            self._finish_load()

    def _loaded_runners(self, e: lp.LoadedRunners) -> None:
        self._changes += 1
        self._loading = False
        epoch = self._epoch
        if epoch is not None and epoch.load_seconds is not None:
            self._finish_load()
        self._sole = self._model_of(epoch) if e.count == 1 and epoch is not None else None

    def _load_failed(self, e: lp.LoadFailed) -> None:
        self._changes += 1
        self._loading = False
        epoch = self._epoch
        if epoch is not None and epoch.failed:
            return  # `Load failed` and `error loading llama server` report the same failure
        if epoch is not None and not epoch.observed:
            epoch.failed = True
            model = self._model_of(epoch)
        else:
            model = self._model_of_blob(e.blob)
        key = (model, e.reason)
        self._c.load_failures[key] = self._c.load_failures.get(key, 0) + 1

    def _crash(self, e: lp.RunnerCrash) -> None:
        model = self._sole or UNATTRIBUTED
        self._c.runner_crashes[model] = self._c.runner_crashes.get(model, 0) + 1
        self._changes += 1
        self._sole = None

    def _runtime_oom(self, e: lp.RuntimeOom) -> None:
        self._c.runtime_ooms += 1

    def _truncation(self, e: lp.PromptTruncated) -> None:
        self._c.prompt_truncations += 1

    def _queued_abort(self, e: lp.QueuedAbort) -> None:
        self._c.disconnects["waiting_for_slot"] += 1

    def _suppressed(self, e: lp.JournalSuppressed) -> None:
        self._c.dropped["journal_rate_limit"] += e.count
        self._forget_attribution()

    def _launch(self, e: lp.SlotLaunch) -> None:
        key = (e.slot, e.task)
        request = _Request(self._sole, self.clock())
        previous = self._inflight.pop(key, None)
        if previous is not None:  # two runners on the same slot and task: neither can be told apart
            previous.collided = request.collided = True
        self._inflight[key] = request
        if len(self._inflight) > MAX_INFLIGHT:
            del self._inflight[next(iter(self._inflight))]

    def _request(self, slot: int, task: int) -> _Request:
        request = self._inflight.get((slot, task))
        if request is None:  # its launch line came before the log position we started from
            request = self._inflight[(slot, task)] = _Request(self._sole, float("inf"))
        return request

    def _prompt(self, e: lp.SlotPrompt) -> None:
        self._request(e.slot, e.task).prompt_tokens = e.tokens

    def _prompt_eval(self, e: lp.SlotPromptEval) -> None:
        request = self._request(e.slot, e.task)
        request.timed = True
        model, c = request.label, self._c
        c.prompt_tokens[(model, "miss")] = c.prompt_tokens.get((model, "miss"), 0) + e.tokens
        if request.prompt_tokens is not None and request.prompt_tokens >= e.tokens:
            hits = request.prompt_tokens - e.tokens
            c.prompt_tokens[(model, "hit")] = c.prompt_tokens.get((model, "hit"), 0) + hits
        _observe(c.prefill, model, PREFILL_BUCKETS, e.seconds)

    def _eval(self, e: lp.SlotEval) -> None:
        request = self._request(e.slot, e.task)
        request.timed = True
        model, c = request.label, self._c
        c.generated_tokens[model] = c.generated_tokens.get(model, 0) + e.tokens
        if e.tokens > 0:
            _observe(c.tpot, model, TPOT_BUCKETS, e.seconds / e.tokens)

    def _release(self, e: lp.SlotRelease) -> None:
        request = self._inflight.pop((e.slot, e.task), None) or _Request(self._sole, float("inf"))
        c = self._c
        if request.timed:
            key = (request.label, "true" if e.truncated else "false")
            c.completions[key] = c.completions.get(key, 0) + 1
        else:
            c.without_timings[request.label] = c.without_timings.get(request.label, 0) + 1

    # --- attribution helpers (lock held) ---

    def _forget_attribution(self) -> None:
        """Lines went missing (or Ollama restarted): a later line for a request in flight may be another's."""
        for request in self._inflight.values():
            request.model = UNATTRIBUTED
        self._sole, self._views = None, []
        self._changes += 1

    def _join(self, view: _PollView) -> None:
        for key, request in self._inflight.items():
            if request.model is None and not request.collided and request.launched_at < view.started:
                model = view.slots.get(key)
                if model is not None:
                    request.model = model

    def _finish_load(self) -> None:
        epoch = self._epoch
        if epoch is not None and epoch.load_seconds is not None and not epoch.observed and not epoch.failed:
            epoch.observed = True
            _observe(self._c.load_durations, self._model_of(epoch), LOAD_BUCKETS, epoch.load_seconds)

    def _model_of(self, epoch: Optional[_Epoch]) -> str:
        if epoch is None:
            return UNATTRIBUTED
        return epoch.name or self._model_of_blob(epoch.blob)

    def _model_of_blob(self, blob: str) -> str:
        """The installed model whose weights are `blob`; when several names share it, the loaded one."""
        names = self._names_by_blob.get(blob, ()) if blob else ()
        if len(names) > 1:
            names = tuple(n for n in names if n in self._loaded)
        return names[0] if len(names) == 1 else UNATTRIBUTED


def _labels(key: Any) -> list:
    return list(key) if isinstance(key, tuple) else [key]


def _observe(table: dict, key: str, buckets: tuple[float, ...], value: float) -> None:
    h = table.get(key)
    if h is None:
        h = table[key] = Histogram(buckets)
    h.observe(value)


_HANDLERS: dict[type, Callable[[TrafficStats, Any], None]] = {
    lp.GinRequest: TrafficStats._gin, lp.ServerStart: TrafficStats._server_start,
    lp.LoadStart: TrafficStats._load_start, lp.LoadDone: TrafficStats._load_done,
    lp.TemplateSelection: TrafficStats._template, lp.LoadedRunners: TrafficStats._loaded_runners,
    lp.LoadFailed: TrafficStats._load_failed, lp.RunnerCrash: TrafficStats._crash,
    lp.RuntimeOom: TrafficStats._runtime_oom, lp.PromptTruncated: TrafficStats._truncation,
    lp.QueuedAbort: TrafficStats._queued_abort, lp.JournalSuppressed: TrafficStats._suppressed,
    lp.SlotLaunch: TrafficStats._launch, lp.SlotPrompt: TrafficStats._prompt,
    lp.SlotPromptEval: TrafficStats._prompt_eval, lp.SlotEval: TrafficStats._eval,
    lp.SlotRelease: TrafficStats._release,
}

"""The `runners` source: how busy each loaded model's runner is, from the runner itself, read-only.

Ollama v0.30+ runs each model in an upstream llama-server on a loopback port (its command line says
`--model <blob> --port N`; runners.py maps the blob to the /api/ps name). Per runner, once: GET /props
(`total_slots`, and whether /slots is on); each poll: GET /slots (per slot: `n_ctx`, `is_processing`,
the task id, tokens so far). v0.1.32-v0.3.x runners (`ollama_llama_server`, C++) answer GET /health with
`slots_idle`/`slots_processing`; their /slots holds prompts and is never read. Other runners (the Go
runner of v0.4-v0.24, MLX) have nothing safe to read; they are asked /health once and then left alone.

Never /metrics (reading it resets the gauges behind it) and nothing that writes. One request in flight
per runner: a runner still answering the previous poll (a long prefill can hold /slots for seconds) is
reported as a timeout for that poll, never as zero busy slots, and is not asked again until it has
answered the request the poll gave up on (or HOLD_SECONDS passed).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

from ollama_exporter import runners
from ollama_exporter.httpclient import HttpClient, HttpError
from ollama_exporter.ollama import USER_AGENT, reject_constant
from ollama_exporter.snapshot import InstalledModel, LoadedModel

MAX_BODY = 4 * 1024 * 1024
# How long a request to a runner is left to answer after its poll gave up on it. Until then it counts as
# in flight and the runner is not asked again: a runner that is slow to answer (a long prefill holds its
# loop) never sees a pile of abandoned requests.
HOLD_SECONDS = 30.0
LLAMA_SERVER, OLD_RUNNER, UNSUPPORTED = "llama-server", "ollama_llama_server", "unsupported"


@dataclass(frozen=True)
class Slot:
    id: int
    context_tokens: Optional[int]  # n_ctx of this slot
    busy: bool
    task: Optional[int]  # id_task of the request it is processing
    used_tokens: Optional[int]  # context in use by that request; 0 when idle


@dataclass(frozen=True)
class RunnerSample:
    model: str
    pid: int
    port: int
    kind: str  # LLAMA_SERVER or OLD_RUNNER
    slots: Optional[int] = None  # capacity
    busy: Optional[int] = None
    slot_states: tuple[Slot, ...] = ()
    error: Optional[str] = None  # one of snapshot.ERROR_REASONS when this runner's sample failed
    message: str = ""


@dataclass(frozen=True)
class RunnersState:
    runners: tuple[RunnerSample, ...]
    complete: bool  # every loaded model's runner was found and answered /slots
    found: bool  # some model runner process was visible (else, with runners.enabled auto, say nothing)

    def in_flight(self) -> Optional[dict[tuple[int, int], Optional[str]]]:
        """(slot, task) -> model of the requests being processed; None when not every runner answered.
        A (slot, task) on several runners maps to None: task ids restart at 0 in every runner."""
        if not self.complete:
            return None
        seen: dict[tuple[int, int], Optional[str]] = {}
        for r in self.runners:
            for s in r.slot_states:
                if s.busy and s.task is not None:
                    key = (s.id, s.task)
                    seen[key] = None if key in seen else r.model
        return seen


class RunnerError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def get_json(port: int, path: str, timeout: float, host: str = "127.0.0.1") -> tuple[int, Any]:
    """GET http://host:port/path within `timeout` seconds in total, headers included (the deadline-enforcing
    client: a runner sending a byte now and then cannot hold the call past it); (status, JSON or None)."""
    client = HttpClient(f"http://{host}:{port}", USER_AGENT)
    try:
        answer = client.request("GET", path, timeout=timeout, max_bytes=MAX_BODY)
    except HttpError as exc:
        raise RunnerError(exc.reason, f"port {port}: {exc}") from None
    try:
        return answer.status, json.loads(answer.body, parse_constant=reject_constant) if answer.body else None
    except (ValueError, RecursionError):  # not JSON, NaN, or nested too deeply to parse
        return answer.status, None


@dataclass
class _Runner:
    pid: int
    port: int
    kind: str
    ref: str
    total_slots: Optional[int] = None  # from /props
    slots_endpoint: bool = True


class RunnerSource:
    """Finds model runners in /proc and samples each one (in parallel, one request in flight per runner)."""

    def __init__(self, timeout: float = 1.0, proc: str = "/proc",
                 read_cmdline: Callable[[int], Optional[list[str]]] = runners.read_cmdline):
        self.timeout = timeout
        self.proc = proc
        self.read_cmdline = read_cmdline
        # (pid, start) -> runner, or None for any other process; `start` tells a reused PID from its first owner
        self._known: dict[tuple[int, int], Optional[_Runner]] = {}
        self._busy: dict[int, threading.Thread] = {}

    def sample(self, loaded: Iterable[LoadedModel], installed: Iterable[InstalledModel]) -> RunnersState:
        loaded = list(loaded)
        owner = runners.owners(loaded, installed)
        found = self._scan()
        jobs: list[tuple[str, _Runner]] = []
        for runner in found:
            model = runners.owner_of(runner.ref, owner)
            if model is not None and runner.kind != UNSUPPORTED:
                jobs.append((model, runner))
        deadline = time.monotonic() + self.timeout
        results: dict[int, RunnerSample] = {}
        threads = []
        for model, runner in jobs:
            previous = self._busy.get(runner.pid)
            if previous is not None and previous.is_alive():
                results[runner.pid] = RunnerSample(model, runner.pid, runner.port, runner.kind, error="timeout",
                                                   message="the previous request to this runner has not returned")
                continue
            thread = threading.Thread(target=self._sample_one, args=(model, runner, results),
                                      name=f"runner-{runner.port}", daemon=True)
            self._busy[runner.pid] = thread
            thread.start()
            threads.append((model, runner, thread))
        for model, runner, thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                results[runner.pid] = RunnerSample(model, runner.pid, runner.port, runner.kind, error="timeout",
                                                   message=f"no answer within {self.timeout:g}s")
        samples = tuple(sorted((results[r.pid] for _, r in jobs if r.pid in results), key=lambda s: s.model))
        answered = {s.model for s in samples if s.error is None and s.kind == LLAMA_SERVER and s.busy is not None}
        complete = bool(loaded) and all(m.name in answered for m in loaded)
        return RunnersState(samples, complete, bool(found))

    # --- internals ---

    def _scan(self) -> list[_Runner]:
        """Model runners with a port among the visible processes; argv is read once per process."""
        seen = {(pid, start) for pid in runners.list_processes(self.proc)
                for start in [_start_time(self.proc, pid)] if start is not None}
        for key in list(self._known):
            if key not in seen:
                del self._known[key]
                self._busy.pop(key[0], None)
        for key in seen - self._known.keys():
            pid = key[0]
            argv = self.read_cmdline(pid)
            ref = runners.model_ref(argv) if argv else ""
            port = runners.runner_port(argv) if argv else None
            if not ref or port is None:
                self._known[key] = None
                continue
            name = os.path.basename(argv[0])
            kind = LLAMA_SERVER if name == "llama-server" else OLD_RUNNER if name == "ollama_llama_server" \
                else UNSUPPORTED
            if kind == OLD_RUNNER and "runner" in argv[1:]:
                kind = UNSUPPORTED  # v0.5.x Go runner under the old binary name: /health has no slots
            self._known[key] = _Runner(pid, port, kind, ref)
        return [r for r in self._known.values() if r is not None]

    def _sample_one(self, model: str, runner: _Runner, results: dict) -> None:
        try:
            if runner.kind == LLAMA_SERVER:
                sample = self._llama_server(model, runner)
            else:
                sample = self._old_runner(model, runner)
        except RunnerError as exc:
            sample = RunnerSample(model, runner.pid, runner.port, runner.kind, error=exc.reason, message=str(exc))
        if sample is not None:
            results[runner.pid] = sample

    def _llama_server(self, model: str, runner: _Runner) -> RunnerSample:
        if runner.total_slots is None:
            status, props = get_json(runner.port, "/props", HOLD_SECONDS)
            _check(status, "/props", runner.port)
            if not isinstance(props, dict):
                raise RunnerError("invalid_response", f"/props on port {runner.port}: not a JSON object")
            total = props.get("total_slots")
            runner.total_slots = total if isinstance(total, int) and not isinstance(total, bool) else 0
            runner.slots_endpoint = props.get("endpoint_slots") is not False
        base = RunnerSample(model, runner.pid, runner.port, runner.kind, slots=runner.total_slots or None)
        if not runner.slots_endpoint:  # the operator set LLAMA_ARG_ENDPOINT_SLOTS=0: capacity only
            return base
        status, body = get_json(runner.port, "/slots", HOLD_SECONDS)
        if status in (404, 501):  # /slots turned off
            runner.slots_endpoint = False
            return base
        _check(status, "/slots", runner.port)
        if not isinstance(body, list):
            raise RunnerError("invalid_response", f"/slots on port {runner.port}: not a JSON array")
        slots = tuple(s for s in (parse_slot(item) for item in body) if s is not None)
        return RunnerSample(model, runner.pid, runner.port, runner.kind, slots=len(slots),
                            busy=sum(1 for s in slots if s.busy), slot_states=slots)

    def _old_runner(self, model: str, runner: _Runner) -> Optional[RunnerSample]:
        status, body = get_json(runner.port, "/health", HOLD_SECONDS)
        if status == 503:  # still loading: nothing to say yet
            return None
        _check(status, "/health", runner.port)
        if not isinstance(body, dict) or not _ints(body, "slots_idle", "slots_processing"):
            runner.kind = UNSUPPORTED  # v0.4.0-v0.5.1 Go runner: load state only; never asked again
            return None
        idle, processing = body["slots_idle"], body["slots_processing"]
        return RunnerSample(model, runner.pid, runner.port, runner.kind, slots=idle + processing, busy=processing)


def _start_time(proc: str, pid: int) -> Optional[int]:
    """When the process started (clock ticks since boot, /proc/<pid>/stat field 22): a reused PID differs."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def parse_slot(item: Any) -> Optional[Slot]:
    """One /slots entry; `next_token` is an array of one object in 2026 builds, an object before."""
    if not isinstance(item, dict) or not _ints(item, "id"):
        return None
    busy = item.get("is_processing") is True
    token = item.get("next_token")
    if isinstance(token, list):
        token = token[0] if token else None
    decoded = token.get("n_decoded") if isinstance(token, dict) else None
    used: Optional[int] = 0
    if busy:
        if _ints(item, "n_past"):
            used = item["n_past"]
        elif _ints(item, "n_prompt_tokens") and isinstance(decoded, int):
            used = item["n_prompt_tokens"] + decoded
        else:
            used = None
    task = item.get("id_task")
    return Slot(item["id"], item["n_ctx"] if _ints(item, "n_ctx") else None, busy,
                task if isinstance(task, int) and not isinstance(task, bool) and task >= 0 else None, used)


def _ints(body: Mapping, *keys: str) -> bool:
    return all(isinstance(body.get(k), int) and not isinstance(body.get(k), bool) for k in keys)


def _check(status: int, path: str, port: int) -> None:
    if status >= 500:
        raise RunnerError("http_5xx", f"{path} on port {port}: HTTP {status}")
    if status >= 400:
        raise RunnerError("http_4xx", f"{path} on port {port}: HTTP {status}")

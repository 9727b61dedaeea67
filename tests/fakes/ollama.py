"""A fake Ollama server for tests: real HTTP on loopback, Ollama's wire format, state set at runtime.

The exporter has to be tested against Ollama's real response shapes and scheduler quirks (old
versions included) without a GPU or an Ollama binary. This module emulates what an exporter
touches, as read from Ollama's Go source and checked against the captured bodies in
tests/fixtures/ollama/:

* gin routing: unknown path -> text ``404 page not found``, wrong method -> text ``405 method not
  allowed``; no ``/metrics`` or ``/api/stats`` (Ollama has none).
* ``/``, ``/api/version``, ``/api/tags``, ``/api/ps``, ``/api/show``: Go struct key order, Go
  timestamps (server-local offset, RFC 3339 nanoseconds) and Go's HTML-escaping JSON encoder.
* ``/api/generate``, ``/api/chat``, ``/api/embed`` through a scheduler that behaves like the
  version ``/api/version`` reports (see `Behaviour`; `PROFILES` names one version per range):
  loads (absent from ps until loaded, one at a time), needsReload on the stored load-time options,
  keep_alive (kept when omitted on v0.2.0+, reset on v0.1.48 and older, OLLAMA_KEEP_ALIVE on every
  load and reload), the idle timer restarted only **after the response has ended** (as
  processCompleted does), a FIFO slot queue per runner (one slot: a request waits for the one in
  flight), eviction and ``ollama stop`` at any moment, load/unload by empty prompt, NDJSON streams
  whose final line alone carries the metrics (ns).
* Every load, reload, unload and keep_alive change is an `Event` naming its cause and the causing
  request's ``X-Forwarded-For``, so tests can count what probes did.
* Faults (delay, hang, status, garbage, reset, truncate; busy, oom, context_length, stream_error,
  truncate_stream, not_found, final_fields, raw_final) and a listening socket that can be closed and
  re-opened on one port.
* ``access_log``: an optional callback told about every answered request, as gin's logger sees it
  (tests/fakes/ollama_log.py GinAccessLog writes gin's access line from it).

Not emulated: the Host-header check, CORS preflights, trailing-slash redirects, and the other
known routes (pull, push, delete, /v1/...), which answer 501 JSON so their 404/405 stay gin-like;
per-slot prompt caches (a probe's cache eviction is documented, not measured); GPU memory (only
`max_loaded_models` evicts); the MLX runner; vision models' minimum context.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import socket
import socketserver
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

FOREVER_NS = 2**63 - 1  # Go's MaxInt64 duration: keep_alive < 0 ("forever")
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
OOM_MESSAGE = "llama runner process has terminated: cudaMalloc failed: out of memory"
STREAM_ERROR_MESSAGE = ("model runner has unexpectedly stopped, this may be due to resource limitations "
                        "or an internal error, check ollama server logs for details")
JSON_CT = "application/json; charset=utf-8"
NDJSON_CT = "application/x-ndjson"
TEXT_CT = "text/plain; charset=utf-8"

_ROUTE_TABLE = """GET HEAD: / /api/version /api/tags
GET: /api/status /api/ps /api/experimental/model-recommendations /v1/models
POST: /api/show /api/generate /api/chat /api/embed /api/embeddings /api/pull /api/push /api/create /api/copy
POST: /api/me /api/signout /api/experimental/web_search /api/experimental/web_fetch /v1/chat/completions
POST: /v1/completions /v1/embeddings /v1/responses /v1/audio/transcriptions /v1/messages
DELETE: /api/delete"""
ROUTES = {path: tuple(line.split(":")[0].split()) for line in _ROUTE_TABLE.splitlines()
          for path in line.split(": ")[1].split()}
PARAM_ROUTES = {"/api/blobs/": ("POST", "HEAD"), "/api/user/keys/": ("DELETE",), "/v1/models/": ("GET",)}
INFERENCE_PATHS = ("/api/generate", "/api/chat", "/api/embed")
GENERATION_FAULTS = {"busy", "oom", "context_length", "stream_error", "truncate_stream", "not_found", "final_fields",
                     "raw_final"}
GENERIC_FAULTS = {"delay", "hang", "status", "garbage", "reset", "truncate"}
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
              "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
              "Q5_K_M": 17, "Q6_K": 18, "BF16": 32, "MXFP4": 38}
WORDS = ["Hello", ",", " world", "!", " The", " sky", " is", " blue", " because", " of", " Rayleigh",
         " scattering", ".", " Light", " bends", " gently"]
_DEFAULT: Any = object()


# ----------------------------------------------------------------------------- Go-isms
def go_json(obj: Any) -> bytes:
    """Compact JSON escaped like Go's encoding/json (``<``, ``>``, ``&``, U+2028/9 escaped)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode()


def go_time(ns: int, offset_minutes: int = 0) -> str:
    """Format epoch nanoseconds like Go's RFC3339Nano (fraction's trailing zeros trimmed)."""
    secs, frac = divmod(ns, 10**9)
    t = _dt.datetime.fromtimestamp(secs, _dt.timezone(_dt.timedelta(minutes=offset_minutes)))
    fraction = f".{frac:09d}".rstrip("0") if frac else ""
    return t.isoformat()[:19] + fraction + ("Z" if offset_minutes == 0 else t.isoformat()[19:])


def now_ns(plus: int = 0) -> int:
    """Wall-clock ns (+ ``plus``) with a non-zero last digit, so Go's format shows all 9 fraction digits."""
    ns = time.time_ns() + plus
    return ns if ns % 10 else ns + 1


def normalize_name(name: str) -> str:
    """``llama3`` -> ``llama3:latest``; a tag is a ``:`` after the last ``/``."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


_DUR_UNITS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9,
              "m": 60 * 10**9, "h": 3600 * 10**9}
_DUR_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(s: str) -> int:
    """Go's time.ParseDuration -> ns. Raises _HTTPError(400) with Go's message on failure."""
    sign, body = 1, s
    if body[:1] in ("+", "-"):
        sign, body = (-1 if body[0] == "-" else 1), body[1:]
    if body == "0":
        return 0
    if re.fullmatch(r"(?:\d+\.?\d*|\.\d+)(?:(?:ns|us|µs|μs|ms|s|m|h)(?:\d+\.?\d*|\.\d+))*", body):
        raise _HTTPError(400, f'time: missing unit in duration "{s}"')
    if not body or not re.fullmatch(f"(?:{_DUR_PART.pattern})+", body):
        raise _HTTPError(400, f'time: invalid duration "{s}"')
    return sign * int(sum(float(v) * _DUR_UNITS[u] for v, u in _DUR_PART.findall(body)))


def parse_keep_alive(value: Any) -> int | None:
    """api.Duration.UnmarshalJSON: None = unspecified; number = seconds; negative = forever."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        go_type = {bool: "bool", dict: "map[string]interface {}", list: "[]interface {}"}.get(type(value), "unknown")
        raise _HTTPError(400, f"Unsupported type: '{go_type}'")
    ns = parse_go_duration(value) if isinstance(value, str) else int(value * 10**9)
    return FOREVER_NS if ns < 0 else ns


# ----------------------------------------------------------------------------- versions
NEWEST = (0, 33, 0)
# One version per range in which what a probe can do to a runner differs (see Behaviour).
PROFILES = {
    "<=0.1.48": "0.1.48",       # keep_alive reset by every request without one; no context_length in ps
    "0.2-0.9": "0.9.6",         # keep_alive kept; still no context_length; 4 slots (auto parallel)
    "0.10-0.11.4": "0.11.4",    # context_length = the stored num_ctx; every request through the scheduler queue
    "0.11.5-0.15.4": "0.15.4",  # resident runners skip the scheduler queue
    "0.15.5-0.24": "0.24.0",    # ps shows the clamped num_ctx, needsReload compares the unclamped one
    ">=0.30": "0.32.15",        # clamp and auto == auto in needsReload; embeddings compare num_batch; contextShift
}
RUNNER_OPTIONS = ("num_gpu", "main_gpu", "use_mmap", "num_thread", "draft_num_predict")  # besides num_ctx/num_batch


def version_tuple(text: str) -> tuple[int, int, int]:
    """``0.24.0``, ``v0.33.0-rc2``, ``0.32.15-12-gabc1234`` -> (major, minor, patch); source builds
    (``0.0.0``) and anything unreadable behave like the newest version."""
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", text or "")
    v = (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (0, 0, 0)
    return NEWEST if v == (0, 0, 0) else v


@dataclass(frozen=True)
class Behaviour:
    """What Ollama's scheduler does at one version, as far as an inference request's side effects go.

    Read from server/sched.go, server/routes.go, llm/server.go and envconfig at the tags named."""

    version: tuple[int, int, int]

    @property
    def keep_alive_reset(self) -> bool:
        """<= v0.1.48: a request without keep_alive sets the runner to OLLAMA_KEEP_ALIVE (commit 955f2a4e0)."""
        return self.version < (0, 2, 0)

    @property
    def unload_loads_first(self) -> bool:
        """< v0.3.11: keep_alive 0 with an empty prompt loads the model, then unloads it."""
        return self.version < (0, 3, 11)

    @property
    def pending_queue(self) -> bool:
        """<= v0.11.4: every request goes through pendingReqCh, handled one at a time (so a request for a
        resident model waits behind another model's load); since v0.11.5 only loads and reloads do."""
        return self.version < (0, 11, 5)

    @property
    def ps_context(self) -> str:
        """What /api/ps `context_length` shows: none (< v0.10), the configured num_ctx (< v0.15.5), or the
        num_ctx clamped to the training context (v0.15.5+, commit d11fbd2c6)."""
        return "none" if self.version < (0, 10, 0) else "configured" if self.version < (0, 15, 5) else "clamped"

    @property
    def v030_rules(self) -> bool:
        """v0.30+ (commit 9db4bdbad): the runner stores the clamped num_ctx; needsReload clamps the request,
        treats automatic == automatic, compares num_batch unless both automatic (embeddings: min(2048,
        num_ctx), never automatic) and the contextShift setting."""
        return self.version >= (0, 30, 0)

    @property
    def num_parallel(self) -> int:
        """OLLAMA_NUM_PARALLEL's default: auto (4 slots when they fit) before v0.10, 1 since."""
        return 4 if self.version < (0, 10, 0) else 1

    @property
    def size_vram(self) -> bool:
        return self.version >= (0, 1, 42)

    def default_num_ctx(self, vram_gib: float) -> int:
        """num_ctx when neither the request, the Modelfile nor OLLAMA_CONTEXT_LENGTH sets one: 2048, 4096 from
        v0.6.7, and from v0.15.5 a tier of the total VRAM (262144 at >= 47 GiB, 32768 at >= 23 GiB, else 4096)."""
        if self.version < (0, 6, 7):
            return 2048
        if self.version < (0, 15, 5):
            return 4096
        return 262144 if vram_gib >= 47 else 32768 if vram_gib >= 23 else 4096


# ----------------------------------------------------------------------------- state records
class _HTTPError(Exception):
    """Answer ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status, self.message = status, message


class _Abort(Exception):
    """Drop the connection without (finishing) a response: "close" sends FIN, "reset" sends RST."""


@dataclass
class RecordedRequest:
    method: str
    path: str
    json: Any
    headers: dict[str, str]
    time: float
    query: str = ""


@dataclass
class Timing:
    ttft: float = 0.2        # warm model: request arrival -> first token chunk (prompt eval)
    token_gap: float = 0.02  # between token chunks
    tokens: int = 16         # tokens generated unless options.num_predict is smaller
    load_time: float = 1.0   # added before ttft when a (re)load is needed


@dataclass
class _Fault:
    kind: str
    params: dict[str, Any]
    times: int | None = None  # None = until cleared
    cleared: bool = False     # set by clear_faults/set_fault; releases requests hung by this fault


@dataclass
class _Model:
    name: str
    family: str
    families: list[str] | None
    parameter_size: str
    quantization: str
    format: str
    size: int
    context_length: int
    embedding_length: int
    parameter_count: int
    capabilities: list[str] | None
    digest: str
    blob_digest: str
    tags_shape: str
    modified_ns: int
    show_raw: bytes | None = None  # a real /api/show body served verbatim
    num_ctx: int = 0  # a Modelfile `PARAMETER num_ctx` (0: none)
    kv_bytes_per_token: int = 0  # KV cache per token and slot, added to a runner's size (0: size = file size)

    @property
    def embedding_only(self) -> bool:
        return self.capabilities is not None and "embedding" in self.capabilities \
            and "completion" not in self.capabilities

    def details(self, extra: bool = False, parent: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"parent_model": ""} if parent else {}
        d.update(format=self.format, family=self.family, families=self.families,
                 parameter_size=self.parameter_size, quantization_level=self.quantization)
        if extra:  # v0.30+ /api/tags only, both omitempty
            if self.context_length:
                d["context_length"] = self.context_length
            if self.embedding_length:
                d["embedding_length"] = self.embedding_length
        return d


@dataclass(frozen=True)
class _Opts:
    """The load-time options needsReload compares: api.Runner's fields plus contextShift."""

    num_ctx: int
    num_ctx_auto: bool  # no num_ctx from the request, the Modelfile or OLLAMA_CONTEXT_LENGTH
    num_batch: int
    num_batch_auto: bool
    shift: bool
    other: tuple[tuple[str, Any], ...] = ()  # RUNNER_OPTIONS the request set (num_gpu only when >= 0)


class _Fifo:
    """A counting semaphore that serves waiters in arrival order (Go's semaphore.Weighted, weight 1).

    Runners use one with num_parallel slots; the scheduler uses one with a single slot."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._busy = 0
        self._queue: deque[object] = deque()
        self._cond = threading.Condition()

    def acquire(self, stop: threading.Event) -> None:
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or self._busy >= self.slots:
                if stop.is_set():
                    self._queue.remove(ticket)
                    self._cond.notify_all()
                    raise _Abort("close")
                self._cond.wait(0.05)
            self._queue.popleft()
            self._busy += 1
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()


@dataclass
class _Runner:
    name: str
    size: int
    size_vram: int
    context_length: int  # what /api/ps shows
    keep_alive_ns: int  # the runner's sessionDuration; 0 while it is being stopped or evicted
    expires_ns: int | None  # None while the first request after a load runs (ps: now + keep_alive)
    refs: int = 0
    shape: str = "new"
    opts: _Opts | None = None
    slots: _Fifo = field(default_factory=lambda: _Fifo(1))
    ending: str = ""  # "stopped" or "evicted" once that has begun: the unload's cause


INF = float("inf")


@dataclass(frozen=True)
class Event:
    """One scheduler event, for tests to count: who caused which load, reload, unload or keep_alive change."""

    time: float  # unix seconds
    kind: str  # "load" (cold), "reload", "unload", "keep_alive"
    model: str
    cause: str  # reload: what needsReload found different; unload: expired, stopped, evicted, oom, test;
    #             keep_alive: request (the request's own keep_alive) or reset (<= v0.1.48 default)
    client: str  # X-Forwarded-For of the causing request ("" without one; "test" for direct calls)
    keep_alive: float | None = None  # seconds after the event (INF = forever); None for an unload
    previous: float | None = None  # seconds before it (reload, keep_alive, unload)

    @property
    def unpinned(self) -> bool:
        """A forever (keep_alive < 0) runner became a finite one, in place or by a reload."""
        return self.kind in ("reload", "keep_alive") and self.previous == INF and self.keep_alive != INF


def _seconds(ns: int) -> float:
    return INF if ns >= FOREVER_NS else ns / 1e9


# ----------------------------------------------------------------------------- HTTP plumbing
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], fake: "FakeOllama") -> None:
        self.fake = fake
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:  # skip HTTPServer's getfqdn(), which can stall on DNS
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self.conns_lock:
            conns = list(self.conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:  # quiet on broken pipes
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    truncate_by = 0  # > 0: the "truncate" fault; send_body promises this many bytes too many, then closes

    def setup(self) -> None:
        super().setup()
        # Go's net/http sets TCP_NODELAY on every connection; without it, Nagle and the client's delayed
        # ACK would hold each streamed line back ~40 ms and distort every timing measured against us.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def send_response(self, code: int, message: Any = None) -> None:
        self.status_sent = code
        super().send_response(code, message)

    def _dispatch(self) -> None:
        self.status_sent, started = 0, time.monotonic()
        try:
            self._dispatch_inner()
        finally:
            log = self.server.fake.access_log
            if log is not None and self.status_sent:
                log(self.command, self.path, self.status_sent, time.monotonic() - started, self.headers,
                    self.client_address[0])

    def _dispatch_inner(self) -> None:
        try:
            self.server.fake._handle(self)
        except _Abort as abort:
            self.close_connection = True
            try:
                if abort.args == ("reset",):
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                else:
                    self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except OSError:  # the client went away, or stop() shut the socket
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    # -- response helpers
    def send_body(self, status: int, ctype: str, body: bytes, length: int | None = None) -> None:
        if self.truncate_by:
            body, length = body[: len(body) // 2], len(body) // 2 + self.truncate_by
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if length is not None and length != len(body):
            raise _Abort("close")

    def send_json(self, obj: Any, status: int = 200) -> None:
        self.send_body(status, JSON_CT, go_json(obj))

    def send_error_json(self, status: int, message: str) -> None:
        self.send_json({"error": message}, status)

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", NDJSON_CT)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_line(self, obj: Any) -> None:
        data = go_json(obj) + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _gin_text(code: int) -> str:
    """A plain-text body in gin's style, e.g. ``404 page not found``."""
    special = {404: "404 page not found", 405: "405 method not allowed"}
    phrase = HTTPStatus(code).phrase.lower() if code in iter(HTTPStatus) else ""
    return special.get(code, f"{code} {phrase}".strip())


# ----------------------------------------------------------------------------- the fake
class FakeOllama:
    """A controllable Ollama server. See the module docstring; use as a context manager."""

    def __init__(self, version: str = "0.32.15", host: str = "127.0.0.1", port: int = 0,
                 tz_offset_minutes: int = 330) -> None:
        self.version = version  # /api/version, and which version's scheduler this fake behaves like
        self.host = host
        self._port = port
        self.tz_offset_minutes = tz_offset_minutes
        # the server's environment and machine
        self.default_keep_alive: float = 300.0  # seconds (OLLAMA_KEEP_ALIVE); negative = forever
        self.env_context_length: int = 0  # OLLAMA_CONTEXT_LENGTH (0: unset)
        self.num_parallel: int = 0  # OLLAMA_NUM_PARALLEL (0: the version's default)
        self.max_loaded_models: int = 0  # OLLAMA_MAX_LOADED_MODELS (0: no limit in this fake)
        self.vram_gib: float = 16.0  # total VRAM, which picks the default num_ctx from v0.15.5
        # how long after a response has ended processCompleted restarts the idle timer (Go: microseconds)
        self.expiry_lag: float = 0.0
        self.loads: Counter[str] = Counter()    # scheduler loads, reloads included
        self.reloads: Counter[str] = Counter()  # reloads forced by needsReload
        self._lock = threading.Lock()
        self._sched = _Fifo(1)  # the scheduler's pending queue: one load (or, <= v0.11.4, one request) at a time
        self._models: dict[str, _Model] = {}
        self._runners: dict[str, _Runner] = {}
        self._loading: set[str] = set()
        self._pending_releases = 0
        self._events: list[Event] = []
        self._faults: dict[tuple[str, str | None], _Fault] = {}
        self._timings: dict[str | None, Timing] = {None: Timing()}
        self._requests: list[RecordedRequest] = []
        self._stop = threading.Event()
        self._unhang = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # called after each answered request: (method, path with query, status, seconds, headers, peer address)
        self.access_log: Callable[..., None] | None = None

    @property
    def behaviour(self) -> Behaviour:
        return Behaviour(version_tuple(self.version))

    # -- lifecycle
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def start(self) -> "FakeOllama":
        self._stop.clear()
        self._serve()
        return self

    def _serve(self) -> None:
        server = _Server((self.host, self._port), self)
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                                        name=f"fake-ollama-{self._port}", daemon=True)
        self._thread.start()

    def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None

    def stop(self) -> None:
        self._stop.set()
        self._unhang.set()
        self._close_listener()

    def refuse_connections(self) -> None:
        """Close the listening socket (and open connections): new connects get ECONNREFUSED."""
        self._close_listener()

    def accept_connections(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            self._serve()

    def __enter__(self) -> "FakeOllama":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- installed models
    def add_model(self, name: str, *, family: str = "llama", families: list[str] | None = _DEFAULT,
                  parameter_size: str = "8.0B", quantization: str = "Q4_K_M", format: str = "gguf",  # noqa: A002
                  size: int = 4_920_000_000, context_length: int = 131072, embedding_length: int = 4096,
                  parameter_count: int = 8_030_261_248, capabilities: list[str] | None = _DEFAULT,
                  digest: str | None = None, blob_digest: str | None = None, tags_shape: str = "v0.30",
                  modified_at: float | None = None, num_ctx: int = 0, kv_bytes_per_token: int = 0) -> dict[str, Any]:
        """Install a model and return its /api/tags row.

        families defaults to [family] (None serialises as null); capabilities defaults to
        ["completion"] (None: /api/show has no ``capabilities`` key, like servers before v0.6.4).
        digest/blob_digest: 64 hex, derived from the name when None. tags_shape: "v0.30", "old"
        or "pre_model_key". modified_at: epoch seconds (default now). num_ctx: a Modelfile PARAMETER.
        kv_bytes_per_token: KV cache per token and slot, so a runner's size follows its num_ctx."""
        if tags_shape not in ("v0.30", "old", "pre_model_key"):
            raise ValueError(f"unknown tags_shape {tags_shape!r}")
        name = normalize_name(name)
        model = _Model(
            name=name, family=family, families=[family] if families is _DEFAULT else families,
            parameter_size=parameter_size, quantization=quantization, format=format, size=size,
            context_length=context_length, embedding_length=embedding_length, parameter_count=parameter_count,
            capabilities=["completion"] if capabilities is _DEFAULT else capabilities,
            digest=digest or hashlib.sha256(f"manifest:{name}".encode()).hexdigest(),
            blob_digest=blob_digest or hashlib.sha256(f"blob:{name}".encode()).hexdigest(),
            tags_shape=tags_shape, modified_ns=int(modified_at * 10**9) if modified_at is not None else now_ns(),
            num_ctx=num_ctx, kv_bytes_per_token=kv_bytes_per_token)
        with self._lock:
            self._models[name] = model
            return self._tags_row(model)

    def add_model_from_fixture(self, show_fixture_path: str | Path, name: str, **overrides: Any) -> dict[str, Any]:
        """Install ``name`` and serve the captured /api/show body verbatim for it."""
        raw = Path(show_fixture_path).read_bytes()
        body = json.loads(raw)
        d, info = body.get("details", {}), body.get("model_info", {})
        arch = info.get("general.architecture", d.get("family", "llama"))
        blob = re.search(r"FROM \S*/blobs/sha256-([0-9a-f]{64})", body.get("modelfile", ""))
        kwargs: dict[str, Any] = dict(
            family=d.get("family", arch), families=d.get("families"), parameter_size=d.get("parameter_size", ""),
            quantization=d.get("quantization_level", ""), format=d.get("format", "gguf"),
            context_length=info.get(f"{arch}.context_length", 0), embedding_length=info.get(f"{arch}.embedding_length", 0),
            parameter_count=info.get("general.parameter_count", 0), capabilities=body.get("capabilities"),
            blob_digest=blob.group(1) if blob else None)
        kwargs.update(overrides)
        row = self.add_model(name, **kwargs)
        with self._lock:
            self._models[normalize_name(name)].show_raw = raw.rstrip(b"\n")
        return row

    def remove_model(self, name: str) -> None:
        name = normalize_name(name)
        with self._lock:
            self._models.pop(name, None)
            if self._runners.pop(name, None) is not None:
                self._event("unload", name, "test", "test")

    # -- loaded models
    def load(self, name: str, *, size: int | None = None, size_vram: int | None = None, context_length: int = 4096,
             keep_alive: float = 300.0, ps_shape: str | None = None, auto_context: bool = False,
             options: dict[str, Any] | None = None, shift: bool | None = None) -> None:
        """Put ``name`` in /api/ps at once, idle, as if a request had loaded it (no event, not in ``loads``).

        The runner is loaded with ``options.num_ctx`` = context_length, or with no num_ctx at all when
        ``auto_context`` (the server's default applies); other load-time ``options`` and ``shift`` as a
        client would send them. keep_alive: seconds, negative = forever. ps_shape: "new" (v0.10+), "no_ctx"
        (v0.1.42-v0.9: no context_length), "old" (v0.1.38: no size_vram either); default: the version's."""
        name = normalize_name(name)
        if ps_shape not in (None, "new", "no_ctx", "old"):
            raise ValueError(f"unknown ps_shape {ps_shape!r}")
        opts = dict(options or {})
        if not auto_context:
            opts.setdefault("num_ctx", context_length)
        with self._lock:
            model = self._models.get(name)
            if model is None:
                raise ValueError(f"model {name!r} is not installed")
            ka = FOREVER_NS if keep_alive < 0 else int(keep_alive * 10**9)
            r = self._new_runner(model, self._request_opts(model, opts, model.embedding_only, shift), ka)
            r.expires_ns = now_ns(ka)
            if size is not None:
                r.size = r.size_vram = size
            if size_vram is not None:
                r.size_vram = size_vram
            r.shape = ps_shape or r.shape
            self._runners[name] = r

    def unload(self, name: str) -> None:
        """Take ``name`` out of /api/ps at once, whatever it is doing."""
        with self._lock:
            if self._runners.pop(normalize_name(name), None) is not None:
                self._event("unload", normalize_name(name), "test", "test")

    def evict(self, name: str) -> None:
        """Evict ``name`` as the scheduler does for memory: its duration becomes 0 (ps keeps showing the old
        expires_at) and it unloads as soon as no request is using it."""
        name = normalize_name(name)
        with self._lock:
            r = self._runners.get(name)
            if r is not None:
                r.keep_alive_ns, r.ending = 0, "evicted"
                if r.refs == 0:
                    del self._runners[name]
                    self._event("unload", name, "evicted", "test")

    def loaded(self) -> list[str]:
        with self._lock:
            self._reap()
            return list(self._runners)

    def runner_keep_alive(self, name: str) -> float | None:
        """The runner's duration in seconds (INF: forever), None if not loaded."""
        with self._lock:
            self._reap()
            r = self._runners.get(normalize_name(name))
            return None if r is None else _seconds(r.keep_alive_ns)

    # -- timing and faults
    def set_timing(self, model: str | None = None, ttft: float = 0.2, token_gap: float = 0.02, tokens: int = 16,
                   load_time: float = 1.0) -> None:
        with self._lock:
            self._timings[normalize_name(model) if model else None] = Timing(ttft, token_gap, tokens, load_time)

    def set_fault(self, path: str, kind: str, *, model: str | None = None, times: int | None = None,
                  **params: Any) -> None:
        """Install a fault for ``path`` ("*" = all), optionally only for one model and ``times`` times."""
        if kind not in GENERIC_FAULTS | GENERATION_FAULTS:
            raise ValueError(f"unknown fault kind {kind!r}")
        key = (path, normalize_name(model) if model else None)
        with self._lock:
            old = self._faults.get(key)
            if old is not None:
                old.cleared = True
            self._faults[key] = _Fault(kind, params, times)
            self._unhang.set()
            self._unhang = threading.Event()

    def clear_faults(self, path: str | None = None) -> None:
        with self._lock:
            for key in [k for k in self._faults if path is None or k[0] == path]:
                self._faults.pop(key).cleared = True
            self._unhang.set()  # wake hung handlers; they re-check their fault
            self._unhang = threading.Event()

    # -- observation
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def count(self, path: str, method: str | None = None) -> int:
        return sum(1 for r in self.requests if r.path == path and (method is None or r.method == method))

    def reset_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def events(self) -> list[Event]:
        with self._lock:
            self._reap()
            return list(self._events)

    def caused_by(self, client: str, kind: str | None = None) -> list[Event]:
        """Events caused by requests with this X-Forwarded-For (of one kind)."""
        return [e for e in self.events if e.client == client and (kind is None or e.kind == kind)]

    def wait_settled(self, timeout: float = 2.0) -> None:
        """Wait until no request holds a runner and every idle timer has been restarted (Ollama does that
        just after a response ends, so a client that reads /api/ps at once may still see the old value)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending_releases and not self._loading and all(r.refs == 0 for r in self._runners.values()):
                    return
            time.sleep(0.005)
        raise TimeoutError("the fake Ollama still has requests in flight")

    # ------------------------------------------------------------------------- internals (lock held)
    def _reap(self) -> None:
        """The scheduler's idle timer, emulated lazily: expired idle runners disappear (logged at their expiry)."""
        now = now_ns()
        for name, r in list(self._runners.items()):
            if r.refs == 0 and r.expires_ns is not None and r.expires_ns <= now:
                del self._runners[name]
                self._event("unload", name, r.ending or "expired", "", at=r.expires_ns / 1e9)

    def _event(self, kind: str, model: str, cause: str, client: str, keep_alive: int | None = None,
               previous: int | None = None, at: float | None = None) -> None:
        self._events.append(Event(time.time() if at is None else at, kind, model, cause, client,
                                  None if keep_alive is None else _seconds(keep_alive),
                                  None if previous is None else _seconds(previous)))

    def _expiry(self, r: _Runner) -> int:
        return now_ns(r.keep_alive_ns) if r.expires_ns is None else r.expires_ns

    def _timing_for(self, name: str) -> Timing:
        return self._timings.get(name) or self._timings[None]

    def _fault_for(self, path: str, model: str | None) -> _Fault | None:
        keys = ([(path, model), ("*", model)] if model else []) + [(path, None), ("*", None)]
        for key in keys:
            fault = self._faults.get(key)
            if fault is not None:
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        del self._faults[key]
                return fault
        return None

    def _tags_row(self, m: _Model) -> dict[str, Any]:
        modified = go_time(m.modified_ns, self.tz_offset_minutes)
        if m.tags_shape == "pre_model_key":
            return {"name": m.name, "modified_at": modified, "size": m.size, "digest": m.digest,
                    "details": m.details(parent=False)}
        row = {"name": m.name, "model": m.name, "modified_at": modified, "size": m.size, "digest": m.digest,
               "details": m.details(extra=m.tags_shape == "v0.30")}
        if m.tags_shape == "v0.30" and m.capabilities:
            row["capabilities"] = m.capabilities
        return row

    def _ps_row(self, r: _Runner) -> dict[str, Any]:
        m = self._models[r.name]
        row: dict[str, Any] = {"name": r.name, "model": r.name, "size": r.size, "digest": m.digest,
                               "details": m.details(), "expires_at": go_time(self._expiry(r), self.tz_offset_minutes)}
        if r.shape in ("new", "no_ctx"):
            row["size_vram"] = r.size_vram
        if r.shape == "new":
            row["context_length"] = r.context_length
        return row

    def _show_body(self, m: _Model) -> dict[str, Any]:
        fam = m.family
        info = {"general.architecture": fam, "general.file_type": FILE_TYPES.get(m.quantization.upper(), 15),
                "general.parameter_count": m.parameter_count, "general.quantization_version": 2,
                f"{fam}.block_count": 32, f"{fam}.context_length": m.context_length,
                f"{fam}.embedding_length": m.embedding_length, "tokenizer.ggml.merges": None,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.token_type": None, "tokenizer.ggml.tokens": None}
        body: dict[str, Any] = {
            "license": f"Fake license for {m.name}",
            "modelfile": (f'# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, '
                          f"replace FROM with:\n# FROM {m.name}\n\n"
                          f"FROM /root/.ollama/models/blobs/sha256-{m.blob_digest}\n"
                          f'TEMPLATE """{{{{ .Prompt }}}}"""\nPARAMETER stop <|eot_id|>\n'
                          f'LICENSE """Fake license for {m.name}"""\n'),
            "parameters": f"{'stop':<30} \"<|eot_id|>\"",
            "template": "{{ .Prompt }}",
            "details": m.details(),
            "model_info": dict(sorted(info.items())),  # Go marshals maps with sorted keys
            "tensors": [{"name": "token_embd.weight", "type": "Q4_K", "shape": [m.embedding_length, 128256]},
                        {"name": "blk.0.attn_norm.weight", "type": "F32", "shape": [m.embedding_length]}],
        }
        if m.capabilities is not None:
            body["capabilities"] = m.capabilities
        body["modified_at"] = go_time(m.modified_ns, self.tz_offset_minutes)
        return body

    # ------------------------------------------------------------------------- request handling
    def _wait(self, seconds: float) -> None:
        """Sleep without the lock; a stop() ends it and drops the connection."""
        if seconds > 0 and self._stop.wait(seconds):
            raise _Abort("close")

    def _handle(self, h: _Handler) -> None:
        path, _, query = h.path.partition("?")
        raw = self._read_body(h)
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        model = parsed.get("model") or parsed.get("name") if isinstance(parsed, dict) else None
        with self._lock:
            self._requests.append(RecordedRequest(h.command, path, parsed, dict(h.headers.items()),
                                                  time.monotonic(), query))
            fault = self._fault_for(path, normalize_name(model) if isinstance(model, str) and model else None)
        t0 = time.monotonic_ns()
        if fault is not None and fault.kind in GENERIC_FAULTS:
            if not self._apply_generic_fault(h, fault):
                return
            fault = None
        methods = ROUTES.get(path) or next((m for p, m in PARAM_ROUTES.items() if path.startswith(p)), None)
        if methods is None:
            return h.send_body(404, TEXT_CT, b"404 page not found")
        if h.command not in methods:
            return h.send_body(405, TEXT_CT, b"405 method not allowed")
        if fault is not None and path not in INFERENCE_PATHS and fault.kind in ("busy", "oom", "not_found"):
            shown = normalize_name(model) if isinstance(model, str) and model else ""
            return h.send_error_json(*{"busy": (503, BUSY_MESSAGE), "oom": (500, OOM_MESSAGE),
                                       "not_found": (404, f"model '{shown}' not found")}[fault.kind])
        try:
            self._route(h, path, raw, parsed, fault, t0)
        except _HTTPError as e:
            h.send_error_json(e.status, e.message)

    @staticmethod
    def _read_body(h: _Handler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return h.rfile.read(int(h.headers.get("Content-Length") or 0))
        body = b""
        while size := int(h.rfile.readline().split(b";")[0] or b"0", 16):
            body += h.rfile.read(size + 2)[:-2]
        while h.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return body

    def _apply_generic_fault(self, h: _Handler, fault: _Fault) -> bool:
        """Act out a generic fault; True if the request should then be answered normally."""
        p = fault.params
        if fault.kind == "delay":
            self._wait(float(p.get("seconds", 1.0)))
        elif fault.kind == "hang":
            while not self._stop.is_set():
                with self._lock:
                    if fault.cleared:
                        break
                    event = self._unhang
                event.wait()
            if self._stop.is_set():
                raise _Abort("close")
        elif fault.kind == "truncate":  # the normal answer, cut in half (JSON bodies only)
            h.truncate_by = int(p.get("missing", 100))
        elif fault.kind == "status":
            code, body = int(p.get("code", 500)), p.get("body")
            if body is None:
                h.send_body(code, TEXT_CT, _gin_text(code).encode())
            else:
                h.send_error_json(code, str(body))
            return False
        elif fault.kind == "garbage":
            h.send_body(200, JSON_CT, str(p.get("body", '{"models":[{"name":"trunc')).encode())
            return False
        elif fault.kind == "reset":
            raise _Abort("reset")
        return True

    def _route(self, h: _Handler, path: str, raw: bytes, req: Any, fault: _Fault | None, t0: int) -> None:
        if path == "/":
            return h.send_body(200, TEXT_CT, b"Ollama is running")
        if path == "/api/version":
            return h.send_json({"version": self.version})
        if path == "/api/status":
            return h.send_json({"cloud": {"disabled": False, "source": "none"}})
        if path == "/api/ps":
            with self._lock:
                self._reap()
                rows = sorted(self._runners.values(), key=self._expiry, reverse=True)
                return h.send_json({"models": [self._ps_row(r) for r in rows]})
        if path == "/api/tags":
            with self._lock:
                models = sorted(self._models.values(), key=lambda m: m.modified_ns, reverse=True)
                return h.send_json({"models": [self._tags_row(m) for m in models]})
        if path not in ("/api/show", *INFERENCE_PATHS):
            raise _HTTPError(501, f"fake ollama does not emulate {path}")
        if not raw:
            raise _HTTPError(400, "missing request body")
        if req is None:
            raise _HTTPError(400, f"invalid character {raw.decode(errors='replace')[:1]!r} looking for beginning of value")
        if not isinstance(req, dict):
            raise _HTTPError(400, f"json: cannot unmarshal {type(req).__name__} into Go value")
        if path == "/api/show":
            return self._show(h, req)
        return self._inference(h, path, req, fault, t0)

    def _show(self, h: _Handler, req: dict[str, Any]) -> None:
        given = req.get("model") or req.get("name") or ""
        if not given:
            raise _HTTPError(400, "model is required")
        name = normalize_name(given)
        with self._lock:
            m = self._models.get(name)
            if m is None:
                raise _HTTPError(404, f"model '{name}' not found")
            if m.show_raw is not None:
                return h.send_body(200, JSON_CT, m.show_raw)
            body = self._show_body(m)
        h.send_json(body)

    # -- the scheduler (server/sched.go)
    def _default_keep_alive_ns(self) -> int:
        return FOREVER_NS if self.default_keep_alive < 0 else int(self.default_keep_alive * 10**9)

    def _request_opts(self, model: _Model, options: dict[str, Any], embed: bool, shift: Any) -> _Opts:
        """The load-time options a request resolves to: its own, else the Modelfile's, else the server's."""
        b = self.behaviour
        given = options.get("num_ctx")
        explicit = given if isinstance(given, int) and given > 0 else (model.num_ctx or self.env_context_length)
        num_ctx = max(explicit or b.default_num_ctx(self.vram_gib), 4)
        if isinstance(options.get("num_batch"), int):
            batch, batch_auto = options["num_batch"], False
        elif embed and b.v030_rules:  # llm.WithDefaultEmbeddingNumBatch, from the unclamped num_ctx
            batch, batch_auto = min(2048, num_ctx), False
        else:
            batch, batch_auto = 512, True
        other = tuple(sorted((k, options[k]) for k in RUNNER_OPTIONS if k in options
                             and not (k == "num_gpu" and isinstance(options[k], int) and options[k] < 0)))
        return _Opts(num_ctx, not explicit, batch, batch_auto, shift is not False, other)

    def _needs_reload(self, r: _Runner, want: _Opts, model: _Model) -> str:
        """needsReload: what differs between the runner's stored options and the request's ("" = nothing)."""
        have = r.opts or want
        if self.behaviour.v030_rules:
            ctx = min(want.num_ctx, model.context_length) if model.context_length else want.num_ctx
            if have.num_ctx_auto and want.num_ctx_auto:
                ctx = have.num_ctx
            if ctx != have.num_ctx:
                return f"num_ctx {ctx} != {have.num_ctx}"
            if not (have.num_batch_auto and want.num_batch_auto) and want.num_batch != have.num_batch:
                return f"num_batch {want.num_batch} != {have.num_batch}"
            if want.shift != have.shift:
                return "shift"
        else:  # the stored num_ctx is the configured, unclamped one, compared as it is
            if want.num_ctx != have.num_ctx:
                return f"num_ctx {want.num_ctx} != {have.num_ctx}"
            if want.num_batch != have.num_batch:
                return f"num_batch {want.num_batch} != {have.num_batch}"
        if want.other != have.other:
            return f"options {dict(want.other)} != {dict(have.other)}"
        return ""

    def _new_runner(self, model: _Model, want: _Opts, keep_alive_ns: int) -> _Runner:
        b = self.behaviour
        clamped = min(want.num_ctx, model.context_length) if model.context_length else want.num_ctx
        stored = clamped if b.v030_rules else want.num_ctx
        shown = {"none": 0, "configured": stored, "clamped": clamped}[b.ps_context]
        parallel = 1 if model.embedding_only else (self.num_parallel or b.num_parallel)
        allocated = clamped if b.ps_context == "clamped" else want.num_ctx
        size = model.size + model.kv_bytes_per_token * allocated * parallel
        shape = "new" if b.ps_context != "none" else "no_ctx" if b.size_vram else "old"
        return _Runner(model.name, size, size, shown, keep_alive_ns, None, shape=shape,
                       opts=replace(want, num_ctx=stored), slots=_Fifo(parallel))

    def _use(self, r: _Runner, keep_alive: int | None, client: str) -> None:
        """useLoadedRunner: take a reference (the idle timer stops, ps keeps the old expires_at) and apply the
        request's keep_alive; without one, v0.2.0+ keeps the runner's duration and v0.1.48 resets it."""
        r.refs += 1
        if keep_alive is not None:
            new, cause = keep_alive, "request"
        elif self.behaviour.keep_alive_reset:
            new, cause = self._default_keep_alive_ns(), "reset"
        else:
            return
        if new != r.keep_alive_ns:
            self._event("keep_alive", r.name, cause, client, new, r.keep_alive_ns)
        r.keep_alive_ns = new
        if new and r.ending in ("stopped", "evicted"):
            r.ending = ""  # a keep_alive revives a runner that was being stopped

    def _reusable(self, name: str, model: _Model, want: _Opts) -> _Runner | None:
        self._reap()
        r = self._runners.get(name)
        if r is None or name in self._loading or r.ending == "replaced" or self._needs_reload(r, want, model):
            return None
        return r

    def _acquire(self, name: str, model: _Model, keep_alive: int | None, want: _Opts, client: str) -> _Runner:
        """getRunner: a runner for ``name`` with one reference taken, reused, reloaded or loaded."""
        if not self.behaviour.pending_queue:  # v0.11.5+: a resident runner that fits skips the queue
            with self._lock:
                r = self._reusable(name, model, want)
                if r is not None:
                    self._use(r, keep_alive, client)
                    return r
        self._sched.acquire(self._stop)  # processPending: one request (<= v0.11.4) or one load at a time
        try:
            return self._schedule(name, model, keep_alive, want, client)
        finally:
            self._sched.release()

    def _schedule(self, name: str, model: _Model, keep_alive: int | None, want: _Opts, client: str) -> _Runner:
        with self._lock:
            r = self._reusable(name, model, want)
            if r is not None:
                self._use(r, keep_alive, client)
                return r
            old = self._runners.get(name)
            why = self._needs_reload(old, want, model) if old is not None else ""
            previous = old.keep_alive_ns if old is not None else None
            if old is not None:  # processPending expires it; it unloads once its requests have ended
                old.keep_alive_ns, old.ending = 0, "replaced"
            self._loading.add(name)
            load_time = self._timing_for(name).load_time
        try:
            if old is not None:
                self._wait_until(lambda: old.refs == 0)
                with self._lock:
                    if self._runners.get(name) is old:
                        del self._runners[name]
            else:
                self._make_room(name)
            self._wait(load_time)
        finally:
            with self._lock:
                self._loading.discard(name)
        with self._lock:
            ka = keep_alive if keep_alive is not None else self._default_keep_alive_ns()
            r = self._new_runner(model, want, ka)
            r.refs = 1
            self._runners[name] = r
            self.loads[name] += 1
            if old is not None:
                self.reloads[name] += 1
                self._event("reload", name, why, client, ka, previous)
            else:
                self._event("load", name, "cold", client, ka)
            return r

    def _make_room(self, name: str) -> None:
        """OLLAMA_MAX_LOADED_MODELS: evict idle runners first, shortest keep_alive first, and wait for them."""
        while self.max_loaded_models > 0:
            with self._lock:
                self._reap()
                others = [r for n, r in self._runners.items() if n != name]
                if len(others) < self.max_loaded_models:
                    return
                victim = min(others, key=lambda r: (r.refs > 0, r.keep_alive_ns, r.name))
                victim.keep_alive_ns, victim.ending = 0, "evicted"
                if victim.refs == 0:
                    del self._runners[victim.name]
                    self._event("unload", victim.name, "evicted", "")
                    continue
            self._wait(0.005)

    def _wait_until(self, done: Callable[[], bool]) -> None:
        while True:
            with self._lock:
                if done():
                    return
            self._wait(0.005)

    def _finish(self, r: _Runner) -> None:
        """processCompleted, after the response has ended: drop the reference; the last one out restarts the
        idle timer (expires_at = now + the runner's duration)."""
        def release() -> None:
            with self._lock:
                self._pending_releases -= 1
                r.refs -= 1
                if r.refs == 0:
                    r.expires_ns = now_ns(r.keep_alive_ns)
                self._reap()

        with self._lock:
            self._pending_releases += 1
        if self.expiry_lag > 0:
            timer = threading.Timer(self.expiry_lag, release)
            timer.daemon = True
            timer.start()
        else:
            release()

    def _inference(self, h: _Handler, path: str, req: dict[str, Any], fault: _Fault | None, t0: int) -> None:
        given = req.get("model") or ""
        if path == "/api/chat" and not str(given).strip():
            raise _HTTPError(400, "model is required")
        keep_alive = parse_keep_alive(req.get("keep_alive"))
        options = req.get("options") or {}
        if not isinstance(options, dict):
            raise _HTTPError(400, "json: cannot unmarshal value into Go struct field options of type map[string]interface {}")
        num_ctx = options.get("num_ctx")
        if num_ctx is not None and (not isinstance(num_ctx, int) or isinstance(num_ctx, bool)):
            raise _HTTPError(500, 'option "num_ctx" must be of type integer')
        name = normalize_name(str(given)) if given else ""
        with self._lock:
            model = self._models.get(name)
        kind = fault.kind if fault else None
        if model is None or kind == "not_found":
            raise _HTTPError(404, f"model '{given}' not found")
        if kind == "busy":
            raise _HTTPError(503, BUSY_MESSAGE)
        chat, embed = path == "/api/chat", path == "/api/embed"
        if not embed and model.capabilities is not None and "completion" not in model.capabilities:
            raise _HTTPError(400, f'"{name}" does not support {"chat" if chat else "generate"}')
        text = req.get({"/api/generate": "prompt", "/api/chat": "messages", "/api/embed": "input"}[path])
        client = h.headers.get("X-Forwarded-For", "")
        if not text and keep_alive == 0 and not self.behaviour.unload_loads_first:  # unload without loading
            with self._lock:
                r = self._runners.get(name)
                if r is not None:  # expireRunner: ps shows "now" until its requests have ended
                    r.keep_alive_ns, r.expires_ns, r.ending = 0, now_ns(), "stopped"
                self._reap()
            return h.send_json(self._special(path, given, "unload"))
        if kind == "oom":
            with self._lock:  # the runner died (v0.30+ expires every runner on a runtime OOM: all=True)
                for victim in list(self._runners) if fault.params.get("all") else [name]:
                    if self._runners.pop(victim, None) is not None:
                        self._event("unload", victim, "oom", client)
            raise _HTTPError(500, str(fault.params.get("message", OOM_MESSAGE)))
        want = self._request_opts(model, options, embed, req.get("shift"))
        runner = self._acquire(name, model, keep_alive, want, client)
        load_ns = time.monotonic_ns() - t0
        try:
            if not text:
                return h.send_json(self._special(path, given, "load"))
            if kind == "context_length":
                raise _HTTPError(int(fault.params.get("code", 400)), str(fault.params.get(
                    "message", f"request ({runner.context_length + 1} tokens) exceeds the available context size "
                               f"({runner.context_length} tokens), try increasing it")))
            timing = self._timing_for(name)
            runner.slots.acquire(self._stop)  # the runner's FIFO slot queue: unbounded, never a 503
            try:
                if embed:
                    return self._embed(h, given, text, req, timing, t0, load_ns)
                self._generate(h, chat, given, req, options, timing, fault, t0, load_ns)
            finally:
                runner.slots.release()
        finally:
            self._finish(runner)  # after the last byte, as Ollama restarts the timer once the handler returned

    @staticmethod
    def _special(path: str, given: str, reason: str) -> dict[str, Any]:
        created = go_time(now_ns())
        if path == "/api/chat":
            return {"model": given, "created_at": created, "message": {"role": "assistant", "content": ""},
                    "done_reason": reason, "done": True}
        if path == "/api/embed":
            return {"model": given, "embeddings": []}
        return {"model": given, "created_at": created, "response": "", "done": True, "done_reason": reason}

    def _embed(self, h: _Handler, given: str, text: Any, req: dict[str, Any], timing: Timing,
               t0: int, load_ns: int) -> None:
        inputs = [text] if isinstance(text, str) else [str(t) for t in text]
        self._wait(timing.ttft)
        dims = req.get("dimensions") if isinstance(req.get("dimensions"), int) else 8
        vectors = []
        for item in inputs:
            digest = hashlib.sha256(item.encode()).digest()
            vectors.append([round((digest[i % 32] - 127.5) / 1275.0, 7) for i in range(dims)])
        h.send_json({"model": given, "embeddings": vectors, "total_duration": time.monotonic_ns() - t0,
                     "load_duration": max(load_ns, 1), "prompt_eval_count": sum(len(i.split()) or 1 for i in inputs)})

    def _generate(self, h: _Handler, chat: bool, given: str, req: dict[str, Any], options: dict[str, Any],
                  timing: Timing, fault: _Fault | None, t0: int, load_ns: int) -> None:
        stream = req.get("stream", True) is not False
        num_predict = options.get("num_predict")
        n = timing.tokens
        limited = isinstance(num_predict, int) and 0 <= num_predict <= timing.tokens
        if limited:
            n = num_predict
        kind = fault.kind if fault else None
        cut_after = min(int(fault.params.get("after", 3)), n) if kind in ("stream_error", "truncate_stream") else -1
        messages = req["messages"] if chat and isinstance(req["messages"], list) else []
        prompt = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict)) if chat \
            else str(req.get("prompt"))
        prompt_tokens = max(1, len(prompt.split()))

        def chunk(piece: str) -> dict[str, Any]:
            head: dict[str, Any] = {"model": given, "created_at": go_time(now_ns())}
            if chat:
                return {**head, "message": {"role": "assistant", "content": piece}, "done": False}
            return {**head, "response": piece, "done": False}

        t_prompt = time.monotonic_ns()
        self._wait(timing.ttft)
        t_eval = time.monotonic_ns()
        pieces: list[str] = []
        if stream and (n > 0 or cut_after == 0):
            h.start_stream()
        for i in range(n + 1):
            if i == cut_after and fault is not None:
                message = str(fault.params.get("message", STREAM_ERROR_MESSAGE))
                if not stream and kind == "stream_error":
                    raise _HTTPError(500, message)  # nothing written yet: a normal error response
                if not stream:  # truncate_stream without streaming: a body shorter than its Content-Length
                    h.truncate_by = 100
                    h.send_json(chunk("".join(pieces)))
                elif kind == "stream_error":
                    h.write_line({"error": message})
                    h.end_stream()
                raise _Abort("close")
            if i == n:
                break
            if i:
                self._wait(timing.token_gap)
            pieces.append(WORDS[i % len(WORDS)])
            if stream:
                h.write_line(chunk(pieces[-1]))
        final = chunk("" if stream else "".join(pieces))
        reason = "length" if limited else "stop"
        if chat:
            del final["done"]
            final.update(done_reason=reason, done=True)
        else:
            final.update(done=True, done_reason=reason,
                         context=[1000 + i for i in range(prompt_tokens)] + [2000 + i for i in range(n)])
        end = time.monotonic_ns()
        metrics = {"total_duration": end - t0, "load_duration": max(load_ns, 1), "prompt_eval_count": prompt_tokens,
                   "prompt_eval_duration": t_eval - t_prompt, "eval_count": n, "eval_duration": end - t_eval}
        final.update({k: v for k, v in metrics.items() if v})  # Go's omitempty drops zeros
        if kind == "final_fields":  # hostile or broken values in the final chunk
            final.update(fault.params.get("fields", {}))
        if not stream:
            return h.send_json(final)
        if n == 0:
            h.start_stream()
        if kind == "raw_final":  # the final line replaced by these bytes (e.g. very deep JSON)
            raw = fault.params.get("line", b"{")
            data = (raw if isinstance(raw, bytes) else str(raw).encode()) + b"\n"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            h.write_line(final)
        h.end_stream()

"""HTTP: `/` (landing page), the telemetry path (`/metrics`), `/probe`, `/-/healthy`, `/-/ready`,
`/-/reload`, on one event loop (epoll) in one thread.

A scrape copies bytes that exposition.Exposition rendered when the snapshot arrived: nothing here calls
Ollama, renders metrics or waits on the poll thread, so /metrics answers in well under a millisecond
of work whatever state Ollama is in. Work that takes time runs off the loop: bcrypt in one worker
thread (so a flood of wrong passwords can pin at most one core), `/probe` scrapes and reloads in a
pool, each with its own deadline, so one slow target never delays another.

The loop must not be blinded by its clients either. A request's head must arrive whole within
HEAD_TIMEOUT (a client dribbling a byte every few seconds is cut off), an idle keep-alive connection
is closed after IDLE_TIMEOUT, a response that the client does not read within WRITE_TIMEOUT is dropped,
at most `web.max_connections` connections are held (past it the oldest idle one, else the oldest, is
closed to make room, so a flood of idle connections cannot lock scrapers out), a response is handed to
the kernel as fast as the client reads it, from the shared rendered bytes (a slow reader costs no copy of
the body; large bodies go out with sendfile from a memory file), the kernel's send buffer per connection
is bounded, the listen backlog is real, and a failing accept (out of file descriptors) backs off
instead of spinning.

The loop is a plain epoll loop with a callback per socket, a timer heap and a wake-up pipe for the worker
threads, not asyncio: asyncio's transports, protocols, tasks, handles and selector keys cost more than
the rest of a scrape, and with them a scrape cost several times what nginx spends serving the same bytes;
now it costs about the same (benchmarks/bench_scale.py).

TLS is negotiated per connection with the web config current at accept time (so a reload can turn
TLS on or off; certificates rotate by themselves), a client certificate failing client_allowed_sans is
disconnected right after the handshake, and the web config's rate limit (429) and basic auth are
checked on every path before answering, its headers added to every response.
"""

from __future__ import annotations

import errno
import heapq
import html
import itertools
import logging
import math
import os
import resource
import select
import socket
import ssl
import struct
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol
from types import MappingProxyType
from urllib.parse import parse_qs

from ollama_exporter import __version__
from ollama_exporter.config import Config, redact_url
from ollama_exporter.exposition import Exposition

log = logging.getLogger(__name__)

BACKLOG = 1024
ACCEPT_BATCH = 16  # connections taken per wake-up of the loop
PARSED_HEADS = 256  # request heads whose parse is kept
SWEEP_INTERVAL = 0.2  # how often deadlines are checked: each is kept to within this
HEAD_TIMEOUT = 10.0  # the whole request head, from its first byte (or the connection's start)
IDLE_TIMEOUT = 300.0  # between requests on a keep-alive connection (longer than any scrape interval)
WRITE_TIMEOUT = 60.0  # for the client to read a whole response
TLS_HANDSHAKE_TIMEOUT = 10.0
MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
MAX_BODY = 4096  # /-/reload takes no body; anything bigger is refused
RECV_SIZE = 8192  # per read: below malloc's mmap threshold (memory.py), so a read is no mmap and munmap
SEND_BUFFER = 128 * 1024  # the kernel's send buffer per connection (it doubles it for its own accounting)
SEND_BUFFER_MAX = 512 * 1024  # ... raised, for a response that big, to take the whole of it in one write
TEXT = "text/plain; charset=utf-8"

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
           414: "URI Too Long", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
           500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}

LANDING_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Ollama Exporter</title></head>
<body>
<h1>Ollama Exporter</h1>
<p>Version {version}. Polling Ollama at <code>{ollama_url}</code>.</p>
<ul>
<li><a href="{metrics}">Metrics</a></li>
<li><a href="/-/healthy">Health</a> and <a href="/-/ready">readiness</a></li>
</ul>
</body></html>
"""


@dataclass
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "
    version: str


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, message: str, **headers: str) -> "Response":
        return cls(status, message.encode() + b"\n", TEXT, dict(headers))


class App(Protocol):
    """What the server needs from the daemon."""

    exposition: Exposition

    @property
    def config(self) -> Config: ...

    @property
    def web(self) -> Any: ...  # webconfig.WebConfig or None

    def healthy(self) -> tuple[bool, str]: ...

    def ready(self) -> tuple[bool, str]: ...

    def reload(self) -> tuple[bool, str]: ...

    def probe(self, request: Request) -> Response: ...


class Server:
    """Serves `app` on already-bound listening sockets from one thread running an epoll loop."""

    def __init__(self, app: App, sockets: list[socket.socket]):
        self.app = app
        self.sockets = sockets
        self.connections: dict["_Connection", None] = {}  # insertion order = age
        self.auth_pool = ThreadPoolExecutor(1, thread_name_prefix="http-auth")
        self.work_pool = ThreadPoolExecutor(64, thread_name_prefix="http-work")
        self._thread: Optional[threading.Thread] = None
        self._running = False
        # One epoll for the listeners and every connection, with a callback per descriptor: registering,
        # forgetting and dispatching a connection costs a system call and a dict entry.
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}  # fd -> its callback, given the epoll events
        self._timers: list[tuple[float, int, Callable, tuple]] = []  # heap of (when, order, callback, args)
        self._order = itertools.count()
        self._calls: deque = deque()  # (callback, args) from other threads, run on the loop
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._heads: dict[tuple, tuple] = {}  # (content type, gzipped, close, id(web)) -> (Body, web, head)
        # Request heads parsed, by their bytes: a scraper sends the same head every time
        self.parsed: dict[bytes, tuple] = {}
        # Connections may use at most half the descriptors the process may open, so a flood meets our cap
        # (which closes idle connections to make room) long before accept() fails for lack of descriptors.
        self.fd_budget = max(8, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)

    def start(self) -> None:
        self.watch(self._wake_read, select.EPOLLIN, self._woken)
        for sock in self.sockets:
            sock.setblocking(False)
            self._listen(sock)
        self.call_later(SWEEP_INTERVAL, self._sweep)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            return

        def close() -> None:
            self._running = False
            for sock in self.sockets:
                self.handlers.pop(sock.fileno(), None)
                sock.close()
            for conn in list(self.connections):
                conn.close()

        self.call_soon_threadsafe(close)
        self._thread.join(2)
        if not self._thread.is_alive():
            for fd in (self._wake_read, self._wake_write):
                os.close(fd)
            self.epoll.close()
        self.auth_pool.shutdown(wait=False, cancel_futures=True)
        self.work_pool.shutdown(wait=False, cancel_futures=True)

    # --- the loop ---

    def _run(self) -> None:
        handlers, timers = self.handlers, self._timers
        while self._running:
            timeout = max(0.0, timers[0][0] - time.monotonic()) if timers else -1
            for fd, events in self.epoll.poll(timeout, 256):
                handler = handlers.get(fd)
                if handler is not None:
                    try:
                        handler(events)
                    except Exception:  # noqa: BLE001 - one connection's bug must not stop the others
                        log.exception("connection handler failed")
            while timers and timers[0][0] <= time.monotonic():
                _, _, callback, args = heapq.heappop(timers)
                try:
                    callback(*args)
                except Exception:  # noqa: BLE001
                    log.exception("timer callback failed")

    def call_later(self, delay: float, callback: Callable, *args: Any) -> None:
        """Run `callback(*args)` on the loop after `delay` seconds (from the loop's thread only)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._order), callback, args))

    def call_soon_threadsafe(self, callback: Callable, *args: Any) -> None:
        """Run `callback(*args)` on the loop, from any thread."""
        self._calls.append((callback, args))
        try:
            os.write(self._wake_write, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed (stopped)

    def submit(self, pool: ThreadPoolExecutor, work: Callable, arg: Any, done: Callable[[Any], None]) -> None:
        """Run `work(arg)` in `pool`, then `done(future)` on the loop; RuntimeError if the pool is shut down."""
        future = pool.submit(work, arg)
        future.add_done_callback(lambda f: self.call_soon_threadsafe(done, f))

    def _woken(self, events: int) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        while self._calls:
            callback, args = self._calls.popleft()
            try:
                callback(*args)
            except Exception:  # noqa: BLE001
                log.exception("loop callback failed")

    # --- sockets ---

    def watch(self, fd: int, events: int, handler: Callable[[int], None]) -> None:
        self.handlers[fd] = handler
        self.epoll.register(fd, events)

    def _sweep(self) -> None:
        """Close the connections past their deadline: one timer for all of them, not one per connection."""
        now = time.monotonic()
        for conn in [c for c in self.connections if c.deadline <= now]:
            conn.close()
        if self._running:
            self.call_later(SWEEP_INTERVAL, self._sweep)

    def _listen(self, listener: socket.socket) -> None:
        family = int(listener.family)
        self.watch(listener.fileno(), select.EPOLLIN, lambda events: self._accept(listener, family))

    def _accept(self, listener: socket.socket, family: int) -> None:
        """Take the connections waiting, a few at a time (so the closes of those answered are seen before
        the cap counts them); out of descriptors, pause for a second."""
        inet = family in (socket.AF_INET, socket.AF_INET6)
        for _ in range(ACCEPT_BATCH):
            try:
                fd, _ = listener._accept()  # noqa: SLF001 - socket.accept() without its enum conversions
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept connections", extra={"error": str(exc)})
                    self.handlers.pop(listener.fileno(), None)
                    self.epoll.unregister(listener.fileno())
                    self.call_later(1.0, self._resume_accepting, listener, family)
                    return
                continue  # ECONNABORTED and the like: that client is already gone
            _Connection(self, socket.socket(family, socket.SOCK_STREAM, 0, fd), inet)

    def _resume_accepting(self, listener: socket.socket, family: int) -> None:
        if self._running:
            self._listen(listener)

    def admit(self, conn: "_Connection") -> None:
        """Track a new connection; past the cap, close the oldest idle one (else the oldest)."""
        limit = min(self.app.config.web_max_connections, self.fd_budget)
        while len(self.connections) >= limit:
            victim = next((c for c in self.connections if c.idle), None) or next(iter(self.connections))
            victim.close()
            self.connections.pop(victim, None)
        self.connections[conn] = None

    def metrics_head(self, body: Any, close: bool) -> bytes:
        """The response head for an exposition Body, made once per rendered body (scrapes only copy it)."""
        web = self.app.web
        key = (body.content_type, body.gzipped, close, id(web))
        cached = self._heads.get(key)
        if cached is None or cached[0] is not body or cached[1] is not web:
            if len(self._heads) >= 16:
                self._heads.clear()  # web configs come and go with reloads; the variants are few
            headers = {"Content-Encoding": "gzip"} if body.gzipped else {}
            cached = self._heads[key] = (body, web, _head(Response(200, body.data, body.content_type, headers),
                                                          close, web))
        return cached[2]



def bind(host: str, port: int) -> socket.socket:
    """A listening socket; "" binds every interface, dual-stack where the kernel allows it."""
    if host == "":
        family, host, dual = ((socket.AF_INET6, "::", True) if socket.has_dualstack_ipv6()
                              else (socket.AF_INET, "0.0.0.0", False))
    else:
        try:
            family, dual = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0], False
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve listen address {host!r}: {exc}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Connection:
    """One client connection: read a request head, answer it, repeat; every wait has a deadline.

    The non-blocking socket (plain, or TLS through ssl.SSLSocket) is driven straight from the loop's
    readiness callbacks. A request that arrived with the connection is answered in the callback that
    accepted it. Responses are queued as views of the shared rendered bytes and handed to
    the kernel as fast as the client reads them (its send buffer is bounded), never copied.
    """

    __slots__ = ("server", "sock", "fd", "web", "buffer", "busy", "close_after", "_out",
                 "_writing", "deadline", "_closed", "_between", "_tls",
                 "_handshaking", "_sndbuf", "_reading")

    def __init__(self, server: Server, sock: socket.socket, inet: bool = True):
        self.server, self.sock = server, sock
        self.fd = sock.fileno()
        self.web = server.app.web  # as at accept time: TLS or not, for the whole connection
        self.buffer = bytearray()
        self.busy = False  # a request is being answered; later bytes wait in the buffer
        self.close_after = False
        self._out: deque = deque()  # what is still to be sent: views of the head and the shared body
        self._writing = False  # waiting for the socket to become writable
        self.deadline = math.inf  # loop time when Server._sweep closes it, unless it moved on
        self._closed = False
        self._between = False  # waiting for another request on a kept-alive connection
        self._tls = self._handshaking = False
        self._reading = True  # watching for requests (until the client's end of the stream)
        sock.setblocking(False)
        # The kernel's send buffer is bounded from the first response on (_send), and nothing is sent
        # before it but a TLS handshake.
        self._sndbuf = 0 if inet else SEND_BUFFER_MAX
        if inet:  # a pipelined second answer must not wait for the client's delayed ACK of the first
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server.admit(self)
        tls = self.web is not None and self.web.tls
        # for the TLS handshake (if any) and the first request's head
        self._deadline(min(HEAD_TIMEOUT, TLS_HANDSHAKE_TIMEOUT) if tls else HEAD_TIMEOUT)
        if tls:
            try:
                self.sock = self.web.ssl_context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError) as exc:
                log.debug("TLS handshake failed", extra={"error": str(exc)})
                self.close()
                return
            self._handshaking = True
            server.watch(self.fd, _IN, self._event)
            self._handshake()
            return
        server.watch(self.fd, _IN, self._event)
        self._readable()  # the request usually came with the connection

    # --- life cycle ---

    def _handshake(self) -> None:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want_writable(False)
            return
        except ssl.SSLWantWriteError:
            self._want_writable(True)
            return
        except (OSError, ValueError) as exc:
            log.debug("TLS handshake failed", extra={"error": str(exc)})
            self.close()
            return
        self._handshaking, self._tls = False, True
        self._want_writable(False)
        try:
            self.web.verify_peer(self.sock)
        except (ssl.SSLError, ValueError) as exc:
            log.debug("client certificate refused", extra={"error": str(exc)})
            self.close()
            return
        self._readable()  # the first request may have come with the handshake's last flight

    @property
    def idle(self) -> bool:
        """No request in progress nor arriving (for the eviction policy)."""
        return not self.busy and not self.buffer

    def close(self) -> None:
        """Drop the connection now: with a reset, so the kernel does not go on sending what is unread."""
        if not self._closed:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self._lost()

    def _lost(self) -> None:
        """Forget the connection and close its socket (what the kernel holds is still delivered)."""
        if self._closed:
            return
        self._closed = True
        self.server.handlers.pop(self.fd, None)  # closing the socket takes it out of the epoll
        self.server.connections.pop(self, None)
        self._out.clear()
        self.sock.close()

    def _deadline(self, seconds: float) -> None:
        """Close the connection `seconds` from now (Server._sweep does) unless another deadline replaces it."""
        self.deadline = time.monotonic() + seconds

    def _no_deadline(self) -> None:
        """While a request is being worked on (offloaded work has deadlines of its own)."""
        self.deadline = math.inf

    # --- reading ---

    def _readable(self) -> None:
        if self._handshaking:
            self._handshake()
            return
        while not self._closed:
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return  # (a TLS renegotiation that never completes ends at the deadline)
            except OSError:
                self._lost()
                return
            if not data:
                self._eof()
                return
            self.data_received(data)
            if not self._tls or not self.sock.pending():
                return  # else TLS holds decrypted bytes that the kernel will not signal again

    def _eof(self) -> None:
        """The client sends no more: an answer being written is finished, then the connection closed."""
        if self._out:
            self._reading = False
            self.close_after = True
            self.server.epoll.modify(self.fd, _OUT)
        else:
            self._lost()

    def data_received(self, data: bytes) -> None:
        if self._between:  # the next request's head starts now: its deadline runs from this byte
            self._between = False
            self._deadline(HEAD_TIMEOUT)
        self.buffer += data
        if len(self.buffer) > MAX_HEAD + MAX_BODY:
            self._fail(431, "request too large") if not self.busy else self.close()
            return
        self._next()

    def _next(self) -> None:
        """Answer the next complete request in the buffer, if any and if none is being answered."""
        if self.busy or self._closed:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._fail(431, "request head too large")
            return
        if end > MAX_HEAD:
            self._fail(431, "request head too large")
            return
        head = bytes(self.buffer[:end])
        parsed = self.server.parsed.get(head)
        if parsed is None:
            try:
                parsed = _parse(head)
            except ValueError as exc:
                self._fail(400, str(exc))
                return
            if len(self.server.parsed) >= PARSED_HEADS:
                self.server.parsed.clear()  # a client inventing heads only makes this a cache that misses
            self.server.parsed[head] = parsed
        method, path, query, headers, version, body_length = parsed
        request = Request(method, path, query, headers, version)
        if body_length > MAX_BODY:
            self._fail(413, "request body too large")
            return
        if len(self.buffer) < end + 4 + body_length:
            return  # the body is still on its way, under the same deadline
        del self.buffer[: end + 4 + body_length]
        self.busy = True
        self._no_deadline()
        connection = request.headers.get("connection", "").lower()
        self.close_after = "close" in connection or (request.version == "HTTP/1.0" and "keep-alive" not in connection)
        self._dispatch(request)

    # --- answering ---

    def _dispatch(self, request: Request) -> None:
        app = self.server.app
        web = app.web
        if web is not None and web.rate_limit is not None and not web.rate_limit.allow():
            self._respond(request, Response.text(429, "Too Many Requests"))
            return
        auth = web.auth if web is not None else None
        if auth is not None:
            header = request.headers.get("authorization")
            cached = auth.cached(header)
            if cached is None:
                def checked(future) -> None:
                    ok = not future.cancelled() and future.exception() is None and future.result()
                    self._authorised(request, bool(ok))

                try:
                    self.server.submit(self.server.auth_pool, auth.check, header, checked)
                except RuntimeError:  # the pool is shut down
                    self._respond(request, Response.text(503, "shutting down"))
                return
            if not cached:
                self._authorised(request, False)
                return
        self._route(request)

    def _authorised(self, request: Request, ok: bool) -> None:
        if self._closed:
            return
        if not ok:
            self._respond(request, Response.text(401, "Unauthorized", **{
                "WWW-Authenticate": 'Basic realm="ollama-exporter"'}))
            return
        self._route(request)

    def _route(self, request: Request) -> None:
        app, path, method = self.server.app, request.path, request.method
        config = app.config
        get_like = method in ("GET", "HEAD")
        if path == config.web_telemetry_path and get_like:
            body = app.exposition.get(request.headers.get("accept", ""), request.headers.get("accept-encoding", ""))
            self._send(self.server.metrics_head(body, self.close_after), body.data, request.method != "HEAD",
                       body.file)
        elif path == "/probe" and get_like:
            self._offload(request, app.probe)
        elif path == "/" and get_like:
            page = LANDING_PAGE.format(version=__version__, ollama_url=html.escape(redact_url(config.ollama_url)),
                                       metrics=html.escape(config.web_telemetry_path))
            self._respond(request, Response(200, page.encode(), "text/html; charset=utf-8"))
        elif path == "/-/healthy" and get_like:
            ok, why = app.healthy()
            self._respond(request, Response.text(200 if ok else 503, "OK" if ok else why))
        elif path == "/-/ready" and get_like:
            ok, why = app.ready()
            self._respond(request, Response.text(200 if ok else 503, "OK" if ok else why))
        elif path == "/-/reload" and method in ("POST", "PUT"):
            self._offload(request, lambda r: _reload_response(app.reload()))
        elif path in (config.web_telemetry_path, "/probe", "/", "/-/healthy", "/-/ready", "/-/reload"):
            allow = "POST, PUT" if path == "/-/reload" else "GET, HEAD"
            self._respond(request, Response.text(405, "Method Not Allowed", Allow=allow))
        else:
            self._respond(request, Response.text(404, "404 page not found"))

    def _offload(self, request: Request, work: Callable[[Request], Response]) -> None:
        def done(future) -> None:
            if future.cancelled():
                response = Response.text(503, "shutting down")
            elif future.exception() is not None:
                log.error("request failed", exc_info=future.exception(), extra={"path": request.path})
                response = Response.text(500, "internal error")
            else:
                response = future.result()
            self._respond(request, response)

        try:
            self.server.submit(self.server.work_pool, work, request, done)
        except RuntimeError:  # the pool is shut down
            self._respond(request, Response.text(503, "shutting down"))

    def _fail(self, status: int, message: str) -> None:
        self.busy, self.close_after = True, True
        self._respond(None, Response.text(status, message))

    def _respond(self, request: Optional[Request], response: Response) -> None:
        self._send(_head(response, self.close_after, self.server.app.web), response.body,
                   request is None or request.method != "HEAD")

    def _send(self, head: bytes, body: bytes, with_body: bool, file: Any = None) -> None:
        """Queue a response and start writing it; `file` (an exposition.BodyFile) holds the body's bytes
        for sendfile() on a plain connection."""
        if self._closed:
            return
        self._out.append(head)
        size = len(head)
        if with_body and body:
            self._out.append(_FileSlice(file) if file is not None and not self._tls else memoryview(body))
            size += len(body)
        if size > self._sndbuf and self._sndbuf < SEND_BUFFER_MAX:
            # A bounded kernel buffer: what a client has not read stays in our queue (no copy, under the
            # write deadline), not in megabytes of autotuned kernel memory per socket. It holds a whole
            # compressed exposition, though: a body written in parts costs a trip through the loop per part,
            # each waiting for the client to read (a static file server writes it at once).
            self._sndbuf = max(SEND_BUFFER, min(size, SEND_BUFFER_MAX))
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
            except OSError:
                pass
        self._deadline(WRITE_TIMEOUT)
        self._flush()

    def _writable(self) -> None:
        if self._handshaking:
            self._handshake()
        else:
            self._flush()

    def _want_writable(self, wanted: bool) -> None:
        if wanted != self._writing and not self._closed:
            self._writing = wanted
            self.server.epoll.modify(self.fd, (_IN if self._reading else 0) | (_OUT if wanted else 0))

    def _event(self, events: int) -> None:
        if events & _OUT and self._writing:
            self._writable()
        if events & _NOT_OUT and not self._closed:
            if self._reading:
                self._readable()  # a request, the end of the client's stream, or an error: recv says which
            elif events & _GONE:
                self._lost()  # reset or hung up while we only write: nothing will be read

    def _flush(self) -> None:
        """Hand the kernel what it takes of the queued response; the rest waits until the socket is writable."""
        out = self._out
        while out and not self._closed:
            first = out[0]
            try:
                if type(first) is _FileSlice:
                    sent = first.send(self.fd)
                    if first.left:
                        break  # the kernel's buffer is full
                    out.popleft()
                    continue
                if self._tls:
                    sent = self.sock.send(first)
                elif len(out) > 1 and type(out[1]) is _FileSlice:
                    sent = self.sock.send(first, socket.MSG_MORE)  # the head goes out with the body's start
                else:
                    sent = self.sock.sendmsg(out)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except OSError:
                self._lost()
                return
            full = False
            while sent:
                if sent >= len(out[0]):
                    sent -= len(out.popleft())
                else:
                    out[0], full = memoryview(out[0])[sent:], True
                    break
            if full and not self._tls:
                break  # the kernel's buffer is full (TLS writes record by record: try again)
        if self._closed:
            return
        self._want_writable(bool(out))
        if not out:
            self._finished()

    def _finished(self) -> None:
        """The whole response is with the kernel: close, or wait for the next request."""
        if self.close_after:
            if self._tls:
                try:
                    self.sock.unwrap()  # close_notify, without waiting for the client's
                except (OSError, ValueError):
                    pass
            self._lost()
            return
        self.busy = False
        if self.buffer:  # a pipelined request: it has been arriving under the previous deadlines
            self._deadline(HEAD_TIMEOUT)
            self._next()
        else:
            self._between = True
            self._deadline(IDLE_TIMEOUT)


class _FileSlice:
    """What is left to send of a body file (exposition.BodyFile); holds it open until it is sent."""

    __slots__ = ("file", "offset")

    def __init__(self, file: Any):
        self.file, self.offset = file, 0

    @property
    def left(self) -> int:
        return self.file.size - self.offset

    def send(self, fd: int) -> int:
        sent = os.sendfile(fd, self.file.fd, self.offset, self.left)
        self.offset += sent
        return sent


_SPACE = " \t\n\r\x0b\x0c"  # what bytes.strip() strips (str.strip() would also take \x85 and \xa0)
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_NOT_OUT = ~select.EPOLLOUT  # readable, hung up or failed
_GONE = select.EPOLLHUP | select.EPOLLERR


def _parse(head: bytes) -> tuple:
    """(method, path, query, headers, version, body length) of a request head; ValueError if malformed.
    Read-only mappings: a parsed head is kept (Server.parsed) and shared by the requests that repeat it."""
    lines = head.decode("latin-1").split("\r\n")  # one byte per character: the bytes' own structure
    if not lines[0].isascii():
        raise ValueError("malformed request line")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise ValueError("malformed request line") from None
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ValueError("unsupported HTTP version")
    if len(lines) - 1 > MAX_HEADERS:
        raise ValueError("too many headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip(_SPACE):
            raise ValueError("malformed header")
        key = name.lower()
        text = value.strip(_SPACE)
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if "transfer-encoding" in headers:
        raise ValueError("request bodies must have a Content-Length")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit() or len(length_text) > 9:
        raise ValueError("invalid Content-Length")
    path, _, query = target.partition("?")
    try:
        params = parse_qs(query, max_num_fields=20) if query else {}
    except ValueError:
        raise ValueError("invalid query string") from None
    return method, path, MappingProxyType(params), MappingProxyType(headers), version, int(length_text)


def _head(response: Response, close: bool, web: Any) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'OK')}",
             f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}"]
    for name, value in {**(web.headers if web is not None else {}), **response.headers}.items():
        lines.append(f"{name}: {value}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _reload_response(result: tuple[bool, str]) -> Response:
    ok, message = result
    return Response.text(200 if ok else 500, message)


"""HTTP: `/` (landing page), the telemetry path (`/metrics`), `/probe`, `/-/healthy`, `/-/ready`,
`/-/reload`, on one asyncio event loop in one thread.

A scrape copies bytes that exposition.Exposition rendered when the snapshot arrived: nothing here calls
Ollama, renders metrics or waits on the poll thread, so /metrics answers in well under a millisecond
of work whatever state Ollama is in. Work that takes time runs off the loop: bcrypt in one worker
thread (so a flood of wrong passwords can pin at most one core), `/probe` scrapes and reloads in a
pool, each with its own deadline, so one slow target never delays another.

The loop must not be blinded by its clients either. A request's head must arrive whole within
HEAD_TIMEOUT (a client dribbling a byte every few seconds is cut off), an idle keep-alive connection
is closed after IDLE_TIMEOUT, a response that the client does not read within WRITE_TIMEOUT is dropped,
at most `web.max_connections` connections are held (past it the oldest idle one, else the oldest, is
closed to make room, so a flood of idle connections cannot lock scrapers out), responses are written in
flow-controlled slices of a shared buffer (a slow reader costs no copy of the body), the listen
backlog is real, and a failing accept (out of file descriptors) backs off instead of spinning.

TLS is negotiated per connection with the web config current at accept time (so a reload can turn
TLS on or off; certificates rotate by themselves), a client certificate failing client_allowed_sans is
disconnected right after the handshake, and the web config's rate limit (429) and basic auth are
checked on every path before answering, its headers added to every response.
"""

from __future__ import annotations

import asyncio
import errno
import html
import logging
import resource
import socket
import ssl
import struct
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol
from urllib.parse import parse_qs

from ollama_exporter import __version__
from ollama_exporter.config import Config, redact_url
from ollama_exporter.exposition import Exposition

log = logging.getLogger(__name__)

BACKLOG = 1024
HEAD_TIMEOUT = 10.0  # the whole request head, from its first byte (or the connection's start)
IDLE_TIMEOUT = 300.0  # between requests on a keep-alive connection (longer than any scrape interval)
WRITE_TIMEOUT = 60.0  # for the client to read a whole response
TLS_HANDSHAKE_TIMEOUT = 10.0
MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
MAX_BODY = 4096  # /-/reload takes no body; anything bigger is refused
SLICE = 64 * 1024
SEND_BUFFER = 128 * 1024
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
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    version: str
    peer: Any = None
    peer_cert: Optional[dict] = None


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
    """Serves `app` on already-bound listening sockets from one event-loop thread."""

    def __init__(self, app: App, sockets: list[socket.socket]):
        self.app = app
        self.sockets = sockets
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        self.connections: dict["_Connection", None] = {}  # insertion order = age
        self.auth_pool = ThreadPoolExecutor(1, thread_name_prefix="http-auth")
        self.work_pool = ThreadPoolExecutor(64, thread_name_prefix="http-work")
        self._thread: Optional[threading.Thread] = None
        self._servers: list[asyncio.base_events.Server] = []
        # Connections may use at most half the descriptors the process may open, so a flood meets our cap
        # (which closes idle connections to make room) long before accept() fails for lack of descriptors.
        self.fd_budget = max(8, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)

    @property
    def addresses(self) -> list[tuple]:
        return [s.getsockname() for s in self.sockets]

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            for sock in self.sockets:
                self._servers.append(self.loop.run_until_complete(
                    self.loop.create_server(lambda: _Connection(self), sock=sock, backlog=BACKLOG)))
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="http", daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        if self._thread is None or not self.loop.is_running():
            return

        def close() -> None:
            for server in self._servers:
                server.close()
            for conn in list(self.connections):
                conn.close()
            self.loop.stop()

        self.loop.call_soon_threadsafe(close)
        self._thread.join(2)
        if not self._thread.is_alive():
            self.loop.close()  # else the loop's finaliser complains on stderr at exit, outside the log format
        self.auth_pool.shutdown(wait=False, cancel_futures=True)
        self.work_pool.shutdown(wait=False, cancel_futures=True)

    # --- connection accounting ---

    def admit(self, conn: "_Connection") -> None:
        """Track a new connection; past the cap, close the oldest idle one (else the oldest)."""
        limit = min(self.app.config.web_max_connections, self.fd_budget)
        while len(self.connections) >= limit:
            victim = next((c for c in self.connections if c.idle), None) or next(iter(self.connections))
            victim.close()
            self.connections.pop(victim, None)
        self.connections[conn] = None

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # asyncio's accept loop already backs off for a second on these; say so, at most once a minute
            log.error("cannot accept connections", extra={"error": str(exc)})
            return
        log.debug("connection error", extra={"error": str(context.get("message")), "exc": repr(exc)})


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


class _Connection(asyncio.Protocol):
    """One client connection: read a request head, answer it, repeat; every wait has a deadline."""

    def __init__(self, server: Server):
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = bytearray()
        self.idle = True  # no request in progress (for the eviction policy)
        self.busy = False  # a request is being answered; later bytes wait in the buffer
        self.close_after = False
        self._out: deque[memoryview] = deque()
        self._paused = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self._peer_cert: Optional[dict] = None
        self._closed = False
        self._between = False  # waiting for another request on a kept-alive connection

    # --- life cycle ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Headers and body in separate writes: without this, Nagle plus a delayed ACK holds the body.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A bounded kernel buffer: what a client has not read stays in our flow-controlled queue (no
            # copy, under the write deadline) instead of in megabytes of autotuned kernel memory per socket.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.server.admit(self)
        self._deadline(HEAD_TIMEOUT)  # for the TLS handshake (if any) and the first request's head
        web = self.server.app.web
        if web is not None and getattr(web, "tls", False):
            transport.pause_reading()
            # No request is answered before the handshake and the peer check are done: with TLS 1.3 a
            # request can arrive with the client's last handshake flight and be handed to us before
            # start_tls() returns, when the answer would go out unencrypted on the raw transport.
            self.busy = True
            self.server.loop.create_task(self._start_tls(web))

    async def _start_tls(self, web: Any) -> None:
        try:
            # start_tls() pauses the transport itself and only then hands it to the TLS protocol. Our own
            # pause must end first: Python 3.10's transport starts reading even when paused in
            # connection_made, so start_tls's pause would be a no-op and a ClientHello that is already
            # waiting would reach the TLS protocol before it is set up and be lost (the handshake hangs).
            self.transport.resume_reading()
            tls = await self.server.loop.start_tls(self.transport, self, web.ssl_context(), server_side=True,
                                                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake failed", extra={"error": str(exc)})
            self.close()
            return
        if tls is None or self._closed:
            self.close()
            return
        self.transport = tls
        ssl_object = tls.get_extra_info("ssl_object")
        if ssl_object is not None:
            try:
                web.verify_peer(ssl_object)
            except (ssl.SSLError, ValueError) as exc:
                log.debug("client certificate refused", extra={"error": str(exc)})
                self.close()
                return
        self._peer_cert = ssl_object.getpeercert() if ssl_object is not None else None
        self.busy = False
        self._next()  # a request that came with the handshake

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._closed = True
        self._cancel_timer()
        self.server.connections.pop(self, None)
        self._out.clear()

    def close(self) -> None:
        """Drop the connection now: with a reset, so the kernel does not go on sending what is unread."""
        if self.transport is not None and not self._closed:
            self._closed = True
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self.transport.abort()
        self._cancel_timer()

    def _deadline(self, seconds: float) -> None:
        self._cancel_timer()
        self._timer = self.server.loop.call_later(seconds, self.close)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- reading ---

    def data_received(self, data: bytes) -> None:
        if self._between:  # the next request's head starts now: its deadline runs from this byte
            self._between = False
            self._deadline(HEAD_TIMEOUT)
        self.idle = False
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
        try:
            request, body_length = self._parse(head)
        except ValueError as exc:
            self._fail(400, str(exc))
            return
        if body_length > MAX_BODY:
            self._fail(413, "request body too large")
            return
        if len(self.buffer) < end + 4 + body_length:
            return  # the body is still on its way, under the same deadline
        del self.buffer[: end + 4 + body_length]
        self.busy = True
        self._cancel_timer()
        connection = request.headers.get("connection", "").lower()
        self.close_after = "close" in connection or (request.version == "HTTP/1.0" and "keep-alive" not in connection)
        self._dispatch(request)

    def _parse(self, head: bytes) -> tuple[Request, int]:
        lines = head.split(b"\r\n")
        try:
            method, target, version = lines[0].decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            raise ValueError("malformed request line") from None
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise ValueError("unsupported HTTP version")
        if len(lines) - 1 > MAX_HEADERS:
            raise ValueError("too many headers")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise ValueError("malformed header")
            key = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
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
        return Request(method, path, params, headers, version, self.transport.get_extra_info("peername"),
                       self._peer_cert), int(length_text)

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
                future = self.server.loop.run_in_executor(self.server.auth_pool, auth.check, header)
                future.add_done_callback(lambda f: self._authorised(request, not f.cancelled() and f.result()))
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
            headers = {"Content-Encoding": "gzip"} if body.gzipped else {}
            self._respond(request, Response(200, body.data, body.content_type, headers))
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
            future = self.server.loop.run_in_executor(self.server.work_pool, work, request)
        except RuntimeError:  # the pool is shut down
            self._respond(request, Response.text(503, "shutting down"))
            return
        future.add_done_callback(done)

    def _fail(self, status: int, message: str) -> None:
        self.busy, self.close_after = True, True
        self._respond(None, Response.text(status, message))

    def _respond(self, request: Optional[Request], response: Response) -> None:
        if self._closed:
            return
        web = self.server.app.web
        lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'OK')}",
                 f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}"]
        for name, value in {**getattr(web, "headers", {}), **response.headers}.items():
            lines.append(f"{name}: {value}")
        if self.close_after:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._out.append(memoryview(head))
        if request is None or request.method != "HEAD":
            self._out.append(memoryview(response.body))
        self._deadline(WRITE_TIMEOUT)
        self._pump()

    def _pump(self) -> None:
        while self._out and not self._paused and not self._closed:
            part = self._out[0]
            if len(part) > SLICE:
                self._out[0] = part[SLICE:]
                part = part[:SLICE]
            else:
                self._out.popleft()
            self.transport.write(part)
        if not self._out and not self._closed:
            self._finished()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    def _finished(self) -> None:
        """The whole response is handed to the transport: close, or wait for the next request."""
        if self.close_after:
            self.transport.close()  # flushes what is buffered, then closes
            self._cancel_timer()
            self._timer = self.server.loop.call_later(WRITE_TIMEOUT, self.close)
            return
        self.busy = False
        self.idle = not self.buffer
        if self.buffer:  # a pipelined request: it has been arriving under the previous deadlines
            self._deadline(HEAD_TIMEOUT)
            self._next()
        else:
            self._between = True
            self._deadline(IDLE_TIMEOUT)


def _reload_response(result: tuple[bool, str]) -> Response:
    ok, message = result
    return Response.text(200 if ok else 500, message)

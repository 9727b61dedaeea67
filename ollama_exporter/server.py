"""HTTP routes: `/` (landing page), `/metrics`, `/-/healthy`, `/-/ready`.

A scrape copies bytes that exposition.Exposition rendered when the snapshot arrived; nothing here
calls Ollama or renders metrics, so /metrics answers in well under a millisecond of work whatever
state Ollama is in. Listens on IPv4, IPv6, or both (an empty host binds `::` dual-stack when the
kernel allows it, else `0.0.0.0`). With a web config (webconfig.py) it serves HTTPS and/or checks basic
auth on every path before answering.
"""

from __future__ import annotations

import html
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from ollama_exporter import __version__
from ollama_exporter.exposition import Exposition
from ollama_exporter.webconfig import BasicAuth, WebConfig, ssl_context

log = logging.getLogger(__name__)

LANDING_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Ollama Exporter</title></head>
<body>
<h1>Ollama Exporter</h1>
<p>Version {version}. Polling Ollama at <code>{ollama_url}</code>.</p>
<ul>
<li><a href="{prefix}metrics">Metrics</a></li>
<li><a href="{prefix}-/healthy">Health</a> and <a href="{prefix}-/ready">readiness</a></li>
</ul>
</body></html>
"""


class _Handler(BaseHTTPRequestHandler):
    server: "MetricsServer"
    protocol_version = "HTTP/1.1"
    server_version = f"ollama-exporter/{__version__}"
    timeout = 30  # a client that stalls (or never finishes a TLS handshake) frees its thread

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without TCP_NODELAY, Nagle plus the client's delayed
        # ACK holds the body back ~40 ms on every keep-alive request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._route(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._route(head=True)

    def _route(self, head: bool) -> None:
        auth = self.server.auth
        if auth is not None and not auth.check(self.headers.get("Authorization")):
            self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8", head,
                       {"WWW-Authenticate": 'Basic realm="ollama-exporter"'})
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type, gzipped = self.server.exposition.get(
                self.headers.get("Accept", ""), self.headers.get("Accept-Encoding", ""))
            self._send(200, body, content_type, head, {"Content-Encoding": "gzip"} if gzipped else None)
        elif path == "/":
            page = LANDING_PAGE.format(version=__version__, ollama_url=html.escape(self.server.ollama_url), prefix="/")
            self._send(200, page.encode(), "text/html; charset=utf-8", head)
        elif path == "/-/healthy":
            self._send(200, b"OK\n", "text/plain; charset=utf-8", head)
        elif path == "/-/ready":
            ready = self.server.exposition.snapshot.ready
            self._send(200 if ready else 503, b"OK\n" if ready else b"waiting for the first poll\n",
                       "text/plain; charset=utf-8", head)
        else:
            self._send(404, b"404 page not found\n", "text/plain; charset=utf-8", head)

    def _send(self, status: int, body: bytes, content_type: str, head: bool,
              headers: Optional[dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature from the stdlib)
        log.debug("%s %s", self.address_string(), format % args)


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, exposition: Exposition, ollama_url: str = "",
                 web: Optional[WebConfig] = None):
        self.exposition = exposition
        self.ollama_url = ollama_url
        self.web = web or WebConfig()
        self.auth = BasicAuth(self.web.users) if self.web.users else None
        self._dual_stack = False
        if host == "":
            self.address_family, host, self._dual_stack = (
                (socket.AF_INET6, "::", True) if socket.has_dualstack_ipv6() else (socket.AF_INET, "0.0.0.0", False))
        else:
            self.address_family = _family_of(host, port)
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        if self._dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
        if self.web.tls:
            # The handshake runs on first read, in the request's own thread, never in the accept loop.
            self.socket = ssl_context(self.web).wrap_socket(self.socket, server_side=True,
                                                            do_handshake_on_connect=False)

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up or fails the TLS handshake is its own problem: log it, no traceback."""
        log.debug("connection from %s failed", client_address, exc_info=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="http", daemon=True)
        thread.start()
        return thread


def _family_of(host: str, port: int) -> socket.AddressFamily:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve listen address {host!r}: {exc}") from None

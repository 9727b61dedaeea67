"""The event-loop server in-process, with a minimal app: connection cap and eviction, deadlines,
pipelining, offloaded work never blocking other connections."""

from __future__ import annotations

import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import pytest
import requests

from ollama_exporter.config import Config
from ollama_exporter.exposition import Exposition
from ollama_exporter.server import Request, Response, Server, bind
from tests.test_metrics import rich_snapshot


class App:
    def __init__(self, **config):
        self.exposition = Exposition(runtime_metrics=False)
        self.exposition.update(rich_snapshot())
        self.config = replace(Config(), **config)
        self.web = None
        self.release = threading.Event()

    def healthy(self):
        return True, "OK"

    def ready(self):
        return True, "OK"

    def reload(self):
        return True, "reloaded"

    def probe(self, request: Request) -> Response:
        self.release.wait(5)  # a slow target
        return Response.text(200, "probed " + request.query.get("target", [""])[0])


@contextmanager
def serve_app(app: App = None) -> Iterator[int]:
    app = app or App()
    sock = bind("127.0.0.1", 0)
    server = Server(app, [sock])
    server.start()
    try:
        yield sock.getsockname()[1]
    finally:
        app.release.set()
        server.stop()


def test_past_the_cap_the_oldest_idle_connection_makes_room():
    app = App(web_max_connections=16)
    with serve_app(app) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        time.sleep(0.3)
        assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
        time.sleep(0.3)
        closed = 0
        for s in idle:
            try:
                closed += s.recv(1, socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                pass  # still open
            except OSError:
                closed += 1  # reset
            s.close()
        assert closed >= 40 - 16


def test_a_slow_probe_never_delays_a_scrape():
    app = App()
    with serve_app(app) as port:
        slow = threading.Thread(target=lambda: requests.get(f"http://127.0.0.1:{port}/probe?target=a", timeout=10))
        slow.start()
        time.sleep(0.2)
        started = time.monotonic()
        assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
        assert time.monotonic() - started < 0.5
        app.release.set()
        slow.join(5)


def test_pipelined_requests_are_answered_in_order():
    with serve_app() as port, socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(b"GET /-/healthy HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\nGET /-/ready HTTP/1.1\r\n"
                  b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    statuses = re.findall(rb"HTTP/1\.1 \d+ [^\r]*", data)
    assert statuses == [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 200 OK"]


def test_a_response_the_client_never_reads_is_dropped_at_the_write_deadline(monkeypatch):
    from ollama_exporter import server

    monkeypatch.setattr(server, "WRITE_TIMEOUT", 0.5)
    app = App()
    big = Exposition(runtime_metrics=False)
    app.exposition = big
    from ollama_exporter.snapshot import InstalledModel, ModelDetails
    many = tuple(InstalledModel(f"m{i}:1", "a" * 64, i, ModelDetails()) for i in range(20_000))
    big.update(replace(rich_snapshot(), installed=many))
    with serve_app(app) as port:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        time.sleep(1.5)  # never read: the server gives up on us
        s.settimeout(2)
        received = 0
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
        assert received < len(big.get().data)


def _big_app() -> App:
    import hashlib

    from ollama_exporter.snapshot import InstalledModel, ModelDetails

    app = App()
    many = tuple(InstalledModel(f"m{i}:1", hashlib.sha256(b"%d" % i).hexdigest(), i, ModelDetails())
                 for i in range(3000))
    app.exposition.update(replace(rich_snapshot(), installed=many))
    return app


def _read_response(s: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """(head, body, what followed) of one response with a Content-Length."""
    data = buffered
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    while len(rest) < length:
        chunk = s.recv(1 << 20)
        assert chunk, "connection closed before the body ended"
        rest += chunk
    return head, rest[:length], rest[length:]


def test_large_bodies_come_whole_from_the_memory_file_on_kept_alive_connections():
    app = _big_app()
    accept = b"Accept: application/openmetrics-text;version=1.0.0\r\nAccept-Encoding: gzip\r\n"
    with serve_app(app) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n" + accept + b"\r\n")
        _read_response(s)  # asks for the variant: it is rendered (with its file) in the background
        for _ in range(50):
            body = app.exposition.get(accept.split(b"\r\n")[0][8:].decode(), "gzip")
            if body.file is not None:
                break
            time.sleep(0.05)
        assert body.file is not None and len(body.data) > 32 * 1024
        left = b""
        for method in (b"GET", b"HEAD", b"GET"):
            s.sendall(method + b" /metrics HTTP/1.1\r\n" + accept + b"\r\n")
            head, got, left = _read_response(s, left) if method == b"GET" else (*_read_head(s, left), b"")
            assert b"Content-Encoding: gzip" in head and f"Content-Length: {len(body.data)}".encode() in head
            assert got == (body.data if method == b"GET" else b"")


def _read_head(s: socket.socket, buffered: bytes) -> tuple[bytes, bytes]:
    data = buffered
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert rest == b""  # a HEAD answer has no body
    return head, b""


def test_a_client_that_half_closes_after_its_request_still_gets_the_whole_answer():
    app = _big_app()
    with serve_app(app) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        _, body, _ = _read_response(s)
        assert body == app.exposition.get().data
        assert s.recv(1) == b""  # and then the server closes


def test_bursts_of_short_connections_are_all_answered_under_a_small_cap():
    """Accepting a whole backlog at once counted connections already answered and closed by their client
    against the cap, and evicted new ones before their request was read (resets under load)."""
    app = App(web_max_connections=32)
    failures = []

    def client(port: int) -> None:
        for _ in range(40):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"GET /-/healthy HTTP/1.1\r\n\r\n")
                    head, body, _ = _read_response(s)
                    if not head.startswith(b"HTTP/1.1 200") or body != b"OK\n":
                        failures.append(head)
            except OSError as exc:
                failures.append(exc)

    with serve_app(app) as port:
        threads = [threading.Thread(target=client, args=(port,)) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert failures == []


def test_a_repeated_request_head_is_parsed_once_and_never_shared_mutably():
    app = App()
    head = b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\nX-Scrape: 1\r\n\r\n"
    with serve_app(app) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        left = b""
        for _ in range(3):
            s.sendall(head)
            response, _, left = _read_response(s, left)
            assert response.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /metrics HTTP/1.1\r\nX-Bad : 1\r\n\r\n")  # not the same head: parsed, and refused
        response, _, _ = _read_response(s, left)
        assert response.startswith(b"HTTP/1.1 400")
    from ollama_exporter.server import _parse

    method, path, query, headers, version, length = _parse(head[:-4])
    assert (method, path, headers["x-scrape"], length) == ("GET", "/metrics", "1", 0)
    with pytest.raises(TypeError):
        headers["x-scrape"] = "2"  # shared by every request that repeats the head: read-only

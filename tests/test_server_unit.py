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

"""Hostile or unlucky clients must not take /metrics offline: idle and dribbling connection floods,
descriptor exhaustion, slow readers, oversized requests (issue 9). Loopback only, bounded in count and
time; each failed on the threaded server that came before."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import free_port, sample, wait_for

FAST = ("--poll.interval", "500ms", "--ollama.timeout", "500ms", "--no-probes.enabled")


@pytest.fixture(autouse=True)
def enough_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_many(port: int, count: int, dribble_for: float = 1.0) -> list[socket.socket]:
    """`count` connections opened at once, each sending a byte every 0.2 s for `dribble_for` seconds (so
    each is established, taken on by the server, and kept alive as the attack did)."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    dribble(socks, dribble_for)
    return socks


def dribble(socks: list[socket.socket], seconds: float, data: bytes = b"G") -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        for s in socks:
            try:
                s.send(data)
            except OSError:
                pass
        time.sleep(0.2)


def timed_scrape(url: str) -> float:
    started = time.monotonic()
    resp = requests.get(url + "/metrics", timeout=5)
    assert resp.status_code == 200 and sample(resp.text, "ollama_up") == 1
    return time.monotonic() - started


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


SYSTEMD_NOFILE = (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1])  # soft 1024, as systemd gives a service


def test_two_thousand_idle_connections_do_not_lock_scrapers_out(fake_ollama, exporter_factory):
    """1 024 idle connections used to take /metrics offline (0 of 5 scrapes succeeded)."""
    exp = exporter_factory("--ollama.url", fake_ollama.url, *FAST, nofile=SYSTEMD_NOFILE).wait_ready()
    socks = open_many(exp.port, 2000, dribble_for=0.5)
    try:
        times = [timed_scrape(exp.url) for _ in range(5)]
        assert max(times) < 1.0, times
    finally:
        close_all(socks)


def test_two_thousand_dribbling_connections_do_not_lock_scrapers_out(fake_ollama, exporter_factory):
    exp = exporter_factory("--ollama.url", fake_ollama.url, *FAST, nofile=SYSTEMD_NOFILE).wait_ready()
    socks = open_many(exp.port, 2000, dribble_for=2.0)
    try:
        for _ in range(3):  # keep dribbling a byte at a time while scraping, as the attack did
            assert timed_scrape(exp.url) < 1.0
            dribble(socks, 0.4)
    finally:
        close_all(socks)


def test_a_request_head_has_one_deadline_however_it_dribbles(monkeypatch):
    """The old 30 s timeout restarted on every byte, so a byte every 10 s held a connection for ever."""
    from ollama_exporter import server
    from tests.test_server_unit import serve_app

    monkeypatch.setattr(server, "HEAD_TIMEOUT", 0.6)
    with serve_app() as port:
        s = socket.create_connection(("127.0.0.1", port))
        started = time.monotonic()
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        closed = False
        while time.monotonic() - started < 3:
            try:
                s.sendall(b"X: y\r\n")
                if s.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        assert closed and time.monotonic() - started < 1.5


def test_descriptor_exhaustion_does_not_spin_and_scrapes_come_back(fake_ollama, tmp_path):
    """With the fd limit reached the accept loop used to spin at 60 % CPU."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollama_exporter", "--web.listen-address", f"127.0.0.1:{port}",
         "--ollama.url", fake_ollama.url, *FAST],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96)),
        stderr=open(tmp_path / "log", "w"), stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(url + "/-/ready", timeout=1).status_code == 200, message="ready")
        socks = open_many(port, 150, dribble_for=0.5)
        try:
            before = cpu_seconds(proc.pid)
            time.sleep(2)
            spent = cpu_seconds(proc.pid) - before
            assert spent < 0.3, f"{spent:.2f}s of CPU in 2s while flooded"
            assert wait_for(lambda: requests.get(url + "/metrics", timeout=2).status_code == 200, timeout=5,
                            message="a scrape through the flood")
        finally:
            close_all(socks)
    finally:
        proc.terminate()
        proc.wait(5)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def test_slow_readers_cost_no_copies_and_do_not_stall_others(fake_ollama, exporter_factory):
    for i in range(300):
        fake_ollama.add_model(f"model-{i}:latest")
    exp = exporter_factory("--ollama.url", fake_ollama.url, *FAST).wait_ready()
    wait_for(lambda: len(exp.metrics()) > 100_000, message="a large exposition")
    readers = []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", exp.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")  # ... and never read the answer
        readers.append(s)
    try:
        time.sleep(0.5)
        assert timed_scrape(exp.url) < 1.0
        rss = int(next(line for line in open(f"/proc/{exp.proc.pid}/status") if line.startswith("VmRSS")).split()[1])
        assert rss < 150_000, f"{rss} kB: response bodies copied per slow reader?"
    finally:
        close_all(readers)


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /metrics HTTP/1.1\r\n" + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
    (b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 150 + b"\r\n", b"400"),
    (b"POST /-/reload HTTP/1.1\r\nContent-Length: 9999999999999\r\n\r\n", b"400"),
    (b"POST /-/reload HTTP/1.1\r\nContent-Length: 100000\r\n\r\n", b"413"),
    (b"POST /-/reload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
    (b"GET /metrics HTTP/2.0\r\n\r\n", b"400"),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", b"400"),  # TLS to plain HTTP
])
def test_malformed_requests_get_a_quick_error(fake_ollama, exporter_factory, request_bytes, status):
    exp = exporter_factory("--ollama.url", fake_ollama.url, *FAST).wait_ready()
    with socket.create_connection(("127.0.0.1", exp.port), timeout=3) as s:
        s.sendall(request_bytes)
        answer = s.recv(200)
    assert answer.startswith(b"HTTP/1.1 " + status), answer
    assert timed_scrape(exp.url) < 1.0

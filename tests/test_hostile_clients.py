"""Hostile or unlucky clients must not take /metrics offline: idle and dribbling connection floods,
descriptor exhaustion, slow readers, oversized requests (issue 9). Loopback only, bounded in count and
time; each failed on the threaded server that came before."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.conftest import cpu_seconds, free_port, rss_kb, sample, terminate, wait_for

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
        terminate(proc)



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
        rss = rss_kb(exp.proc.pid)
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


# --- odd HTTP from clients: one exporter for all of these cheap cases ---

@pytest.fixture(scope="module")
def shared():
    from tests.conftest import Exporter
    from tests.fakes.ollama import FakeOllama

    with FakeOllama() as fake:
        fake.add_model("qwen3:8b")
        exp = Exporter("--ollama.url", fake.url, *FAST).wait_ready()
        try:
            yield exp
        finally:
            exp.stop()


def exchange(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send `request`, then read until the server closes (every case here ends with a close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        try:
            while data := s.recv(65536):
                chunks.append(data)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def statuses(answer: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)


@pytest.mark.parametrize("request_bytes", [
    b"POST /-/reload HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # CL.TE
    b"GET /-/healthy HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\n",  # two lengths
    b"GET /-/healthy HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
    b"GET /-/healthy HTTP/1.1\r\nContent-Length : 3\r\n\r\nabc",  # space before the colon
    b"GET /-/healthy HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
    b"GET /-/healthy HTTP/1.1\r\nX-A: a\r\n folded\r\n\r\n",  # obsolete line folding
    b"GET  /-/healthy HTTP/1.1\r\n\r\n",  # two spaces in the request line
    b"GET /-/healthy HTTP/1.1 extra\r\n\r\n",
])
def test_smuggling_attempts_get_400_and_a_close_and_nothing_after_them_is_answered(shared, request_bytes):
    answer = exchange(shared.port, request_bytes + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(answer) == [b"400"], answer[:300]
    assert b"Connection: close" in answer


def test_a_request_hidden_in_a_body_is_not_answered(shared):
    hidden = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = exchange(shared.port, b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                      b"GET /-/ready HTTP/1.1\r\nConnection: close\r\n\r\n" % (len(hidden), hidden))
    assert statuses(answer) == [b"200", b"200"]


@pytest.mark.parametrize("request_bytes, expected", [
    (b"OPTIONS /metrics HTTP/1.1\r\n\r\n", b"405"),
    (b"TRACE / HTTP/1.1\r\n\r\n", b"405"),
    (b"PUT /metrics HTTP/1.1\r\n\r\n", b"405"),
    (b"DELETE /-/reload HTTP/1.1\r\n\r\n", b"405"),
    (b"get /metrics HTTP/1.1\r\n\r\n", b"405"),  # methods are case-sensitive
    (b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n", b"404"),  # no proxying
    (b"GET http://127.0.0.1:9/metrics HTTP/1.1\r\n\r\n", b"404"),  # absolute form: no proxying either
    (b"GET /metrics HTTP/1.0\r\n\r\n", b"200"),  # HTTP/1.0, no Host
    (b"GET /metrics?" + b"&".join(b"a%d=1" % i for i in range(30)) + b" HTTP/1.1\r\n\r\n", b"400"),
    (b"X" * 20_000 + b" /metrics HTTP/1.1\r\n\r\n", b"431"),
    (b"GET /%00%ff/../metrics HTTP/1.1\r\n\r\n", b"404"),  # no decoding, no path walking
])
def test_odd_methods_targets_and_versions(shared, request_bytes, expected):
    answer = exchange(shared.port, request_bytes.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
    assert statuses(answer) == [expected], answer[:300]
    if expected == b"405":
        assert b"\r\nAllow: " in answer


def test_a_request_head_longer_than_one_read_is_answered(shared):
    """Heads up to 16 KiB are legal; the server reads 8 KiB at a time, so this one arrives in pieces."""
    big = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 12_000 + b"\r\nConnection: close\r\n\r\n"
    assert statuses(exchange(shared.port, big)) == [b"200"]


@pytest.mark.parametrize("accept, accept_encoding, content_type, gzipped", [
    ("application/openmetrics-text; version=1.0.0x", "", "text/plain; version=0.0.4", False),  # dropped before
    (",".join(f"application/openmetrics-text;version=1.0.{i}" for i in range(1, 300)), "", "text/plain", False),
    ("application/openmetrics-text;q=nan, text/plain;q=0.5", "gzip;q=nan", "text/plain", False),
    ("text/plain;q=0.1, application/openmetrics-text;q=1e999", "gzip;q=1e999", "application/openmetrics-text",
     True),
    ("*/*", "gzip;q=0, identity", "text/plain", False),  # gzip;q=0 is a no
    ("a" * 8000, "b" * 8000, "text/plain", False),
])
def test_absurd_accept_headers_map_onto_the_fixed_formats(shared, accept, accept_encoding, content_type, gzipped):
    headers = {"Accept": accept, "Accept-Encoding": accept_encoding}
    assert requests.get(shared.url + "/metrics", headers=headers, timeout=2).status_code == 200
    time.sleep(0.3)  # a variant asked for the first time is rendered in the background, then served
    resp = requests.get(shared.url + "/metrics", headers=headers, timeout=2)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith(content_type)
    assert (resp.headers.get("Content-Encoding") == "gzip") is gzipped
    assert sample(resp.text.replace("# EOF\n", ""), "ollama_up") == 1



def test_two_thousand_distinct_query_strings_leave_nothing_behind(shared):
    session = requests.Session()
    session.get(shared.url + "/metrics", timeout=2)
    before = rss_kb(shared.proc.pid)
    lengths = set()
    for i in range(2000):
        resp = session.get(f"{shared.url}/metrics?cache_buster={i}&x={'y' * (i % 50)}", timeout=2)
        assert resp.status_code == 200
        lengths.add(len(resp.content) // 10_000)
    assert len(lengths) <= 2  # the same exposition, whatever the query
    assert rss_kb(shared.proc.pid) - before < 5_000


def test_ten_thousand_pipelined_requests_never_read_are_cut_off(shared):
    s = socket.create_connection(("127.0.0.1", shared.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    before = rss_kb(shared.proc.pid)
    try:
        s.settimeout(5)
        try:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 10_000)  # 330 KB, answers never read
        except (ConnectionResetError, BrokenPipeError):
            pass  # cut off while still sending
        assert timed_scrape(shared.url) < 1.0
        assert rss_kb(shared.proc.pid) - before < 10_000
    finally:
        s.close()


def test_connection_churn_leaks_no_descriptors(shared):
    fds = len(os.listdir(f"/proc/{shared.proc.pid}/fd"))
    for _ in range(3000):
        socket.create_connection(("127.0.0.1", shared.port)).close()
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", shared.port)) as s:
            s.sendall(b"GET /-/healthy HTTP/1.1\r\n")  # half a request, then gone
    wait_for(lambda: len(os.listdir(f"/proc/{shared.proc.pid}/fd")) <= fds + 2, timeout=5,
             message="descriptors back to where they were")


def test_the_soft_descriptor_limit_is_raised_at_start(fake_ollama, exporter_factory):
    exp = exporter_factory("--ollama.url", fake_ollama.url, *FAST, nofile=SYSTEMD_NOFILE).wait_ready()
    line = next(line for line in open(f"/proc/{exp.proc.pid}/limits") if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert int(soft) == int(hard) == SYSTEMD_NOFILE[1], line


def test_a_burst_of_connections_waits_in_a_real_backlog_while_the_loop_is_busy():
    """The listen backlog was 5: 50 new connections at once got SYN retries after 1 s and 3 s. Here the
    event loop is held for a second (no accept() at all) while 300 clients connect: every handshake
    completes at once, in the kernel's accept queue."""
    import select

    from tests.test_server_unit import App, serve_app

    app = App()
    hold = threading.Event()
    app.ready = lambda: (hold.wait(1.5), (True, "OK"))[1]  # runs on the event loop: it blocks accept()
    with serve_app(app) as port:
        blocker = socket.create_connection(("127.0.0.1", port))
        blocker.sendall(b"GET /-/ready HTTP/1.1\r\n\r\n")
        time.sleep(0.2)
        socks = []
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        try:
            deadline = time.monotonic() + 0.8  # under the first SYN retry (1 s)
            pending = set(socks)
            while pending and time.monotonic() < deadline:
                _, writable, _ = select.select([], list(pending), [], 0.05)
                pending -= {s for s in writable if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0}
            assert not pending, f"{len(pending)} of 300 connections not established while accept() was held"
        finally:
            hold.set()
            close_all(socks)
            blocker.close()


def test_a_body_that_dribbles_is_cut_off_at_the_head_deadline(monkeypatch):
    from ollama_exporter import server
    from tests.test_server_unit import serve_app

    monkeypatch.setattr(server, "HEAD_TIMEOUT", 0.6)
    with serve_app() as port:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /-/reload HTTP/1.1\r\nContent-Length: 4000\r\n\r\n")
        started = time.monotonic()
        dribble([s], 2.0, b"x")
        s.settimeout(1)
        try:
            assert s.recv(100) == b""  # closed, nothing answered
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 2.5
        s.close()


def test_bare_lf_line_endings_get_no_answer_and_are_closed_at_the_head_deadline(monkeypatch):
    """Prometheus and every HTTP/1.1 client send CRLF; a head that never ends in CRLFCRLF is dropped."""
    from ollama_exporter import server
    from tests.test_server_unit import serve_app

    monkeypatch.setattr(server, "HEAD_TIMEOUT", 0.5)
    with serve_app() as port, socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(b"GET /metrics HTTP/1.1\nHost: x\n\n")
        started = time.monotonic()
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 1.5

"""The HTTP server as Prometheus users expect it: paths, listen addresses, headers, HEAD, keep-alive."""

from __future__ import annotations

import socket

import requests

from tests.conftest import free_port, sample

FAST = ("--poll.interval", "200ms", "--ollama.timeout", "500ms")


def raw(port: int, request: bytes, host: str = "127.0.0.1") -> bytes:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(request)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def test_telemetry_path_several_listen_addresses_and_no_exporter_metrics(fake_ollama, exporter_factory):
    second = free_port()
    exp = exporter_factory("--ollama.url", fake_ollama.url, *FAST, "--web.listen-address", f"127.0.0.1:{second}",
                           "--web.telemetry-path", "/ollama/metrics", "--web.disable-exporter-metrics").wait_ready()
    for port in (exp.port, second):
        text = requests.get(f"http://127.0.0.1:{port}/ollama/metrics", timeout=2).text
        assert sample(text, "ollama_up") == 1
        assert "process_resident_memory_bytes" not in text and "python_info" not in text
    assert requests.get(exp.url + "/metrics", timeout=2).status_code == 404
    assert 'href="/ollama/metrics"' in requests.get(exp.url + "/", timeout=2).text


def test_env_vars_configure_the_daemon(fake_ollama, exporter_factory):
    exp = exporter_factory(env={"OLLAMA_EXPORTER_OLLAMA_URL": fake_ollama.url,
                                "OLLAMA_EXPORTER_WEB_TELEMETRY_PATH": "/m",
                                "OLLAMA_EXPORTER_LOG_FORMAT": "json"}).wait_ready()
    assert sample(requests.get(exp.url + "/m", timeout=2).text, "ollama_up") == 1
    exp.log_format = "json"
    assert any(r["msg"] == "ollama-exporter started" for r in exp.log_records())


def test_no_server_version_is_disclosed_and_the_password_is_masked(fake_ollama, exporter_factory):
    url = fake_ollama.url.replace("http://", "http://admin:hunter2@")
    exp = exporter_factory("--ollama.url", url, *FAST).wait_ready()
    resp = requests.get(exp.url + "/", timeout=2)
    assert "Server" not in resp.headers
    assert "hunter2" not in resp.text and "admin:xxxxx@" in resp.text
    started = next(r for r in exp.log_records() if r["msg"] == "ollama-exporter started")
    assert started["url"].startswith("http://admin:xxxxx@") and "hunter2" not in exp.logs()


def test_head_keep_alive_pipelining_and_connection_close(fake_ollama, exporter_factory):
    exp = exporter_factory("--ollama.url", fake_ollama.url, *FAST).wait_ready()
    head = raw(exp.port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")  # headers only
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert length > 1000
    two = raw(exp.port, b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\nGET /-/ready HTTP/1.1\r\nHost: x\r\n"
                        b"Connection: close\r\n\r\n")
    assert two.count(b"HTTP/1.1 200 OK") == 2 and two.endswith(b"OK\n")
    http10 = raw(exp.port, b"GET /-/healthy HTTP/1.0\r\n\r\n")  # HTTP/1.0 closes by default
    assert http10.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in http10
    bad = raw(exp.port, b"GARBAGE\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400 Bad Request")

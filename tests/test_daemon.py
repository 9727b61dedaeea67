"""The real `ollama-exporter` process end to end: HTTP routes, outages, recovery, shutdown, --once."""

from __future__ import annotations

import gzip
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import sample, wait_for

FAST = ("--poll.interval", "200ms", "--ollama.timeout", "500ms")


def test_once_prints_valid_exposition_with_the_core_metrics(fake_ollama, promtool):
    fake_ollama.add_model("qwen3:8b", family="qwen3", capabilities=["completion", "tools"])
    fake_ollama.load("qwen3:8b", size_vram=3_000_000_000)
    result = subprocess.run([sys.executable, "-m", "ollama_exporter", "--once", "--ollama.url", fake_ollama.url],
                            capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("ollama_up", "ollama_build_info", "ollama_model_info", "ollama_model_size_bytes",
                 "ollama_model_context_length", "ollama_model_parameters", "ollama_model_capability",
                 "ollama_loaded_model_size_bytes", "ollama_loaded_model_vram_bytes",
                 "ollama_loaded_model_expiry_timestamp_seconds", "ollama_loaded_model_context_length",
                 "ollama_model_loads_total", "ollama_model_unloads_total", "ollama_exporter_build_info",
                 "ollama_exporter_source_up", "ollama_exporter_source_duration_seconds",
                 "ollama_exporter_source_last_success_timestamp_seconds", "ollama_exporter_source_errors_total"):
        assert f"\n{name}{{" in out or f"\n{name} " in out, f"{name} missing from --once output"
    assert sample(out, "ollama_up") == 1
    assert sample(out, "ollama_loaded_model_vram_bytes", model="qwen3:8b") == 3_000_000_000
    check = subprocess.run([promtool, "check", "metrics"], input=out, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout == "" and check.stderr == "", check


def test_once_uses_ollama_host_when_no_url_is_given(fake_ollama):
    result = subprocess.run([sys.executable, "-m", "ollama_exporter", "--once"], capture_output=True, text=True,
                            timeout=30, env={"PATH": "/usr/bin:/bin", "OLLAMA_HOST": f"0.0.0.0:{fake_ollama.port}"})
    assert sample(result.stdout, "ollama_up") == 1
    assert fake_ollama.count("/api/version") == 1


def test_routes_landing_health_readiness_and_negotiated_metrics(fake_ollama, exporter_factory):
    exp = exporter_factory("--ollama.url", fake_ollama.url, *FAST).wait_ready()
    landing = requests.get(exp.url + "/", timeout=2)
    assert landing.status_code == 200 and 'href="/metrics"' in landing.text
    assert requests.get(exp.url + "/-/healthy", timeout=2).status_code == 200
    assert requests.get(exp.url + "/nope", timeout=2).status_code == 404

    plain = requests.get(exp.url + "/metrics", headers={"Accept-Encoding": "identity"}, timeout=2)
    assert plain.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "Content-Encoding" not in plain.headers and sample(plain.text, "ollama_up") == 1
    # A variant asked for the first time is rendered in the background (never on the scrape path); until
    # then the scrape gets a variant it also accepts.
    zipped = wait_for(lambda: (r := requests.get(exp.url + "/metrics", headers={"Accept-Encoding": "gzip"},
                                                 timeout=2, stream=True)).headers.get("Content-Encoding") and r,
                      timeout=3, message="a gzipped body")
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert b"ollama_up 1.0" in gzip.decompress(zipped.raw.read(decode_content=False))
    om_accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    om = wait_for(lambda: (r := requests.get(exp.url + "/metrics", headers=om_accept, timeout=2)).headers[
        "Content-Type"].startswith("application/openmetrics-text") and r, timeout=3, message="OpenMetrics")
    assert om.text.endswith("# EOF\n")
    assert "process_resident_memory_bytes" in plain.text  # the exporter's own process metrics too


def test_not_ready_until_the_first_poll_finishes(fake_ollama, exporter_factory):
    fake_ollama.set_fault("*", "delay", seconds=1.5)
    exp = exporter_factory("--ollama.url", fake_ollama.url, "--ollama.timeout", "5s")
    wait_for(lambda: requests.get(exp.url + "/-/healthy", timeout=1).status_code == 200, message="healthy")
    assert requests.get(exp.url + "/-/ready", timeout=1).status_code == 503
    assert sample(exp.metrics(), "ollama_up") == 0  # served before the first poll, without waiting for it
    exp.wait_ready()
    assert sample(exp.metrics(), "ollama_up") == 1


def test_unloaded_model_series_vanish_within_one_poll(fake_ollama, exporter_factory):
    fake_ollama.add_model("llama3.2:3b")
    fake_ollama.load("llama3.2:3b")
    exp = exporter_factory("--ollama.url", fake_ollama.url, *FAST).wait_ready()
    assert sample(exp.metrics(), "ollama_loaded_model_size_bytes", model="llama3.2:3b") == 4_920_000_000
    fake_ollama.unload("llama3.2:3b")
    text = wait_for(lambda: (t := exp.metrics()) and sample(t, "ollama_model_unloads_total", model="llama3.2:3b")
                    == 1 and t, timeout=3, message="unload counted")
    assert sample(text, "ollama_loaded_model_size_bytes", model="llama3.2:3b") is None
    assert sample(text, "ollama_model_size_bytes", model="llama3.2:3b") == 4_920_000_000  # still installed


def test_hung_ollama_never_slows_metrics(fake_ollama, exporter_factory):
    fake_ollama.add_model("m:1")
    exp = exporter_factory("--ollama.url", fake_ollama.url, *FAST).wait_ready()
    fake_ollama.set_fault("*", "hang")
    wait_for(lambda: sample(exp.metrics(), "ollama_up") == 0, timeout=5, message="ollama_up 0 after the timeout")
    worst = 0.0
    for _ in range(100):
        started = time.monotonic()
        resp = requests.get(exp.url + "/metrics", timeout=2)
        worst = max(worst, time.monotonic() - started)
        assert resp.status_code == 200
    assert worst < 0.1, f"slowest /metrics took {worst * 1000:.0f} ms while Ollama hung"
    text = exp.metrics()
    assert sample(text, "ollama_exporter_source_up", source="ps") == 0
    assert sample(text, "ollama_exporter_source_errors_total", source="ps", reason="timeout") >= 1
    assert sample(text, "ollama_model_size_bytes", model="m:1") == 4_920_000_000  # stale inventory stays
    fake_ollama.clear_faults()
    wait_for(lambda: sample(exp.metrics(), "ollama_up") == 1, timeout=5, message="recovery after the hang")


def test_refused_connections_keep_the_daemon_running_and_it_recovers(fake_ollama, exporter_factory):
    exp = exporter_factory("--ollama.url", fake_ollama.url, *FAST).wait_ready()
    fake_ollama.refuse_connections()
    wait_for(lambda: sample(exp.metrics(), "ollama_exporter_source_errors_total", source="version",
                            reason="connection") >= 3, timeout=5, message="connection errors counted")
    assert exp.proc.poll() is None and sample(exp.metrics(), "ollama_up") == 0
    fake_ollama.accept_connections()
    wait_for(lambda: sample(exp.metrics(), "ollama_up") == 1, timeout=5, message="recovery")


def test_ollama_down_at_startup_is_not_fatal(exporter_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    exp = exporter_factory("--ollama.url", dead, *FAST).wait_ready()
    text = exp.metrics()
    assert sample(text, "ollama_up") == 0 and "ollama_build_info{" not in text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_within_two_seconds_even_while_ollama_hangs(fake_ollama, exporter_factory, sig):
    exp = exporter_factory("--ollama.url", fake_ollama.url, "--poll.interval", "200ms",
                           "--ollama.timeout", "30s").wait_ready()
    fake_ollama.set_fault("*", "hang")
    time.sleep(0.5)  # a poll is now stuck inside a 30 s call
    started = time.monotonic()
    exp.proc.send_signal(sig)
    code = exp.proc.wait(5)
    assert time.monotonic() - started < 2.0
    assert code == 0
    assert "Traceback" not in exp.logs()


def test_ipv6_listen_address(fake_ollama, exporter_factory):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured on this machine")
    exp = exporter_factory("--ollama.url", fake_ollama.url, *FAST, host="::1").wait_ready()
    assert sample(exp.metrics(), "ollama_up") == 1


def test_all_interfaces_listens_on_ipv4_and_ipv6(fake_ollama, exporter_factory):
    exp = exporter_factory("--ollama.url", fake_ollama.url, *FAST, host="")
    port = exp.port
    exp.url = f"http://127.0.0.1:{port}"
    exp.wait_ready()
    if socket.has_dualstack_ipv6():
        assert requests.get(f"http://[::1]:{port}/-/healthy", timeout=2).status_code == 200


def test_port_in_use_is_a_clear_error(fake_ollama):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "ollama_exporter", "--ollama.url", fake_ollama.url,
                                 "--web.listen-address", f"127.0.0.1:{port}"], capture_output=True, text=True,
                                timeout=30)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_shutdown_is_not_held_up_by_a_probe_in_flight(fake_ollama, exporter_factory):
    fake_ollama.add_model("slow:1")
    fake_ollama.load("slow:1", keep_alive=-1)
    fake_ollama.set_timing(ttft=30.0)  # the probe will be mid-stream when the signal arrives
    exp = exporter_factory("--ollama.url", fake_ollama.url, "--poll.interval", "200ms",
                           "--probes.interval", "500ms").wait_ready()
    wait_for(lambda: fake_ollama.count("/api/generate") >= 1, timeout=5, message="a probe in flight")
    started = time.monotonic()
    exp.proc.send_signal(signal.SIGTERM)
    assert exp.proc.wait(5) == 0
    assert time.monotonic() - started < 2.0

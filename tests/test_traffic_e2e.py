"""Real traffic end to end: the fake Ollama writes gin's access line for every request it serves, fake
runners answer /slots, the real exporter follows the log (file, journal or stdin), and a real Prometheus
scrapes it. The exporter is restarted mid-stream and the log rotated while it is down: every request is
counted exactly once, and the exporter's own probes and polls never count as user traffic."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time

import pytest
import requests

from ollama_exporter.exposition import render
from ollama_exporter.logfollow import LogFollower
from ollama_exporter.logsources import FileSource
from ollama_exporter.ollama import OllamaClient
from ollama_exporter.poller import Poller
from ollama_exporter.runner_slots import RunnerSample, RunnersState, RunnerSource, Slot
from ollama_exporter.snapshot import Snapshot
from ollama_exporter.traffic import LAG_SECONDS, TrafficStats
from tests.conftest import Exporter, free_port, sample, wait_for
from tests.fakes.journalctl import FakeJournal
from tests.fakes.llama_server import FakeLlamaServer
from tests.fakes.ollama import FakeOllama
from tests.fakes.ollama_log import GinAccessLog, LogFile, gin_line, load_lines, request_lines
from tests.prometheus import Prometheus

OWN = "192.0.2.1"
BLOB = secrets.token_hex(32)  # this session's: the runners source sees every process of the machine
MODEL = "qwen3:8b"
FAST = ("--poll.interval", "500ms", "--ollama.timeout", "2s")


def user_request(fake: FakeOllama, n: int = 1) -> None:
    for _ in range(n):
        resp = requests.post(fake.url + "/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False,
                                                                "options": {"num_predict": 2}}, timeout=10)
        assert resp.status_code == 200


def counted(exp: Exporter, route: str = "/api/generate", code: str = "200") -> float:
    return sample(exp.metrics(), "ollama_http_requests_total", route=route, method="POST", code=code) or 0.0


@pytest.fixture
def ollama(tmp_path):
    log = LogFile(tmp_path / "ollama" / "server.log")
    fake = FakeOllama().start()
    fake.access_log = GinAccessLog(log)
    fake.add_model(MODEL, blob_digest=BLOB)
    fake.load(MODEL, keep_alive=-1, context_length=4096)
    fake.set_timing(ttft=0.01, token_gap=0.001, tokens=2)
    runner = FakeLlamaServer(BLOB, n_slots=2).start()
    yield fake, log, runner
    fake.stop()
    runner.stop()


def test_file_source_through_prometheus_with_restart_rotation_probes_and_a_burst(ollama, tmp_path):
    fake, log, runner = ollama
    state = tmp_path / "state" / "logs-state.json"
    state.parent.mkdir()
    args = ("--ollama.url", fake.url, *FAST, "--probes.interval", "300ms", "--logs.source", "file",
            "--logs.path", str(log.path), "--logs.state-file", str(state))
    exp = Exporter(*args).wait_ready()
    prom = Prometheus(tmp_path / "prom", [{"job_name": "ollama",
                                           "static_configs": [{"targets": [f"127.0.0.1:{exp.port}"]}]}])
    try:
        wait_for(lambda: sample(exp.metrics(), "ollama_exporter_source_up", source="logs") == 1,
                 message="logs source up")
        # the runner loads, then users send requests while the exporter's probes run
        log.write(load_lines(BLOB, runner.port, MODEL, seconds=4.2, runners=1))
        user_request(fake, 5)
        log.write(request_lines(0, 1, prompt_tokens=120, cached=100, generated=30))
        runner.busy(1, task=9, prompt_tokens=50, decoded=5)
        wait_for(lambda: counted(exp) == 5, message="5 user requests")
        wait_for(lambda: (sample(exp.metrics(), "ollama_http_exporter_requests_total", route="/api/generate",
                                 code="200") or 0) >= 2, message="the exporter's own probes in the log")
        text = exp.metrics()
        assert sample(text, "ollama_request_generated_tokens_total", model=MODEL) == 30
        assert sample(text, "ollama_request_prompt_tokens_total", model=MODEL, cache="hit") == 100
        assert sample(text, "ollama_model_load_duration_seconds_count", model=MODEL) == 1
        assert sample(text, "ollama_runner_slots", model=MODEL) == 2
        assert sample(text, "ollama_runner_slots_busy", model=MODEL) == 1
        assert sample(text, "ollama_runner_slot_context_used_tokens", model=MODEL, slot="1") == 55
        assert sample(text, "ollama_http_requests_total", route="/api/ps", method="GET", code="200") is None
        assert sample(text, "ollama_exporter_log_lines_total", result="malformed") == 0

        exp.stop()  # a restart mid-stream, with Ollama restarting too (the app renames its log)
        user_request(fake, 3)
        log.rotate_rename()
        user_request(fake, 4)
        exp = Exporter(*args, port=exp.port).wait_ready()
        assert counted(exp) >= 5  # the counters go on from where they were, never from zero
        wait_for(lambda: counted(exp) == 12, message="12 user requests")

        # a burst of 10 000 lines in about a second
        for _ in range(10):
            log.write([gin_line(200, 0.01, "10.0.0.7", "POST", "/v1/chat/completions")] * 1000)
            time.sleep(0.1)
        wait_for(lambda: sample(exp.metrics(), "ollama_http_requests_total", route="/v1/chat/completions",
                                method="POST", code="200") == 10000, timeout=20, message="the burst counted")
        time.sleep(1.0)
        assert counted(exp) == 12

        # what Prometheus recorded: no reset across the restart, and every request once
        wait_for(lambda: prom.query('ollama_http_requests_total{route="/v1/chat/completions"} == 10000'),
                 timeout=15, message="Prometheus scraped the burst")
        assert [r["value"][1] for r in prom.query('ollama_http_requests_total{route="/api/generate"}')] == ["12"]
        assert [r["value"][1] for r in prom.query('resets(ollama_http_requests_total{route="/api/generate"}[5m])')] \
            == ["0"]
        own = prom.query('ollama_http_exporter_requests_total{route="/api/generate"}')
        assert own and float(own[0]["value"][1]) >= 2
    finally:
        prom.stop()
        exp.stop()
    assert not [r for r in runner.requests if r != ("GET", "/props") and r != ("GET", "/slots")]


def test_journald_source_resumes_after_its_cursor(tmp_path):
    journal = FakeJournal(tmp_path / "journal.jsonl")
    env = journal.env(tmp_path / "bin")
    state = tmp_path / "logs-state.json"
    with FakeOllama() as fake:
        args = ("--ollama.url", fake.url, *FAST, "--no-probes.enabled", "--logs.source", "journald",
                "--logs.unit", "ollama", "--logs.state-file", str(state))
        exp = Exporter(*args, env=env).wait_ready()
        try:
            wait_for(lambda: sample(exp.metrics(), "ollama_exporter_source_up", source="logs") == 1,
                     message="logs source up")
            journal.extend(gin_line(200, 0.5, "127.0.0.1", "POST", "/api/chat") for _ in range(7))
            journal.append(gin_line(200, 0.5, "127.0.0.1", "POST", "/api/chat"), unit="other.service")
            wait_for(lambda: counted(exp, "/api/chat") == 7, message="7 requests")
            exp.stop()
            journal.extend(gin_line(503, 0.04, "127.0.0.1", "POST", "/api/chat") for _ in range(2))
            exp = Exporter(*args, env=env).wait_ready()
            wait_for(lambda: counted(exp, "/api/chat", "503") == 2, message="2 requests written while down")
            time.sleep(0.5)
            assert counted(exp, "/api/chat") == 7
        finally:
            exp.stop()


def test_journal_without_permission_is_reported(tmp_path):
    journal = FakeJournal(tmp_path / "journal.jsonl")
    env = {**journal.env(tmp_path / "bin"), "FAKE_JOURNAL_DENIED": "1"}
    with FakeOllama() as fake:
        exp = Exporter("--ollama.url", fake.url, *FAST, "--no-probes.enabled", "--logs.source", "journald",
                       env=env).wait_ready()
        try:
            wait_for(lambda: sample(exp.metrics(), "ollama_exporter_source_errors_total", source="logs",
                                    reason="no_permission"), message="no_permission reported")
            assert sample(exp.metrics(), "ollama_exporter_source_up", source="logs") == 0
            assert sample(exp.metrics(), "ollama_up") == 1  # the rest of the exporter is unaffected
        finally:
            exp.stop()


def test_stdin_source(tmp_path):
    with FakeOllama() as fake:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "ollama_exporter", "--web.listen-address", f"127.0.0.1:{port}",
                                 "--ollama.url", fake.url, *FAST, "--no-probes.enabled", "--logs.source", "stdin"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            wait_for(lambda: requests.get(url, timeout=1).ok, message="exporter up")
            proc.stdin.write(("\n".join(gin_line(404, 0.001, "127.0.0.1", "GET", "/api/generate")
                                        for _ in range(3)) + "\n").encode())
            proc.stdin.flush()
            wait_for(lambda: sample(requests.get(url, timeout=1).text, "ollama_http_requests_total",
                                    route="/api/generate", method="GET", code="404") == 3, message="3 requests")
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.mark.parametrize("args, message", [
    (["--logs.source", "file"], "logs.path: required when logs.source is file"),
    (["--logs.source", "command"], "logs.command: required when logs.source is command"),
    (["--logs.source", "syslog"], "logs.source: invalid value 'syslog'"),
    (["--probes.forwarded-for", "probe"], "probes.forwarded_for: invalid value 'probe': expected an IP address"),
    (["--runners.enabled", "sometimes"], "runners.enabled: invalid value 'sometimes'"),
    (["--logs.source", "command", "--logs.command", "docker logs 'unterminated"], "logs.command: invalid command"),
])
def test_bad_settings_exit_2_with_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "ollama_exporter", "--once", *args], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_logs_config_from_a_file(tmp_path):
    from ollama_exporter.config import build_config

    cfg = tmp_path / "c.yml"
    cfg.write_text("logs:\n  source: command\n  command: [docker, logs, -f, ollama]\nrunners:\n  enabled: false\n")
    config = build_config(str(cfg), environ={})
    assert (config.logs_source, config.logs_command, config.runners_enabled) == \
        ("command", ("docker", "logs", "-f", "ollama"), "false")
    assert config.probes_forwarded_for == OWN


def test_slots_join_through_the_poller(tmp_path):
    """Two runners loaded: a request seen in flight on one runner's /slots gets that runner's model."""
    other_blob, other = secrets.token_hex(32), "llama3.1:8b"
    log = LogFile(tmp_path / "server.log")
    with FakeOllama() as fake:
        for name, blob in ((MODEL, BLOB), (other, other_blob)):
            fake.add_model(name, blob_digest=blob)
            fake.load(name, keep_alive=-1)
        first, second = FakeLlamaServer(BLOB).start(), FakeLlamaServer(other_blob).start()
        follower = LogFollower(FileSource(str(log.path), poll_interval=0.02), TrafficStats(OWN), None,
                               commit_interval=0.05).start()
        try:
            poller = Poller(OllamaClient(fake.url, 2.0), 1.0, logs=follower, runner_source=RunnerSource(1.0))
            poller.poll_once()  # names and blobs known
            wait_for(lambda: follower.status().up, message="follower reading")
            log.write(load_lines(BLOB, first.port, MODEL, runners=1) + load_lines(other_blob, second.port, other,
                                                                                   runners=2))
            lines = request_lines(0, 5, generated=21)
            log.write(lines[:6])
            second.busy(0, task=5)
            time.sleep(0.2)  # launched before the poll starts
            snapshot = poller.poll_once()
            assert snapshot.runners.in_flight() == {(0, 5): other}
            time.sleep(LAG_SECONDS + 0.3)  # the follower catches up past the poll
            log.write(lines[6:] + request_lines(0, 6, generated=4))
            wait_for(lambda: sum(follower.value().generated_tokens.values()) == 25, message="tokens counted")
            time.sleep(0.1)
            assert poller.poll_once().traffic.generated_tokens == {other: 21, "_unattributed": 4}
        finally:
            follower.stop()
            first.stop()
            second.stop()


def test_traffic_and_runner_metrics_pass_promtool_and_openmetrics(promtool):
    stats = TrafficStats(OWN)
    stats.feed_many(line.encode() for line in load_lines(BLOB, 40001, MODEL) + request_lines(0, 1) +
                    [gin_line(200, 1.5), gin_line(499, 3.0, path="/v1/chat/completions?x=1"),
                     gin_line(200, 0.01, OWN, "GET", "/api/ps"), "garbage [GIN] x"])
    runners = RunnersState((RunnerSample(MODEL, 1, 40001, "llama-server", 2, 1,
                                         (Slot(0, 4096, True, 3, 120), Slot(1, 4096, False, None, 0))),), True, True)
    snapshot = Snapshot(timestamp=1.0, ready=True, up=True, version="0.32.15", installed=(), loaded=(), sources=(),
                        traffic=stats.value(), runners=runners)
    text, _ = render(snapshot)
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert check.returncode == 0 and check.stdout == b"" and check.stderr == b"", check
    body, _ = render(snapshot, "application/openmetrics-text; version=1.0.0")
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

    names = {f.name for f in om_parse(body.decode())}
    assert {"ollama_http_requests", "ollama_http_request_duration_seconds", "ollama_runner_slots_busy",
            "ollama_request_generated_tokens", "ollama_exporter_log_lines"} <= names
    decoded = text.decode()
    assert sample(decoded, "ollama_http_client_disconnects_total", stage="scheduling_or_load") == 1
    assert sample(decoded, "ollama_http_requests_total", route="/v1/chat/completions", method="POST",
                  code="499") == 1
    assert sample(decoded, "ollama_exporter_log_lines_total", result="malformed") == 1
    assert "x=1" not in decoded and OWN not in decoded  # no query strings, no client addresses


def test_reload_starts_switches_and_stops_the_logs_source(tmp_path):
    """SIGHUP with other logs.* settings: the old follower checkpoints, the new one starts from its state."""
    import signal

    import yaml

    first, second = LogFile(tmp_path / "a.log"), LogFile(tmp_path / "b.log")
    config = tmp_path / "config.yml"
    state = str(tmp_path / "logs-state.json")

    def configure(logs: dict) -> None:
        config.write_text(yaml.safe_dump({"ollama": {"url": fake.url}, "poll": {"interval": "300ms"},
                                          "probes": {"enabled": False}, "logs": logs}))

    with FakeOllama() as fake:
        configure({"source": "none"})
        exp = Exporter("--config.file", str(config)).wait_ready()
        try:
            assert sample(exp.metrics(), "ollama_exporter_source_up", source="logs") is None
            configure({"source": "file", "path": str(first.path), "state_file": state})
            exp.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: sample(exp.metrics(), "ollama_exporter_source_up", source="logs") == 1,
                     message="logs source started by the reload")
            first.write([gin_line(200, 0.1)] * 2)
            wait_for(lambda: counted(exp, "/api/chat") == 2, message="2 requests from the first file")
            configure({"source": "file", "path": str(second.path), "state_file": state})
            exp.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: any(r["msg"] == "log source changed since the state was saved, starting at its end"
                                 for r in exp.log_records()), message="the switch")
            second.write([gin_line(200, 0.1)] * 3)
            first.write([gin_line(200, 0.1)] * 5)  # no longer followed
            wait_for(lambda: counted(exp, "/api/chat") == 5, message="the counters go on with the second file")
            time.sleep(0.5)
            assert counted(exp, "/api/chat") == 5
            configure({"source": "none"})
            exp.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: sample(exp.metrics(), "ollama_exporter_source_up", source="logs") is None,
                     message="logs source stopped")
        finally:
            exp.stop()


def test_a_forgotten_model_loses_its_traffic_series(tmp_path):
    """Like every per-model counter: once a model has been in neither /api/tags nor /api/ps for
    poll.forget_after, its traffic series go, from /metrics and from the state file."""
    log = LogFile(tmp_path / "server.log")
    with FakeOllama() as fake:
        fake.add_model(MODEL, blob_digest=BLOB)
        fake.load(MODEL)
        follower = LogFollower(FileSource(str(log.path), poll_interval=0.02), TrafficStats(OWN), None,
                               commit_interval=0.05).start()
        try:
            poller = Poller(OllamaClient(fake.url, 2.0), 1.0, logs=follower, forget_after=0.5)
            poller.poll_once()
            log.write(load_lines(BLOB, 40001, MODEL, runners=1) + request_lines(0, 1, generated=3))
            wait_for(lambda: follower.value().generated_tokens == {MODEL: 3}, message="tokens of the model")
            fake.remove_model(MODEL)
            poller.poll_once()
            assert poller.poll_once().traffic.generated_tokens == {MODEL: 3}  # not gone for long enough yet
            time.sleep(0.6)
            wait_for(lambda: poller.poll_once().traffic.generated_tokens == {}, message="its series gone")
            assert MODEL not in poller.snapshot.traffic.load_durations
        finally:
            follower.stop()


def test_counters_restored_at_start_survive_an_ollama_that_is_down(tmp_path):
    """Nothing is known gone before /api/tags has answered once: the restored per-model counters stay."""
    log = LogFile(tmp_path / "server.log")
    stats = TrafficStats(OWN)
    stats.feed_many(line.encode() for line in load_lines(BLOB, 40001, MODEL, runners=1) + request_lines(0, 1))
    with FakeOllama() as fake:
        fake.refuse_connections()
        follower = LogFollower(FileSource(str(log.path)), stats, None)
        poller = Poller(OllamaClient(fake.url, 0.5), 1.0, logs=follower, forget_after=0.01)
        time.sleep(0.05)
        snapshot = poller.poll_once()
        assert not snapshot.up and snapshot.traffic.generated_tokens == {MODEL: 53}

"""The follower: counts survive restarts and crashes exactly once, and failures are reported, not fatal."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from ollama_exporter.logfollow import LogFollower
from ollama_exporter.logsources import FileSource
from ollama_exporter.logstate import StateFile, default_state_path
from ollama_exporter.traffic import TrafficStats
from tests.conftest import wait_for
from tests.fakes.ollama_log import LogFile, gin_line

OWN = "192.0.2.1"


def follower(log: LogFile, state: StateFile) -> LogFollower:
    return LogFollower(FileSource(str(log.path), poll_interval=0.02), TrafficStats(OWN), state,
                       commit_interval=0.05).start()


def requests(f: LogFollower) -> int:
    return sum(f.value().requests.values())


def write_requests(log: LogFile, first: int, count: int) -> None:
    log.write(gin_line(200, 0.001 * (first + i), "127.0.0.1", "GET", "/api/tags") for i in range(count))


@pytest.fixture
def log(tmp_path) -> LogFile:
    return LogFile(tmp_path / "server.log")


def test_restart_mid_stream_loses_nothing_and_counts_nothing_twice(log, tmp_path):
    state = StateFile(str(tmp_path / "state" / "logs-state.json"))
    (tmp_path / "state").mkdir()
    f = follower(log, state)
    wait_for(lambda: f.status().up, message="follower reading")
    write_requests(log, 0, 300)
    wait_for(lambda: requests(f) == 300, message="300 requests")
    f.stop()
    write_requests(log, 300, 200)  # written while the exporter is down
    log.rotate_rename()  # and Ollama restarted meanwhile (the app renamed the log)
    write_requests(log, 500, 100)
    again = follower(log, state)
    try:
        assert requests(again) == 300  # the counters continue where Prometheus last saw them
        wait_for(lambda: requests(again) == 600, message="600 requests")
        time.sleep(0.3)
        assert requests(again) == 600
    finally:
        again.stop()


def test_a_crash_resumes_from_the_last_published_checkpoint(log, tmp_path):
    """Only committed counters are published, so a crash never makes a counter go backwards or double."""
    state = StateFile(str(tmp_path / "logs-state.json"))
    f = follower(log, state)
    wait_for(lambda: f.status().up, message="follower reading")
    write_requests(log, 0, 50)
    wait_for(lambda: requests(f) == 50, message="50 requests")
    time.sleep(0.2)
    checkpoint = tmp_path / "checkpoint.json"
    shutil.copy(state.path, checkpoint)  # what the disk held when the process was killed
    published = requests(f)
    assert json.loads(checkpoint.read_text())["stats"]["counters"]["requests"][0][-1] == published
    write_requests(log, 50, 70)
    wait_for(lambda: requests(f) == 120, message="120 requests")
    f.stop()
    shutil.copy(checkpoint, state.path)
    again = follower(log, state)
    try:
        assert requests(again) == published
        wait_for(lambda: requests(again) == 120, message="the unpublished lines read again")
    finally:
        again.stop()


def test_without_a_state_file_counting_starts_at_the_end(log):
    write_requests(log, 0, 10)
    f = LogFollower(FileSource(str(log.path), poll_interval=0.02), TrafficStats(OWN), None,
                    commit_interval=0.05).start()
    try:
        wait_for(lambda: f.status().up, message="follower reading")
        write_requests(log, 10, 3)
        wait_for(lambda: requests(f) == 3, message="3 requests")
    finally:
        f.stop()


def test_unwritable_state_is_reported_and_counting_goes_on(log, tmp_path):
    state = StateFile(str(tmp_path / "missing-dir" / "logs-state.json"))
    f = follower(log, state)
    try:
        wait_for(lambda: f.status().up, message="follower reading")
        write_requests(log, 0, 5)
        wait_for(lambda: requests(f) == 5, message="5 requests")
        wait_for(lambda: f.errors()["state_file"] >= 1, message="state_file error")
        status = f.status()
        assert not status.up and status.error == "state_file" and "missing-dir" in status.message
    finally:
        f.stop()


def test_corrupt_state_is_replaced(log, tmp_path):
    path = tmp_path / "logs-state.json"
    path.write_text("{not json")
    f = follower(log, StateFile(str(path)))
    try:
        wait_for(lambda: f.status().up, message="follower reading")
        write_requests(log, 0, 2)
        wait_for(lambda: json.loads(path.read_text()).get("version") == 1, message="a good state file")
    finally:
        f.stop()


def test_a_missing_log_is_retried_until_it_exists(tmp_path):
    path = tmp_path / "later.log"
    f = LogFollower(FileSource(str(path), poll_interval=0.02), TrafficStats(OWN), None, commit_interval=0.05).start()
    try:
        wait_for(lambda: f.errors()["not_found"] >= 1, message="not_found reported")
        assert f.status().error == "not_found"
        log = LogFile(path)
        wait_for(lambda: f.status().up, timeout=10, message="recovered")
        write_requests(log, 0, 1)
        wait_for(lambda: requests(f) == 1, message="1 request")
    finally:
        f.stop()


def test_state_directory_from_systemd():
    assert default_state_path({"STATE_DIRECTORY": "/var/lib/ollama-exporter"}) == \
        "/var/lib/ollama-exporter/logs-state.json"
    assert default_state_path({"STATE_DIRECTORY": "/a:/b"}) == "/a/logs-state.json"
    assert default_state_path({}) is None

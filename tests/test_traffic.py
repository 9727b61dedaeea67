"""TrafficStats: what the counters hold after realistic line sequences, and when a request is attributed
to a model (only when certain) or left `_unattributed`."""

from __future__ import annotations

import json

import pytest

from ollama_exporter.traffic import LAG_SECONDS, MAX_INFLIGHT, UNATTRIBUTED, TrafficStats
from tests.fakes.ollama_log import gin_line, load_lines, request_lines, slog_line

OWN = "192.0.2.1"
A, B = "a" * 64, "b" * 64
NAMES = {A: ["qwen3:8b"], B: ["llama3.1:8b"]}


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make() -> tuple[TrafficStats, Clock]:
    clock = Clock()
    return TrafficStats(OWN, clock=clock), clock


def feed(stats: TrafficStats, lines) -> None:
    stats.feed_many(line.encode() for line in lines)


def generated(stats: TrafficStats) -> dict:
    return stats.value().generated_tokens


def poll(stats: TrafficStats, clock: Clock, loaded, slots=None, mark=None) -> None:
    """A poll that starts now and ends 0.1 s later, then the follower catching up after it."""
    mark = stats.poll_mark() if mark is None else mark
    started = clock.now
    clock.now += 0.1
    stats.observe_poll(mark, started, clock.now, loaded, NAMES, slots)


def catch_up(stats: TrafficStats, clock: Clock) -> None:
    clock.now += LAG_SECONDS + 0.01
    stats.caught_up(clock.now)


def two_runners() -> tuple[TrafficStats, Clock]:
    stats, clock = make()
    feed(stats, load_lines(A, 40001, "qwen3:8b", runners=1))
    feed(stats, load_lines(B, 40002, "llama3.1:8b", runners=2))
    return stats, clock


# --- the sole-runner rule from the log ---------------------------------------------------------------

def test_one_runner_loaded_attributes_its_requests():
    stats, _ = make()
    feed(stats, load_lines(A, 40001, "qwen3:8b", seconds=7.3, runners=1))
    feed(stats, request_lines(0, 0, prompt_tokens=100, cached=60, generated=53))
    v = stats.value()
    assert v.generated_tokens == {"qwen3:8b": 53}
    assert v.prompt_tokens == {("qwen3:8b", "miss"): 40, ("qwen3:8b", "hit"): 60}
    assert v.completions == {("qwen3:8b", "false"): 1}
    assert v.tpot["qwen3:8b"].sum == pytest.approx(1.0086 / 53)
    assert v.load_durations["qwen3:8b"].count == 1  # "started in" is printed twice per load
    assert v.load_durations["qwen3:8b"].sum == pytest.approx(7.3)


def test_two_runners_leave_requests_unattributed():
    stats, _ = two_runners()
    feed(stats, request_lines(0, 3, generated=10))
    assert generated(stats) == {UNATTRIBUTED: 10}


def test_a_request_keeps_its_model_when_another_load_starts_mid_request():
    stats, _ = make()
    feed(stats, load_lines(A, 40001, "qwen3:8b", runners=1))
    lines = request_lines(0, 0, generated=12)
    feed(stats, lines[:6])  # launched on the only runner
    feed(stats, load_lines(B, 40002, "llama3.1:8b", runners=2))
    feed(stats, lines[6:])
    assert generated(stats) == {"qwen3:8b": 12}


def test_a_runner_crash_ends_the_certainty():
    stats, _ = make()
    feed(stats, load_lines(A, 40001, "qwen3:8b", runners=1))
    feed(stats, [slog_line("llama-server terminated", level="ERROR", error="signal: killed")])
    feed(stats, request_lines(0, 0, generated=5))
    v = stats.value()
    assert v.runner_crashes == {"qwen3:8b": 1} and v.generated_tokens == {UNATTRIBUTED: 5}


def test_ollama_restart_forgets_runners():
    stats, _ = make()
    feed(stats, load_lines(A, 40001, "qwen3:8b", runners=1))
    feed(stats, [slog_line("Listening on 127.0.0.1:11434 (version 0.32.15)")])
    feed(stats, request_lines(0, 0, generated=5))
    assert generated(stats) == {UNATTRIBUTED: 5}


# --- the sole-runner rule from a poll -----------------------------------------------------------------

def test_a_poll_with_one_model_attributes_after_the_log_catches_up():
    stats, clock = two_runners()
    lines = request_lines(0, 1, generated=7)
    feed(stats, lines[:6])  # in flight, unknown
    poll(stats, clock, ["llama3.1:8b"])  # qwen3 unloaded (its expiry is only logged at DEBUG)
    feed(stats, request_lines(0, 2, generated=3))  # not caught up yet: still unknown
    assert generated(stats) == {UNATTRIBUTED: 3}
    catch_up(stats, clock)
    feed(stats, lines[6:])  # the request in flight at the poll belongs to the only runner
    feed(stats, request_lines(0, 3, generated=4))
    assert generated(stats) == {UNATTRIBUTED: 3, "llama3.1:8b": 7 + 4}


def test_a_poll_is_void_when_a_load_starts_before_the_catch_up():
    stats, clock = two_runners()
    poll(stats, clock, ["llama3.1:8b"])
    feed(stats, load_lines(A, 40003, "qwen3:8b", runners=2)[:1])  # a load started: a second runner may appear
    catch_up(stats, clock)
    feed(stats, request_lines(0, 1, generated=3))
    assert generated(stats) == {UNATTRIBUTED: 3}


def test_a_poll_during_a_load_is_not_used():
    stats, clock = two_runners()
    mark = stats.poll_mark()
    feed(stats, load_lines(A, 40003, "qwen3:8b", runners=2)[:1])  # the load began before /api/ps answered
    poll(stats, clock, ["llama3.1:8b"], mark=mark)
    catch_up(stats, clock)
    feed(stats, request_lines(0, 1, generated=3))
    assert generated(stats) == {UNATTRIBUTED: 3}
    loading = stats.poll_mark()
    assert loading == -1  # a load is running: no poll taken now can be trusted


def test_a_poll_showing_two_models_ends_the_sole_runner():
    stats, clock = make()
    feed(stats, load_lines(A, 40001, "qwen3:8b", runners=1))
    poll(stats, clock, ["qwen3:8b", "llama3.1:8b"])
    feed(stats, request_lines(0, 1, generated=3))
    assert generated(stats) == {UNATTRIBUTED: 3}


# --- the /slots join -------------------------------------------------------------------------------------

def test_slots_join_attributes_a_request_seen_in_flight_on_one_runner():
    stats, clock = two_runners()
    lines = request_lines(0, 5, generated=9)
    feed(stats, lines[:6])
    clock.now += 0.5
    poll(stats, clock, ["qwen3:8b", "llama3.1:8b"], slots={(0, 5): "llama3.1:8b", (0, 8): "qwen3:8b"})
    catch_up(stats, clock)
    feed(stats, lines[6:])
    feed(stats, request_lines(0, 6, generated=2))  # started and ended between polls: stays unattributed
    assert generated(stats) == {"llama3.1:8b": 9, UNATTRIBUTED: 2}


def test_slots_join_waits_for_the_log_to_catch_up():
    stats, clock = two_runners()
    lines = request_lines(0, 5, generated=9)
    feed(stats, lines[:6])
    clock.now += 0.5
    poll(stats, clock, ["qwen3:8b", "llama3.1:8b"], slots={(0, 5): "llama3.1:8b"})
    stats.caught_up(clock.now)  # within LAG of the poll's end: lines about it may still be on their way
    feed(stats, lines[6:])
    assert generated(stats) == {UNATTRIBUTED: 9}


@pytest.mark.parametrize("case", ["collision", "launched_after_poll_start", "on_two_runners", "incomplete"])
def test_slots_join_refuses_what_is_not_certain(case):
    stats, clock = two_runners()
    lines = request_lines(0, 5, generated=9)
    if case == "launched_after_poll_start":
        mark, started = stats.poll_mark(), clock.now
        clock.now += 0.05
        feed(stats, lines[:6])
        clock.now += 0.05
        stats.observe_poll(mark, started, clock.now, ["qwen3:8b", "llama3.1:8b"], NAMES, {(0, 5): "llama3.1:8b"})
    else:
        feed(stats, lines[:6])
        if case == "collision":  # the other runner also launched slot 0 task 5
            feed(stats, request_lines(0, 5)[3:4])
        clock.now += 0.5
        slots = {"collision": {(0, 5): "llama3.1:8b"}, "on_two_runners": {(0, 5): None},
                 "incomplete": None}[case]
        poll(stats, clock, ["qwen3:8b", "llama3.1:8b"], slots=slots)
    catch_up(stats, clock)
    feed(stats, lines[6:])
    assert generated(stats) == {UNATTRIBUTED: 9}


def test_lost_lines_end_every_certainty():
    stats, _ = make()
    feed(stats, load_lines(A, 40001, "qwen3:8b", runners=1))
    lines = request_lines(0, 0, generated=4)
    feed(stats, lines[:6])
    stats.dropped(120, "overflow")
    feed(stats, lines[6:])
    feed(stats, request_lines(0, 1, generated=1))
    v = stats.value()
    assert v.dropped["overflow"] == 120 and v.generated_tokens == {UNATTRIBUTED: 5}


# --- loads, failures, requests ------------------------------------------------------------------------------

def test_load_without_template_line_is_named_through_its_blob():
    """v0.30.0 has no `template selection`: the weights blob names the model through /api/show."""
    stats, clock = make()
    poll(stats, clock, [])
    feed(stats, load_lines(B, 40002, "ignored", seconds=3.0, template_line=False))
    assert list(stats.value().load_durations) == ["llama3.1:8b"]


def test_load_of_an_unknown_blob_is_unattributed():
    stats, _ = make()
    feed(stats, load_lines("f" * 64, 40002, "x", seconds=3.0, template_line=False))
    assert list(stats.value().load_durations) == [UNATTRIBUTED]


def test_old_runner_load_is_timed_at_its_started_line():
    """v0.5-v0.24: `starting llama server`, `loaded runners` at once, then `llama runner started in`."""
    stats, clock = make()
    poll(stats, clock, [])
    feed(stats, [slog_line("starting llama server", cmd=f"/usr/bin/ollama runner --model /b/sha256-{A} --port 38609"),
                 slog_line("loaded runners", count=1),
                 slog_line("llama runner started in 2.50 seconds"),
                 slog_line("llama runner started in 2.50 seconds")])
    h = stats.value().load_durations
    assert list(h) == ["qwen3:8b"] and h["qwen3:8b"].count == 1 and h["qwen3:8b"].sum == 2.5


def test_a_failed_load_is_counted_once_and_not_timed():
    stats, _ = make()
    feed(stats, load_lines(A, 40001, "qwen3:8b")[:2])
    feed(stats, [slog_line("client connection closed before llama-server finished loading, aborting load",
                           level="WARN"),
                 slog_line("Load failed", model=f"/b/sha256-{A}", error="context canceled"),
                 slog_line("error loading llama server", level="ERROR", error="context canceled"),
                 slog_line("llama-server started in 2.00 seconds")])
    v = stats.value()
    assert v.load_failures == {(UNATTRIBUTED, "client_gone"): 1} and v.load_durations == {}


def test_own_requests_are_counted_apart():
    stats, _ = make()
    feed(stats, [gin_line(200, 0.2, OWN, "POST", "/api/generate"), gin_line(200, 0.001, OWN, "GET", "/api/ps"),
                 gin_line(499, 3.0, OWN, "POST", "/api/generate"),
                 gin_line(200, 0.3, "127.0.0.1", "POST", "/api/generate"), gin_line(499, 8.0, "10.0.0.5")])
    v = stats.value()
    assert v.requests == {("/api/generate", "POST", "200"): 1, ("/api/chat", "POST", "499"): 1}
    assert v.own_requests == {("/api/generate", "200"): 1, ("/api/ps", "200"): 1, ("/api/generate", "499"): 1}
    assert sum(h.count for h in v.durations.values()) == 2
    assert v.disconnects == {"scheduling_or_load": 1, "waiting_for_slot": 0}


def test_events_counted():
    stats, _ = make()
    feed(stats, [slog_line("aborting completion request due to client closing the connection"),
                 slog_line("truncating input prompt", level="WARN", limit=4096, prompt=9000, keep=4, new=4096),
                 slog_line("runtime OOM detected; expiring loaded models to clear memory before next request",
                           level="WARN"),
                 "systemd-journald[1]: Suppressed 40 messages from ollama.service"])
    v = stats.value()
    assert (v.disconnects["waiting_for_slot"], v.prompt_truncations, v.runtime_ooms) == (1, 1, 1)
    assert v.dropped["journal_rate_limit"] == 40


def test_a_cancelled_request_has_no_tokens():
    stats, _ = make()
    feed(stats, load_lines(A, 40001, "qwen3:8b", runners=1))
    feed(stats, request_lines(0, 0, generated=150, cancelled=True))
    feed(stats, request_lines(0, 1, generated=5, truncated=True))
    v = stats.value()
    assert v.without_timings == {"qwen3:8b": 1}
    assert v.completions == {("qwen3:8b", "true"): 1} and v.generated_tokens == {"qwen3:8b": 5}


# --- state ----------------------------------------------------------------------------------------------------

def test_state_round_trip_continues_a_request_in_flight():
    stats, _ = make()
    feed(stats, load_lines(A, 40001, "qwen3:8b", runners=1))
    feed(stats, [gin_line(200, 0.4), gin_line(500, 61.0)])
    lines = request_lines(0, 0, prompt_tokens=50, cached=10, generated=8)
    feed(stats, lines[:6])
    saved = json.loads(json.dumps(stats.state()))
    restored, _ = make()
    restored.restore(saved)
    assert restored.value() == stats.value()
    feed(restored, lines[6:])  # the exporter restarted mid-request
    v = restored.value()
    assert v.generated_tokens == {"qwen3:8b": 8} and v.prompt_tokens[("qwen3:8b", "hit")] == 10


@pytest.mark.parametrize("state", [{}, {"version": 99}, {"version": 1, "counters": {}},
                                   {"version": 1, "counters": {"lines": []}}])
def test_restore_rejects_what_it_cannot_read(state):
    stats, _ = make()
    with pytest.raises(ValueError):
        stats.restore(state)


def test_models_no_longer_installed_lose_their_series():
    stats, _ = make()
    feed(stats, load_lines(A, 40001, "qwen3:8b", runners=1))
    feed(stats, request_lines(0, 0, generated=8))
    feed(stats, load_lines(B, 40002, "llama3.1:8b", runners=2))
    feed(stats, request_lines(0, 1, generated=1))
    stats.forget_models(None)
    assert generated(stats) == {"qwen3:8b": 8, UNATTRIBUTED: 1}
    stats.forget_models({"llama3.1:8b"})
    v = stats.value()
    assert v.generated_tokens == {UNATTRIBUTED: 1} and list(v.load_durations) == ["llama3.1:8b"]


def test_requests_in_flight_are_bounded():
    stats, _ = make()
    feed(stats, [f"slot launch_slot_: id  0 | task {n} | processing task, is_child = 0"
                 for n in range(MAX_INFLIGHT + 50)])
    assert len(stats.state()["inflight"]) == MAX_INFLIGHT

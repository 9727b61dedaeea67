"""Active probes against the fake Ollama (which emulates the scheduler's idle timer, reloads and loads):
accurate timings, every failure reason, and no side effects on what is measured."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import requests

from ollama_exporter.config import Config
from ollama_exporter.exposition import render
from ollama_exporter.ollama import OllamaClient
from ollama_exporter.poller import Poller
from ollama_exporter.prober import Prober
from tests.conftest import sample

INFERENCE = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")


def make(fake, **overrides):
    settings = {"ollama_url": fake.url, "probes_interval": 1.0, "probes_timeout": 5.0, **overrides}
    config = replace(Config(), **settings)
    client = OllamaClient(fake.url, 2.0)
    poller = Poller(client, 0.2)
    prober = Prober(client, config, lambda: poller.snapshot)
    prober.jitter_max = 0.0
    poller.probe_stats = prober.stats
    return poller, prober


def probe_round(poller, prober):
    poller.poll_once()
    return [f.result(timeout=30) for f in prober.tick()]


def inference_requests(fake):
    return [r for r in fake.requests if r.path in INFERENCE]


def test_ttft_and_tpot_match_the_servers_timing(fake_ollama):
    fake_ollama.add_model("qwen3:8b")
    fake_ollama.load("qwen3:8b", keep_alive=-1, context_length=8192)
    fake_ollama.set_timing(ttft=0.2, token_gap=0.02, tokens=16)
    poller, prober = make(fake_ollama)
    results = [r for _ in range(8) for r in probe_round(poller, prober)]
    assert all(r.ok for r in results) and len(results) == 8
    assert abs(statistics.mean(r.ttft for r in results) - 0.200) < 0.010
    assert abs(statistics.mean(r.tpot for r in results) - 0.020) < 0.002
    assert all(r.tokens == 16 and r.eval_count == 16 for r in results)

    text = render(poller.poll_once())[0].decode()
    count = sample(text, "ollama_probe_ttft_seconds_count", model="qwen3:8b")
    assert count == 8
    assert abs(sample(text, "ollama_probe_ttft_seconds_sum", model="qwen3:8b") / count - 0.2) < 0.010
    assert abs(sample(text, "ollama_probe_tpot_seconds_sum", model="qwen3:8b") / count - 0.02) < 0.002
    assert sample(text, "ollama_probe_ttft_seconds_bucket", model="qwen3:8b", le="0.3") == 8
    assert sample(text, "ollama_probe_ttft_seconds_bucket", model="qwen3:8b", le="0.1") == 0
    assert sample(text, "ollama_probe_eval_tokens_total", model="qwen3:8b") == 8 * 16
    assert sample(text, "ollama_probes_total", model="qwen3:8b") == 8
    assert sample(text, "ollama_probe_success", model="qwen3:8b") == 1
    assert sample(text, "ollama_probe_failures_total", model="qwen3:8b", reason="timeout") == 0


def test_probe_requests_are_small_and_never_touch_keep_alive_or_num_ctx(fake_ollama):
    fake_ollama.add_model("llama3.2:3b")
    fake_ollama.load("llama3.2:3b", keep_alive=-1, context_length=32768)
    fake_ollama.set_timing(ttft=0.01, token_gap=0.001)
    poller, prober = make(fake_ollama)
    for _ in range(3):
        probe_round(poller, prober)
    sent = inference_requests(fake_ollama)
    assert len(sent) == 3
    for r in sent:
        assert r.path == "/api/generate" and "keep_alive" not in r.json
        assert r.json["stream"] is True
        assert r.json["options"] == {"num_ctx": 32768, "num_predict": 16, "temperature": 0, "seed": 42}
    assert fake_ollama.reloads["llama3.2:3b"] == 0 and fake_ollama.loads["llama3.2:3b"] == 0
    assert fake_ollama.loaded() == ["llama3.2:3b"]


def test_a_model_that_is_not_resident_is_never_probed(fake_ollama):
    fake_ollama.add_model("big:70b")
    poller, prober = make(fake_ollama, probes_models=("big:70b",))
    for _ in range(3):
        assert probe_round(poller, prober) == []
    assert inference_requests(fake_ollama) == [] and fake_ollama.loaded() == []
    text = render(poller.poll_once())[0].decode()
    assert sample(text, "ollama_probe_skipped_total", model="big:70b", reason="not_loaded") == 3


def test_cold_loads_only_when_explicitly_allowed(fake_ollama):
    fake_ollama.add_model("big:70b")
    fake_ollama.set_timing(ttft=0.01, token_gap=0.001, load_time=0.3)
    poller, prober = make(fake_ollama, probes_models=("big:70b",), probes_allow_cold_load=True)
    [result] = probe_round(poller, prober)
    assert result.ok and result.load_duration >= 0.3
    assert fake_ollama.loads["big:70b"] == 1
    text = render(poller.poll_once())[0].decode()
    assert sample(text, "ollama_probe_caused_loads_total", model="big:70b") == 1


def test_forever_models_are_probed_every_interval_and_idle_finite_ones_are_not(fake_ollama):
    fake_ollama.add_model("always:on")
    fake_ollama.add_model("sometimes:on")
    fake_ollama.load("always:on", keep_alive=-1)
    fake_ollama.load("sometimes:on", keep_alive=600)
    fake_ollama.set_timing(ttft=0.01, token_gap=0.001)
    poller, prober = make(fake_ollama)
    for _ in range(4):
        probe_round(poller, prober)
    probed = [r.json["model"] for r in inference_requests(fake_ollama)]
    assert probed == ["always:on"] * 4
    text = render(poller.poll_once())[0].decode()
    assert sample(text, "ollama_probe_skipped_total", model="sometimes:on", reason="idle") == 4


def test_idle_models_probe_policy_probes_everything(fake_ollama):
    fake_ollama.add_model("sometimes:on")
    fake_ollama.load("sometimes:on", keep_alive=600)
    fake_ollama.set_timing(ttft=0.01, token_gap=0.001)
    poller, prober = make(fake_ollama, probes_idle_models="probe")
    for _ in range(3):
        probe_round(poller, prober)
    assert len(inference_requests(fake_ollama)) == 3


def user_request(fake, model):
    """A real client's request: no keep_alive, default options (as most clients send)."""
    resp = requests.post(fake.url + "/api/generate", json={"model": model, "prompt": "hi", "stream": False,
                                                           "options": {"num_ctx": 4096}}, timeout=10)
    assert resp.status_code == 200


def test_activity_gating_over_a_run_lets_idle_models_unload(fake_ollama):
    """The fake restarts a model's idle timer when any request finishes, as Ollama does. Over a run with
    the daemon's loop: an idle finite-keep-alive model is not probed, is probed soon after a user request,
    and unloads no later than about one probe interval after its last real use."""
    keep_alive, interval = 2.0, 0.5
    fake_ollama.add_model("chat:7b")
    fake_ollama.add_model("embed:small", capabilities=["embedding"])
    fake_ollama.load("chat:7b", keep_alive=keep_alive, context_length=4096)
    fake_ollama.load("embed:small", keep_alive=-1, context_length=2048)
    fake_ollama.set_timing(ttft=0.02, token_gap=0.002, tokens=8)
    config = replace(Config(), ollama_url=fake_ollama.url, probes_interval=interval, probes_timeout=5.0)
    client = OllamaClient(fake_ollama.url, 2.0)
    poller = Poller(client, 0.1)
    prober = Prober(client, config, lambda: poller.snapshot)
    poller.probe_stats = prober.stats
    stop = threading.Event()
    poller.poll_once()
    threads = [threading.Thread(target=poller.run, args=(stop,), daemon=True),
               threading.Thread(target=prober.run, args=(stop,), daemon=True)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.6)  # idle: three rounds, no probe of chat:7b may happen
        assert [r for r in inference_requests(fake_ollama) if r.json["model"] == "chat:7b"] == []
        # keep the model busy with real traffic for a while, then stop using it
        last_use = 0.0
        for _ in range(3):
            user_request(fake_ollama, "chat:7b")
            last_use = time.monotonic()
            time.sleep(0.7)
        deadline = last_use + keep_alive + interval + 1.0
        while "chat:7b" in fake_ollama.loaded() and time.monotonic() < deadline + 2:
            time.sleep(0.05)
        unloaded_at = time.monotonic()
    finally:
        stop.set()
    chat_probes = [r for r in inference_requests(fake_ollama) if r.json["model"] == "chat:7b" and r.json.get(
        "prompt") != "hi"]
    assert chat_probes, "the model was used, so it should have been probed"
    assert all(r.time >= last_use - 3 * 0.7 for r in chat_probes)  # never before the first user request
    assert "chat:7b" not in fake_ollama.loaded()
    delay = unloaded_at - (last_use + keep_alive)
    assert delay <= interval + 0.6, f"unloaded {delay:.2f}s after it would have without probes"
    everything = [r for r in inference_requests(fake_ollama) if r.json.get("prompt") != "hi"]
    assert all("keep_alive" not in r.json for r in everything)
    assert all(r.json.get("options", {}).get("num_ctx") == {"chat:7b": 4096, "embed:small": 2048}[r.json["model"]]
               for r in everything)
    assert any(r.path == "/api/embed" for r in everything)  # the embedding model got embed probes
    assert fake_ollama.loads["chat:7b"] == 0 and fake_ollama.loads["embed:small"] == 0


def test_a_probe_that_forces_a_reload_is_detected_backs_off_and_switches_strategy(fake_ollama):
    fake_ollama.add_model("tricky:1")
    fake_ollama.load("tricky:1", keep_alive=-1, context_length=8192)
    fake_ollama.ps_context_scale = 0.5  # /api/ps reports 4096 while the runner was loaded with 8192
    fake_ollama.default_num_ctx = 8192
    fake_ollama.default_keep_alive = -1  # OLLAMA_KEEP_ALIVE=-1: the reloaded runner stays "forever" too
    fake_ollama.set_timing(ttft=0.01, token_gap=0.001, load_time=0.3)
    poller, prober = make(fake_ollama)
    prober.backoff_seconds = 1.0
    [first] = probe_round(poller, prober)
    assert fake_ollama.reloads["tricky:1"] == 1 and first.load_duration >= 0.3
    assert probe_round(poller, prober) == []  # backing off
    # the user's client, which never sends num_ctx, reloads the model with the server default again
    requests.post(fake_ollama.url + "/api/generate", json={"model": "tricky:1", "prompt": "hi", "stream": False},
                  timeout=10).raise_for_status()
    assert fake_ollama.reloads["tricky:1"] == 2
    time.sleep(1.1)
    [second] = probe_round(poller, prober)
    sent = [r for r in inference_requests(fake_ollama) if r.json["prompt"] != "hi"]
    assert sent[0].json["options"]["num_ctx"] == 4096 and "num_ctx" not in sent[1].json["options"]
    assert second.ok and second.load_duration < 0.1 and fake_ollama.reloads["tricky:1"] == 2
    text = render(poller.poll_once())[0].decode()
    assert sample(text, "ollama_probe_caused_loads_total", model="tricky:1") == 1
    assert sample(text, "ollama_probe_skipped_total", model="tricky:1", reason="backoff") == 1


@pytest.mark.parametrize(
    "kind, params, reason",
    [
        ("not_found", {}, "not_found"),
        ("oom", {}, "out_of_memory"),
        ("context_length", {}, "context_length"),
        ("busy", {}, "busy"),
        ("hang", {}, "timeout"),
        ("truncate_stream", {}, "truncated_stream"),
        ("stream_error", {}, "stream_error"),
        ("status", {"code": 400, "body": "invalid options"}, "http_4xx"),
        ("status", {"code": 502, "body": "bad gateway"}, "http_5xx"),
        ("reset", {}, "connection"),
    ],
)
def test_every_failure_reason(fake_ollama, kind, params, reason):
    fake_ollama.add_model("m:1")
    fake_ollama.load("m:1", keep_alive=-1)
    fake_ollama.set_timing(ttft=0.01, token_gap=0.001)
    fake_ollama.set_fault("/api/generate", kind, **params)
    poller, prober = make(fake_ollama, probes_timeout=0.5)
    [result] = probe_round(poller, prober)
    assert not result.ok and result.reason == reason, result
    text = render(poller.poll_once())[0].decode()
    assert sample(text, "ollama_probe_failures_total", model="m:1", reason=reason) == 1
    assert sample(text, "ollama_probe_success", model="m:1") == 0
    assert sample(text, "ollama_probes_total", model="m:1") == 1


def test_probes_of_one_model_never_overlap_and_concurrency_is_bounded(fake_ollama):
    for name in ("a:1", "b:1", "c:1"):
        fake_ollama.add_model(name)
        fake_ollama.load(name, keep_alive=-1)
    fake_ollama.set_timing(ttft=0.6, token_gap=0.001)
    poller, prober = make(fake_ollama, probes_concurrency=2)
    running, peak, lock = [0], [0], threading.Lock()
    original = prober.probe_once

    def counting(*args):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return original(*args)
        finally:
            with lock:
                running[0] -= 1

    prober.probe_once = counting
    poller.poll_once()
    first = prober.tick()
    second = prober.tick()  # while the first round still runs
    assert len(first) == 3 and second == []
    for f in first:
        assert f.result(timeout=10).ok
    assert peak[0] == 2
    text = render(poller.poll_once())[0].decode()
    assert sample(text, "ollama_probe_skipped_total", model="a:1", reason="in_progress") == 1


def test_probe_series_vanish_when_the_model_is_forgotten(fake_ollama):
    fake_ollama.add_model("temp:1")
    fake_ollama.load("temp:1", keep_alive=-1)
    fake_ollama.set_timing(ttft=0.01, token_gap=0.001)
    poller, prober = make(fake_ollama)
    now = [1000.0]
    poller.clock, poller.forget_after = (lambda: now[0]), 60.0
    probe_round(poller, prober)
    assert sample(render(poller.poll_once())[0].decode(), "ollama_probes_total", model="temp:1") == 1
    fake_ollama.unload("temp:1")
    fake_ollama.remove_model("temp:1")
    text = render(poller.poll_once())[0].decode()
    assert sample(text, "ollama_probes_total", model="temp:1") == 1  # a counter: kept until forgotten
    now[0] += 61
    text = render(poller.poll_once())[0].decode()
    assert "temp:1" not in text  # counters, histograms and gauges alike


def test_probe_command_prints_a_table(fake_ollama):
    fake_ollama.add_model("qwen3:8b")
    fake_ollama.add_model("cold:1")
    fake_ollama.load("qwen3:8b", keep_alive=-1, context_length=8192)
    fake_ollama.set_timing(ttft=0.05, token_gap=0.005)
    result = subprocess.run([sys.executable, "-m", "ollama_exporter", "probe", "--ollama.url", fake_ollama.url,
                             "--count", "2", "--model", "qwen3:8b", "--model", "cold:1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "cold:1: skipped, not loaded" in lines[0]
    assert lines[1].split() [:6] == ["MODEL", "KIND", "TTFT", "TPOT", "E2E", "TOK/S"]
    rows = [line for line in lines[2:] if line.startswith("qwen3:8b")]
    assert len(rows) == 2 and all(row.rstrip().endswith("ok") for row in rows)
    assert "16 tok" in rows[0] and " ms" in rows[0]
    assert fake_ollama.loaded() == ["qwen3:8b"] and fake_ollama.loads["cold:1"] == 0

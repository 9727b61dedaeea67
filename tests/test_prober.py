"""Active probes against the fake Ollama, which behaves like each real version's scheduler: accurate
timings, every failure reason, and no side effect on what is measured, version by version."""

from __future__ import annotations

import logging
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
from ollama_exporter.prober import Prober, num_ctx_choices, parse_version
from tests.conftest import sample
from tests.fakes.ollama import INF, PROFILES, FakeOllama

INFERENCE = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")
PROBE_IP = "192.0.2.1"


class Clock:
    """Wall time plus an offset a test moves forward, shared by the poller and the prober, so a test can
    skip a probe interval without waiting for it (the fake's expiry stays on real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def make(fake, start=True, **overrides):
    settings = {"ollama_url": fake.url, "probes_interval": 1.0, "probes_timeout": 5.0, "poll_interval": 0.2,
                **overrides}
    config = replace(Config(), **settings)
    clock = Clock()
    client = OllamaClient(fake.url, 2.0)
    poller = Poller(client, 0.2, clock=clock)
    poller.settle_shows = True  # every poll has the /api/show answers for the models it lists
    prober = Prober(client, config, lambda: poller.snapshot, clock=clock)
    prober.jitter_max, prober.settle_delay = 0.0, 0.05
    poller.probe_stats = prober.stats
    if start:
        poller.poll_once()
        assert prober.tick() == []  # first sight: nobody knows when these models were last used
    return poller, prober, clock


def probe_round(poller, prober, clock, advance: float = 1.0):
    """One probe interval later: poll, plan, and wait for what was sent (skipped ones left out)."""
    clock.advance(advance)
    poller.poll_once()
    results = [f.result(timeout=30) for f in prober.tick()]
    return [r for r in results if not r.skipped]


def inference_requests(fake):
    return [r for r in fake.requests if r.path in INFERENCE]


def metrics(poller) -> str:
    return render(poller.poll_once())[0].decode()


def user(fake, model, keep_alive=None, **options):
    """A real client's request: no X-Forwarded-For."""
    body = {"model": model, "prompt": "hi", "stream": False}
    if options:
        body["options"] = options
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    requests.post(fake.url + "/api/generate", json=body, timeout=10).raise_for_status()
    fake.wait_settled()


def probe_caused(fake, kind=None):
    return fake.caused_by(PROBE_IP, kind)


@pytest.fixture
def fake():
    with FakeOllama() as f:
        f.set_timing(ttft=0.01, token_gap=0.001, tokens=4, load_time=0.3)
        yield f


# ----------------------------------------------------------------------------- what a probe measures
def test_ttft_and_tpot_match_the_servers_timing(fake):
    fake.add_model("qwen3:8b")
    fake.load("qwen3:8b", keep_alive=-1, context_length=8192)
    fake.set_timing(ttft=0.2, token_gap=0.02, tokens=16)
    poller, prober, clock = make(fake)
    results = [r for _ in range(8) for r in probe_round(poller, prober, clock)]
    assert all(r.ok for r in results) and len(results) == 8
    assert abs(statistics.mean(r.ttft for r in results) - 0.200) < 0.010
    assert abs(statistics.mean(r.tpot for r in results) - 0.020) < 0.002
    assert all(r.tokens == 16 and r.eval_count == 16 and r.queue_wait < 0.05 for r in results)

    text = metrics(poller)
    count = sample(text, "ollama_probe_ttft_seconds_count", model="qwen3:8b")
    assert count == 8
    assert abs(sample(text, "ollama_probe_ttft_seconds_sum", model="qwen3:8b") / count - 0.2) < 0.010
    assert abs(sample(text, "ollama_probe_tpot_seconds_sum", model="qwen3:8b") / count - 0.02) < 0.002
    assert sample(text, "ollama_probe_ttft_seconds_bucket", model="qwen3:8b", le="0.3") == 8
    assert sample(text, "ollama_probe_ttft_seconds_bucket", model="qwen3:8b", le="0.1") == 0
    assert sample(text, "ollama_probe_queue_wait_seconds_count", model="qwen3:8b") == 8
    assert sample(text, "ollama_probe_eval_tokens_total", model="qwen3:8b") == 8 * 16
    assert sample(text, "ollama_probes_total", model="qwen3:8b") == 8
    assert sample(text, "ollama_probe_success", model="qwen3:8b") == 1
    assert sample(text, "ollama_probe_failures_total", model="qwen3:8b", reason="timeout") == 0
    assert sample(text, "ollama_probe_caused_loads_total", model="qwen3:8b") == 0
    assert sample(text, "ollama_probe_keep_alive_restores_total", model="qwen3:8b") == 0


def test_probe_requests_are_small_marked_and_never_touch_keep_alive(fake):
    fake.add_model("llama3.2:3b")
    fake.load("llama3.2:3b", keep_alive=-1, context_length=32768)
    poller, prober, clock = make(fake)
    for _ in range(3):
        probe_round(poller, prober, clock)
    sent = inference_requests(fake)
    assert len(sent) == 3
    for r in sent:
        assert r.path == "/api/generate" and "keep_alive" not in r.json and r.json["stream"] is True
        assert r.json["options"] == {"num_ctx": 32768, "num_predict": 16, "temperature": 0, "seed": 42}
        assert r.headers["X-Forwarded-For"] == PROBE_IP  # probes are not user traffic
    # around each probe: one /api/ps read right before, one (or more) after
    assert fake.count("/api/ps") >= 3 * 2
    assert not probe_caused(fake) and fake.runner_keep_alive("llama3.2:3b") == INF


def test_the_forwarded_for_address_is_configurable(fake):
    fake.add_model("m:1")
    fake.load("m:1", keep_alive=-1)
    poller, prober, clock = make(fake, probes_forwarded_for="198.51.100.7")
    probe_round(poller, prober, clock)
    assert [r.headers["X-Forwarded-For"] for r in inference_requests(fake)] == ["198.51.100.7"]


# ----------------------------------------------------------------------------- never load
def test_a_model_that_is_not_resident_is_never_probed(fake):
    fake.add_model("big:70b")
    poller, prober, clock = make(fake, probes_models=("big:70b",))
    for _ in range(3):
        assert probe_round(poller, prober, clock) == []
    assert inference_requests(fake) == [] and fake.loaded() == []
    assert sample(metrics(poller), "ollama_probe_skipped_total", model="big:70b", reason="not_loaded") == 4  # start + 3


def test_cold_loads_only_when_explicitly_allowed(fake):
    fake.add_model("big:70b")
    poller, prober, clock = make(fake, start=False, probes_models=("big:70b",), probes_allow_cold_load=True)
    [result] = probe_round(poller, prober, clock)
    assert result.ok and result.load_duration >= 0.3 and fake.loads["big:70b"] == 1
    assert sample(metrics(poller), "ollama_probe_caused_loads_total", model="big:70b") == 1


@pytest.mark.parametrize("change", ["stop", "evict", "reload", "expire"])
def test_a_model_gone_or_changed_after_planning_is_not_sent(fake, change):
    """Finding C: the snapshot a probe was planned on can be seconds old; the read right before sending
    decides. Without it the probe would load the model again (or reload it back)."""
    fake.add_model("m:1")
    fake.load("m:1", keep_alive=-1 if change != "expire" else 30, context_length=8192)
    poller, prober, clock = make(fake, probes_idle_models="probe")
    clock.advance(1.0)
    poller.poll_once()
    with prober._lock:
        [job] = prober.plan(poller.snapshot)
    if change == "stop":
        requests.post(fake.url + "/api/generate", json={"model": "m:1", "keep_alive": 0}, timeout=5)
    elif change == "evict":
        fake.evict("m:1")
    elif change == "reload":
        user(fake, "m:1", keep_alive=-1, num_ctx=16384)
    else:
        clock.advance(29.9)  # it expires within the margin
    result = prober._run_job(job)
    assert result.skipped == "not_loaded" and not result.ok
    assert not any(r.headers.get("X-Forwarded-For") for r in inference_requests(fake))
    assert not probe_caused(fake)


def test_a_model_stopping_in_the_snapshot_is_not_probed(fake):
    fake.add_model("m:1")
    fake.set_timing(ttft=0.01, token_gap=0.2, tokens=6)
    fake.load("m:1", keep_alive=-1)
    poller, prober, clock = make(fake)
    stream = requests.post(fake.url + "/api/generate", json={"model": "m:1", "prompt": "x"}, stream=True, timeout=10)
    lines = stream.iter_lines()
    next(lines)
    requests.post(fake.url + "/api/generate", json={"model": "m:1", "keep_alive": 0}, timeout=5)  # ollama stop
    assert probe_round(poller, prober, clock) == []
    list(lines)
    fake.wait_settled()
    assert not probe_caused(fake) and "m:1" not in fake.loaded()


# ----------------------------------------------------------------------------- never reload, per version
def test_v0_24_probes_leave_num_ctx_out_where_ps_is_clamped(fake):
    """Finding A: on v0.15.5-v0.24 ps shows the clamped num_ctx; sending it reloaded every automatic runner."""
    fake.version, fake.vram_gib = PROFILES["0.15.5-0.24"], 48
    fake.add_model("qwen3:8b", context_length=40960)
    fake.add_model("small:1", context_length=131072)
    user(fake, "qwen3:8b", keep_alive=-1)  # automatic: 262144 stored, ps 40960
    user(fake, "small:1", keep_alive=-1, num_ctx=8192)  # explicit, below training: ps 8192
    poller, prober, clock = make(fake)
    for _ in range(3):
        assert all(r.ok for r in probe_round(poller, prober, clock))
    sent = {r.json["model"]: r.json["options"].get("num_ctx") for r in inference_requests(fake)
            if r.headers.get("X-Forwarded-For")}
    assert sent == {"qwen3:8b": None, "small:1": 8192}
    assert not probe_caused(fake) and fake.runner_keep_alive("qwen3:8b") == INF
    user(fake, "qwen3:8b")  # and the user's next turn does not pay for a reload either
    assert not [e for e in fake.events if e.kind == "reload"]


def test_v0_24_no_probe_before_the_training_context_is_known(fake):
    """/api/show runs in the background: until it has answered, the clamped ps value cannot be judged."""
    fake.version, fake.vram_gib = PROFILES["0.15.5-0.24"], 48
    fake.add_model("qwen3:8b", context_length=40960)
    user(fake, "qwen3:8b", keep_alive=-1)  # automatic: 262144 stored, ps 40960
    poller, prober, clock = make(fake)
    poller.shows = type(poller.shows)(lambda name: time.sleep(10), poller.shows.pool, 1.0)  # never answers
    poller.settle_shows = False
    for _ in range(3):
        assert probe_round(poller, prober, clock) == []
    assert not inference_requests_from_probes(fake) and not [e for e in fake.events if e.kind == "reload"]


def test_v0_24_a_model_whose_show_has_no_training_context_is_still_probed(fake):
    """Waiting is for an /api/show that has not answered yet; one that answered without
    `<arch>.context_length` will never say more, and the model was left unprobed for good."""
    fake.version, fake.vram_gib = PROFILES["0.15.5-0.24"], 48
    fake.add_model("qwen3:8b", context_length=0)  # /api/show: `qwen3.context_length` 0, unusable
    user(fake, "qwen3:8b", keep_alive=-1)
    poller, prober, clock = make(fake)
    probe_round(poller, prober, clock)
    assert [r.ok for r in probe_round(poller, prober, clock)] == [True]


def test_a_target_whose_module_reads_no_show_is_probed_without_waiting_for_one(fake):
    """A multi-target module without the `show` source never learns a training context: waiting for it
    left every model unprobed. It is probed with the ps value, as where ps is not clamped."""
    fake.version, fake.vram_gib = PROFILES["0.15.5-0.24"], 48
    fake.add_model("qwen3:8b", context_length=40960)
    user(fake, "qwen3:8b", keep_alive=-1, num_ctx=8192)  # below the training context: nothing clamped
    poller, prober, clock = make(fake, start=False)
    poller.sources = ("version", "ps", "tags")
    prober.shows = False
    poller.poll_once()
    prober.tick()
    probe_round(poller, prober, clock)
    assert [r.ok for r in probe_round(poller, prober, clock)] == [True]
    assert not [e for e in fake.events if e.kind == "reload"]


def inference_requests_from_probes(fake):
    return [r for r in inference_requests(fake) if r.headers.get("X-Forwarded-For")]


def test_v0_30_embed_probes_leave_num_ctx_out_for_small_embedding_models(fake):
    """Finding E: an embed num_ctx also sets num_batch = min(2048, num_ctx) since v0.30."""
    fake.vram_gib = 48
    fake.add_model("all-minilm:latest", capabilities=["embedding"], context_length=512, family="bert")
    requests.post(fake.url + "/api/embed", json={"model": "all-minilm", "input": "x", "keep_alive": -1},
                  timeout=5).raise_for_status()
    poller, prober, clock = make(fake)
    for _ in range(2):
        [result] = probe_round(poller, prober, clock)
        assert result.ok and result.kind == "embed"
    assert [r.json.get("options") for r in inference_requests(fake)[1:]] == [None, None]
    assert not probe_caused(fake)


@pytest.mark.parametrize("profile", ["0.10-0.11.4", "0.11.5-0.15.4", ">=0.30"])
def test_probes_send_the_ps_num_ctx_where_it_is_what_the_runner_stores(fake, profile):
    fake.version, fake.vram_gib = PROFILES[profile], 48
    fake.add_model("m:1")
    user(fake, "m:1", keep_alive=-1, num_ctx=200000)  # above the training context
    poller, prober, clock = make(fake)
    probe_round(poller, prober, clock)
    probe_round(poller, prober, clock)
    shown = requests.get(fake.url + "/api/ps", timeout=5).json()["models"][0]["context_length"]
    assert [r.json["options"]["num_ctx"] for r in inference_requests(fake)[1:]] == [shown, shown]
    assert not probe_caused(fake)


def test_before_v0_10_probes_leave_num_ctx_out_and_stop_when_the_size_says_other_options(fake):
    fake.version = PROFILES["0.2-0.9"]
    fake.add_model("m:1", kv_bytes_per_token=1000)
    user(fake, "m:1", keep_alive=-1)
    poller, prober, clock = make(fake)
    [result] = probe_round(poller, prober, clock)
    assert result.ok and "num_ctx" not in inference_requests(fake)[-1].json["options"]
    user(fake, "m:1", keep_alive=-1, num_ctx=8192)  # a user reloads it with other options: ps shows no num_ctx
    for _ in range(3):
        assert probe_round(poller, prober, clock) == []
    assert not probe_caused(fake) and fake.runner_keep_alive("m:1") == INF
    assert sample(metrics(poller), "ollama_probe_skipped_total", model="m:1", reason="reload_risk") >= 1


def test_probes_are_off_below_v0_2_0(fake, caplog):
    """v0.1.48 resets keep_alive on every request without one: any probe would unpin every model."""
    fake.version = PROFILES["<=0.1.48"]
    fake.add_model("m:1")
    fake.load("m:1", keep_alive=-1)
    caplog.set_level(logging.WARNING, logger="ollama_exporter.prober")
    poller, prober, clock = make(fake)
    for _ in range(3):
        assert probe_round(poller, prober, clock) == []
    assert inference_requests(fake) == [] and fake.runner_keep_alive("m:1") == INF
    assert [r.message for r in caplog.records].count(
        "probes disabled: this Ollama resets keep_alive on every request without one") == 1
    assert sample(metrics(poller), "ollama_probe_skipped_total", model="m:1", reason="unsupported_version") >= 3


def test_a_reload_by_a_hidden_option_is_detected_the_pin_restored_and_probes_stop(fake):
    """Finding F and B: a reload that changes neither ps context_length nor size is still seen (from
    load_duration), the pin it broke is restored at once, and with no other num_ctx to try the model is
    left alone (reload_risk), for good, until a user changes it."""
    fake.add_model("tricky:1")
    fake.load("tricky:1", keep_alive=-1, context_length=8192, options={"num_batch": 1024})  # invisible in ps
    poller, prober, clock = make(fake)
    [first] = probe_round(poller, prober, clock)
    assert first.ok and first.caused_load and first.keep_alive_restored and first.load_duration >= 0.3
    assert [e.kind for e in probe_caused(fake)] == ["reload", "keep_alive"]
    assert fake.runner_keep_alive("tricky:1") == INF  # pinned again at once
    restore = inference_requests(fake)[-1]
    assert restore.json == {"model": "tricky:1", "keep_alive": -1, "options": first_options(8192)}
    assert restore.headers["X-Forwarded-For"] == PROBE_IP
    for _ in range(4):
        assert probe_round(poller, prober, clock, advance=400) == []
    assert len(probe_caused(fake, "reload")) == 1
    text = metrics(poller)
    assert sample(text, "ollama_probe_caused_loads_total", model="tricky:1") == 1
    assert sample(text, "ollama_probe_keep_alive_restores_total", model="tricky:1") == 1
    assert sample(text, "ollama_probe_skipped_total", model="tricky:1", reason="reload_risk") >= 1
    user(fake, "tricky:1", keep_alive=-1, num_ctx=16384)  # the user changes it: probes resume
    [again] = probe_round(poller, prober, clock)
    assert again.ok and not again.caused_load and len(probe_caused(fake, "reload")) == 1


def first_options(num_ctx):
    return {"num_ctx": num_ctx, "num_predict": 16, "temperature": 0, "seed": 42}


def test_a_guessed_num_ctx_that_reloads_is_followed_by_the_other_once_after_a_user_turn(fake):
    """v0.24 with a client num_ctx above the training context: omitting it (the guess) reloads, so does
    sending ps; each once, the second only after the user has used the model again, then no more."""
    fake.version, fake.vram_gib = PROFILES["0.15.5-0.24"], 48
    fake.add_model("m:1")
    user(fake, "m:1", keep_alive=-1, num_ctx=200000)  # stored 200000, ps 131072 = training
    poller, prober, clock = make(fake)
    [first] = probe_round(poller, prober, clock)
    assert first.caused_load and first.num_ctx is None and fake.runner_keep_alive("m:1") == INF
    [same] = probe_round(poller, prober, clock)  # nobody used it: the runner is the probe's, which fits
    assert not same.caused_load and same.num_ctx is None
    user(fake, "m:1", num_ctx=200000)  # the user's next turn reloads it back (and unpins it: B, visible below)
    [second] = probe_round(poller, prober, clock)
    assert second.caused_load and second.num_ctx == 131072
    user(fake, "m:1", keep_alive=-1, num_ctx=200000)
    for _ in range(3):
        assert probe_round(poller, prober, clock) == []
    assert len(probe_caused(fake, "reload")) == 2
    assert sample(metrics(poller), "ollama_model_keep_alive_downgrades_total", model="m:1") >= 1


def test_a_probe_that_waited_behind_another_models_load_up_to_v0_11_4_caused_nothing(fake):
    fake.version = PROFILES["0.10-0.11.4"]
    fake.add_model("m:1")
    fake.add_model("big:1")
    fake.set_timing("big:1", load_time=0.6)
    fake.load("m:1", keep_alive=-1)
    poller, prober, clock = make(fake)
    clock.advance(1.0)
    poller.poll_once()
    with prober._lock:
        [job] = prober.plan(poller.snapshot)
    loading = threading.Thread(target=requests.post, args=(fake.url + "/api/generate",),
                               kwargs={"json": {"model": "big:1"}, "timeout": 10})
    loading.start()
    time.sleep(0.15)
    result = prober._run_job(job)
    loading.join()
    assert result.ok and result.load_duration >= 0.3 and not result.caused_load
    assert not probe_caused(fake)


# ----------------------------------------------------------------------------- never keep an idle model loaded
def test_forever_models_are_probed_every_interval_and_idle_finite_ones_are_not(fake):
    fake.add_model("always:on")
    fake.add_model("sometimes:on")
    fake.load("always:on", keep_alive=-1)
    fake.load("sometimes:on", keep_alive=600)
    poller, prober, clock = make(fake)
    for _ in range(4):
        probe_round(poller, prober, clock)
    assert [r.json["model"] for r in inference_requests(fake)] == ["always:on"] * 4
    assert sample(metrics(poller), "ollama_probe_skipped_total", model="sometimes:on", reason="idle") == 5  # start + 4


def test_idle_models_probe_policy_probes_everything(fake):
    fake.add_model("sometimes:on")
    fake.load("sometimes:on", keep_alive=600)
    poller, prober, clock = make(fake, probes_idle_models="probe")
    for _ in range(3):
        probe_round(poller, prober, clock)
    assert len(inference_requests(fake)) == 3


def test_a_model_in_use_is_probed_only_after_a_pause_of_one_interval(fake):
    """Finding H: a probe takes the user's only slot; it waits until the conversation has paused."""
    fake.add_model("m:1")
    fake.load("m:1", keep_alive=-1)
    poller, prober, clock = make(fake)
    for _ in range(3):  # a user turn every 0.4 s (the poll is every 0.2 s)
        user(fake, "m:1")
        assert probe_round(poller, prober, clock, advance=0.2) == []
        assert probe_round(poller, prober, clock, advance=0.2) == []
    assert sample(metrics(poller), "ollama_probe_skipped_total", model="m:1", reason="active") >= 1
    # the pause needed: the interval less 1.5 polls, the jitter and the probe (here 1 - 0.3 s), counted from
    # the poll before the one that saw the last turn, 0.4 s ago
    assert probe_round(poller, prober, clock, advance=0.2) == []
    [result] = probe_round(poller, prober, clock, advance=0.2)
    assert result.ok and len(inference_requests(fake)) == 4  # three user turns, one probe


def test_the_probes_own_touch_is_not_taken_for_traffic_when_expiry_lags(fake):
    """Finding G: Ollama restarts the idle timer only after the response has ended. Reading /api/ps at
    once took the old value as the baseline, and the probe's own touch for a user's next round."""
    fake.expiry_lag = 0.15
    fake.add_model("m:1")
    fake.load("m:1", keep_alive=600)
    poller, prober, clock = make(fake)
    user(fake, "m:1")
    [result] = probe_round(poller, prober, clock, advance=1.1)  # used, then a pause: probed once
    assert result.ok
    for _ in range(3):
        assert probe_round(poller, prober, clock) == []  # no traffic since: idle
    assert len([r for r in inference_requests(fake) if r.headers.get("X-Forwarded-For")]) == 1


def test_activity_gating_over_a_run_lets_idle_models_unload(fake):
    """The daemon's loops on real time: an idle finite-keep_alive model is not probed, is probed once
    after a burst of use has paused, and unloads about one probe interval later than without us."""
    keep_alive, interval, poll = 2.0, 0.5, 0.1
    fake.set_timing(ttft=0.02, token_gap=0.002, tokens=8, load_time=0.2)
    fake.expiry_lag = 0.01
    fake.add_model("chat:7b")
    fake.add_model("embed:small", capabilities=["embedding"])
    fake.load("chat:7b", keep_alive=keep_alive, context_length=4096)
    fake.load("embed:small", keep_alive=-1, context_length=2048)
    config = replace(Config(), ollama_url=fake.url, probes_interval=interval, probes_timeout=5.0, poll_interval=poll)
    client = OllamaClient(fake.url, 2.0)
    poller = Poller(client, poll)
    prober = Prober(client, config, lambda: poller.snapshot)
    prober.settle_delay = 0.02
    poller.probe_stats = prober.stats
    stop = threading.Event()
    poller.poll_once()
    threads = [threading.Thread(target=poller.run, args=(stop,), daemon=True),
               threading.Thread(target=prober.run, args=(stop,), daemon=True)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.6)  # idle: no probe of chat:7b may happen
        assert [r for r in inference_requests(fake) if r.json["model"] == "chat:7b"] == []
        for _ in range(3):  # a conversation (turns closer than the pause a probe waits for), then silence
            time.sleep(0.1)
            user(fake, "chat:7b", num_ctx=4096)
        last_use = time.time()
        while "chat:7b" in fake.loaded() and time.time() < last_use + keep_alive + 5:
            time.sleep(0.02)
    finally:
        stop.set()
    probes = [r for r in inference_requests(fake) if r.headers.get("X-Forwarded-For")]
    chat = [r for r in probes if r.json["model"] == "chat:7b"]
    assert len(chat) == 1, "probed once, after the conversation paused"
    [unloaded] = [e for e in fake.events if e.kind == "unload" and e.model == "chat:7b"]
    delay = unloaded.time - (last_use + keep_alive)
    assert delay <= interval + 0.1, f"unloaded {delay:.2f}s after it would have without probes"
    assert all("keep_alive" not in r.json for r in probes)
    assert all(r.json.get("options", {}).get("num_ctx") == {"chat:7b": 4096, "embed:small": 2048}[r.json["model"]]
               for r in probes)
    assert any(r.path == "/api/embed" for r in probes)  # the embedding model got embed probes
    assert not probe_caused(fake)


# ----------------------------------------------------------------------------- slots and queues
def test_a_probe_that_waited_for_a_slot_is_measured_and_the_model_left_alone(fake):
    fake.add_model("m:1")
    fake.load("m:1", keep_alive=-1)
    poller, prober, clock = make(fake)
    clock.advance(1.0)
    poller.poll_once()
    fake.set_timing(ttft=0.4, token_gap=0.001, tokens=2)
    user_turn = threading.Thread(target=user, args=(fake, "m:1"))
    user_turn.start()  # arrives between the plan and the probe, as users do
    time.sleep(0.05)
    fake.set_timing(ttft=0.01, token_gap=0.001, tokens=2)
    with prober._lock:
        jobs = prober.plan(poller.snapshot)
    [result] = [prober._run_job(job) for job in jobs]
    user_turn.join()
    assert result.ok and result.queue_wait >= 0.3 and result.load_duration < 0.1 and not result.caused_load
    assert probe_round(poller, prober, clock) == []  # left alone for two intervals, then four, ...
    text = metrics(poller)
    assert sample(text, "ollama_probe_queue_wait_seconds_bucket", model="m:1", le="0.1") == 0
    assert sample(text, "ollama_probe_skipped_total", model="m:1", reason="backoff") >= 1


def test_probes_of_one_model_never_overlap_and_run_one_at_a_time(fake):
    for name in ("a:1", "b:1", "c:1"):
        fake.add_model(name)
        fake.load(name, keep_alive=-1)
    fake.set_timing(ttft=0.3, token_gap=0.001)
    poller, prober, clock = make(fake)
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
    clock.advance(1.0)
    poller.poll_once()
    first = prober.tick()
    clock.advance(1.0)
    poller.poll_once()
    second = prober.tick()  # while the first round still runs
    assert len(first) == 3 and second == []
    assert all(f.result(timeout=10).ok for f in first)
    assert peak[0] == 1  # probes.concurrency defaults to 1
    assert sample(metrics(poller), "ollama_probe_skipped_total", model="c:1", reason="in_progress") == 1


def test_a_thousand_loaded_models_get_a_bounded_pool_of_probe_threads(fake):
    """Issue 9: 1 000 loaded models got ~1 000 probe threads whatever probes.concurrency said."""
    for i in range(1000):
        fake.add_model(f"m{i}:1")
        fake.load(f"m{i}:1", keep_alive=-1)
    fake.set_timing(ttft=0.01, token_gap=0.001, tokens=1)
    poller, prober, clock = make(fake, probes_concurrency=2)
    before = {t.ident for t in threading.enumerate()}
    clock.advance(1.0)
    poller.poll_once()
    futures = prober.tick()
    new = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("probe")]
    prober.close()  # cancel what is still queued
    assert len(futures) == 1000 and len(new) <= 2
    assert sum(f.cancelled() for f in futures) >= 900


# ----------------------------------------------------------------------------- failures
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
def test_every_failure_reason(fake, kind, params, reason):
    fake.add_model("m:1")
    fake.load("m:1", keep_alive=-1)
    fake.set_fault("/api/generate", kind, **params)
    poller, prober, clock = make(fake, probes_timeout=0.5)
    [result] = probe_round(poller, prober, clock)
    assert not result.ok and result.reason == reason, result
    text = metrics(poller)
    assert sample(text, "ollama_probe_failures_total", model="m:1", reason=reason) == 1
    assert sample(text, "ollama_probe_success", model="m:1") == 0
    assert sample(text, "ollama_probes_total", model="m:1") == 1


@pytest.mark.parametrize("fault, params", [
    ("final_fields", {"fields": {"load_duration": 10**400}}),
    ("final_fields", {"fields": {"eval_count": 10**30}}),
    ("final_fields", {"fields": {"eval_duration": -5}}),
    ("raw_final", {"line": "[" * 100_000 + "]" * 100_000}),
])
def test_one_bad_stream_never_stops_a_models_probes(fake, fault, params):
    """Issue 9: a huge load_duration or a 100 000-deep JSON line left the model "in progress" for good, and
    a huge eval_count lived on in the counters."""
    fake.add_model("m:1")
    fake.load("m:1", keep_alive=-1)
    fake.set_fault("/api/generate", fault, **params, times=1)
    poller, prober, clock = make(fake)
    [bad] = probe_round(poller, prober, clock)
    assert not bad.ok and bad.reason == "stream_error"
    [good] = probe_round(poller, prober, clock)
    assert good.ok
    text = metrics(poller)
    assert sample(text, "ollama_probe_failures_total", model="m:1", reason="stream_error") == 1
    assert sample(text, "ollama_probe_eval_tokens_total", model="m:1") == 4


def hostile_stream(body_steps) -> list:
    """A streamed /api/generate answer: chunked NDJSON headers, then `body_steps` (bytes or pauses)."""
    return [b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n",
            *[b"%x\r\n%s\r\n" % (len(s), s) if isinstance(s, bytes) else s for s in body_steps]]


@pytest.mark.parametrize("steps, reason, timeout, cpu", [
    # issue 9 item 8: probes ignored their timeout while headers dribbled in, as the poll did
    (lambda: [s for c in b"HTTP/1.1 200 OK\r\n" for s in (bytes([c]), 0.2)], "timeout", 1.0, 0.5),
    # a stream that never ends: a token line every 50 ms, no done line
    (lambda: hostile_stream([s for _ in range(400) for s in (b'{"response":"a","done":false}\n', 0.05)]),
     "timeout", 1.0, 0.5),
    # a stream without newlines: one line past MAX_LINE_BYTES (it grew memory at 0.83 core before)
    (lambda: hostile_stream([b"x" * 65536] * 20), "stream_error", 1.0, 0.5),
    # the same, a byte per chunk: its pieces are joined once, when the line ends (before: the whole line
    # so far was copied and split again per byte, 2 s of CPU for these 3 s)
    (lambda: hostile_stream([b"x"] * 100_000 + [10.0]), "timeout", 3.0, 0.75),
    # many short lines past the stream's total cap (16 MB)
    (lambda: hostile_stream([b'{"response":"a","done":false}\n' * 2000] * 300), "stream_error", 10.0, 8.0),
])
def test_a_hostile_stream_ends_the_probe_within_its_deadline(steps, reason, timeout, cpu):
    import resource

    from tests.fakes.hostile import ScriptedServer

    with ScriptedServer() as up:
        up.script("POST", "/api/generate", lambda request: steps())
        config = replace(Config(), ollama_url=up.url, probes_timeout=timeout)
        prober = Prober(OllamaClient(up.url, 1.0), config, lambda: None)
        started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_THREAD)
        result = prober.probe_once("m:1", "generate", None)
        after = resource.getrusage(resource.RUSAGE_THREAD)
        assert not result.ok and result.reason == reason, result
        assert time.monotonic() - started < timeout + 0.5
        assert after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime < cpu


def test_an_unexpected_error_is_a_stream_error_and_releases_the_model(fake, monkeypatch):
    fake.add_model("m:1")
    fake.load("m:1", keep_alive=-1)
    poller, prober, clock = make(fake)
    monkeypatch.setattr(prober, "_settle", lambda *a: 1 / 0)
    [bad] = probe_round(poller, prober, clock)
    assert bad.reason == "stream_error" and "ZeroDivisionError" in bad.message
    monkeypatch.undo()
    [good] = probe_round(poller, prober, clock)
    assert good.ok


# ----------------------------------------------------------------------------- models that go away, remote ones
def test_everything_about_a_model_the_poller_forgot_is_dropped(fake):
    fake.add_model("temp:1")
    fake.load("temp:1", keep_alive=-1)
    poller, prober, clock = make(fake)
    probe_round(poller, prober, clock)
    assert sample(metrics(poller), "ollama_probes_total", model="temp:1") == 1
    fake.unload("temp:1")
    fake.remove_model("temp:1")
    assert sample(metrics(poller), "ollama_probes_total", model="temp:1") == 1  # a counter: kept a while
    clock.advance(poller.forget_after + 1)  # poll.forget_after: in neither /api/tags nor /api/ps for that long
    text = metrics(poller)
    assert not [line for line in text.splitlines() if 'model="temp:1"' in line]
    assert prober.stats({"other:1"}) == {} and "temp:1" not in prober._state


def test_remote_models_are_refused(fake):
    fake.add_model("gpt-oss:120b-cloud")
    fake.load("gpt-oss:120b-cloud", keep_alive=-1)
    poller, prober, clock = make(fake)
    original = prober.client.ps

    def ps_with_remote():
        return [replace(m, remote=True) for m in original()]

    prober.client.ps = poller.client.ps = ps_with_remote
    for _ in range(2):
        assert probe_round(poller, prober, clock) == []
    assert inference_requests(fake) == []
    assert sample(metrics(poller), "ollama_probe_skipped_total", model="gpt-oss:120b-cloud", reason="remote") >= 1


# ----------------------------------------------------------------------------- version and num_ctx rules
@pytest.mark.parametrize("text, version", [("0.24.0", (0, 24, 0)), ("v0.33.0-rc2", (0, 33, 0)),
                                           ("0.32.15-12-gabc1234", (0, 32, 15)), ("0.1.48", (0, 1, 48))])
def test_versions_are_read_leniently(text, version):
    assert parse_version(text) == version
    assert parse_version("0.0.0") > (0, 99, 0) and parse_version("dev") > (0, 99, 0)  # source builds: newest


@pytest.mark.parametrize("version, kind, ps, train, choices", [
    ((0, 9, 6), "generate", None, 131072, (None,)),
    ((0, 12, 0), "generate", 200000, 131072, (200000,)),
    ((0, 24, 0), "generate", 131072, 131072, (None, 131072)),
    ((0, 24, 0), "generate", 8192, 131072, (8192,)),
    ((0, 24, 0), "generate", 40960, None, (40960,)),
    ((0, 32, 15), "generate", 131072, 131072, (131072,)),
    ((0, 32, 15), "embed", 512, 512, (None, 512)),
    ((0, 32, 15), "embed", 2048, 8192, (2048,)),
])
def test_num_ctx_choices(version, kind, ps, train, choices):
    assert num_ctx_choices(version, kind, ps, train) == choices


# ----------------------------------------------------------------------------- keep_alive downgrades
def test_a_pinned_model_that_becomes_finite_without_an_unload_is_counted(fake):
    fake.add_model("m:1")
    fake.load("m:1", keep_alive=-1)
    poller, prober, clock = make(fake)
    user(fake, "m:1", num_ctx=8192)  # a reload without keep_alive: OLLAMA_KEEP_ALIVE
    metrics(poller)
    user(fake, "m:1", keep_alive=-1, num_ctx=8192)
    metrics(poller)
    user(fake, "m:1", keep_alive="5m", num_ctx=8192)  # a client's finite keep_alive
    assert sample(metrics(poller), "ollama_model_keep_alive_downgrades_total", model="m:1") == 2
    user(fake, "m:1", keep_alive=-1, num_ctx=8192)
    metrics(poller)
    requests.post(fake.url + "/api/generate", json={"model": "m:1", "keep_alive": 0}, timeout=5)  # a stop
    assert sample(metrics(poller), "ollama_model_keep_alive_downgrades_total", model="m:1") == 2


# ----------------------------------------------------------------------------- the probe command
def test_probe_command_prints_a_table(fake):
    fake.add_model("qwen3:8b")
    fake.add_model("cold:1")
    fake.load("qwen3:8b", keep_alive=-1, context_length=8192)
    fake.set_timing(ttft=0.05, token_gap=0.005)
    result = subprocess.run([sys.executable, "-m", "ollama_exporter", "probe", "--ollama.url", fake.url,
                             "--count", "2", "--model", "qwen3:8b", "--model", "cold:1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "cold:1: skipped, not loaded" in lines[0]
    assert lines[1].split()[:6] == ["MODEL", "KIND", "TTFT", "TPOT", "E2E", "TOK/S"]
    rows = [line for line in lines[2:] if line.startswith("qwen3:8b")]
    assert len(rows) == 2 and all(row.rstrip().endswith("ok") for row in rows)
    assert "16 tok" in rows[0] and " ms" in rows[0]
    assert fake.loaded() == ["qwen3:8b"] and fake.loads["cold:1"] == 0
    assert all(r.headers["X-Forwarded-For"] == PROBE_IP for r in inference_requests(fake))


def test_probe_command_takes_the_same_safe_path(fake):
    fake.version, fake.vram_gib = PROFILES["0.15.5-0.24"], 48
    fake.add_model("m:1")
    user(fake, "m:1", keep_alive=-1)
    result = subprocess.run([sys.executable, "-m", "ollama_exporter", "probe", "--ollama.url", fake.url,
                             "--count", "3"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not probe_caused(fake) and fake.runner_keep_alive("m:1") == INF
    assert all("num_ctx" not in r.json["options"] for r in inference_requests(fake)[1:])
    fake.version = PROFILES["<=0.1.48"]
    result = subprocess.run([sys.executable, "-m", "ollama_exporter", "probe", "--ollama.url", fake.url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "disabled before 0.2.0" in result.stdout


def test_a_reloaded_configuration_takes_effect(fake):
    """The daemon hands a reloaded Config to the running prober: interval, header and pool size follow."""
    fake.add_model("m:1")
    fake.load("m:1", keep_alive=-1)
    poller, prober, clock = make(fake)
    prober.config = replace(prober.config, probes_interval=5.0, probes_concurrency=3,
                            probes_forwarded_for="198.51.100.9")
    assert (prober.interval, prober.jitter_max, prober._workers.size) == (5.0, 0.5, 3)
    prober.jitter_max = 0.0
    assert probe_round(poller, prober, clock, advance=2.0) == []  # the longer interval: not due yet
    [result] = probe_round(poller, prober, clock, advance=5.0)
    assert result.ok and inference_requests(fake)[-1].headers["X-Forwarded-For"] == "198.51.100.9"

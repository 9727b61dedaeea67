"""The fake Ollama behaves like each real version's scheduler, one behaviour per test, over real HTTP.

These are the behaviours a latency probe can trip over (see the prober's docstring): which num_ctx a
runner stores and /api/ps shows, what needsReload compares, what keep_alive a reload or a request
without one leaves, when the idle timer restarts, and how requests queue for the scheduler and for a
runner's slots.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterator

import pytest
import requests

from tests.fakes.ollama import INF, PROFILES, Behaviour, FakeOllama, version_tuple

TRAIN = 131072  # the default fake model's training context (llama3.1)
PROBE = {"X-Forwarded-For": "192.0.2.1"}


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama() as f:
        f.set_timing(ttft=0.01, token_gap=0.001, tokens=3, load_time=0.05)
        f.add_model("m:1")
        f.add_model("e:1", capabilities=["embedding"], context_length=512, family="bert")
        yield f


def at(fake: FakeOllama, profile: str, vram_gib: float = 48) -> FakeOllama:
    fake.version, fake.vram_gib = PROFILES[profile], vram_gib
    return fake


def gen(fake: FakeOllama, model: str = "m:1", prompt: str = "hi", headers: dict | None = None,
        **fields: Any) -> dict[str, Any]:
    r = requests.post(fake.url + "/api/generate", json={"model": model, "prompt": prompt, "stream": False, **fields},
                      headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def embed(fake: FakeOllama, model: str = "e:1", **fields: Any) -> dict[str, Any]:
    r = requests.post(fake.url + "/api/embed", json={"model": model, "input": "hi", **fields}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def ps(fake: FakeOllama) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in requests.get(fake.url + "/api/ps", timeout=5).json()["models"]}


def in_flight(fake: FakeOllama, model: str = "m:1", **fields: Any) -> Iterator[bytes]:
    """A streamed request whose first line has arrived: iterate the rest to end it."""
    r = requests.post(fake.url + "/api/generate", json={"model": model, "prompt": "x", **fields}, stream=True,
                      timeout=10)
    lines = r.iter_lines()
    next(lines)
    return lines


def kinds(fake: FakeOllama) -> list[str]:
    return [e.kind for e in fake.events if e.kind in ("load", "reload")]


def test_version_behaviours_and_profiles() -> None:
    assert version_tuple("0.33.0-rc2") == (0, 33, 0) and version_tuple("0.32.15-12-gabc1234") == (0, 32, 15)
    assert version_tuple("0.0.0") >= (0, 33, 0) and version_tuple("garbage") >= (0, 33, 0)  # source builds
    old, mid, new = (Behaviour(version_tuple(PROFILES[p])) for p in ("<=0.1.48", "0.15.5-0.24", ">=0.30"))
    assert old.keep_alive_reset and not mid.keep_alive_reset and old.pending_queue and not mid.pending_queue
    assert (old.ps_context, Behaviour((0, 12, 0)).ps_context, mid.ps_context) == ("none", "configured", "clamped")
    assert not mid.v030_rules and new.v030_rules
    assert [Behaviour(v).default_num_ctx(48) for v in ((0, 5, 7), (0, 9, 6), (0, 15, 4))] == [2048, 4096, 4096]
    assert [mid.default_num_ctx(g) for g in (48, 47, 24, 23, 22)] == [262144, 262144, 32768, 32768, 4096]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_api_version_per_profile(fake: FakeOllama, profile: str) -> None:
    at(fake, profile)
    assert requests.get(fake.url + "/api/version", timeout=5).json() == {"version": PROFILES[profile]}


# ----------------------------------------------------------------------------- keep_alive
def test_v0_1_48_resets_keep_alive_on_a_request_without_one(fake: FakeOllama) -> None:
    at(fake, "<=0.1.48")
    gen(fake, keep_alive=-1)
    assert fake.runner_keep_alive("m:1") == INF
    gen(fake, headers=PROBE)
    assert fake.runner_keep_alive("m:1") == 300.0
    [reset] = [e for e in fake.events if e.kind == "keep_alive"]
    assert (reset.cause, reset.client, reset.previous, reset.keep_alive, reset.unpinned) == \
        ("reset", "192.0.2.1", INF, 300.0, True)


@pytest.mark.parametrize("profile", [p for p in PROFILES if p != "<=0.1.48"])
def test_v0_2_keeps_keep_alive_on_a_request_without_one(fake: FakeOllama, profile: str) -> None:
    at(fake, profile)
    gen(fake, keep_alive=-1)
    gen(fake)
    assert fake.runner_keep_alive("m:1") == INF and not any(e.kind == "keep_alive" for e in fake.events)
    gen(fake, keep_alive="1m")
    assert fake.runner_keep_alive("m:1") == 60.0


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_a_reload_takes_the_default_keep_alive(fake: FakeOllama, profile: str) -> None:
    at(fake, profile)
    gen(fake, keep_alive=-1, options={"num_ctx": 8192})
    gen(fake, options={"num_ctx": 4096}, headers=PROBE)  # a different num_ctx on every version
    assert kinds(fake) == ["load", "reload"] and fake.runner_keep_alive("m:1") == 300.0
    reload = fake.caused_by("192.0.2.1", "reload")[0]
    assert reload.unpinned and reload.cause == "num_ctx 4096 != 8192"


# ----------------------------------------------------------------------------- num_ctx: ps, default, needsReload
@pytest.mark.parametrize("profile, shown", [("0.2-0.9", None), ("0.10-0.11.4", 200000), ("0.11.5-0.15.4", 200000),
                                            ("0.15.5-0.24", TRAIN), (">=0.30", TRAIN)])
def test_ps_context_length_absent_configured_or_clamped(fake: FakeOllama, profile: str, shown: int | None) -> None:
    at(fake, profile)
    gen(fake, options={"num_ctx": 200000})  # above the training context
    assert ps(fake)["m:1"].get("context_length") == shown


@pytest.mark.parametrize("vram, default", [(48, 262144), (24, 32768), (16, 4096)])
def test_default_num_ctx_is_the_vram_tier_from_v0_15_5(fake: FakeOllama, vram: float, default: int) -> None:
    at(fake, "0.15.5-0.24", vram)
    fake.add_model("long:1", context_length=1_000_000)
    gen(fake, "long:1")
    assert ps(fake)["long:1"]["context_length"] == default
    at(fake, "0.11.5-0.15.4", vram)
    gen(fake, "long:1", options={"num_ctx": 4096})  # 0.15.4's default is 4096 whatever the VRAM
    assert kinds(fake)[-1] == ("load" if default == 4096 else "reload")


def test_v0_24_reloads_when_a_request_sends_the_clamped_ps_value(fake: FakeOllama) -> None:
    """Finding A: ps shows 131072 (clamped), the runner stores 262144 (unclamped), needsReload compares raw."""
    at(fake, "0.15.5-0.24")
    gen(fake)  # auto: 262144 stored
    assert ps(fake)["m:1"]["context_length"] == TRAIN
    gen(fake, options={"num_ctx": TRAIN}, headers=PROBE)
    assert kinds(fake) == ["load", "reload"]
    assert ps(fake)["m:1"]["context_length"] == TRAIN  # nothing visible changed
    gen(fake)  # the user's next request: 262144 again
    assert kinds(fake) == ["load", "reload", "reload"]
    gen(fake, headers=PROBE)  # omitting num_ctx matches the automatic runner
    assert kinds(fake) == ["load", "reload", "reload"]


def test_v0_24_sending_ps_matches_a_runner_loaded_below_the_training_context(fake: FakeOllama) -> None:
    at(fake, "0.15.5-0.24")
    gen(fake, options={"num_ctx": 8192})
    gen(fake, options={"num_ctx": ps(fake)["m:1"]["context_length"]}, headers=PROBE)
    assert kinds(fake) == ["load"]


@pytest.mark.parametrize("profile", ["0.10-0.11.4", "0.11.5-0.15.4"])
def test_v0_10_to_v0_15_4_sending_ps_always_matches(fake: FakeOllama, profile: str) -> None:
    at(fake, profile)
    for options in ({}, {"num_ctx": 200000}, {"num_ctx": 2048}):
        fake.unload("m:1")
        gen(fake, options=options)
        loads = len(kinds(fake))
        gen(fake, options={"num_ctx": ps(fake)["m:1"]["context_length"]}, headers=PROBE)
        assert len(kinds(fake)) == loads and not fake.caused_by("192.0.2.1", "reload")


def test_v0_30_clamps_the_request_and_matches_ps(fake: FakeOllama) -> None:
    at(fake, ">=0.30")
    gen(fake, options={"num_ctx": 200000})  # stored: 131072, the effective value
    gen(fake, options={"num_ctx": TRAIN}, headers=PROBE)
    gen(fake, options={"num_ctx": 150000}, headers=PROBE)  # clamped to 131072 as well
    assert kinds(fake) == ["load"]
    at(fake, "0.15.5-0.24")
    fake.unload("m:1")
    gen(fake, options={"num_ctx": 200000})
    gen(fake, options={"num_ctx": TRAIN}, headers=PROBE)
    assert kinds(fake) == ["load", "load", "reload"]


def test_v0_30_automatic_equals_automatic(fake: FakeOllama) -> None:
    """An automatic runner matches any automatic request, even when the default has changed since."""
    at(fake, ">=0.30", vram_gib=48)
    fake.add_model("long:1", context_length=1_000_000)
    gen(fake, "long:1")
    fake.vram_gib = 24  # a different default (as after a load that ran out of memory)
    gen(fake, "long:1", headers=PROBE)
    assert kinds(fake) == ["load"]
    at(fake, "0.15.5-0.24", vram_gib=48)
    fake.unload("long:1")
    gen(fake, "long:1")
    fake.vram_gib = 24
    gen(fake, "long:1", headers=PROBE)
    assert kinds(fake) == ["load", "load", "reload"]


def test_v0_30_embedding_num_batch_follows_num_ctx(fake: FakeOllama) -> None:
    """Finding E: an embedding request's num_ctx also sets num_batch = min(2048, num_ctx), compared."""
    at(fake, ">=0.30")
    embed(fake)  # automatic: num_ctx 262144 -> 512 effective, num_batch 2048
    assert ps(fake)["e:1"]["context_length"] == 512
    embed(fake)  # omitting num_ctx: 2048 again, no reload
    assert kinds(fake) == ["load"]
    embed(fake, options={"num_ctx": 512})  # = ps = training context: num_batch 512 != 2048
    assert kinds(fake) == ["load", "reload"]
    assert fake.events[-1].cause == "num_batch 512 != 2048"
    at(fake, "0.15.5-0.24")
    fake.unload("e:1")
    embed(fake)
    embed(fake)
    assert kinds(fake)[2:] == ["load"]


def test_v0_30_compares_context_shift(fake: FakeOllama) -> None:
    at(fake, ">=0.30")
    gen(fake, shift=False)
    gen(fake, headers=PROBE)  # shift absent resolves to true
    assert kinds(fake) == ["load", "reload"] and fake.events[-1].cause == "shift"
    at(fake, "0.15.5-0.24")
    fake.unload("m:1")
    gen(fake, shift=False)
    gen(fake, headers=PROBE)
    assert kinds(fake)[2:] == ["load"]


def test_hidden_load_time_options_reload_on_every_version(fake: FakeOllama) -> None:
    for profile in PROFILES:
        at(fake, profile)
        fake.unload("m:1")
        gen(fake, options={"num_ctx": 8192, "num_batch": 1024, "num_gpu": -1})
        gen(fake, options={"num_ctx": 8192}, headers=PROBE)
        assert kinds(fake)[-1] == "reload", profile
        gen(fake, options={"num_ctx": 8192, "num_gpu": -1, "temperature": 0, "seed": 1}, headers=PROBE)
        assert kinds(fake)[-1] == "reload", profile  # runtime options and num_gpu -1 never reload


def test_runner_size_follows_its_context(fake: FakeOllama) -> None:
    at(fake, "0.2-0.9")
    fake.add_model("kv:1", size=1000, kv_bytes_per_token=2)
    gen(fake, "kv:1", options={"num_ctx": 4096})
    small = ps(fake)["kv:1"]["size"]
    gen(fake, "kv:1", options={"num_ctx": 8192})
    assert small == 1000 + 2 * 4096 * 4 and ps(fake)["kv:1"]["size"] == 1000 + 2 * 8192 * 4  # 4 slots before v0.10


# ----------------------------------------------------------------------------- the idle timer
def test_expiry_is_set_after_the_response_has_ended(fake: FakeOllama) -> None:
    """Finding G: a client that reads /api/ps right after the final chunk sees the old expires_at."""
    fake.load("m:1", keep_alive=600)
    before = ps(fake)["m:1"]["expires_at"]
    fake.expiry_lag = 0.3
    final = gen(fake)
    assert final["done"] and ps(fake)["m:1"]["expires_at"] == before
    fake.wait_settled()
    assert ps(fake)["m:1"]["expires_at"] > before


def test_during_the_first_request_after_a_load_ps_shows_now_plus_keep_alive(fake: FakeOllama) -> None:
    fake.set_timing(ttft=0.01, token_gap=0.1, tokens=4, load_time=0.01)
    lines = in_flight(fake, keep_alive="1m")
    first = ps(fake)["m:1"]["expires_at"]
    time.sleep(0.12)
    assert ps(fake)["m:1"]["expires_at"] > first  # moving with the clock
    list(lines)


def test_ollama_stop_during_a_request_unloads_when_it_ends(fake: FakeOllama) -> None:
    fake.set_timing(ttft=0.01, token_gap=0.1, tokens=5, load_time=0.01)
    fake.load("m:1", keep_alive=-1)
    lines = in_flight(fake)
    assert gen(fake, prompt="", keep_alive=0)["done_reason"] == "unload"  # what `ollama stop` sends
    assert "m:1" in ps(fake) and ps(fake)["m:1"]["expires_at"][:4] != "2318"  # "Stopping..."
    list(lines)
    fake.wait_settled()
    assert ps(fake) == {}
    assert [(e.kind, e.cause) for e in fake.events] == [("unload", "stopped")]
    gen(fake)  # a request after the stop loads it again, with the default keep_alive
    assert kinds(fake) == ["load"] and fake.runner_keep_alive("m:1") == 300.0


def test_eviction_keeps_ps_unchanged_until_the_request_ends(fake: FakeOllama) -> None:
    fake.set_timing(ttft=0.01, token_gap=0.1, tokens=4, load_time=0.01)
    fake.load("m:1", keep_alive=-1)
    lines = in_flight(fake)
    fake.evict("m:1")
    assert ps(fake)["m:1"]["expires_at"][:2] == "23"  # still "forever" in ps
    list(lines)
    fake.wait_settled()
    assert ps(fake) == {} and fake.events[-1].cause == "evicted"


def test_max_loaded_models_evicts_the_idle_runner_with_the_shortest_keep_alive(fake: FakeOllama) -> None:
    fake.add_model("other:1")
    fake.add_model("third:1")
    fake.max_loaded_models = 2
    fake.load("m:1", keep_alive=-1)
    fake.load("other:1", keep_alive=60)
    gen(fake, "third:1")
    assert sorted(ps(fake)) == ["m:1", "third:1"]
    assert [(e.kind, e.model, e.cause) for e in fake.events] == [("unload", "other:1", "evicted"),
                                                                  ("load", "third:1", "cold")]


def test_v0_1_48_unload_request_loads_the_model_first(fake: FakeOllama) -> None:
    at(fake, "<=0.1.48")
    gen(fake, prompt="", keep_alive=0)
    fake.wait_settled()
    assert ps(fake) == {} and [e.kind for e in fake.events] == ["load", "unload"]
    at(fake, ">=0.30")
    gen(fake, prompt="", keep_alive=0)
    assert [e.kind for e in fake.events] == ["load", "unload"]


# ----------------------------------------------------------------------------- queues
def stream_times(fake: FakeOllama, model: str, out: list, headers: dict | None = None) -> None:
    sent = time.monotonic()
    r = requests.post(fake.url + "/api/generate", json={"model": model, "prompt": "x"}, stream=True,
                      headers=headers, timeout=10)
    lines = [(time.monotonic(), json.loads(line)) for line in r.iter_lines() if line]
    out.append((sent, lines[0][0], lines[-1][0], lines[-1][1]))


def test_one_slot_a_request_waits_for_the_one_in_flight(fake: FakeOllama) -> None:
    fake.set_timing(ttft=0.1, token_gap=0.05, tokens=4, load_time=0.01)
    fake.load("m:1", keep_alive=-1)
    first, second = [], []
    t = threading.Thread(target=stream_times, args=(fake, "m:1", first))
    t.start()
    time.sleep(0.05)
    stream_times(fake, "m:1", second, PROBE)
    t.join()
    (_, _, first_end, _), (sent, first_token, _, final) = first[0], second[0]
    assert first_token >= first_end  # FIFO: not a token before the first request is done
    wait = final["total_duration"] - final["load_duration"] - final["prompt_eval_duration"] - final["eval_duration"]
    assert wait >= 0.15e9 and final["load_duration"] < 0.05e9  # the wait is not in load_duration


def test_slots_per_runner_come_from_num_parallel(fake: FakeOllama) -> None:
    fake.set_timing(ttft=0.2, token_gap=0.01, tokens=2, load_time=0.01)
    fake.num_parallel = 2
    fake.load("m:1", keep_alive=-1)
    results: list = []
    threads = [threading.Thread(target=stream_times, args=(fake, "m:1", results)) for _ in range(2)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - t0 < 0.38  # two at once, not one after the other


@pytest.mark.parametrize("profile, waits", [("0.10-0.11.4", True), ("0.11.5-0.15.4", False)])
def test_up_to_v0_11_4_a_resident_model_waits_behind_another_models_load(fake: FakeOllama, profile: str,
                                                                          waits: bool) -> None:
    at(fake, profile)
    fake.add_model("big:1")
    fake.set_timing(ttft=0.01, token_gap=0.001, tokens=2, load_time=0.01)
    fake.set_timing("big:1", ttft=0.01, token_gap=0.001, tokens=2, load_time=0.4)
    fake.load("m:1", keep_alive=-1)
    loading = threading.Thread(target=gen, args=(fake, "big:1"))
    loading.start()
    time.sleep(0.1)
    final = gen(fake, headers=PROBE)
    loading.join()
    assert (final["load_duration"] >= 0.2e9) is waits
    assert not fake.caused_by("192.0.2.1", "load") and not fake.caused_by("192.0.2.1", "reload")

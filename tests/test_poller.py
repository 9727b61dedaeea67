"""The polling loop against the fake Ollama over real loopback HTTP: caching, events, failures, staleness."""

from __future__ import annotations

import time

import pytest

from ollama_exporter.exposition import render
from ollama_exporter.ollama import OllamaClient
from ollama_exporter.poller import Poller
from tests.conftest import FIXTURES, run_python, sample


def make_poller(fake, timeout: float = 1.0, clock=time.time, settle: bool = True) -> Poller:
    """A poller that waits for new /api/show answers within each poll, so one poll shows them."""
    poller = Poller(OllamaClient(fake.url, timeout), interval=5.0, clock=clock)
    poller.settle_shows = settle
    return poller


def status(snapshot, source):
    return {s.name: s for s in snapshot.sources}[source]


def text(snapshot) -> str:
    return render(snapshot)[0].decode()


def test_first_poll_reads_everything_and_steady_state_makes_zero_show_calls(fake_ollama):
    fake_ollama.add_model("qwen3:8b", family="qwen3", context_length=40960, capabilities=["completion", "tools"])
    fake_ollama.add_model("nomic-embed-text", family="nomic-bert", capabilities=["embedding"])
    same = fake_ollama.add_model("deepseek-r1:8b", family="qwen3")
    fake_ollama.add_model("deepseek-r1:latest", family="qwen3", digest=same["digest"])  # alias: one digest
    fake_ollama.load("qwen3:8b", context_length=8192)
    poller = make_poller(fake_ollama)

    snap = poller.poll_once()
    assert snap.up and snap.version == "0.32.15"
    assert fake_ollama.count("/api/show") == 3  # one per distinct manifest digest
    t = text(snap)
    assert sample(t, "ollama_model_context_length", model="qwen3:8b") == 40960
    assert sample(t, "ollama_model_capability", model="nomic-embed-text:latest", capability="embedding") == 1
    assert sample(t, "ollama_model_parameters", model="deepseek-r1:latest") == 8_030_261_248  # via the shared digest
    assert sample(t, "ollama_loaded_model_context_length", model="qwen3:8b") == 8192

    fake_ollama.reset_requests()
    for _ in range(5):
        snap = poller.poll_once()
    assert fake_ollama.count("/api/show") == 0
    assert fake_ollama.count("/api/ps") == 5 and fake_ollama.count("/api/tags") == 5
    assert status(snap, "show").up


def test_show_cache_follows_the_installed_set(fake_ollama):
    fake_ollama.add_model("a:1")
    poller = make_poller(fake_ollama)
    poller.poll_once()
    fake_ollama.remove_model("a:1")
    snap = poller.poll_once()
    assert snap.installed == () and "ollama_model_info{" not in text(snap)
    fake_ollama.reset_requests()
    fake_ollama.add_model("a:1", context_length=2048, digest="f" * 64)  # re-pulled: new manifest digest
    snap = poller.poll_once()
    assert fake_ollama.count("/api/show") == 1
    assert sample(text(snap), "ollama_model_context_length", model="a:1") == 2048


def test_loads_and_unloads_between_polls_are_counted_and_series_follow(fake_ollama):
    fake_ollama.add_model("llama3.2:3b")
    poller = make_poller(fake_ollama)
    t = text(poller.poll_once())
    assert sample(t, "ollama_model_loads_total", model="llama3.2:3b") == 0  # initialised for rate()

    fake_ollama.load("llama3.2:3b", size=3_000_000_000, size_vram=2_000_000_000, context_length=4096)
    t = text(poller.poll_once())
    assert sample(t, "ollama_model_loads_total", model="llama3.2:3b") == 1
    assert sample(t, "ollama_loaded_model_vram_bytes", model="llama3.2:3b") == 2_000_000_000

    fake_ollama.unload("llama3.2:3b")
    t = text(poller.poll_once())
    assert sample(t, "ollama_model_unloads_total", model="llama3.2:3b") == 1
    assert "ollama_loaded_model_" not in "".join(l for l in t.splitlines() if not l.startswith("#"))

    fake_ollama.load("llama3.2:3b", context_length=4096)
    poller.poll_once()
    fake_ollama.load("llama3.2:3b", context_length=8192)  # reloaded with another num_ctx between polls
    t = text(poller.poll_once())
    assert sample(t, "ollama_model_loads_total", model="llama3.2:3b") == 3
    assert sample(t, "ollama_model_unloads_total", model="llama3.2:3b") == 2


def test_a_removed_models_counters_stay_but_its_gauges_go(fake_ollama):
    fake_ollama.add_model("gone:1")
    fake_ollama.load("gone:1")
    poller = make_poller(fake_ollama)
    poller.poll_once()
    fake_ollama.unload("gone:1")
    fake_ollama.remove_model("gone:1")
    t = text(poller.poll_once())
    assert sample(t, "ollama_model_unloads_total", model="gone:1") == 1
    assert sample(t, "ollama_model_size_bytes", model="gone:1") is None
    assert sample(t, "ollama_loaded_model_size_bytes", model="gone:1") is None


def test_a_hung_endpoint_costs_one_timeout_and_never_blocks_the_others(fake_ollama):
    fake_ollama.add_model("m:1")
    fake_ollama.set_fault("/api/ps", "hang")
    poller = make_poller(fake_ollama, timeout=0.5)
    started = time.monotonic()
    snap = poller.poll_once()
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, f"poll took {elapsed:.2f}s with one hung endpoint"
    assert not snap.up
    assert status(snap, "ps").error == "timeout"
    assert status(snap, "tags").up and status(snap, "version").up
    assert [m.name for m in snap.installed] == ["m:1"]
    fake_ollama.clear_faults()
    assert poller.poll_once().up


@pytest.mark.parametrize(
    "kind, params, reason",
    [
        ("status", {"code": 500, "body": "boom"}, "http_5xx"),
        ("status", {"code": 503, "body": "server busy, please try again.  maximum pending requests exceeded"},
         "http_5xx"),
        ("status", {"code": 404, "body": None}, "http_4xx"),
        ("garbage", {}, "invalid_response"),
        ("reset", {}, "connection"),
        ("truncate", {}, "connection"),
        ("hang", {}, "timeout"),
    ],
)
def test_failures_are_counted_by_reason(fake_ollama, kind, params, reason):
    fake_ollama.set_fault("/api/version", kind, **params)
    snap = make_poller(fake_ollama, timeout=0.3).poll_once()
    assert not snap.up
    assert status(snap, "version").error == reason
    assert snap.errors_total[("version", reason)] == 1
    assert sum(v for (src, _), v in snap.errors_total.items() if src == "version") == 1


def test_refused_connections_then_recovery(fake_ollama):
    fake_ollama.add_model("m:1")
    fake_ollama.load("m:1")
    poller = make_poller(fake_ollama)
    assert poller.poll_once().up
    fake_ollama.refuse_connections()
    snap = poller.poll_once()
    assert not snap.up and status(snap, "ps").error == "connection"
    assert snap.loaded == ()  # loaded state is unknown while Ollama is unreachable
    assert [m.name for m in snap.installed] == ["m:1"]  # the inventory stays, marked stale
    fake_ollama.accept_connections()
    snap = poller.poll_once()
    assert snap.up and [m.name for m in snap.loaded] == ["m:1"]
    # the model stayed loaded through the outage: no load event is invented
    assert snap.loads_total["m:1"] == 0 and snap.unloads_total["m:1"] == 0


def test_stale_tags_keep_their_last_success_timestamp(fake_ollama):
    now = [1000.0]
    fake_ollama.add_model("m:1")
    poller = make_poller(fake_ollama, clock=lambda: now[0])
    poller.poll_once()
    fake_ollama.set_fault("/api/tags", "status", code=500, body="disk error")
    now[0] = 1005.0
    snap = poller.poll_once()
    tags = status(snap, "tags")
    assert not tags.up and tags.last_success == 1000.0 and tags.error == "http_5xx"
    assert [m.name for m in snap.installed] == ["m:1"]
    assert snap.up  # /api/tags is not part of ollama_up


def test_show_failures_back_off_and_retry(fake_ollama):
    now = [1000.0]
    fake_ollama.add_model("m:1")
    fake_ollama.set_fault("/api/show", "status", code=500, body="cannot read blob")
    poller = make_poller(fake_ollama, clock=lambda: now[0])
    snap = poller.poll_once()
    assert status(snap, "show").error == "http_5xx"
    assert sample(text(snap), "ollama_model_info", model="m:1", digest=snap.installed[0].digest, family="llama",
                  parameter_size="8.0B", quantization="Q4_K_M", format="gguf") == 1  # tags data still exported
    fake_ollama.clear_faults()
    fake_ollama.reset_requests()
    now[0] = 1001.0
    poller.poll_once()
    assert fake_ollama.count("/api/show") == 0  # backing off
    now[0] = 1006.0
    snap = poller.poll_once()
    assert fake_ollama.count("/api/show") == 1 and status(snap, "show").up
    assert sample(text(snap), "ollama_model_context_length", model="m:1") == 131072


def test_captured_show_bodies_from_real_servers_feed_the_metrics(fake_ollama):
    show = FIXTURES / "api" / "show"
    fake_ollama.add_model_from_fixture(show / "show_llama3.2-3b_crewai_2025-01-10.json", "llama3.2:3b")
    fake_ollama.add_model_from_fixture(show / "show_llama3.1-8b_tensors_capabilities_crewai_2025-05-07.json",
                                       "llama3.1:8b")
    t = text(make_poller(fake_ollama).poll_once())
    assert sample(t, "ollama_model_context_length", model="llama3.2:3b") == 131072
    assert sample(t, "ollama_model_parameters", model="llama3.2:3b") == 3212749888
    assert sample(t, "ollama_model_capability", model="llama3.1:8b", capability="tools") == 1


def test_old_server_shapes(fake_ollama):
    """Pre-v0.10 ps rows (no size_vram/context_length) and pre-`model`-key tags rows still export."""
    fake_ollama.version = "0.1.41"
    fake_ollama.add_model("zephyr:latest", families=None, tags_shape="pre_model_key", capabilities=None)
    fake_ollama.load("zephyr:latest", ps_shape="old")
    t = text(make_poller(fake_ollama).poll_once())
    assert sample(t, "ollama_build_info", version="0.1.41") == 1
    assert sample(t, "ollama_loaded_model_size_bytes", model="zephyr:latest") == 4_920_000_000
    assert sample(t, "ollama_loaded_model_vram_bytes", model="zephyr:latest") is None
    assert sample(t, "ollama_loaded_model_context_length", model="zephyr:latest") is None
    assert "ollama_model_capability{" not in t


def test_an_unchanged_inventory_is_the_same_objects_in_the_next_snapshot(fake_ollama):
    """What did not change is handed on as the very same objects, so its metrics are not rendered again."""
    fake_ollama.add_model("qwen3:8b")
    fake_ollama.add_model("gemma3:4b")
    fake_ollama.load("qwen3:8b")
    poller = make_poller(fake_ollama)
    first, second = poller.poll_once(), poller.poll_once()
    assert second.installed is first.installed and second.loaded[0] is first.loaded[0]
    assert second.loads_total is first.loads_total
    fake_ollama.add_model("llama3.2:1b")
    fake_ollama.unload("qwen3:8b")
    third = poller.poll_once()
    assert third.installed is not first.installed and len(third.installed) == 3
    assert {m.name: m for m in third.installed}["gemma3:4b"] is {m.name: m for m in first.installed}["gemma3:4b"]
    assert third.loaded == () and third.unloads_total["qwen3:8b"] == 1
    assert sample(text(third), "ollama_model_size_bytes", model="llama3.2:1b") == 4_920_000_000


def test_what_the_daemon_keeps_per_listed_model_is_a_few_dozen_small_objects():
    """The memory a burst of model names leaves behind follows how many small objects each listed model
    holds while it is listed: the client's reuse state, the parsed rows and /api/show answers, the
    joined models and the metrics' rows. Each decoded row and show answer held its own copies of the
    server's few formats, families, quantizations and capability lists, and each model object its own
    attribute dict: 67 small objects per model, where a few dozen remain. In a child process, with its
    own fake Ollama, so that no other test's threads allocate while it counts."""
    check = r'''
import gc, os, tracemalloc
import ollama_exporter
from ollama_exporter.exposition import Exposition, render
from ollama_exporter.ollama import OllamaClient
from ollama_exporter.poller import Poller
from tests.fakes.ollama import FakeOllama

models, fake = 300, FakeOllama().start()
poller, exposition = Poller(OllamaClient(fake.url, 10.0), interval=5.0), Exposition(runtime_metrics=False)
poller.settle_shows = True
for i in range(models):
    fake.add_model(f"burst-{i}:q4", capabilities=["completion", "tools"])
    if i % 3 == 0:
        fake.load(f"burst-{i}:q4")
exposition.update(poller.poll_once())
for i in range(models):  # the same models under other names: new rows, the same kind of values
    fake.remove_model(f"burst-{i}:q4")
    fake.add_model(f"other-{i}:q4", capabilities=["completion", "tools"])
    if i % 3 == 0:
        fake.load(f"other-{i}:q4")
ours = [tracemalloc.Filter(True, os.path.join(os.path.dirname(ollama_exporter.__file__), "*"), all_frames=True)]
tracemalloc.start(8)
exposition.update(poller.poll_once())
exposition.update(snapshot := poller.poll_once())
gc.collect()  # a full collection empties the free lists, whose tuples tracemalloc counts as allocated
kept = [t for t in tracemalloc.take_snapshot().filter_traces(ours).traces if t.size <= 512]
tracemalloc.stop()
assert 'model="other-299:q4"' in render(snapshot)[0].decode()
print(len(kept) / models)
fake.stop()
'''
    assert float(run_python(check, timeout=120)) < 40  # 67 before

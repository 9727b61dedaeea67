"""A hostile or broken upstream must never blind /metrics, freeze the data, or outlive a deadline.

Each test is an attack that broke the exporter before (issue 9): the scripted server sends exactly the
bytes a test gives it, over loopback, for a bounded time.
"""

from __future__ import annotations

import gzip
import json
import time

import pytest
import requests

from ollama_exporter.exposition import Exposition
from ollama_exporter.ollama import OllamaClient, OllamaError
from ollama_exporter.poller import Poller
from tests.conftest import sample, wait_for
from tests.fakes.hostile import ScriptedServer, drip, head

DIGEST = "a" * 64


def row(name="m:1", **extra) -> dict:
    return {"name": name, "model": name, "digest": DIGEST, "size": 100, "size_vram": 50,
            "expires_at": "2026-12-01T10:00:00Z", "context_length": 4096,
            "details": {"family": "llama", "parameter_size": "8B", "quantization_level": "Q4_0", "format": "gguf"},
            **extra}


def serve(up: ScriptedServer, ps_rows: list, tags_rows: list | None = None, version: str = "0.30.0") -> None:
    up.reply("GET", "/api/version", body=json.dumps({"version": version}).encode())
    up.reply("GET", "/api/ps", body=json.dumps({"models": ps_rows}).encode())
    up.reply("GET", "/api/tags", body=json.dumps({"models": ps_rows if tags_rows is None else tags_rows}).encode())
    up.reply("POST", "/api/show", body=b'{"model_info": {"general.architecture": "llama", "llama.context_length": 8192}}')


@pytest.fixture
def up():
    with ScriptedServer() as server:
        yield server


def exposition_after_polls(up: ScriptedServer, polls: int = 1, **kwargs) -> tuple[Exposition, Poller]:
    poller = Poller(OllamaClient(up.url, 1.0, **kwargs), 1.0)
    poller.settle_shows = True
    exposition = Exposition(runtime_metrics=False)
    poller.subscribe(exposition.update)
    for _ in range(polls):
        poller.poll_once()
    return exposition, poller


# --- values that broke every scrape (sometimes until restart) ---

@pytest.mark.parametrize("field, value", [
    ("size", 10**300), ("size", -5), ("size", 1e308), ("size_vram", "12"), ("context_length", 10**40),
    ("size", True),
])
def test_an_out_of_range_number_is_left_out_and_the_rest_is_reported(up, field, value):
    serve(up, [row(**{field: value}), row("ok:1")])
    exposition, _ = exposition_after_polls(up)
    text = exposition.get().data.decode()
    assert exposition.healthy and sample(text, "ollama_up") == 1
    metric = {"size": "ollama_loaded_model_size_bytes", "size_vram": "ollama_loaded_model_vram_bytes",
              "context_length": "ollama_loaded_model_context_length"}[field]
    assert sample(text, metric, model="m:1") is None  # left out, never something made up
    assert sample(text, "ollama_loaded_model_size_bytes", model="ok:1") == 100


def test_a_lone_surrogate_name_drops_its_row_and_nothing_lives_on(up):
    body = json.dumps({"models": [row("ok:1")]})[:-2] + ', ' + json.dumps(row("X"))[:-1] + "}]}"
    body = body.replace('"X"', '"bad\\ud800name"')  # the JSON escape of a lone surrogate
    up.reply("GET", "/api/version", body=b'{"version":"0.30.0"}')
    up.reply("GET", "/api/ps", body=body.encode())
    up.reply("GET", "/api/tags", body=body.encode())
    exposition, poller = exposition_after_polls(up, polls=2)
    text = exposition.get().data.decode()
    assert exposition.healthy and sample(text, "ollama_up") == 1
    assert sample(text, "ollama_model_info", model="ok:1", digest=DIGEST, family="llama", parameter_size="8B",
                  quantization="Q4_0", format="gguf") == 1
    assert sample(text, "ollama_exporter_dropped_models_total", source="ps", reason="invalid") == 2
    assert "\\ud800" not in text and "bad" not in text


def test_nan_and_infinity_make_the_answer_invalid_not_the_exposition(up):
    up.reply("GET", "/api/version", body=b'{"version":"0.30.0"}')
    up.reply("GET", "/api/ps", body=b'{"models":[{"name":"m:1","size":NaN}]}')
    up.reply("GET", "/api/tags", body=b'{"models":[{"name":"m:1","size":Infinity}]}')
    exposition, _ = exposition_after_polls(up)
    text = exposition.get().data.decode()
    assert exposition.healthy
    assert sample(text, "ollama_exporter_source_errors_total", source="ps", reason="invalid_response") == 1
    assert sample(text, "ollama_exporter_source_errors_total", source="tags", reason="invalid_response") == 1


def test_duplicate_names_keep_the_first_row(up):
    serve(up, [row("m:1", size=1), row("m:1", size=2)])
    exposition, _ = exposition_after_polls(up)
    text = exposition.get().data.decode()
    assert sample(text, "ollama_loaded_model_size_bytes", model="m:1") == 1
    assert sample(text, "ollama_exporter_dropped_models_total", source="ps", reason="duplicate") == 1


def test_an_impossible_expiry_loses_that_field_not_the_whole_answer(up):
    """Month 13 used to reject all of /api/ps: OllamaDown paged while Ollama was up."""
    serve(up, [row(expires_at="2026-13-01T00:00:00Z"), row("ok:1", expires_at="2026-02-30T00:00:00Z")])
    exposition, _ = exposition_after_polls(up)
    text = exposition.get().data.decode()
    assert sample(text, "ollama_up") == 1
    assert sample(text, "ollama_loaded_model_size_bytes", model="m:1") == 100
    assert sample(text, "ollama_loaded_model_expiry_timestamp_seconds", model="m:1") is None


def test_rows_past_max_models_are_dropped_and_said_once(up, caplog):
    rows = [{"name": f"m{i}:1", "size": i} for i in range(8000)]
    serve(up, rows, rows[:10])
    exposition, poller = exposition_after_polls(up, polls=2, max_models=5000)
    text = exposition.get().data.decode()
    assert sum(1 for line in text.splitlines() if line.startswith("ollama_loaded_model_size_bytes{")) == 5000
    assert sample(text, "ollama_exporter_dropped_models_total", source="ps", reason="limit") == 2 * 3000
    assert [r.getMessage() for r in caplog.records].count("model rows dropped") == 1


def test_a_hundred_thousand_rows_are_refused_by_size_and_leave_no_series(up):
    """One /api/ps with 100 000 rows used to leave 200 000 series and 95 % CPU until restart."""
    rows = [row(f"m{i}:1") for i in range(100_000)]
    serve(up, rows, rows[:10])
    exposition, _ = exposition_after_polls(up, polls=2, max_models=5000)
    text = exposition.get().data.decode()
    assert sample(text, "ollama_exporter_source_errors_total", source="ps", reason="invalid_response") == 2
    assert len(text.splitlines()) < 500


def test_label_values_from_the_network_are_bounded_and_printable(up):
    serve(up, [row(details={"family": "x" * 10_000, "parameter_size": "8B\n# HELP injected",
                            "quantization_level": "Q4\x00", "format": "gguf", "families": ["a"] * 1000})])
    exposition, _ = exposition_after_polls(up)
    text = exposition.get().data.decode()
    assert "injected" not in text and "\x00" not in text and "x" * 200 not in text
    assert sample(text, "ollama_model_info", model="m:1", digest=DIGEST, family="", parameter_size="",
                  quantization="", format="gguf") == 1


# --- transport: a deadline covers everything, sizes are capped, nothing is followed elsewhere ---

def test_one_header_byte_a_second_is_cut_off_at_the_deadline(up):
    """It used to keep /api/ps down for 50 s after Ollama recovered: each byte restarted the read timeout."""
    up.script("GET", "/api/ps", drip(head(200, b'{"models":[]}'), every=0.2))
    started = time.monotonic()
    with pytest.raises(OllamaError) as err:
        OllamaClient(up.url, 1.0).ps()
    assert err.value.reason == "timeout" and time.monotonic() - started < 1.5


def test_a_huge_answer_is_refused_at_the_cap_not_buffered(up):
    big = b'{"models":[' + b'{"name":"x"},' * 1_000_000 + b'{"name":"y"}]}'  # 13 MB, over ps's 8 MB cap
    up.reply("GET", "/api/ps", body=big)
    with pytest.raises(OllamaError) as err:
        OllamaClient(up.url, 5.0).ps()
    assert err.value.reason == "invalid_response" and "larger than" in str(err.value)


def test_a_compressed_answer_is_refused_so_a_gzip_bomb_never_inflates(up):
    bomb = gzip.compress(b'{"models":[' + b" " * 50_000_000 + b"]}")  # 50 MB of JSON in ~50 KB
    up.reply("GET", "/api/ps", body=bomb, extra={"Content-Encoding": "gzip"})
    with pytest.raises(OllamaError) as err:
        OllamaClient(up.url, 5.0).ps()
    assert err.value.reason == "invalid_response" and "compressed" in str(err.value)
    assert up.requests[0].headers["accept-encoding"] == "identity"


def test_a_redirect_to_another_host_is_not_followed(up):
    with ScriptedServer() as other:
        serve(other, [row("someone-elses:1")])
        up.reply("GET", "/api/ps", 302, extra={"Location": other.url + "/api/ps"})
        with pytest.raises(OllamaError) as err:
            OllamaClient(up.url, 2.0).ps()
        assert err.value.reason == "invalid_response" and "another origin" in str(err.value)
        assert other.requests == []


def test_a_redirect_within_the_same_server_is_followed(up):
    serve(up, [row("m:1")])
    up.reply("GET", "/ollama/api/ps", 308, extra={"Location": "/api/ps"})
    assert [m.name for m in OllamaClient(up.url + "/ollama", 2.0).ps()] == ["m:1"]


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"version": "' + b"9" * 5000 + b'"}',
                                  b'{"models": [' + b"1" * 5000 + b"]}"])
def test_pathological_json_is_an_invalid_response(up, body):
    up.reply("GET", "/api/ps", body=body)
    with pytest.raises(OllamaError) as err:
        OllamaClient(up.url, 2.0).ps()
    assert err.value.reason == "invalid_response"


def test_headers_without_end_are_refused(up):
    up.script("GET", "/api/ps", [b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 200 + b"\r\n"])
    with pytest.raises(OllamaError) as err:
        OllamaClient(up.url, 2.0).ps()
    assert err.value.reason == "invalid_response"


# --- a slow /api/show never holds up a poll ---

def test_a_slow_show_never_delays_polls_or_ps(up):
    """40 models with a show slower than the timeout used to hold the first snapshot for 50 s."""
    rows = [row(f"m{i}:1", digest=f"{i:064x}") for i in range(40)]
    serve(up, rows[:1], rows)
    up.script("POST", "/api/show", [5.0, head(200, b"{}")])  # every show hangs past the 0.5 s deadline
    poller = Poller(OllamaClient(up.url, 0.5), 0.2)
    started = time.monotonic()
    for _ in range(5):
        snapshot = poller.poll_once()
    assert time.monotonic() - started < 2.0  # five polls, none waiting on /api/show
    assert up.count("/api/ps") == 5 and snapshot.up and len(snapshot.installed) == 40
    wait_for(lambda: poller.shows.drain() or True, timeout=1)


def test_forgotten_models_lose_their_series(up):
    now = [1000.0]
    serve(up, [row("gone:1")])
    poller = Poller(OllamaClient(up.url, 1.0), 1.0, clock=lambda: now[0], forget_after=60)
    exposition = Exposition(runtime_metrics=False)
    poller.subscribe(exposition.update)
    poller.poll_once()
    serve(up, [])
    now[0] += 30
    poller.poll_once()
    assert sample(exposition.get().data.decode(), "ollama_model_loads_total", model="gone:1") == 0  # kept a while
    assert poller.forgotten == 0
    now[0] += 31
    poller.poll_once()
    assert "gone:1" not in exposition.get().data.decode()
    assert poller.forgotten == 1  # what the daemon's clean-up after a forget looks at (memory.after_each_poll)


def test_forgetting_a_burst_of_names_gives_back_the_tables_it_grew(up):
    """A dict keeps the table it grew to when entries are deleted: after 5 000 names came and were
    forgotten, the poller's and the /api/show cache's tables still had room for 5 000 (~0.5 MB)."""
    import sys

    from ollama_exporter.showcache import ShowCache
    from ollama_exporter.snapshot import InstalledModel, ModelDetails

    now = [1000.0]
    serve(up, [row(f"burst-{i}:1") for i in range(5000)])
    poller = Poller(OllamaClient(up.url, 5.0, max_models=5000), 1.0, clock=lambda: now[0], forget_after=60)
    poller.poll_once()
    serve(up, [row("kept:1")])
    now[0] += 61
    poller.poll_once()
    for table in (poller._seen, poller._loads, poller._unloads, poller._downgrades):
        assert len(table) <= 1 and sys.getsizeof(table) <= sys.getsizeof(type(table)(table))

    class Inline:  # runs each /api/show call at once
        def submit(self, fn, *args):
            fn(*args)

    shows = ShowCache(lambda name: None, Inline(), retry_after=60)
    shows.update([InstalledModel(f"m{i}:1", f"{i:064x}", 1, ModelDetails()) for i in range(5000)])
    assert len(shows._retry) == 5000  # every call failed (fetch returned no answer): each waits to retry
    shows.update([])
    assert sys.getsizeof(shows._retry) <= sys.getsizeof(dict(shows._retry))


def test_the_daemon_keeps_answering_while_upstream_misbehaves(up, exporter_factory):
    serve(up, [row(size=10**300), row("ok:1")])
    exp = exporter_factory("--ollama.url", up.url, "--poll.interval", "200ms", "--ollama.timeout", "500ms",
                           "--no-probes.enabled").wait_ready()
    text = exp.metrics()
    assert sample(text, "ollama_up") == 1 and sample(text, "ollama_loaded_model_size_bytes", model="ok:1") == 100
    up.script("GET", "/api/ps", drip(head(200, b'{"models":[]}'), every=0.3))
    wait_for(lambda: sample(exp.metrics(), "ollama_up") == 0, timeout=5, message="ps timing out")
    serve(up, [row("ok:1")])
    wait_for(lambda: sample(exp.metrics(), "ollama_up") == 1, timeout=5, message="recovery within a poll or two")
    assert requests.get(exp.url + "/-/ready", timeout=2).status_code == 200


# --- more hostile upstreams (beyond issue 9's list): each is one classified failure, within the deadline ---

def test_a_version_of_a_megabyte_is_refused_by_size(up):
    up.reply("GET", "/api/version", body=b'{"version": "' + b"9" * 1_000_000 + b'"}')
    with pytest.raises(OllamaError) as err:
        OllamaClient(up.url, 2.0).version()
    assert err.value.reason == "invalid_response" and "larger than 65536 bytes" in str(err.value)


def test_a_million_empty_rows_are_refused_before_parsing(up):
    """9 MB of `{"models":[{},{},...]}` passed the byte cap and became 3 million dicts: 230 MB and 15 s of
    CPU per answer, in a thread the poll had already given up on."""
    import tracemalloc

    up.reply("GET", "/api/ps", body=b'{"models":[' + b",".join([b"{}"] * 3_000_000) + b"]}")
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(OllamaError) as err:
            OllamaClient(up.url, 5.0).ps()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.reason == "invalid_response" and "JSON values" in str(err.value)
    assert time.monotonic() - started < 2.0 and peak < 40e6, peak  # the body itself is 9 MB, read once


def test_rows_up_to_max_models_with_the_fields_of_real_answers_are_not_refused_by_count(up):
    rows = [row(f"m{i}:1", capabilities=["completion", "tools", "vision"]) for i in range(5000)]
    serve(up, rows)
    assert len(OllamaClient(up.url, 5.0, max_models=5000).ps()) == 5000


def test_duplicated_json_keys_keep_the_last_as_ollamas_go_clients_do(up):
    body = b'{"models":[{"name":"first:1","name":"last:1","size":1,"size":2}],"models":[{"name":"other:1"}]}'
    up.reply("GET", "/api/ps", body=body)
    [model] = OllamaClient(up.url, 2.0).ps()
    assert model.name == "other:1"  # encoding/json decodes a repeated key into the same field: last wins
    up.reply("GET", "/api/ps", body=body[:body.index(b"]") + 1] + b"}")
    [model] = OllamaClient(up.url, 2.0).ps()
    assert (model.name, model.size) == ("last:1", 2)


@pytest.mark.parametrize("steps, reason, words", [
    ([head(200, b'{"models":[]}', length=1000)], "connection", "bytes short"),  # Content-Length says more
    ([head(200, b'{"models":[]}  ', length=8)], "invalid_response", "not valid JSON"),  # ... says less
    ([head(200, length=100)], "connection", "bytes short"),  # closes right after the headers
    ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n"], "connection", "failed"),  # mid-chunk
    ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"], "connection", "failed"),  # bad chunk size
    ([b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"], "invalid_response", "not an HTTP answer"),
    ([b"HTTP/1.1 abc OK\r\n\r\n"], "invalid_response", "not an HTTP answer"),
    ([b"\x15\x03\x01\x00\x02\x02\x46"], "invalid_response", "not an HTTP answer"),  # a TLS alert: plain HTTP to TLS
    ([head(204)], "invalid_response", "not valid JSON"),
    ([head(200, b"<html>nginx</html>", "text/html")], "invalid_response", "not valid JSON"),
])
def test_broken_framing_is_one_classified_failure(up, steps, reason, words):
    up.script("GET", "/api/ps", steps)
    started = time.monotonic()
    with pytest.raises(OllamaError) as err:
        OllamaClient(up.url, 2.0).ps()
    assert err.value.reason == reason and words in str(err.value), err.value
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("steps", [
    # a chunked body that never ends: a chunk of two spaces every 50 ms
    [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", *[s for _ in range(200) for s in (b"2\r\n  \r\n", 0.05)]],
    # "100 Continue" for ever: http.client skips interim answers in a loop
    [s for _ in range(500) for s in (b"HTTP/1.1 100 Continue\r\n\r\n", 0.02)],
    # the status line, a byte at a time
    list(drip(b"HTTP/1.1 200 OK\r\n", every=0.3)),
])
def test_answers_that_never_finish_end_at_the_deadline(up, steps):
    up.script("GET", "/api/ps", steps)
    started = time.monotonic()
    with pytest.raises(OllamaError) as err:
        OllamaClient(up.url, 1.0).ps()
    assert err.value.reason == "timeout" and time.monotonic() - started < 1.5


def test_a_fast_endless_chunked_body_is_cut_at_the_size_cap(up):
    chunk = b"8000\r\n" + b" " * 0x8000 + b"\r\n"
    up.script("GET", "/api/ps", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 400])  # 13 MB
    with pytest.raises(OllamaError) as err:
        OllamaClient(up.url, 5.0).ps()
    assert err.value.reason == "invalid_response" and "larger than" in str(err.value)


def test_tls_to_a_plain_http_ollama_is_a_connection_error():
    """ollama.url https://… pointing at Ollama's plain HTTP port: Go's server answers the ClientHello with
    a 400 in plain text, which is no TLS record."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def answer():
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         b"Connection: close\r\n\r\n400 Bad Request")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with pytest.raises(OllamaError) as err:
            OllamaClient(f"https://127.0.0.1:{server.getsockname()[1]}", 2.0).ps()
        assert err.value.reason == "connection" and "TLS" in str(err.value)
    finally:
        thread.join(3)
        server.close()


def test_a_redirect_loop_on_the_same_server_stops_after_three(up):
    up.reply("GET", "/api/ps", 307, extra={"Location": "/api/ps"})
    with pytest.raises(OllamaError) as err:
        OllamaClient(up.url, 2.0).ps()
    assert err.value.reason == "invalid_response" and "more than 3 redirects" in str(err.value)
    assert up.count("/api/ps") == 4


def test_a_name_of_ten_thousand_characters_drops_its_row(up):
    serve(up, [row("x" * 10_000), row("ok:1")])
    exposition, _ = exposition_after_polls(up)
    text = exposition.get().data.decode()
    assert sample(text, "ollama_exporter_dropped_models_total", source="ps", reason="invalid") == 1
    assert "x" * 600 not in text and sample(text, "ollama_loaded_model_size_bytes", model="ok:1") == 100


def test_a_hostile_show_answer_leaves_out_what_is_out_of_range(up):
    serve(up, [row("m:1")])
    show = {"model_info": {"general.architecture": "llama", "llama.context_length": 10**30,
                           "general.parameter_count": -1},
            "capabilities": ["completion"] + [f"cap{i}\n# HELP x" for i in range(1000)] + ["x" * 1000],
            "modelfile": "FROM " + "a" * 3_000_000, "details": ["not", "a", "mapping"]}
    up.reply("POST", "/api/show", body=json.dumps(show).encode())
    exposition, poller = exposition_after_polls(up)
    text = exposition.get().data.decode()
    assert exposition.healthy and sample(text, "ollama_exporter_source_up", source="show") == 1
    assert sample(text, "ollama_model_context_length", model="m:1") is None
    assert sample(text, "ollama_model_parameters", model="m:1") is None
    capabilities = [line for line in text.splitlines() if line.startswith("ollama_model_capability{")]
    assert capabilities == ['ollama_model_capability{capability="completion",model="m:1"} 1.0']


def test_a_show_answer_that_is_not_an_object_is_a_show_error_and_the_poll_goes_on(up):
    serve(up, [row("m:1")])
    up.reply("POST", "/api/show", body=b'[{"model_info": {}}]')
    exposition, _ = exposition_after_polls(up)
    text = exposition.get().data.decode()
    assert sample(text, "ollama_up") == 1 and sample(text, "ollama_loaded_model_size_bytes", model="m:1") == 100
    assert sample(text, "ollama_exporter_source_errors_total", source="show", reason="invalid_response") == 1

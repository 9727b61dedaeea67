"""The API client against every captured Ollama response (replayed byte for byte over loopback) and
every failure class."""

from __future__ import annotations

import json
import threading
import socket

import pytest

from ollama_exporter.ollama import OllamaClient, OllamaError, parse_installed, parse_loaded, parse_show, parse_timestamp
from tests.conftest import FIXTURES, fixture_files
from tests.fakes.hostile import ScriptedServer


@pytest.fixture
def up():
    with ScriptedServer() as server:
        yield server


def client(server: ScriptedServer, timeout: float = 2.0) -> OllamaClient:
    return OllamaClient(server.url, timeout)


@pytest.mark.parametrize("path", fixture_files("ps", "*.json"), ids=lambda p: p.name)
def test_every_captured_ps_body_parses(path, up):
    raw = json.loads(path.read_text())
    up.reply("GET", "/api/ps", body=path.read_bytes())
    models = client(up).ps()
    assert [m.name for m in models] == [r["name"] for r in raw["models"]]
    for model, row in zip(models, raw["models"]):
        assert model.size == row["size"]
        assert model.size_vram == row.get("size_vram")
        assert model.context_length == row.get("context_length")
        assert model.expires_at is not None and model.expires_at > 1.6e9
        assert model.details.quantization_level == row["details"]["quantization_level"]


@pytest.mark.parametrize("path", fixture_files("tags", "*.json"), ids=lambda p: p.name)
def test_every_captured_tags_body_parses(path, up):
    raw = json.loads(path.read_text())
    up.reply("GET", "/api/tags", body=path.read_bytes())
    models = client(up).tags()
    assert [(m.name, m.digest, m.size) for m in models] == [(r["name"], r["digest"], r["size"]) for r in raw["models"]]
    for model, row in zip(models, raw["models"]):
        assert model.details.families == tuple(row["details"].get("families") or ())


@pytest.mark.parametrize("path", fixture_files("show", "*.json"), ids=lambda p: p.name)
def test_every_captured_show_body_parses(path, up):
    raw = json.loads(path.read_text())
    up.reply("POST", "/api/show", body=path.read_bytes())
    info = client(up).show("llama3")
    arch = raw["model_info"]["general.architecture"]
    assert info.architecture == arch
    assert info.context_length == raw["model_info"][f"{arch}.context_length"]
    assert info.parameter_count == raw["model_info"]["general.parameter_count"]
    assert info.capabilities == (tuple(raw["capabilities"]) if "capabilities" in raw else None)
    assert info.weights_blob is not None and len(info.weights_blob) == 64
    assert f"sha256-{info.weights_blob}" in raw["modelfile"]
    assert json.loads(up.requests[0].body) == {"model": "llama3"}


@pytest.mark.parametrize("path", fixture_files("version"), ids=lambda p: p.name)
def test_every_captured_version_parses(path, up):
    up.reply("GET", "/api/version", body=path.read_bytes())
    assert client(up).version() == json.loads(path.read_text())["version"]


@pytest.mark.parametrize("path", fixture_files("tags", "*.txt") + fixture_files("ps", "*.txt"), ids=lambda p: p.name)
def test_truncated_or_non_json_captures_are_invalid_responses(path, up):
    up.reply("GET", "/api/tags", body=path.read_bytes())
    up.reply("GET", "/api/ps", body=path.read_bytes())
    with pytest.raises(OllamaError) as err:
        client(up).tags() if "/tags/" in str(path) else client(up).ps()
    assert err.value.reason == "invalid_response"


@pytest.mark.parametrize(
    "status, fixture, reason, text",
    [
        (404, "404_text_plain_page_not_found_api_ps_on_v0.1.34_issue5746.txt", "http_4xx", "404 page not found"),
        (404, "404_model_not_found_single_quoted_name_pre_v0.3_2023-12.json", "http_4xx", "model 'zephyr' not found"),
        (500, "500_runner_terminated_cudamalloc_oom_2026-03.json", "http_5xx", "cudaMalloc failed"),
        (503, "503_server_busy_max_pending_requests_77_bytes_2026-06.json", "http_5xx", "server busy"),
        (403, None, "http_4xx", "(empty body)"),
    ],
)
def test_http_errors_are_classified_and_keep_ollamas_message(status, fixture, reason, text, up):
    body = (FIXTURES / "api" / "errors" / fixture).read_bytes() if fixture else b""
    up.reply("GET", "/api/ps", status, body)
    with pytest.raises(OllamaError) as err:
        client(up).ps()
    assert err.value.reason == reason
    assert f"HTTP {status}" in str(err.value) and text in str(err.value)


def test_garbage_and_wrong_shapes_are_invalid_responses(up):
    up.reply("GET", "/api/ps", body=b"<html>proxy error</html>")
    up.reply("GET", "/api/tags", body=json.dumps({"models": {"not": "a list"}}).encode())
    up.reply("GET", "/api/version", body=json.dumps({"version": 12}).encode())
    for call in (client(up).ps, client(up).tags, client(up).version):
        with pytest.raises(OllamaError) as err:
            call()
        assert err.value.reason == "invalid_response"


def test_connection_refused_is_a_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connects are refused
        with pytest.raises(OllamaError) as err:
            OllamaClient(f"http://127.0.0.1:{port}", 1.0).version()
    assert err.value.reason == "connection"
    assert f"127.0.0.1:{port}" in str(err.value)


def test_a_server_that_never_answers_times_out_at_the_deadline():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(OllamaError) as err:
            OllamaClient(f"http://127.0.0.1:{port}", 0.3).ps()
    assert err.value.reason == "timeout"


def test_a_slow_drip_body_is_cut_off_at_the_total_deadline():
    """A server sending one byte every 100 ms never trips a per-read timeout; ours must still end."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def drip():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        while not stop.wait(0.1):
            try:
                conn.sendall(b" ")
            except OSError:
                break
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    try:
        with pytest.raises(OllamaError) as err:
            OllamaClient(f"http://127.0.0.1:{listener.getsockname()[1]}", 0.5).ps()
        assert err.value.reason == "timeout"
    finally:
        stop.set()
        listener.close()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-10-01T13:49:44.557263+05:30", 1790842784.557263),
        ("2026-10-01T08:19:44.557263Z", 1790842784.557263),
        ("2026-09-16T08:44:16.023680789-03:00", 1789559056.023680789),
        ("2318-12-01T17:47:16.854775807Z", 11010707236.854775807),
        ("0001-01-01T00:00:00Z", None),
        ("not a time", None),
        (None, None),
    ],
)
def test_expires_at_any_offset_and_precision(text, expected):
    value = parse_timestamp(text)
    assert value == pytest.approx(expected, abs=1e-6) if expected is not None else value is None


def test_requests_identify_the_exporter_and_ask_for_no_compression(up):
    up.reply("GET", "/api/version", body=b'{"version":"0.32.15"}')
    client(up).version()
    assert up.requests[0].headers["user-agent"].startswith("ollama-exporter/")
    assert up.requests[0].headers["accept-encoding"] == "identity"


def test_basic_auth_from_the_url_is_sent_and_never_shown(up):
    up.reply("GET", "/api/version", status=401, body=b"who are you")
    url = up.url.replace("http://", "http://admin:hunter2@")
    with pytest.raises(OllamaError) as err:
        OllamaClient(url, 2).version()
    assert up.requests[0].headers["authorization"] == "Basic YWRtaW46aHVudGVyMg=="
    assert "hunter2" not in str(err.value)


def test_remote_models_are_recognised_in_every_answer():
    """Cloud models (v0.12+) carry remote_model/remote_host; a probe of one would go to another server."""
    remote = {"name": "gpt-oss:120b-cloud", "remote_model": "gpt-oss:120b", "remote_host": "https://ollama.com:443"}
    assert parse_loaded(remote).remote and parse_installed(remote).remote
    assert parse_show({"remote_host": "https://ollama.com:443"}).remote
    assert not parse_loaded({"name": "qwen3:8b"}).remote and not parse_show({}).remote


def test_extra_headers_go_with_inference_requests(up):
    up.reply("POST", "/api/embed", body=b'{"embeddings": []}')
    up.reply("POST", "/api/generate", body=b'{"done":true}\n', content_type="application/x-ndjson")
    c = client(up)
    c.embed({"model": "m"}, 2.0, {"X-Forwarded-For": "192.0.2.1"})
    list(c.stream("/api/generate", {"model": "m"}, 2.0, {"X-Forwarded-For": "192.0.2.1"}))
    c.post("/api/generate", {"model": "m"}, 2.0, {"X-Forwarded-For": "192.0.2.1"})
    assert [r.headers["x-forwarded-for"] for r in up.requests] == ["192.0.2.1"] * 3
    assert "X-Forwarded-For" not in c.http.headers


def _tags(*rows: dict) -> bytes:
    return json.dumps({"models": list(rows)}).encode()


def _compact(*rows: dict) -> bytes:
    """An answer as Ollama writes it (Go's encoding/json: no spaces), so rows are read from its bytes."""
    return json.dumps({"models": list(rows)}, separators=(",", ":")).encode()


ROW_A = {"name": "a:1", "digest": "a" * 64, "size": 1000, "details": {"family": "llama", "families": ["llama"]}}
ROW_B = {"name": "b:1", "digest": "b" * 64, "size": 2000, "details": {"family": "qwen3", "families": ["qwen3"]}}


def test_the_same_answer_gives_back_the_same_rows_and_a_changed_row_alone_is_parsed_again(up):
    ollama = client(up)
    up.reply("GET", "/api/tags", body=_tags(ROW_A, ROW_B))
    first = ollama.tags()
    again = ollama.tags()
    assert [m for m in again] == first and all(a is b for a, b in zip(again, first))  # not parsed again
    up.reply("GET", "/api/tags", body=_tags(ROW_A, {**ROW_B, "size": 3000}))
    changed = ollama.tags()
    assert changed[0] is first[0]  # an unchanged row keeps its parsed value
    assert changed[1] is not first[1] and changed[1].size == 3000


def inventory(models: int) -> list[dict]:
    """/api/tags rows as a real server lists them, for the memory tests."""
    import hashlib

    details = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
               "parameter_size": "8.0B", "quantization_level": "Q4_K_M"}
    return [{"name": f"m{i}:q4", "model": f"m{i}:q4", "modified_at": "2026-01-01T00:00:00Z", "size": 4_920_753_328,
             "digest": hashlib.sha256(b"%d" % i).hexdigest(), "details": details} for i in range(models)]


def test_what_is_kept_to_reuse_rows_is_a_key_per_model_not_the_decoded_row(up):
    """The decoded row (two dicts, a list, their strings) was kept per model to tell it unchanged: at
    2 000 models and during a burst of names, dozens of small objects each that outlive the poll."""
    import tracemalloc

    rows = inventory(2000)
    up.reply("GET", "/api/tags", body=_tags(*rows))
    ollama = OllamaClient(up.url, 5.0, max_models=2000)
    ollama.tags()  # the connection and the client's own state, outside the measure
    up.reply("GET", "/api/tags", body=_tags(*rows[::-1]))  # other bytes, the same rows
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        ollama.tags()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert kept / 2000 < 700  # the answer's bytes (kept to tell the next one unchanged) and a dict entry


def _read_both_ways(monkeypatch, path: str, answers: list[bytes]):
    """What a client makes of a sequence of answers, row by row from their bytes and decoding each whole
    (a failure as its message)."""
    from ollama_exporter import ollama as module

    results = []
    for by_rows in (True, False):
        if not by_rows:
            monkeypatch.setattr(module, "_row_segments", lambda raw: None)
        c, got = OllamaClient("http://127.0.0.1:9", 1.0, max_models=3), []
        for answer in answers:
            c._body = lambda *args, answer=answer, **kwargs: answer
            try:
                rows = c.ps() if path == "/api/ps" else c.tags()
                got.append((list(rows), dict(rows.dropped)))
            except OllamaError as exc:
                got.append(str(exc))
        results.append(got)
    return results


HOSTILE_ANSWERS = [
    b'{"models":[{"name":"a:1","size":1},{"name":"b:1","x":[{"y":1},{"name":"c:1"}]}]}',  # the cut inside an array
    b'{"models":[{"name":"a:1","d":{"e":1}},{"name":"f:1"}]}',  # a nested object before the cut
    b'{"models":[{"name":"a:1","size":1},{"name":"a:1","size":2}]}',  # a duplicate
    b'{"models":[{"name":"a:1"},{"name":""},{"name":5}]}',  # rows with no usable name
    b'{"models":[{"name":"a:1","size":1' + b"9" * 5000 + b'}]}',  # an integer too long
    b'{"models":[{"name":"a:1","size":NaN}]}',
    b'{"models":[{"name":"a:1"},{"name":"b:1"}]}trailing',
    b'{"models":[{"name":"a:1"},{"name":"b:1"},{"name":"c:1"},{"name":"d:1"}]}',  # past max_models
    b'{"models":[{"name":"a},{\\"name\\":b"}]}',  # the cut's bytes inside a string (its quote escaped)
    b'{"models":[{"name":"\\ud800"}]}',
    b'{"models":[{"name":"a:1"}]',  # cut short
]


@pytest.mark.parametrize("path", ["/api/ps", "/api/tags"])
def test_reading_rows_from_their_bytes_gives_what_decoding_the_whole_answer_gives(monkeypatch, path):
    """Rows are cut from an answer in Ollama's own shape and only new ones are decoded; for every
    captured answer and every hostile one (a cut that lands inside a nested value, duplicates, values
    that cannot be parsed, answers that are not JSON), in sequence, the rows, the drops and the errors
    are those of decoding the whole answer."""
    kind = "ps" if path == "/api/ps" else "tags"
    answers = [f.read_bytes() for f in fixture_files(kind, "*.json")] + HOSTILE_ANSWERS
    answers += answers[::-1]  # and each again after others, when rows are reused
    by_rows, whole = _read_both_ways(monkeypatch, path, answers)
    assert by_rows == whole
    assert sum(isinstance(r, str) for r in by_rows) >= 8  # the hostile ones did fail


def test_in_a_burst_of_names_only_the_new_rows_are_decoded(up):
    """During a burst /api/tags changes at every poll; decoding the whole answer made dozens of objects
    per listed model each time (1.5 KB a row at 2 000 models), to throw away all but the new rows."""
    import tracemalloc

    rows = inventory(2000)
    up.reply("GET", "/api/tags", body=_compact(*rows))
    ollama = OllamaClient(up.url, 5.0, max_models=5000)
    first = ollama.tags()
    up.reply("GET", "/api/tags", body=_compact(*rows, dict(rows[0], name="new:1")))
    tracemalloc.start()
    try:
        second = ollama.tags()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert list(second)[:2000] == list(first) and all(a is b for a, b in zip(second, first))
    assert second[2000].name == "new:1"
    assert peak / 2000 < 1000  # the answer's bytes and each row's, not every row decoded


@pytest.mark.parametrize("value", [True, 1.0, "1000"])
def test_a_row_equal_in_python_but_not_in_json_is_parsed_again(up, value):
    """1 == 1.0 == True in Python: reusing the last row's parse on == alone would report a boolean size."""
    ollama = client(up)
    up.reply("GET", "/api/tags", body=_tags({**ROW_A, "size": 1}, {**ROW_B, "details": {"family": 1}}))
    first = ollama.tags()
    assert first[0].size == 1
    up.reply("GET", "/api/tags", body=_tags({**ROW_A, "size": value}, {**ROW_B, "details": {"family": True}}))
    second = ollama.tags()
    assert second[0].size == parse_installed({**ROW_A, "size": value}).size
    assert second[1] == parse_installed({**ROW_B, "details": {"family": True}})


def test_dropped_rows_are_counted_on_every_answer_even_when_it_did_not_change(up):
    ollama = OllamaClient(up.url, 2.0, max_models=1)
    up.reply("GET", "/api/tags", body=_tags(ROW_A, ROW_B, {"name": ""}))
    assert ollama.tags().dropped == {"limit": 2}
    assert ollama.tags().dropped == {"limit": 2}  # the same bytes: the same answer, the same drops


def test_rows_are_told_unchanged_by_a_number_and_equal_values_are_kept_once(up):
    """What a listed model costs while it is listed (and, in a burst of names, what the burst leaves
    behind) was a copy of its row's bytes, kept to tell it unchanged, and the row's own copies of the
    server's few formats, families and quantizations. Now a hash per row, and one copy of each value."""
    import tracemalloc

    rows = inventory(2000)
    raw = _compact(*rows)
    up.reply("GET", "/api/tags", body=raw)
    ollama = OllamaClient(up.url, 5.0, max_models=2000)
    tracemalloc.start()
    try:
        models = ollama.tags()
        kept = tracemalloc.get_traced_memory()[0] - len(raw)  # the answer is kept whole, to tell it unchanged
    finally:
        tracemalloc.stop()
    assert len({id(m.details) for m in models}) == 1 and models[0].details.family == "llama"
    assert kept / 2000 < 650  # the model, its name, digest and size, its key and its entry (was 1 305)


def test_answers_with_ever_new_values_do_not_grow_the_table_of_shared_values():
    from ollama_exporter import ollama as module

    for i in range(3 * module._shared.limit):
        details = module.parse_details({"family": f"family-{i}", "families": [f"family-{i}"]})
        assert details.family == f"family-{i}" and details.families == (f"family-{i}",)
    assert len(module._shared) <= module._shared.limit

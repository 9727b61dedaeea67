"""Tests for tests/fakes/ollama.py: the fake must match the real Ollama API shapes and semantics."""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from tests.conftest import FIXTURES
from tests.fakes.ollama import BUSY_MESSAGE, FOREVER_NS, FakeOllama, go_time, parse_keep_alive

API = FIXTURES / "api"
TS_LOCAL = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}\+05:30$")
TS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
METRICS = ["total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
           "eval_duration"]


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama() as f:
        f.set_timing(ttft=0.05, token_gap=0.01, tokens=5, load_time=0.06)
        f.add_model("llama3.1:8b")
        yield f


def fixture_json(rel: str) -> Any:
    return json.loads((API / rel).read_text())


def keys(obj: dict[str, Any]) -> list[str]:
    return list(obj.keys())


def post(fake: FakeOllama, path: str, body: Any, **kw: Any) -> requests.Response:
    return requests.post(fake.url + path, json=body, timeout=5, **kw)


def ps(fake: FakeOllama) -> list[dict[str, Any]]:
    return requests.get(fake.url + "/api/ps", timeout=5).json()["models"]


def lines(resp: requests.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in resp.iter_lines() if line]


def expires_year(fake: FakeOllama, name: str) -> int:
    row = next(r for r in ps(fake) if r["name"] == name)
    return int(row["expires_at"][:4])


def expires_dt(fake: FakeOllama, name: str) -> datetime:
    row = next(r for r in ps(fake) if r["name"] == name)
    return datetime.fromisoformat(row["expires_at"][:26] + row["expires_at"][29:])


# ----------------------------------------------------------------------------- gin / plain routes
def test_root_get_and_head(fake: FakeOllama) -> None:
    r = requests.get(fake.url + "/")
    assert (r.status_code, r.content) == (200, b"Ollama is running")
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    h = requests.head(fake.url + "/")
    assert h.status_code == 200 and h.content == b""


@pytest.mark.parametrize("fixture", sorted(p.name for p in (API / "version").glob("*.json")))
def test_version_matches_fixtures(fake: FakeOllama, fixture: str) -> None:
    expected = (API / "version" / fixture).read_bytes().rstrip(b"\n")
    fake.version = json.loads(expected)["version"]
    r = requests.get(fake.url + "/api/version")
    assert r.content == expected
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    assert requests.head(fake.url + "/api/version").status_code == 200


@pytest.mark.parametrize("method,path", [("GET", "/metrics"), ("GET", "/api/stats"), ("GET", "/api/metrics"),
                                         ("GET", "/nope"), ("POST", "/api/health")])
def test_unknown_path_is_gin_text_404(fake: FakeOllama, method: str, path: str) -> None:
    r = requests.request(method, fake.url + path)
    assert (r.status_code, r.content) == (404, b"404 page not found")
    assert r.headers["Content-Type"].startswith("text/plain")
    expected = (API / "errors" / "404_text_plain_page_not_found_api_ps_on_v0.1.34_issue5746.txt").read_bytes()
    assert r.content == expected.rstrip(b"\n")


@pytest.mark.parametrize("method,path", [("POST", "/api/ps"), ("HEAD", "/api/ps"), ("GET", "/api/show"),
                                         ("GET", "/api/generate"), ("DELETE", "/api/tags"), ("POST", "/")])
def test_wrong_method_is_gin_text_405(fake: FakeOllama, method: str, path: str) -> None:
    r = requests.request(method, fake.url + path)
    assert r.status_code == 405
    if method != "HEAD":
        assert r.content == b"405 method not allowed"


# ----------------------------------------------------------------------------- /api/ps
def test_ps_empty_matches_fixture(fake: FakeOllama) -> None:
    r = requests.get(fake.url + "/api/ps")
    assert r.content == (API / "ps" / "ps_empty_no_models_loaded_docker_2025-02.json").read_bytes().rstrip(b"\n")
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"


@pytest.mark.parametrize("fixture", sorted(p.name for p in (API / "ps").glob("*.json")))
def test_ps_rows_have_fixture_key_order(fake: FakeOllama, fixture: str) -> None:
    models = fixture_json(f"ps/{fixture}")["models"]
    for row in models:
        shape = "new" if "context_length" in row else "no_ctx" if "size_vram" in row else "old"
        fake.load("llama3.1:8b", ps_shape=shape)
        got = ps(fake)[0]
        if "abridged" in fixture:  # the author dropped keys; what is left must still be in order
            assert [k for k in keys(got) if k in row] == keys(row)
            assert [k for k in keys(got["details"]) if k in row["details"]] == keys(row["details"])
        else:
            assert keys(got) == keys(row)
            assert keys(got["details"]) == keys(row["details"])
        assert all(type(got[k]) is type(row[k]) for k in row if k != "details")


def test_ps_old_shape_has_no_size_vram_or_context_length(fake: FakeOllama) -> None:
    fake.load("llama3.1:8b", ps_shape="old")
    assert keys(ps(fake)[0]) == ["name", "model", "size", "digest", "details", "expires_at"]


def test_ps_expires_at_offset_nanos_sort_and_sizes(fake: FakeOllama) -> None:
    fake.add_model("qwen3:8b", family="qwen3", families=None)
    fake.add_model("tiny")
    fake.load("llama3.1:8b", keep_alive=60, size=1000, size_vram=400, context_length=8192)
    fake.load("qwen3:8b", keep_alive=-1)
    fake.load("tiny", keep_alive=120, size_vram=0)
    rows = ps(fake)
    assert [r["name"] for r in rows] == ["qwen3:8b", "tiny:latest", "llama3.1:8b"]  # expires_at descending
    assert all(TS_LOCAL.match(r["expires_at"]) for r in rows), rows
    forever_year = int(go_time(time.time_ns() + FOREVER_NS)[:4])
    assert forever_year in (2318, 2319) and rows[0]["expires_at"].startswith(str(forever_year))
    assert rows[0]["details"]["families"] is None
    assert b'"families":null' in requests.get(fake.url + "/api/ps").content
    assert (rows[2]["size"], rows[2]["size_vram"], rows[2]["context_length"]) == (1000, 400, 8192)
    assert rows[1]["size_vram"] == 0 and rows[1]["size"] == 4_920_000_000
    assert rows[0]["size_vram"] == rows[0]["size"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", r["digest"]) for r in rows)


def test_ps_digest_matches_tags(fake: FakeOllama) -> None:
    fake.load("llama3.1:8b")
    tags = requests.get(fake.url + "/api/tags").json()["models"]
    assert ps(fake)[0]["digest"] == tags[0]["digest"]


def test_utc_server_uses_z(fake: FakeOllama) -> None:
    fake.tz_offset_minutes = 0
    fake.load("llama3.1:8b", keep_alive=-1)
    assert TS_UTC.match(ps(fake)[0]["expires_at"])


def test_load_unknown_model_raises(fake: FakeOllama) -> None:
    with pytest.raises(ValueError):
        fake.load("nope")


def test_lazy_expiry(fake: FakeOllama) -> None:
    fake.load("llama3.1:8b", keep_alive=0.15)
    assert fake.loaded() == ["llama3.1:8b"]
    time.sleep(0.25)
    assert ps(fake) == [] and fake.loaded() == []


# ----------------------------------------------------------------------------- /api/tags
TAGS_V030_ROW = ["name", "model", "modified_at", "size", "digest", "details", "capabilities"]
TAGS_V030_DETAILS = ["parent_model", "format", "family", "families", "parameter_size", "quantization_level",
                     "context_length", "embedding_length"]


def test_tags_empty(fake: FakeOllama) -> None:
    fake.remove_model("llama3.1:8b")
    for name in ("tags_empty_openwebui3830_v0.1.48_2024-07.json", "tags_empty_wrong_models_dir_2023-12.json"):
        assert requests.get(fake.url + "/api/tags").json() == fixture_json(f"tags/{name}")


def test_tags_v030_shape_is_reference_shape(fake: FakeOllama) -> None:
    row = requests.get(fake.url + "/api/tags").json()["models"][0]
    assert keys(row) == TAGS_V030_ROW and keys(row["details"]) == TAGS_V030_DETAILS
    assert row["details"]["context_length"] == 131072 and row["capabilities"] == ["completion"]
    assert TS_LOCAL.match(row["modified_at"])


@pytest.mark.parametrize("fixture", ["tags_16_models_langchain_cassette_2025-06-28.json",
                                     "tags_llava_llama3.2_docker_tech-islands-python_2026-01.json",
                                     "tags_zephyr_pre_model_key_shape_families_null_2023-12.json"])
def test_tags_old_shapes_match_fixtures(fake: FakeOllama, fixture: str) -> None:
    fake.remove_model("llama3.1:8b")
    rows = fixture_json(f"tags/{fixture}")["models"]
    shape = "old" if "model" in rows[0] else "pre_model_key"
    for i, row in enumerate(rows):
        d = row["details"]
        fake.add_model(row["name"], family=d["family"], families=d["families"], parameter_size=d["parameter_size"],
                       quantization=d["quantization_level"], size=row["size"], digest=row["digest"],
                       tags_shape=shape, modified_at=1_700_000_000 - i)
    got = requests.get(fake.url + "/api/tags").json()["models"]
    assert len(got) == len(rows)
    for g, row in zip(got, rows):  # same order: modified_at descending
        assert keys(g) == keys(row) and keys(g["details"]) == keys(row["details"])
        assert {k: v for k, v in g.items() if k != "modified_at"} == {k: v for k, v in row.items() if k != "modified_at"}


def test_tags_sorted_by_modified_desc(fake: FakeOllama) -> None:
    fake.add_model("old:1", modified_at=1_600_000_000)
    fake.add_model("new:1", modified_at=time.time() + 100)
    names = [m["name"] for m in requests.get(fake.url + "/api/tags").json()["models"]]
    assert names == ["new:1", "llama3.1:8b", "old:1"]
    assert requests.head(fake.url + "/api/tags").status_code == 200


# ----------------------------------------------------------------------------- /api/show
def test_show_new_shape_matches_new_fixtures(fake: FakeOllama) -> None:
    got = post(fake, "/api/show", {"model": "llama3.1:8b"}).json()
    for name in ("show_llama3.1-8b_tensors_capabilities_crewai_2025-05-07.json",
                 "show_llama3.2-3b_tensors_capabilities_crewai_2025-05-07.json"):
        fx = fixture_json(f"show/{name}")
        assert keys(got) == keys(fx)
        assert keys(got["details"]) == keys(fx["details"])
        assert set(got["model_info"]) <= set(fx["model_info"])
        assert keys(got["tensors"][0]) == keys(fx["tensors"][0])
        assert re.fullmatch(r"(stop {27}\"[^\"]+\"\n?)+", fx["parameters"]) and \
            re.fullmatch(r"(stop {27}\"[^\"]+\"\n?)+", got["parameters"])
    assert keys(got["model_info"]) == sorted(got["model_info"])
    info = got["model_info"]
    assert info["general.architecture"] == "llama" and info["llama.context_length"] == 131072
    assert info["general.parameter_count"] == 8_030_261_248 and info["general.file_type"] == 15
    assert info["tokenizer.ggml.tokens"] is None and info["tokenizer.ggml.merges"] is None
    assert TS_LOCAL.match(got["modified_at"])


def test_show_old_shape_without_capabilities(fake: FakeOllama) -> None:
    fake.add_model("llama3.2:3b", capabilities=None, family="llama")
    got = post(fake, "/api/show", {"name": "llama3.2:3b"}).json()  # deprecated `name` still works
    for name in ("show_llama3.2-3b_crewai_2025-01-10.json", "show_llama3.1-8b_crewai_2025-02-21.json"):
        fx = fixture_json(f"show/{name}")
        assert [k for k in keys(got) if k != "tensors"] == keys(fx)
    assert "capabilities" not in got


def test_show_modelfile_names_the_weights_blob(fake: FakeOllama) -> None:
    blob = "ab" * 32
    fake.add_model("custom:q4", blob_digest=blob)
    got = post(fake, "/api/show", {"model": "custom:q4"}).json()
    assert f"\nFROM /root/.ollama/models/blobs/sha256-{blob}\n" in got["modelfile"]
    got = post(fake, "/api/show", {"model": "llama3.1:8b"}).json()
    found = re.search(r"^FROM \S+/blobs/sha256-([0-9a-f]{64})$", got["modelfile"], re.M)
    tags = requests.get(fake.url + "/api/tags").json()["models"]
    assert found and found.group(1) != next(t["digest"] for t in tags if t["name"] == "llama3.1:8b")


def test_show_errors(fake: FakeOllama) -> None:
    r = requests.post(fake.url + "/api/show")
    assert (r.status_code, r.json()) == (400, {"error": "missing request body"})
    r = post(fake, "/api/show", {})
    assert (r.status_code, r.json()) == (400, {"error": "model is required"})
    r = post(fake, "/api/show", {"model": "foo"})
    assert (r.status_code, r.content) == (404, b'{"error":"model \'foo:latest\' not found"}')
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"


def test_show_from_fixture_is_verbatim(fake: FakeOllama) -> None:
    path = API / "show" / "show_llama3.2-3b_tensors_capabilities_crewai_2025-05-07.json"
    row = fake.add_model_from_fixture(path, "llama3.2:3b")
    assert row["capabilities"] == ["completion", "tools"] and row["details"]["context_length"] == 131072
    assert post(fake, "/api/show", {"model": "llama3.2:3b"}).content == path.read_bytes().rstrip(b"\n")


def test_show_does_not_touch_scheduler(fake: FakeOllama) -> None:
    post(fake, "/api/show", {"model": "llama3.1:8b"})
    assert ps(fake) == [] and fake.loads["llama3.1:8b"] == 0


# ----------------------------------------------------------------------------- generate / chat / embed
def fixture_lines(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (API / "generate" / name).read_text().splitlines() if line]


def test_generate_stream_matches_fixture_shape(fake: FakeOllama) -> None:
    t0 = time.monotonic()
    r = post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "why is the sky blue"}, stream=True)
    assert r.headers["Content-Type"] == "application/x-ndjson"
    got = lines(r)
    fx = fixture_lines("generate_stream_gemma3-1b_langchaingo_2025-08-20.ndjson")
    assert all(keys(g) == keys(fx[0]) for g in got[:-1]) and len(got) == 6
    assert keys(got[-1]) == keys(fx[-1])
    assert got[0]["model"] == "llama3.1:8b" and TS_UTC.match(got[0]["created_at"])
    final = got[-1]
    assert final["done_reason"] == "stop" and final["eval_count"] == 5
    assert final["load_duration"] >= 0.055e9  # cold load of 0.06 s, in ns
    assert final["total_duration"] >= final["load_duration"] + final["prompt_eval_duration"]
    assert 0.04e9 <= final["prompt_eval_duration"] < 1e9
    assert time.monotonic() - t0 < 1.5
    assert fake.loads["llama3.1:8b"] == 1 and ps(fake)[0]["context_length"] == 4096


def test_generate_raw_stream_is_chunked_lines_ending_in_newline(fake: FakeOllama) -> None:
    r = post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x"}, stream=True)
    body = r.raw.read()
    assert body.endswith(b"\n") and body.count(b"\n") == 6


def test_ttft_measured_from_arrival(fake: FakeOllama) -> None:
    fake.load("llama3.1:8b")
    fake.set_timing(ttft=0.2, token_gap=0.01, tokens=3, load_time=0.1)
    t0 = time.monotonic()
    r = post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x"}, stream=True)
    next(r.iter_lines())
    assert 0.19 <= time.monotonic() - t0 < 0.5
    r.close()


def test_generate_nostream_matches_fixtures(fake: FakeOllama) -> None:
    r = post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x", "stream": False})
    assert r.headers["Content-Type"] == "application/json; charset=utf-8" and not r.content.endswith(b"\n")
    for name in ("generate_nostream_gemma3-1b_langchaingo_2025-08-20.json", "generate_nostream_llama3.1_crewai_2025-05-07.json"):
        assert keys(r.json()) == keys(fixture_json(f"generate/{name}"))
    assert r.json()["response"] == "Hello, world! The"


def test_chat_stream_and_nostream_match_fixtures(fake: FakeOllama) -> None:
    body = {"model": "llama3.1", "messages": [{"role": "user", "content": "hi"}]}
    fake.add_model("llama3.1")
    got = lines(post(fake, "/api/chat", body, stream=True))
    fx = fixture_lines("chat_stream_gemma3-1b_keep_alive_1m_langchaingo_2025-08-20.ndjson")
    assert all(keys(g) == keys(fx[0]) and keys(g["message"]) == ["role", "content"] for g in got[:-1])
    assert keys(got[-1]) == keys(fx[-1])  # done_reason before done, no context
    assert got[0]["model"] == "llama3.1"  # echoes the request, not llama3.1:latest
    one = post(fake, "/api/chat", {**body, "stream": False}).json()
    assert keys(one) == keys(fx[-1]) and one["message"]["content"] == "Hello, world! The"


def test_num_predict_gives_length(fake: FakeOllama) -> None:
    got = lines(post(fake, "/api/chat", {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}],
                                        "options": {"num_predict": 2}}, stream=True))
    assert len(got) == 3 and got[-1]["done_reason"] == "length" and got[-1]["eval_count"] == 2


def test_embed(fake: FakeOllama) -> None:
    r = post(fake, "/api/embed", {"model": "llama3.1:8b", "input": ["a b", "c"], "keep_alive": "1m"})
    body = r.json()
    assert keys(body) == ["model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"]
    assert len(body["embeddings"]) == 2 and all(isinstance(x, float) for x in body["embeddings"][0])
    assert body["load_duration"] >= 0.055e9 and fake.loads["llama3.1:8b"] == 1
    fake.wait_settled()
    remaining = (expires_dt(fake, "llama3.1:8b") - datetime.now().astimezone()).total_seconds()
    assert 50 < remaining <= 60


def test_unknown_model_404_as_given(fake: FakeOllama) -> None:
    for path, body in (("/api/generate", {"model": "nope", "prompt": "x"}),
                       ("/api/chat", {"model": "nope", "messages": []}),
                       ("/api/generate", {"model": "nope", "keep_alive": 0})):
        r = post(fake, path, body)
        assert (r.status_code, r.json()) == (404, {"error": "model 'nope' not found"})
    r = post(fake, "/api/generate", {"model": "", "prompt": "x"})
    assert (r.status_code, r.json()["error"]) == (404, "model '' not found")
    r = post(fake, "/api/chat", {"model": "", "messages": []})
    assert (r.status_code, r.json()["error"]) == (400, "model is required")


# ----------------------------------------------------------------------------- scheduler semantics
def test_empty_prompt_loads_and_keep_alive_zero_unloads(fake: FakeOllama) -> None:
    r = post(fake, "/api/generate", {"model": "llama3.1:8b"})
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    body = r.json()
    assert body["done_reason"] == "load" and body["done"] is True and body["response"] == ""
    assert not set(METRICS) & set(body)
    assert [m["name"] for m in ps(fake)] == ["llama3.1:8b"] and fake.loads["llama3.1:8b"] == 1
    chat = post(fake, "/api/chat", {"model": "llama3.1:8b", "messages": []}).json()
    assert keys(chat) == ["model", "created_at", "message", "done_reason", "done"] and chat["done_reason"] == "load"
    assert fake.loads["llama3.1:8b"] == 1  # already loaded: just touched
    body = post(fake, "/api/generate", {"model": "llama3.1:8b", "keep_alive": 0}).json()
    assert body["done_reason"] == "unload" and ps(fake) == []
    body = post(fake, "/api/chat", {"model": "llama3.1:8b", "keep_alive": "0s"}).json()
    assert body["done_reason"] == "unload" and ps(fake) == [] and fake.loads["llama3.1:8b"] == 1  # no load first


def test_model_absent_from_ps_while_loading(fake: FakeOllama) -> None:
    fake.set_timing(load_time=0.4, ttft=0.01, token_gap=0.01, tokens=1)
    t = threading.Thread(target=post, args=(fake, "/api/generate", {"model": "llama3.1:8b"}))
    t.start()
    time.sleep(0.15)
    assert ps(fake) == []
    t.join()
    assert len(ps(fake)) == 1


def test_keep_alive_forever_survives_requests_without_keep_alive(fake: FakeOllama) -> None:
    post(fake, "/api/generate", {"model": "llama3.1:8b", "keep_alive": -1})
    year = expires_year(fake, "llama3.1:8b")
    assert year >= 2318
    post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x"})
    fake.wait_settled()
    assert expires_year(fake, "llama3.1:8b") == year
    post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x", "keep_alive": "5m"})  # overwrite
    fake.wait_settled()
    remaining = (expires_dt(fake, "llama3.1:8b") - datetime.now().astimezone()).total_seconds()
    assert 290 < remaining <= 300


def test_omitted_keep_alive_restarts_idle_timer_with_stored_duration(fake: FakeOllama) -> None:
    fake.load("llama3.1:8b", keep_alive=2.0)
    before = expires_dt(fake, "llama3.1:8b")
    time.sleep(0.3)
    post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x"})
    fake.wait_settled()
    after = expires_dt(fake, "llama3.1:8b")
    remaining = (after - datetime.now().astimezone()).total_seconds()
    assert after > before and 1.8 < remaining <= 2.0  # finish time + stored 2 s, not the 300 s default


def test_default_keep_alive_applies_at_load(fake: FakeOllama) -> None:
    fake.default_keep_alive = 0.3
    post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x"})
    assert len(ps(fake)) == 1
    time.sleep(0.4)
    assert ps(fake) == []


def test_model_does_not_expire_while_request_in_flight(fake: FakeOllama) -> None:
    fake.set_timing(ttft=0.01, token_gap=0.05, tokens=8, load_time=0.01)
    fake.load("llama3.1:8b", keep_alive=0.05)
    r = post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x"}, stream=True)
    it = r.iter_lines()
    next(it)
    time.sleep(0.2)
    assert [m["name"] for m in ps(fake)] == ["llama3.1:8b"]
    list(it)
    time.sleep(0.1)
    assert ps(fake) == []


def test_num_ctx_change_reloads(fake: FakeOllama) -> None:
    """On every version a request whose num_ctx differs from the runner's reloads it; the same does not.
    (Version by version: tests/test_fake_ollama_versions.py.)"""
    post(fake, "/api/generate", {"model": "llama3.1:8b"})
    assert ps(fake)[0]["context_length"] == 4096 and fake.reloads["llama3.1:8b"] == 0
    body = post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x", "options": {"num_ctx": 8192},
                                        "stream": False}).json()
    assert fake.reloads["llama3.1:8b"] == 1 and ps(fake)[0]["context_length"] == 8192
    assert body["load_duration"] >= 0.055e9
    post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x", "options": {"num_ctx": 8192}})
    assert fake.reloads["llama3.1:8b"] == 1  # same num_ctx: no reload
    post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x"})  # without num_ctx: the default, 4096
    assert fake.reloads["llama3.1:8b"] == 2 and ps(fake)[0]["context_length"] == 4096
    assert fake.loads["llama3.1:8b"] == 3
    assert [(e.kind, e.cause) for e in fake.events] == [
        ("load", "cold"), ("reload", "num_ctx 8192 != 4096"), ("reload", "num_ctx 4096 != 8192")]


@pytest.mark.parametrize("value,ns", [(None, None), (0, 0), (1.5, 1_500_000_000), (-1, FOREVER_NS), ("5m", 300 * 10**9),
                                      ("1h30m", 5400 * 10**9), ("300ms", 3 * 10**8), ("0", 0), ("-1m", FOREVER_NS)])
def test_keep_alive_parsing(value: Any, ns: int | None) -> None:
    assert parse_keep_alive(value) == ns


@pytest.mark.parametrize("value,message", [("-1", 'time: missing unit in duration "-1"'),
                                           ("300", 'time: missing unit in duration "300"'),
                                           ("soon", 'time: invalid duration "soon"'),
                                           (True, "Unsupported type: 'bool'")])
def test_bad_keep_alive_is_400(fake: FakeOllama, value: Any, message: str) -> None:
    r = post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x", "keep_alive": value})
    assert (r.status_code, r.json()) == (400, {"error": message})
    assert ps(fake) == []


# ----------------------------------------------------------------------------- generation faults
def test_fault_busy_exact_bytes(fake: FakeOllama) -> None:
    fake.set_fault("/api/generate", "busy")
    r = post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x"})
    fx = (API / "errors" / "503_server_busy_max_pending_requests_77_bytes_2026-06.json").read_bytes().rstrip(b"\n")
    assert (r.status_code, r.content, len(r.content)) == (503, fx, 77)
    assert r.json()["error"] == BUSY_MESSAGE and ps(fake) == []


def test_fault_oom_matches_fixture(fake: FakeOllama) -> None:
    fake.load("llama3.1:8b")
    fake.set_fault("/api/chat", "oom")
    r = post(fake, "/api/chat", {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "x"}]})
    fx = (API / "errors" / "500_runner_terminated_cudamalloc_oom_2026-03.json").read_bytes().rstrip(b"\n")
    assert (r.status_code, r.content) == (500, fx)
    assert ps(fake) == []


def test_fault_context_length(fake: FakeOllama) -> None:
    fake.set_fault("/api/generate", "context_length")
    r = post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x"})
    assert r.status_code == 400 and "context" in r.json()["error"]
    assert len(ps(fake)) == 1  # the runner was loaded; llama-server rejected the request


def test_fault_stream_error(fake: FakeOllama) -> None:
    fake.set_fault("/api/generate", "stream_error", after=2, message="boom")
    got = lines(post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x"}, stream=True))
    assert [g.get("response") for g in got[:2]] == ["Hello", ","] and got[2] == {"error": "boom"}
    assert len(got) == 3 and not any(g.get("done") for g in got)
    r = post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x", "stream": False})
    assert (r.status_code, r.json()) == (500, {"error": "boom"})


def test_fault_truncate_stream(fake: FakeOllama) -> None:
    fake.set_fault("/api/chat", "truncate_stream", after=2)
    r = post(fake, "/api/chat", {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "x"}]}, stream=True)
    seen = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for line in r.iter_lines():
            seen.append(json.loads(line))
    assert len(seen) == 2 and not any(s["done"] for s in seen)


def test_fault_not_found_and_per_model_and_times(fake: FakeOllama) -> None:
    fake.add_model("other")
    fake.set_fault("/api/generate", "not_found", model="other", times=1)
    r = post(fake, "/api/generate", {"model": "other", "prompt": "x"})
    assert (r.status_code, r.json()) == (404, {"error": "model 'other' not found"})
    assert post(fake, "/api/generate", {"model": "llama3.1:8b", "prompt": "x"}).status_code == 200
    assert post(fake, "/api/generate", {"model": "other", "prompt": "x"}).status_code == 200  # used up


# ----------------------------------------------------------------------------- generic faults
def test_fault_delay(fake: FakeOllama) -> None:
    fake.set_fault("/api/ps", "delay", seconds=0.3)
    t0 = time.monotonic()
    assert requests.get(fake.url + "/api/ps").json() == {"models": []}
    assert time.monotonic() - t0 >= 0.3
    t0 = time.monotonic()
    requests.get(fake.url + "/api/tags")
    assert time.monotonic() - t0 < 0.2


def test_fault_status(fake: FakeOllama) -> None:
    fake.set_fault("/api/ps", "status", code=500, body="internal")
    r = requests.get(fake.url + "/api/ps")
    assert (r.status_code, r.json()) == (500, {"error": "internal"})
    fake.set_fault("/api/ps", "status", code=502)
    r = requests.get(fake.url + "/api/ps")
    assert (r.status_code, r.text) == (502, "502 bad gateway") and r.headers["Content-Type"].startswith("text/plain")
    fake.clear_faults("/api/ps")
    assert requests.get(fake.url + "/api/ps").status_code == 200


def test_fault_garbage(fake: FakeOllama) -> None:
    fake.set_fault("/api/tags", "garbage")
    r = requests.get(fake.url + "/api/tags")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json; charset=utf-8"
    with pytest.raises(ValueError):
        r.json()


def test_fault_reset_and_truncate(fake: FakeOllama) -> None:
    fake.set_fault("/api/version", "reset")
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(fake.url + "/api/version", timeout=2)
    fake.set_fault("/api/version", "truncate")
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(fake.url + "/api/version", timeout=2).json()
    fake.clear_faults()
    assert requests.get(fake.url + "/api/version").json() == {"version": "0.32.15"}


def raw_get(fake: FakeOllama, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", fake.port), timeout=2) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_fault_truncate_and_reset_on_the_wire(fake: FakeOllama) -> None:
    fake.load("llama3.1:8b")
    fake.set_fault("/api/ps", "truncate", missing=10)
    head, _, body = raw_get(fake, "/api/ps").partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    assert length == len(body) + 10 and body.startswith(b'{"models":[{"name":"llama3.1:8b"')
    fake.set_fault("/api/ps", "reset")
    with pytest.raises(ConnectionResetError):
        raw_get(fake, "/api/ps")


def test_fault_star_applies_to_every_path(fake: FakeOllama) -> None:
    fake.set_fault("*", "status", code=503, body="down")
    for path in ("/", "/api/ps", "/api/version", "/nope"):
        assert requests.get(fake.url + path).status_code == 503
    fake.clear_faults()
    assert requests.get(fake.url + "/").status_code == 200


def test_hang_released_by_clear_faults(fake: FakeOllama) -> None:
    fake.set_fault("/api/ps", "hang")
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(requests.get(fake.url + "/api/ps", timeout=5).status_code))
    t.start()
    time.sleep(0.2)
    assert result == []
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(fake.url + "/api/ps", timeout=0.2)
    fake.clear_faults()
    t.join(2)
    assert result == [200]


def test_hang_and_streams_do_not_block_stop() -> None:
    fake = FakeOllama().start()
    fake.add_model("m")
    fake.set_timing(ttft=0.01, token_gap=1.0, tokens=100, load_time=0.01)
    fake.set_fault("/api/ps", "hang")
    errors: list[BaseException] = []

    def call(method: str, path: str, **kw: Any) -> None:
        try:
            r = requests.request(method, fake.url + path, timeout=10, **kw)
            list(r.iter_lines())
        except requests.RequestException as e:
            errors.append(e)

    threads = [threading.Thread(target=call, args=("GET", "/api/ps")),
               threading.Thread(target=call, args=("POST", "/api/generate"),
                                kwargs={"json": {"model": "m", "prompt": "x"}, "stream": True})]
    for t in threads:
        t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    fake.stop()
    assert time.monotonic() - t0 < 1.0
    for t in threads:
        t.join(3)
        assert not t.is_alive()
    assert len(errors) == 2  # neither got a complete answer
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(fake.url + "/", timeout=1)


def test_refuse_and_accept_connections_same_port(fake: FakeOllama) -> None:
    port = fake.port
    session = requests.Session()
    assert session.get(fake.url + "/").status_code == 200  # leaves a kept-alive connection
    fake.refuse_connections()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with pytest.raises(requests.exceptions.ConnectionError):
        session.get(fake.url + "/", timeout=1)
    fake.accept_connections()
    assert fake.port == port
    assert session.get(fake.url + "/api/version").json() == {"version": "0.32.15"}
    assert fake.loaded() == [] and "llama3.1:8b" in [m["name"] for m in session.get(fake.url + "/api/tags").json()["models"]]


# ----------------------------------------------------------------------------- observation
def test_requests_are_recorded(fake: FakeOllama) -> None:
    requests.get(fake.url + "/api/ps")
    post(fake, "/api/show", {"model": "llama3.1:8b"}, headers={"X-Probe": "1"})
    rec = fake.requests
    assert [(r.method, r.path) for r in rec] == [("GET", "/api/ps"), ("POST", "/api/show")]
    assert rec[1].json == {"model": "llama3.1:8b"} and rec[1].headers["X-Probe"] == "1" and rec[0].json is None
    assert rec[0].time <= rec[1].time <= time.monotonic()
    assert fake.count("/api/ps") == 1 and fake.count("/api/show", "GET") == 0
    fake.reset_requests()
    assert fake.requests == [] and fake.count("/api/ps") == 0


def test_go_json_escapes_html(fake: FakeOllama) -> None:
    raw = (API / "show" / "show_llama3.2-3b_crewai_2025-01-10.json").read_bytes()
    assert b"\\u003c" in raw  # the real server escapes < like Go
    assert b"\\u003c|eot_id|\\u003e" in post(fake, "/api/show", {"model": "llama3.1:8b"}).content

"""The log parser on real lines: every published example line (tests/fixtures/ollama/lines) and every
captured server log (tests/fixtures/ollama/logs), then the edge cases of each format."""

from __future__ import annotations

from pathlib import Path

import pytest

from ollama_exporter import logparse as lp
from ollama_exporter.logsources import LineSplitter
from ollama_exporter.traffic import UNATTRIBUTED, TrafficStats
from tests.conftest import FIXTURES
from tests.fakes.ollama_log import gin_line, go_duration, request_lines, slog_line

OWN = "192.0.2.1"
I, M = lp.IGNORED, lp.MALFORMED
BLOB_E6 = "e8ad13eff07a78d89926e9e8b882317d082ef5bf9768ad7b50fcdbbcd63748de"


def example_blocks() -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    current = None
    for line in (FIXTURES / "lines" / "verbatim-examples.log").read_text(encoding="utf-8").split("\n"):
        if line.startswith("## "):
            current = blocks.setdefault(line.split()[1], [])
        elif current is not None and line:
            current.append(line)
    return blocks


# What each line of each published example (real-traffic notes, section 7) means, in order.
EXPECTED = {
    "E1": [lp.GinRequest("/v1/completions", "POST", "200", 0.082985212, False)],
    "E2": [lp.GinRequest("/v1/chat/completions", "POST", "500", 314.0, False)],
    "E3": [lp.GinRequest("/api/chat", "POST", "500", 4 * 3600 + 27 * 60 + 55.0, False)],
    "E4": [lp.GinRequest("/api/chat", "POST", "200", 70.0, False), lp.QueuedAbort()],
    "E5": [lp.LoadDone(30.22), lp.LoadDone(30.22)],
    "E6": [lp.LoadStart(BLOB_E6, 35253, False)],
    "E7": [lp.RunnerCrash()],
    "E8": [I],  # glued onto a C library message, but an unremarkable WARN
    "E9": [I, lp.ServerStart("0.4.1-rc0")],
    "E10": [I],
    "E11": [I, I, lp.LoadDone(7.30), lp.TemplateSelection("qwen3.8:27b-mtp-128k"), lp.LoadedRunners(1)],
    "E12": [lp.SlotLaunch(0, 1040), lp.SlotPrompt(0, 1040, 32952)],
    "E13": [I, lp.SlotPromptEval(0, 1040, 16.9278, 840), lp.SlotEval(0, 1040, 41.14908, 138), I],
    "E14": [lp.SlotRelease(0, 6763, True)],
    "E15": [I, I],
    "E16": [I, I, I],
    "E17": [I],
    "E18": [I, lp.SlotRelease(0, 0, False), I, lp.GinRequest("/api/chat", "POST", "200", 1.282435416, False)],
    "E19": [I],
}


def _same(result, expected) -> bool:
    if isinstance(expected, str) or type(result) is not type(expected):
        return result == expected
    for name in expected.__dataclass_fields__:
        a, b = getattr(result, name), getattr(expected, name)
        if isinstance(b, float) and not a == pytest.approx(b, rel=1e-9):
            return False
        if not isinstance(b, float) and a != b:
            return False
    return True


def test_every_published_example_has_expectations():
    assert sorted(example_blocks(), key=lambda e: int(e[1:])) == [f"E{n}" for n in range(1, 20)]


@pytest.mark.parametrize("block", sorted(EXPECTED, key=lambda e: int(e[1:])))
def test_published_example_lines(block):
    lines = example_blocks()[block]
    parser = lp.LineParser(OWN)
    results = [parser.parse(line) for line in lines]
    assert len(results) == len(EXPECTED[block]), lines
    for line, result, expected in zip(lines, results, EXPECTED[block]):
        assert _same(result, expected), f"{line!r}: {result!r} != {expected!r}"


def test_examples_e12_e13_give_prompt_cache_and_generated_tokens():
    """840 of the 32952 prompt tokens were processed; the rest came from the prompt cache."""
    blocks = example_blocks()
    stats = TrafficStats(OWN)
    stats.feed_many(line.encode() for line in blocks["E12"] + blocks["E13"])
    v = stats.value()
    assert v.prompt_tokens == {(UNATTRIBUTED, "miss"): 840, (UNATTRIBUTED, "hit"): 32952 - 840}
    assert v.generated_tokens == {UNATTRIBUTED: 138}
    assert v.prefill[UNATTRIBUTED].sum == pytest.approx(16.9278)
    assert v.tpot[UNATTRIBUTED].sum == pytest.approx(41.14908 / 138)


def test_example_e11_names_the_loaded_model_as_api_tags_does():
    """The load chain: llama-server started in 7.30 s, then `template selection`, then one runner."""
    stats = TrafficStats(OWN)
    start = slog_line("starting llama-server", cmd=f"/usr/lib/ollama/llama-server --model /m/blobs/sha256-{'a' * 64} "
                                                   "--port 53443")
    stats.feed_many([start.encode()] + [line.encode() for line in example_blocks()["E11"]])
    load = stats.value().load_durations
    assert list(load) == ["qwen3.8:27b-mtp-128k"] and load["qwen3.8:27b-mtp-128k"].sum == pytest.approx(7.30)


# --- every captured server log: what the exporter counts from it --------------------------------------

def feed_file(path: Path) -> TrafficStats:
    stats = TrafficStats(OWN)
    stats.feed_many(LineSplitter().feed(path.read_bytes()))
    return stats


LOG_EXPECTATIONS = {
    # file prefix: (parsed, ignored, malformed), {(route, method, code): n}, other non-empty values
    "2023-10_journald_plain": ((3, 10, 0), {("/", "HEAD", "200"): 1, ("other", "GET", "200"): 1}, {}),
    "2023-12_gin_404": ((1, 0, 0), {("/api/generate", "GET", "404"): 1}, {}),
    "2024-04_v0.1.32_journald_two_gpus": ((1, 9, 0), {}, {"load_failures": {(UNATTRIBUTED, "oom"): 1}}),
    "2024-04_v0.1.32_partial_offload": ((0, 7, 0), {}, {}),
    "2024-05_v0.1.37_msys2": ((0, 11, 0), {}, {}),
    "2024-05_windows_inference_compute": ((3, 3, 0), {("/", "HEAD", "200"): 1, ("/api/show", "POST", "200"): 2}, {}),
    "2024-06_docker_desktop": ((1, 9, 0), {("/api/chat", "POST", "200"): 1}, {}),
    "2024-08_v0.3.5": ((2, 3, 0), {("/api/chat", "POST", "404"): 1}, {}),
    "2024-08_v0.3.6": ((1, 4, 0), {}, {}),
    "2024-12_journald_gin_500": ((10, 0, 0), {("/api/chat", "POST", "500"): 10}, {}),
    "2024-12_offload_to_cuda": ((2, 3, 0), {}, {}),
    "2025-01_docker_compose": ((0, 18, 0), {}, {}),
    "2025-01_docker_intel_gpu": ((9, 3, 0), {("/api/chat", "POST", "500"): 1, ("/api/version", "GET", "200"): 4,
                                            ("/api/tags", "GET", "200"): 2, ("/api/pull", "POST", "200"): 1},
                                 {"load_failures": {(UNATTRIBUTED, "other"): 1}}),
    "2025-01_gin_api_show_burst": ((14, 0, 0), {("/api/show", "POST", "404"): 1, ("/api/show", "POST", "200"): 13},
                                   {}),
    "2025-01_windows_laptop": ((0, 10, 0), {}, {}),
    "2025-02_gpu_discovery": ((0, 2, 0), {}, {}),
    "2025-02_journald_cli_ps": ((6, 5, 0), {("/", "HEAD", "200"): 3, ("/api/ps", "GET", "200"): 3}, {}),
    "2025-02_journald_llm_server": ((0, 9, 0), {}, {}),
    "2025-02_no_compatible_gpus": ((8, 2, 0), {("/api/tags", "GET", "200"): 1, ("/api/show", "POST", "200"): 7}, {}),
    "2025-02_v0.5.12-rc1": ((1, 4, 0), {}, {}),
    "2025-02_windows_fit": ((0, 3, 0), {}, {}),
    "2025-03_docker_desktop_cudamalloc": ((1, 12, 0), {}, {"runner_crashes": {UNATTRIBUTED: 1}}),
    "2025-03_docker_desktop_prefix": ((2, 9, 0), {}, {}),
    "2025-03_v0.5.13_macos_gin_503": ((4, 0, 0), {("/api/generate", "POST", "503"): 4}, {}),
    "2025-03_windows_grid": ((0, 11, 0), {}, {}),
    "2025-03_windows_vram": ((0, 8, 0), {}, {}),
    "2025-04_source_build": ((1, 4, 0), {}, {}),
    "2025-04_v0.6.6": ((1, 7, 0), {}, {}),
    "2025-05_journald_pt_locale": ((2, 1, 0), {}, {}),
    "2025-05_windows_detected": ((0, 5, 0), {}, {}),
    "2025-05_windows_offload_partial": ((1, 9, 0), {}, {}),
    "2025-06_journald_cpu_only": ((2, 2, 0), {}, {}),
    "2025-07_msty_pino": ((0, 4, 0), {}, {}),
    "2025-08_v0.9.6": ((1, 3, 0), {}, {}),
    "2025-08_windows_runner_started": ((4, 6, 0), {("/api/generate", "POST", "200"): 2}, {}),
    "2025-09_journald_zh_locale": ((4, 5, 0), {("/api/generate", "POST", "200"): 1}, {}),
    "2025-10_windows_cpu_buffer": ((0, 22, 0), {}, {}),
    "2026-03_v0.17.7": ((0, 10, 0), {}, {}),
    "2026-05_v0.30.0-rc15": ((0, 11, 0), {}, {}),
    "2026-06_llama_context": ((0, 1, 0), {}, {}),
    "2026-08_v0.32.9": ((0, 1, 0), {}, {}),
}
LOGS = sorted((FIXTURES / "logs").glob("*.log"))


def test_every_captured_log_has_expectations():
    names = [p.name for p in LOGS]
    assert sorted(next(n for n in names if n.startswith(prefix)) for prefix in LOG_EXPECTATIONS) == names


@pytest.mark.parametrize("prefix", sorted(LOG_EXPECTATIONS))
def test_captured_server_log(prefix):
    path = next(p for p in LOGS if p.name.startswith(prefix))
    (parsed, ignored, malformed), requests, others = LOG_EXPECTATIONS[prefix]
    v = feed_file(path).value()
    assert (v.lines["parsed"], v.lines["ignored"], v.lines["malformed"]) == (parsed, ignored, malformed)
    assert v.requests == requests
    assert {k: sum(h.count for h in hs.values()) for k, hs in (("durations", v.durations),)}["durations"] == \
        sum(requests.values())
    for name in ("load_failures", "runner_crashes", "completions", "generated_tokens", "own_requests"):
        assert getattr(v, name) == others.get(name, {}), name


def test_long_latencies_land_in_the_top_buckets():
    """29m59s, 30m0s and 18m31s (Ollama's 30-minute load timeout and friends) are told apart."""
    v = feed_file(next(p for p in LOGS if "29m59s" in p.name)).value()
    h = v.durations[("/api/chat", "5xx")]
    assert h.count == 10
    assert h.sum == pytest.approx(4 * 1799 + 2 * 1800 + 1111 + 4.709180529 + 19.409145891 + 49.968259888)
    below_20m = h.counts[h.buckets.index(1200.0)]
    assert below_20m == 4 and h.counts[h.buckets.index(1800.0)] == 10


# --- gin --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("0s", 0.0), ("3.667µs", 3.667e-6), ("33.313μs", 33.313e-6), ("82.985212ms", 0.082985212),
    ("16.862061865s", 16.862061865), ("5m14s", 314.0), ("1m10s", 70.0), ("30m0s", 1800.0),
    ("4h27m55s", 16075.0), ("999ns", 999e-9),
])
def test_go_durations(text, seconds):
    assert lp.parse_go_duration(text) == pytest.approx(seconds)
    assert lp.parse_go_duration(go_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "12", "5x", "1.5", "s", "5m14"])
def test_not_go_durations(text):
    assert lp.parse_go_duration(text) is None


@pytest.mark.parametrize("path, route", [
    ("/api/chat", "/api/chat"), ("/api/tags?x=1&model=secret", "/api/tags"), ("/", "/"),
    ("/api/blobs/sha256:" + "a" * 64, "/api/blobs/:digest"), ("/v1/models/qwen3:8b", "/v1/models/:model"),
    ("/v1/models", "/v1/models"), ("/api/blobs/", "other"), ("/api/blobs/a/b", "other"),
    ("/wp-admin/login.php", "other"), ("/api/chat/", "other"), ("/api/ch\\\"at", "other"), ("/metrics", "other"),
])
def test_routes_are_bounded(path, route):
    assert lp.route_of(path) == route


def test_gin_line_fields_and_bounds():
    parser = lp.LineParser(OWN)
    r = parser.parse(gin_line(499, 12.5, "10.1.2.3", "POST", "/api/generate?token=abc"))
    assert r == lp.GinRequest("/api/generate", "POST", "499", 12.5, False)
    r = parser.parse(gin_line(200, 0.001, "2001:db8::1234:5678:9abc", "PROPFIND", "/x"))
    assert (r.method, r.route, r.own) == ("other", "other", False)
    assert parser.parse(gin_line(200, 0.1, OWN, "GET", "/api/ps")).own is True
    assert parser.parse(gin_line(200, 0.1, "192.0.2.10", "GET", "/api/ps")).own is False  # a prefix is not a match
    assert lp.LineParser("").parse(gin_line(200, 0.1, OWN)).own is False


def test_gin_in_colour_as_under_docker_run_t():
    colour = ('[GIN] 2025/03/17 - 07:09:31 |\x1b[97;42m 200 \x1b[0m|    1.282435416s |       127.0.0.1 |'
              '\x1b[97;46m POST    \x1b[0m "/api/chat"')
    assert lp.LineParser(OWN).parse(colour) == lp.GinRequest("/api/chat", "POST", "200", 1.282435416, False)


@pytest.mark.parametrize("line", [
    "[GIN] 2024/08/30 - 10:28:57 | 200 |  lots of time |       127.0.0.1 | POST     \"/api/chat\"",
    "[GIN] 2024/08/30 - 10:28:57 | 200 | 82.985212ms",
    "[GIN] garbage",
])
def test_broken_gin_lines_are_malformed(line):
    assert lp.LineParser(OWN).parse(line) == M


def test_gin_debug_lines_are_ignored():
    assert lp.LineParser(OWN).parse('[GIN-debug] POST   /api/pull  --> github.com/ollama/ollama/server.(*Server)') == I


# --- slog events ------------------------------------------------------------------------------------

@pytest.mark.parametrize("msg, attrs, event", [
    ("Listening on 127.0.0.1:11434 (version 0.3.6)", {}, lp.ServerStart("0.3.6")),
    ("starting llama-server", {"cmd": f"/usr/lib/ollama/llama-server --model /b/sha256-{'c' * 64} --port 40001"},
     lp.LoadStart("c" * 64, 40001, True)),
    ("starting runner", {"cmd": f"ollama runner --ollama-engine --model /b/sha256-{'c' * 64} --port 56277"},
     lp.LoadStart("c" * 64, 56277, False)),
    ("llama-server started in 7.30 seconds", {}, lp.LoadDone(7.30)),
    ("loaded runners", {"count": 3}, lp.LoadedRunners(3)),
    ("template selection", {"model": "registry.ollama.ai/library/qwen3:8b"}, lp.TemplateSelection("qwen3:8b")),
    ("template selection", {"model": "registry.ollama.ai/acme/coder:7b"}, lp.TemplateSelection("acme/coder:7b")),
    ("template selection", {"model": "hf.co/org/repo:Q4_K_M"}, lp.TemplateSelection("hf.co/org/repo:Q4_K_M")),
    ("Load failed", {"model": f"/b/sha256-{'d' * 64}", "error": "cudaMalloc failed: out of memory"},
     lp.LoadFailed("oom", "d" * 64)),
    ("Load failed", {"model": f"/b/sha256-{'d' * 64}", "error": "timed out waiting for llama runner to start"},
     lp.LoadFailed("timeout", "d" * 64)),
    ("error loading llama server", {"error": "model requires more system memory (9 GiB) than is available (3 GiB)"},
     lp.LoadFailed("oom", "")),
    ("client connection closed before llama-server finished loading, aborting load", {},
     lp.LoadFailed("client_gone", "")),
    ("llama-server terminated", {"error": "signal: killed", "exit": -1}, lp.RunnerCrash()),
    ("runtime OOM detected; expiring loaded models to clear memory before next request", {"model": "x"},
     lp.RuntimeOom()),
    ("truncating input prompt", {"limit": 4096, "prompt": 5000, "keep": 4, "new": 4096}, lp.PromptTruncated()),
    ("aborting chat request due to client closing the connection", {}, lp.QueuedAbort()),
    ("llama-server process no longer running", {}, I),  # the same crash as `terminated`: not counted twice
    ("starting go runner", {}, I),
    ("running llama-server for discovery", {"cmd": "/usr/lib/ollama/llama-server"}, I),
])
def test_slog_events(msg, attrs, event):
    assert lp.LineParser(OWN).parse(slog_line(msg, **attrs)) == event


def test_slog_line_without_msg_is_malformed():
    assert lp.LineParser(OWN).parse("time=2025-01-01T00:00:00Z level=INFO source=x.go:1") == M


def test_journald_rate_limit_message():
    line = "systemd-journald[312]: Suppressed 1873 messages from ollama.service"
    assert lp.LineParser(OWN).parse(line) == lp.JournalSuppressed(1873)


# --- llama-server lines ---------------------------------------------------------------------------------

def test_a_fake_request_block_parses_like_the_real_examples():
    parser = lp.LineParser(OWN)
    results = [parser.parse(line) for line in request_lines(1, 7, prompt_tokens=100, cached=60, generated=120)]
    events = [r for r in results if not isinstance(r, str)]
    assert events == [lp.SlotLaunch(1, 7), lp.SlotPrompt(1, 7, 100), lp.SlotPromptEval(1, 7, 0.26325, 40),
                      lp.SlotEval(1, 7, 1.0086, 120), lp.SlotRelease(1, 7, False)]
    assert M not in results


@pytest.mark.parametrize("line", [
    "slot print_timing: id  0 | task 5 | prompt eval time = fast",
    "slot print_timing: id  0 | task 5 | something new = 12",
    "slot      release: id  0 | task 5 | stop processing: n_tokens = many",
    "slot   operator(): id  0 | task 5 | new prompt, n_ctx_slot = 4096",
    "slot print_timing: id x | task 5 | prompt eval time = 1 ms / 1 tokens",
])
def test_drifted_llama_server_lines_are_malformed(line):
    assert lp.LineParser(OWN).parse(line) == M


def test_glued_invalid_and_garbage_lines_never_raise():
    stats = TrafficStats(OWN)
    junk = [b"\xff\xfe\x00garbage", b"x" * 10, b"", b"   continuation", "ünïcödé [GIN] 200".encode(), b"\x1b[31m",
            b"slot slot slot | task | task", b"level=level=level=", b"msg=\"unterminated", None,
            ("cuda driver library failed to get device context 2" + gin_line(200, 1.5)).encode()]
    stats.feed_many(junk)
    v = stats.value()
    assert sum(v.lines.values()) == len(junk)
    assert v.requests == {("/api/chat", "POST", "200"): 1}  # the glued gin line still counts
    assert v.lines["malformed"] >= 2  # the overlong line (None) and the broken [GIN]

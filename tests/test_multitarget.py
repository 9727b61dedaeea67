"""Multi-target mode (/probe?target=...): refused and malformed targets never reach the network, a hung
target costs only its own scrape, deadlines come from the scrape timeout, caches are bounded."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest
import requests
import yaml

from ollama_exporter.config import DEFAULT_MODULE, Config, Module
from ollama_exporter.multitarget import MultiTarget, TargetError, allowed, deadline_seconds, target_url
from tests.conftest import sample
from tests.fakes.hostile import ScriptedServer, head


@pytest.mark.parametrize("raw, url", [
    ("gpu-box:11434", "http://gpu-box:11434"),
    ("10.0.0.5:11434", "http://10.0.0.5:11434"),
    ("http://gpu-box", "http://gpu-box:80"),
    ("https://proxy.example/ollama/", "https://proxy.example:443/ollama"),
    ("[fd00::5]:11434", "http://[fd00::5]:11434"),
    ("HTTP://GPU-BOX:11434", "http://gpu-box:11434"),
])
def test_targets_are_normalised_before_matching(raw, url):
    assert target_url(raw) == url


@pytest.mark.parametrize("raw", ["", "ftp://x:1", "http://user:pw@x:1", "http://x:1/?a=b", "x y:1", "http://:1",
                                 "http://x:99999", "a" * 3000, "http://x:1\r\nHost: evil"])
def test_malformed_targets_are_400(raw):
    with pytest.raises(TargetError) as err:
        target_url(raw)
    assert err.value.status == 400


def test_allow_list_globs():
    patterns = ("http://10.0.*:11434", "https://ollama-*.internal:443")
    assert allowed("http://10.0.3.4:11434", patterns)
    assert allowed("https://ollama-7.internal:443", patterns)
    assert not allowed("http://10.1.0.1:11434", patterns)
    assert not allowed("http://169.254.169.254:80", patterns)
    assert not allowed("http://10.0.3.4:11434", ())  # empty: refuse all


@pytest.mark.parametrize("module, header, seconds", [
    (DEFAULT_MODULE, "10", 9.5), (DEFAULT_MODULE, None, 10.0), (DEFAULT_MODULE, "nonsense", 10.0),
    (DEFAULT_MODULE, "nan", 10.0), (DEFAULT_MODULE, "0.2", 0.1), (DEFAULT_MODULE, "1e9", 300.0),
    (Module("quick", timeout=2.0), "10", 2.0),
])
def test_deadline_from_the_scrape_timeout(module, header, seconds):
    assert deadline_seconds(module, header) == seconds


def probe_request(target: str, module: str = "default", timeout: str = "3"):
    from ollama_exporter.server import Request

    return Request("GET", "/probe", {"target": [target], "module": [module]},
                   {"x-prometheus-scrape-timeout-seconds": timeout}, "HTTP/1.1")


def test_refused_and_malformed_targets_never_reach_the_network():
    with ScriptedServer() as victim:
        victim.reply("GET", "/api/version", body=b'{"version":"0.30.0"}')
        port = victim.port
        multi = MultiTarget(Config())  # no allow-list: every target refused
        assert multi.handle(probe_request(f"127.0.0.1:{port}")).status == 403
        multi = MultiTarget(replace(Config(), multi_target_allow=("http://10.*",)))
        assert multi.handle(probe_request(f"127.0.0.1:{port}")).status == 403
        assert multi.handle(probe_request(f"http://u:p@127.0.0.1:{port}")).status == 400
        assert multi.handle(probe_request("10.0.0.1:1", module="nope")).status == 400
        assert victim.requests == [] and len(multi) == 0


def serve_ollama(up: ScriptedServer, models: list[str]) -> None:
    rows = [{"name": m, "model": m, "digest": f"{i:064x}", "size": 1000 + i} for i, m in enumerate(models)]
    up.reply("GET", "/api/version", body=b'{"version":"0.30.0"}')
    up.reply("GET", "/api/ps", body=json.dumps({"models": rows[:1]}).encode())
    up.reply("GET", "/api/tags", body=json.dumps({"models": rows}).encode())
    up.reply("POST", "/api/show", body=b'{"model_info":{"general.architecture":"llama","llama.context_length":8192}}')


def test_a_hung_target_costs_only_its_own_scrape_and_its_deadline():
    with ScriptedServer() as fast, ScriptedServer() as hung:
        serve_ollama(fast, ["fast:1"])
        for path in ("/api/version", "/api/ps", "/api/tags"):
            hung.script("GET", path, [30.0, head(200, b"{}")])
        multi = MultiTarget(replace(Config(), multi_target_allow=("http://127.0.0.1:*",), probes_enabled=False))
        results = {}

        def scrape(name, port, timeout):
            started = time.monotonic()
            results[name] = (multi.handle(probe_request(f"127.0.0.1:{port}", timeout=timeout)),
                             time.monotonic() - started)

        slow = threading.Thread(target=scrape, args=("hung", hung.port, "2"))
        slow.start()
        time.sleep(0.1)
        scrape("fast", fast.port, "2")
        slow.join(5)
        fast_response, fast_took = results["fast"]
        hung_response, hung_took = results["hung"]
        assert fast_took < 0.5 and sample(fast_response.body.decode(), "ollama_up") == 1
        assert sample(fast_response.body.decode(), "ollama_loaded_model_size_bytes", model="fast:1") == 1000
        assert 1.2 < hung_took < 2.0  # the scrape timeout (2 s) less the offset, not the hang (30 s)
        text = hung_response.body.decode()
        assert sample(text, "ollama_up") == 0
        assert sample(text, "ollama_exporter_source_errors_total", source="ps", reason="timeout") == 1


def test_modules_choose_the_sources():
    with ScriptedServer() as up:
        serve_ollama(up, ["a:1"])
        config = replace(Config(), multi_target_allow=("http://127.0.0.1:*",), probes_enabled=False,
                         multi_target_modules=(DEFAULT_MODULE, Module("light", sources=("version", "ps"))))
        text = MultiTarget(config).handle(probe_request(f"127.0.0.1:{up.port}", "light")).body.decode()
        assert sample(text, "ollama_up") == 1 and up.count("/api/tags") == 0 and up.count("/api/show") == 0


def test_the_target_cache_is_bounded_and_keeps_state_between_scrapes():
    servers = [ScriptedServer().start() for _ in range(3)]
    try:
        for s in servers:
            serve_ollama(s, ["m:1"])
        config = replace(Config(), multi_target_allow=("http://127.0.0.1:*",), multi_target_cache_size=2,
                         probes_enabled=False)
        multi = MultiTarget(config)
        for s in servers + servers[-1:]:
            assert multi.handle(probe_request(f"127.0.0.1:{s.port}")).status == 200
        assert len(multi) == 2
        text = multi.handle(probe_request(f"127.0.0.1:{servers[-1].port}")).body.decode()
        # the same poller as before: its counters went on (three scrapes of this target so far)
        assert servers[-1].count("/api/ps") == 3 and sample(text, "ollama_model_loads_total", model="m:1") == 0
        assert servers[-1].count("/api/show") == 1  # the show cache survived between scrapes
    finally:
        for s in servers:
            s.stop()


def test_probe_through_the_daemon(fake_ollama, exporter_factory, tmp_path):
    with ScriptedServer() as other:
        serve_ollama(other, ["elsewhere:1"])
        fake_ollama.add_model("local:1")
        config = tmp_path / "c.yml"
        config.write_text(yaml.safe_dump({"ollama": {"url": fake_ollama.url}, "poll": {"interval": "300ms"},
                                          "multi_target": {"allow": ["http://127.0.0.1:*"]}}))
        exp = exporter_factory("--config.file", str(config), "--no-probes.enabled").wait_ready()
        remote = requests.get(exp.url + "/probe", params={"target": f"127.0.0.1:{other.port}"}, timeout=5)
        assert remote.status_code == 200 and "elsewhere:1" in remote.text and "local:1" not in remote.text
        assert "process_resident_memory_bytes" not in remote.text
        local = requests.get(exp.url + "/probe", params={"target": fake_ollama.url}, timeout=5)
        assert "local:1" in local.text  # the exporter's own Ollama: answered from the poll loop's view
        assert requests.get(exp.url + "/probe", params={"target": "10.9.9.9:1"}, timeout=5).status_code == 403
        assert requests.get(exp.url + "/probe", timeout=5).status_code == 400

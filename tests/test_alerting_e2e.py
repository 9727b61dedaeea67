"""The whole chain, for real: fake Ollama + fake NVML -> the exporter -> Prometheus (with the generated rules)
-> Alertmanager -> a webhook. Alerts fire when the fakes misbehave and resolve when they recover, and every
PromQL expression of the dashboard returns data on the healthy system: the committed dashboard (default
config, job "ollama") and the one generated from alerts/tests/custom-config.mixin.yml (job "gpu-fleet",
team "ml"), whose rules are the ones loaded here. Prometheus scrapes the exporter under both jobs."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from ollama_exporter.mixin.config import DEFAULTS, MixinConfig, from_dict
from ollama_exporter.mixin.rules import rule_groups
import requests

from tests.alertmanager import Alertmanager, WebhookReceiver
from tests.conftest import BLOBS, REPO, wait_for
from tests.fakes.nvml import two_gpu_box
from tests.fakes.ollama_log import GinAccessLog, LogFile, load_lines, request_lines
from tests.prometheus import Prometheus

CUSTOM = REPO / "alerts" / "tests" / "custom-config.mixin.yml"
# The test runs in seconds, not hours, so the rules are scaled in time (5 m windows become 20 s, `for`
# windows 2 s; `promtool test rules` proves the real windows) and the latency thresholds are set in the
# config the way an operator would, so the fake's latency can cross them.
WINDOW, FOR = "20s", "2s"


def e2e_config() -> MixinConfig:
    data = yaml.safe_load(CUSTOM.read_text())
    data["thresholds"].update(latency_p99_seconds=0.5, ttft_p99_seconds=0.4)
    data["alerts"] = {name: {**data["alerts"].get(name, {}), "for": FOR} for name in DEFAULTS["alerts"]}
    return from_dict(data)


def scaled_rules(config: MixinConfig, dest: Path) -> Path:
    groups = rule_groups(config)
    for group in groups:
        for rule in group["rules"]:
            rule["expr"] = re.sub(r"\[\d+m\]", f"[{WINDOW}]", rule["expr"])
    dest.write_text(yaml.safe_dump({"groups": groups}))
    return dest


@pytest.fixture
def stack(nvml, runners, ollama_with_models, exporter_factory, tmp_path):
    fake = ollama_with_models
    fake.set_timing(ttft=0.05, token_gap=0.005, tokens=16)
    nvml.write(two_gpu_box(runners))
    log = LogFile(tmp_path / "ollama" / "server.log")  # Ollama's log: gin's line for every request it serves
    fake.access_log = GinAccessLog(log)
    fake.log = log
    exporter = exporter_factory("--ollama.url", fake.url, "--poll.interval", "500ms", "--probes.interval", "1s",
                                "--ollama.timeout", "2s", "--logs.source", "file", "--logs.path", str(log.path),
                                env=nvml.env()).wait_ready()
    webhook = WebhookReceiver()
    am = Alertmanager(tmp_path / "am", webhook.url)
    target = f"127.0.0.1:{exporter.port}"
    prom = Prometheus(tmp_path / "prom", [
        {"job_name": "ollama", "static_configs": [{"targets": [target]}]},
        {"job_name": "gpu-fleet", "static_configs": [{"targets": [target], "labels": {"team": "ml"}}]},
    ], rule_files=[str(scaled_rules(e2e_config(), tmp_path / "rules.yml"))], alertmanager=am.address)
    yield fake, nvml, runners, prom, webhook
    prom.stop()
    am.stop()
    webhook.stop()


def user_traffic(fake) -> None:
    """What users do to the healthy system: chat requests (gin lines, through the fake's access log) and the
    lines the model's llama-server writes into Ollama's log for them (one load, three requests)."""
    fake.log.write(load_lines(BLOBS["qwen3:32b"], 40000, "qwen3:32b", seconds=6.0, runners=4))
    for task in range(3):
        requests.post(fake.url + "/api/chat", json={"model": "qwen3:32b", "stream": False,
                                                     "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        fake.log.write(request_lines(0, task, prompt_tokens=200, cached=150, generated=40))


def test_alerts_fire_and_resolve_and_every_dashboard_query_has_data(stack):
    from tests import dashboard

    fake, nvml, runners, prom, webhook = stack
    user_traffic(fake)
    wait_for(lambda: prom.query('ollama_probes_total{model="qwen3:32b"} >= 3')
             and prom.query('ollama_request_generated_tokens_total > 0')
             and prom.query("instance_model:ollama_probe_duration_seconds:p99_5m")
             and prom.query("instance_gpu:ollama_gpu_memory_used:ratio")
             # both jobs scraped often enough for rate() over the dashboard's 1m window
             and all(prom.query(f'rate(ollama_exporter_source_errors_total{{job="{job}"}}[1m])')
                     for job in ("ollama", "gpu-fleet")),
             timeout=60, message="probe and GPU data in Prometheus, from both jobs")

    # a healthy system: every panel of both dashboards shows data, and their variables have values
    boards = [dashboard.load()]
    try:
        from ollama_exporter.mixin.dashboard import dashboard as generate
    except ImportError:  # the mixin extra needs Python 3.11+: check the committed dashboard only
        pass
    else:
        boards.append(generate(e2e_config()))
    for board in boards:
        empty = [(title, expr) for title, expr in dashboard.queries(board) if not prom.query(expr)]
        assert empty == [], "dashboard panels with no data on a healthy system:\n" + "\n".join(
            f"  {t}: {e}" for t, e in empty)
        for query in dashboard.variable_queries(board):
            selector = dashboard.substitute(dashboard.parse_label_values(query)[0])
            assert prom.query(selector), f"variable query {query} has no series"
    assert webhook.alerts("OllamaGPUMemoryHigh", "firing") == []
    assert webhook.alerts("OllamaLatencyP99High", "firing") == []

    # GPU 1 fills up past the config's 90 %, and every answer gets slow
    a100, rtx = two_gpu_box(runners)
    nvml.write([a100, replace(rtx, memory_used=int(rtx.memory_total * 0.95), memory_reserved=0)])
    fake.set_timing(ttft=1.0, token_gap=0.005, tokens=16)
    wait_for(lambda: webhook.alerts("OllamaGPUMemoryHigh", "firing")
             and any(a["labels"]["model"] == "qwen3:32b" for a in webhook.alerts("OllamaLatencyP99High", "firing")),
             timeout=90, message="OllamaGPUMemoryHigh and OllamaLatencyP99High delivered by Alertmanager")
    gpu_alert = webhook.alerts("OllamaGPUMemoryHigh", "firing")[0]
    assert gpu_alert["labels"]["gpu"] == "1" and gpu_alert["labels"]["uuid"] == rtx.uuid
    assert (gpu_alert["labels"]["severity"], gpu_alert["labels"]["job"], gpu_alert["labels"]["team"]) == \
        ("page", "gpu-fleet", "ml")  # from the config, and only for the job its selector names
    assert gpu_alert["annotations"]["summary"].startswith("GPU 1 on 127.0.0.1:")
    assert "95% full" in gpu_alert["annotations"]["summary"]
    latency = next(a for a in webhook.alerts("OllamaLatencyP99High", "firing") if a["labels"]["model"] == "qwen3:32b")
    assert latency["labels"]["severity"] == "critical"
    assert {a["labels"]["job"] for n in webhook.notifications for a in n["alerts"]} == {"gpu-fleet"}

    # the fakes recover: both alerts resolve
    nvml.write(two_gpu_box(runners))
    fake.set_timing(ttft=0.05, token_gap=0.005, tokens=16)
    wait_for(lambda: webhook.alerts("OllamaGPUMemoryHigh", "resolved")
             and any(a["labels"]["model"] == "qwen3:32b" for a in webhook.alerts("OllamaLatencyP99High", "resolved")),
             timeout=120, message="both alerts resolved")

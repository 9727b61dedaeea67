"""The whole chain, for real: fake Ollama + fake NVML -> the exporter -> Prometheus (with the shipped rules)
-> Alertmanager -> a webhook. Alerts fire when the fakes misbehave and resolve when they recover, and every
PromQL expression of the shipped dashboard returns data on the healthy system."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tests.alertmanager import Alertmanager, WebhookReceiver
from tests.conftest import REPO, wait_for
from tests.fakes.nvml import two_gpu_box
from tests.prometheus import Prometheus

# The test runs in seconds, not hours, so the shipped rules are scaled in time (5 m windows become 20 s,
# `for` windows 2 s; `promtool test rules` proves the real windows) and two thresholds are tuned the way
# an operator would, in the thresholds group, so the fake's latency can cross them.
WINDOW, FOR = "20s", "2s"
THRESHOLDS = {"ollama:threshold:probe_duration_p99_seconds": "0.5", "ollama:threshold:probe_ttft_p99_seconds": "0.4"}


def scaled_rules(dest: Path) -> Path:
    groups = yaml.safe_load((REPO / "alerts" / "ollama-exporter.rules.yml").read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule["expr"] = re.sub(r"\[\d+m\]", f"[{WINDOW}]", rule["expr"])
            if rule.get("record") in THRESHOLDS:
                rule["expr"] = f"vector({THRESHOLDS[rule['record']]})"
            if "for" in rule:
                rule["for"] = FOR
    dest.write_text(yaml.safe_dump(groups))
    return dest


@pytest.fixture
def stack(nvml, runners, ollama_with_models, exporter_factory, tmp_path):
    fake = ollama_with_models
    fake.set_timing(ttft=0.05, token_gap=0.005, tokens=16)
    nvml.write(two_gpu_box(runners))
    exporter = exporter_factory("--ollama.url", fake.url, "--poll.interval", "500ms", "--probes.interval", "1s",
                                "--ollama.timeout", "2s", env=nvml.env()).wait_ready()
    webhook = WebhookReceiver()
    am = Alertmanager(tmp_path / "am", webhook.url)
    prom = Prometheus(tmp_path / "prom", [{"job_name": "ollama",
                                           "static_configs": [{"targets": [f"127.0.0.1:{exporter.port}"]}]}],
                      rule_files=[str(scaled_rules(tmp_path / "rules.yml"))], alertmanager=am.address)
    yield fake, nvml, runners, prom, webhook
    prom.stop()
    am.stop()
    webhook.stop()


def test_alerts_fire_and_resolve_and_every_dashboard_query_has_data(stack):
    from tests import dashboard

    fake, nvml, runners, prom, webhook = stack
    wait_for(lambda: prom.query('ollama_probes_total{model="qwen3:32b"} >= 3')
             and prom.query("instance_model:ollama_probe_duration_seconds:p99_5m")
             and prom.query("instance_gpu:ollama_gpu_memory_used:ratio"),
             timeout=60, message="probe and GPU data in Prometheus")

    # a healthy system: every panel of the shipped dashboard shows data
    empty = [(title, expr) for title, expr in dashboard.queries(dashboard.load()) if not prom.query(expr)]
    assert empty == [], "dashboard panels with no data on a healthy system:\n" + "\n".join(
        f"  {t}: {e}" for t, e in empty)
    for query in dashboard.variable_queries(dashboard.load()):
        metric = re.search(r"label_values\(([a-z_]+)", query).group(1)
        assert prom.query(metric), f"variable query {query} has no series"
    assert webhook.alerts("OllamaGPUMemoryHigh", "firing") == []
    assert webhook.alerts("OllamaLatencyP99High", "firing") == []

    # GPU 1 fills up past 85 %, and every answer gets slow
    a100, rtx = two_gpu_box(runners)
    nvml.write([a100, replace(rtx, memory_used=int(rtx.memory_total * 0.95), memory_reserved=0)])
    fake.set_timing(ttft=1.0, token_gap=0.005, tokens=16)
    wait_for(lambda: webhook.alerts("OllamaGPUMemoryHigh", "firing")
             and any(a["labels"]["model"] == "qwen3:32b" for a in webhook.alerts("OllamaLatencyP99High", "firing")),
             timeout=90, message="OllamaGPUMemoryHigh and OllamaLatencyP99High delivered by Alertmanager")
    gpu_alert = webhook.alerts("OllamaGPUMemoryHigh", "firing")[0]
    assert gpu_alert["labels"]["gpu"] == "1" and gpu_alert["labels"]["uuid"] == rtx.uuid
    assert gpu_alert["labels"]["severity"] == "critical"
    assert gpu_alert["annotations"]["summary"].startswith("GPU 1 on 127.0.0.1:")
    assert "95% full" in gpu_alert["annotations"]["summary"]
    latency = next(a for a in webhook.alerts("OllamaLatencyP99High", "firing") if a["labels"]["model"] == "qwen3:32b")
    assert latency["labels"]["severity"] == "critical"

    # the fakes recover: both alerts resolve
    nvml.write(two_gpu_box(runners))
    fake.set_timing(ttft=0.05, token_gap=0.005, tokens=16)
    wait_for(lambda: webhook.alerts("OllamaGPUMemoryHigh", "resolved")
             and any(a["labels"]["model"] == "qwen3:32b" for a in webhook.alerts("OllamaLatencyP99High", "resolved")),
             timeout=120, message="both alerts resolved")

"""A fleet, for real: a real Prometheus scrapes three fake Ollamas through one exporter in multi-target
mode, with the README's Prometheus examples (file, HTTP and Kubernetes service discovery, static
targets), and every query of the dashboard's Fleet row returns data, one line per Ollama host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import yaml

from tests import dashboard
from tests.conftest import REPO, wait_for
from tests.fakes.hostile import ScriptedServer
from tests.fakes.nvml import two_gpu_box
from tests.fakes.ollama import FakeOllama
from tests.prometheus import Prometheus

EXAMPLES = REPO / "examples" / "prometheus"


def example(name: str, exporter: str, job: str) -> dict:
    """The scrape config of examples/prometheus/<name>, pointed at this exporter, under `job`."""
    [config] = yaml.safe_load((EXAMPLES / name).read_text())["scrape_configs"]
    config["job_name"] = job
    for rule in config["relabel_configs"]:
        if rule.get("target_label") == "__address__":
            rule["replacement"] = exporter
    return config


@pytest.fixture
def fleet(nvml, tmp_path):
    ollamas = []
    for i in range(3):
        fake = FakeOllama().start()
        fake.set_timing(ttft=0.01, token_gap=0.002, tokens=8)
        for name in (f"qwen3:{i}b", "nomic-embed-text:latest"):
            fake.add_model(name, capabilities=["embedding"] if "embed" in name else ["completion"])
        fake.load(f"qwen3:{i}b", keep_alive=-1)
        ollamas.append(fake)
    nvml.write(two_gpu_box())
    yield ollamas
    for fake in ollamas:
        fake.stop()


def test_three_ollamas_through_one_exporter_with_service_discovery(fleet, nvml, exporter_factory, tmp_path):
    local = fleet[0]  # the exporter's own Ollama: answered from its local view, GPUs included
    config = tmp_path / "exporter.yml"
    config.write_text(yaml.safe_dump({
        "ollama": {"url": local.url}, "poll": {"interval": "500ms"},
        "probes": {"interval": "500ms"},
        "multi_target": {"allow": ["http://127.0.0.1:*"], "modules": {"default": {"probes": True}}}}))
    exporter = exporter_factory("--config.file", str(config), env=nvml.env()).wait_ready()
    address = f"127.0.0.1:{exporter.port}"
    targets = [f"127.0.0.1:{fake.port}" for fake in fleet]

    sd_file = tmp_path / "ollama-targets.json"
    sd_file.write_text(json.dumps([{"targets": targets, "labels": {"team": "ml"}}]))
    k8s_file = tmp_path / "k8s-targets.json"  # what Kubernetes SD would produce for role: service
    k8s_file.write_text(json.dumps([
        {"targets": [t], "labels": {"__meta_kubernetes_namespace": "ai",
                                    "__meta_kubernetes_service_label_app_kubernetes_io_name": name,
                                    "__meta_kubernetes_service_port_name": "http"}}
        for t, name in zip(targets + ["127.0.0.1:9"], ["ollama"] * 3 + ["something-else"])]))
    with ScriptedServer() as inventory:
        inventory.reply("GET", "/ollama-targets", body=json.dumps([{"targets": targets}]).encode())
        jobs = [example("fleet-file-sd.yml", address, "ollama"),
                example("fleet-http-sd.yml", address, "ollama-http"),
                example("fleet-static.yml", address, "ollama-static"),
                example("fleet-kubernetes-sd.yml", address, "ollama-k8s")]
        jobs[0]["file_sd_configs"] = [{"files": [str(sd_file)]}]
        jobs[1]["http_sd_configs"] = [{"url": inventory.url + "/ollama-targets", "refresh_interval": "1s"}]
        jobs[2]["static_configs"] = [{"targets": targets}]
        del jobs[3]["kubernetes_sd_configs"]
        jobs[3]["file_sd_configs"] = [{"files": [str(k8s_file)]}]
        prom = Prometheus(tmp_path / "prometheus", jobs)
        try:
            run_checks(prom, fleet, targets)
        finally:
            prom.stop()


def run_checks(prom: Prometheus, fleet: list[FakeOllama], targets: list[str]) -> None:
    instances = set(targets)  # instance = the target as service discovery lists it
    wait_for(lambda: {t["labels"]["instance"] for t in prom.targets()
                      if t["labels"]["job"] == "ollama" and t["health"] == "up"} == instances,
             timeout=30, message="the three Ollamas up through /probe, instance = the Ollama")
    for job in ("ollama-http", "ollama-static", "ollama-k8s"):
        wait_for(lambda: {r["metric"]["instance"] for r in prom.query(f'ollama_up{{job="{job}"}} == 1')} == instances,
                 timeout=30, message=f"{job}: the three Ollamas")
    k8s = prom.query('ollama_up{job="ollama-k8s"}')
    assert all(r["metric"]["namespace"] == "ai" for r in k8s)  # the relabel chain kept the namespace
    assert all(r["metric"].get("team") == "ml" for r in prom.query('ollama_up{job="ollama"}'))
    for fake in fleet:  # each Ollama was polled by the exporter for its own line
        assert fake.count("/api/ps") > 0
    wait_for(lambda: len(prom.query('sum by (instance) (increase(ollama_probes_total{job="ollama"}[1m])) > 0')) == 3,
             timeout=60, message="probes of every host measured")

    board = dashboard.load()
    fleet_row = [(title, expr) for title, expr in dashboard.queries(board) if title == "Ollama hosts"]
    assert len(fleet_row) >= 6
    for title, expr in fleet_row:
        result = wait_for(lambda: prom.query(expr), timeout=20, message=f"data for {expr}")
        lines = {r["metric"].get("instance") for r in result}
        if "gpu_memory" not in expr:  # GPUs are known only where the exporter runs (the local host)
            assert lines == instances, f"{expr}: {lines}"
        else:
            assert lines == {targets[0]}, f"{expr}: {lines}"

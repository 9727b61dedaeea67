"""The shipped Prometheus rules: promtool check and unit tests pass, every alert is unit-tested,
named and labelled by convention, and has a runbook in the README."""

from __future__ import annotations

import re
import subprocess

import yaml

from ollama_exporter.metrics import DEFS
from tests.conftest import REPO

RULES = REPO / "alerts" / "ollama-exporter.rules.yml"
RULE_TESTS = REPO / "alerts" / "tests" / "ollama-exporter.test.yml"
REQUIRED = {"OllamaDown", "OllamaExporterDown", "OllamaGPUMemoryHigh", "OllamaLatencyP99High", "OllamaTTFTP99High",
            "OllamaProbeFailing", "OllamaModelCPUOffload", "OllamaGPUTemperatureHigh", "OllamaModelLoadChurn",
            "OllamaGPULost"}


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alerts() -> list[dict]:
    return [r for r in rules() if "alert" in r]


def test_promtool_check_rules(promtool):
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_promtool_unit_tests_pass(promtool):
    result = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing():
    tested: dict[str, list] = {}
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            tested.setdefault(check["alertname"], []).append(check["exp_alerts"])
    assert {a["alert"] for a in alerts()} == REQUIRED
    for name in REQUIRED:
        outcomes = tested.get(name, [])
        assert any(o == [] for o in outcomes) and any(o for o in outcomes), f"{name}: test it firing and not firing"


def test_alert_conventions_and_runbooks():
    readme = (REPO / "README.md").read_text()
    for a in alerts():
        name = a["alert"]
        assert re.fullmatch(r"Ollama[A-Z][A-Za-z0-9]+", name)
        assert a["labels"]["severity"] in ("critical", "warning")
        assert a["annotations"]["summary"] and a["annotations"]["description"]
        assert f"### {name}" in readme, f"no runbook section for {name} in the README"
    pages = {a["alert"] for a in alerts() if a["labels"]["severity"] == "critical"}
    assert {"OllamaGPUMemoryHigh", "OllamaLatencyP99High"} <= pages


def test_rules_only_use_metrics_the_exporter_exports():
    recorded = {r["record"] for r in rules() if "record" in r}
    known = set(DEFS) | {f"{n}_bucket" for n, d in DEFS.items() if d.kind == "histogram"} | recorded | {"up"}
    for r in rules():
        for name in re.findall(r"\b((?:ollama|instance\w*|up)[a-z0-9_:]*)\b(?=\s*[{\[)\s]|$)", r["expr"]):
            if name.startswith(("ollama", "instance_")) or name == "up":
                assert name in known, f"{r.get('alert') or r.get('record')}: unknown metric {name}"


def test_recorded_names_follow_level_metric_operation():
    for r in rules():
        if "record" in r:
            assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", r["record"]), r["record"]

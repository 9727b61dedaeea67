"""What the typed builders do not guarantee about the generated dashboard, for the default and a custom config.

Kept: it provisions without an import step (a `datasource` variable that every panel, target and query
variable uses; no `__inputs`), a stable uid, unique panel ids and a grid without overlaps, a unit and a
description on every panel, every panel that existed before the generator, and valid PromQL
(`promtool check rules`). Whether each query returns data is tests/test_alerting_e2e.py's job, against
a real Prometheus; that every query carries the config's selector is tests/test_mixin.py's.
"""

from __future__ import annotations

import itertools
import json
import subprocess

import pytest
import yaml

from tests import dashboard as dash
from tests.conftest import REPO

pytest.importorskip("grafana_foundation_sdk", reason="the mixin extra (Python 3.11+) is not installed")

from ollama_exporter.mixin import config as mixin_config  # noqa: E402
from ollama_exporter.mixin.dashboard import dashboard  # noqa: E402

DS = {"type": "prometheus", "uid": "${datasource}"}
ROWS = ["Fleet", "Overview", "Latency", "Traffic", "Throughput", "Models", "GPU", "Probes"]
# every panel of the hand-kept dashboard the generator replaced (grafana/ollama-exporter.json before it)
PANELS = {
    "Ollama up", "Ollama version", "Exporter version", "Loaded models", "Installed models", "GPUs up",
    "Probe success", "Source health", "Data age", "Source errors", "Time to first token", "Time per output token",
    "End-to-end probe duration", "P99 vs alert thresholds", "Probe failure ratio", "Generation speed",
    "Prompt processing speed", "Server time per probe", "Resident models", "Memory per loaded model", "CPU offload",
    "GPU memory per model (driver)", "Time until unload", "Model loads and unloads",
    "Loads per 30 min vs churn threshold", "Loads / unloads in range", "Installed model inventory", "Capabilities",
    "NVML", "GPU up", "GPUs", "GPU memory used", "GPU memory", "MIG instance memory", "GPU utilisation",
    "GPU temperature", "GPU power", "GPU clocks", "Throttle reasons", "GPU processes", "ECC errors",
    "Fan speed and performance state", "Probes sent", "Probe failures by reason", "Probes skipped by reason",
    "Loads caused by probes", "Time since last probe",
}


@pytest.fixture(scope="module", params=["default", "custom"])
def board(request) -> dict:
    if request.param == "default":
        return dash.load()  # the committed file (tests/test_mixin.py: equal to the generator's output)
    return dashboard(mixin_config.load(str(REPO / "alerts" / "tests" / "custom-config.mixin.yml")))


def non_rows(board: dict) -> list[dict]:
    return [p for p in dash.panels(board) if p["type"] != "row"]


def test_identity_and_no_import_step(board):
    assert board["uid"] == "ollama-exporter" and board["title"] == "Ollama"
    assert board.get("id") is None  # a shared dashboard carries no database id
    assert board["schemaVersion"] >= 39
    text = json.dumps(board)
    assert "__inputs" not in board and "${DS_" not in text  # the datasource variable does what an import would


def _datasource_refs(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield path, value
            yield from _datasource_refs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _datasource_refs(value, f"{path}/{i}")


def test_everything_uses_the_datasource_variable(board):
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus" and not ds.get("multi")
    for panel in non_rows(board):
        assert panel["datasource"] == DS and panel["targets"], panel["title"]
        assert all(t["datasource"] == DS for t in panel["targets"]), panel["title"]
    refs = list(_datasource_refs(board))
    assert len(refs) > 100 and all(ref == DS for _, ref in refs), [p for p, ref in refs if ref != DS][:5]


def test_rows_and_every_earlier_panel(board):
    assert [p["title"] for p in board["panels"] if p["type"] == "row"] == ROWS
    assert PANELS <= {p["title"] for p in non_rows(board)}


def test_every_panel_has_a_unit_and_a_description(board):
    for panel in non_rows(board):
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"
        assert len(panel.get("description", "")) >= 40, f"{panel['title']}: no real description"


def test_panel_ids_are_unique_and_the_grid_has_no_overlaps(board):
    ids = [p["id"] for p in dash.panels(board)]
    assert all(isinstance(i, int) and i > 0 for i in ids) and len(ids) == len(set(ids))

    def overlap(a, b):
        return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]

    groups = [board["panels"]] + [p["panels"] for p in board["panels"] if p["type"] == "row" and p.get("panels")]
    for group in groups:
        for panel in group:
            pos = panel["gridPos"]
            assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for a, b in itertools.combinations(group, 2):
            assert not overlap(a["gridPos"], b["gridPos"]), (a["title"], b["title"])


def test_promql_syntax_with_promtool(board, promtool, tmp_path):
    exprs = [expr for _, expr in dash.queries(board)]
    exprs += [dash.substitute(dash.parse_label_values(q)[0]) for q in dash.variable_queries(board)]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:check{i}:expr", "expr": expr} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout, result.stdout

"""The Grafana dashboard's structure, without a Grafana server.

Checks what makes the JSON importable and provisionable (fixed uid, a `datasource` variable that every panel
and target uses, no `${DS_...}` inputs), that the layout is sane (unique ids, gridPos, no overlaps), that
every panel says what it shows (unit, description), and that every expression is valid PromQL over metrics
the exporter really exports or the rules file really records (syntax through `promtool check rules`).
Whether each query returns data is for an end-to-end test against a real Prometheus.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess

import pytest
import yaml

from ollama_exporter.metrics import DEFS
from tests import dashboard as dash
from tests.conftest import REPO

RULES = REPO / "alerts" / "ollama-exporter.rules.yml"
DS = {"type": "prometheus", "uid": "${datasource}"}
REQUIRED_ROWS = ("Overview", "Latency", "Throughput", "Models", "GPU")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# range-vector windows other than $__rate_interval, by panel: only where a fixed window is the point
FIXED_WINDOWS = {
    ("Loads per 30 min vs churn threshold", "30m"),  # the OllamaModelLoadChurn alert's window
}
ALLOWED_WINDOWS = {"$__rate_interval", "$__range"}
# the variables every target may use, and the ones the dashboard defines
VARIABLES = {"instance": "ollama_up", "model": "ollama_model_info", "gpu": "ollama_gpu_info"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_RECORDED = re.compile(r"\b[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]*")
_METRIC = re.compile(r"\bollama_[a-z0-9_]+")
_RANGE_FUNC = re.compile(r"\b(rate|increase|irate|delta|idelta|deriv)\s*\(")


@pytest.fixture(scope="module")
def board() -> dict:
    return dash.load()


@pytest.fixture(scope="module")
def recorded() -> set[str]:
    rules = yaml.safe_load(RULES.read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def non_rows(board: dict) -> list[dict]:
    return [p for p in dash.panels(board) if p["type"] != "row"]


def metric_names(expr: str) -> set[str]:
    """Metric names in an expression: recording-rule names (with colons) and ollama_* names."""
    text = _STRING.sub('""', expr)
    names = set(_RECORDED.findall(text))
    text = _RECORDED.sub(" ", text)
    return names | set(_METRIC.findall(text))


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, matcher text inside {} or '') for every metric name in the expression."""
    out = []
    for m in re.finditer(r"\b([a-zA-Z_][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", expr):
        name = m.group(1)
        if name in metric_names(name) and (":" in name or name.startswith("ollama_")):
            out.append((name, (m.group(2) or "")[1:-1]))
    return out


def labels_of(name: str) -> set[str]:
    """The labels a series has in Prometheus (instance and job are added to every scraped series)."""
    if ":" in name:  # level:metric:operations; the level names the labels kept (ollama: = none)
        level = name.split(":")[0]
        return set() if level == "ollama" else set(level.split("_"))
    base = name
    if base not in DEFS:
        for suffix in HISTOGRAM_SUFFIXES:
            if base.endswith(suffix) and base[: -len(suffix)] in DEFS:
                base = base[: -len(suffix)]
    return set(DEFS[base].labels) | {"instance", "job"}


def range_windows(expr: str) -> list[tuple[str, str]]:
    """(function, window) for every rate()/increase()-like call: the [...] of its range vector."""
    out = []
    for m in _RANGE_FUNC.finditer(expr):
        depth, i = 1, m.end()
        while depth and i < len(expr):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            i += 1
        window = re.findall(r"\[([^\]]+)\]", expr[m.end():i])
        out.append((m.group(1), window[-1] if window else ""))
    return out


# ---------------------------------------------------------------------------------------------- basics

def test_is_valid_json_with_fixed_identity():
    text = dash.PATH.read_text(encoding="utf-8")
    board = json.loads(text)
    assert board["uid"] == "ollama-exporter"
    assert board["title"] == "Ollama"
    assert board.get("id") is None  # a shared dashboard carries no database id
    assert board["tags"] and all(isinstance(t, str) for t in board["tags"])
    assert 36 <= board["schemaVersion"] <= 41
    assert board["refresh"] == "30s"
    assert board["time"] == {"from": "now-3h", "to": "now"}


def test_provisioning_needs_no_inputs(board):
    text = dash.PATH.read_text(encoding="utf-8")
    assert "${DS_" not in text and "$DS_" not in text
    assert "__inputs" not in board  # nothing for an import to fill in: the datasource variable does it


def test_datasource_variable(board):
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert not ds.get("multi") and not ds.get("includeAll")


def _datasource_refs(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield path + "/datasource", value
            yield from _datasource_refs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _datasource_refs(value, f"{path}/{i}")


def test_every_panel_and_target_uses_the_datasource_variable(board):
    for panel in non_rows(board):
        assert panel.get("datasource") == DS, panel["title"]
        assert panel.get("targets"), f"{panel['title']}: no targets"
        for target in panel["targets"]:
            assert target.get("datasource") == DS, (panel["title"], target.get("refId"))
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"] == DS, var["name"]
    # no hard-coded datasource uid anywhere (Grafana's own built-in annotation source excepted)
    for path, ref in _datasource_refs(board):
        if path.startswith("/annotations/") and isinstance(ref, dict) and ref.get("type") == "grafana":
            continue
        assert ref == DS, path


# ------------------------------------------------------------------------------------------- variables

def test_variables_are_built_on_always_present_series(board):
    variables = {v["name"]: v for v in board["templating"]["list"]}
    for name, metric in VARIABLES.items():
        var = variables[name]
        assert var["type"] == "query", name
        assert var["multi"] is True and var["includeAll"] is True and var["allValue"] == ".*", name
        selector, label = dash.parse_label_values(dash.variable_queries({"templating": {"list": [var]}})[0])
        assert label == name
        assert selector.split("{")[0].strip() == metric, name
        assert name in labels_of(metric)
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", *VARIABLES}


def test_variable_queries_use_exported_metrics(board):
    queries = dash.variable_queries(board)
    assert len(queries) == len(VARIABLES)
    for query in queries:
        selector, label = dash.parse_label_values(query)
        (name,) = metric_names(selector)
        assert name in DEFS, query
        assert label in labels_of(name), query
        for matcher_label in re.findall(r"(\w+)\s*=~", selector):
            assert matcher_label in labels_of(name), query


# ---------------------------------------------------------------------------------------------- layout

def test_required_rows(board):
    titles = [p["title"] for p in dash.panels(board) if p["type"] == "row"]
    for row in REQUIRED_ROWS:
        assert row in titles
    assert len(titles) == len(set(titles))


def test_every_panel_has_a_unit_and_a_description(board):
    for panel in non_rows(board):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert isinstance(unit, str) and unit.strip(), f"{panel['title']}: no unit"
        assert len(panel.get("description", "").strip()) >= 40, f"{panel['title']}: no real description"
        assert panel.get("title", "").strip()


def test_panel_ids_are_unique(board):
    ids = [p["id"] for p in dash.panels(board)]
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def _overlap(a: dict, b: dict) -> bool:
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


def _check_no_overlap(group: list[dict]):
    for a, b in itertools.combinations(group, 2):
        assert not _overlap(a["gridPos"], b["gridPos"]), (a["title"], b["title"])


def test_grid_positions(board):
    for panel in dash.panels(board):
        pos = panel.get("gridPos")
        assert pos and all(isinstance(pos.get(k), int) for k in "xywh"), panel["title"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["w"] > 0 and pos["h"] > 0, panel["title"]
        if panel["type"] == "row":
            assert pos["w"] == 24 and pos["h"] == 1 and pos["x"] == 0
    top = board["panels"]
    _check_no_overlap(top)
    for row in (p for p in top if p["type"] == "row"):
        nested = row.get("panels") or []
        assert bool(nested) == bool(row.get("collapsed")), f"{row['title']}: nested panels only when collapsed"
        _check_no_overlap(nested)
        for panel in nested:  # an expanded row puts its panels right under it
            assert panel["gridPos"]["y"] > row["gridPos"]["y"], (row["title"], panel["title"])
    # top-level panels sit under the row they belong to, in reading order
    rows = sorted((p for p in top if p["type"] == "row"), key=lambda p: p["gridPos"]["y"])
    assert rows[0]["gridPos"]["y"] == 0
    assert [r["title"] for r in rows[: len(REQUIRED_ROWS)]] == list(REQUIRED_ROWS)


# ----------------------------------------------------------------------------------------------- PromQL

def test_queries_helper_sees_every_target_including_collapsed_rows(board):
    titles = {title for title, _ in dash.queries(board)}
    collapsed = [p for p in board["panels"] if p["type"] == "row" and p.get("collapsed")]
    for row in collapsed:
        for panel in row["panels"]:
            assert panel["title"] in titles
    n_targets = sum(len(p.get("targets", [])) for p in non_rows(board))
    assert len(dash.queries(board)) == n_targets


def test_substitution():
    expr = 'rate(x{instance=~"$instance", model=~"${model}", gpu=~"${gpu:regex}"}[$__rate_interval]) ' \
           '+ increase(y[$__range]) + z[$__interval]'
    assert dash.substitute(expr) == \
        'rate(x{instance=~".*", model=~".*", gpu=~".*"}[1m]) + increase(y[1h]) + z[15s]'
    assert dash.substitute(expr, {"$instance": "a:1", "__rate_interval": "2m"}).startswith(
        'rate(x{instance=~"a:1", model=~".*", gpu=~".*"}[2m])')
    board = {"panels": [{"type": "row", "title": "r", "collapsed": True, "panels": [
        {"title": "p", "type": "timeseries", "targets": [{"expr": "up[$__range]"}]}]}]}
    assert dash.queries(board, {"__range": "5m"}) == [("p", "up[5m]")]


def test_no_unsubstituted_variables(board):
    for title, expr in dash.queries(board):
        assert "$" not in expr, (title, expr)


def test_every_metric_exists(board, recorded):
    seen = set()
    for title, expr in dash.queries(board):
        names = metric_names(expr)
        assert names, (title, expr)
        for name in names:
            seen.add(name)
            if ":" in name:
                assert name in recorded, f"{title}: {name} is not recorded in {RULES.name}"
                continue
            base = name
            if base not in DEFS:
                for suffix in HISTOGRAM_SUFFIXES:
                    if base.endswith(suffix) and base[: -len(suffix)] in DEFS:
                        assert DEFS[base[: -len(suffix)]].kind == "histogram", name
                        base = base[: -len(suffix)]
            assert base in DEFS, f"{title}: {name} is not an exported metric"
    # the GPU memory threshold constant is drawn
    assert "ollama:threshold:gpu_memory_used_ratio" in seen


def test_every_selector_filters_by_the_variables(board):
    for title, expr in dash.raw_queries(board):
        for name, matchers in selectors(expr):
            if ":" not in name and name not in DEFS and not any(
                    name.endswith(s) and name[: -len(s)] in DEFS for s in HISTOGRAM_SUFFIXES):
                continue  # an unknown name: test_every_metric_exists reports it
            labels = labels_of(name)
            for var in VARIABLES:
                if var in labels:
                    assert f'{var}=~"${var}"' in matchers, f"{title}: {name}{{{matchers}}} lacks {var}=~\"${var}\""
            if not labels:  # constant threshold series: no labels to filter on
                assert name.startswith("ollama:threshold:"), (title, name)
        assert 'instance=~"$instance"' in expr or all(n.startswith("ollama:threshold:") for n in metric_names(expr)), \
            (title, expr)


def test_rate_windows(board):
    for title, expr in dash.raw_queries(board):
        for func, window in range_windows(expr):
            assert window, f"{title}: {func}() without a range: {expr}"
            assert window in ALLOWED_WINDOWS or (title, window) in FIXED_WINDOWS, \
                f"{title}: {func}(...[{window}]) should use $__rate_interval"
        assert "[$__interval]" not in expr, f"{title}: use $__rate_interval for range vectors"


def test_no_filters_that_are_empty_on_a_healthy_system(board):
    # a healthy exporter must fill every panel: comparisons that drop series (== 0, > 0, ...) hide that
    for title, expr in dash.queries(board):
        text = _STRING.sub('""', expr)
        assert not re.search(r"(==|!=|>=|<=|>|<)(?!~)", text.replace("=~", "").replace("!~", "")), (title, expr)


def test_promql_syntax_with_promtool(board, promtool, tmp_path):
    exprs = [expr for _, expr in dash.queries(board)]
    for query in dash.variable_queries(board):
        exprs.append(dash.substitute(dash.parse_label_values(query)[0]))
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:check{i}:expr", "expr": expr} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout, result.stdout

"""Read the Grafana dashboard (grafana/ollama-exporter.json) and the PromQL in it, for tests.

`queries()` returns every panel target's expression with Grafana's variables replaced by concrete values, so
a test can hand them to Prometheus (or `promtool`) as they are; `raw_queries()` returns them untouched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Optional

PATH = Path(__file__).resolve().parents[1] / "grafana" / "ollama-exporter.json"

# What the variables stand for when a query runs outside Grafana: every instance, model and GPU, and
# windows that suit a Prometheus scraping every few seconds with a few minutes of data.
DEFAULT_VARIABLES = {
    "instance": ".*",
    "model": ".*",
    "gpu": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}

# $name, ${name} and ${name:format} (the format is ignored: the values above need none)
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*$", re.S)


def load(path: Optional[Path | str] = None) -> dict:
    """The dashboard as a dict (the default path is the repository's grafana/ollama-exporter.json)."""
    with open(path or PATH, encoding="utf-8") as f:
        return json.load(f)


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, rows included, and the panels nested in collapsed rows (after their row)."""
    for panel in dashboard.get("panels", []):
        yield panel
        for nested in panel.get("panels", []) or []:
            yield nested


def raw_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, variables left as Grafana sees them."""
    out = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []) or []:
            expr = target.get("expr")
            if expr:
                out.append((panel.get("title", ""), expr))
    return out


def substitute(expr: str, variables: Optional[dict[str, str]] = None) -> str:
    """`expr` with $name / ${name} / ${name:format} replaced; unknown variables are left as they are."""
    values = dict(DEFAULT_VARIABLES)
    for key, value in (variables or {}).items():
        values[key.lstrip("$").strip("{}")] = value

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return values.get(name, m.group(0))

    return _VARIABLE.sub(repl, expr)


def queries(dashboard: dict, variables: Optional[dict[str, str]] = None) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, including panels in collapsed rows.

    $instance, $model and $gpu become `.*`, $__rate_interval `1m`, $__interval `15s` and $__range `1h`
    unless `variables` (keys with or without the `$`) says otherwise.
    """
    return [(title, substitute(expr, variables)) for title, expr in raw_queries(dashboard)]


def variable_queries(dashboard: dict) -> list[str]:
    """The `label_values(metric{...}, label)` queries of the dashboard's query variables."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        out.append(query or var.get("definition", ""))
    return out


def parse_label_values(query: str) -> tuple[str, str]:
    """`label_values(ollama_up{...}, instance)` -> ("ollama_up{...}", "instance")."""
    m = _LABEL_VALUES.match(query)
    if not m:
        raise ValueError(f"not a label_values(selector, label) query: {query!r}")
    return m.group(1), m.group(2)

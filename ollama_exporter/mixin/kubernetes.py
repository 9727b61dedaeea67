"""Kubernetes objects for the Prometheus Operator and Grafana's dashboard sidecar, from the same config.

A PrometheusRule (monitoring.coreos.com/v1) holding exactly the rule groups of alerts/, and a ConfigMap
labelled `grafana_dashboard: "1"` holding the dashboard JSON. No namespace: kustomize (or `kubectl -n`)
sets it. kube-prometheus-stack selects PrometheusRules by its release label; add it with kustomize's
`labels`/`commonLabels` rather than here.
"""

from __future__ import annotations

import json
from typing import Any

NAME = "ollama-exporter"
LABELS = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": NAME}


def prometheus_rule(groups: list[dict]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": NAME, "labels": dict(LABELS)},
        "spec": {"groups": groups},
    }


def dashboards_configmap(dashboards: dict[str, dict]) -> dict[str, Any]:
    """`dashboards`: file name -> dashboard. Compact JSON: a ConfigMap applied client-side must stay under
    the 256 KiB last-applied-configuration annotation limit."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{NAME}-dashboards", "labels": {**LABELS, "grafana_dashboard": "1"}},
        "data": {name: json.dumps(board, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                 for name, board in dashboards.items()},
    }

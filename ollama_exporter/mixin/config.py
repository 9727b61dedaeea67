"""The mixin's one config: selectors, thresholds, per-alert `for` and severity, URLs, dashboard identity.

Everything the dashboard, the rules and the Kubernetes objects are generated from. A user's YAML file
holds only what it changes (`thresholds: {gpu_memory_ratio: 0.9}`); it is merged over DEFAULTS, and an
unknown key, a wrong type, a bad duration or a ratio outside 0..1 is a MixinConfigError with one line
naming the key. examples/mixin.yml lists every key with its default (a test keeps it equal to DEFAULTS).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import yaml

# Where the runbooks live: the README's "### <AlertName>" sections. `{anchor}` is the alert name in lower
# case (GitHub's heading anchor), `{alert}` the name as it is.
README_URL = "https://github.com/ollama-exporter/ollama-exporter/blob/main/README.md"

DEFAULTS: dict[str, Any] = {
    # PromQL matchers every series of the exporter carries: put inside {} of every selector of every
    # rule and panel. Add more matchers here to narrow further: 'job="ollama", cluster="eu-1"'.
    "selector": 'job="ollama"',
    "thresholds": {
        "gpu_memory_ratio": 0.85,  # OllamaGPUMemoryHigh: share of a GPU's memory in use
        "latency_p99_seconds": 30,  # OllamaLatencyP99High: P99 end-to-end probe time over 5 m
        "ttft_p99_seconds": 10,  # OllamaTTFTP99High: P99 time to first token over 5 m
        "probe_failure_ratio": 0.5,  # OllamaProbeFailing: share of a model's probes failing over 10 m
        "cpu_offload_ratio": 0,  # OllamaModelCPUOffload: share of a loaded model outside VRAM
        "gpu_temperature_celsius": 85,  # OllamaGPUTemperatureHigh
        "model_loads_per_30m": 10,  # OllamaModelLoadChurn: model loads per instance in 30 minutes
        "snapshot_age_seconds": 120,  # OllamaExporterPollStalled: age of the data behind /metrics
        "request_error_ratio": 0.05,  # OllamaRequestErrorRatioHigh: share of users' requests answered 5xx
        "request_latency_p99_seconds": 120,  # OllamaRequestLatencyP99High: users' generation requests, P99
    },
    # Per alert: severity label, `for` window, and whether to generate it at all.
    "alerts": {
        "OllamaExporterDown": {"severity": "critical", "for": "5m", "enabled": True},
        "OllamaExporterPollStalled": {"severity": "critical", "for": "2m", "enabled": True},
        "OllamaDown": {"severity": "critical", "for": "2m", "enabled": True},
        "OllamaGPUMemoryHigh": {"severity": "critical", "for": "5m", "enabled": True},
        "OllamaLatencyP99High": {"severity": "critical", "for": "10m", "enabled": True},
        "OllamaTTFTP99High": {"severity": "warning", "for": "10m", "enabled": True},
        "OllamaProbeFailing": {"severity": "warning", "for": "10m", "enabled": True},
        "OllamaModelCPUOffload": {"severity": "warning", "for": "5m", "enabled": True},
        "OllamaGPUTemperatureHigh": {"severity": "warning", "for": "10m", "enabled": True},
        "OllamaModelLoadChurn": {"severity": "warning", "for": "0m", "enabled": True},
        "OllamaGPULost": {"severity": "critical", "for": "1m", "enabled": True},
        "OllamaRequestErrorRatioHigh": {"severity": "critical", "for": "10m", "enabled": True},
        "OllamaRequestLatencyP99High": {"severity": "warning", "for": "15m", "enabled": True},
    },
    # Each alert's runbook_url annotation: `{anchor}` / `{alert}` are filled in per alert.
    "runbook_url": README_URL + "#{anchor}",
    # Each alert's dashboard_url annotation; `var-instance=<the alert's instance>` is added to it.
    "dashboard_url": "http://localhost:3000/d/ollama-exporter/ollama",
    # The Prometheus data source the dashboard's `datasource` variable starts on ("default": Grafana's).
    "datasource": "default",
    "dashboard": {
        "uid": "ollama-exporter",
        "title": "Ollama",
        "tags": ["ollama", "llm", "gpu", "prometheus", "ollama-exporter"],
        "refresh": "30s",
        "time_from": "now-3h",
    },
}

_DURATION = re.compile(r"^(?:\d+(?:ms|s|m|h|d|w|y))+$")
_SEVERITY = re.compile(r"^[a-z][a-z0-9_-]*$")
_UID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


class MixinConfigError(ValueError):
    """A problem in the mixin config, worded for the user (one line naming the key)."""


@dataclass(frozen=True)
class AlertSettings:
    severity: str
    for_: str
    enabled: bool


@dataclass(frozen=True)
class MixinConfig:
    selector: str
    thresholds: Mapping[str, float]
    alerts: Mapping[str, AlertSettings]
    runbook_url: str
    dashboard_url: str
    datasource: str
    dashboard_uid: str
    dashboard_title: str
    dashboard_tags: tuple[str, ...]
    dashboard_refresh: str
    dashboard_time_from: str

    def matchers(self, *extra: str) -> str:
        """`{<selector>, <extra>...}`: the braces of a PromQL selector (never `{, x}` for an empty selector)."""
        return "{" + ", ".join(m for m in (self.selector, *extra) if m) + "}"

    def runbook(self, alert: str) -> str:
        return self.runbook_url.replace("{anchor}", alert.lower()).replace("{alert}", alert)


def default_config() -> MixinConfig:
    return from_dict({})


def load(path: Optional[str]) -> MixinConfig:
    """The config in YAML file `path` merged over the defaults (the defaults alone for None)."""
    if path is None:
        return default_config()
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise MixinConfigError(f"cannot read mixin config {path}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise MixinConfigError(f"mixin config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        data = {}
    return from_dict(data)


def from_dict(data: Any) -> MixinConfig:
    merged = _merge(DEFAULTS, data, "")
    t = merged["thresholds"]
    for key, value in t.items():
        if key.endswith("_ratio") and not 0 <= value <= 1:
            raise MixinConfigError(f"thresholds.{key}: {value} is not a ratio between 0 and 1")
        if value < 0:
            raise MixinConfigError(f"thresholds.{key}: {value} is negative")
    alerts = {}
    for name, a in merged["alerts"].items():
        if not _DURATION.match(a["for"]):
            raise MixinConfigError(f"alerts.{name}.for: {a['for']!r} is not a Prometheus duration such as 5m")
        if not _SEVERITY.match(a["severity"]):
            raise MixinConfigError(f"alerts.{name}.severity: {a['severity']!r} is not a severity such as warning")
        alerts[name] = AlertSettings(a["severity"], a["for"], a["enabled"])
    selector = merged["selector"].strip().strip(",").strip()
    if "{" in selector or "}" in selector:
        raise MixinConfigError(f"selector: {selector!r}: give the matchers without braces, e.g. job=\"ollama\"")
    d = merged["dashboard"]
    if not _UID.match(d["uid"]):
        raise MixinConfigError(f"dashboard.uid: {d['uid']!r} must be 1-40 letters, digits, - or _")
    return MixinConfig(
        selector=selector, thresholds=t, alerts=alerts, runbook_url=merged["runbook_url"],
        dashboard_url=merged["dashboard_url"], datasource=merged["datasource"], dashboard_uid=d["uid"],
        dashboard_title=d["title"], dashboard_tags=tuple(d["tags"]), dashboard_refresh=d["refresh"],
        dashboard_time_from=d["time_from"],
    )


def _merge(default: Any, given: Any, path: str) -> Any:
    """`given` checked against the shape and types of `default`, with absent keys taken from it."""
    where = path or "the mixin config"
    if isinstance(default, dict):
        if not isinstance(given, dict):
            raise MixinConfigError(f"{where}: expected a mapping, got {type(given).__name__}")
        unknown = sorted(str(k) for k in given if k not in default)
        if unknown:
            raise MixinConfigError(f"{_join(path, unknown[0])}: unknown key (known: {', '.join(default)})")
        return {k: _merge(v, given.get(k, v), _join(path, k)) for k, v in default.items()}
    if isinstance(default, bool):
        if not isinstance(given, bool):
            raise MixinConfigError(f"{where}: expected true or false, got {given!r}")
        return given
    if isinstance(default, (int, float)):
        if isinstance(given, bool) or not isinstance(given, (int, float)) or not math.isfinite(given):
            raise MixinConfigError(f"{where}: expected a number, got {given!r}")
        return given
    if isinstance(default, list):
        if not isinstance(given, list) or not all(isinstance(x, str) for x in given):
            raise MixinConfigError(f"{where}: expected a list of strings, got {given!r}")
        return list(given)
    if not isinstance(given, str):
        raise MixinConfigError(f"{where}: expected a string, got {given!r}")
    return given


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key

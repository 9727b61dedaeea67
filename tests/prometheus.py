"""A real Prometheus server (Debian's `prometheus` package) on loopback, for end-to-end tests."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import requests
import yaml

from tests.services import ServiceProcess


class Prometheus(ServiceProcess):
    def __init__(self, workdir: Path, scrape_configs: list[dict], rule_files: Optional[list[str]] = None,
                 alertmanager: Optional[str] = None, interval: str = "1s"):
        config = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
                  "scrape_configs": scrape_configs}
        if rule_files:
            config["rule_files"] = rule_files
        if alertmanager:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        super().__init__(("prometheus",), "prometheus", workdir,
                         [f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}"])

    def query(self, promql: str) -> list[dict]:
        resp = requests.get(self.url + "/api/v1/query", params={"query": promql}, timeout=5)
        resp.raise_for_status()
        return resp.json()["data"]["result"]

    def targets(self) -> list[dict]:
        return requests.get(self.url + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]

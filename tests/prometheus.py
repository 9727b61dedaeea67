"""A real Prometheus server (Debian's `prometheus` package) on loopback, for end-to-end tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import requests
import yaml

from tests.conftest import free_port, wait_for


class Prometheus:
    def __init__(self, workdir: Path, scrape_configs: list[dict], rule_files: Optional[list[str]] = None,
                 alertmanager: Optional[str] = None, interval: str = "1s"):
        binary = shutil.which("prometheus")
        if not binary:
            pytest.skip("prometheus not found: install Debian's `prometheus` package (scripts/test.sh does this)")
        config = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
                  "scrape_configs": scrape_configs}
        if rule_files:
            config["rule_files"] = rule_files
        if alertmanager:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.workdir = workdir
        wait_for(self._ready, timeout=30, message="prometheus /-/ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited: {(self.workdir / 'prometheus.log').read_text()[-2000:]}")
        return requests.get(self.url + "/-/ready", timeout=1).status_code == 200

    def query(self, promql: str) -> list[dict]:
        resp = requests.get(self.url + "/api/v1/query", params={"query": promql}, timeout=5)
        resp.raise_for_status()
        return resp.json()["data"]["result"]

    def targets(self) -> list[dict]:
        return requests.get(self.url + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

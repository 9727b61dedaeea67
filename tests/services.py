"""A real server from Debian's packages (Prometheus, Alertmanager) run as a child process on loopback."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, terminate, wait_for


class ServiceProcess:
    """Starts `binary` (the first of `names` on PATH) with `args`, logging to workdir, until /-/ready is 200."""

    def __init__(self, names: tuple[str, ...], package: str, workdir: Path, args: list[str]):
        binary = next((shutil.which(n) for n in names if shutil.which(n)), None)
        if not binary:
            pytest.skip(f"{names[0]} not found: install Debian's `{package}` package (scripts/test.sh does this)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.name, self.workdir = names[0], workdir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self.log = open(workdir / f"{self.name}.log", "w")
        self.proc = subprocess.Popen([binary, f"--web.listen-address={self.address}", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, timeout=30, message=f"{self.name} /-/ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited: {(self.workdir / f'{self.name}.log').read_text()[-2000:]}")
        return requests.get(self.url + "/-/ready", timeout=1).status_code == 200

    def stop(self) -> None:
        terminate(self.proc, 10)
        self.log.close()

"""Shared test helpers: fixture paths, free ports, the fake Ollama, and the exporter as a real process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FIXTURES = REPO / "tests" / "fixtures" / "ollama"  # captured real responses; see PROVENANCE.md there


def fixture_files(kind: str, pattern: str = "*") -> list[Path]:
    """Captured files under tests/fixtures/ollama/api/<kind>; test_repository checks none is missing."""
    return sorted((FIXTURES / "api" / kind).glob(pattern))


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def proc_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a mapping (VmRSS, VmHWM, Threads...), values as written there."""
    return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)


def rss_kb(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


def terminate(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM `proc` if it still runs, SIGKILL it after `timeout` seconds; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_python(script: str, *args: str, timeout: float = 60) -> str:
    """Run `script` in a fresh interpreter from the repository root, for what is process-wide (gc.freeze,
    malloc's settings, what other tests' threads allocate); its standard output, or fail with its errors."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - surfaced in the failure message
            last_exc = exc
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {message}" + (f" (last error: {last_exc})" if last_exc else ""))


def check_log_lines(text: str, fmt: str = "logfmt") -> list[dict]:
    """Every line the exporter wrote, parsed strictly as logfmt (go-logfmt's rules) or JSON; fails on any
    line that is not, or lacks time, level and msg."""
    import json

    import logfmtkv

    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line) if fmt == "json" else logfmtkv.parse(line, strict=True)
        except ValueError as exc:
            pytest.fail(f"log line {number} is not {fmt}: {exc}: {line!r}")
        assert isinstance(record, dict) and {"time", "level", "msg"} <= set(record), line
        assert record["level"] in ("debug", "info", "warn", "error"), line
        assert TIME_RE.match(record["time"]), line
        records.append(record)
    return records


class Exporter:
    """The real `ollama-exporter` daemon in a child process, listening on a free loopback port.

    Its log goes to a file (a pipe nobody reads would fill and stall it); stop() checks that every line
    of it is well-formed logfmt or JSON, so each test that runs the daemon also tests its logs."""

    def __init__(self, *args: str, host: str = "127.0.0.1", env: Optional[dict] = None, listen: bool = True,
                 nofile: Optional[tuple[int, int]] = None, port: Optional[int] = None):
        self.port = port or free_port(host)  # the same port again: a restart Prometheus keeps scraping
        self.host = host
        bracketed = f"[{host}]" if ":" in host else host
        self.url = f"http://{bracketed}:{self.port}"
        self.args = (["--web.listen-address", f"{bracketed}:{self.port}"] if listen else []) + list(args)
        self.log_format = "json" if "json" in args else "logfmt"
        full_env = {k: v for k, v in os.environ.items() if k != "OLLAMA_HOST" and not k.startswith("OLLAMA_EXPORTER_")}
        full_env.update(env or {})
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="exporter-", suffix=".log", delete=False)
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)) if nofile else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ollama_exporter", *self.args],
            env=full_env, stdout=subprocess.DEVNULL, stderr=self.log_file, text=True, preexec_fn=limit,
        )

    def logs(self) -> str:
        return Path(self.log_file.name).read_text()

    def log_records(self) -> list[dict]:
        return check_log_lines(self.logs(), self.log_format)

    def wait_ready(self, timeout: float = 15.0) -> "Exporter":
        def ready():
            if self.proc.poll() is not None:
                pytest.fail(f"exporter exited with {self.proc.returncode}: {self.logs()}")
            return requests.get(self.url + "/-/ready", timeout=1).status_code == 200
        wait_for(ready, timeout, message="exporter /-/ready")
        return self

    def metrics(self) -> str:
        resp = requests.get(self.url + "/metrics", timeout=2)
        resp.raise_for_status()
        return resp.text

    def stop(self) -> int:
        terminate(self.proc)
        if not self.log_file.closed:
            self.log_file.close()
            text = self.logs()
            os.unlink(self.log_file.name)
            if not text.startswith("ollama-exporter: error:"):  # a refused start prints one plain line
                check_log_lines(text, self.log_format)
        return self.proc.returncode


@pytest.fixture
def exporter_factory() -> Iterator:
    started: list[Exporter] = []

    def start(*args: str, **kwargs) -> Exporter:
        exp = Exporter(*args, **kwargs)
        started.append(exp)
        return exp

    yield start
    for exp in started:
        exp.stop()


@pytest.fixture
def fake_ollama():
    from tests.fakes.ollama import FakeOllama

    fake = FakeOllama().start()
    yield fake
    fake.stop()


def require_tool(name: str, package: str) -> str:
    """The path of command `name`, or skip the test saying which Debian package provides it."""
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} not found: install Debian's `{package}` package (scripts/test.sh does this)")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool", "prometheus")


def sample(text: str, metric: str, /, **labels: str) -> Optional[float]:
    """The value of one sample in an exposition text, or None if it is absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                if set(s.labels) == set(labels):
                    return s.value
    return None


# model -> weights blob; the order matches two_gpu_box's runner pids (MIG 1, MIG 2, RTX, RTX)
BLOBS = {"qwen3:32b": "1" * 64, "llama3.1:8b": "2" * 64, "gemma3:27b": "3" * 64, "nomic-embed-text:latest": "4" * 64}


@pytest.fixture(scope="session")
def nvml(tmp_path_factory):
    """The fake libnvidia-ml.so.1 (tests/fakes/nvml), built once; pass nvml.env() to an exporter process."""
    from tests.fakes.nvml import FakeNvml

    return FakeNvml.or_skip(tmp_path_factory.mktemp("nvml"))


@pytest.fixture
def runners():
    """Four real processes whose command lines are Ollama runners, one per model in BLOBS: three v0.30+
    llama-servers answering /props and /slots on their --port (tests/fakes/llama_server.py) and one
    v0.5-v0.24 Go runner (`ollama runner --ollama-engine`), which has nothing to read."""
    from tests.fakes.llama_server import FakeLlamaServer

    fakes = []
    for i, (name, blob) in enumerate(BLOBS.items()):
        argv0, extra = (("/usr/local/bin/ollama", ("runner", "--ollama-engine")) if i == 1
                        else ("/usr/local/lib/ollama/llama-server", ()))
        fakes.append(FakeLlamaServer(blob, n_slots=2 if i == 0 else 1).start(argv0, extra))
    yield [f.pid for f in fakes]
    for f in fakes:
        f.stop()


@pytest.fixture
def ollama_with_models(fake_ollama):
    for name, blob in BLOBS.items():
        caps = ["embedding"] if "embed" in name else ["completion"]
        fake_ollama.add_model(name, blob_digest=blob, capabilities=caps)
        fake_ollama.load(name, keep_alive=-1)
    return fake_ollama

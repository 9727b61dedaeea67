"""The scale curve: scrape latency, throughput, CPU per poll and memory at 50, 500 and 2 000 installed
models, side by side with nginx serving the very same bytes (the floor), in one run.

For each scale the fake Ollama (tests/fakes/ollama.py, answering /api/tags and /api/ps from cached
bytes and probes at once, so that it costs little next to the Go server it stands in for) holds N
installed models, 10 % of them loaded with keep_alive -1 (so every one is probed); two GPUs come from the
fake libnvidia-ml (tests/fakes/nvml) under the real bindings. The exporter runs as a real process,
with poll.interval 1s and probes.interval 6s while its CPU is measured (six polls per probe round, as at
the defaults, so a poll's share of the probes is the same, in a fifth of the time), then reloaded
(SIGHUP) with --scrape-intervals (default: the defaults, 5s and 30s) for the scrapes.

  1. CPU per poll: utime+stime from /proc/<pid>/stat over a scrape-free window, divided by the polls
     the fake saw (its /api/version calls); probes and the exporter's own threads included. Then a
     py-spy sampling profile of the same steady state splits it (HTTP calls, JSON parsing, rendering...).
  2. RSS (VmRSS) after that window, and its peak (VmHWM).
  3. Scrapes, with Prometheus 2.42's real request headers (OpenMetrics preferred, gzip), by a small C
     client (benchmarks/scrape_client.c, built here) against the exporter and against nginx (one
     worker, loopback, a minimal config in a temp dir) serving the exporter's exact gzip body with the
     same Content-Type, interleaved in rounds (ours first, then the floor first, ...):
       new   sequential, a new connection per scrape;
       paced keep-alive, one scrape every 23 ms across polls, so some land while a poll or probe runs;
       conc  50 concurrent connections, a new connection per scrape (requests/s and latency);
       tls   paced keep-alive over TLS with basic auth (the exporter reloaded with a web config; nginx
             with ssl and a {PLAIN} password file, its cheapest check).
     Latency is from connect (or request, on a kept-alive connection) to the last body byte.

Setup: installs Debian's nginx-light (if nginx is missing and this runs as root) and py-spy into the
virtualenv (if missing); without them, the floor or the split is left out and the output says so.

Usage: .venv/bin/python benchmarks/bench_scale.py [--scales 50,500,2000] [--rounds 6] [--window 30]
       [--scrape-intervals 5s,30s]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import http.client
import json
import math
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import cpu_seconds, free_port, proc_status, terminate, wait_for  # noqa: E402
from tests.fakes.nvml import FakeNvml, two_gpu_box  # noqa: E402
from tests.fakes.ollama import FakeOllama, go_json  # noqa: E402

# What Prometheus 2.42 (Debian 12) sends with every scrape, captured from the real server.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
PASSWORD = "bench-password"
PACE_US = 23_000  # paced scrapes: not a divisor of any poll interval, so they sweep across polls
GOALS = {"p99": 1.5, "rps": 0.8, "conc_p99": 2.0, "cpu_ms": {500: 40.0, 2000: 150.0}, "rss_mib": {500: 50.0}}


# --- setup: tools the benchmark needs ---


@dataclass
class Tools:
    client: Path
    tls: bool  # the client was built with OpenSSL
    nginx: Optional[str]
    pyspy: Optional[str]
    notes: list[str] = field(default_factory=list)


def setup(tmp: Path) -> Tools:
    notes = []
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if nginx is None and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx-light"],
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True)
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        notes.append("no nginx (install Debian's nginx-light): the floor is left out")
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if pyspy is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "py-spy"],
                       capture_output=True)
        pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if pyspy is None:
        notes.append("no py-spy (pip install py-spy): the CPU split is left out")
    client = tmp / "scrape_client"
    source = str(ROOT / "benchmarks" / "scrape_client.c")
    tls = subprocess.run(["cc", "-O2", "-DWITH_TLS", "-o", str(client), source, "-lssl", "-lcrypto"],
                         capture_output=True).returncode == 0
    if not tls:
        subprocess.run(["cc", "-O2", "-o", str(client), source], check=True)
        notes.append("the C client was built without OpenSSL (libssl-dev): the TLS case is left out")
    return Tools(client, tls, nginx, pyspy, notes)


def make_certificate(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "tls.crt", tmp / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


# --- the fake Ollama, fast enough not to matter ---


class FastFake(FakeOllama):
    """The fake with /api/tags answered from cached bytes and /api/ps from cached rows.

    The fake is Python and runs in this process; rebuilding a 2 000-row /api/tags answer every poll would
    cost it more CPU than the exporter it feeds. The bytes are the ones the fake would send.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tags: Optional[tuple[int, bytes]] = None
        self._ps_rows: dict[tuple, bytes] = {}

    def _route(self, h, path, raw, req, fault, t0):  # noqa: ANN001 - FakeOllama's signature
        if path == "/api/tags" and fault is None:
            with self._lock:
                if self._tags is None or self._tags[0] != len(self._models):
                    models = sorted(self._models.values(), key=lambda m: m.modified_ns, reverse=True)
                    self._tags = (len(self._models), go_json({"models": [self._tags_row(m) for m in models]}))
                body = self._tags[1]
            return h.send_body(200, "application/json; charset=utf-8", body)
        if path == "/api/ps" and fault is None:
            with self._lock:
                self._reap()
                rows = []
                for r in sorted(self._runners.values(), key=self._expiry, reverse=True):
                    key = (r.name, self._expiry(r), r.size, r.size_vram, r.context_length, r.shape)
                    row = self._ps_rows.get(key)
                    if row is None:
                        if len(self._ps_rows) > 4 * len(self._runners) + 16:
                            self._ps_rows.clear()
                        row = self._ps_rows[key] = go_json(self._ps_row(r))
                    rows.append(row)
            return h.send_body(200, "application/json; charset=utf-8", b'{"models":[' + b",".join(rows) + b"]}")
        return super()._route(h, path, raw, req, fault, t0)


def populate(fake: FakeOllama, installed: int) -> None:
    families = ("llama", "qwen3", "gemma3", "mistral")
    for i in range(installed):
        fake.add_model(f"bench-{i:04d}:q{4 + i % 3}", family=families[i % 4], parameter_size=f"{1 + i % 70}B",
                       capabilities=["completion", "tools"] if i % 7 else ["embedding"],
                       size=1_000_000_000 + 7919 * i, modified_at=1_750_000_000 + i)
    loaded = [n for n in sorted(fake._models) if "embedding" not in fake._models[n].capabilities]
    for i, name in enumerate(loaded[: installed // 10]):
        size = fake._models[name].size
        fake.load(name, keep_alive=-1, context_length=4096 * (1 + i % 4),
                  size_vram=size if i % 5 else size // 2)
    fake.set_timing(ttft=0.0, token_gap=0.0, tokens=4, load_time=0.0)


# --- the exporter and nginx as processes ---


def http_get(port: int, path: str, headers: dict[str, str], tls: bool = False) -> tuple[int, dict, bytes]:
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def memory_mib(pid: int) -> tuple[float, float]:
    status = proc_status(pid)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


NGINX_CONF = """{user}worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nodelay on;
  keepalive_timeout 300s;
  keepalive_requests 1000000;
  etag off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  server {{
    listen 127.0.0.1:{port} backlog=1024;
    listen 127.0.0.1:{tls_port} ssl backlog=1024;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location = /metrics {{
      alias {tmp}/www/metrics;
      default_type "{content_type}";
      gzip_static on;
    }}
    location = /secure {{
      alias {tmp}/www/metrics;
      default_type "{content_type}";
      gzip_static on;
      auth_basic "bench";
      auth_basic_user_file {tmp}/htpasswd;
    }}
  }}
}}
"""


def start_nginx(nginx: str, tmp: Path, body: bytes, gz: bytes, content_type: str,
                cert: Path, key: Path) -> tuple[subprocess.Popen, int, int]:
    (tmp / "www").mkdir(exist_ok=True)
    (tmp / "www" / "metrics").write_bytes(body)
    (tmp / "www" / "metrics.gz").write_bytes(gz)
    (tmp / "htpasswd").write_text(f"prometheus:{{PLAIN}}{PASSWORD}\n")
    port, tls_port = free_port(), free_port()
    conf = tmp / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # the worker reads files in our private temp dir
    conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, port=port, tls_port=tls_port, cert=cert, key=key,
                                      content_type=content_type))
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: http_get(port, "/metrics", {})[0] == 200, 10, message="nginx")
    except BaseException:  # pytest.fail (wait_for) is not an Exception
        stop(proc)
        raise
    return proc, port, tls_port


def stop(proc: Optional[subprocess.Popen]) -> None:
    if proc is not None:
        terminate(proc, 10)


# --- the scrapes ---


@dataclass
class Batch:
    latencies_us: list[int]
    elapsed_us: int
    errors: int


def request_head(port: int, path: str, auth: bool = False) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "User-Agent: Prometheus/2.42.0+ds",
             f"Accept: {PROMETHEUS_ACCEPT}", "Accept-Encoding: gzip", "X-Prometheus-Scrape-Timeout-Seconds: 10"]
    if auth:
        lines.append("Authorization: Basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode())
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def scrape(tools: Tools, tmp: Path, mode: str, port: int, head: bytes, count: int, extra: int = 0) -> Batch:
    head_file = tmp / f"head-{port}-{mode}"
    head_file.write_bytes(head)
    out = subprocess.run([str(tools.client), mode, "127.0.0.1", str(port), str(head_file), str(count), str(extra)],
                         capture_output=True, text=True, timeout=600, check=True).stdout.splitlines()
    *lines, summary = out
    _, _, elapsed, _, errors = summary.split()
    return Batch([int(v) for v in lines], int(elapsed), int(errors))


def interleaved(rounds: int, runs: dict[str, Callable[[], Batch]]) -> dict[str, list[Batch]]:
    """Each run once per round, alternating which goes first, so drifting load hits both alike."""
    results: dict[str, list[Batch]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(runs[name]())
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Figures:
    median_ms: float
    p99_ms: float
    rps: float
    errors: int
    count: int

    @classmethod
    def of(cls, batches: list[Batch]) -> "Figures":
        lat = [v / 1000 for b in batches for v in b.latencies_us]
        rps = len(lat) / (sum(b.elapsed_us for b in batches) / 1e6)
        return cls(statistics.median(lat), percentile(lat, 0.99), rps, sum(b.errors for b in batches), len(lat))


# --- the CPU split, from a py-spy profile ---

ACTIVITIES = (  # innermost matching frame decides
    ("JSON parsing", ("json/decoder.py", "json/__init__.py", "json/scanner.py")),
    ("rendering", ("exposition.py", "metrics.py", "prometheus_client/")),
    ("GPU (NVML)", ("gpu.py", "pynvml", "runners.py")),
    ("HTTP calls", ("httpclient.py", "requests/", "urllib3/", "http/client.py", "socket.py", "ssl.py",
                    "selectors.py", "email/", "idna/", "charset_normalizer/")),
)
PARSE_FILES = ("ollama.py", "snapshot.py")  # the parsers and the values they build


OWNERS = {"poller.py": "poll", "showcache.py": "poll", "exposition.py": "poll", "prober.py": "probes",
          "server.py": "HTTP server"}


def classify(frames: list[tuple[str, str]]) -> tuple[str, str]:
    """(owner, activity) of one sampled stack, frames outermost first as (function, file). The owner is
    the thread's entry into the exporter (the poll loop and its source calls, the probe workers, the
    HTTP server), the activity the innermost frame that says what is being done."""
    entry = next((f for _, f in frames if "ollama_exporter/" in f), "")
    owner = OWNERS.get(entry.rsplit("/", 1)[-1], "other")
    for function, file in reversed(frames):
        for activity, markers in ACTIVITIES:
            if any(m in file for m in markers):
                return owner, activity
        if file.endswith(PARSE_FILES):
            return owner, "HTTP calls" if function in ("_call", "_read_body", "_chunks", "stream") else "JSON parsing"
    return owner, "other"


def profile(pyspy: str, pid: int, seconds: float, tmp: Path) -> tuple[Counter, int]:
    out = tmp / f"profile-{pid}.txt"
    try:  # py-spy falls behind on a process with hundreds of threads; its samples are still a fair mix
        subprocess.run([pyspy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
                        "--nonblocking", "--format", "raw", "--output", str(out)], capture_output=True,
                       timeout=10 * seconds + 60)
    except subprocess.TimeoutExpired:
        return Counter(), 0
    shares: Counter = Counter()
    total = 0
    for line in out.read_text().splitlines() if out.exists() else ():
        stack, _, count = line.rpartition(" ")
        frames = []
        for frame in stack.split(";"):
            function, _, where = frame.partition(" (")
            frames.append((function, where.rsplit(":", 1)[0]))
        shares[classify(frames)] += int(count)
        total += int(count)
    return shares, total


# --- one scale ---


@dataclass
class ScaleResult:
    models: int
    loaded: int
    series: int
    body_bytes: int
    gzip_bytes: int
    cpu_ms: float
    polls: int
    rss_mib: float
    peak_mib: float
    split: Counter
    samples: int
    scrapes: dict[str, dict[str, Figures]]


def run_scale(models: int, args: argparse.Namespace, tools: Tools, tmp: Path, nvml_env: dict,
              cert: Path, key: Path) -> ScaleResult:
    fake = FastFake().start()
    exporter = nginx = None
    web_config = tmp / f"web-{models}.yml"
    web_config.write_text("{}\n")
    config = tmp / f"config-{models}.yml"
    config.write_text("poll:\n  interval: 1s\nprobes:\n  interval: 6s\n")
    log = open(tmp / f"exporter-{models}.log", "w")
    try:
        populate(fake, models)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_EXPORTER_", "OLLAMA_HOST"))}
        exporter = subprocess.Popen(
            [sys.executable, "-m", "ollama_exporter", "--config.file", str(config), "--ollama.url", fake.url,
             "--web.listen-address", f"127.0.0.1:{port}", "--gpu.enabled", "true",
             "--web.config.file", str(web_config), "--log.level", "warn"],
            env={**env, **nvml_env}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: http_get(port, "/-/ready", {})[0] == 200, 60, message="the exporter's first poll")
        wait_for(lambda: fake.count("/api/show") >= models, 120, message="every /api/show call")
        head = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
        http_get(port, "/metrics", head)  # the variant Prometheus wants is rendered from the next poll on
        time.sleep(3.0)

        cpu0, polls0 = cpu_seconds(exporter.pid), fake.count("/api/version")
        time.sleep(args.window)
        cpu, polls = cpu_seconds(exporter.pid) - cpu0, fake.count("/api/version") - polls0
        rss, peak = memory_mib(exporter.pid)
        split, samples = profile(tools.pyspy, exporter.pid, args.profile, tmp) if tools.pyspy else (Counter(), 0)

        poll_interval, probe_interval = args.scrape_intervals.split(",")
        config.write_text(f"poll:\n  interval: {poll_interval}\nprobes:\n  interval: {probe_interval}\n")
        before_reload = fake.count("/api/version")
        exporter.send_signal(signal.SIGHUP)  # the reload polls at once
        wait_for(lambda: fake.count("/api/version") > before_reload, 30, message="the poll after the reload")
        time.sleep(1.0)
        status, headers, gz = http_get(port, "/metrics", head)
        assert status == 200 and headers.get("content-encoding") == "gzip", (status, headers)
        body = gzip.decompress(gz)
        content_type = headers["content-type"]
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))

        runs: dict[str, dict[str, Callable[[], Batch]]] = {"new": {}, "paced": {}, "conc": {}, "tls": {}}
        ours = request_head(port, "/metrics")
        runs["new"]["ours"] = lambda: scrape(tools, tmp, "new", port, ours, args.new)
        runs["paced"]["ours"] = lambda: scrape(tools, tmp, "keep", port, ours, args.paced, PACE_US)
        runs["conc"]["ours"] = lambda: scrape(tools, tmp, "conc", port, ours, args.conc, 50)
        if tools.nginx:
            nginx, floor_port, floor_tls = start_nginx(tools.nginx, tmp, body, gz, content_type, cert, key)
            floor = request_head(floor_port, "/metrics")
            runs["new"]["floor"] = lambda: scrape(tools, tmp, "new", floor_port, floor, args.new)
            runs["paced"]["floor"] = lambda: scrape(tools, tmp, "keep", floor_port, floor, args.paced, PACE_US)
            runs["conc"]["floor"] = lambda: scrape(tools, tmp, "conc", floor_port, floor, args.conc, 50)
        scrapes = {name: {k: Figures.of(v) for k, v in interleaved(args.rounds, r).items()}
                   for name, r in runs.items() if name != "tls"}

        if tools.tls:
            import bcrypt

            hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
            web_config.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                                  f"basic_auth_users:\n  prometheus: '{hashed}'\n")
            exporter.send_signal(signal.SIGHUP)
            auth = {**head, "Authorization": "Basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()}
            wait_for(lambda: http_get(port, "/metrics", auth, tls=True)[0] == 200, 30, message="TLS after the reload")
            secure = request_head(port, "/metrics", auth=True)
            runs["tls"]["ours"] = lambda: scrape(tools, tmp, "tls", port, secure, args.tls, PACE_US)
            if tools.nginx:
                floor_secure = request_head(floor_tls, "/secure", auth=True)
                runs["tls"]["floor"] = lambda: scrape(tools, tmp, "tls", floor_tls, floor_secure, args.tls, PACE_US)
            scrapes["tls"] = {k: Figures.of(v) for k, v in interleaved(args.rounds, runs["tls"]).items()}
        return ScaleResult(models, models // 10, series, len(body), len(gz), cpu / max(polls, 1) * 1000, polls,
                           rss, peak, split, samples, scrapes)
    finally:
        stop(nginx)
        stop(exporter)
        fake.stop()
        log.close()


# --- the report ---

SCENARIOS = {"new": "sequential, new connection", "paced": "keep-alive, paced across polls",
             "conc": "50 concurrent new connections", "tls": "TLS + basic auth, keep-alive, paced"}


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(results: list[ScaleResult], tools: Tools) -> str:
    out = []
    out.append("| models (loaded) | series | scenario | ours median / p99 | floor median / p99 | p99 ours/floor "
               "| req/s ours / floor | req/s ours/floor |")
    out.append("|---|---|---|---|---|---|---|---|")
    goals = []
    for r in results:
        for name, figures in r.scrapes.items():
            ours, floor = figures["ours"], figures.get("floor")
            cells = [f"{r.models} ({r.loaded})", f"{r.series}", SCENARIOS[name],
                     f"{ours.median_ms:.2f} / {ours.p99_ms:.2f} ms"]
            if floor is not None:
                p99_ratio, rps_ratio = ours.p99_ms / floor.p99_ms, ours.rps / floor.rps
                cells += [f"{floor.median_ms:.2f} / {floor.p99_ms:.2f} ms", f"{p99_ratio:.2f}"]
                if name in ("new", "paced"):
                    goals.append((f"{r.models}: {SCENARIOS[name]} p99 ratio {p99_ratio:.2f} <= {GOALS['p99']}",
                                  p99_ratio <= GOALS["p99"]))
            else:
                cells += ["-", "-"]
            if name == "conc":
                cells += [f"{ours.rps:.0f} / {floor.rps:.0f}" if floor else f"{ours.rps:.0f} / -",
                          f"{rps_ratio:.2f}" if floor else "-"]
                if floor is not None:
                    goals.append((f"{r.models}: 50 concurrent req/s ratio {rps_ratio:.2f} >= {GOALS['rps']}, "
                                  f"p99 ratio {p99_ratio:.2f} <= {GOALS['conc_p99']}",
                                  rps_ratio >= GOALS["rps"] and p99_ratio <= GOALS["conc_p99"]))
            else:
                cells += ["", ""]
            errors = ours.errors + (floor.errors if floor else 0)
            if errors:
                cells[2] += f" ({errors} errors)"
            out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("| models (loaded) | exposition (gzip) | CPU per poll | RSS (peak) | CPU split (py-spy) |")
    out.append("|---|---|---|---|---|")
    for r in results:
        out.append(f"| {r.models} ({r.loaded}) | {r.body_bytes / 1024:.0f} KiB ({r.gzip_bytes / 1024:.0f} KiB) "
                   f"| {r.cpu_ms:.1f} ms ({r.polls} polls) | {r.rss_mib:.1f} MiB ({r.peak_mib:.1f}) "
                   f"| {split_text(r)} |")
        if r.models in GOALS["cpu_ms"]:
            goals.append((f"{r.models}: CPU per poll {r.cpu_ms:.1f} ms <= {GOALS['cpu_ms'][r.models]:g}",
                          r.cpu_ms <= GOALS["cpu_ms"][r.models]))
        if r.models in GOALS["rss_mib"]:
            goals.append((f"{r.models}: RSS {r.rss_mib:.1f} MiB <= {GOALS['rss_mib'][r.models]:g}",
                          r.rss_mib <= GOALS["rss_mib"][r.models]))
    out.append("")
    out.extend(f"goal {verdict(ok)}: {text}" for text, ok in goals)
    out.extend(f"note: {note}" for note in tools.notes)
    return "\n".join(out)


def split_text(r: ScaleResult) -> str:
    """Each owner's share of the CPU per poll in ms, with its biggest activities."""
    if not r.samples:
        return "-"
    parts = []
    owners = Counter()
    for (owner, _), n in r.split.items():
        owners[owner] += n
    for owner, n in owners.most_common():
        ms = r.cpu_ms * n / r.samples
        if ms < 0.05 * r.cpu_ms and owner == "other":
            continue
        detail = ", ".join(f"{activity} {r.cpu_ms * k / r.samples:.1f}"
                           for (o, activity), k in sorted(r.split.items(), key=lambda kv: -kv[1])
                           if o == owner and r.cpu_ms * k / r.samples >= 0.5)
        parts.append(f"{owner} {ms:.1f} ms" + (f" ({detail})" if detail else ""))
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="50,500,2000", help="installed models, comma-separated")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds per scenario")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of scrape-free polling for CPU")
    parser.add_argument("--profile", type=float, default=15.0, help="seconds of py-spy sampling for the split")
    parser.add_argument("--new", type=int, default=100, help="sequential new-connection scrapes per round")
    parser.add_argument("--paced", type=int, default=100, help="paced keep-alive scrapes per round")
    parser.add_argument("--conc", type=int, default=1000, help="scrapes per round from 50 concurrent clients")
    parser.add_argument("--tls", type=int, default=50, help="paced TLS keep-alive scrapes per round")
    parser.add_argument("--scrape-intervals", default="5s,30s",
                        help="poll.interval,probes.interval while scraping (the CPU window runs at 1s,6s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        tools = setup(tmp)
        cert, key = make_certificate(tmp)
        nvml = FakeNvml(tmp / "nvml")
        nvml.write(two_gpu_box())
        results = []
        for models in (int(s) for s in args.scales.split(",")):
            started = time.monotonic()
            results.append(run_scale(models, args, tools, tmp, nvml.env(), cert, key))
            print(f"bench_scale: {models} models done in {time.monotonic() - started:.0f}s", file=sys.stderr)
            print(report(results[-1:], tools), file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"bench_scale at {commit.strip() or '?'}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; {args.rounds} interleaved rounds; polls/probes every "
          f"{args.scrape_intervals.replace(',', '/')} while scraping; client: benchmarks/scrape_client.c; "
          f"floor: {'nginx ' + nginx_version(tools.nginx) + ', 1 worker' if tools.nginx else 'none'}")
    print(report(results, tools))
    if args.json:
        args.json.write_text(json.dumps([{**r.__dict__, "split": {f"{o}/{a}": n for (o, a), n in r.split.items()},
                                          "scrapes": {s: {k: f.__dict__ for k, f in v.items()}
                                                      for s, v in r.scrapes.items()}} for r in results], indent=1))


def nginx_version(nginx: str) -> str:
    text = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
    return text.strip().rsplit("/", 1)[-1]


if __name__ == "__main__":
    main()

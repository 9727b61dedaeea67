"""Soak the daemon: model names that come and go, connection floods, and what the process looks like.

Issue 9 saw 3 126 names over 26 minutes take series from 178 to 6 346 and CPU from 7 % to 19 %, for good.
This runs the real daemon (a child process) against a scripted Ollama on loopback whose /api/tags and
/api/ps list a steady set of models plus a stream of new names, each installed for `--life` seconds and
every third one loaded for the middle half of that, until `--names` distinct names have come and gone.
Meanwhile a flood holds idle connections and connections that dribble a byte every 2 s (reopened
whenever the server closes them), and a scraper scrapes /metrics every second as Prometheus 3 would.

Phases: fresh (steady models only: the baseline), churn (+ the flood), cool-down (churn and flood
stopped, `--forget-after` plus a margin); then a second process, fresh the same way, under the same
flood without any names, and a settle. The target (issue 9): series after the cool-down within 10 % of
the fresh start, and RSS within 10 % of a fresh start that saw the same flood (what the names left
behind); the RSS the flood itself leaves is printed too. Every `--every` seconds a row: RSS, threads,
descriptors, series, CPU, scrape latency, log bytes; the exit status says whether the target was met.

    .venv/bin/python benchmarks/bench_soak.py                 # a 2-minute smoke, 1 000 names
    .venv/bin/python benchmarks/bench_soak.py --minutes 12    # the full soak, 10 000 names
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import conftest  # noqa: E402
from tests.fakes.hostile import ScriptedServer, head  # noqa: E402

STEADY_INSTALLED, STEADY_LOADED = 20, 4
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
                     "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.5,*/*;q=0.4")


# --- the scripted Ollama: steady models plus a stream of names ---------------------------------------

def digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


DETAILS = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
           "parameter_size": "8.0B", "quantization_level": "Q4_K_M"}


def tags_row(name: str) -> dict:
    return {"name": name, "model": name, "modified_at": "2026-01-01T00:00:00Z", "size": 4_920_753_328,
            "digest": digest(name), "details": DETAILS}


def ps_row(name: str) -> dict:
    return {"name": name, "model": name, "size": 6_654_289_920, "digest": digest(name), "details": DETAILS,
            "expires_at": "2318-01-01T00:00:00Z", "size_vram": 6_654_289_920, "context_length": 4096}


class Churn:
    """Which names are installed and loaded at a given time: name i arrives at start + i / rate."""

    def __init__(self) -> None:
        self.steady = [f"steady-{i}:latest" for i in range(STEADY_INSTALLED)]
        self.start: Optional[float] = None
        self.rate = self.life = 0.0
        self.names = 0
        self.lock = threading.Lock()

    def begin(self, names: int, seconds: float, life: float) -> None:
        with self.lock:
            self.names, self.life = names, life
            self.rate = names / max(1.0, seconds - life)  # the last name is gone by the end of the phase
            self.start = time.monotonic()

    def stop(self) -> None:
        with self.lock:
            self.start = None

    def seen(self) -> int:
        """Distinct churn names listed so far."""
        with self.lock:
            if self.start is None:
                return self.names if self.rate else 0
            return min(self.names, int((time.monotonic() - self.start) * self.rate) + 1)

    def current(self) -> tuple[list[str], list[str]]:
        """(installed, loaded) names now."""
        installed, loaded = list(self.steady), self.steady[:STEADY_LOADED]
        with self.lock:
            if self.start is None:
                return installed, loaded
            elapsed = time.monotonic() - self.start
            first = max(0, int((elapsed - self.life) * self.rate))
            last = min(self.names - 1, int(elapsed * self.rate))
            for i in range(first, last + 1):
                age = elapsed - i / self.rate
                if 0 <= age < self.life:
                    name = f"churn-{i}:q{i % 7}"
                    installed.append(name)
                    if i % 3 == 0 and self.life / 4 <= age < 3 * self.life / 4:
                        loaded.append(name)
        return installed, loaded


def answer(obj: dict) -> bytes:
    """JSON as Ollama writes it (Go's encoding/json: no spaces; see tests/fixtures/ollama/api)."""
    return json.dumps(obj, separators=(",", ":")).encode()


def scripted_ollama(churn: Churn) -> ScriptedServer:
    up = ScriptedServer().start()
    up.reply("GET", "/api/version", body=b'{"version":"0.30.0"}')
    up.script("GET", "/api/tags", lambda r: [head(200, answer(
        {"models": [tags_row(n) for n in churn.current()[0]]}))])
    up.script("GET", "/api/ps", lambda r: [head(200, answer(
        {"models": [ps_row(n) for n in churn.current()[1]]}))])
    up.script("POST", "/api/show", lambda r: [head(200, answer({
        "model_info": {"general.architecture": "llama", "llama.context_length": 131072,
                       "general.parameter_count": 8_030_261_248},
        "capabilities": ["completion", "tools"], "details": DETAILS}))])
    return up


# --- the exporter process and what /proc says about it ------------------------------------------------

class Exporter:
    """The daemon as a child process (tests/conftest.py's, which checks every log line at stop), and what
    /proc says about it."""

    def __init__(self, ollama_url: str, interval: str, forget_after: str):
        self.exporter = conftest.Exporter("--ollama.url", ollama_url, "--poll.interval", interval,
                                          "--poll.forget-after", forget_after, "--no-probes.enabled",
                                          "--gpu.enabled", "false", "--runners.enabled", "false").wait_ready(30)
        self.proc, self.port, self.url = self.exporter.proc, self.exporter.port, self.exporter.url

    def cpu_seconds(self) -> float:
        return conftest.cpu_seconds(self.proc.pid)

    def status(self) -> dict[str, str]:
        return conftest.proc_status(self.proc.pid)

    def rss_mb(self) -> float:
        return int(self.status()["VmRSS"].split()[0]) / 1024

    def threads(self) -> int:
        return int(self.status()["Threads"])

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def log_bytes(self) -> int:
        return os.path.getsize(self.exporter.log_file.name)

    def stop(self) -> None:
        self.exporter.stop()


# --- the scraper and the flood ---------------------------------------------------------------------

@dataclass
class Scrapes:
    latencies: list = field(default_factory=list)  # seconds, since the last row
    failed: int = 0
    series: int = 0  # samples in the last successful scrape


def scraper(exporter: Exporter, scrapes: Scrapes, stop: threading.Event) -> None:
    session = requests.Session()
    while not stop.wait(1.0):
        started = time.monotonic()
        try:
            resp = session.get(exporter.url + "/metrics", timeout=5,
                               headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
            resp.raise_for_status()
            text = resp.text
        except requests.RequestException:
            scrapes.failed += 1
            continue
        scrapes.latencies.append(time.monotonic() - started)
        scrapes.series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))


class Flood:
    """`idle` connections that send nothing and `dribbling` ones that send a byte every 2 s; each one the
    server closes is opened again, so the attack keeps its size for the whole phase."""

    def __init__(self, port: int, idle: int, dribbling: int):
        self.port, self.idle, self.dribbling = port, idle, dribbling
        self.socks: dict[socket.socket, bool] = {}  # socket -> dribbles
        self.opened = self.closed_by_server = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def _open(self, dribbles: bool) -> None:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))
        self.socks[s] = dribbles
        self.opened += 1

    def _run(self) -> None:
        for i in range(self.idle + self.dribbling):
            self._open(i >= self.idle)
        last_byte = time.monotonic()
        while not self.stop.wait(0.25):
            poller = select.poll()  # not select(): descriptors past 1 024
            by_fd = {s.fileno(): s for s in self.socks}
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            readable = [by_fd[fd] for fd, _ in poller.poll(0)]
            for s in readable:  # only a close (or a reset) makes these readable: we send no request
                try:
                    gone = s.recv(1024) == b""
                except (BlockingIOError, InterruptedError):
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    dribbles = self.socks.pop(s)
                    s.close()
                    self.closed_by_server += 1
                    self._open(dribbles)
            if time.monotonic() - last_byte >= 2.0:
                last_byte = time.monotonic()
                for s, dribbles in list(self.socks.items()):
                    if dribbles:
                        try:
                            s.send(b"G")
                        except OSError:
                            pass
        for s in self.socks:
            s.close()
        self.socks.clear()

    def start(self) -> "Flood":
        self.thread.start()
        return self

    def end(self) -> None:
        self.stop.set()
        self.thread.join(10)


# --- the run ---------------------------------------------------------------------------------------

@dataclass
class Row:
    t: float
    phase: str
    names: int
    series: int
    rss: float
    threads: int
    fds: int
    cpu: float  # % of one core since the previous row
    p50: float
    worst: float
    failed: int
    flood: int
    log_kb: float

    HEADER = (f"{'t s':>6} {'phase':<9} {'names':>6} {'series':>7} {'RSS MB':>7} {'thr':>4} {'fds':>5} "
              f"{'CPU %':>6} {'p50 ms':>7} {'max ms':>7} {'fail':>4} {'flood':>5} {'log KB':>7}")

    def line(self) -> str:
        return (f"{self.t:6.0f} {self.phase:<9} {self.names:6d} {self.series:7d} {self.rss:7.1f} {self.threads:4d} "
                f"{self.fds:5d} {self.cpu:6.1f} {self.p50 * 1000:7.1f} {self.worst * 1000:7.1f} {self.failed:4d} "
                f"{self.flood:5d} {self.log_kb:7.1f}")


class Recorder:
    def __init__(self, exporter: Exporter, churn: Churn, every: float, started: float):
        self.exporter, self.churn, self.every, self.started = exporter, churn, every, started
        self.scrapes = Scrapes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=scraper, args=(exporter, self.scrapes, self.stop), daemon=True)
        self.thread.start()
        self.rows: list[Row] = []
        self.flood: Optional[Flood] = None
        self._cpu, self._at = exporter.cpu_seconds(), time.monotonic()

    def row(self, phase: str) -> Row:
        now, cpu = time.monotonic(), self.exporter.cpu_seconds()
        latencies, self.scrapes.latencies = self.scrapes.latencies, []
        row = Row(now - self.started, phase, self.churn.seen(), self.scrapes.series, self.exporter.rss_mb(),
                  self.exporter.threads(), self.exporter.fds(), 100 * (cpu - self._cpu) / max(1e-9, now - self._at),
                  statistics.median(latencies) if latencies else float("nan"), max(latencies, default=float("nan")),
                  self.scrapes.failed, len(self.flood.socks) if self.flood else 0, self.exporter.log_bytes() / 1024)
        self._cpu, self._at = cpu, now
        self.rows.append(row)
        print(row.line(), flush=True)
        return row

    def run(self, phase: str, seconds: float) -> list[Row]:
        """Rows every `every` seconds for `seconds`; returns them."""
        rows, end = [], time.monotonic() + seconds
        while time.monotonic() < end - 1e-3:
            time.sleep(min(self.every, max(0.0, end - time.monotonic())))
            rows.append(self.row(phase))
        return rows

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def settled(rows: list[Row], window: float) -> tuple[float, float]:
    """Series and RSS at a phase's end: the medians of its rows in the last `window` seconds."""
    tail = [r for r in rows if r.t >= rows[-1].t - window]
    return statistics.median(r.series for r in tail), statistics.median(r.rss for r in tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="whole run (default 2: a smoke; 12: the soak)")
    parser.add_argument("--names", type=int, help="distinct names that come and go (default 10 000 from 10 minutes "
                                                  "up, else 1 000)")
    parser.add_argument("--life", type=float, help="seconds each name stays installed (default 20, smoke 10)")
    parser.add_argument("--interval", default="250ms", help="poll.interval")
    parser.add_argument("--forget-after", type=float, help="poll.forget_after, seconds (default 30, smoke 10)")
    parser.add_argument("--idle", type=int, default=300, help="idle connections held during the churn")
    parser.add_argument("--dribbling", type=int, default=150, help="connections sending a byte every 2 s")
    parser.add_argument("--every", type=float, help="seconds between rows (default: 30 in a soak, else 10)")
    args = parser.parse_args()
    full = args.minutes >= 10
    names = args.names or (10_000 if full else 1_000)
    life = args.life or (20.0 if full else 10.0)
    forget = args.forget_after or (30.0 if full else 10.0)
    every = args.every or (30.0 if full else 10.0)
    warm, flood_only, settle = (60.0, 90.0, 30.0) if full else (15.0, 20.0, 10.0)
    cool = forget + settle
    churn_seconds = args.minutes * 60 - (warm + cool) - (warm + flood_only + settle)
    if churn_seconds < 2 * life:
        raise SystemExit(f"--minutes {args.minutes:g} leaves no time to churn; give more")

    churn = Churn()
    up = scripted_ollama(churn)
    started = time.monotonic()
    print(f"{names} names over {churn_seconds:.0f}s, {life:g}s each; poll {args.interval}, forget_after {forget:g}s; "
          f"flood {args.idle} idle + {args.dribbling} dribbling connections; {STEADY_INSTALLED} steady models "
          f"({STEADY_LOADED} loaded)")
    print(Row.HEADER)
    # 1. a fresh process: baseline; then names churn under the flood; then the cool-down
    first = Exporter(up.url, args.interval, f"{forget:g}s")
    recorder = Recorder(first, churn, every, started)
    try:
        fresh = settled(recorder.run("fresh", warm), warm / 2)
        churn.begin(names, churn_seconds, life)
        recorder.flood = flood = Flood(first.port, args.idle, args.dribbling).start()
        churning = recorder.run("churn", churn_seconds)
        churn.stop()
        flood.end()
        recorder.flood = None
        after = settled(recorder.run("cool-down", cool), settle / 2)
        failed, worst = recorder.scrapes.failed, max((r.worst for r in churning if r.worst == r.worst), default=0.0)
    finally:
        recorder.close()
        first.stop()
    # 2. a second fresh process, measured the same way, then the same flood alone (no names) and a settle
    second = Exporter(up.url, args.interval, f"{forget:g}s")
    recorder = Recorder(second, churn, every, started)
    try:
        fresh_end = settled(recorder.run("fresh-end", warm), warm / 2)
        recorder.flood = Flood(second.port, args.idle, args.dribbling).start()
        recorder.run("flood", flood_only)
        recorder.flood.end()
        recorder.flood = None
        flooded = settled(recorder.run("settle", settle), settle / 2)
        failed += recorder.scrapes.failed
    finally:
        recorder.close()
        second.stop()
        up.stop()

    print()
    print(f"names that came and went: {churn.seen()}; flood: {flood.opened} connections opened, "
          f"{flood.closed_by_server} closed by the server; scrapes failed: {failed}; slowest scrape under the "
          f"churn and flood: {worst * 1000:.0f} ms; during the churn up to {max(r.series for r in churning)} series, "
          f"{max(r.rss for r in churning):.1f} MB RSS, {max(r.cpu for r in churning):.0f} % CPU")
    print(f"series: fresh start {fresh[0]:.0f}, fresh start at the end {fresh_end[0]:.0f}, after the churn and "
          f"forget_after {after[0]:.0f} ({after[0] / fresh[0] - 1:+.1%})")
    print(f"RSS: fresh start {fresh[1]:.1f} MB, fresh start at the end {fresh_end[1]:.1f} MB, after the churn "
          f"and forget_after {after[1]:.1f} MB ({after[1] / fresh[1] - 1:+.1%}); the second process after the "
          f"same flood without names {flooded[1]:.1f} MB ({flooded[1] / fresh_end[1] - 1:+.1%}), so the names "
          f"left {after[1] - flooded[1]:+.1f} MB ({after[1] / flooded[1] - 1:+.1%})")
    series_ok = abs(after[0] / fresh[0] - 1) <= 0.10
    rss_ok = abs(after[1] / flooded[1] - 1) <= 0.10
    print(f"target (issue 9): series {'within' if series_ok else 'NOT within'} 10 % of a fresh start; RSS "
          f"{'within' if rss_ok else 'NOT within'} 10 % of a fresh start that saw the same flood")
    sys.exit(0 if series_ok and rss_ok and failed == 0 else 1)


if __name__ == "__main__":
    main()

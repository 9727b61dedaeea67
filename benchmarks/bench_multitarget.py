"""Benchmark multi-target mode: one exporter scraping 1, 10 and 100 Ollamas (fake, 50 installed models each,
5 loaded) through /probe, as Prometheus would (every target once per round, the rounds paced), then the
same with one target that never answers scraped alongside.

Reports, per target count: /probe latency p50/p99 (all scrapes of all rounds), the exporter's RSS after the
rounds, and its CPU per scrape; and whether a hung target slows the others (p99 with and without it, in
the same run).

Usage: .venv/bin/python benchmarks/bench_multitarget.py [--rounds 20] [--counts 1,10,100]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import cpu_seconds, free_port, rss_kb, terminate, wait_for  # noqa: E402
from tests.fakes.hostile import ScriptedServer, head  # noqa: E402
from tests.fakes.ollama import FakeOllama  # noqa: E402


def start_fakes(count: int) -> list[FakeOllama]:
    fakes = []
    for _ in range(count):
        fake = FakeOllama().start()
        for i in range(50):
            fake.add_model(f"model-{i}:latest")
        for i in range(5):
            fake.load(f"model-{i}:latest", keep_alive=-1)
        fakes.append(fake)
    return fakes


def proc_stats(pid: int) -> tuple[float, int]:
    return cpu_seconds(pid), rss_kb(pid)


def scrape_round(session: requests.Session, url: str, targets: list[str], workers: int) -> list[float]:
    def one(target: str) -> float:
        started = time.perf_counter()
        resp = session.get(url + "/probe", params={"target": target},
                           headers={"X-Prometheus-Scrape-Timeout-Seconds": "3"}, timeout=10)
        resp.raise_for_status()
        return time.perf_counter() - started

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, targets))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--counts", default="1,10,100")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    fakes = start_fakes(max(counts))
    hung = ScriptedServer().start()
    for path in ("/api/version", "/api/ps", "/api/tags"):
        hung.script("GET", path, [60.0, head(200, b"{}")])
    workdir = Path(tempfile.mkdtemp(prefix="bench-multitarget-"))
    config = workdir / "config.yml"
    config.write_text(yaml.safe_dump({"ollama": {"url": "http://127.0.0.1:9"}, "probes": {"enabled": False},
                                      "gpu": {"enabled": False}, "multi_target": {"allow": ["http://127.0.0.1:*"],
                                                                                   "cache_size": 200}}))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ollama_exporter", "--config.file", str(config),
                             "--web.listen-address", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "log", "w"))
    url = f"http://127.0.0.1:{port}"
    session = requests.Session()
    print(f"{'targets':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99 +hung':>10} {'RSS MiB':>8} {'CPU ms/scrape':>14}")
    try:
        wait_for(lambda: requests.get(url + "/-/healthy", timeout=1).status_code == 200, timeout=20)
        for count in counts:
            targets = [f"127.0.0.1:{f.port}" for f in fakes[:count]]
            scrape_round(session, url, targets, min(count, 16))  # warm up: /api/show for every target
            time.sleep(1.0)
            cpu0, _ = proc_stats(proc.pid)
            times = []
            for _ in range(args.rounds):
                times += scrape_round(session, url, targets, min(count, 16))
            cpu1, rss = proc_stats(proc.pid)
            with_hung = []
            for _ in range(max(3, args.rounds // 4)):
                with concurrent.futures.ThreadPoolExecutor(1) as bg:
                    stuck = bg.submit(lambda: session.get(url + "/probe", params={"target": f"127.0.0.1:{hung.port}"},
                                                          headers={"X-Prometheus-Scrape-Timeout-Seconds": "3"},
                                                          timeout=10))
                    with_hung += scrape_round(session, url, targets, min(count, 16))
                    stuck.result()
            print(f"{count:>8} {pct(times, 0.5):>8.1f} {pct(times, 0.99):>8.1f} {pct(with_hung, 0.99):>10.1f} "
                  f"{rss / 1024:>8.1f} {(cpu1 - cpu0) * 1000 / len(times):>14.2f}")
    finally:
        terminate(proc)
        hung.stop()
        for fake in fakes:
            fake.stop()


if __name__ == "__main__":
    main()

"""Benchmark the working core: /metrics latency, CPU per poll cycle, and render cost per snapshot.

Runs the real daemon as a child process against the fake Ollama (tests/fakes) with 50 installed and
10 loaded models, then:
  1. times 1 000 sequential GET /metrics over loopback (median, p99, max);
  2. measures the daemon's CPU time (utime+stime from /proc) over a window with no scrapes and divides
     by the number of polls the fake saw;
  3. times one render of a large snapshot (~8 000 series) in this process, which is what a poll pays once
     and a scrape never does.

Usage: .venv/bin/python benchmarks/bench_core.py [--requests 1000] [--window 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import cpu_seconds, free_port, terminate, wait_for  # noqa: E402
from tests.fakes.ollama import FakeOllama  # noqa: E402



def populate(fake: FakeOllama, installed: int, loaded: int) -> None:
    for i in range(installed):
        fake.add_model(f"model-{i:03d}:q4", family=("llama", "qwen3", "gemma3")[i % 3],
                       capabilities=["completion", "tools"] if i % 5 else ["embedding"])
    for i in range(loaded):
        fake.load(f"model-{i:03d}:q4", size_vram=2_000_000_000 + i, context_length=4096 * (1 + i % 4))


def bench_scrapes(url: str, n: int) -> list[float]:
    session = requests.Session()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        resp = session.get(url + "/metrics", timeout=5)
        times.append(time.perf_counter() - started)
        assert resp.status_code == 200 and b"ollama_up 1.0" in resp.content
    return times


def bench_render(models: int) -> tuple[int, float]:
    from ollama_exporter.exposition import Exposition
    from ollama_exporter.ollama import parse_installed, parse_loaded
    from ollama_exporter.snapshot import ShowInfo, Snapshot, frozen_map
    from dataclasses import replace

    details = {"format": "gguf", "family": "llama", "families": ["llama"], "parameter_size": "8B",
               "quantization_level": "Q4_K_M"}
    show = ShowInfo("llama", 131072, 8_000_000_000, ("completion", "tools", "vision"), "a" * 64)
    installed = tuple(replace(parse_installed({"name": f"m{i}:latest", "digest": f"{i:064x}", "size": 1 << 32,
                                               "details": details}), show=show) for i in range(models))
    loaded = tuple(parse_loaded({"name": f"m{i}:latest", "digest": f"{i:064x}", "size": 1 << 32,
                                 "size_vram": 1 << 31, "context_length": 4096, "details": details,
                                 "expires_at": "2026-11-22T10:00:00.123456789+05:30"}) for i in range(models // 4))
    counts = frozen_map({m.name: 1 for m in installed})
    snap = Snapshot(time.time(), True, True, "0.32.15", installed, loaded, (), counts, counts, frozen_map({}))
    exp = Exposition()
    started = time.perf_counter()
    exp.update(snap)
    elapsed = time.perf_counter() - started
    series = sum(1 for line in exp.get()[0].splitlines() if line and not line.startswith(b"#"))
    return series, elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--window", type=float, default=20.0, help="seconds of scrape-free polling for CPU")
    parser.add_argument("--interval", default="200ms", help="poll interval for the CPU window")
    args = parser.parse_args()

    fake = FakeOllama().start()
    populate(fake, 50, 10)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ollama_exporter", "--ollama.url", fake.url,
                             "--poll.interval", args.interval, "--web.listen-address", f"127.0.0.1:{port}",
                             "--log.level", "warning"])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(url + "/-/ready", timeout=1).status_code == 200, message="exporter ready")
        time.sleep(1.0)  # past the first poll's /api/show calls: measure the steady state

        fake.reset_requests()
        cpu_before, polls_before = cpu_seconds(proc.pid), fake.count("/api/ps")
        time.sleep(args.window)
        cpu = cpu_seconds(proc.pid) - cpu_before
        polls = fake.count("/api/ps") - polls_before
        shows = fake.count("/api/show")

        times = sorted(bench_scrapes(url, args.requests))
        body = requests.get(url + "/metrics", timeout=5).content
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    finally:
        terminate(proc)
        fake.stop()

    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(f"fake Ollama: 50 installed, 10 loaded models; exposition {len(body)} bytes, {series} samples")
    print(f"/metrics over {len(times)} sequential requests: median {statistics.median(times) * 1000:.2f} ms, "
          f"p99 {p99 * 1000:.2f} ms, max {times[-1] * 1000:.2f} ms")
    print(f"CPU per poll cycle (steady state, {polls} polls in {args.window:.0f}s, no scrapes): "
          f"{cpu / max(polls, 1) * 1000:.2f} ms ({cpu:.2f} s total); /api/show calls in that window: {shows}")
    for models in (100, 1000):
        n, elapsed = bench_render(models)
        print(f"render once per snapshot: {n} samples ({models} installed models) in {elapsed * 1000:.1f} ms")


if __name__ == "__main__":
    main()

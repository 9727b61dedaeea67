"""Benchmark the logs source: how many of Ollama's log lines one core parses and counts per second, and what a
10 000 lines/s burst costs the running exporter, each against a baseline measured in the same run.

The corpus is what a busy v0.32 Ollama writes (tests/fakes/ollama_log.py formats, checked against real
lines): per request a gin access line and llama-server's ~15 lines (sampler dump, launch, prompt,
timings, release), with loads, slog noise and a few garbage lines mixed in.
  1. In process, one core: TrafficStats.feed_many over the corpus in the follower's batch size, against
     a baseline loop that only splits the same bytes into lines and decodes them (the least any parser
     must do), and `wc -l` over the same file.
  2. The real daemon (`--logs.source file`) following a file that grows by 10 000 lines every second for
     --seconds: its CPU time (utime+stime from /proc) during the burst against the same daemon idle for
     as long, and the time until the last line is counted.

Usage: .venv/bin/python benchmarks/bench_logs.py [--lines 200000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ollama_exporter.logsources import LineSplitter  # noqa: E402
from ollama_exporter.traffic import TrafficStats  # noqa: E402
from tests.conftest import cpu_seconds, free_port, sample, terminate, wait_for  # noqa: E402
from tests.fakes.ollama import FakeOllama  # noqa: E402
from tests.fakes.ollama_log import gin_line, load_lines, request_lines, slog_line  # noqa: E402

BATCH = 64 * 1024  # bytes per read, as logsources.READ_SIZE



def corpus(n: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    lines: list[str] = []
    task = 0
    while len(lines) < n:
        if rng.random() < 0.002:
            lines += load_lines(f"{rng.randrange(16 ** 8):064x}", 40000 + rng.randrange(1000), "qwen3:8b")
        task += 1
        lines += request_lines(rng.randrange(4), task, prompt_tokens=rng.randrange(10, 4000), cached=0,
                               generated=rng.randrange(1, 400))
        lines.append(gin_line(rng.choice((200, 200, 200, 499, 500)), rng.random() * 30, "127.0.0.1",
                              "POST", rng.choice(("/api/chat", "/api/generate", "/v1/chat/completions"))))
        if rng.random() < 0.05:
            lines.append(slog_line("truncating input prompt", level="WARN", limit=4096, prompt=5000, keep=4, new=4096))
        if rng.random() < 0.01:
            lines.append("cuda driver library failed to get device context 2" + slog_line("gpu", level="WARN"))
    return ("\n".join(lines[:n]) + "\n").encode()


def chunks(data: bytes) -> list[bytes]:
    return [data[i:i + BATCH] for i in range(0, len(data), BATCH)]


def bench_parser(data: bytes, n: int) -> tuple[float, float]:
    """(lines/s of CPU for parse+count, lines/s of CPU for the split-and-decode baseline)."""
    stats, splitter = TrafficStats("192.0.2.1"), LineSplitter()
    parts = chunks(data)
    started = time.process_time()
    for part in parts:
        stats.feed_many(splitter.feed(part))
    parse = time.process_time() - started
    assert sum(stats.value().lines.values()) == n, stats.value().lines
    splitter = LineSplitter()
    started = time.process_time()
    count = 0
    for part in parts:
        for line in splitter.feed(part):
            line.decode("utf-8", "replace")
            count += 1
    split = time.process_time() - started
    assert count == n
    return n / parse, n / split


def bench_wc(path: Path, n: int) -> float:
    started = time.perf_counter()
    out = subprocess.run(["wc", "-l", str(path)], capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - started
    assert int(out.split()[0]) == n
    return n / elapsed


def bench_daemon(data: bytes, seconds: int, workdir: Path) -> dict:
    log = workdir / "server.log"
    log.touch()
    per_second = [part + b"\n" for part in _per_second(data, 10_000, seconds)]
    fake = FakeOllama().start()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ollama_exporter", "--ollama.url", fake.url, "--no-probes.enabled",
                             "--runners.enabled", "false", "--web.listen-address", f"127.0.0.1:{port}",
                             "--log.level", "warning", "--logs.source", "file", "--logs.path", str(log)])
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for(lambda: sample(requests.get(url, timeout=1).text, "ollama_exporter_source_up", source="logs") == 1,
                 timeout=20, message="logs source up")
        idle_before = cpu_seconds(proc.pid)
        time.sleep(seconds)
        idle = cpu_seconds(proc.pid) - idle_before
        busy_before = cpu_seconds(proc.pid)
        started = time.monotonic()
        with open(log, "ab") as fh:
            for i, block in enumerate(per_second):
                fh.write(block)
                fh.flush()
                time.sleep(max(0.0, started + i + 1 - time.monotonic()))
        written = time.monotonic()
        total = 10_000 * seconds

        def done() -> bool:
            text = requests.get(url, timeout=2).text
            return sum(sample(text, "ollama_exporter_log_lines_total", result=r) or 0
                       for r in ("parsed", "ignored", "malformed")) >= total
        wait_for(done, timeout=120, interval=0.1, message="every line counted")
        lag = time.monotonic() - written
        busy = cpu_seconds(proc.pid) - busy_before
        window = time.monotonic() - started
    finally:
        terminate(proc, 10)
        fake.stop()
    return {"idle": idle, "busy": busy, "window": window, "lag": lag, "total": total}


def _per_second(data: bytes, n: int, seconds: int) -> list[bytes]:
    lines = data.split(b"\n")
    return [b"\n".join(lines[i * n:(i + 1) * n]) for i in range(seconds)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--seconds", type=int, default=10, help="length of the 10 000 lines/s burst")
    args = parser.parse_args()
    n = max(args.lines, 10_000 * args.seconds)
    data = corpus(n)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.log"
        path.write_bytes(data)
        parse_rate, split_rate = bench_parser(data, n)
        wc_rate = bench_wc(path, n)
        d = bench_daemon(data, args.seconds, Path(tmp))
    print(f"corpus: {n} lines, {len(data) / n:.0f} bytes per line on average")
    print(f"parse and count, one core: {parse_rate:,.0f} lines/s of CPU "
          f"({1e6 / parse_rate:.1f} µs per line)")
    print(f"baseline, split and decode only: {split_rate:,.0f} lines/s ({parse_rate / split_rate:.2f}x of it); "
          f"wc -l: {wc_rate:,.0f} lines/s")
    extra = d["busy"] - d["idle"] * d["window"] / args.seconds
    print(f"daemon following a 10 000 lines/s burst for {args.seconds} s: {d['busy']:.2f} s CPU over "
          f"{d['window']:.1f} s ({d['busy'] / d['window'] * 100:.0f}% of a core); idle for {args.seconds} s: "
          f"{d['idle']:.2f} s; so {extra / d['total'] * 1e6:.1f} µs of CPU per line; last line counted "
          f"{d['lag']:.2f} s after it was written")


if __name__ == "__main__":
    main()

"""Benchmark basic auth: the time a wrong password costs for a known and for an unknown user (the
user-name oracle), a cache hit, and how many cores a flood of wrong passwords keeps busy, for the
previous BasicAuth (the one of commit BASELINE, read from git) and the current one, in the same run.

One user with a cost-10 bcrypt hash (the toolkit's example cost); every attempt uses a new password
so no cache answers. The flood: THREADS threads, each checking distinct wrong passwords; "cores busy"
is this process's CPU time over the wall time.

Usage: .venv/bin/python benchmarks/bench_basic_auth.py [--rounds 15] [--threads 4]
"""

from __future__ import annotations

import argparse
import base64
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import bcrypt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ollama_exporter.basic_auth import BasicAuth  # noqa: E402

BASELINE = "d7af570"  # the last commit before the toolkit-conformant basic auth


def baseline_class() -> type:
    source = subprocess.run(["git", "show", f"{BASELINE}:ollama_exporter/webconfig.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("webconfig_baseline")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{BASELINE}:webconfig.py", "exec"), module.__dict__)  # noqa: S102 (our own history)
    return module.BasicAuth


def header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def median_ms(check, user: str, rounds: int, tag: str) -> float:
    times = []
    for i in range(rounds):
        h = header(user, f"{tag}-wrong-{i}")
        started = time.perf_counter()
        assert not check(h)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def cores_busy(check, threads: int, per_thread: int, tag: str) -> tuple[float, float]:
    """(CPU seconds / wall seconds, wall seconds) while `threads` threads check wrong passwords."""
    barrier = threading.Barrier(threads + 1)

    def flood(n: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            check(header("prometheus", f"{tag}-flood-{n}-{i}"))

    workers = [threading.Thread(target=flood, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    cpu, wall = time.process_time(), time.perf_counter()
    barrier.wait()
    for w in workers:
        w.join()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / wall, wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()

    hashed = bcrypt.hashpw(b"scrape", bcrypt.gensalt(10)).decode().replace("$2b$", "$2y$", 1)
    before = baseline_class()({"prometheus": hashed.encode()})
    after = BasicAuth({"prometheus": hashed})
    print(f"one user, bcrypt cost 10; median of {args.rounds} wrong passwords each (ms)")
    print(f"{'':8} {'known user':>11} {'unknown user':>13} {'cache hit':>10} {'cores busy (flood)':>20}")
    for name, auth in (("before", before), ("after", after)):
        known = median_ms(auth.check, "prometheus", args.rounds, name)
        unknown = median_ms(auth.check, "nobody", args.rounds, name)
        good = header("prometheus", "scrape")
        assert auth.check(good)
        started = time.perf_counter()
        for _ in range(1000):
            assert auth.check(good)
        hit_ms = time.perf_counter() - started  # seconds for 1000 calls = ms per call
        busy, wall = cores_busy(auth.check, args.threads, 5, name)
        print(f"{name:8} {known:11.1f} {unknown:13.1f} {hit_ms:10.4f} {busy:11.2f} ({wall:.1f} s)")


if __name__ == "__main__":
    main()

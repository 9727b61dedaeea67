"""What the exporter keeps per model and per series, and what a change costs, against another checkout.

The soak (bench_soak.py) showed that the resident size a burst of model names leaves behind follows the
burst's high-water mark of small objects; this measures the two long-lived stores a burst fills, in
process and exactly (tracemalloc, not RSS):

- the client's reuse state for /api/tags (Ollama's compact JSON): what it keeps per model so an
  unchanged row is not parsed again, the most it holds while reading an answer in which one row of
  `--models` changed (in a burst of names, every poll), and the time that read takes;
- the writer's state for one family: what it keeps per series so an unchanged line is not formatted
  again, and the time to render the family again when one row changed.

    .venv/bin/python benchmarks/bench_memory.py                      # this checkout
    .venv/bin/python benchmarks/bench_memory.py --against ../before  # and another checkout, same run
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

# The answers bench_soak.py's scripted Ollama gives, written here again on purpose: importing bench_soak
# puts this checkout's root first on the path, and the --against child must import the other checkout's
# ollama_exporter.
DETAILS = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
           "parameter_size": "8.0B", "quantization_level": "Q4_K_M"}
SHOW = {"model_info": {"general.architecture": "llama", "llama.context_length": 131072,
                       "general.parameter_count": 8_030_261_248},
        "capabilities": ["completion", "tools"], "details": DETAILS}


def tags_row(i: int, size: int = 4_920_753_328) -> dict:
    name = f"model-{i}:q{i % 7}"
    return {"name": name, "model": name, "modified_at": "2026-01-01T00:00:00Z", "size": size,
            "digest": hashlib.sha256(name.encode()).hexdigest(), "details": DETAILS}


def ps_row(i: int) -> dict:
    return {**tags_row(i), "size": 6_654_289_920, "expires_at": "2318-01-01T00:00:00Z", "size_vram": 6_654_289_920,
            "context_length": 4096}


def answer(obj: dict) -> bytes:
    """JSON as Ollama writes it (Go's encoding/json: no spaces)."""
    return json.dumps(obj, separators=(",", ":")).encode()


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def kept(make) -> tuple[int, object]:
    """Bytes still allocated after make() returns, and what it returned (timings are taken without
    tracemalloc, which slows every allocation)."""
    gc.collect()
    tracemalloc.start()
    try:
        made = make()
        gc.collect()
        return tracemalloc.get_traced_memory()[0], made
    finally:
        tracemalloc.stop()


def peaked(action) -> int:
    """The most bytes allocated at once while action() ran, above what was allocated before."""
    gc.collect()
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def client_figures(models: int, repeat: int) -> dict:
    from ollama_exporter.ollama import OllamaClient

    answers = [answer({"models": [tags_row(i, 4_920_753_328 + (k if i == k else 0)) for i in range(models)]})
               for k in range(repeat + 1)]  # answer k: row k changed
    client = OllamaClient("http://127.0.0.1:9", 1.0, max_models=models)
    current = [answers[0]]
    client._body = lambda method, path, *a, **kw: current[0]  # the answer without the network
    size, _ = kept(client.tags)  # the models and the state kept to reuse them
    changes = iter(answers[1:])

    def one_row_changed():
        current[0] = next(changes)
        client.tags()
    peak = peaked(one_row_changed)
    return {"client_bytes_per_model": size / models, "client_peak_per_model": peak / models,
            "client_changed_row_ms": timed(one_row_changed, repeat - 1) * 1000}


def writer_figures(models: int, repeat: int) -> dict:
    from ollama_exporter.exposition import Writer
    from ollama_exporter.metrics import DEFS

    def family(changed: int):
        f = DEFS["ollama_model_size_bytes"].family()
        for i in range(models):
            f.add((f"model-{i}:q{i % 7}",), 4_920_753_328.0 + (1 if i == changed else 0))
        return f

    writer = Writer()
    families = [family(-1)] + [family(k) for k in range(repeat)]
    size, _ = kept(lambda: writer.prepare([families[0]]))
    rest = iter(families[1:])
    return {"writer_bytes_per_series": size / models,
            "writer_changed_row_ms": timed(lambda: writer.prepare([next(rest)]), repeat) * 1000}


def pipeline_figures(models: int) -> dict:
    """What the whole daemon keeps per model a burst lists (the client, the poller with its show cache,
    the metrics' sections and the writer): 20 steady models, then `models` more, every third loaded,
    each shown; small objects (up to 512 bytes, CPython's own allocator) counted apart, since those are
    what the soak's residue follows."""
    from ollama_exporter.exposition import Exposition
    from ollama_exporter.ollama import OllamaClient
    from ollama_exporter.poller import Poller

    client = OllamaClient("http://127.0.0.1:9", 5.0, max_models=models + 100)
    answers = {"/api/version": b'{"version":"0.30.0"}', "/api/show": answer(SHOW)}

    def listing(count: int) -> None:
        answers["/api/tags"] = answer({"models": [tags_row(i) for i in range(count)]})
        answers["/api/ps"] = answer({"models": [ps_row(i) for i in range(0, count, 3)]})

    client._body = lambda method, path, *a, **kw: answers[path]
    poller, exposition = Poller(client, 1.0), Exposition(runtime_metrics=False)
    poller.settle_shows = True

    def cycle(count: int) -> None:
        listing(count)
        for _ in range(2):  # the second poll joins the show answers the first one asked for
            exposition.update(poller.poll_once())

    cycle(20)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        cycle(20 + models)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    small = [t.size for t in after.traces if t.size <= 512]
    small_before = [t.size for t in before.traces if t.size <= 512]
    total = sum(t.size for t in after.traces) - sum(t.size for t in before.traces)
    return {"pipeline_bytes_per_model": total / models,
            "pipeline_small_bytes_per_model": (sum(small) - sum(small_before)) / models,
            "pipeline_small_objects_per_model": (len(small) - len(small_before)) / models}


def measure(models: int, repeat: int) -> dict:
    return {**client_figures(models, repeat), **writer_figures(models, repeat), **pipeline_figures(models)}


def run_in(checkout: Path, models: int, repeat: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", "--models", str(models), "--repeat", str(repeat)],
                         cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=21, help="timed changes (median)")
    parser.add_argument("--against", type=Path, help="another checkout of the repository to measure too")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.models, args.repeat)))
        return
    here = Path(__file__).resolve().parents[1]
    runs = {"this checkout": run_in(here, args.models, args.repeat)}
    if args.against:
        runs[f"{args.against}"] = run_in(args.against.resolve(), args.models, args.repeat)
    print(f"{args.models} models, median of {args.repeat} changes")
    print(f"{'':28} {'client B/model':>15} {'peak B/model':>13} {'one row changed ms':>19} {'writer B/series':>16} "
          f"{'one row changed ms':>19}")
    for name, r in runs.items():
        print(f"{name[:28]:28} {r['client_bytes_per_model']:15.0f} {r.get('client_peak_per_model', 0):13.0f} "
              f"{r['client_changed_row_ms']:19.2f} {r['writer_bytes_per_series']:16.0f} {r['writer_changed_row_ms']:19.2f}")
    print(f"\n{'the whole pipeline, per model':28} {'B kept':>15} {'small B kept':>13} {'small objects':>19}")
    for name, r in runs.items():
        if "pipeline_bytes_per_model" in r:
            print(f"{name[:28]:28} {r['pipeline_bytes_per_model']:15.0f} {r['pipeline_small_bytes_per_model']:13.0f} "
                  f"{r['pipeline_small_objects_per_model']:19.1f}")


if __name__ == "__main__":
    main()

"""Benchmark the probes: timing error of TTFT and TPOT against a server with known timing, and the
load probes put on Ollama at the default settings.

The fake Ollama (tests/fakes/ollama.py) streams the first token `ttft` after the request arrives and
then one token every `token_gap`; the client-observed figures should match those within scheduling
noise. Usage: .venv/bin/python benchmarks/bench_probes.py [--probes 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ollama_exporter.config import Config  # noqa: E402
from ollama_exporter.ollama import OllamaClient  # noqa: E402
from ollama_exporter.poller import Poller  # noqa: E402
from ollama_exporter.prober import Prober  # noqa: E402
from tests.fakes.ollama import FakeOllama  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=50)
    args = parser.parse_args()
    fake = FakeOllama().start()
    try:
        fake.add_model("qwen3:8b")
        fake.load("qwen3:8b", keep_alive=-1, context_length=8192)
        for ttft, gap in ((0.2, 0.02), (0.05, 0.005)):
            fake.set_timing(ttft=ttft, token_gap=gap, tokens=16)
            config = replace(Config(), ollama_url=fake.url)
            client = OllamaClient(fake.url, 5.0)
            poller = Poller(client, 5.0)
            prober = Prober(client, config, lambda: poller.snapshot)
            results = [prober.probe_once("qwen3:8b", "generate", 8192) for _ in range(args.probes)]
            assert all(r.ok for r in results)
            ttfts = [r.ttft for r in results]
            tpots = [r.tpot for r in results]
            print(f"server TTFT {ttft * 1000:.0f} ms, token gap {gap * 1000:.0f} ms, {args.probes} probes:")
            print(f"  TTFT mean error {(statistics.mean(ttfts) - ttft) * 1000:+.2f} ms "
                  f"(p99 |error| {sorted(abs(t - ttft) for t in ttfts)[int(0.99 * len(ttfts)) - 1] * 1000:.2f} ms)")
            print(f"  TPOT mean error {(statistics.mean(tpots) - gap) * 1000:+.3f} ms "
                  f"(stdev {statistics.pstdev(tpots) * 1000:.3f} ms)")
        fake.reset_requests()
        prompt = results[-1].prompt_eval_count
    finally:
        fake.stop()
    defaults = Config()
    per_minute = 60 / defaults.probes_interval
    print(f"overhead per probed model at defaults (interval {defaults.probes_interval:g}s, num_predict "
          f"{defaults.probes_num_predict}): at most {per_minute:g} probes/min, each one inference request and "
          f"at least 2 /api/ps reads (before and after); {per_minute * defaults.probes_num_predict:g} generated "
          f"tokens/min, ~{per_minute * prompt:g} prompt tokens/min (fake's prompt count {prompt}); "
          f"idle finite-keep_alive models: 0 (skipped); models in use: fewer (probed after a pause)")


if __name__ == "__main__":
    main()

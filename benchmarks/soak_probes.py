"""Soak the prober against the fake Ollama at every version profile and print what probes did.

The scenario (tests/soak.py) is a script of simulated users run against the exporter's real poll and
probe loops: bursts of use, `ollama stop`, a reload with another num_ctx, idle periods, a pinned
embedding model. Time is counted in probe intervals; the test suite runs one pass at 0.25 s per
interval, this runs longer (default: 3 passes of 18 intervals at 2 s, about 2 minutes per profile).

The baseline is in the same run: "unload +s" is how much later the finite-keep_alive model unloaded
than it would have without the exporter (its users' last request + keep_alive), worst idle period;
"+units" is the same in probe intervals. "cold"/"reloads" are loads the fake's scheduler logged for a
request carrying the probes' X-Forwarded-For; "pins lost" are keep_alive -1 runners a probe's request
made finite, "(anyone)" by any request (on <=0.1.48 the users' own requests do it, and on later passes
users who send other options reload a model an admin pinned); "downgrades" is the exporter's
ollama_model_keep_alive_downgrades_total; "ps/min" counts every /api/ps read (poller and prober).

Usage: .venv/bin/python benchmarks/soak_probes.py [--interval 2] [--passes 3] [--profile 0.15.5-0.24]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import soak  # noqa: E402
from tests.fakes.ollama import PROFILES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--interval", type=float, default=2.0, help="seconds per probe interval")
    parser.add_argument("--passes", type=int, default=3, help="runs of the 18-interval users' script")
    parser.add_argument("--profile", action="append", choices=list(PROFILES), help="default: all")
    args = parser.parse_args()
    print(f"{args.passes} x {soak.UNITS} probe intervals of {args.interval:g}s, poll {args.interval / 5:g}s, "
          f"finite keep_alive {soak.KEEP_ALIVE_UNITS} intervals, 48 GiB VRAM")
    print(soak.HEADER + "  measured (successful probes per model)")
    for profile in args.profile or PROFILES:
        f = soak.run(profile, PROFILES[profile], interval=args.interval, passes=args.passes)
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(f.skipped.items()) if v)
        print(f.row() + "  " + ", ".join(f"{m} {n}" for m, n in sorted(f.measured.items())), flush=True)
        per = f.probes / len(soak.MODELS) / (args.passes * soak.UNITS)
        print(f"{'':<14} probes per model per interval {per:.2f}; user loads and reloads {f.user_loads}; "
              f"skipped: {skipped or '-'}", flush=True)


if __name__ == "__main__":
    main()

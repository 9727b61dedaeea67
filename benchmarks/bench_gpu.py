"""Benchmark NVML sampling cost per poll with the fake driver library (tests/fakes/nvml).

Builds the fake libnvidia-ml.so.1, describes the standard two-GPU box (an A100 with two MIG instances
and an RTX 4090, four runner processes), and re-runs itself with LD_LIBRARY_PATH pointing at it so the
real pynvml bindings load the fake. Reports wall and CPU time per GpuSource.sample() and the number of
NVML calls it makes. The fake answers in nanoseconds, so this measures the exporter's own overhead
(pynvml's ctypes marshalling, our code, /proc reads); a real driver adds its per-call latency
(~0.1-0.4 ms per call on real GPUs, as reported for dcgm-exporter and nvidia-smi) times the call count.

Usage: .venv/bin/python benchmarks/bench_gpu.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(samples: int) -> None:
    from ollama_exporter.gpu import GpuSource
    from tests.fakes.nvml import FakeNvml

    nvml = FakeNvml(Path(os.environ["BENCH_NVML_DIR"]))
    source = GpuSource()
    source.start()
    source.sample()  # warm: unsupported fields are learnt on the first sample
    nvml.reset_call_count()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(samples):
        state = source.sample()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    calls = nvml.call_count() / samples
    print(f"GPUs: {len(state.devices)} ({sum(len(d.mig) for d in state.devices)} MIG instances, "
          f"{sum(len(d.processes) for d in state.devices)} processes)")
    print(f"GpuSource.sample() over {samples} samples: {wall / samples * 1000:.3f} ms wall, "
          f"{cpu / samples * 1000:.3f} ms CPU per poll; {calls:.0f} NVML calls per poll")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    if os.environ.get("BENCH_NVML_DIR"):
        child(args.samples)
        return
    from tests.fakes.nvml import FakeNvml, two_gpu_box

    with tempfile.TemporaryDirectory() as tmp:
        nvml = FakeNvml(Path(tmp))
        nvml.write(two_gpu_box(pids=(os.getpid(),) * 4))
        env = {**os.environ, **nvml.env(), "BENCH_NVML_DIR": tmp}
        subprocess.run([sys.executable, __file__, "--samples", str(args.samples)], env=env, check=True)


if __name__ == "__main__":
    main()

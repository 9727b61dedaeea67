"""Attributing GPU processes to models through real /proc/<pid>/cmdline of runner-like child processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ollama_exporter import runners
from ollama_exporter.ollama import parse_loaded
from ollama_exporter.snapshot import GpuProcess, InstalledModel, ModelDetails, ShowInfo
from tests.conftest import wait_for

BLOB_A, BLOB_B = "a" * 64, "b" * 64


def spawn(argv0: str, *args: str) -> subprocess.Popen:
    """A real process whose argv is `argv0 <python -c sleep> *args`: /proc shows it like a runner."""
    return subprocess.Popen([argv0, "-c", "import time; time.sleep(60)", *args], executable=sys.executable)


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield lambda *a: started.append(spawn(*a)) or started[-1]
    for p in started:
        p.kill()
        p.wait()


@pytest.mark.parametrize(
    "argv0, args, ref",
    [  # every runner generation in ollama-api.md §11, and the processes that are not models
        ("/usr/local/lib/ollama/llama-server", ["--model", f"/root/.ollama/models/blobs/sha256-{BLOB_A}",
                                                "--port", "40123", "--host", "127.0.0.1", "-c", "8192"], f"blob:{BLOB_A}"),
        ("/usr/local/bin/ollama", ["runner", "--ollama-engine", "--model",
                                   f"/var/lib/ollama/blobs/sha256-{BLOB_B}", "--port", "40124"], f"blob:{BLOB_B}"),
        ("/tmp/ollama123/runners/cuda_v12/ollama_llama_server", ["--model", f"C:/m/blobs/sha256-{BLOB_A}"],
         f"blob:{BLOB_A}"),
        ("/usr/local/bin/ollama", ["runner", "--mlx-engine", "--model", "qwen3:8b", "--port", "40125"],
         "name:qwen3:8b"),
        ("/usr/local/lib/ollama/llama-server", ["--port", "40126", "--host", "127.0.0.1", "--no-webui",
                                                "--offline", "--verbose"], ""),  # device discovery
        ("/usr/local/bin/ollama", ["runner", "--ollama-engine", "--port", "40127"], ""),  # discovery, v0.12-v0.2x
        ("/usr/bin/python3", ["train.py", "--model", "resnet50"], ""),  # somebody else's GPU job
    ],
)
def test_runner_command_lines_name_their_model(procs, argv0, args, ref):
    p = procs(argv0, *args)
    # a process that has just been started may show an empty cmdline for a moment while it execs
    argv = wait_for(lambda: runners.read_cmdline(p.pid), timeout=5, message="the child's cmdline")
    assert argv[0] == argv0 and argv[-len(args):] == args
    assert runners.model_ref(argv) == ref


def test_unreadable_pids_are_none():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: its /proc entry is gone, like a PID from another namespace
    assert runners.read_cmdline(p.pid) is None


def installed(name: str, digest: str, blob: str) -> InstalledModel:
    return InstalledModel(name, digest, 1, ModelDetails(), show=ShowInfo(weights_blob=blob))


def loaded(name: str, digest: str):
    return parse_loaded({"name": name, "digest": digest, "size": 1, "size_vram": 1})


def test_attribution_follows_blob_to_the_name_ps_shows():
    inst = [installed("llama3.2:3b", "d1" * 32, BLOB_A), installed("my-alias:latest", "d2" * 32, BLOB_A),
            installed("qwen3:8b", "d3" * 32, BLOB_B)]
    ps = [loaded("my-alias:latest", "d2" * 32)]  # the alias loaded the shared blob: ps names the alias
    processes = [
        GpuProcess(10, "0", "GPU-0", 5_000, f"blob:{BLOB_A}"),
        GpuProcess(10, "1", "GPU-1", 3_000, f"blob:{BLOB_A}"),  # one runner split over two GPUs
        GpuProcess(11, "0", "GPU-0", 7_000, f"blob:{BLOB_B}"),  # qwen3 still loading: not in ps yet
        GpuProcess(12, "0", "GPU-0", 9_000, None),  # PID from another namespace
        GpuProcess(13, "1", "GPU-1", 1_000, ""),  # not a runner
    ]
    rows, unattributed = runners.attribute(processes, ps, inst)
    assert [(r.model, r.gpu, r.uuid, r.bytes) for r in rows] == [
        ("my-alias:latest", "0", "GPU-0", 5_000), ("my-alias:latest", "1", "GPU-1", 3_000)]
    assert unattributed == {"unreadable": 1, "loading": 1, "other": 1}


def test_mlx_runner_matches_the_ps_name():
    rows, _ = runners.attribute([GpuProcess(5, "0", "GPU-0", 42, "name:gemma3")], [loaded("gemma3:latest", "e" * 64)], [])
    assert [(r.model, r.bytes) for r in rows] == [("gemma3:latest", 42)]

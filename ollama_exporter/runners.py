"""Map GPU processes to Ollama models through the runner's command line.

Ollama never reports a runner's PID, but NVML reports GPU memory per PID. Every runner generation
(`ollama_llama_server`, `ollama runner`, `llama-server`) gets `--model <OLLAMA_MODELS>/blobs/sha256-<hex>`:
that hex is the weights blob, and /api/show's modelfile names the same blob in its FROM line. MLX
runners get `--model <model name>` instead. Device-discovery processes have no `--model` and are not
models. When /proc/<pid>/cmdline cannot be read (a container without the host PID namespace) the
process is counted as unreadable and never guessed at.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from typing import Iterable, Iterator, Mapping, Optional

from ollama_exporter.snapshot import GpuProcess, InstalledModel, LoadedModel, ModelGpuMemory

_BLOB = re.compile(r"(?:^|/)sha256[-:]([0-9a-f]{64})$")


def read_cmdline(pid: int, proc: str = "/proc") -> Optional[list[str]]:
    """argv of `pid`, or None when it cannot be read (other PID namespace, gone, or no permission)."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    if not raw:
        return None  # kernel thread or zombie: nothing to read
    return [arg.decode("utf-8", "replace") for arg in raw.rstrip(b"\0").split(b"\0")]


def model_ref(argv: list[str]) -> str:
    """What a process's argv says it serves: "blob:<hex>", "name:<model>", or "" (not a model runner)."""
    value = None
    for i, arg in enumerate(argv):
        if arg in ("--model", "-m") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--model="):
            value = arg.split("=", 1)[1]
    if not value:
        return ""
    blob = _BLOB.search(value)
    if blob:
        return f"blob:{blob.group(1)}"
    if "--mlx-engine" in argv:
        return f"name:{value}"
    return ""


def runner_port(argv: list[str]) -> Optional[int]:
    """The loopback port a runner listens on (`--port N`, every generation), or None."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--port" and i + 1 < len(argv) else arg[7:] if arg.startswith("--port=") else None
        if value is not None and value.isdigit() and 0 < int(value) < 65536:
            return int(value)
    return None


def list_processes(proc: str = "/proc") -> Iterator[int]:
    """PIDs visible in this PID namespace."""
    try:
        names = os.listdir(proc)
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield int(name)


def owners(loaded: Iterable[LoadedModel], installed: Iterable[InstalledModel]) -> dict[str, str]:
    """Model ref ("blob:<hex>", "name:<model>") -> the /api/ps name of the loaded model it serves."""
    blob_of = {m.digest: m.show.weights_blob for m in installed if m.show and m.show.weights_blob}
    owner: dict[str, str] = {}
    for m in loaded:
        owner[f"name:{m.name}"] = m.name
        if m.digest in blob_of:
            owner[f"blob:{blob_of[m.digest]}"] = m.name
    return owner


def owner_of(ref: str, owner: Mapping[str, str]) -> Optional[str]:
    return owner.get(ref) or owner.get(_with_latest(ref))


def attribute(
    processes: Iterable[GpuProcess], loaded: Iterable[LoadedModel], installed: Iterable[InstalledModel]
) -> tuple[tuple[ModelGpuMemory, ...], dict[str, int]]:
    """Sum GPU memory per (loaded model, GPU) and count the processes that could not be attributed.

    Unattributed reasons: "unreadable" (no cmdline), "loading" (a runner whose model is not in /api/ps
    yet), "other" (not an Ollama model runner).
    """
    owner = owners(loaded, installed)
    memory: dict[tuple[str, str, str], int] = defaultdict(int)
    unattributed: Counter = Counter({"unreadable": 0, "loading": 0, "other": 0})
    for p in processes:
        name = owner_of(p.ref, owner) if p.ref else None
        if p.ref is None:
            unattributed["unreadable"] += 1
        elif not p.ref:
            unattributed["other"] += 1
        elif name is not None:
            memory[(name, p.gpu, p.uuid)] += p.used_bytes or 0
        else:
            unattributed["loading"] += 1
    rows = tuple(ModelGpuMemory(model, gpu, uuid, used) for (model, gpu, uuid), used in sorted(memory.items()))
    return rows, dict(unattributed)


def _with_latest(ref: str) -> str:
    """MLX runners may name the model without its tag; /api/ps always has one."""
    return ref + ":latest" if ref.startswith("name:") and ":" not in ref[5:] else ref

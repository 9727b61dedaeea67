"""A time-scaled soak of the prober against the fake Ollama at one version: simulated users, the real
poll and probe loops, and what the probes did to the models, counted from the fake's scheduler events.

Time is measured in probe intervals ("units"): the users' script below runs at `interval` seconds per
unit (0.25 s in the test suite, 30 s for real), with the poll at a fifth of that. tests/test_probe_soak.py
asserts on it; benchmarks/soak_probes.py runs it longer and prints the figures.

The users: a pinned chat model used in bursts, stopped (`ollama stop`) and loaded again; a chat model with
a finite keep_alive (4 units) used in two bursts with idle periods between, which must unload about when it
would without the exporter; a pinned embedding model trained on 512 tokens; a pinned model an admin reloads
with another num_ctx. Stops and option reloads come right after a use, inside the model's pause: the
millisecond race between the probe's pre-flight /api/ps read and its request (Ollama has no "only if
loaded" flag) has its own deterministic test and cannot be removed.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import requests

from ollama_exporter.config import Config
from ollama_exporter.ollama import OllamaClient
from ollama_exporter.poller import Poller
from ollama_exporter.prober import Prober
from tests.fakes.ollama import FakeOllama

PROBE_IP = "192.0.2.1"
KEEP_ALIVE_UNITS = 4  # the finite model's keep_alive
UNITS = 18  # one pass of the script
MODELS = {  # name: (training context, capabilities)
    "pinned:8b": (40960, ["completion"]),
    "chat:3b": (131072, ["completion"]),
    "embed:small": (512, ["embedding"]),
    "opts:7b": (131072, ["completion"]),
}


@dataclass
class Figures:
    profile: str
    version: str
    interval: float
    seconds: float
    probes: int = 0  # probe requests sent (pin restores not included)
    pin_restores: int = 0
    probe_cold_loads: int = 0  # loads whose request was a probe's (X-Forwarded-For)
    probe_reloads: int = 0
    probe_pins_lost: int = 0  # keep_alive -1 runners a probe's request made finite
    pins_lost: int = 0  # ... whoever's request did it (users who reload with other options do it too)
    downgrades: int = 0  # ollama_model_keep_alive_downgrades_total, summed
    user_loads: int = 0  # loads and reloads the users' own requests caused
    unload_delays: list = field(default_factory=list)  # seconds after the would-be unload, per idle period
    measured: dict = field(default_factory=dict)  # model -> successful probes
    resident: set = field(default_factory=set)  # models loaded at some time
    skipped: dict = field(default_factory=dict)  # reason -> count, all models
    ps_reads: int = 0  # /api/ps reads by the exporter (poller and prober)

    def row(self) -> str:
        delay = max(self.unload_delays, default=0.0)
        return (f"{self.profile:<14} {self.version:<8} {self.probes:>6} {self.probe_cold_loads:>5} "
                f"{self.probe_reloads:>7} {self.pin_restores:>8} {self.probe_pins_lost:>10} {self.pins_lost:>9} "
                f"{self.downgrades:>10} {delay:>9.2f} {delay / self.interval:>7.2f} {60 * self.ps_reads / self.seconds:>7.0f}")


HEADER = (f"{'profile':<14} {'version':<8} {'probes':>6} {'cold':>5} {'reloads':>7} {'restores':>8} "
          f"{'pins lost':>10} {'(anyone)':>9} {'downgrades':>10} {'unload +s':>9} {'+units':>7} {'ps/min':>7}")


def script(keep_alive: float) -> list[tuple[float, str, str, dict]]:
    """(unit, action, model, fields): gen = a user's /api/generate, embed, stop = `ollama stop`."""
    k = {"keep_alive": keep_alive}
    return [
        (0.5, "gen", "opts:7b", {"keep_alive": -1, "prompt": ""}),  # pinned with the defaults (again, on a new pass)
        (1.0, "gen", "pinned:8b", {}), (1.3, "gen", "pinned:8b", {}), (1.6, "gen", "pinned:8b", {}),
        (2.0, "gen", "chat:3b", k), (2.3, "gen", "chat:3b", k), (2.6, "gen", "chat:3b", k),
        (3.0, "embed", "embed:small", {}), (3.2, "embed", "embed:small", {}),
        (4.5, "gen", "opts:7b", {}), (4.7, "gen", "opts:7b", {}),
        (5.0, "gen", "opts:7b", {"keep_alive": -1, "options": {"num_ctx": 8192}}),  # an admin's reload
        (5.5, "gen", "opts:7b", {"options": {"num_ctx": 8192}}),
        (6.0, "gen", "pinned:8b", {}), (6.2, "stop", "pinned:8b", {}),
        (8.0, "gen", "pinned:8b", {"keep_alive": -1, "prompt": ""}),  # loaded (and pinned) again
        (8.2, "gen", "pinned:8b", {}), (8.5, "gen", "pinned:8b", {}),
        (10.0, "gen", "chat:3b", k), (10.3, "gen", "chat:3b", k),  # unloaded by now: the user loads it again
        (12.0, "gen", "pinned:8b", {}), (12.3, "gen", "pinned:8b", {}),
        (13.0, "embed", "embed:small", {}),
    ]


def _act(fake: FakeOllama, action: str, model: str, fields: dict) -> None:
    if action == "stop":
        body: dict[str, Any] = {"model": model, "keep_alive": 0}
    elif action == "embed":
        body = {"model": model, "input": "hello", **fields}
    else:
        body = {"model": model, "prompt": "hello", "stream": False, **fields}
    path = "/api/embed" if action == "embed" else "/api/generate"
    requests.post(fake.url + path, json=body, timeout=30).raise_for_status()


def _setup(fake: FakeOllama, keep_alive: float) -> None:
    for name, (train, caps) in MODELS.items():
        fake.add_model(name, context_length=train, capabilities=caps, kv_bytes_per_token=2048,
                       family="bert" if "embedding" in caps else "llama")
    for name in ("pinned:8b", "opts:7b"):  # pinned by their users before the exporter starts
        _act(fake, "gen", name, {"keep_alive": -1, "prompt": ""})
    _act(fake, "embed", "embed:small", {"keep_alive": -1})
    _act(fake, "gen", "chat:3b", {"keep_alive": keep_alive})


def run(profile: str, version: str, interval: float = 0.25, passes: int = 1, vram_gib: float = 48,
        log: Optional[Callable[[str], None]] = None) -> Figures:
    """Run the users' script `passes` times at `interval` seconds per unit against the exporter's loops."""
    poll = interval / 5
    keep_alive = KEEP_ALIVE_UNITS * interval
    with FakeOllama(version=version) as fake:
        fake.vram_gib = vram_gib
        fake.set_timing(ttft=min(0.05, interval / 10), token_gap=min(0.01, interval / 100), tokens=4,
                        load_time=max(0.15, interval / 10))
        fake.set_timing("embed:small", ttft=min(0.02, interval / 20), load_time=max(0.15, interval / 10))
        _setup(fake, keep_alive)
        fake.reset_requests()
        config = replace(Config(), ollama_url=fake.url, probes_interval=interval, poll_interval=poll,
                         probes_timeout=max(5.0, interval))
        client = OllamaClient(fake.url, max(2.0, poll * 4))
        poller = Poller(client, poll)
        prober = Prober(client, config, lambda: poller.snapshot)
        prober.settle_delay = min(0.2, poll)
        poller.probe_stats = prober.stats
        stop = threading.Event()
        loops = [threading.Thread(target=poller.run, args=(stop,), daemon=True),
                 threading.Thread(target=prober.run, args=(stop,), daemon=True)]
        for loop in loops:
            loop.start()
        start = time.monotonic()
        last_use: dict[str, list[float]] = {}
        resident: set[str] = set(fake.loaded())
        try:
            for n in range(passes):
                for unit, action, model, fields in script(keep_alive):
                    delay = start + (n * UNITS + unit) * interval - time.monotonic()
                    if delay > 0:
                        stop.wait(delay)
                    _act(fake, action, model, fields)
                    resident.update(fake.loaded())
                    if action != "stop" and fields.get("keep_alive") == keep_alive:
                        last_use.setdefault(model, []).append(time.time())
                    if log:
                        log(f"{time.monotonic() - start:7.2f}s {action} {model} {fields}")
            stop.wait(max(0.0, start + passes * UNITS * interval - time.monotonic()))
        finally:
            stop.set()
            for loop in loops:
                loop.join(timeout=10)
        fake.wait_settled(timeout=10)
        seconds = time.monotonic() - start
        snapshot = poller.poll_once()
        figures = Figures(profile, version, interval, seconds)
        events = fake.events
        probe_requests = [r for r in fake.requests if r.headers.get("X-Forwarded-For") == PROBE_IP
                          and r.path in ("/api/generate", "/api/chat", "/api/embed")]
        figures.probes = sum(1 for r in probe_requests if "keep_alive" not in (r.json or {}))
        figures.probe_cold_loads = sum(1 for e in events if e.client == PROBE_IP and e.kind == "load")
        figures.probe_reloads = sum(1 for e in events if e.client == PROBE_IP and e.kind == "reload")
        figures.user_loads = sum(1 for e in events if e.client == "" and e.kind in ("load", "reload"))
        figures.probe_pins_lost = sum(1 for e in events if e.client == PROBE_IP and e.unpinned)
        figures.pins_lost = sum(1 for e in events if e.unpinned)
        figures.downgrades = sum(snapshot.keep_alive_downgrades_total.values())
        figures.ps_reads = sum(1 for r in fake.requests if r.path == "/api/ps")
        figures.resident = resident
        for model, stats in (snapshot.probes or {}).items():
            figures.pin_restores += getattr(stats, "keep_alive_restores", 0)
            figures.measured[model] = stats.probes - sum(stats.failures.values())
            for reason, count in stats.skipped.items():
                figures.skipped[reason] = figures.skipped.get(reason, 0) + count
        for e in events:  # the finite model's idle unloads, against when they were due without probes
            if e.kind == "unload" and e.cause == "expired" and e.model in last_use:
                before = [t for t in last_use[e.model] if t < e.time]
                if before:
                    figures.unload_delays.append(e.time - (max(before) + keep_alive))
        if math.isinf(max(figures.unload_delays, default=0.0)):
            raise AssertionError("an unload time is infinite")
        return figures

"""Every metric name, type, label set and help text, and the mapping from a Snapshot to metric families.

This is the only module that knows metric names. Help texts say which Ollama API field each value
comes from. Series exist only for what the snapshot holds, so a model that is no longer loaded or
installed loses its gauges on the next poll; counters keep their series (they are cumulative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ollama_exporter import __version__
from ollama_exporter.snapshot import Snapshot


@dataclass(frozen=True)
class Def:
    name: str
    kind: str  # "gauge" or "counter"
    help: str
    labels: tuple[str, ...] = ()

    def family(self) -> Metric:
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        return cls(self.name, self.help, labels=self.labels)


M = "model"
DEFS = {d.name: d for d in (
    # Ollama server
    Def("ollama_up", "gauge",
        "1 if the last poll got valid answers from Ollama's /api/version and /api/ps, else 0."),
    Def("ollama_build_info", "gauge",
        "Ollama server version from /api/version `version` (last known value while Ollama is down); always 1.",
        ("version",)),
    # installed models: /api/tags joined with /api/show
    Def("ollama_model_info", "gauge",
        "Installed model from /api/tags: `digest` (manifest sha256) and `details` family, parameter_size, "
        "quantization_level and format; always 1.",
        (M, "digest", "family", "parameter_size", "quantization", "format")),
    Def("ollama_model_size_bytes", "gauge", "Size of the installed model on disk, from /api/tags `size`.", (M,)),
    Def("ollama_model_context_length", "gauge",
        "Maximum (training) context length in tokens, from /api/show model_info `<architecture>.context_length`.",
        (M,)),
    Def("ollama_model_parameters", "gauge",
        "Number of model parameters, from /api/show model_info `general.parameter_count`.", (M,)),
    Def("ollama_model_capability", "gauge",
        "Capability of the installed model, from /api/show `capabilities` (or /api/tags on v0.30+); always 1.",
        (M, "capability")),
    # loaded models: /api/ps
    Def("ollama_loaded_model_size_bytes", "gauge",
        "Memory the loaded model uses across CPU and GPU (weights, KV cache, buffers), from /api/ps `size`.", (M,)),
    Def("ollama_loaded_model_vram_bytes", "gauge",
        "Part of the loaded model's memory that is in GPU memory, from /api/ps `size_vram`; "
        "less than ollama_loaded_model_size_bytes means it is partly on CPU.", (M,)),
    Def("ollama_loaded_model_expiry_timestamp_seconds", "gauge",
        "When the loaded model will be unloaded if idle, from /api/ps `expires_at`; keep_alive -1 gives a "
        "date about 292 years ahead.", (M,)),
    Def("ollama_loaded_model_context_length", "gauge",
        "Context length in tokens allocated per slot for the loaded model, from /api/ps `context_length`.", (M,)),
    Def("ollama_model_loads_total", "counter",
        "Model loads seen by the exporter: a model appearing in /api/ps, or replaced there "
        "(new digest or context_length) between two polls.", (M,)),
    Def("ollama_model_unloads_total", "counter",
        "Model unloads seen by the exporter: a model leaving /api/ps, or replaced there between two polls.", (M,)),
    # the exporter itself
    Def("ollama_exporter_build_info", "gauge", "Version of ollama-exporter; always 1.", ("version",)),
    Def("ollama_exporter_source_up", "gauge",
        "1 if the last read of this source succeeded (version, ps, tags: Ollama's /api/<source>; "
        "show: every /api/show call the poll needed).", ("source",)),
    Def("ollama_exporter_source_duration_seconds", "gauge",
        "How long the last read of this source took.", ("source",)),
    Def("ollama_exporter_source_last_success_timestamp_seconds", "gauge",
        "When this source was last read successfully; data from a failing source is this old.", ("source",)),
    Def("ollama_exporter_source_errors_total", "counter",
        "Failed reads of this source by reason: timeout, connection, http_4xx, http_5xx, invalid_response.",
        ("source", "reason")),
    Def("ollama_exporter_snapshot_timestamp_seconds", "gauge",
        "When the poll that produced these metrics finished."),
)}


class SnapshotCollector(Collector):
    """A prometheus_client collector over whatever snapshot `latest` returns.

    describe() lists the families without touching any snapshot, so registering the collector (which
    calls describe) never waits on Ollama; collect() builds fresh families from the snapshot each time.
    """

    def __init__(self, latest: Callable[[], Snapshot]):
        self._latest = latest

    def describe(self) -> Iterator[Metric]:
        return (d.family() for d in DEFS.values())

    def collect(self) -> Iterator[Metric]:
        return collect(self._latest())


def _families(*names: str) -> list[Metric]:
    return [DEFS[n].family() for n in names]


def _opt(value: Optional[float]) -> bool:
    return value is not None


def collect(snapshot: Snapshot) -> Iterator[Metric]:
    """All metric families for one snapshot, built fresh (safe to call concurrently)."""
    yield from _server(snapshot)
    yield from _installed(snapshot)
    yield from _loaded(snapshot)
    yield from _exporter(snapshot)


def _server(s: Snapshot) -> Iterable[Metric]:
    up, build = _families("ollama_up", "ollama_build_info")
    up.add_metric([], 1.0 if s.up else 0.0)
    if s.version is not None:
        build.add_metric([s.version], 1.0)
    return up, build


def _installed(s: Snapshot) -> Iterable[Metric]:
    info, size, ctx, params, caps = _families(
        "ollama_model_info", "ollama_model_size_bytes", "ollama_model_context_length",
        "ollama_model_parameters", "ollama_model_capability")
    for m in s.installed:
        show, d = m.show, m.merged_details
        info.add_metric([m.name, m.digest, d.family, d.parameter_size, d.quantization_level, d.format], 1.0)
        size.add_metric([m.name], m.size)
        if show is not None and _opt(show.context_length):
            ctx.add_metric([m.name], show.context_length)
        if show is not None and _opt(show.parameter_count):
            params.add_metric([m.name], show.parameter_count)
        for cap in sorted(set(m.merged_capabilities)):
            caps.add_metric([m.name, cap], 1.0)
    return info, size, ctx, params, caps


def _loaded(s: Snapshot) -> Iterable[Metric]:
    size, vram, expiry, ctx = _families(
        "ollama_loaded_model_size_bytes", "ollama_loaded_model_vram_bytes",
        "ollama_loaded_model_expiry_timestamp_seconds", "ollama_loaded_model_context_length")
    for m in s.loaded:
        size.add_metric([m.name], m.size)
        if _opt(m.size_vram):
            vram.add_metric([m.name], m.size_vram)
        if _opt(m.expires_at):
            expiry.add_metric([m.name], m.expires_at)
        if _opt(m.context_length):
            ctx.add_metric([m.name], m.context_length)
    loads, unloads = _families("ollama_model_loads_total", "ollama_model_unloads_total")
    for name, value in sorted(s.loads_total.items()):
        loads.add_metric([name], value)
    for name, value in sorted(s.unloads_total.items()):
        unloads.add_metric([name], value)
    return size, vram, expiry, ctx, loads, unloads


def _exporter(s: Snapshot) -> Iterable[Metric]:
    build, up, duration, last, errors, ts = _families(
        "ollama_exporter_build_info", "ollama_exporter_source_up", "ollama_exporter_source_duration_seconds",
        "ollama_exporter_source_last_success_timestamp_seconds", "ollama_exporter_source_errors_total",
        "ollama_exporter_snapshot_timestamp_seconds")
    build.add_metric([__version__], 1.0)
    for src in s.sources:
        up.add_metric([src.name], 1.0 if src.up else 0.0)
        duration.add_metric([src.name], src.duration_seconds)
        if src.last_success is not None:
            last.add_metric([src.name], src.last_success)
    for (source, reason), value in sorted(s.errors_total.items()):
        errors.add_metric([source, reason], value)
    if s.ready:
        ts.add_metric([], s.timestamp)
    return build, up, duration, last, errors, ts

"""Every metric name, type, label set and help text, and the mapping from a Snapshot to metric families.

This is the only module that knows metric names. Help texts say which Ollama API field each value
comes from. Series exist only for what the snapshot holds, so a model that is no longer loaded or
installed loses its gauges on the next poll, and a model forgotten by the poller loses its counters.
A family here is plain data (label values and numbers); exposition.py turns families into bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from ollama_exporter import __version__
from ollama_exporter.shared import SharedValues
from ollama_exporter.snapshot import HistogramValue, Snapshot

KINDS = ("gauge", "counter", "histogram")


@dataclass(frozen=True)
class Def:
    name: str
    kind: str  # one of KINDS
    help: str
    labels: tuple[str, ...] = ()

    def family(self) -> "Family":
        return Family(self)


Value = Union[float, HistogramValue]


@dataclass
class Family:
    """The samples of one metric in one snapshot: (label values in Def.labels order, value) rows."""

    d: Def
    rows: list[tuple[tuple[str, ...], Value]] = field(default_factory=list)

    def add(self, labels: tuple[str, ...], value: Value) -> None:
        self.rows.append((labels, value))


M = "model"
G = ("gpu", "uuid")
MIG = G + ("gpu_instance", "mig_uuid")
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
    Def("ollama_model_keep_alive_downgrades_total", "counter",
        "Times a pinned model (/api/ps expires_at more than 20 years ahead, keep_alive -1) showed a finite "
        "expires_at in the next poll without leaving /api/ps: a reload without keep_alive, or a client's "
        "finite keep_alive, unpinned it.", (M,)),
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
    Def("ollama_exporter_dropped_models_total", "counter",
        "Model rows of /api/tags or /api/ps answers that were not reported, by reason: limit (over "
        "ollama.max_models), invalid (no usable name), duplicate (a name already in the answer).",
        ("source", "reason")),
    Def("ollama_exporter_snapshot_timestamp_seconds", "gauge",
        "When the poll that produced these metrics finished."),
    Def("ollama_exporter_config_last_reload_successful", "gauge",
        "1 if the last reload of --config.file and --web.config.file (SIGHUP or POST /-/reload) succeeded."),
    Def("ollama_exporter_config_last_reload_success_timestamp_seconds", "gauge",
        "When the configuration was last loaded successfully (at start or on reload)."),
    Def("ollama_exporter_render_failures_total", "counter",
        "Metric families that could not be rendered for a snapshot; their last good rendition was served."),
    # NVIDIA GPUs through NVML
    Def("ollama_gpu_nvml_up", "gauge",
        "1 if NVML (libnvidia-ml) is loaded and initialised and the last GPU sample completed, else 0."),
    Def("ollama_gpu_info", "gauge", "GPU identity from NVML (name, PCI bus id, driver version); always 1.",
        G + ("name", "pci_bus_id", "driver_version")),
    Def("ollama_gpu_up", "gauge", "1 if NVML answered for this GPU in the last sample, 0 if it is lost.", G),
    Def("ollama_gpu_memory_total_bytes", "gauge", "Total GPU memory, from nvmlDeviceGetMemoryInfo.", G),
    Def("ollama_gpu_memory_used_bytes", "gauge",
        "Used GPU memory, from nvmlDeviceGetMemoryInfo v2 (v1 on old drivers, which counts reserved memory).", G),
    Def("ollama_gpu_memory_free_bytes", "gauge", "Free GPU memory, from nvmlDeviceGetMemoryInfo.", G),
    Def("ollama_gpu_memory_reserved_bytes", "gauge",
        "GPU memory reserved by the driver, from nvmlDeviceGetMemoryInfo v2.", G),
    Def("ollama_gpu_utilization_ratio", "gauge",
        "Fraction of the last sample period in which a kernel ran, from nvmlDeviceGetUtilizationRates gpu.", G),
    Def("ollama_gpu_memory_activity_ratio", "gauge",
        "Fraction of the last sample period the memory controller was busy (not capacity), "
        "from nvmlDeviceGetUtilizationRates memory.", G),
    Def("ollama_gpu_temperature_celsius", "gauge", "GPU core temperature, from nvmlDeviceGetTemperature.", G),
    Def("ollama_gpu_power_watts", "gauge", "Power draw, from nvmlDeviceGetPowerUsage (mW).", G),
    Def("ollama_gpu_power_limit_watts", "gauge", "Enforced power limit, from nvmlDeviceGetEnforcedPowerLimit.", G),
    Def("ollama_gpu_energy_joules_total", "counter",
        "Energy used since the driver loaded, from nvmlDeviceGetTotalEnergyConsumption (mJ).", G),
    Def("ollama_gpu_clock_hertz", "gauge", "Current clock, from nvmlDeviceGetClockInfo (MHz).", G + ("clock",)),
    Def("ollama_gpu_performance_state", "gauge",
        "Performance state P0 (max) to P15, from nvmlDeviceGetPerformanceState.", G),
    Def("ollama_gpu_fan_speed_ratio", "gauge",
        "Fan speed as a fraction of its maximum (may exceed 1), from nvmlDeviceGetFanSpeed.", G),
    Def("ollama_gpu_throttle_active", "gauge",
        "1 if this clock-event (throttle) reason is active, from nvmlDeviceGetCurrentClocksEventReasons.",
        G + ("reason",)),
    Def("ollama_gpu_ecc_errors_total", "counter",
        "ECC memory errors since the driver loaded, from nvmlDeviceGetTotalEccErrors (volatile).", G + ("error",)),
    Def("ollama_gpu_mig_memory_total_bytes", "gauge",
        "Total memory of a MIG instance, from nvmlDeviceGetMemoryInfo on its MIG handle.", MIG),
    Def("ollama_gpu_mig_memory_used_bytes", "gauge",
        "Used memory of a MIG instance, from nvmlDeviceGetMemoryInfo on its MIG handle.", MIG),
    Def("ollama_gpu_mig_memory_free_bytes", "gauge",
        "Free memory of a MIG instance, from nvmlDeviceGetMemoryInfo on its MIG handle.", MIG),
    Def("ollama_gpu_processes", "gauge",
        "Compute processes on this GPU (its MIG instances included), from nvmlDeviceGetComputeRunningProcesses.", G),
    Def("ollama_loaded_model_gpu_memory_bytes", "gauge",
        "GPU memory the driver reports for this model's runner process (NVML usedGpuMemory), matched through "
        "the runner's --model blob and /api/show's FROM line; includes the CUDA context, so it exceeds "
        "/api/ps size_vram.", (M, "gpu", "uuid")),
    # active probes (prober.py): what a user of the model feels
    Def("ollama_probe_ttft_seconds", "histogram",
        "Client-observed time from sending a probe's /api/generate request to the first chunk with `response` "
        "or `thinking` text.", (M,)),
    Def("ollama_probe_tpot_seconds", "histogram",
        "Client-observed time per output token of a probe's /api/generate stream: (last token chunk - first) "
        "/ (token chunks - 1).", (M,)),
    Def("ollama_probe_duration_seconds", "histogram",
        "Client-observed end-to-end time of a probe, until /api/generate's `done` chunk or /api/embed's answer.",
        (M,)),
    Def("ollama_probe_prompt_eval_tokens_total", "counter",
        "Prompt tokens of successful probes, from /api/generate `prompt_eval_count`.", (M,)),
    Def("ollama_probe_prompt_eval_duration_seconds_total", "counter",
        "Prompt processing time of successful probes, from /api/generate `prompt_eval_duration`.", (M,)),
    Def("ollama_probe_eval_tokens_total", "counter",
        "Generated tokens of successful probes, from /api/generate `eval_count`.", (M,)),
    Def("ollama_probe_eval_duration_seconds_total", "counter",
        "Generation time of successful probes, from /api/generate `eval_duration`; "
        "rate(eval_tokens)/rate(this) is tokens per second.", (M,)),
    Def("ollama_probe_queue_wait_seconds", "histogram",
        "Time a probe waited for a slot of an already loaded model: /api/generate total_duration - "
        "load_duration - prompt_eval_duration - eval_duration. Long waits mean users were using the model.",
        (M,)),
    Def("ollama_probe_load_duration_seconds_total", "counter",
        "Time to obtain a runner in successful probes (load and queueing), from /api/generate `load_duration`.",
        (M,)),
    Def("ollama_probes_total", "counter", "Probes sent (/api/generate or /api/embed), failed ones included.", (M,)),
    Def("ollama_probe_failures_total", "counter",
        "Failed probes by reason, from the /api/generate or /api/embed status, error text or stream.",
        (M, "reason")),
    Def("ollama_probe_skipped_total", "counter",
        "Probes not sent by reason, at most once per probe interval: not_loaded (not in /api/ps right before "
        "sending, reloaded by a user, or about to expire), idle (finite keep_alive, no traffic since the last "
        "probe), active (used within the last interval), backoff (its last probes waited for a slot), "
        "in_progress, unsupported (no completion or embedding capability), unsupported_version (Ollama before "
        "0.2.0 resets keep_alive on every request), remote (a cloud model), reload_risk (every num_ctx choice "
        "reloaded it: not probed again until a user changes it).", (M, "reason")),
    Def("ollama_probe_caused_loads_total", "counter",
        "Probes that made Ollama load or reload the model: load_duration of 0.1 s or more although /api/ps "
        "showed it resident right before.", (M,)),
    Def("ollama_probe_keep_alive_restores_total", "counter",
        "Pins restored after a probe reloaded a keep_alive -1 model (the new runner got OLLAMA_KEEP_ALIVE): "
        "one load-only /api/generate (or /api/embed) request with keep_alive -1 and the probe's options.", (M,)),
    Def("ollama_probe_success", "gauge", "1 if the last probe of the model succeeded (/api/generate or /api/embed).",
        (M,)),
    Def("ollama_probe_last_timestamp_seconds", "gauge",
        "When the last probe (/api/generate or /api/embed) of the model finished.", (M,)),
    # real traffic from Ollama's own log (logs source: logparse, traffic)
    Def("ollama_http_requests_total", "counter",
        "Requests Ollama served, from its gin access log line (every version); route is the registered route "
        "or `other` (query strings dropped). The exporter's own requests are not included.",
        ("route", "method", "code")),
    Def("ollama_http_request_duration_seconds", "histogram",
        "End-to-end time of each request from the gin access log line: queueing, model load, prompt and the "
        "whole stream (above a minute gin prints whole seconds).", ("route", "code_class")),
    Def("ollama_http_exporter_requests_total", "counter",
        "The exporter's own requests (probes and polls): gin access log lines whose client is "
        "probes.forwarded_for, the X-Forwarded-For the exporter sends.", ("route", "code")),
    Def("ollama_http_client_disconnects_total", "counter",
        "Clients that gave up: scheduling_or_load (gin 499: while the request was scheduled or its model "
        "loaded), waiting_for_slot (slog `aborting ... due to client closing the connection`).", ("stage",)),
    Def("ollama_model_load_duration_seconds", "histogram",
        "Model load time: the first `llama-server started in N seconds` (`llama runner started in`) after "
        "each runner start line.", (M,)),
    Def("ollama_model_load_failures_total", "counter",
        "Failed model loads (`Load failed`, `error loading llama server`, a client leaving during the load) by "
        "reason: oom, timeout, client_gone, other.", (M, "reason")),
    Def("ollama_runner_crashes_total", "counter",
        "Runners that died (`llama-server terminated`, `llama runner terminated`).", (M,)),
    Def("ollama_runtime_oom_events_total", "counter",
        "Runtime out-of-memory events (`runtime OOM detected`, v0.30+): Ollama then unloads every model."),
    Def("ollama_prompt_truncations_total", "counter",
        "Prompts longer than the context, cut by Ollama (`truncating input prompt`)."),
    Def("ollama_request_prompt_tokens_total", "counter",
        "Prompt tokens of finished requests, from llama-server's lines (v0.30+): cache=miss were processed "
        "(`prompt eval time ... / N tokens`), cache=hit came from the prompt cache (`task.n_tokens` - N). "
        "Includes the exporter's probes.", (M, "cache")),
    Def("ollama_request_generated_tokens_total", "counter",
        "Generated tokens of finished requests, from llama-server's `eval time ... / N tokens` (v0.30+). "
        "Includes the exporter's probes.", (M,)),
    Def("ollama_request_prefill_duration_seconds", "histogram",
        "Server-side prompt processing time per request, llama-server's `prompt eval time` (v0.30+): no "
        "queueing, load or template time.", (M,)),
    Def("ollama_request_time_per_output_token_seconds", "histogram",
        "Server-side decode time per generated token per request, llama-server's `eval time` / tokens (v0.30+).",
        (M,)),
    Def("ollama_request_completions_total", "counter",
        "Requests a runner finished normally (timings printed, then `stop processing`), by whether the context "
        "was truncated (v0.30+).", (M, "truncated")),
    Def("ollama_request_untimed_total", "counter",
        "Requests a runner ended (`stop processing`) without printing timings first (v0.30+): embeddings, and "
        "generations stopped early because the client went away.", (M,)),
    Def("ollama_exporter_log_lines_total", "counter",
        "Log lines read by result: parsed (an event), ignored (nothing to count), malformed (a known format "
        "that did not parse, or a line over 64 KiB: growth means the format changed).", ("result",)),
    Def("ollama_exporter_log_lines_dropped_total", "counter",
        "Log lines lost before parsing: overflow (the exporter fell behind a pipe), journal_rate_limit "
        "(journald's `Suppressed N messages`).", ("reason",)),
    # runner slots (runners source: runner_slots)
    Def("ollama_runner_slots", "gauge",
        "Parallel request slots of the model's runner: llama-server /slots (or /props total_slots), v0.30+; "
        "/health slots_idle + slots_processing, v0.1.32-v0.3.x.", (M,)),
    Def("ollama_runner_slots_busy", "gauge",
        "Slots processing a request (running requests): /slots is_processing, or /health slots_processing.", (M,)),
    Def("ollama_runner_slot_context_tokens", "gauge", "Context size of one slot, from /slots n_ctx.", (M, "slot")),
    Def("ollama_runner_slot_context_used_tokens", "gauge",
        "Context used by the request in one slot, from /slots n_past (or n_prompt_tokens + n_decoded); 0 when "
        "idle.",
        (M, "slot")),
    Def("ollama_exporter_gpu_processes_unattributed", "gauge",
        "GPU compute processes not attributed to a model, by reason: unreadable (no /proc/<pid>/cmdline, e.g. "
        "another PID namespace), loading (runner not in /api/ps yet), other (not an Ollama runner).", ("reason",)),
)}


def _families(*names: str) -> list[Family]:
    return [DEFS[n].family() for n in names]


def _opt(value: Optional[float]) -> bool:
    return value is not None


class Sections:
    """The families built for the last snapshot, for collect() to reuse where the inputs did not change.

    Between two polls almost nothing changes: the inventory (thousands of rows at 2 000 models), the
    event counters, the results of models not probed since. The poller and the prober hand over the
    very same objects for what did not change, so telling a section unchanged usually costs identity
    checks (an equality test otherwise), and its families come back as the same objects, which the
    writer recognises without comparing their rows. One per Exposition; not for concurrent use.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[tuple, list[Family]]] = {}
        self._rows: dict[str, dict[str, tuple]] = {}  # section -> model -> (its inputs, *its rows)
        self.counts = SharedValues()  # one copy of each equal tuple of a model's event counts (shared.py)

    def get(self, name: str, inputs: tuple, build: Callable[[], Iterable[Family]]) -> list[Family]:
        return _reused(self._last, name, inputs, lambda: list(build()))

    def model_rows(self, section: str, models: Iterable[tuple[str, object]],
                   build: Callable[[str, Any], list]) -> list:
        """The rows of every (model, inputs) in order, as build() makes them: family name, row, family
        name, row... (flat: a pair each would be one more object per series). A model whose inputs did
        not change keeps its rows from last time (the same objects: the writer then compares nothing,
        and a changed section does not hold a second copy of every row while it is built); models no
        longer listed are forgotten. Each model's are kept as one tuple, (inputs, family, row, ...)."""
        last, kept, rows = self._rows.get(section, {}), {}, []
        for model, inputs in models:
            got = last.get(model)
            if not _unchanged(got, inputs):
                got = (inputs, *build(model, inputs))
            kept[model] = got
            rows += got[1:]
        self._rows[section] = kept
        return rows


def _unchanged(last: Optional[tuple], inputs: object) -> bool:
    """Whether what was built from last[0] still holds for `inputs`: the same object, or equal."""
    return last is not None and (last[0] is inputs or last[0] == inputs)


def _reused(store: dict, key: str, inputs: object, build: Callable[[], Any]) -> Any:
    """What `build` made for `key` last time, while `inputs` is the same object or equal; else build anew."""
    last = store.get(key)
    if not _unchanged(last, inputs):
        last = store[key] = (inputs, build())
    return last[1]


def collect(snapshot: Snapshot, sections: Optional[Sections] = None) -> Iterator[Family]:
    """All metric families for one snapshot; built fresh (safe to call concurrently) unless `sections`
    remembers those of an earlier snapshot."""
    s, memo = snapshot, sections or Sections()
    yield from _server(s)
    yield from memo.get("installed", (s.installed,), lambda: _installed(s, memo))
    yield from memo.get("loaded", (s.loaded,), lambda: _loaded(s, memo))
    yield from memo.get("events", (s.loads_total, s.unloads_total, s.keep_alive_downgrades_total),
                        lambda: _events(s, memo))
    yield from _exporter(s)
    if s.gpu is not None:
        yield from memo.get("gpu", (s.gpu, s.model_gpu_memory, s.gpu_unattributed), lambda: _gpu(s))
    if s.probes is not None:
        yield from memo.get("probes", (s.probes,), lambda: _probes(s, memo))
    if s.traffic is not None:
        yield from _traffic(s.traffic)
    if s.runners is not None:
        yield from _runners(s.runners)


def _server(s: Snapshot) -> Iterable[Family]:
    up, build = _families("ollama_up", "ollama_build_info")
    up.add((), 1.0 if s.up else 0.0)
    if s.version is not None:
        build.add((s.version,), 1.0)
    return up, build


_INSTALLED = ("ollama_model_info", "ollama_model_size_bytes", "ollama_model_context_length",
              "ollama_model_parameters", "ollama_model_capability")
_LOADED = ("ollama_loaded_model_size_bytes", "ollama_loaded_model_vram_bytes",
           "ollama_loaded_model_expiry_timestamp_seconds", "ollama_loaded_model_context_length")
_EVENTS = ("ollama_model_loads_total", "ollama_model_unloads_total", "ollama_model_keep_alive_downgrades_total")


def _by_model(names: tuple[str, ...], flat: list) -> list[Family]:
    """The families `names`, filled from Sections.model_rows: family name, row, family name, row..."""
    f = dict(zip(names, _families(*names)))
    pairs = iter(flat)
    for name, row in zip(pairs, pairs):
        f[name].rows.append(row)
    return list(f.values())


def _installed(s: Snapshot, memo: Sections) -> list[Family]:
    return _by_model(_INSTALLED, memo.model_rows("installed", ((m.name, m) for m in s.installed), _installed_rows))


def _installed_rows(name: str, m) -> list:
    show, d, n = m.show, m.merged_details, (name,)
    rows = ["ollama_model_info", ((name, m.digest, d.family, d.parameter_size, d.quantization_level, d.format), 1.0)]
    if _opt(m.size):
        rows += ["ollama_model_size_bytes", (n, m.size)]
    if show is not None and _opt(show.context_length):
        rows += ["ollama_model_context_length", (n, show.context_length)]
    if show is not None and _opt(show.parameter_count):
        rows += ["ollama_model_parameters", (n, show.parameter_count)]
    for cap in sorted(set(m.merged_capabilities)):
        rows += ["ollama_model_capability", ((name, cap), 1.0)]
    return rows


def _loaded(s: Snapshot, memo: Sections) -> list[Family]:
    return _by_model(_LOADED, memo.model_rows("loaded", ((m.name, m) for m in s.loaded), _loaded_rows))


def _loaded_rows(name: str, m) -> list:
    return _flat(_LOADED, (name,), (m.size, m.size_vram, m.expires_at, m.context_length))


def _flat(families: tuple[str, ...], labels: tuple, values: tuple) -> list:
    """family, (labels, value), ... for the values that are there."""
    rows: list = []
    for family, value in zip(families, values):
        if _opt(value):
            rows += [family, (labels, value)]
    return rows


def _events(s: Snapshot, memo: Sections) -> list[Family]:
    counts = (s.loads_total, s.unloads_total, s.keep_alive_downgrades_total)
    names = sorted(set().union(*counts))
    return _by_model(_EVENTS, memo.model_rows(
        "events", ((name, memo.counts(tuple(c.get(name) for c in counts))) for name in names), _event_rows))


def _event_rows(name: str, values: tuple) -> list:
    return _flat(_EVENTS, (name,), values)


def _exporter(s: Snapshot) -> Iterable[Family]:
    build, up, duration, last, errors, ts = _families(
        "ollama_exporter_build_info", "ollama_exporter_source_up", "ollama_exporter_source_duration_seconds",
        "ollama_exporter_source_last_success_timestamp_seconds", "ollama_exporter_source_errors_total",
        "ollama_exporter_snapshot_timestamp_seconds")
    build.add((__version__,), 1.0)
    for src in s.sources:
        up.add((src.name,), 1.0 if src.up else 0.0)
        duration.add((src.name,), src.duration_seconds)
        if src.last_success is not None:
            last.add((src.name,), src.last_success)
    for (source, reason), value in sorted(s.errors_total.items()):
        errors.add((source, reason), value)
    dropped = DEFS["ollama_exporter_dropped_models_total"].family()
    for (source, reason), value in sorted(s.dropped_total.items()):
        dropped.add((source, reason), value)
    if s.ready:
        ts.add((), s.timestamp)
    families = [build, up, duration, last, errors, dropped, ts]
    if s.reload is not None:
        ok, when = _families("ollama_exporter_config_last_reload_successful",
                             "ollama_exporter_config_last_reload_success_timestamp_seconds")
        ok.add((), 1.0 if s.reload.ok else 0.0)
        when.add((), s.reload.last_success)
        families += [ok, when]
    return families


# (metric, GpuDevice attribute) for the plain per-GPU gauges and counters
_GPU_VALUES = (
    ("ollama_gpu_memory_total_bytes", "memory_total"), ("ollama_gpu_memory_used_bytes", "memory_used"),
    ("ollama_gpu_memory_free_bytes", "memory_free"), ("ollama_gpu_memory_reserved_bytes", "memory_reserved"),
    ("ollama_gpu_utilization_ratio", "utilization"), ("ollama_gpu_memory_activity_ratio", "memory_activity"),
    ("ollama_gpu_temperature_celsius", "temperature"), ("ollama_gpu_power_watts", "power"),
    ("ollama_gpu_power_limit_watts", "power_limit"), ("ollama_gpu_energy_joules_total", "energy"),
    ("ollama_gpu_performance_state", "performance_state"), ("ollama_gpu_fan_speed_ratio", "fan_speed"),
)


def _gpu(s: Snapshot) -> Iterable[Family]:
    gpu = s.gpu
    nvml_up, info, up, clock, throttle, ecc, procs, model_mem, unattributed = _families(
        "ollama_gpu_nvml_up", "ollama_gpu_info", "ollama_gpu_up", "ollama_gpu_clock_hertz",
        "ollama_gpu_throttle_active", "ollama_gpu_ecc_errors_total", "ollama_gpu_processes",
        "ollama_loaded_model_gpu_memory_bytes", "ollama_exporter_gpu_processes_unattributed")
    values = {name: DEFS[name].family() for name, _ in _GPU_VALUES}
    mig = _families("ollama_gpu_mig_memory_total_bytes", "ollama_gpu_mig_memory_used_bytes",
                    "ollama_gpu_mig_memory_free_bytes")
    nvml_up.add((), 1.0 if gpu.nvml_up else 0.0)
    if not gpu.devices:
        return [nvml_up]  # no GPU known: say only that, not a page of empty families
    for d in gpu.devices:
        g = (str(d.index), d.uuid)
        info.add(g + (d.name, d.pci_bus_id, gpu.driver_version), 1.0)
        up.add(g, 1.0 if d.up else 0.0)
        if not d.up:
            continue
        for name, attr in _GPU_VALUES:
            if _opt(getattr(d, attr)):
                values[name].add(g, getattr(d, attr))
        for name, hertz in d.clocks:
            clock.add(g + (name,), hertz)
        for reason, active in d.throttle:
            throttle.add(g + (reason,), 1.0 if active else 0.0)
        for kind, count in d.ecc_errors:
            ecc.add(g + (kind,), count)
        for m in d.mig:
            for family, value in zip(mig, (m.memory_total, m.memory_used, m.memory_free)):
                if _opt(value):
                    family.add(g + (str(m.gpu_instance), m.uuid), value)
        procs.add(g, len(d.processes))
    for row in s.model_gpu_memory:
        model_mem.add((row.model, row.gpu, row.uuid), row.bytes)
    for reason, count in sorted(s.gpu_unattributed.items()):
        unattributed.add((reason,), count)
    return [nvml_up, info, up, *values.values(), clock, throttle, ecc, *mig, procs, model_mem, unattributed]


_PROBE_FAMILIES = (
    "ollama_probe_ttft_seconds", "ollama_probe_tpot_seconds", "ollama_probe_duration_seconds",
    "ollama_probe_queue_wait_seconds", "ollama_probe_prompt_eval_tokens_total",
    "ollama_probe_prompt_eval_duration_seconds_total", "ollama_probe_eval_tokens_total",
    "ollama_probe_eval_duration_seconds_total", "ollama_probe_load_duration_seconds_total", "ollama_probes_total",
    "ollama_probe_failures_total", "ollama_probe_skipped_total", "ollama_probe_caused_loads_total",
    "ollama_probe_keep_alive_restores_total", "ollama_probe_success", "ollama_probe_last_timestamp_seconds")


def _probes(s: Snapshot, memo: Sections) -> list[Family]:
    """The probe families, model by model; a model whose results did not change reuses its rows."""
    return _by_model(_PROBE_FAMILIES, memo.model_rows("probes", sorted(s.probes.items()), _probe_rows))


def _probe_rows(model: str, p) -> list:
    """family name, row, ... (see Sections.model_rows) for one model's probe results (a prober.ModelProbeStats)."""
    m, rows = (model,), []
    if p.probes:
        rows.append(("ollama_probe_duration_seconds", (m, p.duration)))
        if p.kind == "generate":
            rows += [("ollama_probe_ttft_seconds", (m, p.ttft)), ("ollama_probe_tpot_seconds", (m, p.tpot)),
                     ("ollama_probe_queue_wait_seconds", (m, p.queue_wait))]
            for name, value in (("prompt_eval_tokens", p.prompt_eval_tokens),
                                ("prompt_eval_duration_seconds", p.prompt_eval_seconds),
                                ("eval_tokens", p.eval_tokens), ("eval_duration_seconds", p.eval_seconds),
                                ("load_duration_seconds", p.load_seconds)):
                rows.append((f"ollama_probe_{name}_total", (m, value)))
        rows += [("ollama_probes_total", (m, p.probes)), ("ollama_probe_caused_loads_total", (m, p.caused_loads)),
                 ("ollama_probe_keep_alive_restores_total", (m, p.keep_alive_restores))]
        rows += [("ollama_probe_failures_total", (m + (reason,), count)) for reason, count in p.failures.items()]
    rows += [("ollama_probe_skipped_total", (m + (reason,), count)) for reason, count in p.skipped.items()]
    if p.last_success is not None:
        rows += [("ollama_probe_success", (m, 1.0 if p.last_success else 0.0)),
                 ("ollama_probe_last_timestamp_seconds", (m, p.last_timestamp))]
    return [item for pair in rows for item in pair]


# (metric, TrafficValue attribute) of the log's counters and histograms, each keyed by its label tuple
_TRAFFIC_COUNTERS = (
    ("ollama_http_requests_total", "requests"), ("ollama_http_exporter_requests_total", "own_requests"),
    ("ollama_http_client_disconnects_total", "disconnects"), ("ollama_model_load_failures_total", "load_failures"),
    ("ollama_runner_crashes_total", "runner_crashes"), ("ollama_request_prompt_tokens_total", "prompt_tokens"),
    ("ollama_request_generated_tokens_total", "generated_tokens"),
    ("ollama_request_completions_total", "completions"), ("ollama_request_untimed_total", "without_timings"),
    ("ollama_exporter_log_lines_total", "lines"), ("ollama_exporter_log_lines_dropped_total", "dropped"),
)
_TRAFFIC_HISTOGRAMS = (
    ("ollama_http_request_duration_seconds", "durations"), ("ollama_model_load_duration_seconds", "load_durations"),
    ("ollama_request_prefill_duration_seconds", "prefill"),
    ("ollama_request_time_per_output_token_seconds", "tpot"),
)


def _label_list(key) -> tuple[str, ...]:
    return tuple(key) if isinstance(key, tuple) else (key,)


def _traffic(t) -> Iterable[Family]:
    families = []
    for name, attr in _TRAFFIC_COUNTERS + _TRAFFIC_HISTOGRAMS:
        family = DEFS[name].family()
        for key, value in sorted(getattr(t, attr).items()):
            family.add(_label_list(key), value)
        families.append(family)
    oom, truncations = _families("ollama_runtime_oom_events_total", "ollama_prompt_truncations_total")
    oom.add((), t.runtime_ooms)
    truncations.add((), t.prompt_truncations)
    return families + [oom, truncations]


def _runners(r) -> Iterable[Family]:
    slots, busy, ctx, used = _families("ollama_runner_slots", "ollama_runner_slots_busy",
                                       "ollama_runner_slot_context_tokens", "ollama_runner_slot_context_used_tokens")
    for sample in r.runners:
        m = (sample.model,)
        if sample.slots is not None:
            slots.add(m, sample.slots)
        if sample.busy is not None:
            busy.add(m, sample.busy)
        for slot in sample.slot_states:
            if slot.context_tokens is not None:
                ctx.add(m + (str(slot.id),), slot.context_tokens)
            if slot.used_tokens is not None:
                used.add(m + (str(slot.id),), slot.used_tokens)
    return slots, busy, ctx, used

"""The Grafana dashboard, built with Grafana's typed builders (grafana-foundation-sdk, Grafana 11 schema).

One dashboard, uid from the config: a fleet table (one line per Ollama host, whatever their number),
then overview, latency, throughput, models, GPU and (collapsed) probe rows. Every query carries the
config's selector and the `$instance` (and `$model`, `$gpu`) variables; every panel has a unit and a
description; every panel and query uses the `datasource` variable, so file provisioning and the
Kubernetes sidecar need no `__inputs`. Alert thresholds are drawn as `vector(<literal>)` series from
the same config the alerts are generated from, so the dashed lines and the alerts agree.

Importing this module needs the `mixin` extra; the daemon never imports it.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional

from grafana_foundation_sdk.builders import stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders.common import (
    ReduceDataOptions, StackingConfig, VizLegendOptions, VizTooltipOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard, DatasourceVariable, QueryVariable, Row, ThresholdsConfig, TimePicker,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync, DataSourceRef, DataTransformerConfig, DynamicConfigValue, Threshold, ThresholdsMode,
    ValueMap, ValueMappingResult, VariableOption, VariableRefresh, VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from ollama_exporter.mixin.config import MixinConfig
from ollama_exporter.mixin.rules import GENERATION_ROUTES, num, percent

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
I, M, G = 'instance=~"$instance"', 'model=~"$model"', 'gpu=~"$gpu"'
RATE = "[$__rate_interval]"

_DASHED = [DynamicConfigValue("custom.lineStyle", {"fill": "dash", "dash": [10, 10]}),
           DynamicConfigValue("custom.fillOpacity", 0)]
_THRESHOLD_LINE = [DynamicConfigValue("color", {"mode": "fixed", "fixedColor": "red"}), *_DASHED,
                   DynamicConfigValue("custom.lineWidth", 2)]


def _mapping(**texts: tuple[str, str]) -> list[ValueMap]:
    """Value mappings {"0": ("DOWN", "red"), ...} for stat panels and table cells."""
    return [ValueMap({value: ValueMappingResult(text=text, color=color, index=i)
                      for i, (value, (text, color)) in enumerate(sorted(texts.items()))})]


UP_DOWN = _mapping(**{"0": ("DOWN", "red"), "1": ("UP", "green")})


def _steps(*steps: tuple[Optional[float], str]) -> ThresholdsConfig:
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(value=v, color=c) for v, c in steps])


RED_BELOW_ONE = _steps((None, "red"), (1, "green"))


def query(expr: str, legend: Optional[str] = None, *, instant: bool = False, table_format: bool = False) -> Dataquery:
    q = Dataquery().expr(expr).datasource(DS)
    if legend:
        q = q.legend_format(legend)
    if table_format:
        return q.format(PromQueryFormat.TABLE).instant()
    return q.instant() if instant else q.range()


def _common(panel, title: str, unit: str, description: str, targets: Iterable[Dataquery], size: tuple[int, int]):
    panel = panel.title(title).unit(unit).description(description).datasource(DS).span(size[0]).height(size[1])
    for ref, target in zip("ABCDEFGHIJ", targets):
        panel = panel.with_target(target.ref_id(ref))
    return panel


def graph(title: str, unit: str, description: str, targets: Iterable[Dataquery], size=(8, 8), *,
          soft_min: bool = True, bars: bool = False, fill: int = 10) -> timeseries.Panel:
    """A time series panel with the dashboard's house style (legend list at the bottom, tooltip all series)."""
    p = _common(timeseries.Panel(), title, unit, description, targets, size)
    p = (p.fill_opacity(60 if bars else fill).show_points(common.VisibilityMode.NEVER)
         .legend(VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                 .placement(common.LegendPlacement.BOTTOM).show_legend(True))
         .tooltip(VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)))
    if bars:
        p = p.draw_style(common.GraphDrawStyle.BARS)
    return p.axis_soft_min(0) if soft_min else p


def single(title: str, unit: str, description: str, targets: Iterable[Dataquery], size=(3, 4), *,
           text: common.BigValueTextMode = common.BigValueTextMode.AUTO, mappings: Optional[list] = None,
           thresholds: Optional[ThresholdsConfig] = None, fields: str = "", values: bool = False) -> stat.Panel:
    """A stat panel: the last value of each series; coloured background when it has mappings/thresholds."""
    p = _common(stat.Panel(), title, unit, description, targets, size)
    coloured = bool(mappings or thresholds)
    p = (p.reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).fields(fields).values(values))
         .text_mode(text).graph_mode(common.BigValueGraphMode.NONE)
         .color_mode(common.BigValueColorMode.BACKGROUND if coloured else common.BigValueColorMode.NONE))
    if mappings:
        p = p.mappings(mappings)
    return p.thresholds(thresholds or RED_BELOW_ONE if mappings else thresholds or _steps((None, "green")))


def grid(title: str, unit: str, description: str, targets: Iterable[Dataquery], size=(24, 7), *,
         transformations: Iterable[DataTransformerConfig] = (),
         columns: Optional[dict[str, list[DynamicConfigValue]]] = None) -> table.Panel:
    """A table of instant queries; `columns` overrides settings (unit, colours) of named columns."""
    p = _common(table.Panel(), title, unit, description, targets, size).cell_height(common.TableCellHeight.SM)
    for t in transformations:
        p = p.with_transformation(t)
    for column, properties in (columns or {}).items():
        p = p.override_by_name(column, properties)
    return p


def unit(name: str) -> list[DynamicConfigValue]:
    return [DynamicConfigValue("unit", name)]


def merge_and_organize(exclude: Iterable[str], rename: dict[str, str], order: list[str]) -> list[DataTransformerConfig]:
    """Join instant-query frames on their shared label columns, then hide, rename and order columns."""
    return [DataTransformerConfig("merge", options={}),
            DataTransformerConfig("organize", options={
                "excludeByName": {name: True for name in ("Time", "job", "__name__", *exclude)},
                "renameByName": rename, "indexByName": {name: i for i, name in enumerate(order)}})]


class Builder:
    """Holds the config while the rows are built; `s(...)` is a selector with the config's matchers."""

    def __init__(self, config: MixinConfig):
        self.c = config
        self.t = config.thresholds

    def s(self, *extra: str) -> str:
        return self.c.matchers(*extra)

    def threshold(self, value: float, legend: str = "threshold") -> Dataquery:
        return query(f"vector({num(value)})", legend)

    # ------------------------------------------------------------------------------------------ rows

    def fleet(self) -> list:
        s, t = self.s, self.t
        p99 = (f"max by (instance) (histogram_quantile(0.99, sum by (instance, model, le) "
               f"(rate(ollama_probe_duration_seconds_bucket{s(I)}[5m]))))")
        up_down = [DynamicConfigValue("custom.cellOptions", {"type": "color-background"}),
                   DynamicConfigValue("mappings", UP_DOWN), DynamicConfigValue("thresholds", RED_BELOW_ONE.build())]

        def red_above(limit: float) -> list[DynamicConfigValue]:
            return [DynamicConfigValue("custom.cellOptions", {"type": "color-text"}),
                    DynamicConfigValue("thresholds", _steps((None, "text"), (limit, "red")).build())]

        names = {"Value #A": "Exporter", "Value #B": "Ollama", "Value #D": "Loaded models",
                   "Value #E": "VRAM used", "Value #F": "Probe P99", "Value #G": "Probe failures"}
        hosts = grid(
            "Ollama hosts", "none",
            "One line per Ollama host (instance), however many there are: the exporter scraped (up), Ollama "
            "answering (ollama_up), its version (ollama_build_info), models loaded now, the fullest GPU's "
            f"memory in use (red above the {percent(t['gpu_memory_ratio'])} alert threshold), the worst "
            "model's P99 end-to-end probe time over 5 minutes (red above "
            f"{num(t['latency_p99_seconds'])} s) and the share of probes that failed over 5 minutes. "
            "Sort by a column to find the host to look at.",
            [query(f"max by (instance) (up{s(I)})", table_format=True),
             query(f"max by (instance) (ollama_up{s(I)})", table_format=True),
             query(f"max by (instance, version) (ollama_build_info{s(I)})", table_format=True),
             query(f"count by (instance) (ollama_loaded_model_size_bytes{s(I)}) "
                   f"or max by (instance) (0 * ollama_up{s(I)})", table_format=True),
             query(f"max by (instance) (ollama_gpu_memory_used_bytes{s(I)} / ollama_gpu_memory_total_bytes{s(I)})",
                   table_format=True),
             query(p99, table_format=True),
             query(f"sum by (instance) (rate(ollama_probe_failures_total{s(I)}[5m])) "
                   f"/ sum by (instance) (rate(ollama_probes_total{s(I)}[5m]))", table_format=True)],
            (24, 8),
            transformations=merge_and_organize(
                ["Value #C"], names,
                ["instance", "Value #A", "Value #B", "version", "Value #D", "Value #E", "Value #F", "Value #G"]),
            columns={"Exporter": up_down, "Ollama": up_down, "Loaded models": unit("short"),
                     "VRAM used": unit("percentunit") + red_above(t["gpu_memory_ratio"]),
                     "Probe P99": unit("s") + red_above(t["latency_p99_seconds"]),
                     "Probe failures": unit("percentunit")})
        return [hosts]

    def overview(self) -> list:
        s = self.s
        zero = f"max by (instance) (0 * ollama_up{s(I)})"
        return [
            single("Ollama up", "none",
                   "ollama_up: 1 if the exporter's last poll got valid answers from Ollama's /api/version and "
                   "/api/ps, else 0. The exporter keeps answering while Ollama is down; why it failed is in "
                   "Source errors.", [query(f"ollama_up{s(I)}", "{{instance}}")], mappings=UP_DOWN),
            single("Ollama version", "none",
                   "The `version` label of ollama_build_info, from Ollama's /api/version (the last known value "
                   "while Ollama is down), one per instance.",
                   [query(f"ollama_build_info{s(I)}", "{{instance}}")], (4, 4),
                   text=common.BigValueTextMode.VALUE, fields="/^version$/", values=True),
            single("Exporter version", "none",
                   "The `version` label of ollama_exporter_build_info: the ollama-exporter release serving "
                   "/metrics.", [query(f"ollama_exporter_build_info{s(I)}", "{{instance}}")],
                   text=common.BigValueTextMode.VALUE, fields="/^version$/", values=True),
            single("Loaded models", "short",
                   "Models resident in memory now: the number of ollama_loaded_model_size_bytes series (one per "
                   "model in Ollama's /api/ps). 0 when nothing is loaded.",
                   [query(f"count by (instance) (ollama_loaded_model_size_bytes{s(I, M)}) or {zero}",
                          "{{instance}}")]),
            single("Installed models", "short",
                   "Models installed on disk: the number of ollama_model_info series (one per model in Ollama's "
                   "/api/tags).",
                   [query(f"count by (instance) (ollama_model_info{s(I, M)}) or {zero}", "{{instance}}")]),
            single("GPUs up", "short",
                   "GPUs NVML answers for (sum of ollama_gpu_up). 0 on a host without NVML (ollama_gpu_nvml_up "
                   "is then the only GPU series). A lost GPU drops this count; see the GPU row.",
                   [query(f"sum by (instance) (ollama_gpu_up{s(I, G)}) "
                          f"or max by (instance) (0 * ollama_gpu_nvml_up{s(I)})", "{{instance}}")]),
            single("Probe success", "none",
                   "ollama_probe_success per model: 1 if the exporter's last latency probe (/api/generate, or "
                   "/api/embed for embedding models) succeeded. Only probed (resident) models appear.",
                   [query(f"ollama_probe_success{s(I, M)}", "{{model}}")], (5, 4),
                   mappings=_mapping(**{"0": ("FAILING", "red"), "1": ("OK", "green")})),
            single("Source health", "none",
                   "ollama_exporter_source_up per source: 1 if the exporter's last read succeeded (version, ps, "
                   "tags: Ollama's /api/<source>; show: the /api/show calls; gpu: NVML).",
                   [query(f"ollama_exporter_source_up{s(I)}", "{{instance}} {{source}}")], (8, 6),
                   mappings=UP_DOWN),
            graph("Data age", "s",
                  "How old the data is: time() - ollama_exporter_source_last_success_timestamp_seconds per source "
                  "(data from a failing source is this old), and time() - "
                  "ollama_exporter_snapshot_timestamp_seconds (age of the poll behind /metrics), normally below "
                  "the poll interval. The dashed line is the OllamaExporterPollStalled threshold "
                  f"({num(self.t['snapshot_age_seconds'])} s).",
                  [query(f"time() - ollama_exporter_source_last_success_timestamp_seconds{s(I)}",
                         "{{instance}} {{source}}"),
                   query(f"time() - ollama_exporter_snapshot_timestamp_seconds{s(I)}", "{{instance}} snapshot"),
                   self.threshold(self.t["snapshot_age_seconds"], "stall threshold")], (8, 6))
            .override_by_regexp(".*threshold$", _THRESHOLD_LINE),
            graph("Source errors", "short",
                  "Failed reads per second by source and reason (timeout, connection, http_4xx, http_5xx, "
                  "invalid_response; NVML reasons for gpu), from rate(ollama_exporter_source_errors_total).",
                  [query(f"sum by (instance, source, reason) (rate(ollama_exporter_source_errors_total{s(I)}{RATE}))",
                         "{{instance}} {{source}} {{reason}}")], (8, 6)).axis_label("errors/s"),
        ]

    def latency(self) -> list:
        s, t = self.s, self.t

        def quantiles(metric: str) -> list[Dataquery]:
            return [query(f"histogram_quantile({q}, sum by (instance, model, le) "
                          f"(rate({metric}_bucket{s(I, M)}{RATE})))", "{{instance}} {{model}} p" + str(int(q * 100)))
                    for q in (0.5, 0.95, 0.99)]

        def p99_5m(metric: str, legend: str) -> Dataquery:
            return query(f"histogram_quantile(0.99, sum by (instance, model, le) (rate({metric}_bucket{s(I, M)}[5m])))",
                         "{{instance}} {{model}} " + legend)

        failures = (f"sum by (instance, model) (rate(ollama_probe_failures_total{s(I, M)}{RATE})) "
                    f"/ sum by (instance, model) (rate(ollama_probes_total{s(I, M)}{RATE}))")
        return [
            graph("Time to first token", "s",
                  "P50/P95/P99 client-observed time from sending a probe's /api/generate request to the first "
                  "token, per model: histogram_quantile over rate(ollama_probe_ttft_seconds_bucket"
                  "[$__rate_interval]). Probes run every probes.interval (30 s), so short windows hold few "
                  "observations.", quantiles("ollama_probe_ttft_seconds")),
            graph("Time per output token", "s",
                  "P50/P95/P99 client-observed time per generated token of a probe's stream, per model: "
                  "histogram_quantile over rate(ollama_probe_tpot_seconds_bucket[$__rate_interval]).",
                  quantiles("ollama_probe_tpot_seconds")),
            graph("End-to-end probe duration", "s",
                  "P50/P95/P99 client-observed end-to-end time of successful probes (until /api/generate's done "
                  "chunk or /api/embed's answer), per model: histogram_quantile over "
                  "rate(ollama_probe_duration_seconds_bucket[$__rate_interval]).",
                  quantiles("ollama_probe_duration_seconds")),
            graph("P99 vs alert thresholds", "s",
                  "What the alerts see: P99 time to first token and P99 end-to-end probe time over 5 minutes, "
                  f"against the OllamaTTFTP99High ({num(t['ttft_p99_seconds'])} s) and OllamaLatencyP99High "
                  f"({num(t['latency_p99_seconds'])} s) thresholds, dashed.",
                  [p99_5m("ollama_probe_ttft_seconds", "TTFT p99"),
                   p99_5m("ollama_probe_duration_seconds", "E2E p99"),
                   self.threshold(t["ttft_p99_seconds"], "TTFT threshold"),
                   self.threshold(t["latency_p99_seconds"], "E2E threshold")], (12, 8))
            .override_by_regexp(".*threshold$", _THRESHOLD_LINE),
            graph("Probe failure ratio", "percentunit",
                  "Share of probes that failed, per model: rate(ollama_probe_failures_total) / "
                  "rate(ollama_probes_total) over $__rate_interval; the dashed line is the OllamaProbeFailing "
                  f"threshold ({percent(t['probe_failure_ratio'])}, over 10 minutes). Reasons are in the Probes row.",
                  [query(failures, "{{instance}} {{model}}"), self.threshold(t["probe_failure_ratio"])], (12, 8))
            .min(0).max(1).override_by_regexp(".*threshold$", _THRESHOLD_LINE),
        ]

    def traffic(self) -> list:
        """Users' requests as Ollama's own log shows them (the exporter's logs source) and its runners' slots."""
        s, t = self.s, self.t
        five, full = 'code=~"5.."', 'code="503"'
        gen = f'route=~"{GENERATION_ROUTES}"'
        all_requests = f"sum by (instance) (rate(ollama_http_requests_total{s(I)}{RATE}))"
        zero_if_none = f"sum by (instance) (0 * rate(ollama_http_requests_total{s(I)}{RATE}))"

        def real(q: float) -> Dataquery:
            return query(f"histogram_quantile({q}, sum by (instance, le) "
                         f"(rate(ollama_http_request_duration_seconds_bucket{s(I, gen)}{RATE})))",
                         "{{instance}} requests p" + str(int(q * 100)))

        return [
            graph("Requests by route and status", "reqps",
                  "Requests per second users sent to Ollama, by route and HTTP status, from Ollama's access log "
                  "(rate(ollama_http_requests_total); needs the exporter's logs.source). The exporter's own probes "
                  "and polls are not included. 499: the client gave up while its request was scheduled or its "
                  "model loaded; 503: the queue was full.",
                  [query(f"sum by (instance, route, code) (rate(ollama_http_requests_total{s(I)}{RATE}))",
                         "{{instance}} {{route}} {{code}}")], (12, 8)),
            graph("Request error ratio", "percentunit",
                  "Share of users' requests answered with a 5xx status (rate of ollama_http_requests_total with "
                  "code 5xx over all of it); the dashed line is the OllamaRequestErrorRatioHigh threshold "
                  f"({percent(t['request_error_ratio'])}, over 5 minutes). A streamed answer that fails after its "
                  "first byte is logged 200, so this is a lower bound.",
                  [query(f"(sum by (instance) (rate(ollama_http_requests_total{s(I, five)}{RATE})) or {zero_if_none})"
                         f" / {all_requests}", "{{instance}} 5xx"),
                   self.threshold(t["request_error_ratio"])], (12, 8))
            .min(0).override_by_regexp(".*threshold$", _THRESHOLD_LINE),
            graph("Request latency vs probes", "s",
                  "P50/P95/P99 end-to-end time of users' generation requests (chat, generate and the OpenAI and "
                  "Anthropic routes) from Ollama's access log (ollama_http_request_duration_seconds: queueing, "
                  "model loads and whole streams included), next to the P99 of the exporter's probes "
                  "(ollama_probe_duration_seconds). The dashed line is the OllamaRequestLatencyP99High threshold "
                  f"({num(t['request_latency_p99_seconds'])} s).",
                  [real(0.5), real(0.95), real(0.99),
                   query(f"histogram_quantile(0.99, sum by (instance, le) "
                         f"(rate(ollama_probe_duration_seconds_bucket{s(I, M)}{RATE})))", "{{instance}} probes p99"),
                   self.threshold(t["request_latency_p99_seconds"])], (12, 8))
            .override_by_regexp(".*threshold$", _THRESHOLD_LINE),
            graph("Tokens per second", "short",
                  "Prompt tokens in (cache=miss processed, cache=hit taken from the prompt cache) and generated "
                  "tokens out per second, per model, from the runners' lines in Ollama's log (Ollama v0.30+; "
                  "rate of ollama_request_prompt_tokens_total and ollama_request_generated_tokens_total). "
                  "Requests that cannot be tied to one model for certain count under model _unattributed; "
                  "probe tokens are included.",
                  [query(f"sum by (instance, model, cache) (rate(ollama_request_prompt_tokens_total{s(I, M)}{RATE}))",
                         "{{instance}} {{model}} in ({{cache}})"),
                   query(f"sum by (instance, model) (rate(ollama_request_generated_tokens_total{s(I, M)}{RATE}))",
                         "{{instance}} {{model}} out")], (12, 8)).axis_label("tokens/s"),
            graph("Busy slots vs capacity", "short",
                  "Requests running now (ollama_runner_slots_busy) against the parallel slots of each loaded "
                  "model's runner (ollama_runner_slots), from the runners' own /slots (v0.30+) or /health "
                  "(v0.1.32-v0.3.x). Busy equal to capacity means new requests queue inside Ollama.",
                  [query(f"sum by (instance, model) (ollama_runner_slots_busy{s(I, M)})", "{{instance}} {{model}} busy"),
                   query(f"sum by (instance, model) (ollama_runner_slots{s(I, M)})", "{{instance}} {{model}} slots")],
                  (8, 8)),
            graph("Client disconnects and queue full", "reqps",
                  "Clients giving up per second (ollama_http_client_disconnects_total: scheduling_or_load is gin's "
                  "499, waiting_for_slot Ollama's `aborting ... due to client closing the connection`) and "
                  "generation requests refused because the queue was full (503).",
                  [query(f"sum by (instance, stage) (rate(ollama_http_client_disconnects_total{s(I)}{RATE}))",
                         "{{instance}} gave up {{stage}}"),
                   query(f"sum by (instance) (rate(ollama_http_requests_total{s(I, gen, full)}{RATE})) "
                         f"or {zero_if_none}", "{{instance}} queue full (503)")], (8, 8)),
            graph("Log lines", "short",
                  "Lines of Ollama's log the exporter read per second by result (ollama_exporter_log_lines_total: "
                  "parsed, ignored, malformed: a known format that did not parse, i.e. the format changed) and "
                  "lines lost before parsing (ollama_exporter_log_lines_dropped_total: overflow, "
                  "journal_rate_limit).",
                  [query(f"sum by (instance, result) (rate(ollama_exporter_log_lines_total{s(I)}{RATE}))",
                         "{{instance}} {{result}}"),
                   query(f"sum by (instance, reason) (rate(ollama_exporter_log_lines_dropped_total{s(I)}{RATE}))",
                         "{{instance}} dropped {{reason}}")], (8, 8)).axis_label("lines/s"),
        ]

    def throughput(self) -> list:
        s = self.s

        def per_second(numerator: str, denominator: str) -> str:
            return (f"sum by (instance, model) (rate({numerator}{s(I, M)}{RATE})) "
                    f"/ sum by (instance, model) (rate({denominator}{s(I, M)}{RATE}))")

        return [
            graph("Generation speed", "short",
                  "Tokens generated per second by probes, per model, as Ollama measures it: "
                  "rate(ollama_probe_eval_tokens_total) / rate(ollama_probe_eval_duration_seconds_total) "
                  "(eval_count / eval_duration from /api/generate), numerator and denominator summed separately.",
                  [query(per_second("ollama_probe_eval_tokens_total", "ollama_probe_eval_duration_seconds_total"),
                         "{{instance}} {{model}}")]).axis_label("tokens/s"),
            graph("Prompt processing speed", "short",
                  "Prompt tokens processed per second by probes, per model: "
                  "rate(ollama_probe_prompt_eval_tokens_total) / rate(ollama_probe_prompt_eval_duration_seconds_total)"
                  " (prompt_eval_count / prompt_eval_duration). Probe prompts are short (~10 tokens), so this is "
                  "a lower bound on prefill speed.",
                  [query(per_second("ollama_probe_prompt_eval_tokens_total",
                                    "ollama_probe_prompt_eval_duration_seconds_total"),
                         "{{instance}} {{model}}")]).axis_label("tokens/s"),
            graph("Server time per probe", "s",
                  "Where a successful generate probe's time goes inside Ollama, per model: load_duration (getting "
                  "a runner, queueing included), prompt_eval_duration and eval_duration, each as "
                  "rate(ollama_probe_<x>_seconds_total) / rate(ollama_probe_duration_seconds_count) "
                  "(successful probes).",
                  [query(per_second(f"ollama_probe_{name}_duration_seconds_total", "ollama_probe_duration_seconds_count"),
                         "{{instance}} {{model}} " + legend)
                   for name, legend in (("load", "load"), ("prompt_eval", "prompt eval"), ("eval", "eval"))]),
        ]

    def models(self) -> list:
        s, t = self.s, self.t
        offload = f"1 - ollama_loaded_model_vram_bytes{s(I, M)} / ollama_loaded_model_size_bytes{s(I, M)}"
        expiry = f"ollama_loaded_model_expiry_timestamp_seconds{s(I, M)} - time()"
        return [
            grid("Resident models", "bytes",
                 "Models loaded now (Ollama's /api/ps): memory in total (ollama_loaded_model_size_bytes) and in VRAM "
                 "(ollama_loaded_model_vram_bytes), the share on CPU (1 - vram/size), the context allocated "
                 "(ollama_loaded_model_context_length) and the time until an idle unload "
                 "(ollama_loaded_model_expiry_timestamp_seconds - time(); about 292 years for keep_alive -1).",
                 [query(f"ollama_loaded_model_size_bytes{s(I, M)}", table_format=True),
                  query(f"ollama_loaded_model_vram_bytes{s(I, M)}", table_format=True),
                  query(offload, table_format=True),
                  query(f"ollama_loaded_model_context_length{s(I, M)}", table_format=True),
                  query(expiry, table_format=True)],
                 transformations=merge_and_organize(
                     [], {"Value #A": "Memory", "Value #B": "VRAM", "Value #C": "On CPU", "Value #D": "Context",
                          "Value #E": "Unloads in"},
                     ["instance", "model", "Value #A", "Value #B", "Value #C", "Value #D", "Value #E"]),
                 columns={"On CPU": unit("percentunit"), "Context": unit("short"), "Unloads in": unit("s")}),
            graph("Memory per loaded model", "bytes",
                  "Memory each loaded model uses across CPU and GPU (weights, KV cache, buffers; /api/ps size, "
                  "ollama_loaded_model_size_bytes) and the part of it in VRAM (/api/ps size_vram, "
                  "ollama_loaded_model_vram_bytes). A gap between the two is CPU offload.",
                  [query(f"ollama_loaded_model_size_bytes{s(I, M)}", "{{instance}} {{model}} total"),
                   query(f"ollama_loaded_model_vram_bytes{s(I, M)}", "{{instance}} {{model}} VRAM")]),
            graph("CPU offload", "percentunit",
                  "Share of each loaded model's memory that is not in VRAM: 1 - ollama_loaded_model_vram_bytes / "
                  "ollama_loaded_model_size_bytes (0 = fully on GPU, 1 = CPU only). Above "
                  f"{percent(t['cpu_offload_ratio'])} for long, the OllamaModelCPUOffload alert fires: generation "
                  "gets many times slower.", [query(offload, "{{instance}} {{model}}")])
            .min(0).max(1).thresholds(_steps((None, "green"), (max(t["cpu_offload_ratio"], 0.001), "red"))),
            graph("GPU memory per model (driver)", "bytes",
                  "GPU memory NVML reports for each model's runner process, per GPU "
                  "(ollama_loaded_model_gpu_memory_bytes, matched through the runner's --model blob). It includes "
                  "the CUDA context, so it exceeds the VRAM /api/ps reports.",
                  [query(f"sum by (instance, model, gpu) (ollama_loaded_model_gpu_memory_bytes{s(I, M, G)})",
                         "{{instance}} {{model}} GPU {{gpu}}")], fill=30)
            .stacking(StackingConfig().mode(common.StackingMode.NORMAL).group("A")),
            single("Time until unload", "s",
                   "Seconds until each loaded model is unloaded if it stays idle: "
                   "ollama_loaded_model_expiry_timestamp_seconds (/api/ps expires_at) - time(). Models with "
                   "keep_alive -1 show about 292 years.", [query(expiry, "{{instance}} {{model}}")], (8, 8),
                   text=common.BigValueTextMode.VALUE_AND_NAME),
            graph("Model loads and unloads", "short",
                  "Loads (up) and unloads (down) per $__rate_interval window, per model, from increase() of "
                  "ollama_model_loads_total and ollama_model_unloads_total: a model appearing in or leaving "
                  "/api/ps (a replacement counts as both) between two exporter polls.",
                  [query(f"sum by (instance, model) (increase(ollama_model_{kind}_total{s(I, M)}{RATE}))",
                         "{{instance}} {{model}} " + kind) for kind in ("loads", "unloads")], bars=True)
            .override_by_regexp(".* unloads$", [DynamicConfigValue("custom.transform", "negative-Y")]),
            graph("Loads per 30 min vs churn threshold", "short",
                  "Model loads per instance over the last 30 minutes, sum(increase(ollama_model_loads_total[30m])) "
                  "(a fixed window, as in the OllamaModelLoadChurn alert), against its threshold "
                  f"({num(t['model_loads_per_30m'])}), dashed.",
                  [query(f"sum by (instance) (increase(ollama_model_loads_total{s(I, M)}[30m]))", "{{instance}}"),
                   self.threshold(t["model_loads_per_30m"])], (5, 8))
            .override_by_regexp(".*threshold$", _THRESHOLD_LINE),
            single("Loads / unloads in range", "short",
                   "Model loads and unloads in the dashboard's time range, per instance: "
                   "increase(ollama_model_loads_total[$__range]) and increase(ollama_model_unloads_total[$__range]).",
                   [query(f"sum by (instance) (increase(ollama_model_{kind}_total{s(I, M)}[$__range]))",
                          "{{instance}} " + kind, instant=True) for kind in ("loads", "unloads")], (3, 8),
                   text=common.BigValueTextMode.VALUE_AND_NAME).decimals(0),
            grid("Installed model inventory", "short",
                 "Models installed on disk (Ollama's /api/tags joined with /api/show): family, parameter size, "
                 "quantization and format from ollama_model_info, size on disk (ollama_model_size_bytes), training "
                 "context length (ollama_model_context_length) and parameter count (ollama_model_parameters).",
                 [query(f"ollama_model_info{s(I, M)}", table_format=True),
                  query(f"ollama_model_size_bytes{s(I, M)}", table_format=True),
                  query(f"ollama_model_context_length{s(I, M)}", table_format=True),
                  query(f"ollama_model_parameters{s(I, M)}", table_format=True)], (16, 8),
                 transformations=merge_and_organize(
                     ["Value #A", "digest"], {"Value #B": "Size", "Value #C": "Context", "Value #D": "Parameters"},
                     ["instance", "model", "family", "parameter_size", "quantization", "format", "Value #B",
                      "Value #C", "Value #D"]),
                 columns={"Size": unit("bytes")}),
            grid("Capabilities", "none",
                 "What each installed model can do, from ollama_model_capability (/api/show `capabilities`: "
                 "completion, tools, vision, embedding, thinking, ...): 1 = has it.",
                 [query(f"ollama_model_capability{s(I, M)}", table_format=True)], (8, 8),
                 transformations=[DataTransformerConfig("groupingToMatrix", options={
                     "columnField": "capability", "rowField": "model", "valueField": "Value"})]),
        ]

    def gpu(self) -> list:
        s, t = self.s, self.t
        ig = s(I, G)
        return [
            single("NVML", "none",
                   "ollama_gpu_nvml_up: 1 if the exporter loaded and initialised NVML (libnvidia-ml) and its last "
                   "GPU sample completed. 0 on a host without an NVIDIA driver; the other GPU panels are then empty.",
                   [query(f"ollama_gpu_nvml_up{s(I)}", "{{instance}}")], (4, 5), mappings=UP_DOWN),
            single("GPU up", "none",
                   "ollama_gpu_up per GPU: 1 if NVML answered for it in the last sample, 0 if it has fallen off the "
                   "bus (alert OllamaGPULost).", [query(f"ollama_gpu_up{ig}", "{{instance}} GPU {{gpu}}")], (6, 5),
                   mappings=_mapping(**{"0": ("LOST", "red"), "1": ("UP", "green")})),
            grid("GPUs", "none",
                 "GPU identity from ollama_gpu_info (NVML): index, name, UUID, PCI bus id and driver version.",
                 [query(f"ollama_gpu_info{ig}", table_format=True)], (14, 5),
                 transformations=[DataTransformerConfig("organize", options={
                     "excludeByName": {"Time": True, "job": True, "__name__": True, "Value": True},
                     "renameByName": {}, "indexByName": {name: i for i, name in enumerate(
                         ("instance", "gpu", "name", "uuid", "pci_bus_id", "driver_version"))}})]),
            graph("GPU memory used", "percentunit",
                  "Share of each GPU's memory in use: ollama_gpu_memory_used_bytes / ollama_gpu_memory_total_bytes "
                  "(nvmlDeviceGetMemoryInfo). The dashed line is the OllamaGPUMemoryHigh threshold "
                  f"({percent(t['gpu_memory_ratio'])}).",
                  [query(f"ollama_gpu_memory_used_bytes{ig} / ollama_gpu_memory_total_bytes{ig}",
                         "{{instance}} GPU {{gpu}}"), self.threshold(t["gpu_memory_ratio"])], (12, 8))
            .min(0).max(1).override_by_regexp(".*threshold$", _THRESHOLD_LINE),
            graph("GPU memory", "bytes",
                  "GPU memory in bytes from nvmlDeviceGetMemoryInfo: used (ollama_gpu_memory_used_bytes), reserved "
                  "by the driver (ollama_gpu_memory_reserved_bytes) and total (ollama_gpu_memory_total_bytes, "
                  "dashed).", [query(f"ollama_gpu_memory_{kind}_bytes{ig}", "{{instance}} GPU {{gpu}} " + kind)
                               for kind in ("used", "reserved", "total")], (12, 8))
            .override_by_regexp(".* total$", _DASHED),
            graph("MIG instance memory", "bytes",
                  "Used and total memory of each MIG instance (ollama_gpu_mig_memory_used_bytes, "
                  "ollama_gpu_mig_memory_total_bytes; nvmlDeviceGetMemoryInfo on the MIG handle). Empty unless MIG "
                  "mode is on.", [query(f"ollama_gpu_mig_memory_{kind}_bytes{ig}",
                                        "{{instance}} GPU {{gpu}} GI {{gpu_instance}} " + kind)
                                  for kind in ("used", "total")], (12, 8))
            .override_by_regexp(".* total$", _DASHED),
            graph("GPU utilisation", "percentunit",
                  "Share of the last sample period in which a kernel ran (ollama_gpu_utilization_ratio) and in "
                  "which the memory controller was busy (ollama_gpu_memory_activity_ratio), from "
                  "nvmlDeviceGetUtilizationRates. NVML does not report these for MIG-enabled GPUs.",
                  [query(f"ollama_gpu_utilization_ratio{ig}", "{{instance}} GPU {{gpu}} kernels"),
                   query(f"ollama_gpu_memory_activity_ratio{ig}", "{{instance}} GPU {{gpu}} memory activity")],
                  (12, 8)).min(0).max(1),
            graph("GPU temperature", "celsius",
                  "GPU core temperature (ollama_gpu_temperature_celsius, nvmlDeviceGetTemperature); the dashed line "
                  f"is the OllamaGPUTemperatureHigh threshold ({num(t['gpu_temperature_celsius'])} °C).",
                  [query(f"ollama_gpu_temperature_celsius{ig}", "{{instance}} GPU {{gpu}}"),
                   self.threshold(t["gpu_temperature_celsius"])], soft_min=False)
            .override_by_regexp(".*threshold$", _THRESHOLD_LINE),
            graph("GPU power", "watt",
                  "Power draw (ollama_gpu_power_watts, nvmlDeviceGetPowerUsage), the enforced limit "
                  "(ollama_gpu_power_limit_watts, dashed) and the exact average power over $__rate_interval from "
                  "the energy counter, rate(ollama_gpu_energy_joules_total).",
                  [query(f"ollama_gpu_power_watts{ig}", "{{instance}} GPU {{gpu}} draw"),
                   query(f"ollama_gpu_power_limit_watts{ig}", "{{instance}} GPU {{gpu}} limit"),
                   query(f"rate(ollama_gpu_energy_joules_total{ig}{RATE})", "{{instance}} GPU {{gpu}} average")])
            .override_by_regexp(".* limit$", _DASHED),
            graph("GPU clocks", "hertz",
                  "Current clocks per GPU and clock domain (graphics, sm, memory, video), ollama_gpu_clock_hertz "
                  "from nvmlDeviceGetClockInfo.", [query(f"ollama_gpu_clock_hertz{ig}", "{{instance}} GPU {{gpu}} {{clock}}")]),
            self._throttle(ig),
            graph("GPU processes", "short",
                  "Compute processes per GPU (ollama_gpu_processes, nvmlDeviceGetComputeRunningProcesses, MIG "
                  "instances included) and processes the exporter could not attribute to a model, by reason "
                  "(ollama_exporter_gpu_processes_unattributed: unreadable, loading, other).",
                  [query(f"ollama_gpu_processes{ig}", "{{instance}} GPU {{gpu}}"),
                   query(f"ollama_exporter_gpu_processes_unattributed{s(I)}", "{{instance}} unattributed {{reason}}")])
            .decimals(0),
            graph("ECC errors", "short",
                  "Volatile ECC memory errors per $__rate_interval window, corrected and uncorrected, from "
                  "increase(ollama_gpu_ecc_errors_total) (nvmlDeviceGetTotalEccErrors). Empty on GPUs without ECC.",
                  [query(f"sum by (instance, gpu, error) (increase(ollama_gpu_ecc_errors_total{ig}{RATE}))",
                         "{{instance}} GPU {{gpu}} {{error}}")], bars=True),
            graph("Fan speed and performance state", "percentunit",
                  "Fan speed as a fraction of its maximum (ollama_gpu_fan_speed_ratio, nvmlDeviceGetFanSpeed; "
                  "absent on passively cooled cards) and the performance state P0 (max) to P15 "
                  "(ollama_gpu_performance_state, right axis).",
                  [query(f"ollama_gpu_fan_speed_ratio{ig}", "{{instance}} GPU {{gpu}} fan"),
                   query(f"ollama_gpu_performance_state{ig}", "{{instance}} GPU {{gpu}} P-state")])
            .override_by_regexp(".* P-state$", [
                DynamicConfigValue("unit", "short"), DynamicConfigValue("decimals", 0),
                DynamicConfigValue("custom.axisPlacement", "right"), DynamicConfigValue("custom.axisLabel", "P-state"),
                DynamicConfigValue("custom.lineInterpolation", "stepAfter"), DynamicConfigValue("max", 15)]),
        ]

    def _throttle(self, ig: str) -> statetimeline.Panel:
        p = _common(statetimeline.Panel(), "Throttle reasons", "none",
                    "Clock-event (throttle) reasons per GPU, ollama_gpu_throttle_active from "
                    "nvmlDeviceGetCurrentClocksEventReasons: red while the reason is active. gpu_idle is normal on "
                    "an idle GPU; hw_thermal, hw_slowdown, sw_thermal and hw_power_brake cost speed.",
                    [query(f"ollama_gpu_throttle_active{ig}", "{{instance}} GPU {{gpu}} {{reason}}")], (24, 10))
        return (p.mappings(_mapping(**{"0": ("inactive", "transparent"), "1": ("active", "red")}))
                .thresholds(_steps((None, "transparent"), (1, "red"))).fill_opacity(70).line_width(0)
                .merge_values(True).show_value(common.VisibilityMode.NEVER).row_height(0.9)
                .legend(VizLegendOptions().show_legend(False).display_mode(common.LegendDisplayMode.LIST)
                        .placement(common.LegendPlacement.BOTTOM)))

    def probes(self) -> list:
        s = self.s
        return [
            graph("Probes sent", "reqps",
                  "Probes per second per model, failed ones included (rate(ollama_probes_total)): one every "
                  "probes.interval for each resident model that passes the activity gate.",
                  [query(f"sum by (instance, model) (rate(ollama_probes_total{s(I, M)}{RATE}))",
                         "{{instance}} {{model}}")]),
            graph("Probe failures by reason", "reqps",
                  "Failed probes per second by model and reason (not_found, out_of_memory, context_length, busy, "
                  "timeout, truncated_stream, stream_error, http_4xx, http_5xx, connection), "
                  "rate(ollama_probe_failures_total).",
                  [query(f"sum by (instance, model, reason) (rate(ollama_probe_failures_total{s(I, M)}{RATE}))",
                         "{{instance}} {{model}} {{reason}}")]),
            graph("Probes skipped by reason", "reqps",
                  "Probes not sent per second by model and reason (not_loaded, idle, backoff, in_progress, "
                  "unsupported), rate(ollama_probe_skipped_total). idle is normal: the exporter never keeps an idle "
                  "model loaded.",
                  [query(f"sum by (instance, model, reason) (rate(ollama_probe_skipped_total{s(I, M)}{RATE}))",
                         "{{instance}} {{model}} {{reason}}")]),
            single("Loads caused by probes", "short",
                   "Probes that made Ollama load a model in the dashboard's time range, "
                   "increase(ollama_probe_caused_loads_total[$__range]). Should stay 0: probes are built never to "
                   "load or reload a model.",
                   [query(f"sum by (instance, model) (increase(ollama_probe_caused_loads_total{s(I, M)}[$__range]))",
                          "{{instance}} {{model}}")], (8, 6),
                   thresholds=_steps((None, "green"), (1, "red"))).decimals(0),
            graph("Time since last probe", "s",
                  "Seconds since each model's last probe finished: time() - ollama_probe_last_timestamp_seconds. "
                  "Grows while a model is skipped (idle, not loaded, backoff).",
                  [query(f"time() - ollama_probe_last_timestamp_seconds{s(I, M)}", "{{instance}} {{model}}")], (16, 6)),
        ]

    # ------------------------------------------------------------------------------------- dashboard

    def variables(self) -> list:
        s = self.s

        def labels(name: str, label: str, selector: str, sort: VariableSort) -> QueryVariable:
            q = f"label_values({selector}, {name})"
            return (QueryVariable(name).label(label).datasource(DS)
                    .query({"qryType": 1, "query": q, "refId": "PrometheusVariableQueryEditor-VariableQuery"})
                    .multi(True).include_all(True).all_value(".*")
                    .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(sort)
                    .current(VariableOption(selected=True, text=["All"], value=["$__all"])))

        ds = self.c.datasource
        return [
            DatasourceVariable("datasource").label("Data source").type("prometheus")
            .current(VariableOption(selected=True, text=ds, value=ds)),
            labels("instance", "Instance", f"ollama_up{s()}", VariableSort.ALPHABETICAL_ASC),
            labels("model", "Model", f"ollama_model_info{s(I)}", VariableSort.ALPHABETICAL_ASC),
            labels("gpu", "GPU", f"ollama_gpu_info{s(I)}", VariableSort.NUMERICAL_ASC),
        ]

    def build(self) -> Dashboard:
        c = self.c
        board = (Dashboard(c.dashboard_title).uid(c.dashboard_uid).tags(list(c.dashboard_tags))
                 .description("Ollama through ollama-exporter: the fleet, server and source health, probe latency, "
                              "users' traffic from Ollama's log, throughput, loaded and installed models, NVIDIA GPU "
                              "telemetry.")
                 .editable().tooltip(DashboardCursorSync.CROSSHAIR).refresh(c.dashboard_refresh)
                 .time(c.dashboard_time_from, "now").timezone("")
                 .timepicker(TimePicker().refresh_intervals(["10s", "30s", "1m", "5m", "15m", "30m", "1h"])))
        for var in self.variables():
            board = board.with_variable(var)
        next_id = iter(range(1, 1000))
        for title, panels, collapsed in (("Fleet", self.fleet(), False), ("Overview", self.overview(), False),
                                         ("Latency", self.latency(), False), ("Traffic", self.traffic(), False),
                                         ("Throughput", self.throughput(), False),
                                         ("Models", self.models(), False), ("GPU", self.gpu(), False),
                                         ("Probes", self.probes(), True)):
            row = Row(title).id(next(next_id)).datasource(DS)
            if collapsed:
                for panel in panels:
                    row = row.with_panel(panel.id(next(next_id)))
                board = board.with_row(row)
                continue
            board = board.with_row(row)
            for panel in panels:
                board = board.with_panel(panel.id(next(next_id)))
        return board


def dashboard(config: MixinConfig) -> dict[str, Any]:
    """The dashboard as classic Grafana JSON (a dict), for the config."""
    return json.loads(JSONEncoder().encode(Builder(config).build().build()))


def dashboard_json(config: MixinConfig) -> str:
    return json.dumps(dashboard(config), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

"""Prometheus recording and alerting rules from the mixin config, as plain data for YAML.

Alerts are self-contained: each compares its own expression with a literal threshold from the config,
so an alert never depends on a recording group being loaded. The recording rules are conveniences for
ad-hoc queries and other dashboards (level:metric:operations names; numerators and denominators are
aggregated separately). Every alert carries summary, description, runbook_url and dashboard_url.
"""

from __future__ import annotations

from dataclasses import dataclass

from ollama_exporter.mixin.config import MixinConfig

ALERT_GROUP = "ollama-exporter"
# Ollama's routes that generate (the logs source's `route` label): users' latency is judged on these.
GENERATION_ROUTES = "/api/chat|/api/generate|/v1/chat/completions|/v1/completions|/v1/responses|/v1/messages"
RECORDING_GROUP = "ollama-exporter.rules"
# The labels an alert's dashboard link fills in: the dashboard's variables of the same name.
_DASHBOARD_VARS = ("instance", "model", "gpu")


def num(value: float) -> str:
    """A threshold as a PromQL literal: 30, 0.85 (never 30.0)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def percent(ratio: float) -> str:
    return f"{num(round(ratio * 100, 4))}%"


_UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week"}


def spoken(duration: str) -> str:
    """A `for` duration in words for descriptions: 5m -> 5 minutes, 1h -> 1 hour (others as written)."""
    n, unit = duration[:-1], duration[-1]
    if not n.isdigit() or unit not in _UNITS:
        return duration
    return f"{n} {_UNITS[unit]}{'' if n == '1' else 's'}"


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    summary: str
    description: str
    labels: tuple[str, ...]  # the labels the alert carries, for its dashboard link


def alerts(c: MixinConfig) -> list[Alert]:
    """Every alert the mixin defines, enabled or not, with the config's thresholds as literals."""
    s, t = c.matchers, c.thresholds
    runbook = "See the {} runbook."

    def quantile(metric: str) -> str:  # one series per (model, le) per target: nothing to sum
        return f"histogram_quantile(0.99, rate({metric}_bucket{s()}[5m]))"

    offload = f"1 - ollama_loaded_model_vram_bytes{s()} / ollama_loaded_model_size_bytes{s()}"
    server_errors, generation = s('code=~"5.."'), s(f'route=~"{GENERATION_ROUTES}"')
    return [
        Alert("OllamaExporterDown", f"up{s()} == 0",
              "ollama-exporter on {{ $labels.instance }} cannot be scraped.",
              "Prometheus has failed to scrape {{ $labels.instance }} (job {{ $labels.job }}) for "
              f"{spoken(c.alerts['OllamaExporterDown'].for_)}, so nothing about that Ollama server is known. "
              + runbook.format("OllamaExporterDown"), ("instance",)),
        Alert("OllamaExporterPollStalled",
              f"time() - ollama_exporter_snapshot_timestamp_seconds{s()} > {num(t['snapshot_age_seconds'])}",
              "ollama-exporter on {{ $labels.instance }} serves data {{ $value | humanizeDuration }} old.",
              "The exporter answers scrapes, but its poll loop has not produced a new snapshot for more than "
              f"{num(t['snapshot_age_seconds'])} seconds: every other metric of {{{{ $labels.instance }}}} is frozen "
              "and its alerts cannot fire. " + runbook.format("OllamaExporterPollStalled"), ("instance",)),
        Alert("OllamaDown", f"ollama_up{s()} == 0",
              "Ollama on {{ $labels.instance }} is not answering its API.",
              "The exporter has not had valid answers from /api/version and /api/ps for "
              f"{spoken(c.alerts['OllamaDown'].for_)}. The reason is in "
              'ollama_exporter_source_errors_total{instance="{{ $labels.instance }}"}. '
              + runbook.format("OllamaDown"), ("instance",)),
        Alert("OllamaGPUMemoryHigh",
              f"ollama_gpu_memory_used_bytes{s()} / ollama_gpu_memory_total_bytes{s()} > {num(t['gpu_memory_ratio'])}",
              "GPU {{ $labels.gpu }} on {{ $labels.instance }} is {{ $value | humanizePercentage }} full.",
              "GPU {{ $labels.gpu }} ({{ $labels.uuid }}) has used more than "
              f"{percent(t['gpu_memory_ratio'])} of its memory for {spoken(c.alerts['OllamaGPUMemoryHigh'].for_)}. "
              "The next model load will spill to CPU or evict a model. " + runbook.format("OllamaGPUMemoryHigh"),
              ("instance", "gpu")),
        Alert("OllamaLatencyP99High",
              f"{quantile('ollama_probe_duration_seconds')}\n> {num(t['latency_p99_seconds'])}",
              "P99 probe latency of {{ $labels.model }} on {{ $labels.instance }} is "
              "{{ $value | humanizeDuration }}.",
              "The exporter's end-to-end probe requests to {{ $labels.model }} took more than "
              f"{num(t['latency_p99_seconds'])} seconds at the 99th percentile over 5 minutes, for "
              f"{spoken(c.alerts['OllamaLatencyP99High'].for_)}. Users feel this. "
              + runbook.format("OllamaLatencyP99High"), ("instance", "model")),
        Alert("OllamaTTFTP99High", f"{quantile('ollama_probe_ttft_seconds')}\n> {num(t['ttft_p99_seconds'])}",
              "P99 time to first token of {{ $labels.model }} on {{ $labels.instance }} is "
              "{{ $value | humanizeDuration }}.",
              "Probes of {{ $labels.model }} wait more than "
              f"{num(t['ttft_p99_seconds'])} seconds for their first token at the 99th percentile. Requests are "
              "queueing or the prompt is processed slowly. " + runbook.format("OllamaTTFTP99High"),
              ("instance", "model")),
        Alert("OllamaProbeFailing",
              f"sum without (reason) (rate(ollama_probe_failures_total{s()}[10m]))\n"
              f"/ rate(ollama_probes_total{s()}[10m])\n"
              f"> {num(t['probe_failure_ratio'])}",
              "Probes of {{ $labels.model }} on {{ $labels.instance }} are failing "
              "({{ $value | humanizePercentage }}).",
              f"More than {percent(t['probe_failure_ratio'])} of the probes sent to {{{{ $labels.model }}}} "
              "failed over 10 minutes. The reason is in "
              'ollama_probe_failures_total{model="{{ $labels.model }}"}. ' + runbook.format("OllamaProbeFailing"),
              ("instance", "model")),
        Alert("OllamaModelCPUOffload",
              # Partly on CPU anywhere, or not fully in VRAM on a host whose GPU the exporter sees working.
              f"(\n  {offload} > {num(t['cpu_offload_ratio'])}\n"
              f"  and ollama_loaded_model_vram_bytes{s()} > 0\n)\nor\n"
              f"(\n  {offload} > {num(t['cpu_offload_ratio'])}\n"
              f"  and on (job, instance) count by (job, instance) (ollama_gpu_up{s()} == 1)\n)",
              "{{ $labels.model }} on {{ $labels.instance }} is {{ $value | humanizePercentage }} on CPU.",
              "Part of {{ $labels.model }} does not fit in GPU memory and runs from CPU RAM, which makes it "
              "many times slower. " + runbook.format("OllamaModelCPUOffload"), ("instance", "model")),
        Alert("OllamaGPUTemperatureHigh",
              f"ollama_gpu_temperature_celsius{s()} > {num(t['gpu_temperature_celsius'])}",
              "GPU {{ $labels.gpu }} on {{ $labels.instance }} is at {{ $value }} °C.",
              "GPU {{ $labels.gpu }} ({{ $labels.uuid }}) has been above "
              f"{num(t['gpu_temperature_celsius'])} °C for {spoken(c.alerts['OllamaGPUTemperatureHigh'].for_)}; expect "
              "thermal throttling (ollama_gpu_throttle_active). " + runbook.format("OllamaGPUTemperatureHigh"),
              ("instance", "gpu")),
        Alert("OllamaModelLoadChurn",
              f"sum without (model) (increase(ollama_model_loads_total{s()}[30m]))\n"
              f"> {num(t['model_loads_per_30m'])}",
              "Ollama on {{ $labels.instance }} loaded models {{ $value | humanize }} times in 30 minutes.",
              f"More than {num(t['model_loads_per_30m'])} model loads in 30 minutes: models are being loaded "
              "and evicted over and over, and every load costs seconds to minutes of latency. "
              + runbook.format("OllamaModelLoadChurn"), ("instance",)),
        Alert("OllamaRequestErrorRatioHigh",
              f"sum without (route, method, code) (rate(ollama_http_requests_total{server_errors}[5m]))\n"
              f"/ sum without (route, method, code) (rate(ollama_http_requests_total{s()}[5m]))\n"
              f"> {num(t['request_error_ratio'])}",
              "Ollama on {{ $labels.instance }} answers {{ $value | humanizePercentage }} of requests with an error.",
              f"More than {percent(t['request_error_ratio'])} of the requests users sent to Ollama over 5 minutes "
              "got a 5xx status in Ollama's own access log (the exporter's probes and polls not counted), for "
              f"{spoken(c.alerts['OllamaRequestErrorRatioHigh'].for_)}. 503 means the queue was full, 500 a "
              "failed load or a runner that died. " + runbook.format("OllamaRequestErrorRatioHigh"), ("instance",)),
        Alert("OllamaRequestLatencyP99High",
              "histogram_quantile(0.99, sum without (route, code_class) (rate(ollama_http_request_duration_seconds_bucket"
              f"{generation}[5m])))\n> {num(t['request_latency_p99_seconds'])}",
              "P99 time of users' generation requests on {{ $labels.instance }} is {{ $value | humanizeDuration }}.",
              "Users' chat and generate requests took more than "
              f"{num(t['request_latency_p99_seconds'])} seconds end to end at the 99th percentile over 5 minutes, "
              f"for {spoken(c.alerts['OllamaRequestLatencyP99High'].for_)}, by Ollama's own access log: queueing, "
              "model loads and whole streams included. " + runbook.format("OllamaRequestLatencyP99High"),
              ("instance",)),
        Alert("OllamaGPULost", f"ollama_gpu_up{s()} == 0",
              "GPU {{ $labels.gpu }} on {{ $labels.instance }} has fallen off the bus.",
              "NVML reports GPU {{ $labels.gpu }} ({{ $labels.uuid }}) as lost. Models on it are gone or will "
              "fail; it needs a reset or a reboot. " + runbook.format("OllamaGPULost"), ("instance", "gpu")),
    ]


def dashboard_link(c: MixinConfig, labels: tuple[str, ...]) -> str:
    """The dashboard URL opened on the alert's instance (and model or GPU)."""
    query = "&".join(f"var-{label}={{{{ $labels.{label} | urlquery }}}}" for label in labels if label in _DASHBOARD_VARS)
    return c.dashboard_url + ("&" if "?" in c.dashboard_url else "?") + query


def alert_rules(c: MixinConfig) -> list[dict]:
    out = []
    for a in alerts(c):
        settings = c.alerts[a.name]
        if not settings.enabled:
            continue
        out.append({
            "alert": a.name,
            "expr": a.expr,
            "for": settings.for_,
            "labels": {"severity": settings.severity},
            "annotations": {
                "summary": a.summary,
                "description": a.description,
                "runbook_url": c.runbook(a.name),
                "dashboard_url": dashboard_link(c, a.labels),
            },
        })
    return out


def recording_rules(c: MixinConfig) -> list[dict]:
    """Per target (every label of the scrape kept: job, instance and whatever the selector matches on)."""
    s = c.matchers
    out = []
    for metric in ("ttft", "tpot", "duration"):
        for q in ("50", "95", "99"):
            out.append({
                "record": f"instance_model:ollama_probe_{metric}_seconds:p{q}_5m",
                "expr": f"histogram_quantile(0.{q}, rate(ollama_probe_{metric}_seconds_bucket{s()}[5m]))",
            })
    out += [
        # Generation speed: numerator and denominator as rates of their own, never an average of ratios.
        {"record": "instance_model:ollama_probe_eval_tokens_per_second:rate5m",
         "expr": f"rate(ollama_probe_eval_tokens_total{s()}[5m])\n"
                 f"/ rate(ollama_probe_eval_duration_seconds_total{s()}[5m])"},
        {"record": "instance_model:ollama_probe_failures:ratio_rate10m",
         "expr": f"sum without (reason) (rate(ollama_probe_failures_total{s()}[10m]))\n"
                 f"/ rate(ollama_probes_total{s()}[10m])"},
        {"record": "instance_gpu:ollama_gpu_memory_used:ratio",
         "expr": f"ollama_gpu_memory_used_bytes{s()} / ollama_gpu_memory_total_bytes{s()}"},
        # 0 on GPU, 1 on CPU only.
        {"record": "instance_model:ollama_loaded_model_cpu_offload:ratio",
         "expr": f"1 - ollama_loaded_model_vram_bytes{s()} / ollama_loaded_model_size_bytes{s()}"},
    ]
    return out


def rule_groups(c: MixinConfig) -> list[dict]:
    """The `groups:` of a Prometheus rule file (and of the PrometheusRule's spec)."""
    return [
        {"name": ALERT_GROUP, "rules": alert_rules(c)},
        {"name": RECORDING_GROUP, "rules": recording_rules(c)},
    ]

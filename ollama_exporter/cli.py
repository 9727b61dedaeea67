"""Command line: `ollama-exporter` runs the daemon; every config key is also a flag (config.KEYS).

Flags follow Prometheus exporter style (`--web.listen-address`, `--config.file`). A bad setting
prints one line naming the key and exits with status 2; no traceback reaches the operator.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any, Optional

import click

from ollama_exporter import __version__
from ollama_exporter.assets import assets
from ollama_exporter.config import KEYS, Config, ConfigError, build_config, flag_name
from ollama_exporter.exposition import Exposition, render
from ollama_exporter.gpu import GpuSource
from ollama_exporter.mixin.command import mixin
from ollama_exporter.ollama import OllamaClient
from ollama_exporter.poller import Poller
from ollama_exporter.prober import Prober
from ollama_exporter.server import MetricsServer
from ollama_exporter.snapshot import GpuState, SourceError
from ollama_exporter.webconfig import WebConfig, load_web_config

log = logging.getLogger("ollama_exporter")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _config_options(func):
    """Attach one flag per config key, each defaulting to None so we know which were given."""
    for key in reversed(KEYS):
        if key.is_flag:
            negative = "--no-" + flag_name(key)[2:]
            func = click.option(f"{flag_name(key)}/{negative}", key.field, default=None, help=key.help)(func)
        else:
            func = click.option(flag_name(key), key.field, default=None, metavar=key.metavar, help=key.help)(func)
    return click.option("--config.file", "config_file", default=None, metavar="FILE",
                        help="YAML configuration file; flags override its values.")(func)


def load_config(config_file: Optional[str], options: dict[str, Any]) -> Config:
    flags = {key.name: options.get(key.field) for key in KEYS}
    try:
        return build_config(config_file, flags)
    except ConfigError as exc:
        click.echo(f"ollama-exporter: error: {exc}", err=True)
        sys.exit(2)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="time=%(asctime)s level=%(levelname)s source=%(name)s msg=%(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("urllib3").setLevel(logging.WARNING)


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@_config_options
@click.option("--once", is_flag=True, help="Poll once, print the metrics to stdout and exit.")
@click.version_option(__version__, "--version", prog_name="ollama-exporter")
@click.pass_context
def main(ctx: click.Context, config_file: Optional[str], once: bool, **options: Any) -> None:
    """Prometheus exporter for Ollama: polls Ollama's API and serves the results on /metrics.

    `ollama-exporter probe` measures latency once and prints a table instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    config = load_config(config_file, options)
    try:
        web = load_web_config(config.web_config_file) if config.web_config_file and not once else None
    except ConfigError as exc:
        click.echo(f"ollama-exporter: error: {exc}", err=True)
        sys.exit(2)
    setup_logging(config.log_level)
    client = OllamaClient(config.ollama_url, config.ollama_timeout)
    gpu, gpu_off_state = make_gpu_source(config)
    poller = Poller(client, config.poll_interval, gpu=gpu, gpu_off_state=gpu_off_state)
    if once:
        body, _ = render(poller.poll_once())
        click.echo(body.decode(), nl=False)
        return
    serve(config, poller, client, web)


@main.command(context_settings=CONTEXT)
@_config_options
@click.option("--model", "models", multiple=True, metavar="MODEL",
              help="Model to probe (repeatable). Default: probes.models, else every resident model.")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 1000), help="Probes per model.")
def probe(config_file: Optional[str], models: tuple[str, ...], count: int, **options: Any) -> None:
    """Probe models now and print TTFT, TPOT, end-to-end time and Ollama's own timings.

    Like the daemon's probes it never loads a model that is not loaded (unless probes.allow_cold_load)
    and never sends keep_alive; unlike them it ignores the idle gate, since you asked.
    """
    from ollama_exporter.probe_table import run_probe_command

    config = load_config(config_file, options)
    setup_logging("warning" if config.log_level == "info" else config.log_level)
    sys.exit(run_probe_command(config, models, count, click.echo))


main.add_command(mixin)  # `mixin build`: dashboards and rules from a config (the sdk is imported only there)
main.add_command(assets)  # `assets`: the packaged dashboard, rules, unit


def make_gpu_source(config: Config) -> tuple[Optional[GpuSource], Optional[GpuState]]:
    """The GPU source for gpu.enabled, or what the snapshot says instead: nothing (false) or nvml_up 0."""
    if config.gpu_enabled == "false":
        return None, None
    source = GpuSource(config.poll_interval)
    try:
        source.start()
    except SourceError as exc:
        if config.gpu_enabled == "true":
            click.echo(f"ollama-exporter: error: gpu.enabled is true but NVML cannot be used: {exc}", err=True)
            sys.exit(2)
        if exc.reason == "library_not_found":
            log.info("running without GPU metrics: %s", exc)
            return None, GpuState(nvml_up=False)
        log.warning("NVML is not ready, retrying with backoff: %s", exc)
    return source, None


def serve(config: Config, poller: Poller, client: OllamaClient, web: Optional[WebConfig] = None) -> None:
    """Run the poll loop, the prober and the HTTP server until SIGTERM or SIGINT."""
    exposition = Exposition()
    poller.subscribe(exposition.update)
    host, port = config.listen
    try:
        server = MetricsServer(host, port, exposition, config.ollama_url, web)
    except OSError as exc:
        click.echo(f"ollama-exporter: error: cannot listen on {config.web_listen_address}: {exc.strerror or exc}",
                   err=True)
        sys.exit(1)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    threading.Thread(target=poller.run, args=(stop,), name="poller", daemon=True).start()
    if config.probes_enabled:
        prober = Prober(client, config, lambda: poller.snapshot)
        poller.probe_stats = prober.stats
        threading.Thread(target=prober.run, args=(stop,), name="prober", daemon=True).start()
    server.start()
    log.info("ollama-exporter %s polling %s every %gs, listening on %s", __version__, config.ollama_url,
             config.poll_interval, config.web_listen_address)
    while not stop.wait(1.0):
        pass
    log.info("shutting down")
    server.shutdown()
    server.server_close()

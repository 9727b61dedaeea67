"""Command line: `ollama-exporter` runs the daemon; every config key is also a flag (config.KEYS).

Flags follow Prometheus exporter style (`--web.listen-address`, `--config.file`), and each can be set by
an environment variable too (`OLLAMA_EXPORTER_POLL_INTERVAL`). A bad setting prints one line naming
the key and exits with status 2; no traceback reaches the operator. Options given before a
subcommand (`ollama-exporter --ollama.url X probe`) apply to it, as do its own.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import click

from ollama_exporter import __version__, logformat
from ollama_exporter.assets import assets
from ollama_exporter.config import KEYS, Config, ConfigError, build_config, config_file_from, flag_name
from ollama_exporter.mixin.command import mixin

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _config_options(func):
    """Attach one flag per config key, each defaulting to None (or ()) so we know which were given."""
    for key in reversed(KEYS):
        if key.file_only:
            continue
        if key.is_flag:
            negative = "--no-" + flag_name(key)[2:]
            func = click.option(f"{flag_name(key)}/{negative}", key.field, default=None, help=key.help)(func)
        else:
            func = click.option(flag_name(key), key.field, default=None, metavar=key.metavar, help=key.help,
                                multiple=key.multiple)(func)
    return click.option("--config.file", "config_file", default=None, metavar="FILE",
                        help="YAML configuration file; environment variables and flags override its values.")(func)


def flags_of(options: dict[str, Any]) -> dict[str, Any]:
    return {key.name: options.get(key.field) for key in KEYS if not key.file_only}


def fail(message: str, status: int = 2) -> None:
    click.echo(f"ollama-exporter: error: {message}", err=True)
    sys.exit(status)


def load_config(config_file: Optional[str], flags: dict[str, Any]) -> Config:
    try:
        return build_config(config_file_from(config_file), flags)
    except ConfigError as exc:
        fail(str(exc))
        raise  # unreachable: fail() exits


def subcommand_config(ctx: click.Context, config_file: Optional[str], options: dict[str, Any]) -> Config:
    """The group's options overlaid with the subcommand's own (which win)."""
    group_file, group_flags = ctx.obj or (None, {})
    flags = {**group_flags, **{k: v for k, v in flags_of(options).items() if v is not None and v != ()}}
    return load_config(config_file or group_file, flags)


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@_config_options
@click.option("--once", is_flag=True, help="Poll once, print the metrics to stdout and exit.")
@click.option("--config.check", "check", is_flag=True,
              help="Check --config.file and --web.config.file, print what is wrong (exit 2) or OK (exit 0).")
@click.version_option(__version__, "--version", prog_name="ollama-exporter")
@click.pass_context
def main(ctx: click.Context, config_file: Optional[str], once: bool, check: bool, **options: Any) -> None:
    """Prometheus exporter for Ollama: polls Ollama's API and serves the results on /metrics.

    `ollama-exporter probe` measures latency once and prints a table instead.
    """
    flags = flags_of(options)
    if ctx.invoked_subcommand is not None:
        ctx.obj = (config_file, flags)
        return
    config = load_config(config_file, flags)
    from ollama_exporter.daemon import Daemon, check_config, poll_once

    try:
        if check:
            click.echo(check_config(config))
            return
        logformat.setup(config.log_level, config.log_format)
        if once:
            click.echo(poll_once(config).decode(), nl=False)
            return
        daemon = Daemon(config_file_from(config_file), flags, config)
        daemon.start()
    except ConfigError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(str(exc), 1)
    daemon.run()


@main.command(context_settings=CONTEXT)
@_config_options
@click.option("--model", "models", multiple=True, metavar="MODEL",
              help="Model to probe (repeatable). Default: probes.models, else every resident model.")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 1000), help="Probes per model.")
@click.pass_context
def probe(ctx: click.Context, config_file: Optional[str], models: tuple[str, ...], count: int, **options: Any) -> None:
    """Probe models now and print TTFT, TPOT, end-to-end time and Ollama's own timings.

    Like the daemon's probes it never loads a model that is not loaded (unless probes.allow_cold_load)
    and never sends keep_alive; unlike them it ignores the idle gate, since you asked.
    """
    from ollama_exporter.probe_table import run_probe_command

    config = subcommand_config(ctx, config_file, options)
    logformat.setup("warn" if config.log_level == "info" else config.log_level, config.log_format)
    sys.exit(run_probe_command(config, models, count, click.echo))


main.add_command(mixin)  # `mixin build`: dashboards and rules from a config (the sdk is imported only there)
main.add_command(assets)  # `assets`: the packaged dashboard, rules, unit

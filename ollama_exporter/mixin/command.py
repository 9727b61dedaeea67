"""`ollama-exporter mixin build`: regenerate the dashboard, rules and Kubernetes objects from a config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from ollama_exporter import mixin as bundle


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def mixin() -> None:
    """Dashboards and alerts from one config (the monitoring mixin)."""


@mixin.command()
@click.option("--config", "config_file", metavar="FILE",
              help="Mixin config (YAML, only the keys you change; examples/mixin.yml lists them). Default: defaults.")
@click.option("--out", required=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Where to write grafana/, alerts/ and deploy/kubernetes/ (`.` rebuilds a checkout's copies).")
def build(config_file: Optional[str], out: str) -> None:
    """Write the Grafana dashboard, the Prometheus rules and the Kubernetes objects for a config."""
    try:
        config = bundle.load(config_file)
        bundle.require_sdk()
    except (bundle.MixinConfigError, bundle.MixinUnavailable) as exc:
        click.echo(f"ollama-exporter: error: {exc}", err=True)
        sys.exit(2)
    for path in bundle.write(config, Path(out)):
        click.echo(path)

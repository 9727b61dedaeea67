"""The files a pip or pipx user needs beside the program, shipped inside the package.

Copies of the repository's generated dashboard, rules and Kubernetes objects, its systemd unit and the
mixin config example (scripts/generate.sh writes them; tests/test_mixin.py fails when a copy drifts).
`ollama-exporter assets` lists them, prints one, or writes them out in the repository's layout.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import click

# name -> path, both in this package and in the repository
ASSETS = {
    "dashboard": "grafana/ollama-exporter.json",
    "rules": "alerts/ollama-exporter.rules.yml",
    "prometheusrule": "deploy/kubernetes/prometheusrule.yaml",
    "dashboards-configmap": "deploy/kubernetes/dashboards-configmap.yaml",
    "systemd-unit": "systemd/ollama-exporter.service",
    "systemd-env": "systemd/ollama-exporter.env",
    "mixin-config": "examples/mixin.yml",
}


def text(name: str) -> str:
    return resources.files(__name__).joinpath(ASSETS[name]).read_text(encoding="utf-8")


def write(out: Path, names: tuple[str, ...] = ()) -> list[Path]:
    written = []
    for name in names or tuple(ASSETS):
        path = Path(out) / ASSETS[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text(name), encoding="utf-8")
        written.append(path)
    return written


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("names", nargs=-1, type=click.Choice(list(ASSETS)), metavar="[NAME]...")
@click.option("--out", metavar="DIR", type=click.Path(file_okay=False),
              help="Write the named files (default: all) under DIR, in the repository's layout.")
def assets(names: tuple[str, ...], out: str) -> None:
    """The dashboard, rules, Kubernetes objects and systemd unit shipped with this version.

    Without arguments, list them; with NAMEs, print them; with --out DIR, write them under DIR.
    """
    if out:
        for path in write(Path(out), names):
            click.echo(path)
    elif names:
        for name in names:
            sys.stdout.write(text(name))
    else:
        width = max(map(len, ASSETS))
        for name, path in ASSETS.items():
            click.echo(f"{name:<{width}}  {path}")

"""A wheel carries the dashboard, the rules, the Kubernetes objects, the systemd unit and the mixin config,
and `ollama-exporter assets` run from that wheel (no checkout beside it) lists, prints and writes them.

The wheel is built from a copy of the package sources (pip, as a user's `pip install .` or pipx would),
then unpacked and run from there; tests/test_mixin.py proves the packaged copies equal the repository's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ollama_exporter.assets import ASSETS
from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    shutil.copytree(REPO / "ollama_exporter", src / "ollama_exporter",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    # pip's isolated build, as for a user (it fetches the build backend pyproject.toml names)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("ollama_exporter-*.whl")
    return path


def test_the_wheel_holds_every_asset(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for path in ASSETS.values():
            member = f"ollama_exporter/assets/{path}"
            assert member in names, f"{member} is not in {wheel.name}"
            assert z.read(member) == (REPO / path).read_bytes(), member


def test_the_command_from_the_wheel_writes_and_prints_them(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ollama_exporter", "assets", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env=env)

    where = subprocess.run([sys.executable, "-c", "import ollama_exporter; print(ollama_exporter.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, env=env)
    assert where.stdout.startswith(str(site)), where.stdout  # the wheel's package, not the checkout

    listed = cli()
    assert listed.returncode == 0 and [line.split() for line in listed.stdout.splitlines()] == \
        [[name, path] for name, path in ASSETS.items()]

    written = cli("--out", str(tmp_path / "out"))
    assert written.returncode == 0, written.stderr
    assert written.stdout.split() == [str(tmp_path / "out" / path) for path in ASSETS.values()]
    for path in ASSETS.values():
        assert (tmp_path / "out" / path).read_bytes() == (REPO / path).read_bytes(), path

    printed = cli("systemd-unit")
    assert printed.returncode == 0 and printed.stdout == (REPO / "systemd" / "ollama-exporter.service").read_text()

    unknown = cli("nope")
    assert unknown.returncode == 2 and "Invalid value for '[NAME]...'" in unknown.stderr

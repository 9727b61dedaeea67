"""The repository stands alone: a plain clone has every file its tests read, and names no path of the
machine it was written on."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO

FIXTURE_KINDS = ("ps", "tags", "show", "version", "generate", "errors")
# Paths that only exist on a developer's machine (the workspace the project was written in, a
# reading-material folder beside the checkout, a home directory's interpreter).
MACHINE_PATHS = ("/" + "work/", ".." + "/shared", "/." + "pyenv/")  # spelt so this file does not name them


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        return [REPO / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # an unpacked tarball: every file but caches
        return [p for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts]


@pytest.mark.parametrize("kind", FIXTURE_KINDS)
def test_captured_fixtures_are_in_the_repository(kind):
    files = list((FIXTURES / "api" / kind).iterdir())
    assert files, f"no captured fixtures in {FIXTURES / 'api' / kind}"
    assert (FIXTURES / "PROVENANCE.md").is_file()
    assert list((FIXTURES / "logs").glob("*.log"))


def test_no_file_names_a_path_outside_the_repository():
    patterns = list(MACHINE_PATHS)
    parent = str(REPO.parent)
    if parent not in ("/", "/tmp", "/var/tmp", "/root", "/home"):
        patterns.append(parent + "/")  # wherever this checkout lives, nothing may point beside it
    offenders = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            hits = [p for p in patterns if p in line]
            if hits:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {hits[0]}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders[:20])

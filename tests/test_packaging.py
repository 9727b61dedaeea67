"""What the package says about itself is true: one version, the licence it names, and Python versions
that are checked (vermin for the floor here; scripts/test-pythons.sh runs the tests on each)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata

import pytest

from ollama_exporter import __version__
from tests.conftest import REPO
from tests.test_repository import tracked_files

DIST = "ollama-exporter"


def dist_metadata():
    try:
        return metadata.metadata(DIST)
    except metadata.PackageNotFoundError:
        pytest.skip("the package is not installed (scripts/test.sh installs it)")


def test_the_version_is_written_only_in_the_package():
    """setuptools reads ollama_exporter.__version__; nothing else may repeat the number."""
    assert dist_metadata()["Version"] == __version__, "installed metadata is stale: reinstall (scripts/test.sh)"
    pattern = re.compile(r"(?<![\d.])" + re.escape(__version__) + r"(?![\d.])")
    allowed = {REPO / "ollama_exporter" / "__init__.py", REPO / "CHANGELOG.md",
               # image tags and the image's VERSION default must name it: tests/test_deploy.py and
               # tests/test_container.py fail when they differ from __version__
               REPO / "Dockerfile"}
    offenders = []
    for path in tracked_files():
        parts = path.relative_to(REPO).parts
        if path in allowed or "fixtures" in parts or parts[0] == "deploy":
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        offenders += [f"{path.relative_to(REPO)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                      if pattern.search(line)]
    assert not offenders, f"version {__version__} hard-coded in: {', '.join(offenders)}"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "ollama_exporter.__version__" }' in pyproject


def test_the_changelog_has_an_entry_for_this_version_and_an_unreleased_section():
    text = (REPO / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, re.MULTILINE)
    assert headings[0] == ("Unreleased", "")
    released = headings[1:]
    assert released and all(date for _, date in released), "every release heading needs a date"
    assert released[0][0] == __version__, "the newest release in CHANGELOG.md is not __version__"


def test_the_license_file_is_the_apache_license_pyproject_names():
    meta = dist_metadata()
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) == 201
    assert meta["License"] == "Apache-2.0"
    assert "License :: OSI Approved :: Apache Software License" in meta.get_all("Classifier")
    assert "LICENSE" in (meta.get_all("License-File") or []), "setuptools would leave LICENSE out of the wheel"


def claimed_pythons() -> tuple[str, list[tuple[int, int]]]:
    meta = dist_metadata()
    versions = sorted(tuple(map(int, c.rsplit(":: ", 1)[1].split("."))) for c in meta.get_all("Classifier")
                      if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    return meta["Requires-Python"], versions


def test_requires_python_and_the_classifiers_claim_the_same_versions():
    requires, versions = claimed_pythons()
    floor = versions[0]
    assert requires == f">={floor[0]}.{floor[1]}"
    assert versions == [(3, minor) for minor in range(floor[1], versions[-1][1] + 1)], "a gap in the classifiers"
    assert sys.version_info[:2] >= floor


def vermin(target: str, *paths: str) -> subprocess.CompletedProcess:
    exe = shutil.which("vermin", path=str(REPO / ".venv" / "bin")) or shutil.which("vermin")
    if exe is None:
        pytest.skip("vermin is not installed (it is in the test extra; scripts/test.sh installs it)")
    return subprocess.run([exe, "--no-tips", "--no-parse-comments", "--eval-annotations", "--violations",
                           f"--target={target}-", *paths], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_vermin_proves_the_package_runs_on_the_claimed_floor(tmp_path):
    _, versions = claimed_pythons()
    floor = "{}.{}".format(*versions[0])
    result = vermin(floor, "ollama_exporter")
    assert result.returncode == 0, f"constructs newer than Python {floor}:\n{result.stdout}{result.stderr}"
    # The check can fail: a construct of the next version is caught.
    newer = tmp_path / "newer.py"
    newer.write_text({(3, 9): "match 1:\n    case 1:\n        pass\n", (3, 10): "import tomllib\n"}[versions[0]])
    caught = vermin(floor, str(newer))
    assert caught.returncode != 0 and "not met" in caught.stdout + caught.stderr

"""The README stays true: every metric and config key is documented, and CI runs the README's test command."""

from __future__ import annotations

import re

from ollama_exporter.config import KEYS, flag_name
from ollama_exporter.metrics import DEFS
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_every_metric_is_in_the_readme_table_with_its_type_and_labels():
    rows = {m.group(1): m for m in re.finditer(r"^\| `([a-z_]+)` \| (\w+) \| ([^|]*) \|", README, re.MULTILINE)}
    for name, d in DEFS.items():
        assert name in rows, f"{name} is not in the README's metrics table"
        assert rows[name].group(2) == d.kind, name
        labels = rows[name].group(3).strip()
        assert labels == (", ".join(d.labels) or "—"), f"{name}: README says labels {labels!r}"


def test_every_config_key_and_flag_is_in_the_readme():
    for key in KEYS:
        assert f"`{key.name}`" in README, key.name
        assert key.file_only or f"`{flag_name(key)}`" in README, flag_name(key)


def test_ci_runs_the_readme_test_command():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)\n```", setup, re.DOTALL)
    assert len(blocks) == 2 and all("\n" not in b for b in blocks), "Set up holds exactly two one-line commands"
    test_command = blocks[1].strip()
    assert test_command in (REPO / ".ci" / "run").read_text()


FAULT_MATRIX = REPO / "docs" / "fault-matrix.md"


def test_every_row_of_the_fault_matrix_names_a_test_that_exists():
    """docs/fault-matrix.md says, for each fault, which test proves what the exporter does: a renamed or
    deleted test must take its row with it (or the row must name the test that replaced it)."""
    rows = [line for line in FAULT_MATRIX.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| case ")]
    assert len(rows) >= 82, f"{len(rows)} cases: issue 9 tried 82"
    sources: dict[str, str] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 3 and all(cells), f"a row needs a case, what happens and a test: {row}"
        named = re.fullmatch(r"`(tests/[\w/]+\.py)::(test_\w+)`", cells[2])
        assert named, f"the last cell must be `tests/FILE.py::test_name`: {row}"
        path, name = named.groups()
        if path not in sources:
            assert (REPO / path).is_file(), f"{path} does not exist ({row})"
            sources[path] = (REPO / path).read_text()
        assert re.search(rf"^def {name}\(", sources[path], re.MULTILINE), f"{path} has no {name} ({row})"

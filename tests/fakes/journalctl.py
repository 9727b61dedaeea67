"""A fake `journalctl` over a JSON-lines journal file, and the writer of that file (`FakeJournal`).

The exporter runs `journalctl --unit U --output json --all --follow --no-pager --output-fields MESSAGE`
with `--after-cursor C` or `--lines 0`. This fake honours those options as systemd's journalctl does
(and `--cursor`, inclusive; `-u`, `-o`, `-f`, `-n` short forms; `--unit=NAME` with or without
`.service`), prints one JSON object per entry with MESSAGE plus the always-present __CURSOR and
__REALTIME_TIMESTAMP, MESSAGE as an array of byte values when it is not valid UTF-8, and keeps
following the file with --follow. `FAKE_JOURNAL` names the journal file. With `FAKE_JOURNAL_DENIED`
set it behaves like journalctl run by a user outside the systemd-journal group: a hint on stderr,
then nothing. An unparseable cursor fails like the real one ("Failed to seek to cursor", exit 1).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Optional, Union

HERE = Path(__file__).resolve()


class FakeJournal:
    """The journal file the fake journalctl reads; `install` puts a `journalctl` on a PATH directory."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.path.touch()
        self.count = sum(1 for _ in self.path.open("rb"))

    def append(self, message: Union[str, bytes], unit: str = "ollama.service", **fields: str) -> str:
        """Add one entry; returns its cursor."""
        self.count += 1
        cursor = f"s=0123456789abcdef;i={self.count:x};b=fakeboot;m={self.count:x};t={time.time_ns() // 1000:x}"
        if isinstance(message, bytes):
            try:
                message = message.decode("utf-8")
            except UnicodeDecodeError:
                message = list(message)  # journalctl's own rendering of a binary field
        entry = {"__CURSOR": cursor, "__REALTIME_TIMESTAMP": str(time.time_ns() // 1000), "_SYSTEMD_UNIT": unit,
                 "MESSAGE": message, **fields}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        return cursor

    def extend(self, messages, unit: str = "ollama.service") -> None:
        for message in messages:
            self.append(message, unit)

    def install(self, bin_dir: Union[str, Path]) -> Path:
        """Write an executable `journalctl` into bin_dir that runs this module with this interpreter."""
        bin_dir = Path(bin_dir)
        bin_dir.mkdir(parents=True, exist_ok=True)
        script = bin_dir / "journalctl"
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE}" "$@"\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return script

    def env(self, bin_dir: Union[str, Path]) -> dict[str, str]:
        """Environment for a process that should find this journal's journalctl first on PATH."""
        self.install(bin_dir)
        return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_JOURNAL": str(self.path)}


def _parse(argv: list[str]) -> dict:
    opts: dict = {"unit": None, "after": None, "cursor": None, "lines": None, "follow": False, "fields": None,
                  "output": "short"}
    names = {"-u": "unit", "--unit": "unit", "--after-cursor": "after", "--cursor": "cursor", "-n": "lines",
             "--lines": "lines", "-o": "output", "--output": "output", "--output-fields": "fields"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, sep, value = arg.partition("=")
        if key in names:
            if not sep:
                i += 1
                value = argv[i]
            opts[names[key]] = value
        elif arg in ("-f", "--follow"):
            opts["follow"] = True
        elif arg in ("--all", "-a", "--no-pager", "-q", "--quiet"):
            pass
        else:
            sys.stderr.write(f"journalctl: unrecognized option '{arg}'\n")
            sys.exit(1)
        i += 1
    return opts


def _seq(cursor: str) -> Optional[int]:
    for part in cursor.split(";"):
        if part.startswith("i="):
            try:
                return int(part[2:], 16)
            except ValueError:
                return None
    return None


def main(argv: list[str]) -> int:
    opts = _parse(argv)
    if os.environ.get("FAKE_JOURNAL_DENIED"):
        sys.stderr.write("Hint: You are currently not seeing messages from other users and the system.\n"
                         "      Users in groups 'adm', 'systemd-journal' can see all messages.\n")
        sys.stderr.flush()
        while opts["follow"]:
            time.sleep(1)
        return 0
    unit = opts["unit"]
    if unit and "." not in unit:
        unit += ".service"
    start_after = 0  # print entries with sequence number > start_after
    for key, inclusive in (("after", False), ("cursor", True)):
        if opts[key] is not None:
            seq = _seq(opts[key])
            if seq is None:
                sys.stderr.write("Failed to seek to cursor: Invalid argument\n")
                return 1
            start_after = seq - 1 if inclusive else seq
    path = Path(os.environ["FAKE_JOURNAL"])
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if opts["lines"] is not None and opts["after"] is None and opts["cursor"] is None:
        start_after = max(0, len(entries) - int(opts["lines"]))
    fields = set(opts["fields"].split(",")) if opts["fields"] else None
    out = sys.stdout
    offset = 0
    with path.open("rb") as fh:
        while True:
            line = fh.readline()
            if not line.endswith(b"\n"):
                if not opts["follow"]:
                    return 0
                fh.seek(-len(line), os.SEEK_CUR) if line else None
                time.sleep(0.02)
                continue
            offset += 1
            entry = json.loads(line)
            if offset <= start_after or (unit and entry.get("_SYSTEMD_UNIT") != unit):
                continue
            if opts["output"] == "json":
                shown = {k: v for k, v in entry.items()
                         if fields is None or k in fields or k in ("__CURSOR", "__REALTIME_TIMESTAMP")}
                out.write(json.dumps(shown, ensure_ascii=False) + "\n")
            else:
                message = entry.get("MESSAGE")
                out.write((bytes(message).decode("utf-8", "replace") if isinstance(message, list) else message) + "\n")
            out.flush()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (BrokenPipeError, KeyboardInterrupt):
        sys.exit(0)

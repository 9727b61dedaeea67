"""The log follower's state file: its position in the log and the counters it has published, together.

Both are written in one file, atomically (a temporary file in the same directory, fsync, rename), so
after any stop, clean or not, the counters and the position agree: a restarted exporter goes on from
the published counters at the line after the last one they include. Nothing is lost and nothing is
counted twice, and Prometheus never sees the counters go backwards. Without a writable place (no
`logs.state_file` and no systemd StateDirectory=) the state lives in memory only: counters then start
at zero after a restart and reading starts at the end of the log.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Mapping, Optional

STATE_FILE_NAME = "logs-state.json"


def default_state_path(environ: Mapping[str, str]) -> Optional[str]:
    """$STATE_DIRECTORY/logs-state.json when systemd set StateDirectory= (its first directory), else None."""
    directories = environ.get("STATE_DIRECTORY", "").strip()
    if not directories:
        return None
    return os.path.join(directories.split(":")[0], STATE_FILE_NAME)


class StateFile:
    def __init__(self, path: str):
        self.path = path

    def load(self) -> Optional[dict]:
        """The saved state, or None when there is none yet. Raises ValueError for an unreadable one."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ValueError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ValueError(f"{self.path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{self.path}: expected a JSON object")
        return data

    def save(self, data: dict) -> None:
        """Replace the file atomically; raises OSError when the directory is not writable."""
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".logs-state-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

"""Log lines a machine can read: logfmt (default) or JSON, one line per event, on stderr.

Lines look like promslog's: ``time=2026-11-30T09:10:09.923Z level=warn caller=poller.py:212
msg="source failed" source=ps reason=timeout``. Times are RFC 3339 in UTC with milliseconds, levels are
debug/info/warn/error, every value that needs it is quoted and escaped, and the things people grep for
are fields of their own (source, model, reason, url, duration, ...), passed with ``extra=``. A message
is a short constant phrase: the variable parts belong in fields, so that repeated events share it.

A flood of lines with the same message (a /api/ps answer with 100 000 new models, say) is held to
`BURST` lines per `WINDOW` seconds per logger, level and message; the rest are counted and reported
in one line when the window ends.

logfmter (PyPI) was considered: matching promslog's level names, UTC RFC 3339 times and the quoting
of every value kind would mean overriding most of it, so this small formatter is written here.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error",
          logging.CRITICAL: "error"}
PY_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
_RECORD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
BURST = 20
WINDOW = 60.0


def rfc3339(seconds: float) -> str:
    t = datetime.fromtimestamp(seconds, timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def fields(record: logging.LogRecord) -> list[tuple[str, Any]]:
    """The ordered key/value pairs of one record: time, level, caller, msg, then its own fields."""
    out: list[tuple[str, Any]] = [
        ("time", rfc3339(record.created)),
        ("level", LEVELS.get(record.levelno, "info")),
        ("caller", f"{record.module}.py:{record.lineno}"),
        ("msg", record.getMessage()),
    ]
    out += [(k, v) for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")]
    if record.exc_info and record.exc_info[0] is not None:
        out.append(("error", f"{record.exc_info[0].__name__}: {record.exc_info[1]}"))
        out.append(("traceback", logging.Formatter().formatException(record.exc_info)))
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


_BREAKS = "\x85\u2028\u2029"  # line breaks besides the ASCII ones that json.dumps escapes already


def _json_string(text: str) -> str:
    """A JSON string literal that holds no line break of any kind (so a line stays one line)."""
    quoted = json.dumps(text, ensure_ascii=False)
    if any(c in quoted for c in _BREAKS):
        for c in _BREAKS:
            quoted = quoted.replace(c, f"\\u{ord(c):04x}")
    return quoted


def logfmt_value(value: Any) -> str:
    text = _text(value)
    if text and all(c > " " and c not in '"=\\\x7f' + _BREAKS for c in text):
        return text
    return _json_string(text)  # quotes, backslashes and control characters escaped


def _key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in name) or "_"


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{_key(k)}={logfmt_value(v)}" for k, v in fields(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {}
        for k, v in fields(record):
            data[_key(k)] = v if isinstance(v, (bool, int, float)) or v is None else _text(v)
        line = json.dumps(data, ensure_ascii=False)
        if any(c in line for c in _BREAKS):
            for c in _BREAKS:
                line = line.replace(c, f"\\u{ord(c):04x}")
        return line


class FloodFilter(logging.Filter):
    """At most BURST lines per (logger, level, message) in each WINDOW; says how many it held back."""

    def __init__(self, burst: int = BURST, window: float = WINDOW, clock=time.monotonic):
        super().__init__()
        self.burst, self.window, self.clock = burst, window, clock
        self._lock = threading.Lock()
        self._seen: dict[tuple, list] = {}  # key -> [window start, lines in window, lines held back]
        self._swept = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_summary", False):
            return True
        key = (record.name, record.levelno, record.msg)
        now = self.clock()
        with self._lock:
            ended = self._sweep(now) if now - self._swept >= 1.0 or len(self._seen) > 1000 else []
            entry = self._seen.setdefault(key, [now, 0, 0])
            entry[1] += 1
            allowed = entry[1] <= self.burst
            entry[2] += 0 if allowed else 1
        for (logger, level, msg), held in ended:
            logging.getLogger(logger).log(level, "repeated log lines suppressed",
                                          extra={"suppressed": held, "repeated_msg": str(msg), "_summary": True})
        return allowed

    def _sweep(self, now: float) -> list[tuple[tuple, int]]:
        """Close the windows that have ended; returns (key, lines held back) for those that held any."""
        self._swept = now
        ended = [k for k, (start, _, _) in self._seen.items() if now - start >= self.window]
        if len(self._seen) - len(ended) > 1000:  # messages are constants; this only guards against misuse
            ended = list(self._seen)
        return [(k, held) for k in ended for _, _, held in [self._seen.pop(k)] if held]


def setup(level: str = "info", fmt: str = "logfmt", stream=None) -> None:
    """Send every ollama_exporter log line to stderr in `fmt`, from `level` up; may be called again (reload)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    handler.addFilter(FloodFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(PY_LEVELS[level])

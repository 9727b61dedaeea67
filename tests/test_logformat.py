"""Log lines a machine can read: logfmt and JSON, RFC 3339 UTC, promslog levels, fields, flood control."""

from __future__ import annotations

import io
import json
import logging

import logfmtkv
import pytest

from ollama_exporter import logformat
from tests.conftest import TIME_RE, check_log_lines

AWKWARD = ['plain', 'two words', 'quo"te', 'back\\slash', 'new\nline', 'tab\t', 'ünï 模型', 'a=b', '', '\x00\x1b[31m',
           '\u2028sep']


@pytest.fixture
def capture():
    stream = io.StringIO()
    logger = logging.getLogger("ollama_exporter.test")

    def lines(fmt: str) -> list[str]:
        stream.seek(0)
        stream.truncate()
        logformat.setup("debug", fmt, stream)
        for i, value in enumerate(AWKWARD):
            logger.warning("source failed", extra={"source": "ps", "model": value, "reason": "timeout",
                                                   "duration": 1.25, "count": i, "flag": True})
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            logger.error("poll failed unexpectedly", exc_info=True)
        logging.getLogger().removeHandler(logging.getLogger().handlers[0])
        return stream.getvalue().splitlines()

    yield lines
    logformat.setup("info", "logfmt")


def test_logfmt_lines_parse_strictly_and_keep_every_value(capture):
    lines = capture("logfmt")
    assert len(lines) == len(AWKWARD) + 1  # one line per event, newlines in values escaped
    for value, line in zip(AWKWARD, lines):
        record = logfmtkv.parse(line, strict=True)
        assert list(record)[:4] == ["time", "level", "caller", "msg"]
        assert TIME_RE.match(record["time"]) and record["level"] == "warn"
        assert record["msg"] == "source failed" and record["source"] == "ps" and record["reason"] == "timeout"
        assert record["model"] == value and record["duration"] == "1.25" and record["flag"] == "true"
    error = logfmtkv.parse(lines[-1], strict=True)
    assert error["level"] == "error" and error["error"] == "ValueError: boom\nsecond line"
    assert "Traceback" in error["traceback"]
    assert lines[0].startswith("time=") and " level=warn caller=test_logformat.py:" in lines[0]


def test_json_lines_parse_and_keep_types(capture):
    lines = capture("json")
    for value, line in zip(AWKWARD, lines):
        record = json.loads(line)
        assert record["model"] == value and record["duration"] == 1.25 and record["count"] >= 0
        assert record["flag"] is True and record["level"] == "warn"
    assert check_log_lines("\n".join(lines), "json")


def test_levels_are_prometheus_style():
    assert logformat.LEVELS == {10: "debug", 20: "info", 30: "warn", 40: "error", 50: "error"}


def test_a_flood_of_one_message_is_held_and_summarised():
    now = [0.0]
    flood = logformat.FloodFilter(burst=5, window=60, clock=lambda: now[0])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logformat.LogfmtFormatter())
    handler.addFilter(flood)
    logger = logging.getLogger("ollama_exporter.flood")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(1000):
            logger.info("model loaded", extra={"model": f"m{i}"})
        logger.info("other message")  # another message is not held back by the flood
        now[0] = 61.0
        logger.info("model loaded", extra={"model": "after"})
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    records = [logfmtkv.parse(line, strict=True) for line in stream.getvalue().splitlines()]
    assert [r["msg"] for r in records].count("model loaded") == 6
    assert any(r["msg"] == "other message" for r in records)
    summary = next(r for r in records if r["msg"] == "repeated log lines suppressed")
    assert summary["suppressed"] == "995" and summary["repeated_msg"] == "model loaded"

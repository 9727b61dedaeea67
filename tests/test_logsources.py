"""Line sources: a file tailed through rotation and restarts, the journal through the fake journalctl,
and pipes that must never stall their writer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ollama_exporter.logsources import (MAX_LINE, FileSource, JournaldSource, LineSplitter, PipeSource,
                                        SourceFailure)
from tests.fakes.journalctl import FakeJournal
from tests.fakes.ollama_log import LogFile


def drain(source, until=None, timeout: float = 5.0) -> list:
    """Read until `until(lines)` holds (default: the source says it is caught up)."""
    lines: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = source.read(0.05)
        lines.extend(batch.lines)
        if (until(lines) if until else batch.caught_up and not batch.lines):
            return lines
    pytest.fail(f"source did not deliver in {timeout}s; got {lines[-5:]}")


# --- splitting -------------------------------------------------------------------------------------------------

def test_splitter_joins_chunks_and_tracks_the_unfinished_line():
    s = LineSplitter()
    assert s.feed(b"ab") == [] and s.pending == 2
    assert s.feed(b"c\r\nde\nf") == [b"abc", b"de"] and s.pending == 1
    assert s.feed(b"\n") == [b"f"] and s.pending == 0


def test_splitter_turns_an_overlong_line_into_one_none_without_holding_it():
    s = LineSplitter(max_line=10)
    assert s.feed(b"x" * 8) == []
    assert s.feed(b"y" * 50) == [] and s._partial == b""  # noqa: SLF001 - nothing of it is kept
    assert s.pending == 58
    assert s.feed(b"zz\nok\n") == [None, b"ok"]
    assert s.feed(b"q" * 11 + b"\n") == [None]


def test_splitter_flush_gives_the_last_words_of_a_rotated_file():
    s = LineSplitter()
    s.feed(b"done\nhalf")
    assert s.flush() == [b"half"] and s.pending == 0 and s.flush() == []


# --- files ---------------------------------------------------------------------------------------------------

@pytest.fixture
def logfile(tmp_path) -> LogFile:
    return LogFile(tmp_path / "logs" / "server.log")


def tail(logfile: LogFile, poll_interval: float = 0.25) -> FileSource:
    """A source opened without a position and read once: it now follows from the end."""
    src = FileSource(str(logfile.path), poll_interval=poll_interval)
    src.open(None)
    drain(src)
    return src


def test_file_starts_at_the_end_the_first_time(logfile):
    logfile.write(["old 1", "old 2"])
    src = FileSource(str(logfile.path))
    src.open(None)
    logfile.write(["new"])  # after open(), before the first read: new
    assert drain(src, lambda ls: ls) == [b"new"]


def test_file_resumes_at_its_position_and_waits_for_whole_lines(logfile):
    src = tail(logfile)
    logfile.write(["one"])
    logfile.write_raw(b"tw")
    assert drain(src, lambda ls: ls) == [b"one"]
    position = src.position()
    src.close()
    logfile.write_raw(b"o\nthree\n")
    again = FileSource(str(logfile.path))
    again.open(position)
    assert drain(again, lambda ls: len(ls) >= 2) == [b"two", b"three"]


def test_file_follows_rename_rotation_without_losing_the_old_tail(logfile):
    src = tail(logfile, poll_interval=0.01)
    logfile.write(["before"])
    logfile.write_raw(b"last words")  # no newline yet when the app renames the file
    logfile.rotate_rename()
    logfile.write(["after 1", "after 2"])
    assert drain(src, lambda ls: len(ls) >= 4) == [b"before", b"last words", b"after 1", b"after 2"]


def test_file_rotated_while_stopped_is_finished_by_inode_first(logfile):
    src = tail(logfile)
    logfile.write(["seen"])
    drain(src, lambda ls: ls)
    position = src.position()
    src.close()
    logfile.write(["unseen tail"])
    logfile.rotate_rename()
    logfile.rotate_rename()  # two Ollama restarts: the file we were reading is now server-2.log
    logfile.write(["new file"])
    again = FileSource(str(logfile.path))
    again.open(position)
    assert drain(again, lambda ls: len(ls) >= 2) == [b"unseen tail", b"new file"]
    assert again.position()["ino"] == os.stat(logfile.path).st_ino


def test_file_truncated_in_place_restarts_at_zero(logfile):
    src = tail(logfile, poll_interval=0.01)
    logfile.write(["a long line before copytruncate", "another"])
    drain(src, lambda ls: len(ls) >= 2)
    logfile.truncate()
    drain(src)
    logfile.write(["fresh"])
    assert drain(src, lambda ls: ls) == [b"fresh"]


def test_file_truncated_while_stopped_restarts_at_zero(logfile):
    src = tail(logfile)
    logfile.write(["x" * 100])
    drain(src, lambda ls: ls)
    position = src.position()
    logfile.truncate()
    logfile.write(["short"])
    again = FileSource(str(logfile.path))
    again.open(position)
    assert drain(again, lambda ls: ls) == [b"short"]


def test_missing_file_is_a_clear_failure_until_it_appears(tmp_path):
    src = FileSource(str(tmp_path / "server.log"))
    src.open(None)
    with pytest.raises(SourceFailure) as info:
        src.read(0.01)
    assert info.value.reason == "not_found" and "server.log" in str(info.value)
    LogFile(tmp_path / "server.log").write(["written after the exporter started"])
    assert drain(src, lambda ls: ls) == [b"written after the exporter started"]  # all of it is new


def test_long_and_invalid_lines_pass_as_bytes(logfile):
    src = tail(logfile)
    logfile.write_raw(b"\xff\xfebad utf-8\n" + b"L" * (MAX_LINE + 10) + b"\nok\n")
    assert drain(src, lambda ls: len(ls) >= 3) == [b"\xff\xfebad utf-8", None, b"ok"]


# --- journald through the fake journalctl ------------------------------------------------------------------

@pytest.fixture
def journal(tmp_path, monkeypatch) -> FakeJournal:
    j = FakeJournal(tmp_path / "journal.jsonl")
    script = j.install(tmp_path / "bin")
    monkeypatch.setenv("FAKE_JOURNAL", str(j.path))
    j.journalctl = str(script)
    return j


def test_journal_starts_at_the_end_and_follows(journal):
    journal.append("before the exporter")
    src = JournaldSource("ollama", journal.journalctl)
    src.open(None)
    try:
        drain(src)
        journal.append("one")
        journal.append("other unit", unit="sshd.service")
        journal.append(b"\xffbinary")
        assert drain(src, lambda ls: len(ls) >= 2) == [b"one", b"\xffbinary"]
    finally:
        src.close()


def test_journal_resumes_after_its_cursor(journal):
    src = JournaldSource("ollama.service", journal.journalctl)
    src.open(None)
    try:
        drain(src)
        journal.extend(["a", "b"])
        assert drain(src, lambda ls: len(ls) >= 2) == [b"a", b"b"]
        position = src.position()
    finally:
        src.close()
    journal.extend(["c", "d"])
    again = JournaldSource("ollama.service", journal.journalctl)
    again.open(position)
    try:
        assert drain(again, lambda ls: len(ls) >= 2) == [b"c", b"d"]
        time.sleep(0.2)
        assert drain(again) == []  # nothing twice
    finally:
        again.close()


def test_journal_bad_cursor_and_denied_access_are_reported(journal, monkeypatch):
    src = JournaldSource("ollama", journal.journalctl)
    src.open({"cursor": "garbage"})
    with pytest.raises(SourceFailure) as info:
        drain(src, lambda ls: False, timeout=5)
    assert info.value.reason == "exited" and "Failed to seek to cursor" in str(info.value)
    try:  # the next start goes on from the end of the journal instead of failing forever
        drain(src)
        journal.append("after the bad cursor")
        assert drain(src, lambda ls: ls) == [b"after the bad cursor"]
    finally:
        src.close()
    monkeypatch.setenv("FAKE_JOURNAL_DENIED", "1")
    denied = JournaldSource("ollama", journal.journalctl)
    denied.open(None)
    try:
        with pytest.raises(SourceFailure) as info:
            drain(denied, lambda ls: False, timeout=5)
        assert info.value.reason == "no_permission" and "systemd-journal" in str(info.value)
    finally:
        denied.close()


def test_journalctl_missing(tmp_path):
    src = JournaldSource("ollama", str(tmp_path / "no-journalctl"))
    src.open(None)
    with pytest.raises(SourceFailure) as info:
        src.read(0.01)
    assert info.value.reason == "not_found"


# --- pipes -------------------------------------------------------------------------------------------------

def test_command_output_and_its_end(tmp_path):
    src = PipeSource([sys.executable, "-c", "print('x'); print('y'); import sys; sys.stderr.write('bye\\n')"])
    src.open(None)
    with pytest.raises(SourceFailure) as info:
        drain(src, lambda ls: False)
    assert info.value.reason == "exited" and "bye" in str(info.value)


def test_command_lines(tmp_path):
    src = PipeSource([sys.executable, "-c", "import time; print('x'); print('y', flush=True); time.sleep(30)"])
    src.open(None)
    try:
        assert drain(src, lambda ls: len(ls) >= 2) == [b"x", b"y"]
    finally:
        src.close()


def test_pipe_drops_and_counts_rather_than_stall_the_writer():
    """Ollama piped into the exporter must never wait for the parser: a full buffer drops whole chunks."""
    writer = subprocess.Popen([sys.executable, "-c", "import sys\nfor i in range(200000): print('line', i)"],
                              stdout=subprocess.PIPE)
    src = PipeSource(stdin=writer.stdout, max_buffered=64 * 1024)
    src.open(None)
    src.read(0)  # the drain thread starts with the first read
    assert writer.wait(20) == 0  # finished although nobody read yet
    got, dropped = 0, 0
    with pytest.raises(SourceFailure):
        while True:
            batch = src.read(0.1)
            got += len(batch.lines)
            dropped += batch.dropped
    assert dropped > 0 and got + dropped == 200000

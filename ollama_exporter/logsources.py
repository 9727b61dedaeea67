"""Where Ollama's log lines come from: a file, the journal, a command's output or stdin.

Every source hands out complete lines (bytes, without the newline) in batches through `read()`, which
waits at most `wait` seconds and never longer, and says where it stands (`position()`) so that a
follower can persist it and `open()` there again after a restart:
- `FileSource` tails a path by inode and offset. Rotation by rename (the macOS/Windows app renames
  server.log at each Ollama start; Docker's json-file and logrotate do the same) is followed: the old
  file is read to its end, then the new one from its start; after a restart it finds the renamed file
  by inode in the same directory. Truncation in place (copytruncate) restarts at offset 0.
- `JournaldSource` runs `journalctl -u UNIT -o json -f` from the last cursor (`--after-cursor`).
- `PipeSource` reads a command's stdout or our own stdin. A pipe cannot be rewound and a slow reader
  would stall the writer (Ollama itself when it is piped into us), so a drain thread keeps at most
  MAX_BUFFERED bytes and drops, and counts, whole chunks beyond that.
Lines longer than MAX_LINE come out as None (counted malformed) and are never held in memory.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Optional, Sequence

MAX_LINE = 64 * 1024  # Ollama's longest real lines (server config, runner command) are a few KiB
MAX_JOURNAL_LINE = 8 * MAX_LINE  # journalctl's JSON, with escapes, for one MAX_LINE message
MAX_BUFFERED = 4 * 1024 * 1024  # what a pipe source holds for the parser before it drops
READ_SIZE = 64 * 1024


class SourceFailure(Exception):
    """The source cannot be read right now; `reason` is one of LOG_ERROR_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


LOG_ERROR_REASONS = ("not_found", "no_permission", "exited", "state_file", "unknown")


@dataclass
class Batch:
    lines: list = field(default_factory=list)  # bytes, or None for a line longer than MAX_LINE
    caught_up: bool = False  # everything the log held at `read_at` has been handed out
    dropped: int = 0  # lines lost to a full buffer (pipe sources only)
    read_at: float = field(default_factory=time.time)


class LineSplitter:
    """Bytes in, complete lines out. `pending` counts the bytes of the unfinished last line, so that a
    source can report the offset just after the last complete line it has handed out."""

    def __init__(self, max_line: int = MAX_LINE):
        self.max_line = max_line
        self._partial = b""
        self._skipping = False  # inside a line already longer than max_line
        self.pending = 0

    def feed(self, data: bytes) -> list:
        parts = data.split(b"\n")
        last = parts.pop()
        lines = []
        for part in parts:
            if self._skipping or len(self._partial) + len(part) > self.max_line:
                lines.append(None)
            else:
                line = self._partial + part if self._partial else part
                lines.append(line[:-1] if line.endswith(b"\r") else line)
            self._partial, self._skipping, self.pending = b"", False, 0
        self.pending += len(last)
        if not self._skipping:
            if len(self._partial) + len(last) > self.max_line:
                self._partial, self._skipping = b"", True
            else:
                self._partial += last
        return lines

    def flush(self) -> list:
        """The unfinished last line as a line (its file was rotated away and will not grow)."""
        lines = self.feed(b"\n") if self.pending else []
        self.reset()
        return lines

    def reset(self) -> None:
        self._partial, self._skipping, self.pending = b"", False, 0


class FileSource:
    kind = "file"

    def __init__(self, path: str, poll_interval: float = 0.25):
        self.path = path
        self.identity = f"file:{os.path.abspath(path)}"
        self.poll_interval = poll_interval
        self._fd: Optional[int] = None
        self._ino: Optional[tuple[int, int]] = None  # (st_dev, st_ino) of the file being read
        self._offset = 0  # offset of the next byte to read from _fd
        self._draining: Optional[tuple[int, tuple[int, int], int]] = None  # rotated file left to finish
        self._splitter = LineSplitter()
        self._start: Optional[dict] = None

    def open(self, position: Optional[dict]) -> None:
        """Resume at `position` ({dev, ino, offset}); without one, at the end of the file as it is now (no
        back-fill), or at the start of a file that does not exist yet (all of it will be new)."""
        if position:
            self._start = dict(position)
            return
        try:
            st = os.stat(self.path)
            self._start = {"dev": st.st_dev, "ino": st.st_ino, "offset": st.st_size}
        except OSError:
            self._start = {"dev": None, "ino": None, "offset": 0, "new": True}

    def position(self) -> dict:
        if self._ino is None:
            return dict(self._start) if self._start and not self._start.get("new") else {}
        offset = self._offset - self._splitter.pending
        if self._draining is not None:  # still reading the renamed file: resume there
            fd, ino, _ = self._draining
            offset = os.lseek(fd, 0, os.SEEK_CUR) - self._splitter.pending
            return {"dev": ino[0], "ino": ino[1], "offset": offset}
        return {"dev": self._ino[0], "ino": self._ino[1], "offset": offset}

    def close(self) -> None:
        for fd in (self._fd, self._draining[0] if self._draining else None):
            if fd is not None:
                os.close(fd)
        self._fd, self._draining = None, None

    def read(self, wait: float) -> Batch:
        if self._fd is None and self._draining is None:
            self._first_open()
        if self._draining is not None:
            return self._drain()
        read_at = time.time()
        data = os.read(self._fd, READ_SIZE)
        if data:
            self._offset += len(data)
            return Batch(self._splitter.feed(data), caught_up=len(data) < READ_SIZE, read_at=read_at)
        batch = self._check_rotation()
        if batch is not None:
            return batch
        time.sleep(min(wait, self.poll_interval))
        return Batch(caught_up=True, read_at=read_at)

    # --- internals ---

    def _stat(self) -> os.stat_result:
        try:
            return os.stat(self.path)
        except FileNotFoundError:
            raise SourceFailure("not_found", f"{self.path}: no such file (yet)") from None
        except PermissionError:
            raise SourceFailure("no_permission", f"{self.path}: permission denied") from None

    def _open_fd(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise SourceFailure("not_found", f"{self.path}: no such file (yet)") from None
        except PermissionError:
            raise SourceFailure("no_permission", f"{self.path}: permission denied") from None

    def _first_open(self) -> None:
        fd = self._open_fd()
        st = os.fstat(fd)
        ino, start = (st.st_dev, st.st_ino), self._start
        self._splitter.reset()
        if start and start.get("new"):
            offset = 0
        elif start and (start.get("dev"), start.get("ino")) == ino:
            offset = start.get("offset", 0) if st.st_size >= start.get("offset", 0) else 0  # truncated meanwhile
        elif start:
            offset = 0  # a new file since we last ran; finish the renamed one first if it is still there
            old = self._find_inode(start.get("dev"), start.get("ino"))
            if old is not None:
                old_fd = os.open(old, os.O_RDONLY)
                os.lseek(old_fd, int(start.get("offset", 0)), os.SEEK_SET)
                self._draining = (old_fd, (start["dev"], start["ino"]), 0)
        else:
            offset = st.st_size
        os.lseek(fd, offset, os.SEEK_SET)
        self._fd, self._ino, self._offset = fd, ino, offset
        self._start = None

    def _find_inode(self, dev: object, ino: object) -> Optional[str]:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            names = os.listdir(directory)
        except OSError:
            return None
        for name in names:
            candidate = os.path.join(directory, name)
            try:
                st = os.stat(candidate)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (dev, ino):
                return candidate
        return None

    def _drain(self) -> Batch:
        fd, ino, _ = self._draining
        data = os.read(fd, READ_SIZE)
        if data:
            return Batch(self._splitter.feed(data))
        lines = self._splitter.flush()
        os.close(fd)
        self._draining = None
        return Batch(lines)

    def _check_rotation(self) -> Optional[Batch]:
        """At EOF: a renamed or truncated file means reading on from somewhere else."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None  # renamed away and not recreated yet: keep the old file until the new one appears
        if (st.st_dev, st.st_ino) != self._ino:
            data = os.read(self._fd, READ_SIZE)  # the last words written before the rename
            if data:
                self._offset += len(data)
                return Batch(self._splitter.feed(data))
            new_fd = self._open_fd()  # if it fails, the old file is still ours and this is retried
            lines = self._splitter.flush()
            os.close(self._fd)
            self._fd = new_fd
            st = os.fstat(self._fd)
            self._ino, self._offset = (st.st_dev, st.st_ino), 0
            return Batch(lines)
        if st.st_size < self._offset:  # truncated in place
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._offset = 0
            self._splitter.reset()
            return Batch()
        return None


class JournaldSource:
    """`journalctl -u UNIT -o json -f`, resumed with `--after-cursor`; a dead journalctl is restarted."""

    kind = "journald"

    def __init__(self, unit: str, journalctl: str = "journalctl"):
        self.unit = unit
        self.identity = f"journald:{unit}"
        self.journalctl = journalctl
        self._cursor: Optional[str] = None
        self._proc: Optional[subprocess.Popen] = None
        self._splitter = LineSplitter(MAX_JOURNAL_LINE)
        self._stderr: collections.deque = collections.deque(maxlen=20)

    def open(self, position: Optional[dict]) -> None:
        self._cursor = (position or {}).get("cursor") or None

    def position(self) -> dict:
        return {"cursor": self._cursor} if self._cursor else {}

    def command(self) -> list[str]:
        where = ["--after-cursor", self._cursor] if self._cursor else ["--lines", "0"]
        return [self.journalctl, "--unit", self.unit, "--output", "json", "--all", "--follow", "--no-pager",
                "--output-fields", "MESSAGE", *where]

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop(proc)

    def read(self, wait: float) -> Batch:
        if self._proc is None:
            self._start()
        proc = self._proc
        read_at = time.time()
        ready, _, _ = select.select([proc.stdout], [], [], wait)
        if not ready:
            self._check_permission()
            return Batch(caught_up=True, read_at=read_at)
        read_at = time.time()
        data = os.read(proc.stdout.fileno(), READ_SIZE)
        if not data:
            self.close()
            detail = "; ".join(self._stderr) or f"exit status {proc.wait()}"
            if "cursor" in detail.lower():  # the journal no longer knows it (vacuumed, another machine): go on
                self._cursor = None  # from the end rather than fail forever
            raise SourceFailure("exited", f"journalctl exited: {detail}")
        batch = Batch(caught_up=len(data) < READ_SIZE, read_at=read_at)
        for raw in self._splitter.feed(data):
            batch.lines.extend(self._entry(raw))
        return batch

    def _start(self) -> None:
        self._splitter.reset()
        self._stderr.clear()
        try:
            self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, close_fds=True)
        except FileNotFoundError:
            raise SourceFailure("not_found", f"{self.journalctl}: command not found") from None
        except PermissionError:
            raise SourceFailure("no_permission", f"{self.journalctl}: permission denied") from None
        threading.Thread(target=_collect, args=(self._proc.stderr, self._stderr), name="journalctl-stderr",
                         daemon=True).start()

    def _check_permission(self) -> None:
        """journalctl without access to the system journal keeps running and only says so on stderr."""
        for text in list(self._stderr):
            if "insufficient permissions" in text or "not seeing messages from other users" in text:
                raise SourceFailure("no_permission", f"journalctl: {text} (add the exporter to the "
                                    "systemd-journal group)")

    def _entry(self, raw: Optional[bytes]) -> list:
        if raw is None:
            return [None]
        try:
            entry = json.loads(raw)
        except ValueError:
            return [None]
        if not isinstance(entry, dict):
            return [None]
        cursor = entry.get("__CURSOR")
        if isinstance(cursor, str):
            self._cursor = cursor
        message = entry.get("MESSAGE")
        if isinstance(message, list):  # journalctl's form for a message that is not valid UTF-8
            try:
                message = bytes(message)
            except (TypeError, ValueError):
                return [None]
        elif isinstance(message, str):
            message = message.encode("utf-8", "surrogateescape")
        else:
            return [None] if message is not None else []
        return [ln[:-1] if ln.endswith(b"\r") else ln for ln in message.split(b"\n")] if len(message) <= MAX_LINE \
            else [None]


class PipeSource:
    """A command's stdout (`argv`) or, with argv None, our own stdin. No position: a pipe cannot resume."""

    kind = "pipe"

    def __init__(self, argv: Optional[Sequence[str]] = None, stdin: Optional[IO[bytes]] = None,
                 max_buffered: int = MAX_BUFFERED):
        self.argv = list(argv) if argv else None
        self.identity = "command:" + " ".join(self.argv) if self.argv else "stdin"
        self._stdin = stdin
        self._max = max_buffered
        self._chunks: collections.deque = collections.deque()
        self._size = 0
        self._dropped = 0
        self._eof = False
        self._short = False  # the drain thread's last read emptied the pipe, at _short_at
        self._short_at = 0.0
        self._cond = threading.Condition()
        self._proc: Optional[subprocess.Popen] = None
        self._splitter = LineSplitter()
        self._started = False
        self._stderr: collections.deque = collections.deque(maxlen=20)

    def open(self, position: Optional[dict]) -> None:
        pass

    def position(self) -> dict:
        return {}

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop(proc)

    def read(self, wait: float) -> Batch:
        if not self._started:
            self._start()
        with self._cond:
            if not self._chunks and not self._eof:
                self._cond.wait(wait)
            read_at, caught_up = (self._short_at, True) if self._short else (time.time(), False)
            chunks, self._chunks, self._size = list(self._chunks), collections.deque(), 0
            dropped, self._dropped = self._dropped, 0
            eof = self._eof and not chunks
        if eof:
            self._started, self._eof = False, False
            detail = "; ".join(self._stderr) or "end of input"
            raise SourceFailure("exited", f"{self.identity}: {detail}")
        lines = []
        for chunk in chunks:
            lines.extend(self._splitter.feed(chunk))
        return Batch(lines, caught_up=caught_up, dropped=dropped, read_at=read_at)

    def _start(self) -> None:
        self._splitter.reset()
        if self.argv:
            try:
                self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, close_fds=True)
            except OSError as exc:
                reason = "no_permission" if exc.errno == errno.EACCES else "not_found"
                raise SourceFailure(reason, f"{self.argv[0]}: {exc.strerror or exc}") from None
            stream = self._proc.stdout
            threading.Thread(target=_collect, args=(self._proc.stderr, self._stderr), name="logs-command-stderr",
                             daemon=True).start()
        else:
            stream = self._stdin or sys.stdin.buffer
        self._started = True
        threading.Thread(target=self._drain, args=(stream,), name="logs-pipe", daemon=True).start()

    def _drain(self, stream: IO[bytes]) -> None:
        fd = stream.fileno()
        while True:
            started = time.time()
            try:
                data = os.read(fd, READ_SIZE)
            except OSError:
                data = b""
            with self._cond:
                self._short, self._short_at = len(data) < READ_SIZE, started
                if not data:
                    self._eof = True
                    self._cond.notify()
                    return
                if self._size + len(data) > self._max:  # the parser is behind: drop rather than stall the writer
                    self._dropped += data.count(b"\n")
                else:
                    self._chunks.append(data)
                    self._size += len(data)
                self._cond.notify()


def _collect(stream: IO[bytes], into: collections.deque) -> None:
    for raw in iter(stream.readline, b""):
        text = raw.decode("utf-8", "replace").strip()
        if text:
            into.append(text[:300])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()

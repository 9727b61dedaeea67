"""Fake Ollama log output: gin, slog and llama-server lines in their exact formats, and a log file that
rotates the ways real deployments rotate it.

The formats are the ones the real lines in tests/fixtures/ollama/lines and tests/fixtures/ollama/logs
show (gin's `defaultLogFormatter`, slog's TextHandler, llama-server's `SLT_INF` prefix and
`print_timings`). `LogFile` appends to a path and rotates it by rename (the macOS/Windows app renames
server.log to server-1.log ... server-5.log at each Ollama start; Docker and logrotate rename too) or
truncates it in place (logrotate copytruncate).
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

MODELS_DIR = "/usr/share/ollama/.ollama/models"


def go_duration(seconds: float) -> str:
    """Go's time.Duration.String(), as gin prints it (truncated to whole seconds above a minute)."""
    ns = int(round(seconds * 1e9))
    if ns > 60 * 10**9:
        ns -= ns % 10**9
    if ns == 0:
        return "0s"
    if ns < 1000:
        return f"{ns}ns"
    if ns < 10**6:
        return _fraction(ns, 1000, 3) + "µs"
    if ns < 10**9:
        return _fraction(ns, 10**6, 6) + "ms"
    hours, rest = divmod(ns, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    text = f"{hours}h" if hours else ""
    text += f"{minutes}m" if hours or minutes else ""
    return text + _fraction(rest, 10**9, 9) + "s"


def _fraction(value: int, unit: int, digits: int) -> str:
    whole, frac = divmod(value, unit)
    tail = f"{frac:0{digits}d}".rstrip("0")
    return f"{whole}.{tail}" if tail else str(whole)


def gin_line(code: int = 200, seconds: float = 0.05, client: str = "127.0.0.1", method: str = "POST",
             path: str = "/api/chat", when: Optional[float] = None) -> str:
    """gin's access line (no colours: stdout is not a terminal under systemd, Docker or the app)."""
    stamp = time.strftime("%Y/%m/%d - %H:%M:%S", time.localtime(when))
    quoted = '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"[GIN] {stamp} | {code:3d} | {go_duration(seconds):>13} | {client:>15} | {method:<7}  {quoted}"


def gin_client_ip(headers: Mapping[str, str], remote: str) -> str:
    """gin's Context.ClientIP() as Ollama runs it (every proxy trusted, SetTrustedProxies never called):
    X-Forwarded-For, then X-Real-IP, walked from the right; all entries valid -> the first one; an invalid
    entry makes the header unusable; no usable header -> the peer address."""
    for name in ("X-Forwarded-For", "X-Real-IP"):
        value = headers.get(name) or ""
        items = value.split(",") if value else []
        for i in range(len(items) - 1, -1, -1):
            item = items[i].strip()
            try:
                ipaddress.ip_address(item)
            except ValueError:
                break
            if i == 0:
                return item
    return remote


class GinAccessLog:
    """A FakeOllama.access_log that writes gin's line for each request to a LogFile, as Ollama does."""

    def __init__(self, log: "LogFile"):
        self.log = log
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str, status: int, seconds: float, headers: Any, remote: str) -> None:
        with self.lock:
            self.log.write([gin_line(status, seconds, gin_client_ip(headers, remote), method, path)])


def slog_line(msg: str, level: str = "INFO", source: str = "server.go:1", when: Optional[float] = None,
              **attrs: Union[str, int, float]) -> str:
    """slog's TextHandler line: RFC 3339 time with milliseconds and offset, then key=value pairs."""
    moment = datetime.fromtimestamp(when if when is not None else time.time(), timezone(timedelta(hours=2)))
    stamp = moment.isoformat(timespec="milliseconds")
    pairs = " ".join(f"{k}={_slog_value(str(v))}" for k, v in attrs.items())
    return f"time={stamp} level={level} source={source} msg={_slog_value(msg)}" + (f" {pairs}" if pairs else "")


def _slog_value(text: str) -> str:
    if text and not any(c in text for c in ' "=\\\n'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def slot_line(func: str, slot: int, task: int, message: str) -> str:
    """llama-server's SLT_INF/SLT_TRC prefix: the function name cut and right-aligned to 12 characters."""
    return f"slot {func[:12]:>12}: id {slot:2d} | task {task} | {message}"


def request_lines(slot: int = 0, task: int = 0, prompt_tokens: int = 37, cached: int = 0, generated: int = 53,
                  prefill_ms: float = 263.25, eval_ms: float = 1008.6, truncated: bool = False,
                  cancelled: bool = False) -> list[str]:
    """The lines one completion request adds to Ollama's log through llama-server (v0.32 shape).

    A cancelled request (its client went away mid-stream) has no timing lines, as in llama.cpp."""
    processed = prompt_tokens - cached
    lines = [
        slot_line("launch_slot_", slot, -1, "sampler params: "),
        "\trepeat_last_n = 64, repeat_penalty = 1.000, frequency_penalty = 0.000, presence_penalty = 0.000",
        "\ttop_k = 40, top_p = 0.950, min_p = 0.050, xtc_probability = 0.000, xtc_threshold = 0.100",
        slot_line("launch_slot_", slot, task, "processing task, is_child = 0"),
        slot_line("operator()", slot, task,
                  f"new prompt, n_ctx_slot = 4096, n_keep = 4, task.n_tokens = {prompt_tokens}"),
        slot_line("operator()", slot, task, f"cached n_tokens = {cached}, memory_seq_rm [{cached}, end)"),
    ]
    if generated >= 100:
        lines.append(slot_line("print_timing", slot, task, f"n_gen = {100:6d}, tg = {30.0:6.2f} t/s, "
                                                            f"tg_3s = {30.0:6.2f} t/s"))
    if not cancelled:
        per_prompt = prefill_ms / processed if processed else 0.0
        per_token = eval_ms / generated if generated else 0.0
        lines += [
            slot_line("print_timing", slot, task,
                      f"prompt eval time = {prefill_ms:10.2f} ms / {processed:5d} tokens ({per_prompt:8.2f} ms per "
                      f"token, {1000 / per_prompt if per_prompt else 0:8.2f} tokens per second)"),
            slot_line("print_timing", slot, task,
                      f"       eval time = {eval_ms:10.2f} ms / {generated:5d} tokens ({per_token:8.2f} ms per token, "
                      f"{1000 / per_token if per_token else 0:8.2f} tokens per second)"),
            slot_line("print_timing", slot, task,
                      f"      total time = {prefill_ms + eval_ms:10.2f} ms / {processed + generated:5d} tokens"),
            slot_line("print_timing", slot, task, f"   graphs reused = {max(generated - 1, 0):10d}"),
        ]
    lines += [
        slot_line("release", slot, task,
                  f"stop processing: n_tokens = {prompt_tokens + generated}, truncated = {int(truncated)}"),
        "srv  update_slots: all slots are idle",
    ]
    return lines


def load_lines(blob: str, port: int, name: str, seconds: float = 7.3, runners: int = 1, parallel: int = 1,
               template_line: bool = True) -> list[str]:
    """A v0.30+ load: llama-server started, its listener, the load time (printed twice), the model's name
    (v0.30.1+ `template selection`) and the scheduler's runner count."""
    blob_path = f"{MODELS_DIR}/blobs/sha256-{blob}"
    cmd = (f"/usr/lib/ollama/llama-server --model {blob_path} --port {port} --host 127.0.0.1 -c {4096 * parallel} "
           f"-np {parallel} --log-verbosity 4 --no-log-prefix --no-log-timestamps")
    lines = [
        slog_line("starting llama-server", source="llama_server.go:433", cmd=cmd),
        slog_line("loading model via llama-server", source="llama_server.go:1040", model=blob_path),
        "load_backend: loaded CPU backend from /usr/lib/ollama/libggml-cpu-zen4.so",
        f"srv  llama_server: listening on http://127.0.0.1:{port}",
        "srv  update_slots: all slots are idle",
        slog_line(f"llama-server started in {seconds:.2f} seconds", source="llama_server.go:1360"),
    ]
    if template_line:
        lines.append(slog_line("template selection", source="images.go:374",
                               model=f"registry.ollama.ai/library/{name}", selected="renderer_parser"))
    lines += [
        slog_line("loaded runners", source="sched.go:728", count=runners),
        slog_line("waiting for llama-server to start responding", source="llama_server.go:1290"),
        slog_line(f"llama-server started in {seconds + 0.04:.2f} seconds", source="llama_server.go:1360"),
    ]
    return lines


class LogFile:
    """Ollama's log as a file: append lines, rotate by rename or truncate in place."""

    def __init__(self, path: Union[str, Path], keep: int = 5):
        self.path = Path(path)
        self.keep = keep
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def write(self, lines: Iterable[str]) -> None:
        self.write_raw("".join(line + "\n" for line in lines).encode())

    def write_raw(self, data: bytes) -> None:
        with open(self.path, "ab") as fh:
            fh.write(data)

    def rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.stem}-{n}{self.path.suffix}")

    def rotate_rename(self) -> None:
        """What the app does at each Ollama start: server-4 -> server-5, ..., server.log -> server-1.log."""
        for n in range(self.keep - 1, 0, -1):
            if self.rotated(n).exists():
                os.replace(self.rotated(n), self.rotated(n + 1))
        os.replace(self.path, self.rotated(1))
        self.path.touch()

    def truncate(self) -> None:
        with open(self.path, "wb"):
            pass

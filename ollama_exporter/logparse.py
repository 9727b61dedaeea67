"""Ollama's log, one line at a time: which event a line records, or that it records none.

Pure and stateless: `LineParser.parse(text)` looks at one line and returns an event, IGNORED (a line
that carries nothing the exporter counts) or MALFORMED (a line in a known format that did not parse,
the signal that the format drifted). Nothing here keeps a line, a prompt, a client address or a path:
events hold only bounded values (route templates, status codes, numbers, model names, blob digests).

The formats, by who prints them (every match is unanchored, since journald, Docker, docker compose and
pasted logs put their own prefixes in front, and C libraries glue text onto the next line):
- gin's access line, every version:
  ``[GIN] 2024/08/30 - 10:28:57 | 200 |   82.985212ms |       127.0.0.1 | POST     "/v1/completions"``.
  The client address is compared with the exporter's own X-Forwarded-For value and dropped.
- Ollama's slog lines (``time=... level=INFO source=... msg="..." key=value``), matched on `msg` only:
  source file:line numbers change with every release.
- llama-server's per-request lines inside Ollama's log (v0.30+): ``slot print_timing: id  0 | task 49 | ...``.
- journald's own ``Suppressed N messages from ollama.service`` (its rate limit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

IGNORED = "ignored"
MALFORMED = "malformed"

# Ollama's registered routes (server/routes.go, v0.1 to v0.33): a route label is one of these or "other".
ROUTES = frozenset((
    "/", "/api/version", "/api/status", "/api/tags", "/api/ps", "/api/show", "/api/generate", "/api/chat",
    "/api/embed", "/api/embeddings", "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete",
    "/api/me", "/api/signout", "/api/experimental/web_search", "/api/experimental/web_fetch",
    "/api/experimental/model-recommendations", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
    "/v1/models", "/v1/responses", "/v1/audio/transcriptions", "/v1/messages",
))
PARAM_ROUTES = (("/api/blobs/", "/api/blobs/:digest"), ("/v1/models/", "/v1/models/:model"),
                ("/api/user/keys/", "/api/user/keys/:encodedKey"))
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"))
OTHER = "other"

LOAD_FAILURE_REASONS = ("oom", "timeout", "client_gone", "other")
# Ollama's own out-of-memory wordings (llm/status.go, the runners, the scheduler's estimates).
_OOM_WORDS = ("out of memory", "cudamalloc failed", "unable to allocate", "failed to allocate",
              "requires more system memory", "insufficient memory", "not enough memory", "oom")


# --- events: what one line says ------------------------------------------------------------------

@dataclass(frozen=True)
class GinRequest:
    route: str  # a ROUTES member, a PARAM_ROUTES template, or "other"
    method: str  # a METHODS member or "other"
    code: str  # "200"; "other" outside 100-599
    seconds: float
    own: bool  # the client address is the exporter's X-Forwarded-For value: a probe or a poll


@dataclass(frozen=True)
class ServerStart:
    version: Optional[str]  # "Listening on 127.0.0.1:11434 (version 0.3.5)"; None before v0.1.x printed it


@dataclass(frozen=True)
class LoadStart:
    blob: str  # 64-hex weights digest from the runner's --model; "" when the line was cut
    port: Optional[int]
    llama_server: bool  # v0.30+ upstream llama-server (its request lines can follow)


@dataclass(frozen=True)
class LoadDone:
    seconds: float


@dataclass(frozen=True)
class TemplateSelection:
    model: str  # the loaded model's name as /api/tags spells it (v0.30.1+)


@dataclass(frozen=True)
class LoadedRunners:
    count: int


@dataclass(frozen=True)
class LoadFailed:
    reason: str  # one of LOAD_FAILURE_REASONS
    blob: str


@dataclass(frozen=True)
class RunnerCrash:
    pass


@dataclass(frozen=True)
class RuntimeOom:
    pass


@dataclass(frozen=True)
class PromptTruncated:
    pass


@dataclass(frozen=True)
class QueuedAbort:
    """A client gave up while its request waited for a free slot of a loaded model."""


@dataclass(frozen=True)
class JournalSuppressed:
    count: int


@dataclass(frozen=True)
class SlotLaunch:
    slot: int
    task: int


@dataclass(frozen=True)
class SlotPrompt:
    slot: int
    task: int
    tokens: int  # task.n_tokens: the whole prompt, cached part included


@dataclass(frozen=True)
class SlotPromptEval:
    slot: int
    task: int
    seconds: float
    tokens: int  # processed, i.e. not taken from the prompt cache


@dataclass(frozen=True)
class SlotEval:
    slot: int
    task: int
    seconds: float
    tokens: int  # generated


@dataclass(frozen=True)
class SlotRelease:
    slot: int
    task: int
    truncated: bool


Event = Union[GinRequest, ServerStart, LoadStart, LoadDone, TemplateSelection, LoadedRunners, LoadFailed,
              RunnerCrash, RuntimeOom, PromptTruncated, QueuedAbort, JournalSuppressed, SlotLaunch, SlotPrompt,
              SlotPromptEval, SlotEval, SlotRelease]
Result = Union[Event, str]  # an event, IGNORED or MALFORMED

# --- patterns ------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GIN = re.compile(
    r"\[GIN\] \d{4}/\d\d/\d\d - \d\d:\d\d:\d\d \| *(\d{1,3}) *\| *([0-9][0-9a-zµμ.]*) \| *([^ |]*) \| *([A-Z]+) +\"")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|h|m|s)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_MSG = re.compile(r'\bmsg=(?:"((?:[^"\\]|\\.)*)"|(\S+))')
_ATTR = r'\b{}=(?:"((?:[^"\\]|\\.)*)"|(\S+))'
_MODEL_ATTR = re.compile(_ATTR.format("model"))
_ERROR_ATTR = re.compile(_ATTR.format("error"))
_COUNT = re.compile(r"\bcount=(\d+)")
_BLOB = re.compile(r"sha256[-:]([0-9a-f]{64})")
_PORT = re.compile(r"--port[ =]+(\d{1,5})\b")
_VERSION = re.compile(r"\(version ([^)\s]+)\)")
_STARTED = re.compile(r"started in ([0-9.]+) seconds")
_SUPPRESSED = re.compile(r"Suppressed (\d+) messages from ")
_SLOT = re.compile(r"slot +[\w()~]{1,12}: id +(\d+) \| task (-?\d+) \| ?(.*)")
_NEW_PROMPT = re.compile(r"new prompt, .*task\.n_tokens = (\d+)")
_PROMPT_EVAL = re.compile(r"prompt eval time = +([0-9.]+) ms / +(\d+) tokens")
_EVAL = re.compile(r"eval time = +([0-9.]+) ms / +(\d+) tokens")
_RELEASE = re.compile(r"stop processing: n_tokens = \d+, truncated = (\d)")
# print_timing messages that carry nothing counted; any other print_timing message is format drift
_TIMING_KNOWN = ("total time", "n_decoded", "n_gen", "prompt processing", "graphs reused", "draft acceptance")
_LOAD_STARTS = ("starting llama-server", "starting runner", "starting llama server")


def parse_go_duration(text: str) -> Optional[float]:
    """An unsigned Go duration (``82.985212ms``, ``33.313µs``, ``5m14s``, ``.5s``) in seconds; None if not one."""
    parts = _DURATION_PART.findall(text)
    if not parts or sum(len(n) + len(u) for n, u in parts) != len(text):
        return None
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def route_of(quoted_path: str) -> str:
    """The route label for gin's Go-quoted path: the query string dropped, unknown paths as "other"."""
    path = quoted_path.split("?", 1)[0]
    if "\\" in path:  # %#v escapes; a registered route never has them
        return OTHER
    if path in ROUTES:
        return path
    for prefix, template in PARAM_ROUTES:
        if path.startswith(prefix) and len(path) > len(prefix) and "/" not in path[len(prefix):]:
            return template
    return OTHER


def model_name(value: str) -> str:
    """``registry.ollama.ai/library/qwen3:8b`` -> ``qwen3:8b``, the way /api/tags and /api/ps name it."""
    for prefix in ("registry.ollama.ai/", "library/"):
        if value.startswith(prefix):
            value = value[len(prefix):]
    return value


def load_failure_reason(error: str) -> str:
    text = error.lower()
    if any(word in text for word in _OOM_WORDS):
        return "oom"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "context canceled" in text:
        return "client_gone"
    return "other"


def _attr(pattern: re.Pattern, text: str) -> str:
    m = pattern.search(text)
    if not m:
        return ""
    return m.group(1).replace('\\"', '"').replace("\\\\", "\\") if m.group(1) is not None else m.group(2)


class LineParser:
    """`parse` one decoded line; `own_client` is the X-Forwarded-For address the exporter sends."""

    def __init__(self, own_client: str = ""):
        self.own_client = own_client

    def parse(self, text: str) -> Result:
        if "\x1b" in text:  # gin colours its fields when stdout is a terminal (docker run -t)
            text = _ANSI.sub("", text)
        at = text.find("[GIN] ")
        if at >= 0:
            return self._gin(text, at)
        if "level=" in text:
            return self._slog(text)
        at = text.find("slot ")
        if at >= 0 and " | task " in text:
            return self._slot(text, at)
        if "Suppressed " in text:
            m = _SUPPRESSED.search(text)
            if m:
                return JournalSuppressed(int(m.group(1)))
        if "Listening on " in text and "routes.go:" in text:  # before slog (v0.1.20 and older)
            m = _VERSION.search(text)
            return ServerStart(m.group(1) if m else None)
        return IGNORED

    # --- gin ---

    def _gin(self, text: str, at: int) -> Result:
        m = _GIN.match(text, at)
        if not m:
            return MALFORMED
        code_text, latency, client, method = m.groups()
        seconds = parse_go_duration(latency)
        if seconds is None:
            return MALFORMED
        code = int(code_text)
        path = text[m.end():]
        end = path.rfind('"')
        route = route_of(path[:end]) if end >= 0 else OTHER  # no closing quote: a pager or the excerpt cut it
        return GinRequest(route, method if method in METHODS else OTHER,
                          code_text if 100 <= code <= 599 else OTHER, seconds,
                          bool(self.own_client) and client == self.own_client)

    # --- Ollama's slog lines ---

    def _slog(self, text: str) -> Result:
        m = _MSG.search(text)
        if not m:
            return MALFORMED
        msg = m.group(1) if m.group(1) is not None else m.group(2)
        first = msg[:1]
        if first == "s":
            if msg in _LOAD_STARTS:
                blob = _BLOB.search(text)
                port = _PORT.search(text)
                return LoadStart(blob.group(1) if blob else "", int(port.group(1)) if port else None,
                                 msg == "starting llama-server")
        elif first == "l":
            if msg.startswith(("llama-server started in ", "llama runner started in ")):
                started = _STARTED.search(msg)
                return LoadDone(float(started.group(1))) if started else MALFORMED
            if msg == "loaded runners":
                count = _COUNT.search(text, m.end())
                return LoadedRunners(int(count.group(1))) if count else MALFORMED
            if msg in ("llama-server terminated", "llama runner terminated"):
                return RunnerCrash()
        elif first == "t":
            if msg == "template selection":
                name = _attr(_MODEL_ATTR, text[m.end():])
                return TemplateSelection(model_name(name)) if name else MALFORMED
            if msg.startswith("truncating input prompt"):
                return PromptTruncated()
        elif first == "L":
            if msg.startswith("Listening on "):
                version = _VERSION.search(msg)
                return ServerStart(version.group(1) if version else None)
            if msg == "Load failed":
                rest = text[m.end():]
                blob = _BLOB.search(_attr(_MODEL_ATTR, rest))
                return LoadFailed(load_failure_reason(_attr(_ERROR_ATTR, rest)), blob.group(1) if blob else "")
        elif first == "e":
            if msg == "error loading llama server":
                return LoadFailed(load_failure_reason(_attr(_ERROR_ATTR, text[m.end():])), "")
        elif first == "a":
            if msg.startswith("aborting ") and msg.endswith("due to client closing the connection"):
                return QueuedAbort()
        elif first == "c":
            if msg.startswith("client connection closed before") and "finished loading" in msg:
                return LoadFailed("client_gone", "")
        elif first == "r":
            if msg.startswith("runtime OOM detected"):
                return RuntimeOom()
        return IGNORED

    # --- llama-server's per-slot lines (v0.30+) ---

    def _slot(self, text: str, at: int) -> Result:
        m = _SLOT.match(text, at)
        if not m:
            return MALFORMED if "print_timing:" in text or "release:" in text else IGNORED
        slot, task, message = int(m.group(1)), int(m.group(2)), m.group(3).strip()
        head = message[:4]
        if head == "proc" and message.startswith("processing task"):
            return SlotLaunch(slot, task)
        if head == "new ":
            p = _NEW_PROMPT.match(message)
            return SlotPrompt(slot, task, int(p.group(1))) if p else MALFORMED
        if head == "prom" and message.startswith("prompt eval time"):
            p = _PROMPT_EVAL.match(message)
            return SlotPromptEval(slot, task, float(p.group(1)) / 1000.0, int(p.group(2))) if p else MALFORMED
        if head == "eval":
            p = _EVAL.match(message)
            return SlotEval(slot, task, float(p.group(1)) / 1000.0, int(p.group(2))) if p else MALFORMED
        if head == "stop":
            p = _RELEASE.match(message)
            return SlotRelease(slot, task, p.group(1) == "1") if p else MALFORMED
        if "print_timing:" in text[at:at + 30] and not message.startswith(_TIMING_KNOWN):
            return MALFORMED
        if "release:" in text[at:at + 30]:
            return MALFORMED
        return IGNORED

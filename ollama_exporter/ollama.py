"""The only code that speaks Ollama's HTTP API: requests with a hard deadline, typed results, and
failures classified into the small fixed set of reasons the metrics report.

Parsers are lenient where Ollama's versions differ (missing `size_vram` or `context_length`, `families:
null`, old /api/tags rows without `model`, any RFC 3339 offset) and strict where an answer is unusable
(not JSON, `models` not a list, a row without a name): those raise OllamaError("invalid_response").
"""

from __future__ import annotations

import calendar
import json
import re
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import requests
from urllib3.exceptions import HTTPError, ReadTimeoutError

from ollama_exporter import __version__
from ollama_exporter.snapshot import InstalledModel, LoadedModel, ModelDetails, ShowInfo, SourceError

USER_AGENT = f"ollama-exporter/{__version__}"
MAX_BODY_BYTES = 64 * 1024 * 1024  # /api/show with tensors can be a few MB; anything this big is wrong


class OllamaError(SourceError):
    """A failed call; `reason` is one of snapshot.ERROR_REASONS. HTTP errors keep Ollama's status and text."""

    def __init__(self, reason: str, message: str, status: Optional[int] = None, detail: str = ""):
        super().__init__(reason, message)
        self.status = status
        self.detail = detail


class OllamaClient:
    def __init__(self, base_url: str, timeout: float, session: Optional[requests.Session] = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT

    # --- endpoints ---

    def version(self) -> str:
        version = self._object("GET", "/api/version").get("version")
        if not isinstance(version, str):
            raise OllamaError("invalid_response", "/api/version: no string `version` in the answer")
        return version

    def ps(self) -> list[LoadedModel]:
        return [parse_loaded(row) for row in _models(self._call("GET", "/api/ps"), "/api/ps")]

    def tags(self) -> list[InstalledModel]:
        return [parse_installed(row) for row in _models(self._call("GET", "/api/tags"), "/api/tags")]

    def show(self, name: str) -> ShowInfo:
        return parse_show(self._object("POST", "/api/show", {"model": name}))

    def embed(self, payload: dict, timeout: float, headers: Optional[dict] = None) -> dict:
        """POST /api/embed (an inference request: it goes through Ollama's scheduler)."""
        return self._object("POST", "/api/embed", payload, timeout, headers)

    def post(self, path: str, payload: dict, timeout: float, headers: Optional[dict] = None) -> dict:
        """POST any non-streaming request whose answer is one JSON object (e.g. a load-only /api/generate)."""
        return self._object("POST", path, payload, timeout, headers)

    def stream(self, path: str, payload: dict, timeout: float,
               headers: Optional[dict] = None) -> Iterator[tuple[float, Any]]:
        """POST a streaming request; yield (time.monotonic() when the line arrived, parsed line) per NDJSON line.

        Lines are yielded as soon as their bytes arrive (read1 returns each chunk as the server flushes it),
        so the arrival times are what a client observes. Raises OllamaError("timeout") past `timeout` in
        total, and OllamaError with the HTTP status when the server refuses before streaming.
        """
        deadline = time.monotonic() + timeout
        with self._transport_errors(path, timeout), \
                self.session.post(self.base_url + path, json=payload, timeout=timeout, stream=True,
                                  headers=headers) as resp:
            if resp.status_code >= 400:
                self._raise_http(path, resp.status_code, _read_body(resp, deadline, path))
            buffer = b""
            for chunk in _chunks(resp, deadline):
                arrived = time.monotonic()
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield arrived, _json_line(path, line)
            if buffer.strip():
                yield time.monotonic(), _json_line(path, buffer)

    # --- transport ---

    def _call(self, method: str, path: str, payload: Optional[dict] = None, timeout: Optional[float] = None,
              headers: Optional[dict] = None) -> Any:
        """One request, finished (body read and parsed) within `timeout` (default: the client's) in total."""
        url = self.base_url + path
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._transport_errors(path, timeout), \
                self.session.request(method, url, json=payload, timeout=timeout, stream=True,
                                     headers=headers) as resp:
            body = _read_body(resp, deadline, path)
        if resp.status_code >= 400:
            self._raise_http(path, resp.status_code, body)
        try:
            return json.loads(body)
        except ValueError:
            raise OllamaError("invalid_response", f"{path}: answer is not valid JSON: {body[:80]!r}") from None

    def _object(self, method: str, path: str, payload: Optional[dict] = None,
                timeout: Optional[float] = None, headers: Optional[dict] = None) -> dict:
        body = self._call(method, path, payload, timeout, headers)
        if not isinstance(body, dict):
            raise OllamaError("invalid_response", f"{path}: answer is not a JSON object")
        return body

    @contextmanager
    def _transport_errors(self, path: str, timeout: float) -> Iterator[None]:
        """requests' failures as OllamaError: timeout (past the deadline) or connection (anything else)."""
        try:
            yield
        except requests.Timeout:
            raise OllamaError("timeout", f"{path}: not answered within {timeout:g}s") from None
        except requests.ConnectionError as exc:
            raise OllamaError("connection", f"{path}: connection to {self.base_url} failed: {_root_cause(exc)}") from None
        except requests.RequestException as exc:
            raise OllamaError("connection", f"{path}: {_root_cause(exc)}") from None

    @staticmethod
    def _raise_http(path: str, status: int, body: bytes) -> None:
        reason = "http_5xx" if status >= 500 else "http_4xx"
        detail = _error_text(body)
        raise OllamaError(reason, f"{path}: HTTP {status}: {detail}", status, detail)


def _chunks(resp: requests.Response, deadline: float) -> Iterator[bytes]:
    """The body as it arrives, failing once the deadline passes (a slow drip is a timeout too).

    read1 returns whatever one socket read (or one HTTP chunk) gives, so the deadline is checked as data
    trickles in; requests' own timeout only bounds each single read.
    """
    raw = resp.raw
    read = raw.read1 if hasattr(raw, "read1") else raw.read
    try:
        while True:
            chunk = read(65536, decode_content=True)
            if not chunk:
                return
            if time.monotonic() > deadline:
                raise requests.Timeout()
            yield chunk
    except ReadTimeoutError:
        raise requests.Timeout() from None
    except HTTPError as exc:  # urllib3's: connection reset, incomplete body
        raise requests.ConnectionError(exc) from None


def _read_body(resp: requests.Response, deadline: float, path: str) -> bytes:
    chunks, size = [], 0
    for chunk in _chunks(resp, deadline):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise OllamaError("invalid_response", f"{path}: answer larger than {MAX_BODY_BYTES} bytes")
    return b"".join(chunks)


def _json_line(path: str, line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        raise OllamaError("invalid_response", f"{path}: stream line is not JSON: {line[:80]!r}") from None


def _root_cause(exc: BaseException) -> str:
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    return str(exc) or type(exc).__name__


def _error_text(body: bytes) -> str:
    """Ollama's errors are {"error": "..."}; gin's 404/405 are plain text; the host check sends nothing."""
    try:
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return data["error"]
    except ValueError:
        pass
    return body[:200].decode("utf-8", "replace").strip() or "(empty body)"


# --- parsers: JSON rows to snapshot types ---


def _models(body: Any, path: str) -> list[dict]:
    models = body.get("models") if isinstance(body, dict) else None
    if models is None and isinstance(body, dict) and "models" in body:
        return []  # tolerate null: it means "none"
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise OllamaError("invalid_response", f"{path}: `models` is not a list of objects")
    return models


def _name(row: dict, path: str) -> str:
    name = row.get("name") or row.get("model")
    if not isinstance(name, str) or not name:
        raise OllamaError("invalid_response", f"{path}: a model row has no name")
    return name


def _int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _strings(value: Any) -> Optional[tuple[str, ...]]:
    if not isinstance(value, list):
        return None
    return tuple(v for v in value if isinstance(v, str))


def _remote(row: dict) -> bool:
    """A cloud or remote model (v0.12+): inference on it is proxied to another server."""
    return bool(row.get("remote_host") or row.get("remote_model"))


def parse_details(value: Any) -> ModelDetails:
    d = value if isinstance(value, dict) else {}
    return ModelDetails(
        format=_str(d.get("format")),
        family=_str(d.get("family")),
        families=_strings(d.get("families")) or (),
        parameter_size=_str(d.get("parameter_size")),
        quantization_level=_str(d.get("quantization_level")),
    )


def parse_loaded(row: dict) -> LoadedModel:
    return LoadedModel(
        name=_name(row, "/api/ps"),
        digest=_str(row.get("digest")),
        size=_int(row.get("size")) or 0,
        size_vram=_int(row.get("size_vram")),
        expires_at=parse_timestamp(row.get("expires_at")),
        context_length=_int(row.get("context_length")),
        details=parse_details(row.get("details")),
        remote=_remote(row),
    )


def parse_installed(row: dict) -> InstalledModel:
    return InstalledModel(
        name=_name(row, "/api/tags"),
        digest=_str(row.get("digest")),
        size=_int(row.get("size")) or 0,
        details=parse_details(row.get("details")),
        capabilities=_strings(row.get("capabilities")),
        remote=_remote(row),
    )


_FROM_BLOB = re.compile(r"^FROM\s+\S*sha256[-:]([0-9a-f]{64})\s*$", re.MULTILINE)


def parse_show(body: dict) -> ShowInfo:
    info = body.get("model_info") if isinstance(body.get("model_info"), dict) else {}
    arch = _str(info.get("general.architecture"))
    blob = _FROM_BLOB.search(_str(body.get("modelfile")))
    return ShowInfo(
        architecture=arch,
        context_length=_int(info.get(f"{arch}.context_length")) if arch else None,
        parameter_count=_int(info.get("general.parameter_count")),
        capabilities=_strings(body.get("capabilities")),
        weights_blob=blob.group(1) if blob else None,
        details=parse_details(body.get("details")),
        remote=_remote(body),
    )


_RFC3339 = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(?:([Zz])|([+-])(\d\d):(\d\d))$"
)


def parse_timestamp(value: Any) -> Optional[float]:
    """RFC 3339 with any fraction length and any offset to unix seconds; Go's zero time is None."""
    m = _RFC3339.match(value) if isinstance(value, str) else None
    if not m:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if year <= 1:
        return None
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    if m.group(7):
        seconds += int(m.group(7)[:9].ljust(9, "0")) / 1e9
    if m.group(9):
        offset = int(m.group(10)) * 3600 + int(m.group(11)) * 60
        seconds -= offset if m.group(9) == "+" else -offset
    return float(seconds)

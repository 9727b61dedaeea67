"""The only code that speaks Ollama's HTTP API: calls with a hard deadline, typed results, and failures
classified into the small fixed set of reasons the metrics report.

Every value is checked where it is parsed, because whatever comes from the network ends up in label
values and sample values, and one bad value must never take /metrics down. Parsers are lenient where
Ollama's versions differ (missing `size_vram` or `context_length`, `families: null`, old /api/tags rows
without `model`, any RFC 3339 offset) and strict about what could hurt: a number out of range or not
a number is left out (never exported as something else), a name that is not printable UTF-8 of sane
length drops its row, a duplicate name drops the later row, and past `max_models` rows the rest are
dropped; every dropped row is counted by reason (`invalid`, `duplicate`, `limit`). An answer that is
unusable as a whole (not JSON, NaN or nesting a parser chokes on, `models` not a list, too big)
raises OllamaError("invalid_response").
"""

from __future__ import annotations

import calendar
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

from ollama_exporter import __version__
from ollama_exporter.config import Config, redact_url
from ollama_exporter.httpclient import HttpClient, HttpError, StatusError
from ollama_exporter.shared import SharedValues
from ollama_exporter.snapshot import InstalledModel, LoadedModel, ModelDetails, ShowInfo, SourceError

USER_AGENT = f"ollama-exporter/{__version__}"
# Most bytes read from one answer: /api/show with tensors is a few MB; /api/tags and /api/ps rows are
# ~600 bytes, so those two get ROW_BYTES per allowed model (what is parsed stays a small multiple of it).
MAX_BYTES = {"/api/version": 64 * 1024, "/api/show": 16 << 20, "/api/embed": 16 << 20}
ROW_BYTES = 2048
# Most JSON values (objects, arrays, members and elements) parsed from one answer, counted before parsing:
# the byte cap alone let 9 MB of `{"models":[{},{},...]}` become 3 million dicts (230 MB, 15 s of CPU).
# Real /api/ps and /api/tags rows hold at most 17 (captured answers); /api/show with tensors ~2 300.
DEFAULT_MAX_VALUES = 200_000  # JSON values in one answer (strings, numbers, containers) before it is refused
MAX_VALUES = {"/api/version": 1000, "/api/show": DEFAULT_MAX_VALUES, "/api/embed": DEFAULT_MAX_VALUES}
ROW_VALUES = 32
MAX_STREAM_BYTES = 16 << 20  # a probe's whole /api/generate stream
MAX_LINE_BYTES = 1 << 20  # one NDJSON line of it
MAX_NAME = 512
MAX_LABEL = 128
MAX_CAPABILITIES = 32
MAX_COUNT = 2**53  # sizes, counts and lengths: beyond this a float no longer holds the integer
DROP_REASONS = ("invalid", "duplicate", "limit")


class OllamaError(SourceError):
    """A failed call; `reason` is one of snapshot.ERROR_REASONS. HTTP errors keep Ollama's status and text."""

    def __init__(self, reason: str, message: str, status: Optional[int] = None, detail: str = ""):
        super().__init__(reason, message)
        self.status = status
        self.detail = detail


class Rows(list):
    """Parsed model rows, with how many rows of the answer were dropped, by reason."""

    def __init__(self, rows=(), dropped: Optional[Mapping[str, int]] = None):
        super().__init__(rows)
        self.dropped: dict[str, int] = dict(dropped or {})


class OllamaClient:
    def __init__(self, base_url: str, timeout: float, max_models: int = 5000):
        self.base_url = base_url.rstrip("/")
        self.shown_url = redact_url(self.base_url)
        self.timeout = timeout
        self.max_models = max_models
        self.http = HttpClient(self.base_url, USER_AGENT)
        self._last: dict[str, _LastAnswer] = {}  # path -> its last answer, for _rows (replaced whole)

    # --- endpoints ---

    def version(self) -> str:
        version = _label(self._object("GET", "/api/version").get("version"), 64)
        if not version:
            raise OllamaError("invalid_response", "/api/version: no usable `version` string in the answer")
        return version

    def ps(self) -> Rows:
        return self._rows("/api/ps", parse_loaded)

    def tags(self) -> Rows:
        return self._rows("/api/tags", parse_installed)

    def show(self, name: str) -> ShowInfo:
        return parse_show(self._object("POST", "/api/show", {"model": name}))

    def embed(self, payload: dict, timeout: float, headers: Optional[Mapping[str, str]] = None) -> dict:
        """POST /api/embed (an inference request: it goes through Ollama's scheduler)."""
        return self._object("POST", "/api/embed", payload, timeout, headers)

    def post(self, path: str, payload: dict, timeout: float, headers: Optional[Mapping[str, str]] = None) -> dict:
        """POST any JSON object and return the JSON object answered (a non-streamed /api/generate, say)."""
        return self._object("POST", path, payload, timeout, headers)

    def stream(self, path: str, payload: dict, timeout: float,
               headers: Optional[Mapping[str, str]] = None) -> Iterator[tuple[float, Any]]:
        """POST a streaming request; yield (time.monotonic() when the line arrived, parsed line) per NDJSON line.

        Lines are yielded as soon as their bytes arrive, so the arrival times are what a client observes.
        Raises OllamaError("timeout") past `timeout` in total, OllamaError with the HTTP status when the
        server refuses before streaming, and OllamaError("invalid_response") for a line longer than
        MAX_LINE_BYTES or a stream longer than MAX_STREAM_BYTES.
        """
        import time

        pending: list[bytes] = []  # the pieces of the line still arriving: joined once, when it ends, so a
        size = 0  # line sent a byte per packet costs linear time (it cost seconds of CPU per 100 KB)
        with self._errors(path):
            for chunk in self.http.stream("POST", path, _json_body(payload), timeout=timeout,
                                          max_bytes=MAX_STREAM_BYTES, headers=headers):
                arrived = time.monotonic()
                *lines, rest = chunk.split(b"\n")
                if lines:
                    lines[0], pending, size = b"".join(pending) + lines[0], [], 0
                pending.append(rest)
                size += len(rest)
                if size > MAX_LINE_BYTES or (lines and len(lines[0]) > MAX_LINE_BYTES):
                    raise OllamaError("invalid_response", f"{path}: a stream line longer than {MAX_LINE_BYTES} bytes")
                for line in lines:
                    if line.strip():
                        yield arrived, _json(path, line)
            tail = b"".join(pending)
            if tail.strip():
                yield time.monotonic(), _json(path, tail)

    # --- transport ---

    def _object(self, method: str, path: str, payload: Optional[dict] = None, timeout: Optional[float] = None,
                headers: Optional[Mapping[str, str]] = None) -> dict:
        """One request, answered (body read and parsed) within `timeout` (default: the client's) in total."""
        return _json_object(path, self._body(method, path, payload, timeout, headers), self._max_values(path))

    def _body(self, method: str, path: str, payload: Optional[dict] = None, timeout: Optional[float] = None,
              headers: Optional[Mapping[str, str]] = None) -> bytes:
        """The body of a successful answer, read whole within `timeout` (default: the client's) in total."""
        with self._errors(path):
            answer = self.http.request(method, path, _json_body(payload) if payload is not None else None,
                                       timeout=self.timeout if timeout is None else timeout,
                                       max_bytes=self._max_bytes(path), headers=headers)
        if answer.status >= 400:
            raise _status_error(path, answer.status, answer.body)
        if not 200 <= answer.status < 300:
            raise OllamaError("invalid_response", f"{path}: unexpected HTTP status {answer.status}")
        return answer.body

    def _max_bytes(self, path: str) -> int:
        if path in ("/api/ps", "/api/tags"):
            return max(2 << 20, self.max_models * ROW_BYTES)
        return MAX_BYTES.get(path, 16 << 20)

    def _max_values(self, path: str) -> int:
        if path in ("/api/ps", "/api/tags"):
            return 1024 + self.max_models * ROW_VALUES
        return MAX_VALUES.get(path, DEFAULT_MAX_VALUES)

    def _errors(self, path: str):
        return _translate(path, self.shown_url)

    def _rows(self, path: str, parse) -> Rows:
        """The model rows of /api/tags or /api/ps, reusing what did not change since the last answer.

        Polls mostly read the same answers again: the same bytes give back the same rows (a steady
        /api/tags costs one bytes comparison, not a parse), and a row written exactly as a row of the
        last answer reuses its parsed value without being decoded (after a probe, only the probed
        model's row of /api/ps differs; in a burst of names, only the new ones). Reused values are the
        very objects of the last answer, so the snapshot's sections stay identical and the metrics of
        what did not change are not rendered again.
        """
        raw = self._body("GET", path)
        last = self._last.get(path)
        if last is not None and last.raw == raw:
            return Rows(last.rows, last.rows.dropped)
        before = last.parsed if last is not None else {}
        rows, seen, dropped, parsed = [], set(), Counter(), {}
        for key, row in self._keyed_rows(path, raw, before):
            if len(rows) >= self.max_models:
                dropped["limit"] += 1
                continue
            model = before.get(key) if key is not None else None
            if model is None:
                try:
                    model = parse(row)
                except _BadRow:
                    dropped["invalid"] += 1
                    continue
            if model.name in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(model.name)
            rows.append(model)
            if key is not None:
                parsed[key] = model
        result = Rows(rows, dropped)
        self._last[path] = _LastAnswer(raw, Rows(rows, dropped), parsed)
        return result

    def _keyed_rows(self, path: str, raw: bytes, before: dict) -> list[tuple[Any, Any]]:
        """(key, decoded row) for each row of the answer: the key tells the row (see _key: of its bytes,
        or of repr() of what it decoded to; None if neither can be had), and a row whose key is in
        `before` is not decoded (None)."""
        max_values = self._max_values(path)
        segments = _row_segments(raw)
        if segments is not None:
            _check_values(path, raw, max_values)  # as decoding the whole answer would
            keyed: list[tuple[Any, Any]] = []
            for segment in segments:
                key = _key(segment)
                if key in before:
                    keyed.append((key, None))
                    continue
                try:
                    keyed.append((key, json.loads(segment, parse_constant=reject_constant)))
                except (ValueError, RecursionError):
                    break  # not cut where rows begin and end after all: decode the whole answer
            else:
                return keyed
        body = _json_object(path, raw, max_values)
        models = body.get("models")
        if models is None and "models" in body:
            return []  # tolerate null: it means "none"
        if not isinstance(models, list):
            raise OllamaError("invalid_response", f"{path}: `models` is not a list")
        return [(_decoded_as(row), row) for row in models]


def make_client(config: Config, url: Optional[str] = None, timeout: Optional[float] = None) -> OllamaClient:
    """The exporter's client for `url` (default ollama.url): every request carries X-Forwarded-For
    probes.forwarded_for, which Ollama's gin access log prints as the client, so the logs source can tell
    the exporter's requests from users'."""
    client = OllamaClient(url or config.ollama_url, config.ollama_timeout if timeout is None else timeout,
                          config.ollama_max_models)
    client.http.headers["X-Forwarded-For"] = config.probes_forwarded_for
    return client


@dataclass(frozen=True)
class _LastAnswer:
    raw: bytes
    rows: Rows
    parsed: dict  # key of a row (see _key) -> what the row was parsed into


_ROWS_START, _ROWS_END, _ROW_CUT = b'{"models":[{"name":', b"}]}", b'},{"name":'


def _row_segments(raw: bytes) -> Optional[list[bytes]]:
    """The rows of an answer in Ollama's own shape, `{"models":[{"name":...},{"name":...}]}`, as the
    bytes of each, cut at `},{"name":`: that has a quote no backslash escapes, so it is never inside a
    string, and a cut inside a nested value leaves a row that does not decode (the caller then decodes
    the whole answer). None for any other shape."""
    body = raw.rstrip()
    if not (body.startswith(_ROWS_START) and body.endswith(_ROWS_END)):
        return None
    pieces = body[len(_ROWS_START) - len(b'{"name":'):-len(_ROWS_END) + 1].split(_ROW_CUT)
    last = len(pieces) - 1
    return [(b'{"name":' if i else b"") + piece + (b"}" if i < last else b"") for i, piece in enumerate(pieces)]


def _decoded_as(row: Any) -> Optional[int]:
    """The key of what `row` was decoded to, exactly: repr() tells 1, 1.0 and True apart, which == does
    not (the parsers do). None for a row nested too deeply to write out (it is parsed every time)."""
    try:
        return _key(repr(row))
    except RecursionError:
        return None


def _key(row: bytes | str) -> int:
    """What is kept per row to tell it unchanged in the next answer: the row's hash, 64 bits of SipHash
    under this process's secret key (what a dict keyed by the row would compute anyway), not the row
    (hundreds of bytes) nor what it decoded to (dozens of objects). Two different rows share it with
    odds of 2**-64: at 2 000 rows, every one checked against 2 000 four times a second, once in about
    40 000 years."""
    return hash(row)


class _translate:
    """Map the transport's failures onto OllamaError (a context manager, usable around a generator)."""

    def __init__(self, path: str, shown_url: str):
        self.path, self.shown_url = path, shown_url

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, StatusError):
            raise _status_error(self.path, exc.status, exc.body) from None
        if isinstance(exc, HttpError):
            raise OllamaError(exc.reason, str(exc)) from None  # its messages name the URL without a password
        return False


def _status_error(path: str, status: int, body: bytes) -> OllamaError:
    detail = _error_text(body)
    return OllamaError("http_5xx" if status >= 500 else "http_4xx", f"{path}: HTTP {status}: {detail}", status, detail)


def _json_body(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(path: str, data: bytes, max_values: int = DEFAULT_MAX_VALUES) -> Any:
    """Strict JSON: no NaN or Infinity, no integer too long to parse, no nesting deep enough to recurse out,
    and no more than about `max_values` values (every value but the first in an array or object follows
    a comma, so commas plus brackets bound them; commas inside strings only make the count cautious)."""
    _check_values(path, data, max_values)
    try:
        return json.loads(data, parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        reason = str(exc)[:60] if isinstance(exc, ValueError) else "nested too deeply"
        raise OllamaError("invalid_response", f"{path}: answer is not valid JSON ({reason}): {data[:60]!r}") from None


def _check_values(path: str, data: bytes, max_values: int) -> None:
    values = data.count(b",") + data.count(b"{") + data.count(b"[")
    if values > max_values:
        raise OllamaError("invalid_response", f"{path}: answer holds more than {max_values} JSON values")


def _json_object(path: str, data: bytes, max_values: int) -> dict:
    body = _json(path, data, max_values)
    if not isinstance(body, dict):
        raise OllamaError("invalid_response", f"{path}: answer is not a JSON object")
    return body


def _error_text(body: bytes) -> str:
    """Ollama's errors are {"error": "..."}; gin's 404/405 are plain text; the host check sends nothing."""
    try:
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return _printable(data["error"])[:500]
    except (ValueError, RecursionError):
        pass
    return _printable(body[:200].decode("utf-8", "replace")).strip() or "(empty body)"


# --- value checks: what may become a label value or a sample value ---


class _BadRow(Exception):
    """A model row that cannot be reported (no usable name); it is dropped and counted."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _printable(text: str) -> str:
    return _CONTROL.sub(" ", text.encode("utf-8", "replace").decode("utf-8"))


def _label(value: Any, limit: int = MAX_LABEL) -> str:
    """`value` if it is a string fit to be a label value (UTF-8, no control characters, short), else ""."""
    if not isinstance(value, str) or len(value) > limit or _CONTROL.search(value):
        return ""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \\ud800 escape
        return ""
    return value


def _name(row: Any) -> str:
    if not isinstance(row, dict):
        raise _BadRow()
    name = _label(row.get("name") or row.get("model"), MAX_NAME)
    if not name:
        raise _BadRow()
    return name


def _int(value: Any, low: int = 0, high: int = MAX_COUNT) -> Optional[int]:
    """A whole number in [low, high], from a JSON int or an integral float; anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and low <= value <= high:
        return value
    return None


def _strings(value: Any, limit: int = MAX_CAPABILITIES) -> Optional[tuple[str, ...]]:
    if not isinstance(value, list):
        return None
    return _shared(tuple(dict.fromkeys(s for s in (_label(v, 64) for v in value[:limit]) if s)))


_shared = SharedValues()  # formats, families, quantizations, capability lists, details: see shared.py


def _remote(row: dict) -> bool:
    """A cloud or remote model (v0.12+): inference on it is proxied to another server."""
    return bool(row.get("remote_host") or row.get("remote_model"))


def parse_details(value: Any) -> ModelDetails:
    d = value if isinstance(value, dict) else {}
    return _shared(ModelDetails(
        format=_shared(_label(d.get("format"))),
        family=_shared(_label(d.get("family"))),
        families=_strings(d.get("families")) or (),
        parameter_size=_shared(_label(d.get("parameter_size"))),
        quantization_level=_shared(_label(d.get("quantization_level"))),
    ))


def _digest(value: Any) -> str:
    text = _label(value, 100)
    return text if re.fullmatch(r"(sha256:)?[0-9a-fA-F]{12,64}", text) else ""


def parse_loaded(row: Any) -> LoadedModel:
    name = _name(row)
    return LoadedModel(
        name=name,
        digest=_digest(row.get("digest")),
        size=_int(row.get("size")),
        size_vram=_int(row.get("size_vram")),
        expires_at=parse_timestamp(row.get("expires_at")),
        context_length=_int(row.get("context_length"), 0, 1 << 31),
        details=parse_details(row.get("details")),
        remote=_remote(row),
    )


def parse_installed(row: Any) -> InstalledModel:
    name = _name(row)
    return InstalledModel(
        name=name,
        digest=_digest(row.get("digest")),
        size=_int(row.get("size")),
        details=parse_details(row.get("details")),
        capabilities=_strings(row.get("capabilities")),
        remote=_remote(row),
    )


_FROM_BLOB = re.compile(r"^FROM\s+\S*sha256[-:]([0-9a-f]{64})\s*$", re.MULTILINE)


def parse_show(body: dict) -> ShowInfo:
    info = body.get("model_info") if isinstance(body.get("model_info"), dict) else {}
    arch = _label(info.get("general.architecture"), 64)
    modelfile = body.get("modelfile")
    blob = _FROM_BLOB.search(modelfile[: 1 << 20]) if isinstance(modelfile, str) else None
    return _shared(ShowInfo(
        architecture=_shared(arch),
        context_length=_int(info.get(f"{arch}.context_length"), 1, 1 << 31) if arch else None,
        parameter_count=_int(info.get("general.parameter_count")),
        capabilities=_strings(body.get("capabilities")),
        weights_blob=blob.group(1) if blob else None,
        details=parse_details(body.get("details")),
        remote=_remote(body),
    ))


_RFC3339 = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,12}))?(?:([Zz])|([+-])(\d\d):(\d\d))$"
)


def parse_timestamp(value: Any) -> Optional[float]:
    """RFC 3339 with any fraction length and any offset to unix seconds; Go's zero time or a date that
    does not exist (month 13, say) is None, and never fails the answer it is part of."""
    m = _RFC3339.match(value) if isinstance(value, str) and len(value) <= 64 else None
    if not m:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if year <= 1 or not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
                         and hour <= 23 and minute <= 59 and second <= 60):
        return None
    seconds = calendar.timegm((year, month, day, hour, minute, min(second, 59), 0, 0, 0))
    if m.group(7):
        seconds += int(m.group(7)[:9].ljust(9, "0")) / 1e9
    if m.group(9):
        offset = int(m.group(10)) * 3600 + int(m.group(11)) * 60
        if offset > 24 * 3600:
            return None
        seconds -= offset if m.group(9) == "+" else -offset
    return float(seconds)

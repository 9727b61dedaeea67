"""Render each snapshot once, in the formats scrapers ask for, and hand the same bytes to every scrape.

Between two polls almost nothing changes (the inventory, model info and capabilities are static; a few
gauges move), so rendering costs what changed: each family keeps the lines of its last rendition keyed
by (label values, value), and a family whose rows are all unchanged reuses its text whole. The text
format and OpenMetrics share those sample lines and differ only in a few header lines and `# EOF`, and
the gzip variant compresses each family on its own (a deflate block ended by a full flush does not
depend on what came before), so an unchanged family is compressed once, not once per poll.

The output is byte for byte what prometheus_client's own encoders write for the same families
(tests/test_exposition.py proves it, escaping included). Formats are a fixed set: text 0.0.4 and
OpenMetrics 1.0.0, plain or gzipped; whatever a client writes in its Accept header maps onto them. A
format is rendered, in the poll thread, only while scrapers have asked for it recently; until then a
scrape gets the text format (which every Prometheus-compatible scraper accepts). A scrape never renders
and never takes a lock: it reads one dict that update() replaces whole.

If a series cannot be rendered (it should not happen: values are validated where Ollama's answers are
parsed), it is left out and the rest of its family stays current; if a family fails as a whole, its
last good rendition is served; if a snapshot cannot be turned into families at all, the
last families that could are served (their ollama_exporter_snapshot_timestamp_seconds says how old they
are); if a whole render fails, the last bodies stay. Each failure is counted in
ollama_exporter_render_failures_total, and `healthy` (which /-/ready reports) is False until a render
succeeds again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
import zlib
from array import array
from dataclasses import dataclass
from typing import Iterable, Optional

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.utils import floatToGoString

from ollama_exporter.metrics import DEFS, Def, Family, Sections, collect
from ollama_exporter.snapshot import HistogramValue, Snapshot

log = logging.getLogger(__name__)

TEXT, OPENMETRICS = "text", "openmetrics"
CONTENT_TYPES = {TEXT: "text/plain; version=0.0.4; charset=utf-8",
                 OPENMETRICS: "application/openmetrics-text; version=1.0.0; charset=utf-8"}
WANTED_FOR = 900.0  # seconds a format stays rendered after the last scrape that asked for it
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, no mtime, unknown OS (RFC 1952)
_FINAL_BLOCK = b"\x03\x00"  # an empty final fixed-Huffman deflate block
CHUNK_BYTES = 32 * 1024  # a family's text is deflated in pieces about this big (see Writer._blocks)
SENDFILE_MIN = 32 * 1024  # smaller bodies are sent from our memory: one write beats two calls


# --- content negotiation: a client's headers map onto a fixed set of variants ---


def _ranges(header: str) -> Iterable[tuple[str, dict[str, str], float]]:
    """(media range or coding, parameters, q) for each comma-separated item of an Accept(-Encoding) header."""
    for item in header.split(",")[:32]:
        name, *params = (p.strip() for p in item.split(";"))
        values = {}
        for param in params:
            key, _, value = param.partition("=")
            values[key.strip().lower()] = value.strip()
        try:
            q = min(max(float(values.pop("q", "1")), 0.0), 1.0)
        except ValueError:
            q = 0.0
        yield name.lower(), values, q


def negotiate(accept: str) -> str:
    """TEXT or OPENMETRICS for an Accept header: OpenMetrics only when preferred to the text format."""
    best_om, best_text = 0.0, 0.0
    for name, params, q in _ranges(accept or ""):
        if name == "application/openmetrics-text" and params.get("version", "1.0.0") in ("1.0.0", "0.0.1"):
            best_om = max(best_om, q)
        elif name in ("text/plain", "text/*", "*/*"):
            best_text = max(best_text, q)
    return OPENMETRICS if best_om > best_text else TEXT


def gzip_accepted(accept_encoding: str) -> bool:
    """True when the client takes gzip with q > 0 (`gzip;q=0` means no)."""
    q = {name: q for name, _, q in _ranges(accept_encoding or "")}
    return q.get("gzip", q.get("*", 0.0)) > 0


# --- the writer: families to text, reusing what did not change ---


def _escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


@dataclass(frozen=True)
class _Shape:
    """What a Def needs for fast lines: its label names sorted, and where each sorted name comes from."""

    order: tuple[int, ...]
    names: tuple[str, ...]
    le_at: int  # where `le` goes among the sorted names (histograms)

    @classmethod
    def of(cls, d: Def) -> "_Shape":
        order = tuple(sorted(range(len(d.labels)), key=lambda i: d.labels[i]))
        names = tuple(d.labels[i] for i in order)
        return cls(order, names, sum(1 for n in names if n < "le"))


class _FamilyText:
    """The last rendition of one family: its rows, its body (their lines, in the same order), where each
    row's line ends in the body, and the body in each format.

    Lines are kept as offsets into the body, not as a string each: a string per series is thousands of
    small objects that outlive the render, scattered through the allocator's pools (after a burst of
    model names those pools stayed resident); one array of offsets is one allocation."""

    __slots__ = ("source", "rows", "ends", "body", "left_out", "encoded", "gzipped", "blocks", "previous")

    def __init__(self, source: list, rows: list, ends: array, body: str, left_out: int = 0,
                 previous: Optional[list] = None):
        self.source = source  # the rows list it was rendered from: the same list again means no change
        self.rows, self.ends, self.body = rows, ends, body  # ends[i]: where row i's line ends (a row left out: empty)
        self.left_out = left_out  # rows that could not be rendered
        self.encoded: dict[str, bytes] = {}  # format -> header and body, encoded
        self.gzipped: dict[str, bytes] = {}  # format -> the same as full-flushed deflate blocks
        self.blocks: Optional[list[tuple[tuple, bytes]]] = None  # the body deflated chunk by chunk: (rows, block)
        self.previous = previous  # the blocks of the last rendition, until these are made from them

    def start(self, i: int) -> int:
        """Where row i's line starts in the body: where the row before it ends."""
        return self.ends[i - 1] if i else 0

    def rendered(self, i: int) -> bool:
        """Whether row i has a line (a row that could not be rendered was left out: an empty span)."""
        return self.ends[i] != self.start(i)

    def text(self, start: int, stop: int) -> str:
        """The lines of rows start to stop (not included)."""
        return self.body[self.start(start):self.start(stop)]


class Writer:
    """Families to the text format and OpenMetrics, family by family, reusing unchanged lines."""

    def __init__(self) -> None:
        self._shapes = {name: _Shape.of(d) for name, d in DEFS.items()}
        self._last: dict[str, _FamilyText] = {}
        self._header_blocks: dict[tuple[str, str], bytes] = {}
        self._chunk_rows: dict[str, int] = {}  # family -> rows per deflate chunk, kept so chunks line up
        self.failures = 0

    def render(self, families: Iterable[Family], fmt: str, gzipped: bool) -> tuple[bytes, bool]:
        """One variant of one set of families; returns (body, every family rendered fresh)."""
        prepared, ok = self.prepare(families)
        return self.encode(prepared, fmt, gzipped), ok

    def prepare(self, families: Iterable[Family]) -> tuple[list[tuple[Def, "_FamilyText"]], bool]:
        """Each family's text (fresh, reused, or its last good one); ok is False if one had to fall back."""
        prepared, ok = [], True
        for family in families:
            text, fresh = self._family(family)
            ok = ok and fresh
            if text is not None:
                prepared.append((family.d, text))
        return prepared, ok

    def encode(self, prepared: list[tuple[Def, "_FamilyText"]], fmt: str, gzipped: bool) -> bytes:
        return b"".join(self._encoded(d, text, fmt, gzipped) for d, text in prepared)

    def forget(self, keep: set[str]) -> None:
        for name in [n for n in self._last if n not in keep]:
            del self._last[name]

    def _family(self, family: Family) -> tuple[Optional[_FamilyText], bool]:
        """The family's text and whether it is whole. A row that cannot be rendered (a value that got past
        validation) is left out and counted, so the family's other series stay current; if the family
        as a whole fails, its last good rendition is served."""
        name = family.d.name
        last = self._last.get(name)
        if last is not None and (last.source is family.rows or last.rows == family.rows):
            last.source = family.rows
            return last, not last.left_out
        try:
            rows = family.rows
            old_rows = last.rows if last is not None else ()
            # Rows that stayed where they were are compared in place (most are the very same objects); when
            # rows came or went, each is looked up by value instead.
            failed: set[int] = set()  # rows left out last time (an empty span) are tried again
            if last is not None and last.left_out:
                failed = {i for i in range(len(old_rows)) if not last.rendered(i)}
            if len(old_rows) == len(rows):
                runs = _runs_in_place([i for i, (before, row) in enumerate(zip(old_rows, rows))
                                       if (before is not row and before != row) or i in failed], len(rows))
            else:
                by_row = {row: i for i, row in enumerate(old_rows) if i not in failed}
                runs = _runs([by_row.get(row, -1) for row in rows])
            body, ends, left_out = self._assemble(family.d, rows, runs, last)
            previous = (last.blocks or last.previous) if last is not None else None
            text = _FamilyText(rows, list(rows), ends, body, left_out, previous)
        except Exception:  # noqa: BLE001 - one bad family must not take the exposition down
            self.failures += 1
            log.error("cannot render a metric family, serving its last good rendition", exc_info=True,
                      extra={"metric": name})
            return last, False
        if left_out:
            self.failures += 1
            log.error("cannot render some series of a metric family, leaving them out",
                      extra={"metric": name, "count": left_out})
        self._last[name] = text
        return text, not left_out

    def _assemble(self, d: Def, rows: list, runs: list[tuple[int, int, int]], last: Optional[_FamilyText]
                  ) -> tuple[str, array, int]:
        """The body for `rows` and where each row's line ends in it, from runs (see _runs): a run of kept
        lines is one slice of the last body; a row that cannot be rendered is left out and counted."""
        pieces: list[str] = []
        ends, end, left_out = array("Q"), 0, 0
        for i, j, count in runs:
            if j < 0:
                try:
                    line = self._line(d, rows[i])
                    line.encode("utf-8")  # fail here, not in the middle of a response
                except (ValueError, TypeError, OverflowError):  # UnicodeEncodeError is a ValueError
                    left_out += 1
                    line = ""
                pieces.append(line)
                end += len(line)
                ends.append(end)
                continue
            first, kept = last.start(j), last.ends[j:j + count]
            pieces.append(last.body[first:kept[-1]])
            shift = end - first
            ends.extend(kept if not shift else array("Q", map(shift.__add__, kept)))
            end = ends[-1]
        return "".join(pieces), ends, left_out

    def _line(self, d: Def, row: tuple) -> str:
        labels, value = row
        shape = self._shapes.get(d.name) or _Shape.of(d)
        pairs = [f'{shape.names[j]}="{_escape(labels[i])}"' for j, i in enumerate(shape.order)]
        if not isinstance(value, HistogramValue):
            return f"{d.name}{{{','.join(pairs)}}} {floatToGoString(value)}\n" if pairs else \
                f"{d.name} {floatToGoString(value)}\n"
        out = []
        for bound, count in list(zip(value.buckets, value.counts)) + [(float("inf"), value.count)]:
            with_le = pairs[:shape.le_at] + [f'le="{floatToGoString(bound)}"'] + pairs[shape.le_at:]
            out.append(f"{d.name}_bucket{{{','.join(with_le)}}} {floatToGoString(count)}\n")
        braces = f"{{{','.join(pairs)}}}" if pairs else ""
        out.append(f"{d.name}_count{braces} {floatToGoString(value.count)}\n")
        out.append(f"{d.name}_sum{braces} {floatToGoString(value.sum)}\n")
        return "".join(out)

    @staticmethod
    def header(d: Def, fmt: str) -> str:
        name = d.name
        if fmt == OPENMETRICS:
            if d.kind == "counter":
                name = name[:-6]
            help_text = _escape(d.help)  # OpenMetrics escapes quotes in HELP too
        else:
            help_text = d.help.replace("\\", "\\\\").replace("\n", "\\n")
        return f"# HELP {name} {help_text}\n# TYPE {name} {d.kind}\n"

    def _encoded(self, d: Def, text: _FamilyText, fmt: str, gzipped: bool) -> bytes:
        done = (text.gzipped if gzipped else text.encoded).get(fmt)
        if done is None:
            if gzipped:
                done = text.gzipped[fmt] = self._header_block(d, fmt) + b"".join(b for _, b in self._blocks(d, text))
            else:
                done = text.encoded[fmt] = (self.header(d, fmt) + text.body).encode("utf-8")
        return done

    def _header_block(self, d: Def, fmt: str) -> bytes:
        block = self._header_blocks.get((d.name, fmt))
        if block is None:
            block = self._header_blocks[(d.name, fmt)] = _deflate_block(self.header(d, fmt).encode("utf-8"))
        return block

    def _blocks(self, d: Def, text: _FamilyText) -> list[tuple[tuple, bytes]]:
        """The body deflated in chunks of a fixed number of rows (about CHUNK_BYTES of text each), each a
        full-flushed block: when a few rows changed (a probed model, a moved gauge), only their chunks are
        compressed again, the others come from the last rendition. The rows per chunk change only when
        the family's lines got twice as long or short on average, which recompresses it whole once."""
        if text.blocks is None:
            size, ideal = self._chunk_rows.get(d.name), max(1, CHUNK_BYTES * len(text.rows) // max(1, len(text.body)))
            if size is None or not size // 2 <= ideal <= size * 2:  # kept while the lines keep their length
                size = self._chunk_rows[d.name] = ideal
            previous, blocks = text.previous or [], []
            for k, start in enumerate(range(0, len(text.rows), size)):
                rows = tuple(text.rows[start:start + size])
                if k < len(previous) and previous[k][0] == rows:
                    blocks.append(previous[k])
                else:
                    block = _deflate_block(text.text(start, start + len(rows)).encode("utf-8"))
                    blocks.append((rows, block))
            text.blocks, text.previous = blocks, None
        return text.blocks


def _runs(kept: list[int]) -> list[tuple[int, int, int]]:
    """(i, j, count): rows i.. keep the lines of the last rendition's rows j.. (count of them), or, with j
    -1, row i is rendered anew; from kept[i], the last row whose line row i keeps (-1: none)."""
    runs: list[tuple[int, int, int]] = []
    for i, j in enumerate(kept):
        if j >= 0 and runs and runs[-1][1] >= 0 and runs[-1][1] + runs[-1][2] == j:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, j, 1))
    return runs


def _runs_in_place(changed: list[int], n: int) -> list[tuple[int, int, int]]:
    """_runs for n rows that each keep their own line but those in `changed` (ascending)."""
    runs, start = [], 0
    for i in changed:
        if i > start:
            runs.append((start, start, i - start))
        runs.append((i, -1, 1))
        start = i + 1
    if start < n:
        runs.append((start, start, n - start))
    return runs


_COMPRESSORS = threading.local()


def _deflate_block(data: bytes) -> bytes:
    """Raw deflate of `data`, ended by a full flush: it decodes the same whatever precedes it.

    A full flush leaves nothing of the input before it to refer to, so one compressor per thread serves
    every block: setting one up (a few hundred KiB of zlib state) cost more than compressing a chunk."""
    compressor = getattr(_COMPRESSORS, "compressor", None)
    if compressor is None:
        compressor = _COMPRESSORS.compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    try:
        return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)
    except BaseException:
        _COMPRESSORS.compressor = None  # its state is unknown now
        raise


def gzip_member(blocks: bytes, plain: bytes) -> bytes:
    """A complete gzip member from concatenated full-flushed deflate blocks and the plain text they hold."""
    return _gzip_member(blocks, zlib.crc32(plain), len(plain))


def _gzip_member(blocks: bytes, crc: int, size: int) -> bytes:
    return _GZIP_HEADER + blocks + _FINAL_BLOCK + crc.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")


# --- the runtime metrics (process_*, python_*), from prometheus_client's own collectors ---


def _runtime_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class _Collected:
    """A registry's metrics collected once, so every format of one render shows the same values."""

    def __init__(self, registry: CollectorRegistry):
        self.metrics = list(registry.collect())

    def collect(self) -> list:
        return self.metrics


def _runtime(registry, fmt: str) -> bytes:
    if registry is None:
        return b""
    if fmt == OPENMETRICS:
        return generate_openmetrics(registry)[: -len(b"# EOF\n")]
    return generate_latest(registry)


# --- one-off rendering (--once, /probe) and the daemon's per-snapshot cache ---


def render(snapshot: Snapshot, accept: str = "") -> tuple[bytes, str]:
    """Encode one snapshot alone (no runtime metrics) in the format `accept` negotiates."""
    fmt = negotiate(accept)
    body, _ = Writer().render(collect(snapshot), fmt, gzipped=False)
    return body + (b"# EOF\n" if fmt == OPENMETRICS else b""), CONTENT_TYPES[fmt]


@dataclass(frozen=True)
class Body:
    data: bytes
    content_type: str
    gzipped: bool
    file: Optional["BodyFile"] = None  # the same bytes in a memory file, for the server's sendfile


class BodyFile:
    """A body's bytes in an anonymous in-memory file (Linux memfd), written once per render.

    The server hands it to the kernel with sendfile(), which sends from the file's own pages: a scrape of
    a large body then costs no copy out of our memory, as with a static file server. Closed once the Body
    is gone and no connection is still sending it.
    """

    __slots__ = ("fd", "size", "__weakref__")

    def __init__(self, data: bytes):
        self.fd = os.memfd_create("ollama-exporter-body", os.MFD_CLOEXEC)
        self.size = len(data)
        try:
            view, done = memoryview(data), 0
            while done < self.size:
                done += os.write(self.fd, view[done:])
        except BaseException:
            os.close(self.fd)
            raise
        weakref.finalize(self, os.close, self.fd)

    @classmethod
    def of(cls, data: bytes) -> Optional["BodyFile"]:
        """A file for bodies big enough for sendfile to beat a copy; None where memfd is not available."""
        if len(data) < SENDFILE_MIN or not hasattr(os, "memfd_create"):
            return None
        try:
            return cls(data)
        except OSError as exc:  # out of descriptors or memory: the server sends from our bytes instead
            log.warning("cannot keep a body in a memory file", extra={"error": str(exc)})
            return None


class Exposition:
    """The rendered variants of the latest snapshot, replaced whole by each update()."""

    def __init__(self, runtime_metrics: bool = True, clock=time.monotonic):
        self.runtime_metrics = runtime_metrics
        self.clock = clock
        self._registry = _runtime_registry()
        self._writer = Writer()
        self._sections = Sections()  # collect()'s families of the last snapshot, reused where unchanged
        self._lock = threading.Lock()  # update() against update(): only the poll thread, plus tests
        self._wanted: dict[tuple[str, bool], float] = {}  # variant -> when a scrape last asked for it
        self._bodies: dict[tuple[str, bool], Body] = {}
        self._negotiated: dict[tuple[str, str], tuple[str, bool]] = {}  # (Accept, Accept-Encoding) -> variant
        self._current = Snapshot.empty()
        self._alone: dict[str, tuple[Snapshot, tuple[bytes, str]]] = {}  # format -> (snapshot, alone())
        self._families: list[Family] = []  # of the last snapshot that could be collected
        self.healthy = True
        self.update(Snapshot.empty())  # until the first poll: ollama_up 0 and the exporter's own metrics

    @property
    def snapshot(self) -> Snapshot:
        return self._current

    @property
    def render_failures(self) -> int:
        return self._writer.failures

    def update(self, snapshot: Snapshot) -> None:
        """Render every variant scrapers asked for recently (text always) and swap them in at once."""
        with self._lock:
            self._render(snapshot)

    def _render(self, snapshot: Snapshot) -> None:
        now = self.clock()
        self._current = snapshot
        try:
            self._families, collected = list(collect(snapshot, self._sections)), True
        except Exception:  # noqa: BLE001 - a bug in one snapshot must not freeze the exposition
            self._writer.failures += 1
            log.error("cannot collect the metrics of a snapshot, serving the last good ones", exc_info=True)
            collected = False  # self._families: the last snapshot that could be collected
        wanted = [v for v, asked in self._wanted.items() if now - asked < WANTED_FOR]
        variants = dict.fromkeys([(TEXT, False), *wanted])
        try:
            prepared, ok = self._writer.prepare(self._families)
            failures = DEFS["ollama_exporter_render_failures_total"].family()
            failures.add((), float(self._writer.failures))  # after prepare(): this render's failures count
            prepared += self._writer.prepare([failures])[0]
            families = [*self._families, failures]
            runtime = _Collected(self._registry) if self.runtime_metrics else None
            formats = {fmt for fmt, _ in variants}
            tails = {fmt: _runtime(runtime, fmt) + (b"# EOF\n" if fmt == OPENMETRICS else b"") for fmt in formats}
            plains = {fmt: self._writer.encode(prepared, fmt, False) for fmt in formats}  # gzip needs it too
            bodies = {(fmt, gzipped): self._variant(prepared, fmt, gzipped, plains[fmt], tails[fmt],
                                                    (fmt, gzipped) in wanted)
                      for fmt, gzipped in variants}
        except Exception:  # noqa: BLE001 - keep serving the bodies of the last render
            self._writer.failures += 1
            log.error("cannot render the exposition, serving the last good one", exc_info=True)
            self.healthy = False
            return
        self._writer.forget({f.d.name for f in families})
        self._bodies, self.healthy = bodies, ok and collected

    def _variant(self, prepared: list, fmt: str, gzipped: bool, plain: bytes, tail: bytes, wanted: bool) -> Body:
        if gzipped:
            blocks = self._writer.encode(prepared, fmt, True)
            crc = zlib.crc32(tail, zlib.crc32(plain))
            body = _gzip_member(blocks + _deflate_block(tail), crc, len(plain) + len(tail))
        else:
            body = plain + tail
        return Body(body, CONTENT_TYPES[fmt], gzipped, BodyFile.of(body) if wanted else None)

    def alone(self, accept: str = "") -> tuple[bytes, str]:
        """The latest snapshot encoded alone (render(): no runtime metrics), as /probe answers for the local
        Ollama: once per snapshot and format, not once per scrape."""
        snapshot, fmt = self._current, negotiate(accept)
        cached = self._alone.get(fmt)
        if cached is None or cached[0] is not snapshot:
            cached = self._alone[fmt] = (snapshot, render(snapshot, accept))
        return cached[1]

    def get(self, accept: str = "", accept_encoding: str = "") -> Body:
        """The body for a scrape. A variant asked for the first time is rendered in the background and
        served from then on; meanwhile this scrape gets the closest one already rendered."""
        variant = self._negotiated.get((accept, accept_encoding))
        if variant is None:
            variant = (negotiate(accept), gzip_accepted(accept_encoding))
            if len(self._negotiated) >= 256:
                self._negotiated.clear()  # a client inventing headers cannot grow this
            self._negotiated[(accept, accept_encoding)] = variant
        now = self.clock()
        if now - self._wanted.get(variant, -WANTED_FOR) > 1.0:
            self._wanted[variant] = now  # only a handful of keys: the variants are a fixed set
        bodies = self._bodies
        body = bodies.get(variant)
        if body is None:
            self._render_soon()
            body = bodies.get((variant[0], False)) or bodies[(TEXT, False)]
        return body

    def _render_soon(self) -> None:
        """Render the current snapshot again, in a thread of its own, for a newly wanted variant."""
        if self._lock.locked():
            return  # a render is under way; it (or the next poll) picks the new variant up

        def work() -> None:
            with self._lock:
                self._render(self._current)

        threading.Thread(target=work, name="render", daemon=True).start()

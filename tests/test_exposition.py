"""The direct writer: byte for byte what prometheus_client writes, hostile names included; rendering
costs what changed; one bad family never takes the exposition down; gzip decodes everywhere."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import zlib
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from ollama_exporter import exposition
from ollama_exporter.exposition import (
    OPENMETRICS,
    TEXT,
    Exposition,
    Writer,
    gzip_accepted,
    gzip_member,
    negotiate,
    render,
)
from ollama_exporter.metrics import DEFS, Def, Family, collect
from ollama_exporter.snapshot import HistogramValue
from tests.test_metrics import rich_snapshot

HOSTILE = ['plain', 'quo"te', 'back\\slash', 'new\nline', 'tab\there', 'ünïcødé 模型', 'a=b,c="d"', '}{', '',
           '\\"\\n', 'x' * 300]


class _Reference:
    """prometheus_client's own families for the same rows: the reference the writer must match."""

    def __init__(self, families: list[Family]):
        self.families = families

    def collect(self):
        for f in self.families:
            d = f.d
            cls = {"counter": CounterMetricFamily, "histogram": HistogramMetricFamily}.get(d.kind, GaugeMetricFamily)
            out = cls(d.name, d.help, labels=d.labels)
            for labels, value in f.rows:
                if isinstance(value, HistogramValue):
                    buckets = [(floatToGoString(b), c) for b, c in zip(value.buckets, value.counts)]
                    out.add_metric(list(labels), buckets + [("+Inf", value.count)], value.sum)
                else:
                    out.add_metric(list(labels), value)
            yield out


def reference(families: list[Family], fmt: str) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Reference(families))
    return generate_openmetrics(registry) if fmt == OPENMETRICS else generate_latest(registry)


def ours(families: list[Family], fmt: str) -> bytes:
    body, ok = Writer().render(families, fmt, gzipped=False)
    assert ok
    return body + (b"# EOF\n" if fmt == OPENMETRICS else b"")


def hostile_families() -> list[Family]:
    info = DEFS["ollama_model_info"].family()
    hist = DEFS["ollama_probe_ttft_seconds"].family()
    loads = DEFS["ollama_model_loads_total"].family()
    odd = Family(Def("test_odd_help", "gauge", 'help with "quotes", back\\slash and\nnewline', ("z", "a", "le_x")))
    for i, name in enumerate(HOSTILE):
        info.add((name, "d" * 64, "fam" + name, "8B", "Q4", "gguf"), 1.0)
        hist.add((name,), HistogramValue((0.1, 1.0, 10.0), (i, i + 1, i + 2), i + 3, 1.5 * i))
        loads.add((name,), float(i))
        odd.add((name, name[::-1], "v"), [0.0, -1.5, 1e21, 123456789.0, float("inf"), 3e-9, 7][i % 7])
    return [info, hist, loads, odd]


@pytest.mark.parametrize("fmt", [TEXT, OPENMETRICS])
def test_byte_for_byte_what_prometheus_client_writes(fmt):
    families = list(collect(rich_snapshot())) + hostile_families()
    assert ours(families, fmt) == reference(families, fmt)


def full_snapshot():
    """rich_snapshot plus two GPUs (one with MIG and processes), model GPU memory and probe histograms."""
    from dataclasses import replace

    from ollama_exporter.prober import ProbeResult, _ModelStats
    from ollama_exporter.snapshot import GpuDevice, GpuProcess, GpuState, MigInstance, ModelGpuMemory, frozen_map

    a100 = GpuDevice(0, "GPU-0", "NVIDIA A100", "00000000:01:00.0", True, 80e9, 20e9, 60e9, 1e8, None, 0.1, 45.0,
                     60.5, 400.0, 1.5e9, (("graphics", 1.41e9), ("memory", 1.5e9)), 0, None,
                     (("sw_power_cap", False), ("hw_thermal", True)), (("corrected", 3), ("uncorrected", 0)),
                     (MigInstance(1, 0, "MIG-1", 40e9, 1e9, 39e9),), (GpuProcess(42, "0", "GPU-0", 5e9, "blob:" + "a" * 64),))
    lost = GpuDevice(1, "GPU-1", "RTX 4090", "00000000:02:00.0", False)
    stats = _ModelStats()
    for ok, ttft in ((True, 0.2), (True, 3.0), (False, None)):
        stats.record(ProbeResult("qwen3:8b", "generate", ok, "" if ok else "timeout", "", ttft, 0.02, 1.0, 16,
                                 0.0, 0.1, 0.3, 10, 16), 1790000000.0)
    return replace(rich_snapshot(), gpu=GpuState(True, "550.54", (a100, lost), ()),
                   model_gpu_memory=(ModelGpuMemory("qwen3:8b", "0", "GPU-0", 5_000_000_000),),
                   gpu_unattributed=frozen_map({"unreadable": 1, "loading": 0, "other": 2}),
                   probes={"qwen3:8b": stats.value()})


def test_every_family_of_a_full_snapshot_matches_including_probes_and_gpus():
    families = list(collect(full_snapshot()))
    for fmt in (TEXT, OPENMETRICS):
        assert ours(families, fmt) == reference(families, fmt)


def test_promtool_and_both_parsers_read_hostile_names_back(promtool):
    families = hostile_families()[:3]
    text = ours(families, TEXT).decode()
    parsed = {(s.name, s.labels.get("model")) for f in text_string_to_metric_families(text) for s in f.samples}
    for name in HOSTILE:
        assert ("ollama_model_info", name) in parsed and ("ollama_probe_ttft_seconds_count", name) in parsed
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

    om = {s.labels.get("model") for f in om_parse(ours(families, OPENMETRICS).decode()) for s in f.samples}
    assert set(HOSTILE) <= om
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_rendering_costs_what_changed(monkeypatch):
    writer = Writer()
    families = hostile_families()
    writer.render(families, TEXT, False)
    lines = []
    original = writer._line
    monkeypatch.setattr(writer, "_line", lambda d, row: lines.append(row) or original(d, row))
    writer.render(hostile_families(), TEXT, False)
    assert lines == []  # nothing changed: every family reused whole
    changed = hostile_families()
    changed[2].rows[3] = (changed[2].rows[3][0], 99.0)
    body, _ = writer.render(changed, TEXT, False)
    assert len(lines) == 1 and b'ollama_model_loads_total{model="new\\nline"} 99.0' in body


def test_gzip_is_one_member_that_every_decoder_reads():
    exp = Exposition(runtime_metrics=True)
    exp.update(rich_snapshot())
    exp._wanted[(TEXT, True)] = exp.clock()
    exp.update(rich_snapshot())
    plain, zipped = exp.get().data, exp.get("", "gzip").data
    assert exp.get("", "gzip").gzipped
    assert gzip.decompress(zipped) == plain
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)  # one gzip member, exactly
    assert decoder.decompress(zipped) == plain and decoder.eof and decoder.unused_data == b""
    if shutil.which("gzip"):
        out = subprocess.run(["gzip", "-dc"], input=zipped, capture_output=True, check=True).stdout
        assert out == plain


def test_gzip_member_of_reused_blocks_is_valid():
    blocks = [exposition._deflate_block(b"a" * 1000), exposition._deflate_block(b"b\n" * 10)]
    plain = b"a" * 1000 + b"b\n" * 10
    assert gzip.decompress(gzip_member(b"".join(blocks), plain)) == plain


def test_a_series_that_cannot_be_rendered_is_left_out_and_the_rest_stays_current():
    exp = Exposition(runtime_metrics=False)
    good = rich_snapshot()
    exp.update(good)
    assert exp.healthy and b'model="qwen3:8b"' in exp.get().data
    bad = replace(good.installed[0], name="bad\ud800name")
    renamed = replace(good.installed[1], size=123)
    exp.update(replace(good, installed=(bad, renamed)))  # a lone surrogate cannot be encoded
    body = exp.get().data.decode()
    assert not exp.healthy and exp.render_failures >= 1
    assert "bad" not in body and "ollama_up 1.0" in body
    assert f'ollama_model_size_bytes{{model="{renamed.name}"}} 123.0' in body  # current, not the last rendition
    assert f"ollama_exporter_render_failures_total {float(exp.render_failures)}" in body  # counted at once
    exp.update(replace(good, installed=(bad, renamed)))  # the same rows again: still not whole
    assert not exp.healthy
    exp.update(good)
    assert exp.healthy


def test_a_family_that_fails_as_a_whole_keeps_its_last_good_rendition():
    writer = Writer()
    good = DEFS["ollama_model_loads_total"].family()
    good.add(("a:1",), 1.0)
    writer.render([good], TEXT, False)
    broken = DEFS["ollama_model_loads_total"].family()
    broken.rows.append(([], 2.0))  # unhashable labels: a bug, not a value
    body, ok = writer.render([broken], TEXT, False)
    assert not ok and writer.failures == 1
    assert b'ollama_model_loads_total{model="a:1"} 1.0' in body


def test_a_snapshot_that_cannot_be_collected_keeps_the_last_families_and_counts(monkeypatch):
    exp = Exposition(runtime_metrics=False)
    good = rich_snapshot()
    exp.update(good)
    before = exp.get().data
    monkeypatch.setattr(exposition, "collect", lambda snapshot, *sections: 1 / 0)
    exp.update(replace(good, installed=()))  # used to raise out of update(), in the poll thread
    body = exp.get().data.decode()
    assert not exp.healthy and exp.render_failures == 1
    assert "ollama_exporter_render_failures_total 1.0" in body
    assert body.replace("ollama_exporter_render_failures_total 1.0", "ollama_exporter_render_failures_total 0.0") \
        == before.decode()
    monkeypatch.undo()
    exp.update(good)
    assert exp.healthy


@pytest.mark.parametrize("accept, fmt", [
    ("", TEXT),
    ("text/plain;version=0.0.4", TEXT),
    ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1", OPENMETRICS),  # Prometheus 2.x
    ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;version=1.0.0;"
     "escaping=allow-utf-8;q=0.5,*/*;q=0.4", OPENMETRICS),  # Prometheus 3.x
    ("application/openmetrics-text; version=1.0.0x", TEXT),
    ("application/openmetrics-text; version=2.0.0; q=1, text/plain", TEXT),
    ("application/openmetrics-text;q=0", TEXT),
    ("text/plain;q=0.2, application/openmetrics-text", OPENMETRICS),
    ("garbage;;;q=abc,,,", TEXT),
])
def test_any_accept_header_maps_onto_two_formats(accept, fmt):
    assert negotiate(accept) == fmt


@pytest.mark.parametrize("header, ok", [("gzip", True), ("gzip;q=0", False), ("gzip; q=0.0", False),
                                        ("deflate, gzip;q=0.5", True), ("*", True), ("identity", False),
                                        ("*;q=0", False), ("", False), ("GZIP", True)])
def test_gzip_only_when_accepted_with_a_positive_q(header, ok):
    assert gzip_accepted(header) is ok


def test_a_thousand_different_accept_headers_keep_the_variants_bounded():
    exp = Exposition(runtime_metrics=False)
    exp.update(rich_snapshot())
    for i in range(1000):
        exp.get(f"application/openmetrics-text; version=1.0.{i}", f"gzip;q=0.{i % 10}")
    assert set(exp._wanted) <= {(TEXT, False), (TEXT, True), (OPENMETRICS, False), (OPENMETRICS, True)}


def test_reused_sections_render_exactly_what_a_fresh_render_does():
    """An Exposition that reuses what did not change serves, snapshot after snapshot, the bytes a fresh
    one renders for the same snapshot: nothing stale survives a change, nothing is rendered twice."""
    from dataclasses import replace

    from ollama_exporter.snapshot import frozen_map

    base = full_snapshot()
    more = base.installed + (replace(base.installed[0], name="extra:1"),)
    probes = dict(base.probes)
    name = next(iter(probes))
    sequence = [base, replace(base, timestamp=base.timestamp + 5),
                replace(base, installed=more), replace(base, installed=more),
                replace(base, probes={**probes, name: replace(probes[name], probes=probes[name].probes + 1)}),
                replace(base, loads_total=frozen_map({**base.loads_total, "extra:1": 3})), base]
    reusing = Exposition(runtime_metrics=False)
    calls = []
    original = reusing._writer._line
    reusing._writer._line = lambda d, row: calls.append(row) or original(d, row)
    for snapshot in sequence:
        reusing.update(snapshot)
        fresh = Exposition(runtime_metrics=False)
        fresh.update(snapshot)
        assert reusing.get().data == fresh.get().data
    calls.clear()
    reusing.update(base)
    assert calls == []  # an unchanged snapshot renders no line


def test_a_large_wanted_body_is_also_in_a_memory_file_with_the_same_bytes():
    from dataclasses import replace

    from ollama_exporter.snapshot import InstalledModel, ModelDetails

    exp = Exposition(runtime_metrics=False)
    many = tuple(InstalledModel(f"m{i}:1", hashlib.sha256(b"%d" % i).hexdigest(), i, ModelDetails())
                 for i in range(2000))
    exp.update(replace(rich_snapshot(), installed=many))
    assert exp.get().file is None  # the text format nobody asked for yet: no file
    exp._wanted[(TEXT, False)] = exp._wanted[(OPENMETRICS, True)] = exp.clock()
    exp.update(replace(rich_snapshot(), installed=many))
    for body in (exp.get(), exp.get("application/openmetrics-text; version=1.0.0", "gzip")):
        assert body.file is not None and body.file.size == len(body.data)
        assert os.pread(body.file.fd, len(body.data) + 1, 0) == body.data
    small = Exposition(runtime_metrics=False)
    small._wanted[(TEXT, False)] = small.clock()
    small.update(rich_snapshot())
    assert small.get().file is None  # small bodies are sent from memory


def test_a_large_family_is_compressed_again_only_where_it_changed(monkeypatch):
    d = DEFS["ollama_model_loads_total"]
    family = d.family()
    for i in range(5000):
        family.add((f"model-{i:05d}:latest",), float(i))
    writer = Writer()
    first, _ = writer.render([family], OPENMETRICS, gzipped=True)
    compressed = []
    original = exposition._deflate_block
    monkeypatch.setattr(exposition, "_deflate_block", lambda data: compressed.append(data) or original(data))
    changed = d.family()
    changed.rows = list(family.rows)
    changed.rows[2500] = (changed.rows[2500][0], 1e9)
    body, _ = writer.render([changed], OPENMETRICS, gzipped=True)
    plain, _ = writer.render([changed], OPENMETRICS, gzipped=False)
    assert len(compressed) == 1 and b'model="model-02500:latest"} 1e+09' in compressed[0]
    assert len(compressed[0]) < len(plain) / 4  # one chunk of many
    assert zlib.decompressobj(-15).decompress(body) == plain
    assert plain == reference([changed], OPENMETRICS)[: -len(b"# EOF\n")]


def test_a_family_that_starts_empty_still_compresses_as_well_as_whole():
    """The rows per chunk follow the family's line length, not its first (empty) rendition."""
    d = DEFS["ollama_model_loads_total"]
    writer = Writer()
    writer.render([d.family()], OPENMETRICS, gzipped=True)
    family = d.family()
    for i in range(5000):
        family.add((f"model-{i:05d}:latest",), float(i))
    body, _ = writer.render([family], OPENMETRICS, gzipped=True)
    plain, _ = writer.render([family], OPENMETRICS, gzipped=False)
    assert len(body) < 1.2 * len(zlib.compress(plain, 6))


def test_the_local_target_is_encoded_once_per_snapshot_and_format(monkeypatch):
    """/probe for the exporter's own Ollama answers render() of the latest snapshot; a scrape must not
    pay for collecting and encoding it again while the snapshot is the same."""
    exp = Exposition(runtime_metrics=False)
    snap = rich_snapshot()
    exp.update(snap)
    calls = []
    monkeypatch.setattr(exposition, "render", lambda s, accept="": calls.append(s) or render(s, accept))
    om = "application/openmetrics-text; version=1.0.0"
    first = exp.alone(om)
    assert exp.alone(om) == first == render(snap, om) and exp.alone("") == render(snap, "")
    assert len(calls) == 2  # one per format
    exp.update(replace(snap, timestamp=snap.timestamp + 5))
    assert exp.alone(om) != first and len(calls) == 3


def test_incremental_renders_match_fresh_ones_whatever_rows_come_go_or_change_length():
    """The writer keeps each family's lines as offsets into its last body and copies runs of unchanged
    lines as slices; whatever happened to the rows (values that change a line's length, rows inserted,
    removed, moved, duplicated, one that cannot be rendered), the result is what a fresh writer renders,
    in both formats and gzipped, and only rows it had not rendered before (or, when none came or went, not
    at the same place) are formatted."""
    import random

    rng = random.Random(9)
    d = DEFS["ollama_model_loads_total"]
    rows = [((f"m{i}:latest",), float(i)) for i in range(300)]
    writer = Writer()
    for step in range(60):
        rows = list(rows)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(rows))
            edit = rng.choice(["value", "insert", "remove", "move", "duplicate", "unrenderable"])
            if edit == "value":
                rows[i] = (rows[i][0], rng.choice([0.0, 1.5, 1e21, 123456789.0, float(step)]))
            elif edit == "insert":
                rows.insert(i, ((f"new{step}-{i}:latest",), 1.0))
            elif edit == "remove" and len(rows) > 1:
                del rows[i]
            elif edit == "move":
                rows.insert(rng.randrange(len(rows)), rows.pop(i))
            elif edit == "duplicate":
                rows.insert(i, rows[i])
            elif edit == "unrenderable":
                rows[i] = ((f"bad\ud800{step}",), 1.0)
        family = d.family()
        family.rows = list(rows)
        last = writer._last.get(d.name)
        old = last.rows if last else []
        rendered = [last.rendered(k) for k in range(len(old))] if last else []  # False: left out
        if len(old) == len(rows):  # rows are compared where they stand
            expected = [r for k, r in enumerate(rows) if not rendered[k] or (old[k] is not r and old[k] != r)]
        else:  # rows came or went: each is looked up by value
            known = {r for k, r in enumerate(old) if rendered[k]}
            expected = [r for r in rows if r not in known]
        formatted = []
        original = writer._line
        writer._line = lambda d_, row: formatted.append(row) or original(d_, row)
        for fmt in (TEXT, OPENMETRICS):
            for gzipped in (False, True):
                got, _ = writer.render([family], fmt, gzipped)
                want, _ = Writer().render([family], fmt, gzipped)
                if gzipped:
                    got, want = zlib.decompressobj(-15).decompress(got), zlib.decompressobj(-15).decompress(want)
                assert got == want, (step, fmt, gzipped)
        writer._line = original
        assert formatted == expected  # a row already rendered was not formatted again
        left_out = sum(1 for r in rows if "\ud800" in r[0][0])
        assert writer._last[d.name].left_out == left_out  # a row that cannot be rendered is counted every time


def test_the_writer_keeps_a_family_s_lines_in_one_body_not_a_string_each():
    """At 2 000 models the writer holds tens of thousands of series; a string per line was ~190 bytes
    per series in small objects that a burst of model names scattered through the allocator's pools."""
    import tracemalloc

    family = DEFS["ollama_model_size_bytes"].family()
    for i in range(2000):
        family.add((f"model-{i}:q{i % 7}",), 4_920_753_328.0)
    writer = Writer()
    tracemalloc.start()
    try:
        writer.prepare([family])
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert kept / 2000 < 130  # the body's ~70 bytes a line, an 8-byte offset, the rows list copy

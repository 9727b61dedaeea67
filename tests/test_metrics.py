"""Snapshot -> exposition: names, units, values, promtool-clean output, and the render-once cache."""

from __future__ import annotations

import gzip
import subprocess

from prometheus_client.parser import text_string_to_metric_families

from ollama_exporter import exposition, metrics
from ollama_exporter.exposition import Exposition, render
from ollama_exporter.ollama import parse_loaded
from ollama_exporter.snapshot import InstalledModel, ModelDetails, ShowInfo, Snapshot, SourceStatus, frozen_map
from tests.conftest import sample, wait_for

DETAILS = ModelDetails("gguf", "qwen3", ("qwen3",), "8.2B", "Q4_K_M")


def rich_snapshot() -> Snapshot:
    show = ShowInfo("qwen3", 40960, 8190735360, ("completion", "tools", "thinking"), "a" * 64, DETAILS)
    installed = (
        InstalledModel("qwen3:8b", "5" * 64, 5225388164, DETAILS, None, show),
        # an old server: /api/tags has no capabilities and /api/show has none either
        InstalledModel("zephyr:latest", "0" * 64, 4108917840, ModelDetails("gguf", "llama", (), "7B", "Q4_0")),
    )
    loaded = (
        parse_loaded({"name": "qwen3:8b", "model": "qwen3:8b", "size": 6423527424, "digest": "5" * 64,
                      "details": {"families": None}, "expires_at": "2026-10-01T13:49:44.557263+05:30",
                      "size_vram": 5333539264, "context_length": 32768}),
        parse_loaded({"name": "old:latest", "size": 100, "digest": "1" * 64,  # pre-v0.1.42 row
                      "expires_at": "2318-12-01T17:47:16.854775807Z"}),
    )
    return Snapshot(
        timestamp=1790000000.0, ready=True, up=True, version="0.32.15", installed=installed, loaded=loaded,
        sources=(SourceStatus("version", True, 0.002, 1790000000.0),
                 SourceStatus("ps", False, 5.0, 1789999000.0, "timeout", "no answer"),
                 SourceStatus("tags", False, 0.01, None, "http_5xx", "HTTP 500")),
        loads_total=frozen_map({"qwen3:8b": 2, "zephyr:latest": 0}),
        unloads_total=frozen_map({"qwen3:8b": 1, "zephyr:latest": 0}),
        errors_total=frozen_map({("ps", "timeout"): 3, ("ps", "connection"): 0}),
    )


def text_of(snapshot: Snapshot) -> str:
    return render(snapshot)[0].decode()


def test_values_units_and_labels_come_from_the_snapshot():
    text = text_of(rich_snapshot())
    assert sample(text, "ollama_up") == 1
    assert sample(text, "ollama_build_info", version="0.32.15") == 1
    assert sample(text, "ollama_model_info", model="qwen3:8b", digest="5" * 64, family="qwen3",
                  parameter_size="8.2B", quantization="Q4_K_M", format="gguf") == 1
    assert sample(text, "ollama_model_size_bytes", model="qwen3:8b") == 5225388164
    assert sample(text, "ollama_model_context_length", model="qwen3:8b") == 40960
    assert sample(text, "ollama_model_parameters", model="qwen3:8b") == 8190735360
    assert sample(text, "ollama_model_capability", model="qwen3:8b", capability="thinking") == 1
    assert sample(text, "ollama_loaded_model_size_bytes", model="qwen3:8b") == 6423527424
    assert sample(text, "ollama_loaded_model_vram_bytes", model="qwen3:8b") == 5333539264
    assert sample(text, "ollama_loaded_model_expiry_timestamp_seconds", model="qwen3:8b") == 1790842784.557263
    assert sample(text, "ollama_loaded_model_expiry_timestamp_seconds", model="old:latest") > 1.1e10
    assert sample(text, "ollama_loaded_model_context_length", model="qwen3:8b") == 32768
    assert sample(text, "ollama_model_loads_total", model="qwen3:8b") == 2
    assert sample(text, "ollama_model_unloads_total", model="qwen3:8b") == 1
    assert sample(text, "ollama_exporter_source_up", source="ps") == 0
    assert sample(text, "ollama_exporter_source_duration_seconds", source="ps") == 5.0
    assert sample(text, "ollama_exporter_source_last_success_timestamp_seconds", source="ps") == 1789999000.0
    assert sample(text, "ollama_exporter_source_errors_total", source="ps", reason="timeout") == 3
    assert sample(text, "ollama_exporter_build_info", version=metrics.__version__) == 1


def test_unknown_values_are_left_out_not_exported_as_zero():
    text = text_of(rich_snapshot())
    # the pre-v0.1.42 ps row has no size_vram or context_length; zephyr has no /api/show info
    assert sample(text, "ollama_loaded_model_vram_bytes", model="old:latest") is None
    assert sample(text, "ollama_loaded_model_context_length", model="old:latest") is None
    assert sample(text, "ollama_model_context_length", model="zephyr:latest") is None
    assert sample(text, "ollama_model_parameters", model="zephyr:latest") is None
    assert "capability=" not in "".join(l for l in text.splitlines() if "zephyr" in l)
    # a source that never succeeded has no last-success timestamp
    assert sample(text, "ollama_exporter_source_last_success_timestamp_seconds", source="tags") is None


def test_every_help_text_names_its_source_and_every_name_follows_conventions():
    for name, d in metrics.DEFS.items():
        assert name.startswith("ollama_")
        assert (d.kind == "counter") == name.endswith("_total"), name
        assert d.help and d.help.endswith("."), name
        if "gpu" in name and not name.startswith("ollama_exporter_"):
            assert "nvml" in d.help.lower(), f"{name}: help must say which NVML call it comes from"
        elif not name.startswith("ollama_exporter_") and name not in ("ollama_up",):
            # an API field, a runner endpoint, or the log line (quoted) it is counted from
            assert any(src in d.help for src in ("/api/", "/slots", "/health", "log line", "`")), \
                f"{name}: help must say which API field, runner endpoint or log line it comes from"
        if "timestamp" in name:
            assert name.endswith("_timestamp_seconds")


def test_promtool_finds_nothing_to_report(promtool):
    exposition = Exposition()  # what the daemon serves: snapshot metrics plus process/python metrics
    exposition.update(rich_snapshot())
    text = exposition.get().data
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0 and result.stdout == b"" and result.stderr == b"", result


def test_openmetrics_output_parses_and_has_eof():
    body, content_type = render(rich_snapshot(), "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

    names = {f.name for f in om_parse(body.decode())}
    assert {"ollama_up", "ollama_model_loads", "ollama_loaded_model_vram_bytes"} <= names


def test_a_scrape_never_renders_and_a_new_variant_is_rendered_in_the_background():
    calls = []
    original = metrics.collect

    def counting(snapshot, *sections):
        calls.append(snapshot)
        return original(snapshot, *sections)

    exposition.collect = counting
    try:
        exp = Exposition()
        calls.clear()  # the placeholder rendered at construction
        exp.update(rich_snapshot())
        assert len(calls) == 1  # only the text format, which every scraper accepts, until others are asked for
        first = exp.get("application/openmetrics-text; version=1.0.0", "gzip")
        assert not first.gzipped and first.content_type.startswith("text/plain")  # the closest one rendered
        wait_for(lambda: exp.get("application/openmetrics-text; version=1.0.0", "gzip").gzipped, timeout=5,
                 message="the background render of the new variant")
        rendered = len(calls)
        for _ in range(50):
            plain = exp.get("", "")
            om = exp.get("application/openmetrics-text; version=1.0.0", "gzip")
        assert len(calls) == rendered  # fifty scrapes only copied bytes
        assert not plain.gzipped and plain.content_type.startswith("text/plain; version=0.0.4")
        assert om.content_type.startswith("application/openmetrics-text") and gzip.decompress(om.data).endswith(b"# EOF\n")
        assert sample(plain.data.decode(), "ollama_up") == 1
        exp.update(Snapshot.empty(1.0))  # renders the text format and the variant a scraper asked for
        assert len(calls) == rendered + 1 and sample(exp.get().data.decode(), "ollama_up") == 0
        assert b"ollama_up 0.0" in gzip.decompress(exp.get("application/openmetrics-text; version=1.0.0", "gzip").data)
    finally:
        exposition.collect = original


def test_families_parse_back_without_duplicates():
    seen = set()
    for family in text_string_to_metric_families(text_of(rich_snapshot())):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in seen, key
            seen.add(key)


def test_models_remembered_after_they_went_hold_their_event_rows_and_no_more():
    """A model gone from /api/tags and /api/ps keeps its event counters for poll.forget_after: in a burst
    of names most models at any time are such models. Each held its own tuple of counts, though nearly
    all count the same (none yet, or one load and one unload)."""
    import gc
    import tracemalloc

    names = [f"gone-{i}:q4" for i in range(2000)]
    snap = Snapshot.empty()
    snap = Snapshot(**{**{f: getattr(snap, f) for f in snap.__dataclass_fields__},
                       "loads_total": frozen_map({n: i % 2 for i, n in enumerate(names)}),
                       "unloads_total": frozen_map({n: i % 2 for i, n in enumerate(names)}),
                       "keep_alive_downgrades_total": frozen_map({n: 0 for n in names})})
    sections = metrics.Sections()
    ours = [tracemalloc.Filter(True, __file__, all_frames=True)]  # not what other tests' threads allocate
    tracemalloc.start(16)
    try:
        families = list(metrics.collect(snap, sections))
        gc.collect()  # empties the free lists, whose tuples tracemalloc counts as allocated
        small = sum(1 for t in tracemalloc.take_snapshot().filter_traces(ours).traces if t.size <= 512)
    finally:
        tracemalloc.stop()
    loads = next(f for f in families if f.d.name == "ollama_model_loads_total")
    assert len(loads.rows) == 2000 and dict(loads.rows)[("gone-1:q4",)] == 1
    assert small / 2000 < 5.5  # three rows, their label tuple, the rows kept for reuse (6 before)


def test_a_changed_section_rebuilds_the_rows_of_the_models_that_changed_only():
    """When one model of thousands changes (or names come and go), the installed, loaded and event
    sections are built again; the other models keep their very row objects, so the writer compares
    nothing for them and a burst does not hold two copies of every row while a section is rebuilt."""
    from dataclasses import replace

    def rows_by_model(families):
        return {(f.d.name, row[0][0]): row for f in families for row in f.rows if row[0]}

    base = rich_snapshot()
    sections = metrics.Sections()
    first = rows_by_model(list(metrics.collect(base, sections)))
    qwen, zephyr = base.installed
    changed = replace(base, installed=(qwen, replace(zephyr, size=1)), loaded=base.loaded[:1],
                      loads_total=frozen_map({"qwen3:8b": 2, "zephyr:latest": 1}))
    second = rows_by_model(list(metrics.collect(changed, sections)))
    kept = [key for key in second if key[1] == "qwen3:8b" and key[0].startswith(("ollama_model_", "ollama_loaded"))]
    assert len(kept) >= 8 and all(second[key] is first[key] for key in kept)
    assert second[("ollama_model_size_bytes", "zephyr:latest")] == (("zephyr:latest",), 1)
    assert second[("ollama_model_loads_total", "zephyr:latest")] == (("zephyr:latest",), 1)
    assert ("ollama_loaded_model_size_bytes", "old:latest") not in second  # unloaded: gone
    fresh = rows_by_model(list(metrics.collect(changed)))
    assert fresh == second  # the same rows a fresh build makes

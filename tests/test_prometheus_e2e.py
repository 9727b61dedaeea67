"""Fake Ollama -> the exporter -> a real Prometheus scraping it; assertions go through Prometheus's HTTP API."""

from __future__ import annotations

from tests.conftest import wait_for
from tests.prometheus import Prometheus


def test_real_prometheus_scrapes_the_exporter(fake_ollama, exporter_factory, tmp_path):
    fake_ollama.add_model("qwen3:8b", family="qwen3", parameter_size="8.2B", quantization="Q4_K_M")
    fake_ollama.add_model("nomic-embed-text:latest", family="nomic-bert", capabilities=["embedding"])
    fake_ollama.load("qwen3:8b", size=6_423_527_424, size_vram=5_333_539_264, context_length=32768)
    exp = exporter_factory("--ollama.url", fake_ollama.url, "--poll.interval", "500ms").wait_ready()

    prom = Prometheus(tmp_path / "prom", [{
        "job_name": "ollama", "static_configs": [{"targets": [f"127.0.0.1:{exp.port}"]}],
    }])
    try:
        wait_for(lambda: prom.query('count_over_time(up{job="ollama"}[5m]) >= 2'), timeout=30,
                 message="two scrapes of the exporter")
        target = prom.targets()[0]
        assert target["health"] == "up", target.get("lastError")

        assert [r["value"][1] for r in prom.query('ollama_up{job="ollama"}')] == ["1"]
        vram = prom.query('ollama_loaded_model_vram_bytes{model="qwen3:8b"}')
        assert [r["value"][1] for r in vram] == ["5333539264"]
        info = prom.query('ollama_model_info{model="qwen3:8b"}')
        assert len(info) == 1 and info[0]["value"][1] == "1"
        labels = info[0]["metric"]
        assert (labels["family"], labels["parameter_size"], labels["quantization"], labels["format"]) == \
            ("qwen3", "8.2B", "Q4_K_M", "gguf")
        assert len(labels["digest"]) == 64
        # the CPU-offload question, answered in PromQL from the two ps figures
        offload = prom.query("1 - ollama_loaded_model_vram_bytes / ollama_loaded_model_size_bytes")
        assert abs(float(offload[0]["value"][1]) - (1 - 5_333_539_264 / 6_423_527_424)) < 1e-9
    finally:
        prom.stop()

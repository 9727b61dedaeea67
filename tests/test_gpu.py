"""GPU telemetry end to end: the exporter process loads a fake libnvidia-ml.so.1 (tests/fakes/nvml) through
the real pynvml bindings, and real child processes stand in for Ollama's runners."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import requests

from tests.conftest import check_log_lines, sample, wait_for
from tests.fakes.nvml import MIB, FakeProcess, two_gpu_box

def once(fake, nvml, *args, env=None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "FAKE_NVML_CONFIG")}
    full_env.update(nvml.env() if env is None else env)
    return subprocess.run([sys.executable, "-m", "ollama_exporter", "--once", "--ollama.url", fake.url, *args],
                          capture_output=True, text=True, timeout=60, env=full_env)


def test_every_gpu_metric_for_both_gpus(nvml, runners, ollama_with_models, promtool):
    nvml.write(two_gpu_box(runners))
    result = once(ollama_with_models, nvml, "--gpu.enabled", "true")
    assert result.returncode == 0, result.stderr
    t = result.stdout
    a100, rtx = two_gpu_box(runners)
    g0, g1 = {"gpu": "0", "uuid": a100.uuid}, {"gpu": "1", "uuid": rtx.uuid}

    assert sample(t, "ollama_gpu_nvml_up") == 1
    assert sample(t, "ollama_exporter_source_up", source="gpu") == 1
    assert sample(t, "ollama_gpu_info", **g0, name="NVIDIA A100-SXM4-80GB", pci_bus_id="00000000:17:00.0",
                  driver_version="550.54.15") == 1
    assert sample(t, "ollama_gpu_info", **g1, name="NVIDIA GeForce RTX 4090", pci_bus_id="00000000:65:00.0",
                  driver_version="550.54.15") == 1
    for g, gpu in ((g0, a100), (g1, rtx)):
        assert sample(t, "ollama_gpu_up", **g) == 1
        assert sample(t, "ollama_gpu_memory_total_bytes", **g) == gpu.memory_total
        assert sample(t, "ollama_gpu_memory_used_bytes", **g) == gpu.memory_used  # v2: reserved not included
        assert sample(t, "ollama_gpu_memory_reserved_bytes", **g) == gpu.memory_reserved
        assert sample(t, "ollama_gpu_memory_free_bytes", **g) == gpu.memory_total - gpu.memory_used - gpu.memory_reserved
        assert sample(t, "ollama_gpu_temperature_celsius", **g) == gpu.temperature_c
        assert sample(t, "ollama_gpu_power_watts", **g) == pytest.approx(gpu.power_mw / 1000)
        assert sample(t, "ollama_gpu_power_limit_watts", **g) == pytest.approx(gpu.power_limit_mw / 1000)
        assert sample(t, "ollama_gpu_energy_joules_total", **g) == pytest.approx(gpu.energy_mj / 1000)
        assert sample(t, "ollama_gpu_performance_state", **g) == gpu.pstate
        for clock, mhz in gpu.clocks_mhz.items():
            assert sample(t, "ollama_gpu_clock_hertz", **g, clock=clock) == mhz * 1e6
    assert sample(t, "ollama_gpu_throttle_active", **g0, reason="gpu_idle") == 1
    assert sample(t, "ollama_gpu_throttle_active", **g0, reason="sw_power_cap") == 0
    assert sample(t, "ollama_gpu_throttle_active", **g1, reason="sw_power_cap") == 1
    assert sample(t, "ollama_gpu_throttle_active", **g1, reason="hw_thermal") == 0
    # the GeForce card has a fan and no ECC; the A100 has ECC and no fan
    assert sample(t, "ollama_gpu_fan_speed_ratio", **g1) == 0.31
    assert sample(t, "ollama_gpu_fan_speed_ratio", **g0) is None
    assert sample(t, "ollama_gpu_ecc_errors_total", **g0, error="corrected") == 3
    assert sample(t, "ollama_gpu_ecc_errors_total", **g0, error="uncorrected") == 0
    assert 'ollama_gpu_ecc_errors_total{error="corrected",gpu="1"' not in t
    # utilisation is reported for the plain GPU, and not under MIG (NVML does not support it there)
    assert sample(t, "ollama_gpu_utilization_ratio", **g1) == 0.87
    assert sample(t, "ollama_gpu_memory_activity_ratio", **g1) == 0.41
    assert sample(t, "ollama_gpu_utilization_ratio", **g0) is None
    # MIG: memory per instance
    for mig in a100.mig:
        labels = {**g0, "gpu_instance": str(mig.gpu_instance_id), "mig_uuid": mig.uuid}
        assert sample(t, "ollama_gpu_mig_memory_total_bytes", **labels) == mig.memory_total
        assert sample(t, "ollama_gpu_mig_memory_used_bytes", **labels) == mig.memory_used
    assert "ollama_gpu_mig_memory_total_bytes{gpu=\"1\"" not in t
    assert sample(t, "ollama_gpu_processes", **g0) == 2 and sample(t, "ollama_gpu_processes", **g1) == 2
    # per-model GPU memory, from the runners' command lines and /api/show's FROM blob
    expected = {("qwen3:32b", "0"): 8_192 * MIB, ("llama3.1:8b", "0"): 4_460 * MIB,
                ("gemma3:27b", "1"): 8_918 * MIB, ("nomic-embed-text:latest", "1"): 1_104 * MIB}
    for (model, gpu), used in expected.items():
        uuid = a100.uuid if gpu == "0" else rtx.uuid
        assert sample(t, "ollama_loaded_model_gpu_memory_bytes", model=model, gpu=gpu, uuid=uuid) == used
    for reason in ("unreadable", "loading", "other"):
        assert sample(t, "ollama_exporter_gpu_processes_unattributed", reason=reason) == 0
    check = subprocess.run([promtool, "check", "metrics"], input=t, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout == check.stderr == "", check


def test_unreadable_and_foreign_processes_are_counted_not_guessed(nvml, runners, ollama_with_models):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID /proc does not have: like a runner in another PID namespace
    a100, rtx = two_gpu_box(runners)
    rtx.processes += [FakeProcess(dead.pid, 2_000 * MIB), FakeProcess(os.getpid(), 300 * MIB)]
    nvml.write([a100, rtx])
    t = once(ollama_with_models, nvml).stdout
    assert sample(t, "ollama_exporter_gpu_processes_unattributed", reason="unreadable") == 1
    assert sample(t, "ollama_exporter_gpu_processes_unattributed", reason="other") == 1  # pytest is no runner
    assert sample(t, "ollama_loaded_model_gpu_memory_bytes", model="gemma3:27b", gpu="1", uuid=rtx.uuid) == 8_918 * MIB


def test_a_runner_not_yet_in_ps_is_loading(nvml, runners, ollama_with_models):
    ollama_with_models.unload("gemma3:27b")  # its runner process exists, /api/ps does not list it yet
    nvml.write(two_gpu_box(runners))
    t = once(ollama_with_models, nvml).stdout
    assert sample(t, "ollama_exporter_gpu_processes_unattributed", reason="loading") == 1
    assert 'model="gemma3:27b"' not in "".join(l for l in t.splitlines() if l.startswith("ollama_loaded_model_gpu"))


def test_old_driver_without_memory_info_v2_falls_back_to_v1(nvml, fake_ollama):
    a100, rtx = two_gpu_box()
    nvml.write([replace(rtx, memory_v2=False, processes=[])])
    t = once(fake_ollama, nvml).stdout
    g = {"gpu": "0", "uuid": rtx.uuid}
    assert sample(t, "ollama_gpu_memory_used_bytes", **g) == rtx.memory_used + rtx.memory_reserved  # v1 semantics
    assert sample(t, "ollama_gpu_memory_reserved_bytes", **g) is None


def test_without_nvml_auto_runs_cleanly_and_says_only_that(fake_ollama, nvml):
    result = once(fake_ollama, nvml, env={})
    assert result.returncode == 0
    gpu_lines = [l for l in result.stdout.splitlines() if "gpu" in l and not l.startswith("#")]
    assert gpu_lines == ["ollama_gpu_nvml_up 0.0"]
    assert sample(result.stdout, "ollama_up") == 1
    records = check_log_lines(result.stderr)
    assert [r["msg"] for r in records].count("running without GPU metrics") == 1
    assert next(r for r in records if r["msg"] == "running without GPU metrics")["reason"] == "library_not_found"


def test_without_nvml_gpu_enabled_true_exits_2(fake_ollama, nvml):
    result = once(fake_ollama, nvml, "--gpu.enabled", "true", env={})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("ollama-exporter: error: gpu.enabled is true but NVML cannot be used")
    assert "Traceback" not in result.stderr


def test_gpu_disabled_never_touches_nvml(fake_ollama, nvml):
    nvml.write(two_gpu_box())
    nvml.reset_call_count()
    result = once(fake_ollama, nvml, "--gpu.enabled", "false")
    assert "ollama_gpu" not in result.stdout and nvml.call_count() == 0


@pytest.mark.parametrize("code, reason", [(9, "driver_not_loaded"), (18, "version_mismatch"), (4, "no_permission"),
                                          (999, "unknown")])
def test_initialisation_failures_keep_ollama_metrics_and_name_the_reason(fake_ollama, nvml, code, reason):
    nvml.write(two_gpu_box(), init_error=code)
    result = once(fake_ollama, nvml)
    t = result.stdout
    assert result.returncode == 0 and sample(t, "ollama_up") == 1
    assert sample(t, "ollama_gpu_nvml_up") == 0
    assert sample(t, "ollama_exporter_source_up", source="gpu") == 0
    assert sample(t, "ollama_exporter_source_errors_total", source="gpu", reason=reason) == 1


def test_a_hung_driver_costs_one_deadline_and_never_blocks_ollama_metrics(fake_ollama, nvml):
    nvml.write(two_gpu_box(), delay_ms=5000)
    started = time.monotonic()
    result = once(fake_ollama, nvml, "--ollama.timeout", "500ms")
    assert time.monotonic() - started < 4.0
    t = result.stdout
    assert sample(t, "ollama_up") == 1
    assert sample(t, "ollama_exporter_source_up", source="gpu") == 0
    assert sample(t, "ollama_exporter_source_errors_total", source="gpu", reason="timeout") == 1


def test_a_lost_gpu_goes_down_alone_and_comes_back(nvml, runners, ollama_with_models, exporter_factory):
    nvml.write(two_gpu_box(runners))
    exp = exporter_factory("--ollama.url", ollama_with_models.url, "--poll.interval", "200ms",
                           "--no-probes.enabled", env=nvml.env()).wait_ready()
    a100, rtx = two_gpu_box(runners)
    g0, g1 = {"gpu": "0", "uuid": a100.uuid}, {"gpu": "1", "uuid": rtx.uuid}
    def gpu1_up_is(value, timeout=10.0):
        def check():
            text = exp.metrics()
            return text if sample(text, "ollama_gpu_up", **g1) == value else None
        return wait_for(check, timeout=timeout, message=f"ollama_gpu_up{{gpu=\"1\"}} == {value}")

    gpu1_up_is(1)

    nvml.write([a100, replace(rtx, lost=True)])
    t = gpu1_up_is(0, timeout=5)
    assert sample(t, "ollama_gpu_up", **g0) == 1 and sample(t, "ollama_gpu_temperature_celsius", **g0) == 36
    assert sample(t, "ollama_gpu_temperature_celsius", **g1) is None  # no stale values for a lost GPU
    assert sample(t, "ollama_gpu_info", **g1, name=rtx.name, pci_bus_id=rtx.pci_bus_id,
                  driver_version="550.54.15") == 1
    assert sample(t, "ollama_exporter_source_errors_total", source="gpu", reason="gpu_lost") >= 1
    assert sample(t, "ollama_up") == 1
    assert requests.get(exp.url + "/metrics", timeout=2).status_code == 200

    nvml.write(two_gpu_box(runners))
    t = gpu1_up_is(1)
    assert sample(t, "ollama_gpu_temperature_celsius", **g1) == 64


def test_initialisation_is_retried_with_backoff_until_the_driver_loads(fake_ollama, nvml, exporter_factory):
    nvml.write(two_gpu_box(), init_error=9)  # NVML_ERROR_DRIVER_NOT_LOADED, as during boot
    exp = exporter_factory("--ollama.url", fake_ollama.url, "--poll.interval", "200ms", "--no-probes.enabled",
                           env=nvml.env()).wait_ready()
    wait_for(lambda: sample(exp.metrics(), "ollama_exporter_source_errors_total", source="gpu",
                            reason="driver_not_loaded") >= 2, timeout=5, message="init failures counted")
    assert sample(exp.metrics(), "ollama_gpu_nvml_up") == 0 and sample(exp.metrics(), "ollama_up") == 1
    nvml.write(two_gpu_box())
    text = wait_for(lambda: (lambda t: t if sample(t, "ollama_gpu_nvml_up") == 1 else None)(exp.metrics()),
                    timeout=10, message="NVML initialised once the driver is there")
    assert sample(text, "ollama_gpu_up", gpu="1", uuid=two_gpu_box()[1].uuid) == 1

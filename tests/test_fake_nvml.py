"""The fake libnvidia-ml, read through the REAL pynvml bindings in a subprocess.

A process loads one libnvidia-ml and reads LD_LIBRARY_PATH at start, so every check runs pynvml in a
child (PynvmlProbe) whose environment points at the fake. The test rewrites the config between
calls to check that the library re-reads it under a running process.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fakes import nvml as fakes
from tests.fakes.nvml import FakeGpu, FakeMig, FakeNvml, FakeProcess, PynvmlProbe, two_gpu_box

REPO = Path(__file__).resolve().parents[1]
PIDS = [1101, 1102, 2201, 2202]
NO_INSTANCE = 0xFFFFFFFF


@pytest.fixture
def fake(tmp_path: Path) -> FakeNvml:
    return FakeNvml.or_skip(tmp_path / "nvml")


@pytest.fixture
def box(fake: FakeNvml) -> list[FakeGpu]:
    gpus = two_gpu_box(pids=PIDS)
    fake.write(gpus)
    return gpus


@pytest.fixture
def probe(fake: FakeNvml):
    with PynvmlProbe(fake) as p:
        yield p


def started(p: PynvmlProbe, n: int = 2) -> PynvmlProbe:
    p.ok("nvmlInit()")
    p.ok("h = [nvmlDeviceGetHandleByIndex(i) for i in range(nvmlDeviceGetCount())]")
    assert p.ok("len(h)") == n
    return p


def test_init_versions_refcount_and_error_strings(box, probe):
    assert probe.ok("nvmlInit()") is None
    assert probe.ok("nvmlSystemGetDriverVersion()") == "550.54.15"
    assert probe.ok("nvmlSystemGetNVMLVersion()") == "12.550.54.15"
    assert probe.ok("nvmlSystemGetCudaDriverVersion()") == 12040
    assert probe.ok("nvmlSystemGetCudaDriverVersion_v2()") == 12040
    probe.ok("nvmlInit()")  # refcounted like the real library
    probe.ok("nvmlShutdown()")
    assert probe.ok("nvmlDeviceGetCount()") == 2
    probe.ok("nvmlShutdown()")
    assert probe.err("nvmlDeviceGetCount()") == "NVMLError_Uninitialized"  # library stays loaded
    assert probe.err("nvmlShutdown()") == "NVMLError_Uninitialized"
    assert probe.ok("[nvmlErrorString(c) for c in (1, 3, 4, 9, 13, 15, 18, 999)]") == [
        "Uninitialized", "Not Supported", "Insufficient Permissions", "Driver Not Loaded",
        "Function Not Found", "GPU is lost", "RM has detected an NVML/RM version mismatch.", "Unknown Error"]


def test_enumeration_and_identity(box, probe):
    started(probe)
    assert probe.ok("[nvmlDeviceGetName(x) for x in h]") == ["NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090"]
    assert probe.ok("[nvmlDeviceGetUUID(x) for x in h]") == [g.uuid for g in box]
    assert probe.ok("[nvmlDeviceGetIndex(x) for x in h]") == [0, 1]
    assert probe.ok("[nvmlDeviceGetCudaComputeCapability(x) for x in h]") == [[8, 0], [8, 9]]
    pci = probe.ok("[nvmlDeviceGetPciInfo(x) for x in h]")
    assert [p["busId"] for p in pci] == ["00000000:17:00.0", "00000000:65:00.0"]
    assert pci[1] == {"busIdLegacy": "0000:65:00.0", "domain": 0, "bus": 0x65, "device": 0,
                      "pciDeviceId": 0x268410DE, "pciSubSystemId": 0x16F110DE, "busId": "00000000:65:00.0"}
    assert probe.ok("nvmlDeviceGetPciInfo_v3(h[0]).busId") == "00000000:17:00.0"
    assert probe.ok(f"nvmlDeviceGetIndex(nvmlDeviceGetHandleByUUID({box[1].uuid!r}))") == 1
    assert probe.err("nvmlDeviceGetHandleByUUID('GPU-00000000-0000-0000-0000-000000000000')") == "NVMLError_NotFound"
    assert probe.err("nvmlDeviceGetHandleByIndex(2)") == "NVMLError_InvalidArgument"


def test_memory_v2_and_v1(box, probe):
    started(probe)
    for i, gpu in enumerate(box):
        v2 = probe.ok(f"nvmlDeviceGetMemoryInfo(h[{i}], version=nvmlMemory_v2)")
        free = gpu.memory_total - gpu.memory_used - gpu.memory_reserved
        assert v2 == {"version": 0x02000028, "total": gpu.memory_total, "reserved": gpu.memory_reserved,
                      "free": free, "used": gpu.memory_used}
        v1 = probe.ok(f"nvmlDeviceGetMemoryInfo(h[{i}])")  # v1: reserved counts as used
        assert v1 == {"total": gpu.memory_total, "free": free, "used": gpu.memory_used + gpu.memory_reserved}


def test_memory_v2_missing_unified_memory_and_version_mismatch(fake, probe):
    old_driver, unified = two_gpu_box(pids=PIDS)
    old_driver = dataclasses.replace(old_driver, memory_v2=False, mig=None)
    unified = dataclasses.replace(unified, name="NVIDIA GB10", memory_supported=False)
    fake.write([old_driver, unified])
    started(probe)
    assert probe.err("nvmlDeviceGetMemoryInfo(h[0], version=nvmlMemory_v2)") == "NVMLError_FunctionNotFound"
    assert probe.ok("nvmlDeviceGetMemoryInfo(h[0])")["used"] == old_driver.memory_used + old_driver.memory_reserved
    assert probe.err("nvmlDeviceGetMemoryInfo(h[1], version=nvmlMemory_v2)") == "NVMLError_NotSupported"
    assert probe.err("nvmlDeviceGetMemoryInfo(h[1])") == "NVMLError_NotSupported"
    assert len(probe.ok("nvmlDeviceGetComputeRunningProcesses(h[1])")) == 2  # per-process memory still works
    assert probe.err("nvmlDeviceGetMemoryInfo(h[0], version=0x01000028)") == "NVMLError_FunctionNotFound"
    fake.write(two_gpu_box(pids=PIDS))
    assert probe.err("nvmlDeviceGetMemoryInfo(h[1], version=0x01000028)") == "NVMLError_ArgumentVersionMismatch"


def test_telemetry_geforce(box, probe):
    started(probe)
    rtx = box[1]
    assert probe.ok("nvmlDeviceGetUtilizationRates(h[1])") == {"gpu": 87, "memory": 41}
    assert probe.ok("nvmlDeviceGetTemperature(h[1], NVML_TEMPERATURE_GPU)") == 64
    assert probe.ok("nvmlDeviceGetTemperatureV(h[1], NVML_TEMPERATURE_GPU)") == 64
    assert probe.ok("nvmlDeviceGetPowerUsage(h[1])") == 318_204  # mW
    assert probe.ok("nvmlDeviceGetEnforcedPowerLimit(h[1])") == 450_000  # mW
    assert probe.ok("nvmlDeviceGetTotalEnergyConsumption(h[1])") == 9_876_543_210  # mJ, > 2**32
    clocks = "[nvmlDeviceGetClockInfo(h[1], c) for c in (NVML_CLOCK_GRAPHICS, NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_CLOCK_VIDEO)]"
    assert probe.ok(clocks) == [rtx.clocks_mhz[k] for k in ("graphics", "sm", "memory", "video")]
    assert probe.err("nvmlDeviceGetClockInfo(h[1], 7)") == "NVMLError_InvalidArgument"
    assert probe.ok("nvmlDeviceGetPerformanceState(h[1])") == 2
    assert probe.ok("nvmlDeviceGetFanSpeed(h[1])") == 31
    assert probe.ok("nvmlDeviceGetCurrentClocksEventReasons(h[1])") == fakes.CLOCKS_EVENT_SW_POWER_CAP
    assert probe.ok("nvmlDeviceGetCurrentClocksThrottleReasons(h[1])") == fakes.CLOCKS_EVENT_SW_POWER_CAP
    ecc = "nvmlDeviceGetTotalEccErrors(h[1], NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_VOLATILE_ECC)"
    assert probe.err(ecc) == "NVMLError_NotSupported"  # GeForce: no ECC
    assert probe.err("nvmlDeviceGetMigMode(h[1])") == "NVMLError_NotSupported"
    assert probe.ok("nvmlDeviceGetMaxMigDeviceCount(h[1])") == 0
    assert probe.err("nvmlDeviceGetMigDeviceHandleByIndex(h[1], 0)") == "NVMLError_NotSupported"


def test_telemetry_datacenter_mig_parent(box, probe):
    started(probe)
    assert probe.err("nvmlDeviceGetFanSpeed(h[0])") == "NVMLError_NotSupported"  # passively cooled
    assert probe.err("nvmlDeviceGetUtilizationRates(h[0])") == "NVMLError_NotSupported"  # MIG on
    ecc = ("[nvmlDeviceGetTotalEccErrors(h[0], e, c) for e in (NVML_MEMORY_ERROR_TYPE_CORRECTED, "
           "NVML_MEMORY_ERROR_TYPE_UNCORRECTED) for c in (NVML_VOLATILE_ECC, NVML_AGGREGATE_ECC)]")
    assert probe.ok(ecc) == [3, 17, 0, 0]
    assert probe.ok("nvmlDeviceGetCurrentClocksEventReasons(h[0])") == fakes.CLOCKS_EVENT_GPU_IDLE
    assert probe.ok("nvmlDeviceGetPowerUsage(h[0]), nvmlDeviceGetTemperature(h[0], 0)") == [91_450, 36]


def test_unsupported_optional_fields(fake, probe):
    bare = FakeGpu(uuid="GPU-11111111-2222-3333-4444-555555555555", name="Tesla P4", pci_bus_id="00000000:3B:00.0",
                   memory_total=8 * fakes.GIB, memory_used=fakes.GIB, utilization_gpu=None, utilization_memory=None,
                   temperature_c=None, power_mw=None, power_limit_mw=None, energy_mj=None,
                   clocks_mhz={"graphics": 1063}, pstate=None, fan_percent=None, clocks_event_reasons=None)
    fake.write([bare])
    started(probe, 1)
    calls = ["nvmlDeviceGetUtilizationRates(h[0])", "nvmlDeviceGetTemperature(h[0], 0)",
             "nvmlDeviceGetTemperatureV(h[0], 0)", "nvmlDeviceGetPowerUsage(h[0])",
             "nvmlDeviceGetEnforcedPowerLimit(h[0])", "nvmlDeviceGetTotalEnergyConsumption(h[0])",
             "nvmlDeviceGetClockInfo(h[0], NVML_CLOCK_SM)", "nvmlDeviceGetPerformanceState(h[0])",
             "nvmlDeviceGetFanSpeed(h[0])", "nvmlDeviceGetCurrentClocksEventReasons(h[0])",
             "nvmlDeviceGetTotalEccErrors(h[0], 1, 1)", "nvmlDeviceGetMigMode(h[0])"]
    assert {c: probe.err(c) for c in calls} == {c: "NVMLError_NotSupported" for c in calls}
    assert probe.ok("nvmlDeviceGetClockInfo(h[0], NVML_CLOCK_GRAPHICS)") == 1063
    assert probe.ok("nvmlDeviceGetComputeRunningProcesses(h[0])") == []


def test_mig_devices(box, probe):
    started(probe)
    a100 = box[0]
    assert probe.ok("nvmlDeviceGetMigMode(h[0])") == [1, 1]
    assert probe.ok("nvmlDeviceGetMaxMigDeviceCount(h[0])") == 7
    probe.ok("mig = [nvmlDeviceGetMigDeviceHandleByIndex(h[0], i) for i in range(2)]")
    for i in range(2, 7):
        assert probe.err(f"nvmlDeviceGetMigDeviceHandleByIndex(h[0], {i})") == "NVMLError_NotFound"
    assert probe.err("nvmlDeviceGetMigDeviceHandleByIndex(h[0], 7)") == "NVMLError_InvalidArgument"
    assert probe.ok("[nvmlDeviceIsMigDeviceHandle(x) for x in h + mig]") == [0, 0, 1, 1]
    assert probe.ok("[nvmlDeviceGetGpuInstanceId(x) for x in mig]") == [1, 2]
    assert probe.ok("[nvmlDeviceGetComputeInstanceId(x) for x in mig]") == [0, 0]
    assert probe.err("nvmlDeviceGetGpuInstanceId(h[0])") == "NVMLError_NotSupported"
    assert probe.ok("[nvmlDeviceGetUUID(nvmlDeviceGetDeviceHandleFromMigDeviceHandle(x)) for x in mig]") == [a100.uuid] * 2
    assert probe.err("nvmlDeviceGetDeviceHandleFromMigDeviceHandle(h[0])") == "NVMLError_InvalidArgument"
    uuids = probe.ok("[nvmlDeviceGetUUID(x) for x in mig]")
    assert uuids == [m.uuid for m in a100.mig] and all(u.startswith("MIG-") for u in uuids)
    assert probe.ok("[nvmlDeviceGetName(x) for x in mig]") == ["NVIDIA A100-SXM4-80GB MIG 3g.40gb"] * 2
    assert probe.ok(f"nvmlDeviceGetGpuInstanceId(nvmlDeviceGetHandleByUUID({uuids[1]!r}))") == 2
    for i, m in enumerate(a100.mig):
        v2 = probe.ok(f"nvmlDeviceGetMemoryInfo(mig[{i}], version=nvmlMemory_v2)")
        assert (v2["total"], v2["used"], v2["free"]) == (m.memory_total, m.memory_used, m.memory_total - m.memory_used)
        assert probe.ok(f"nvmlDeviceGetMemoryInfo(mig[{i}])")["used"] == m.memory_used
        procs = probe.ok(f"nvmlDeviceGetComputeRunningProcesses(mig[{i}])")
        assert procs == [{"pid": PIDS[i], "usedGpuMemory": m.processes[0].used_bytes,
                          "gpuInstanceId": m.gpu_instance_id, "computeInstanceId": 0}]
    assert probe.err("nvmlDeviceGetComputeRunningProcesses(h[0])") == "NVMLError_NoPermission"
    assert probe.err("nvmlDeviceGetUtilizationRates(mig[0])") == "NVMLError_NotSupported"
    assert probe.err("nvmlDeviceGetTemperature(mig[0], 0)") == "NVMLError_NotSupported"


def test_mig_reconfigured_off_and_privileged(fake, box, probe):
    started(probe)
    a100, rtx = box
    probe.ok("mig1 = nvmlDeviceGetMigDeviceHandleByIndex(h[0], 1)")
    fake.write([dataclasses.replace(a100, mig=[a100.mig[0], None]), rtx])  # instance 2 destroyed
    assert probe.err("nvmlDeviceGetUUID(mig1)") == "NVMLError_InvalidArgument"
    assert probe.err("nvmlDeviceGetMigDeviceHandleByIndex(h[0], 1)") == "NVMLError_NotFound"
    small = FakeMig(9, 0, "MIG-0f0e0d0c-0b0a-4908-8706-050403020100", 9_856 * fakes.MIB, 0, profile="1g.10gb")
    fake.write([dataclasses.replace(a100, mig=[a100.mig[0], None, small]), rtx])  # a hole before slot 2
    probe.ok("mig2 = nvmlDeviceGetMigDeviceHandleByIndex(h[0], 2)")
    assert probe.ok("nvmlDeviceGetName(mig2), nvmlDeviceGetGpuInstanceId(mig2)") == ["NVIDIA A100-SXM4-80GB MIG 1g.10gb", 9]
    assert probe.ok("nvmlDeviceGetComputeRunningProcesses(mig2)") == []
    fake.write([dataclasses.replace(a100, mig_privileged=True), rtx])  # root: parent lists every instance
    assert [(p["pid"], p["gpuInstanceId"]) for p in probe.ok("nvmlDeviceGetComputeRunningProcesses(h[0])")] == [
        (PIDS[0], 1), (PIDS[1], 2)]
    off = dataclasses.replace(a100, mig=[], mig_pending=True, processes=[FakeProcess(77, fakes.GIB)],
                              utilization_gpu=5, utilization_memory=1)
    fake.write([off, rtx])  # MIG-capable, disabled, enable pending a GPU reset
    assert probe.ok("nvmlDeviceGetMigMode(h[0])") == [0, 1]
    assert probe.ok("nvmlDeviceGetMaxMigDeviceCount(h[0])") == 0
    assert probe.err("nvmlDeviceGetMigDeviceHandleByIndex(h[0], 0)") == "NVMLError_InvalidArgument"
    assert probe.ok("nvmlDeviceGetUtilizationRates(h[0])") == {"gpu": 5, "memory": 1}
    assert probe.ok("nvmlDeviceGetComputeRunningProcesses(h[0])") == [
        {"pid": 77, "usedGpuMemory": fakes.GIB, "gpuInstanceId": NO_INSTANCE, "computeInstanceId": NO_INSTANCE}]


def test_processes_on_non_mig_gpu(fake, box, probe):
    started(probe)
    expected = [{"pid": p.pid, "usedGpuMemory": p.used_bytes, "gpuInstanceId": NO_INSTANCE,
                 "computeInstanceId": NO_INSTANCE} for p in box[1].processes]
    assert [p["pid"] for p in expected] == PIDS[2:]
    assert probe.ok("nvmlDeviceGetComputeRunningProcesses(h[1])") == expected
    assert probe.ok("nvmlDeviceGetComputeRunningProcesses_v3(h[1])") == expected
    assert probe.ok("nvmlDeviceGetComputeRunningProcesses_v2(h[1])") == expected
    # The raw two-call protocol: (count, NULL) -> INSUFFICIENT_SIZE (7) with the count; too small -> 7 again.
    probe.ok("fn = pynvml._nvmlGetFunctionPointer('nvmlDeviceGetComputeRunningProcesses_v3')")
    assert probe.ok("n = ctypes.c_uint(0); rc = fn(h[1], ctypes.byref(n), None); rc, n.value") == [7, 2]
    one = "n = ctypes.c_uint(1); buf = (c_nvmlProcessInfo_v3_t * 1)(); rc = fn(h[1], ctypes.byref(n), buf); rc, n.value"
    assert probe.ok(one) == [7, 2]
    many = [FakeProcess(3000 + i, (i + 1) * fakes.MIB) for i in range(20)] + [FakeProcess(4000, None)]
    fake.write([box[0], dataclasses.replace(box[1], processes=many)])
    procs = probe.ok("nvmlDeviceGetComputeRunningProcesses(h[1])")
    assert [(p["pid"], p["usedGpuMemory"]) for p in procs] == [(p.pid, p.used_bytes) for p in many]  # None: N/A
    fake.write([box[0], dataclasses.replace(box[1], processes=[])])
    assert probe.ok("n = ctypes.c_uint(0); rc = fn(h[1], ctypes.byref(n), None); rc, n.value") == [0, 0]  # none: SUCCESS, 0
    assert probe.ok("nvmlDeviceGetComputeRunningProcesses(h[1])") == []


def test_lost_gpu_and_recovery_in_same_process(fake, box, probe):
    started(probe)
    probe.ok("mig = nvmlDeviceGetMigDeviceHandleByIndex(h[0], 0)")
    fake.write([box[0], dataclasses.replace(box[1], lost=True)])
    assert probe.ok("nvmlDeviceGetCount()") == 2  # enumeration still works
    probe.ok("h1 = nvmlDeviceGetHandleByIndex(1)")
    for call in ("nvmlDeviceGetName(h1)", "nvmlDeviceGetUUID(h[1])", "nvmlDeviceGetMemoryInfo(h[1], version=nvmlMemory_v2)",
                 "nvmlDeviceGetTemperature(h[1], 0)", "nvmlDeviceGetPowerUsage(h[1])",
                 "nvmlDeviceGetComputeRunningProcesses(h[1])", "nvmlDeviceGetPciInfo(h[1])"):
        assert probe.err(call) == "NVMLError_GpuIsLost", call
    assert probe.ok("nvmlDeviceGetTemperature(h[0], 0)") == 36  # the other GPU is unaffected
    assert probe.ok("nvmlDeviceGetUUID(mig)") == box[0].mig[0].uuid
    fake.write(box)  # back on the bus: the same handles answer again
    assert probe.ok("nvmlDeviceGetTemperature(h[1], 0), nvmlDeviceGetName(h1)") == [64, "NVIDIA GeForce RTX 4090"]
    fake.write([dataclasses.replace(box[0], lost=True), box[1]])
    assert probe.err("nvmlDeviceGetMemoryInfo(mig)") == "NVMLError_GpuIsLost"  # MIG devices go with their parent


@pytest.mark.parametrize("code,error", [
    (fakes.NVML_ERROR_DRIVER_NOT_LOADED, "NVMLError_DriverNotLoaded"),
    (fakes.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "NVMLError_LibRmVersionMismatch"),
    (fakes.NVML_ERROR_NO_PERMISSION, "NVMLError_NoPermission"),
    (fakes.NVML_ERROR_UNKNOWN, "NVMLError_Unknown"),
])
def test_init_errors_then_recovery(fake, probe, code, error):
    gpus = two_gpu_box(pids=PIDS)
    fake.write(gpus, init_error=code)
    assert probe.err("nvmlInit()") == error
    assert probe.err("nvmlDeviceGetCount()") == "NVMLError_Uninitialized"  # after a failed init
    fake.write(gpus)
    assert probe.ok("nvmlInit(); nvmlDeviceGetCount()") == 2


def test_missing_config_means_driver_not_loaded(fake, tmp_path):
    with PynvmlProbe(fake, env={"FAKE_NVML_CONFIG": str(tmp_path / "absent.conf")}) as p:
        assert p.err("nvmlInit()") == "NVMLError_DriverNotLoaded"
        assert "FAKE_NVML_CONFIG" in p.stderr()


def test_delay_ms_slows_device_calls_only(fake, box, probe):
    started(probe)
    fake.write(box, delay_ms=300)
    timed = "t = time.perf_counter(); {}; time.perf_counter() - t"
    assert probe.ok(timed.format("nvmlDeviceGetTemperature(h[1], 0)")) >= 0.29
    assert probe.ok(timed.format("nvmlSystemGetDriverVersion()")) < 0.2
    # A call stuck in the driver does not block other threads (ctypes drops the GIL; the fake's lock is free).
    probe.ok("import threading; th = threading.Thread(target=nvmlDeviceGetPowerUsage, args=(h[1],)); th.start()")
    assert probe.ok(timed.format("nvmlSystemGetDriverVersion()")) < 0.2
    probe.ok("th.join()")
    fake.write(box, delay_ms=0, init_delay_ms=200)
    assert probe.ok(timed.format("nvmlDeviceGetTemperature(h[1], 0)")) < 0.2
    assert probe.ok(timed.format("nvmlInit()")) >= 0.19


def test_fail_injection_and_missing_functions(fake, box, probe):
    rtx = dataclasses.replace(box[1], fail={"nvmlDeviceGetPowerUsage": fakes.NVML_ERROR_UNKNOWN})
    fake.write([box[0], rtx], missing=["nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetComputeRunningProcesses_v3"],
               fail={"nvmlDeviceGetFanSpeed": fakes.NVML_ERROR_TIMEOUT})
    started(probe)
    assert probe.err("nvmlDeviceGetCurrentClocksEventReasons(h[1])") == "NVMLError_FunctionNotFound"
    assert probe.ok("nvmlDeviceGetCurrentClocksThrottleReasons(h[1])") == fakes.CLOCKS_EVENT_SW_POWER_CAP
    assert probe.err("nvmlDeviceGetComputeRunningProcesses(h[1])") == "NVMLLibraryMismatchError"  # unversioned
    assert [p["pid"] for p in probe.ok("nvmlDeviceGetComputeRunningProcesses_v2(h[1])")] == PIDS[2:]
    assert probe.err("nvmlDeviceGetPowerUsage(h[1])") == "NVMLError_Unknown"
    assert probe.ok("nvmlDeviceGetPowerUsage(h[0])") == 91_450
    assert probe.err("nvmlDeviceGetFanSpeed(h[1])") == "NVMLError_Timeout"


def test_call_counter(fake, box, probe):
    fake.reset_call_count()
    probe.ok("nvmlInit(); h = [nvmlDeviceGetHandleByIndex(i) for i in range(nvmlDeviceGetCount())]")
    probe.ok("[nvmlDeviceGetTemperature(x, 0) for x in h]; nvmlShutdown()")
    assert fake.call_count() == 7  # init, count, 2 handles, 2 temperatures, shutdown
    counter = "f = pynvml.nvmlLib.fake_nvml_call_count; f.restype = ctypes.c_ulonglong; f()"
    assert probe.ok(counter) == 7  # the in-process counter
    fake.reset_call_count()
    assert fake.call_count() == 0
    probe.ok("nvmlInit()")
    assert fake.call_count() == 1


def test_preload_without_library_path(fake, box):
    script = textwrap.dedent(f"""
        from pathlib import Path
        from tests.fakes.nvml import FakeNvml
        FakeNvml(Path({str(fake.workdir)!r})).preload()
        import pynvml
        pynvml.nvmlInit()
        print(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(1)))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "FAKE_NVML_CONFIG")}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "NVIDIA GeForce RTX 4090"


def test_missing_compiler_is_a_clear_skip(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(fakes, "_cache_root", lambda: tmp_path / "cache")
    with pytest.raises(fakes.FakeNvmlUnavailable, match="cc"):
        FakeNvml(tmp_path / "w")
    with pytest.raises(pytest.skip.Exception, match="needs `cc`"):
        FakeNvml.or_skip(tmp_path / "w")

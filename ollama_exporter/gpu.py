"""NVIDIA GPU telemetry through NVML (the `pynvml` module of nvidia-ml-py), sampled by the poller.

The poller calls `GpuSource.sample()` in a thread with a deadline, so a stuck driver never reaches a
scrape. Fields a GPU does not support (fan on passive cards, ECC on GeForce, utilisation under MIG)
are remembered per GPU and left out, never exported as 0. A lost GPU is reported with `up=False` and
its identity only; the others keep reporting, and NVML is re-initialised with backoff. Initialisation
failures (no driver, version mismatch, no permission) are retried with backoff too.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

from ollama_exporter import runners
from ollama_exporter.backoff import Backoff
from ollama_exporter.snapshot import GpuDevice, GpuProcess, GpuState, MigInstance, SourceError

log = logging.getLogger(__name__)

CLOCKS = (("graphics", 0), ("sm", 1), ("memory", 2), ("video", 3))  # NVML_CLOCK_*
THROTTLE_BITS = (  # nvmlClocksEventReason* bits
    ("gpu_idle", 0x1), ("applications_clocks", 0x2), ("sw_power_cap", 0x4), ("hw_slowdown", 0x8),
    ("sync_boost", 0x10), ("sw_thermal", 0x20), ("hw_thermal", 0x40), ("hw_power_brake", 0x80),
    ("display_clocks", 0x100),
)
_REASONS = {12: "library_not_found", 9: "driver_not_loaded", 4: "no_permission", 15: "gpu_lost",
            18: "version_mismatch", 10: "timeout"}
_ABSENT = {3, 4, 6, 13, 25}  # NotSupported, NoPermission, NotFound, FunctionNotFound, ArgumentVersionMismatch


class GpuLost(Exception):
    pass


def _reason(exc: BaseException) -> str:
    if type(exc).__name__ == "NVMLLibraryMismatchError":
        return "version_mismatch"
    return _REASONS.get(getattr(exc, "value", None), "unknown")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class GpuSource:
    def __init__(self, interval: float = 5.0, read_cmdline: Callable = runners.read_cmdline,
                 clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.read_cmdline = read_cmdline
        self.clock = clock
        self.nv: Any = None  # the pynvml module, once initialised
        self.driver_version = ""
        self._unsupported: set[tuple[str, str]] = set()  # (uuid, field) the GPU said it does not have
        self._identity: dict[int, tuple[str, str, str]] = {}  # index -> (uuid, name, pci bus id)
        self._identified: set[int] = set()  # indices whose identity was read since NVML was (re)initialised
        self._init_backoff = Backoff(interval)  # between failed initialisations
        self._last_error: Optional[SourceError] = None
        self._lost_backoff = Backoff(interval)  # between re-initialisations while a GPU is lost

    # --- initialisation ---

    def start(self) -> None:
        """Load and initialise NVML now; raises SourceError (reason library_not_found, ...) if it cannot."""
        try:
            import pynvml
        except ImportError:
            raise SourceError("library_not_found", "the nvidia-ml-py package (module pynvml) is not installed") from None
        try:
            pynvml.nvmlInit()
            self.driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
        except Exception as exc:  # pynvml.NVMLError and NVMLLibraryMismatchError (not an NVMLError)
            raise SourceError(_reason(exc), f"NVML initialisation failed: {exc}") from None
        self.nv = pynvml
        self._identified.clear()  # handles may have been re-enumerated; the old identities stay as fallback
        log.info("NVML initialised", extra={"driver": self.driver_version})

    def _ensure_started(self) -> None:
        if self.nv is not None:
            return
        now = self.clock()
        if not self._init_backoff.ready(now) and self._last_error is not None:
            raise self._last_error
        try:
            self.start()
            self._init_backoff.reset()
            self._last_error = None
        except SourceError as exc:
            delay = self._init_backoff.fail(now)
            self._last_error = SourceError(exc.reason, f"{exc} (next try in {delay:g}s)")
            raise self._last_error from None

    def _after_lost(self, lost: bool) -> None:
        """While a GPU is lost, re-initialise NVML (re-enumerating handles) with growing backoff."""
        if not lost:
            self._lost_backoff.reset()
            return
        now = self.clock()
        if not self._lost_backoff.ready(now):
            return
        self._lost_backoff.fail(now)
        try:
            self.nv.nvmlShutdown()
        except Exception:  # noqa: BLE001 - already broken; the next initialisation will tell
            pass
        self.nv = None
        self._init_backoff.until = 0.0  # the next sample initialises again

    # --- sampling ---

    def sample(self) -> GpuState:
        self._ensure_started()
        nv = self.nv
        try:
            count = nv.nvmlDeviceGetCount()
        except Exception as exc:
            self.nv = None
            raise SourceError(_reason(exc), f"nvmlDeviceGetCount failed: {exc}") from None
        errors: list[str] = []
        devices = tuple(d for d in (self._device(i, errors) for i in range(count)) if d is not None)
        self._after_lost("gpu_lost" in errors)
        return GpuState(nvml_up=True, driver_version=self.driver_version, devices=devices, errors=tuple(errors))

    def _device(self, index: int, errors: list[str]) -> Optional[GpuDevice]:
        nv = self.nv
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            if index not in self._identified:  # static: read once per initialisation
                self._identity[index] = (_text(nv.nvmlDeviceGetUUID(handle)), _text(nv.nvmlDeviceGetName(handle)),
                                         _text(nv.nvmlDeviceGetPciInfo(handle).busId))
                self._identified.add(index)
        except Exception as exc:
            errors.append(_reason(exc))
            return self._down(index)
        uuid, name, pci = self._identity[index]
        try:
            return self._read(index, handle, uuid, name, pci, errors)
        except GpuLost:
            errors.append("gpu_lost")
            log.warning("GPU lost", extra={"gpu": index, "uuid": uuid})
            return self._down(index)

    def _down(self, index: int) -> Optional[GpuDevice]:
        if index not in self._identity:
            return None  # never identified: nothing to label a series with
        uuid, name, pci = self._identity[index]
        return GpuDevice(index, uuid, name, pci, up=False)

    def _get(self, key: str, field: str, errors: list[str], fn: Callable, *args: Any) -> Any:
        """fn(*args), or None when this GPU lacks the field (remembered) or the call failed (counted)."""
        if (key, field) in self._unsupported:
            return None
        try:
            return fn(*args)
        except Exception as exc:
            code = getattr(exc, "value", None)
            if code == 15:
                raise GpuLost() from None
            if code in _ABSENT or type(exc).__name__ == "NVMLLibraryMismatchError":
                if code != 6:  # NotFound means "no data right now", not "never"
                    self._unsupported.add((key, field))
                return None
            errors.append(_reason(exc))
            return None

    def _read(self, index: int, h: Any, uuid: str, name: str, pci: str, errors: list[str]) -> GpuDevice:
        nv, g = self.nv, (lambda field, fn, *a: self._get(uuid, field, errors, fn, *a))
        total, used, free, reserved = self._memory(uuid, h, errors)
        util = g("utilization", nv.nvmlDeviceGetUtilizationRates, h)
        power = g("power", nv.nvmlDeviceGetPowerUsage, h)
        limit = g("power_limit", nv.nvmlDeviceGetEnforcedPowerLimit, h)
        energy = g("energy", nv.nvmlDeviceGetTotalEnergyConsumption, h)
        fan = g("fan", nv.nvmlDeviceGetFanSpeed, h)
        reasons = g("throttle", self._clock_event_reasons, h)
        clocks = tuple((c, mhz * 1e6) for c, cid in CLOCKS if (mhz := g(f"clock_{c}", nv.nvmlDeviceGetClockInfo, h, cid))
                       is not None)
        ecc = tuple((kind, count) for kind, kid in (("corrected", 0), ("uncorrected", 1))
                    if (count := g(f"ecc_{kind}", nv.nvmlDeviceGetTotalEccErrors, h, kid, 0)) is not None)
        mig_mode = g("mig", nv.nvmlDeviceGetMigMode, h)
        mig, mig_processes = self._mig(index, uuid, h, errors) if mig_mode and mig_mode[0] == 1 else ((), ())
        processes = self._processes(index, uuid, uuid, h, errors) + mig_processes
        return GpuDevice(
            index, uuid, name, pci, up=True,
            memory_total=total, memory_used=used, memory_free=free, memory_reserved=reserved,
            utilization=util.gpu / 100 if util is not None else None,
            memory_activity=util.memory / 100 if util is not None else None,
            temperature=g("temperature", nv.nvmlDeviceGetTemperature, h, 0),
            power=power / 1000 if power is not None else None,
            power_limit=limit / 1000 if limit is not None else None,
            energy=energy / 1000 if energy is not None else None,
            clocks=clocks,
            performance_state=g("pstate", nv.nvmlDeviceGetPerformanceState, h),
            fan_speed=fan / 100 if fan is not None else None,
            throttle=tuple((r, bool(reasons & bit)) for r, bit in THROTTLE_BITS) if reasons is not None else (),
            ecc_errors=ecc, mig=mig, processes=processes,
        )

    def _clock_event_reasons(self, h: Any) -> int:
        """The R535+ name first; drivers before it only have the deprecated ThrottleReasons (same bits)."""
        try:
            return self.nv.nvmlDeviceGetCurrentClocksEventReasons(h)
        except Exception as exc:
            if getattr(exc, "value", None) != 13:
                raise
            return self.nv.nvmlDeviceGetCurrentClocksThrottleReasons(h)

    def _compute_processes(self, h: Any) -> list:
        """The _v3 call (R510+), else _v2 (R450+) on drivers without its symbol."""
        try:
            return self.nv.nvmlDeviceGetComputeRunningProcesses(h)
        except Exception as exc:
            if type(exc).__name__ != "NVMLLibraryMismatchError" and getattr(exc, "value", None) != 13:
                raise
            return self.nv.nvmlDeviceGetComputeRunningProcesses_v2(h)

    def _memory(self, key: str, h: Any, errors: list[str]) -> tuple[Optional[int], ...]:
        """Memory info v2 (used excludes driver-reserved memory, as nvidia-smi shows), else v1."""
        info = self._get(key, "memory_v2", errors, self.nv.nvmlDeviceGetMemoryInfo, h, self.nv.nvmlMemory_v2)
        if info is not None:
            return info.total, info.used, info.free, info.reserved
        info = self._get(key, "memory", errors, self.nv.nvmlDeviceGetMemoryInfo, h)
        return (info.total, info.used, info.free, None) if info is not None else (None, None, None, None)

    def _mig(self, index: int, uuid: str, h: Any, errors: list[str]) -> tuple[tuple, tuple]:
        nv, instances, processes = self.nv, [], []
        for slot in range(self._get(uuid, "mig_count", errors, nv.nvmlDeviceGetMaxMigDeviceCount, h) or 0):
            mh = self._get(uuid, f"mig_slot_{slot}", errors, nv.nvmlDeviceGetMigDeviceHandleByIndex, h, slot)
            if mh is None:
                continue  # empty slot
            mig_uuid = _text(nv.nvmlDeviceGetUUID(mh))
            total, used, free, _ = self._memory(mig_uuid, mh, errors)
            instances.append(MigInstance(nv.nvmlDeviceGetGpuInstanceId(mh), nv.nvmlDeviceGetComputeInstanceId(mh),
                                         mig_uuid, total, used, free))
            processes.extend(self._processes(index, uuid, mig_uuid, mh, errors))
        return tuple(instances), tuple(processes)

    def _processes(self, index: int, uuid: str, key: str, h: Any, errors: list[str]) -> tuple[GpuProcess, ...]:
        """Compute processes on a GPU or MIG handle, each with what its command line says it serves."""
        found = self._get(key, "processes", errors, self._compute_processes, h) or []
        result = []
        for p in found:
            argv = self.read_cmdline(p.pid)
            result.append(GpuProcess(p.pid, str(index), uuid, p.usedGpuMemory,
                                     None if argv is None else runners.model_ref(argv)))
        return tuple(result)

"""A fake NVML at the C ABI: a small C stand-in for ``libnvidia-ml.so.1`` plus its Python-side writer.

The real bindings (nvidia-ml-py's ``pynvml``) load ``fake_nvml.c`` through ctypes, so tests run the
real binding code: symbol lookup, struct layouts, ``_v2`` version fields, the two-call process list,
``NVMLError_*`` classes. The library reads its state from a text file named by ``FAKE_NVML_CONFIG``
and re-reads it whenever the file changes, so a test can change GPU state (lose a GPU, add a
process, make a call slow) while an exporter process runs. Behaviour follows
NVIDIA's NVML API reference and nvidia-ml-py; see :class:`FakeGpu` for what each field models.

Usage from a test::

    fake = FakeNvml.or_skip(tmp_path)       # compiles once per source hash; skips without `cc`
    fake.write(two_gpu_box(pids=[...]))
    proc = subprocess.Popen([...exporter...], env={**os.environ, **fake.env()})
    fake.write([...changed GPUs...])        # picked up on the library's next call

A process can load only one libnvidia-ml and ``LD_LIBRARY_PATH`` is read at process start, so run
pynvml in a subprocess (:class:`PynvmlProbe` is a small one driven over pipes) or, in a process
that has not loaded NVML yet, call :meth:`FakeNvml.preload` first.

Config file format (one directive per line, ``#`` comments; ``-`` means "not supported")::

    driver_version 550.54.15            # nvmlSystemGetDriverVersion
    nvml_version 12.550.54.15           # nvmlSystemGetNVMLVersion
    cuda_version 12040                  # nvmlSystemGetCudaDriverVersion(_v2)
    init_error 0                        # nvmlInit* returns this code (0 = succeed)
    init_delay_ms 0                     # nvmlInit* sleeps this long (a hanging driver)
    delay_ms 0                          # every nvmlDevice* call sleeps this long
    counter_file /path/nvml.calls       # 8-byte counter of calls, shared via mmap
    fail FUNCTION CODE                  # before any 'gpu': FUNCTION always returns CODE
    gpu GPU-uuid                        # starts a device; the lines below belong to it
    name NVIDIA A100-SXM4-80GB
    pci 00000000:17:00.0 0x20B210DE 0x147F10DE   # bus id, PCI device id, subsystem id
    cc 8 0                              # CUDA compute capability
    memory TOTAL USED RESERVED | memory -        # bytes; v2 used = USED, v1 used = USED + RESERVED
    memory_v2 1                         # 0: nvmlDeviceGetMemoryInfo_v2 -> FUNCTION_NOT_FOUND
    utilization GPU MEM | utilization - -
    temperature C | power MW | power_limit MW | energy MJ | pstate N | fan PCT
    clocks GRAPHICS SM MEM VIDEO        # MHz, each may be '-'
    clocks_event_reasons MASK
    ecc CORR_VOL UNCORR_VOL CORR_AGG UNCORR_AGG | ecc - - - -
    mig_mode CURRENT PENDING | mig_mode -      # '-': MIG not supported
    max_mig 7
    mig_privileged 0                    # 1: parent handle lists all MIG processes
    lost 0                              # 1: every query on this GPU -> GPU_IS_LOST
    fail FUNCTION CODE                  # inside a gpu block: only this GPU's handle
    proc PID USED_BYTES                 # compute process on the GPU ('-' bytes = not available)
    mig GI CI MIG-uuid TOTAL USED PROFILE      # next MIG slot; 'mig -' is an empty slot
    mig_proc PID USED_BYTES             # process on the last 'mig'

Only this module writes the file; it always writes every directive, so the C parser stays small.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid as _uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

SOURCE = Path(__file__).resolve().parent / "nvml" / "fake_nvml.c"
SONAME = "libnvidia-ml.so.1"
CFLAGS = ["-shared", "-fPIC", "-O2", "-Wall", "-Werror", f"-Wl,-soname,{SONAME}"]

# NVML return codes a test is likely to inject (pynvml.NVML_ERROR_*).
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_UNKNOWN = 999

# nvmlClocksEventReason* bits
CLOCKS_EVENT_GPU_IDLE = 0x1
CLOCKS_EVENT_APPLICATIONS_CLOCKS = 0x2
CLOCKS_EVENT_SW_POWER_CAP = 0x4
CLOCKS_EVENT_HW_SLOWDOWN = 0x8
CLOCKS_EVENT_SYNC_BOOST = 0x10
CLOCKS_EVENT_SW_THERMAL = 0x20
CLOCKS_EVENT_HW_THERMAL = 0x40
CLOCKS_EVENT_HW_POWER_BRAKE = 0x80
CLOCKS_EVENT_DISPLAY_CLOCKS = 0x100

CLOCK_NAMES = ("graphics", "sm", "memory", "video")  # NVML_CLOCK_GRAPHICS/SM/MEM/VIDEO = 0..3


class FakeNvmlUnavailable(RuntimeError):
    """The fake library cannot be built here (no C compiler); tests should skip."""


class FakeNvmlBuildError(RuntimeError):
    """The C compiler rejected fake_nvml.c: a bug in the fake, not a reason to skip."""


@dataclass
class FakeProcess:
    pid: int
    used_bytes: Optional[int]  # None = NVML_VALUE_NOT_AVAILABLE (pynvml turns it into None)


@dataclass
class FakeMig:
    gpu_instance_id: int
    compute_instance_id: int
    uuid: str  # "MIG-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
    memory_total: int
    memory_used: int
    processes: list[FakeProcess] = field(default_factory=list)
    profile: str = ""  # e.g. "3g.40gb"; the MIG device's name is "<parent name> MIG <profile>"


@dataclass
class FakeGpu:
    """One physical GPU. ``None`` in an optional field means the call returns NVML_ERROR_NOT_SUPPORTED."""

    uuid: str
    name: str
    pci_bus_id: str  # "00000000:17:00.0"
    memory_total: int
    memory_used: int  # v2 "used" (allocations); v1 reports used + reserved
    memory_reserved: int = 0  # free = total - used - reserved
    utilization_gpu: Optional[int] = 0  # percent; NotSupported on MIG-enabled GPUs regardless
    utilization_memory: Optional[int] = 0
    temperature_c: Optional[int] = 40
    power_mw: Optional[int] = 100_000
    power_limit_mw: Optional[int] = 300_000
    energy_mj: Optional[int] = 1_000_000
    clocks_mhz: Optional[dict[str, int]] = field(
        default_factory=lambda: {"graphics": 1410, "sm": 1410, "memory": 1593, "video": 1275})
    pstate: Optional[int] = 0  # 0..15, 32 = unknown
    fan_percent: Optional[int] = None  # may exceed 100 on real cards
    clocks_event_reasons: Optional[int] = 0  # CLOCKS_EVENT_* bitmask
    ecc_corrected: Optional[int] = None  # volatile counts; None = ECC NotSupported
    ecc_uncorrected: Optional[int] = None
    memory_v2: bool = True  # False: nvmlDeviceGetMemoryInfo_v2 -> FunctionNotFound (old driver)
    memory_supported: bool = True  # False: both memory calls -> NotSupported (unified memory, GB10)
    mig: Optional[list[Optional[FakeMig]]] = None  # None: MIG NotSupported; []: capable, off; else on (None = empty slot)
    processes: list[FakeProcess] = field(default_factory=list)  # non-MIG compute processes
    lost: bool = False  # every query -> GpuIsLost; enumeration still works
    # Extras beyond the common set:
    ecc_corrected_aggregate: Optional[int] = None  # default: the volatile count
    ecc_uncorrected_aggregate: Optional[int] = None
    compute_capability: tuple[int, int] = (8, 0)
    pci_device_id: int = 0x000010DE
    pci_subsystem_id: int = 0
    mig_pending: Optional[bool] = None  # default: same as current
    max_mig_devices: int = 7
    mig_privileged: bool = False  # True: parent handle lists MIG processes instead of NoPermission
    fail: dict[str, int] = field(default_factory=dict)  # {"nvmlDeviceGetPowerUsage": 999}: this GPU only


def _opt(value: Optional[int]) -> str:
    return "-" if value is None else str(int(value))


def _token(value: str, what: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} must be a non-empty string without whitespace: {value!r}")
    return value


def _line(value: str, what: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"{what} must be one line: {value!r}")
    return value


def _gpu_lines(gpu: FakeGpu) -> list[str]:
    clocks = gpu.clocks_mhz
    ecc = (gpu.ecc_corrected, gpu.ecc_uncorrected,
           gpu.ecc_corrected if gpu.ecc_corrected_aggregate is None else gpu.ecc_corrected_aggregate,
           gpu.ecc_uncorrected if gpu.ecc_uncorrected_aggregate is None else gpu.ecc_uncorrected_aggregate)
    if gpu.ecc_corrected is None or gpu.ecc_uncorrected is None:
        ecc = (None, None, None, None)
    if gpu.mig is None:
        mig_mode = "-"
    else:
        current = int(bool(gpu.mig))
        pending = current if gpu.mig_pending is None else int(gpu.mig_pending)
        mig_mode = f"{current} {pending}"
    lines = [
        f"gpu {_token(gpu.uuid, 'uuid')}",
        f"name {_line(gpu.name, 'name')}",
        f"pci {_token(gpu.pci_bus_id, 'pci_bus_id')} {gpu.pci_device_id:#010x} {gpu.pci_subsystem_id:#010x}",
        f"cc {gpu.compute_capability[0]} {gpu.compute_capability[1]}",
        (f"memory {gpu.memory_total} {gpu.memory_used} {gpu.memory_reserved}" if gpu.memory_supported else "memory -"),
        f"memory_v2 {int(gpu.memory_v2)}",
        f"utilization {_opt(gpu.utilization_gpu)} {_opt(gpu.utilization_memory)}",
        f"temperature {_opt(gpu.temperature_c)}",
        f"power {_opt(gpu.power_mw)}",
        f"power_limit {_opt(gpu.power_limit_mw)}",
        f"energy {_opt(gpu.energy_mj)}",
        "clocks " + " ".join(_opt(None if clocks is None else clocks.get(name)) for name in CLOCK_NAMES),
        f"pstate {_opt(gpu.pstate)}",
        f"fan {_opt(gpu.fan_percent)}",
        f"clocks_event_reasons {_opt(gpu.clocks_event_reasons)}",
        "ecc " + " ".join(_opt(v) for v in ecc),
        f"mig_mode {mig_mode}",
        f"max_mig {gpu.max_mig_devices}",
        f"mig_privileged {int(gpu.mig_privileged)}",
        f"lost {int(gpu.lost)}",
    ]
    lines += [f"fail {_token(fn, 'function')} {int(code)}" for fn, code in gpu.fail.items()]
    lines += [f"proc {p.pid} {_opt(p.used_bytes)}" for p in gpu.processes]
    for mig in gpu.mig or []:
        if mig is None:
            lines.append("mig -")
            continue
        lines.append(f"mig {mig.gpu_instance_id} {mig.compute_instance_id} {_token(mig.uuid, 'MIG uuid')} "
                     f"{mig.memory_total} {mig.memory_used} {_token(mig.profile or '-', 'profile')}")
        lines += [f"mig_proc {p.pid} {_opt(p.used_bytes)}" for p in mig.processes]
    return lines


def _cache_root() -> Path:
    return Path(tempfile.gettempdir()) / f"fake-nvml-{os.getuid()}"


def build_library(cache_root: Optional[Path] = None) -> Path:
    """Compile fake_nvml.c once per source hash; return the path of ``libnvidia-ml.so.1``."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out_dir = (cache_root or _cache_root()) / digest
    lib = out_dir / SONAME
    if lib.is_file():
        return lib
    compiler = os.environ.get("CC") or "cc"
    if not shutil.which(compiler):
        raise FakeNvmlUnavailable(f"the fake NVML library needs a C compiler: `{compiler}` (cc) was not found on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".build-{os.getpid()}-{_uuid.uuid4().hex}.so"
    cmd = [compiler, *CFLAGS, "-o", str(tmp), str(SOURCE)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise FakeNvmlBuildError(f"{' '.join(cmd)} failed:\n{result.stderr}")
    os.replace(tmp, lib)  # atomic: parallel test workers may build at the same time
    return lib


class FakeNvml:
    """A compiled fake ``libnvidia-ml.so.1`` and the config file it reads."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.lib_path: Path = build_library()
        self.lib_dir: Path = self.lib_path.parent  # holds only libnvidia-ml.so.1
        self.config_path: Path = self.workdir / "nvml.conf"
        self.counter_path: Path = self.workdir / "nvml.calls"
        if self.counter_path.exists():
            self.reset_call_count()
        else:
            self.counter_path.write_bytes(bytes(8))

    @classmethod
    def or_skip(cls, workdir: Path) -> "FakeNvml":
        """Build the fake, or ``pytest.skip`` when no C compiler is available."""
        try:
            return cls(workdir)
        except FakeNvmlUnavailable as exc:
            import pytest

            pytest.skip(f"fake NVML needs `cc` to build libnvidia-ml.so.1: {exc}")

    def write(self, gpus: Sequence[FakeGpu], driver_version: str = "550.54.15", cuda_version: int = 12040,
              init_error: Optional[int] = None, delay_ms: int = 0, *, init_delay_ms: int = 0,
              fail: Optional[Mapping[str, int]] = None, missing: Iterable[str] = ()) -> None:
        """Atomically replace the state the library reports.

        ``init_error``: code nvmlInit returns (e.g. 9 DriverNotLoaded, 18 LibRmVersionMismatch).
        ``delay_ms``: every nvmlDevice* call sleeps this long (a stuck driver).
        ``fail``: {function: code} for every call of that function; ``missing``: functions that
        return FunctionNotFound, which pynvml reports like an absent symbol (NVMLError_FunctionNotFound,
        or NVMLLibraryMismatchError from unversioned wrappers).
        """
        if len(gpus) > 16:
            raise ValueError("the fake supports at most 16 GPUs")
        failures = {**{fn: NVML_ERROR_FUNCTION_NOT_FOUND for fn in missing}, **(fail or {})}
        lines = [
            "# fake libnvidia-ml config, written by tests/fakes/nvml.py",
            f"driver_version {_token(driver_version, 'driver_version')}",
            f"nvml_version {cuda_version // 1000}.{driver_version}",
            f"cuda_version {int(cuda_version)}",
            f"init_error {int(init_error or 0)}",
            f"init_delay_ms {int(init_delay_ms)}",
            f"delay_ms {int(delay_ms)}",
            f"counter_file {_line(str(self.counter_path), 'counter path')}",
        ]
        lines += [f"fail {_token(fn, 'function')} {int(code)}" for fn, code in failures.items()]
        for gpu in gpus:
            if len(gpu.mig or []) > 8 or len(gpu.processes) > 32:
                raise ValueError("the fake supports at most 8 MIG slots and 32 processes per device")
            lines += _gpu_lines(gpu)
        tmp = self.config_path.with_name(f".{self.config_path.name}.{_uuid.uuid4().hex}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.config_path)  # new inode: the library notices on its next call

    def env(self) -> dict[str, str]:
        """Environment for a process that should load the fake instead of a real NVML."""
        path = str(self.lib_dir)
        if os.environ.get("LD_LIBRARY_PATH"):
            path += os.pathsep + os.environ["LD_LIBRARY_PATH"]
        return {"LD_LIBRARY_PATH": path, "FAKE_NVML_CONFIG": str(self.config_path)}

    def preload(self) -> ctypes.CDLL:
        """Load the fake into this process so pynvml's ``CDLL("libnvidia-ml.so.1")`` finds it by soname.

        Irreversible for the process: only do this in a subprocess or a process with no other NVML user.
        """
        os.environ["FAKE_NVML_CONFIG"] = str(self.config_path)
        return ctypes.CDLL(str(self.lib_path), mode=ctypes.RTLD_GLOBAL)

    def call_count(self) -> int:
        """NVML calls made by every process using this fake's config since the last reset."""
        return struct.unpack("<Q", self.counter_path.read_bytes()[:8])[0]

    def reset_call_count(self) -> None:
        with open(self.counter_path, "r+b") as f:  # in place, never truncate: the library has it mmap'ed
            f.write(bytes(8))


def _uuid_for(prefix: str, seed: str) -> str:
    h = hashlib.sha256(seed.encode()).hexdigest()
    return f"{prefix}-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


GIB = 1024**3
MIB = 1024**2


def two_gpu_box(pids: Sequence[int] = (41021, 41022, 52011, 52012)) -> list[FakeGpu]:
    """The standard test box.

    GPU 0: NVIDIA A100-SXM4-80GB, MIG on with two 3g.40gb instances (GI 1 and 2, CI 0), one Ollama
    runner in each (``pids[0]``, ``pids[1]``); passively cooled (fan NotSupported), ECC on.
    GPU 1: NVIDIA GeForce RTX 4090: fan 31 %, ECC and MIG NotSupported, two compute processes
    (``pids[2]``: an 8.6 GB model runner, ``pids[3]``: a 1.1 GB embedding runner).
    """
    if len(pids) != 4:
        raise ValueError("two_gpu_box needs 4 pids: MIG 0 runner, MIG 1 runner, two RTX 4090 processes")
    mig_used = (8_712 * MIB, 4_980 * MIB)
    a100 = FakeGpu(
        uuid=_uuid_for("GPU", "a100-0"), name="NVIDIA A100-SXM4-80GB", pci_bus_id="00000000:17:00.0",
        memory_total=81_920 * MIB, memory_used=sum(mig_used), memory_reserved=904 * MIB,
        utilization_gpu=0, utilization_memory=0,  # NotSupported anyway: MIG is on
        temperature_c=36, power_mw=91_450, power_limit_mw=400_000, energy_mj=23_328_145_210,
        clocks_mhz={"graphics": 1410, "sm": 1410, "memory": 1593, "video": 1275},
        pstate=0, fan_percent=None, clocks_event_reasons=CLOCKS_EVENT_GPU_IDLE,
        ecc_corrected=3, ecc_uncorrected=0, ecc_corrected_aggregate=17, ecc_uncorrected_aggregate=0,
        compute_capability=(8, 0), pci_device_id=0x20B210DE, pci_subsystem_id=0x147F10DE,
        mig=[
            FakeMig(1, 0, _uuid_for("MIG", "a100-0-gi1"), 40_192 * MIB, mig_used[0],
                    [FakeProcess(pids[0], 8_192 * MIB)], profile="3g.40gb"),
            FakeMig(2, 0, _uuid_for("MIG", "a100-0-gi2"), 40_192 * MIB, mig_used[1],
                    [FakeProcess(pids[1], 4_460 * MIB)], profile="3g.40gb"),
        ],
    )
    rtx = FakeGpu(
        uuid=_uuid_for("GPU", "rtx4090-1"), name="NVIDIA GeForce RTX 4090", pci_bus_id="00000000:65:00.0",
        memory_total=24_564 * MIB, memory_used=10_322 * MIB, memory_reserved=421 * MIB,
        utilization_gpu=87, utilization_memory=41,
        temperature_c=64, power_mw=318_204, power_limit_mw=450_000, energy_mj=9_876_543_210,
        clocks_mhz={"graphics": 2715, "sm": 2715, "memory": 10_501, "video": 2160},
        pstate=2, fan_percent=31, clocks_event_reasons=CLOCKS_EVENT_SW_POWER_CAP,
        ecc_corrected=None, ecc_uncorrected=None,
        compute_capability=(8, 9), pci_device_id=0x268410DE, pci_subsystem_id=0x16F110DE,
        mig=None,
        processes=[FakeProcess(pids[2], 8_918 * MIB), FakeProcess(pids[3], 1_104 * MIB)],
    )
    return [a100, rtx]


_PROBE_SERVER = r"""
import ast, ctypes, json, sys
import pynvml
ns = {"pynvml": pynvml, "ctypes": ctypes}
exec("from pynvml import *\nimport os, time", ns)
def conv(v):
    if v is None or isinstance(v, (bool, int, float, str)): return v
    if isinstance(v, bytes): return v.decode()
    if isinstance(v, (list, tuple)): return [conv(x) for x in v]
    if isinstance(v, dict): return {str(k): conv(x) for k, x in v.items()}
    if isinstance(v, ctypes.Structure): return {f[0]: conv(getattr(v, f[0])) for f in v._fields_}
    if isinstance(v, ctypes._SimpleCData): return conv(v.value)
    if isinstance(v, pynvml.nvmlFriendlyObject): return conv(dict(v.__dict__))
    return repr(v)
for line in sys.stdin:
    try:
        tree = ast.parse(json.loads(line), "<probe>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<probe>", "exec"), ns)  # statements run; a trailing expression is the reply
        result = eval(compile(ast.Expression(last.value), "<probe>", "eval"), ns) if last else None
        reply = {"ok": conv(result)}
    except BaseException as exc:
        reply = {"error": type(exc).__name__, "message": str(exc)}
    sys.stdout.write(json.dumps(reply) + "\n"); sys.stdout.flush()
"""


class ProbeError(AssertionError):
    pass


class PynvmlProbe:
    """A subprocess running the real pynvml against a fake; evaluates code sent over a pipe.

    ``probe.ok("nvmlDeviceGetCount()")`` returns the JSON-converted value (ctypes structs become
    dicts), ``probe.err("nvmlDeviceGetFanSpeed(h)")`` the exception class name. Code runs like a
    REPL cell: statements (``h = nvmlDeviceGetHandleByIndex(0)``) persist in the namespace, and a
    trailing expression is the reply. Names from ``pynvml``, ``ctypes``, ``os`` and ``time`` are in scope.
    """

    def __init__(self, fake: Optional[FakeNvml], env: Optional[Mapping[str, str]] = None, timeout: float = 10.0,
                 cwd: Optional[Path] = None):
        full_env = {**os.environ, **(fake.env() if fake else {}), **(env or {})}
        self.timeout = timeout
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-c", _PROBE_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, env=full_env, bufsize=0,
                                     cwd=str(cwd) if cwd else None)
        self._buf = b""

    def __enter__(self) -> "PynvmlProbe":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.proc.stdin.close()  # EOF: the server loop ends
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._stderr.close()

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def call(self, code: str, timeout: Optional[float] = None) -> dict:
        try:
            self.proc.stdin.write(json.dumps(code).encode() + b"\n")
        except BrokenPipeError:
            raise ProbeError(f"probe exited ({self.proc.wait()}) before {code!r}; stderr:\n{self.stderr()}") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProbeError(f"probe timed out on {code!r}; stderr:\n{self.stderr()}")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise ProbeError(f"probe exited ({self.proc.wait()}) on {code!r}; stderr:\n{self.stderr()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def ok(self, code: str, timeout: Optional[float] = None) -> Any:
        reply = self.call(code, timeout)
        if "error" in reply:
            raise ProbeError(f"{code!r} raised {reply['error']}: {reply['message']}")
        return reply["ok"]

    def err(self, code: str, timeout: Optional[float] = None) -> str:
        reply = self.call(code, timeout)
        if "error" not in reply:
            raise ProbeError(f"{code!r} returned {reply['ok']!r}, expected an exception")
        return reply["error"]

"""The immutable values that flow from the poller to the metrics.

A Snapshot is what was true at the end of one poll: Ollama's answers, each source's health, and the
exporter's cumulative counters. The poller builds a new one and swaps it in whole, so a reader never
sees half of one. Nothing here knows about HTTP or Prometheus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping, Optional

if TYPE_CHECKING:  # the values are built there; this module only carries them
    from ollama_exporter.runner_slots import RunnersState
    from ollama_exporter.traffic import TrafficValue

# Error reasons each source can report; small fixed sets so the errors counter stays bounded.
ERROR_REASONS = ("timeout", "connection", "http_4xx", "http_5xx", "invalid_response")
FOREVER_SECONDS = 20 * 365 * 86400  # an expires_at further ahead than this is keep_alive -1 (about year 2318)
GPU_ERROR_REASONS = ("library_not_found", "driver_not_loaded", "no_permission", "gpu_lost", "version_mismatch",
                     "timeout", "unknown")


class SourceError(Exception):
    """A failed read of one source; `reason` is one of that source's fixed reasons."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ModelDetails:
    """The `details` object shared by /api/tags, /api/ps and /api/show."""

    format: str = ""
    family: str = ""
    families: tuple[str, ...] = ()
    parameter_size: str = ""
    quantization_level: str = ""

    def or_(self, other: "ModelDetails") -> "ModelDetails":
        """These details with any empty field filled from `other` (old /api/tags rows lack some)."""
        if other == self or other == _NO_DETAILS:
            return self
        return ModelDetails(self.format or other.format, self.family or other.family,
                            self.families or other.families, self.parameter_size or other.parameter_size,
                            self.quantization_level or other.quantization_level)


_NO_DETAILS = ModelDetails()


@dataclass(frozen=True, slots=True)
class ShowInfo:
    """What /api/show adds to a tags row; immutable per manifest digest, so it is cached by digest."""

    architecture: str = ""
    context_length: Optional[int] = None  # model_info["<arch>.context_length"], the training maximum
    parameter_count: Optional[int] = None  # model_info["general.parameter_count"]
    capabilities: Optional[tuple[str, ...]] = None  # None: the server predates `capabilities`
    weights_blob: Optional[str] = None  # 64-hex sha256 of the weights blob from the modelfile's FROM line
    details: ModelDetails = ModelDetails()
    remote: bool = False  # `remote_host`/`remote_model`: a cloud model, served by another server


@dataclass(frozen=True, slots=True)
class InstalledModel:
    """One /api/tags row, joined with its cached /api/show info when that is known."""

    name: str
    digest: str
    size: Optional[int]  # None when the server sent no usable number
    details: ModelDetails
    capabilities: Optional[tuple[str, ...]] = None  # from /api/tags (v0.30+); /api/show wins if present
    show: Optional[ShowInfo] = None
    remote: bool = False  # `remote_host`/`remote_model` (v0.12+): a cloud model, served by another server

    @property
    def is_remote(self) -> bool:
        return self.remote or (self.show is not None and self.show.remote)

    @property
    def merged_details(self) -> ModelDetails:
        return self.details.or_(self.show.details) if self.show else self.details

    @property
    def merged_capabilities(self) -> tuple[str, ...]:
        if self.show is not None and self.show.capabilities is not None:
            return self.show.capabilities
        return self.capabilities or ()


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """One /api/ps row."""

    name: str
    digest: str
    size: Optional[int]  # None when the server sent no usable number
    size_vram: Optional[int]  # None on servers older than v0.1.42, which left it out when 0
    expires_at: Optional[float]  # unix seconds; keep_alive -1 gives a year-2318 value
    context_length: Optional[int]  # allocated per-slot context; None before v0.10.0
    details: ModelDetails
    remote: bool = False  # `remote_host`/`remote_model`: never seen in ps so far, refused if it ever is

    @property
    def identity(self) -> tuple[str, Optional[int]]:
        """What changes when the runner is replaced: a new manifest, or a reload with another num_ctx."""
        return (self.digest, self.context_length)

    def pinned(self, now: float) -> bool:
        """keep_alive -1 (or another "forever"): expires_at about 292 years ahead."""
        return self.expires_at is not None and self.expires_at - now > FOREVER_SECONDS

    def stopping(self, now: float) -> bool:
        """expires_at has passed while it is still listed: a request holds it, or it is being unloaded."""
        return self.expires_at is not None and self.expires_at <= now


@dataclass(frozen=True)
class SourceStatus:
    """How the last attempt to read one source went."""

    name: str
    up: bool
    duration_seconds: float
    last_success: Optional[float]  # unix seconds of the last success, None if never
    error: Optional[str] = None  # one of ERROR_REASONS when not up
    message: str = ""


@dataclass(frozen=True)
class GpuProcess:
    """A compute process NVML lists on a GPU (or MIG instance), with what its argv says it serves."""

    pid: int
    gpu: str  # NVML index of the physical GPU
    uuid: str  # of the physical GPU
    used_bytes: Optional[int]
    ref: Optional[str]  # runners.model_ref(argv): "blob:<hex>", "name:<model>", "" (no model); None: unreadable


@dataclass(frozen=True)
class MigInstance:
    gpu_instance: int
    compute_instance: int
    uuid: str
    memory_total: Optional[int] = None
    memory_used: Optional[int] = None
    memory_free: Optional[int] = None


@dataclass(frozen=True)
class GpuDevice:
    """One physical GPU as NVML saw it in one sample; None means the GPU does not support that field."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str
    up: bool  # False: NVML says the GPU is lost (or the sample failed); only identity is kept
    memory_total: Optional[int] = None
    memory_used: Optional[int] = None
    memory_free: Optional[int] = None
    memory_reserved: Optional[int] = None
    utilization: Optional[float] = None  # ratio 0-1
    memory_activity: Optional[float] = None  # ratio 0-1
    temperature: Optional[float] = None  # celsius
    power: Optional[float] = None  # watts
    power_limit: Optional[float] = None  # watts
    energy: Optional[float] = None  # joules since driver load
    clocks: tuple[tuple[str, float], ...] = ()  # (clock, hertz)
    performance_state: Optional[int] = None
    fan_speed: Optional[float] = None  # ratio of max, may exceed 1
    throttle: tuple[tuple[str, bool], ...] = ()  # (reason, active)
    ecc_errors: tuple[tuple[str, int], ...] = ()  # (corrected|uncorrected, volatile count)
    mig: tuple[MigInstance, ...] = ()
    processes: tuple[GpuProcess, ...] = ()


@dataclass(frozen=True)
class GpuState:
    nvml_up: bool  # the library is loaded and initialised
    driver_version: str = ""
    devices: tuple[GpuDevice, ...] = ()
    errors: tuple[str, ...] = ()  # reasons of per-device failures in this sample, for the errors counter


@dataclass(frozen=True)
class ModelGpuMemory:
    """GPU memory the driver attributes to a loaded model's runner on one GPU."""

    model: str
    gpu: str
    uuid: str
    bytes: int


@dataclass(frozen=True)
class HistogramValue:
    """A cumulative histogram: counts[i] observations <= buckets[i]; count and sum over all of them."""

    buckets: tuple[float, ...]
    counts: tuple[int, ...]  # cumulative, one per bucket
    count: int
    sum: float


@dataclass(frozen=True)
class ReloadStatus:
    """How the last configuration reload went (the start counts as a successful load)."""

    ok: bool
    last_success: float  # unix seconds


def frozen_map(data: Mapping) -> Mapping:
    return MappingProxyType(dict(data))


@dataclass(frozen=True)
class Snapshot:
    timestamp: float
    ready: bool  # False only for the placeholder before the first poll finished
    up: bool  # /api/version and /api/ps both answered validly in this poll
    version: Optional[str]  # last known server version (kept while Ollama is down)
    installed: tuple[InstalledModel, ...]  # last good /api/tags (kept, stale, while it fails)
    loaded: tuple[LoadedModel, ...]  # this poll's /api/ps; empty when it failed
    sources: tuple[SourceStatus, ...]
    loads_total: Mapping[str, int] = field(default_factory=lambda: frozen_map({}))
    unloads_total: Mapping[str, int] = field(default_factory=lambda: frozen_map({}))
    keep_alive_downgrades_total: Mapping[str, int] = field(default_factory=lambda: frozen_map({}))
    errors_total: Mapping[tuple[str, str], int] = field(default_factory=lambda: frozen_map({}))
    dropped_total: Mapping[tuple[str, str], int] = field(default_factory=lambda: frozen_map({}))  # (source, reason)
    gpu: Optional[GpuState] = None  # None: GPU source disabled
    model_gpu_memory: tuple[ModelGpuMemory, ...] = ()
    gpu_unattributed: Mapping[str, int] = field(default_factory=lambda: frozen_map({}))
    probes: Optional[Mapping] = None  # model -> prober.ModelProbeStats; None: probes disabled
    reload: Optional[ReloadStatus] = None  # None outside the daemon (--once, the probe command)
    traffic: Optional["TrafficValue"] = None  # counted from Ollama's log; None: logs source off
    runners: Optional["RunnersState"] = None  # this poll's runner slots; None: runners source off

    @classmethod
    def empty(cls, timestamp: float = 0.0) -> "Snapshot":
        return cls(timestamp=timestamp, ready=False, up=False, version=None, installed=(), loaded=(), sources=())

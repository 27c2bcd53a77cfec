"""What the scheduler core is told (events) and what it answers (actions): plain, immutable values.

Every event carries ``now`` (the loop's monotonic clock): the core reads no clock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..config import Config, ConfigDiff

# Why a model was stopped: logs, the unload metric's `cause` label, /status.
StopCause = Literal["swap", "ttl", "admin", "shutdown", "crash", "memory", "lease", "gaming", "reload",
                    "memory_pressure"]
WaiterKind = Literal["request", "load", "lease"]


@dataclass(frozen=True)
class Upstream:
    """Where a loaded model answers: what a grant hands the request path."""

    base_url: str  # e.g. http://127.0.0.1:5800, no trailing slash
    pid: int | None = None
    port: int | None = None


@dataclass(frozen=True)
class MemorySnapshot:
    """One reading of the budgeted memory pool (see gpu.py for the probes that take it)."""

    backend: str  # "nvidia" | "amd" | "host" | "fixed"
    device: str  # human name: "NVIDIA GeForce RTX 3090", "AMD Radeon 8060S", "host RAM"
    pool: str  # which memory total_mb/used_mb describe and the daemon budgets on: "vram" | "gtt" | "ram"
    total_mb: int
    used_mb: int
    vram_total_mb: int | None = None
    vram_used_mb: int | None = None
    gtt_total_mb: int | None = None
    gtt_used_mb: int | None = None
    process_mb: dict[int, int] | None = field(default=None, hash=False)  # pid -> MiB held, where reported

    @property
    def free_mb(self) -> int:
        return max(0, self.total_mb - self.used_mb)


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class RequestArrived:
    request_id: int
    model: str
    now: float
    deadline: float
    kind: WaiterKind = "request"
    local_only: bool = False  # X-Local-Only: never the cloud
    force: bool = False  # X-Force-Big: may load in gaming mode


@dataclass(frozen=True)
class RequestCancelled:
    """A waiting request's client went away before it was granted."""

    request_id: int
    now: float


@dataclass(frozen=True)
class RequestFinished:
    """A granted request is done (answered, failed, or its client went away)."""

    request_id: int
    now: float


@dataclass(frozen=True)
class LoadSucceeded:
    model: str
    instance: int
    upstream: Upstream
    load_s: float
    now: float


@dataclass(frozen=True)
class LoadFailed:
    model: str
    instance: int
    error: str
    now: float


@dataclass(frozen=True)
class ProcessExited:
    """A ready child exited without being asked to."""

    model: str
    instance: int
    error: str
    now: float


@dataclass(frozen=True)
class StopCompleted:
    model: str
    instance: int
    now: float


@dataclass(frozen=True)
class UnloadRequested:
    """Unload one model (or all with model=None). force: stop even with requests in flight."""

    model: str | None
    now: float
    force: bool = False
    cause: StopCause = "admin"


@dataclass(frozen=True)
class DropWaiters:
    """Answer every waiting request with 503 (stop-all, shutdown)."""

    reason: str
    now: float


@dataclass(frozen=True)
class LeaseRequested:
    """Memory for a job that is not a model (TTS, image generation). Waits in the queue like a request."""

    lease_id: int
    owner: str
    mb: int
    priority: int
    pid: int | None
    ttl_s: float
    now: float
    deadline: float


@dataclass(frozen=True)
class LeaseRenewed:
    lease_id: int
    now: float


@dataclass(frozen=True)
class LeaseReleased:
    lease_id: int
    now: float
    reason: Literal["released", "expired", "holder_died"] = "released"


@dataclass(frozen=True)
class MemoryMeasured:
    """A probe reading of the budgeted pool."""

    snapshot: MemorySnapshot
    now: float


@dataclass(frozen=True)
class NeedLearned:
    """What a model was measured to hold once loaded; used for its next placement."""

    model: str
    mb: int
    now: float


@dataclass(frozen=True)
class GamingChanged:
    enabled: bool
    now: float


@dataclass(frozen=True)
class ConfigReloaded:
    """A new, valid config. needs_mb: the memory need of models that are new or whose file or args changed;
    diff: what changed, computed once (config.diff_configs) for the core and the reload's answer alike."""

    config: Config
    diff: ConfigDiff
    needs_mb: dict[str, int]
    now: float


@dataclass(frozen=True)
class PreloadWanted:
    """A model is expected soon (predicted from its usual first use): load it by the home rules until `until`."""

    model: str
    until: float
    now: float


@dataclass(frozen=True)
class Tick:
    now: float


Event = (
    RequestArrived
    | RequestCancelled
    | RequestFinished
    | LoadSucceeded
    | LoadFailed
    | ProcessExited
    | StopCompleted
    | UnloadRequested
    | DropWaiters
    | LeaseRequested
    | LeaseRenewed
    | LeaseReleased
    | MemoryMeasured
    | NeedLearned
    | GamingChanged
    | ConfigReloaded
    | PreloadWanted
    | Tick
)


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class StartProcess:
    model: str
    instance: int
    # Models stopped to make room for this one, and since when it waited for them (for the swap log line).
    displaced: tuple[str, ...] = ()
    swap_started: float | None = None
    cause: str = "request"  # "request", or "admin" for an explicit load


@dataclass(frozen=True)
class StopProcess:
    model: str
    instance: int
    cause: StopCause
    detail: str = ""  # for a person: e.g. how much other programs held when it yielded to them


@dataclass(frozen=True)
class Grant:
    request_id: int
    model: str
    upstream: Upstream


@dataclass(frozen=True)
class Reject:
    request_id: int
    model: str
    status: int
    code: str
    message: str
    retry_after_s: int


@dataclass(frozen=True)
class Prewarm:
    """Read the model's file ahead into the page cache: it loads next, once what is in its way is gone."""

    model: str


@dataclass(frozen=True)
class Fallback:
    """Send this request to a cloud target instead; reason says why the local model could not serve it."""

    request_id: int
    model: str
    target: str
    reason: str


@dataclass(frozen=True)
class GrantLease:
    lease_id: int
    mb: int
    expires_at: float


@dataclass(frozen=True)
class LeaseEnded:
    lease_id: int
    owner: str
    reason: str


Action = StartProcess | StopProcess | Grant | Reject | Fallback | Prewarm | GrantLease | LeaseEnded

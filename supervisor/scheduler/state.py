"""What the core knows: per model, per waiting request or lease, per granted lease. Mutated only by the core."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..config import GroupConfig, ModelConfig
from .events import LeaseRequested, StopCause, Upstream, WaiterKind


class Phase(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


RESIDENT = (Phase.LOADING, Phase.READY, Phase.UNLOADING)
ORPHANED = -1  # the instance of a request whose child crashed under it


@dataclass
class ModelState:
    name: str
    config: ModelConfig
    group: GroupConfig
    phase: Phase = Phase.UNLOADED
    instance: int = 0  # bumped per start; events from an older instance are stale and ignored
    upstream: Upstream | None = None  # while ready: where its child answers
    in_flight: int = 0
    last_used: float = 0.0
    load_started: float | None = None
    last_load_s: float | None = None
    last_error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    unload_requested: bool = False
    unload_cause: StopCause = "admin"
    retiring: bool = False  # removed from the config: goes once it drains
    displaced: tuple[str, ...] = ()
    swap_started: float | None = None
    need_mb: int = 0  # what it holds once loaded: config vram_mb, else estimate, else learned
    ready_since: float = 0.0
    prewarmed: bool = False  # asked for a read-ahead while waiting for this start
    last_stop: tuple[StopCause, str] | None = None  # why it was last stopped (cause, detail), for /status

    @property
    def pid(self) -> int | None:
        return self.upstream.pid if self.upstream is not None else None

    @property
    def port(self) -> int | None:
        return self.upstream.port if self.upstream is not None else None


@dataclass
class Waiter:
    request_id: int
    model: str  # "" for a lease
    arrived: float
    deadline: float
    kind: WaiterKind
    seq: int
    priority: int
    lease: LeaseRequested | None = None
    fallback_at: float | None = None  # when it goes to the cloud if still waiting; None: never
    force: bool = False
    detached: bool = False  # answered from the cloud; stays only to keep its claim on the model


@dataclass
class Lease:
    lease_id: int
    owner: str
    mb: int
    priority: int
    pid: int | None
    ttl_s: float
    granted_at: float
    expires_at: float

"""What the runtime tells its observers (metrics, the systemd status line, logs in tests): typed, so a
misspelt kind is an import error rather than a silently dropped metric."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Notice:
    kind: ClassVar[str] = "notice"

    def fields(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoadStarting(Notice):
    kind: ClassVar[str] = "starting"
    model: str
    cause: str  # "request" | "admin"


@dataclass(frozen=True)
class LoadReady(Notice):
    kind: ClassVar[str] = "spawned"
    model: str
    pid: int | None
    port: int | None
    load_s: float
    displaced: tuple[str, ...] = ()  # models stopped to make room for it
    swap_s: float | None = None  # with displaced: from the decision to make room to ready


@dataclass(frozen=True)
class LoadFailedNotice(Notice):
    kind: ClassVar[str] = "load_failed"
    model: str
    error: str


@dataclass(frozen=True)
class ChildStopped(Notice):
    """A child the daemon stopped (or whose load it cancelled) has exited."""

    kind: ClassVar[str] = "stopped"
    model: str
    cause: str
    pid: int | None
    seconds: float = 0.0  # how long the stop (saving its slots included) took


@dataclass(frozen=True)
class ChildExited(Notice):
    """A ready child exited without being asked to."""

    kind: ClassVar[str] = "exited"
    model: str
    code: int | None
    cause: str = "crash"


@dataclass(frozen=True)
class FellBack(Notice):
    kind: ClassVar[str] = "fallback"
    model: str
    target: str
    reason: str


@dataclass(frozen=True)
class RequestRefused(Notice):
    kind: ClassVar[str] = "rejected"
    model: str
    code: str


@dataclass(frozen=True)
class LeaseGranted(Notice):
    kind: ClassVar[str] = "lease_granted"
    lease: int
    mb: int


@dataclass(frozen=True)
class LeaseFinished(Notice):
    kind: ClassVar[str] = "lease_ended"
    lease: int
    reason: str


@dataclass(frozen=True)
class GamingSet(Notice):
    kind: ClassVar[str] = "gaming"
    enabled: bool
    source: str


@dataclass(frozen=True)
class Prewarmed(Notice):
    kind: ClassVar[str] = "prewarm"
    model: str
    bytes: int


@dataclass(frozen=True)
class Reloaded(Notice):
    kind: ClassVar[str] = "reloaded"
    summary: dict[str, list[str]]


@dataclass(frozen=True)
class PromptCacheSaved(Notice):
    """A model's slots were saved before a stop."""

    kind: ClassVar[str] = "prompt_cache_saved"
    model: str
    slots: int
    tokens: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class PromptCacheRestored(Notice):
    """A model's saved slots were restored after a load, before it was reported ready."""

    kind: ClassVar[str] = "prompt_cache_restored"
    model: str
    slots: int
    tokens: int
    bytes: int
    seconds: float

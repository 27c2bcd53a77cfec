"""The pure scheduler: events in, actions out; no I/O and no clock.

events     what the core is told and what it answers
state      what it knows per model, waiter and lease
core       SchedulerCore.handle(event) -> [actions]: the queue walk
placement  group rules and memory budget: what must go for a load or a lease
resting    come home, yield to other programs' memory
reload     a new config
policy     rank, restart backoff, fallback, gaming, TTL
views      available now, ETA, route: what /status shows
"""

from .core import SchedulerCore
from .events import (
    Action, ConfigReloaded, DropWaiters, Event, Fallback, GamingChanged, Grant, GrantLease, LeaseEnded,
    LeaseReleased, LeaseRenewed, LeaseRequested, LoadFailed, LoadSucceeded, MemoryMeasured, MemorySnapshot,
    NeedLearned, PreloadWanted, Prewarm, ProcessExited, Reject, RequestArrived, RequestCancelled, RequestFinished, StartProcess,
    StopCause, StopCompleted, StopProcess, Tick, UnloadRequested, Upstream, WaiterKind,
)  # fmt: skip
from .placement import Budget, Candidate, choose_victims, eviction_order, foreign_usage
from .policy import restart_delay
from .state import ORPHANED, RESIDENT, Lease, ModelState, Phase, Waiter
from .views import ModelView, Route, available_now, eta_ms, model_views, probe, queued_requests, route

__all__ = [
    "Action", "Budget", "Candidate", "ConfigReloaded", "DropWaiters", "Event", "Fallback", "GamingChanged", "Grant",
    "GrantLease", "Lease", "LeaseEnded", "LeaseReleased", "LeaseRenewed", "LeaseRequested", "LoadFailed",
    "LoadSucceeded", "MemoryMeasured", "MemorySnapshot", "ModelState", "ModelView", "NeedLearned", "ORPHANED", "PreloadWanted",
    "Phase", "Prewarm", "ProcessExited", "RESIDENT", "Reject", "RequestArrived", "RequestCancelled",
    "RequestFinished", "Route", "SchedulerCore", "StartProcess", "StopCause", "StopCompleted", "StopProcess", "Tick",
    "UnloadRequested", "Upstream", "Waiter", "WaiterKind", "available_now", "choose_victims", "eta_ms",
    "eviction_order", "foreign_usage", "model_views", "probe", "queued_requests", "restart_delay", "route",
]  # fmt: skip

"""What runs, what loads and who waits: the pure decision core.

``SchedulerCore.handle(event) -> [actions]`` is the only way model state changes. It does no I/O and reads no
clock (every event carries ``now``), so it is tested with plain values. The driver (``driver.py``) feeds it
events from HTTP handlers and process effects, and carries out the actions it returns.

Rules (see docs/architecture.md):
- A waiting request is served in rank order: model priority first, then arrival.
- Requests for a loading model join that load; one load per model at a time.
- Loading a model first stops the models it displaces (its swap group; other non-persistent groups when its group
  is exclusive). A model with requests in flight is never stopped: new requests for it wait while it drains.
- A waiting request gives up at its deadline with 503; a failed load answers its waiters at once with the cause.
- An idle model unloads ``ttl_s`` after its last request finished; 0 means never.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

from tenacity import wait_exponential

from .config import Config, GroupConfig, ModelConfig


class Phase(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


RESIDENT = (Phase.LOADING, Phase.READY, Phase.UNLOADING)

# Why a model was stopped; used in logs and (later) metrics.
StopCause = Literal["swap", "ttl", "admin", "shutdown", "crash"]
WaiterKind = Literal["request", "load"]


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class RequestArrived:
    request_id: int
    model: str
    now: float
    deadline: float
    kind: WaiterKind = "request"


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
    port: int
    pid: int
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


@dataclass(frozen=True)
class StopProcess:
    model: str
    instance: int
    cause: StopCause


@dataclass(frozen=True)
class Grant:
    request_id: int
    model: str
    port: int


@dataclass(frozen=True)
class Reject:
    request_id: int
    model: str
    status: int
    code: str
    message: str
    retry_after_s: int


Action = StartProcess | StopProcess | Grant | Reject


# ---------------------------------------------------------------- state


@dataclass
class ModelState:
    name: str
    config: ModelConfig
    group: GroupConfig
    phase: Phase = Phase.UNLOADED
    instance: int = 0  # bumped per start; events from an older instance are stale and ignored
    port: int | None = None
    pid: int | None = None
    in_flight: int = 0
    last_used: float = 0.0
    load_started: float | None = None
    last_load_s: float | None = None
    last_error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    unload_requested: bool = False
    displaced: tuple[str, ...] = ()
    swap_started: float | None = None


@dataclass
class Waiter:
    request_id: int
    model: str
    arrived: float
    deadline: float
    kind: WaiterKind
    seq: int


@dataclass
class ModelView:
    """What /status shows of one model."""

    name: str
    state: str
    group: str
    pid: int | None
    port: int | None
    in_flight: int
    queued: int
    ttl_s: float
    ttl_remaining_s: float | None
    last_load_ms: int | None
    available_now: bool
    last_error: str | None
    aliases: list[str] = field(default_factory=list)


# Backoff before a failed model is started again: 0.5 s, 1 s, 2 s ... capped at 30 s.
RESTART_BACKOFF = wait_exponential(multiplier=0.5, max=30)


def restart_delay(failures: int) -> float:
    return float(RESTART_BACKOFF(SimpleNamespace(attempt_number=max(1, failures))))


class SchedulerCore:
    def __init__(self, config: Config):
        self.queue_timeout_s = config.daemon.queue_timeout_s
        self.models: dict[str, ModelState] = {
            name: ModelState(name=name, config=model, group=config.group_of(name))
            for name, model in config.models.items()
        }
        self.waiters: dict[int, Waiter] = {}
        self.granted: dict[int, str] = {}  # request id -> model, while in flight
        self._seq = 0

    # ------------------------------------------------------------ the one entry point

    def handle(self, event: Event) -> list[Action]:
        actions: list[Action] = []
        match event:
            case RequestArrived():
                self._seq += 1
                self.waiters[event.request_id] = Waiter(
                    event.request_id, event.model, event.now, event.deadline, event.kind, self._seq
                )
            case RequestCancelled():
                self.waiters.pop(event.request_id, None)
            case RequestFinished():
                model = self.granted.pop(event.request_id, None)
                if model is not None:
                    state = self.models[model]
                    state.in_flight -= 1
                    state.last_used = event.now
            case LoadSucceeded():
                state = self._current(event.model, event.instance)
                if state is not None and state.phase is Phase.LOADING:
                    state.phase = Phase.READY
                    state.port, state.pid = event.port, event.pid
                    state.last_load_s = event.load_s
                    state.last_used = event.now
                    state.failures = 0
                    state.last_error = None
            case LoadFailed() | ProcessExited():
                state = self._current(event.model, event.instance)
                if state is not None and state.phase in (Phase.LOADING, Phase.READY):
                    actions += self._fail(state, event.error, event.now, during_load=isinstance(event, LoadFailed))
            case StopCompleted():
                state = self._current(event.model, event.instance)
                if state is not None and state.phase is not Phase.FAILED:
                    state.phase = Phase.UNLOADED
                    state.port = state.pid = None
                    state.unload_requested = False
            case UnloadRequested():
                actions += self._unload(event)
            case DropWaiters():
                for waiter in list(self.waiters.values()):
                    actions.append(self._reject(waiter, 503, "service_unavailable", event.reason, retry_after_s=5))
            case Tick():
                pass
        actions += self._schedule(event.now)
        return actions

    # ------------------------------------------------------------ queries

    def next_wakeup(self) -> float | None:
        """The earliest time at which a Tick could change something (a deadline, a TTL, a retry)."""
        times = [w.deadline for w in self.waiters.values()]
        wanted = {w.model for w in self.waiters.values()}
        for state in self.models.values():
            expiry = self._ttl_expiry(state)
            if expiry is not None:
                times.append(expiry)
            if state.phase is Phase.FAILED and state.name in wanted:
                times.append(state.retry_at)
        return min(times, default=None)

    def available_now(self, model: str) -> bool:
        """Would a request for this model arriving now be granted at once?"""
        state = self.models[model]
        if state.phase is not Phase.READY or state.unload_requested:
            return False
        claimed: list[str] = []
        for waiter in self._ranked():
            if self._blocked(waiter.model, claimed) is None and waiter.model not in claimed:
                claimed.append(waiter.model)
        return self._blocked(model, claimed) is None

    def views(self, now: float) -> list[ModelView]:
        queued: dict[str, int] = {}
        for waiter in self.waiters.values():
            if waiter.kind == "request":
                queued[waiter.model] = queued.get(waiter.model, 0) + 1
        views = []
        for state in self.models.values():
            expiry = self._ttl_expiry(state)
            views.append(
                ModelView(
                    name=state.name,
                    state=state.phase.value,
                    group=state.config.group,
                    pid=state.pid,
                    port=state.port,
                    in_flight=state.in_flight,
                    queued=queued.get(state.name, 0),
                    ttl_s=state.config.ttl_s,
                    ttl_remaining_s=None if expiry is None else round(max(0.0, expiry - now), 3),
                    last_load_ms=None if state.last_load_s is None else round(state.last_load_s * 1000),
                    available_now=self.available_now(state.name),
                    last_error=state.last_error,
                    aliases=list(state.config.aliases),
                )
            )
        return views

    # ------------------------------------------------------------ decisions

    def _schedule(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for waiter in list(self.waiters.values()):
            if waiter.deadline <= now:
                state = self.models[waiter.model]
                message = (
                    f"model {waiter.model!r} was not ready within {self.queue_timeout_s:g} s "
                    f"(it is {state.phase.value}); retry shortly"
                )
                actions.append(self._reject(waiter, 503, "queue_timeout", message, self._retry_after(state)))

        # Walk the queue in rank order. `claimed` holds the models that higher-ranked waiters want resident:
        # a lower-ranked waiter may not displace them.
        claimed: list[str] = []
        for waiter in self._ranked():
            state = self.models[waiter.model]
            if self._blocked(waiter.model, claimed) is not None:
                continue
            if waiter.model not in claimed:
                claimed.append(waiter.model)
            if state.unload_requested:
                continue  # reloaded once the requested unload completes
            if state.phase is Phase.READY:
                actions.append(self._grant(waiter, state))
            elif state.phase is Phase.FAILED and now < state.retry_at:
                if waiter.deadline <= state.retry_at:
                    # It would time out before the next attempt: tell the client why now, not in 30 s.
                    message = f"model {state.name!r} failed: {state.last_error}; next start in {state.retry_at - now:.1f} s"
                    actions.append(self._reject(waiter, 503, "model_failed", message, self._retry_after(state)))
            elif state.phase in (Phase.UNLOADED, Phase.FAILED):
                actions += self._make_room_and_start(state, now)

        actions += self._expire_idle(now)
        return actions

    def _make_room_and_start(self, state: ModelState, now: float) -> list[Action]:
        actions: list[Action] = []
        displaced = [other for other in self._resident() if self._displaces(state, other)]
        waiting_on = False
        for other in displaced:
            if other.phase is Phase.UNLOADING:
                waiting_on = True
            elif other.in_flight > 0:
                waiting_on = True  # drains first: no new grants, see _blocked
            else:
                # Idle (or still loading for nobody): stop it now.
                actions.append(self._stop(other, "swap"))
                waiting_on = True
        if waiting_on:
            state.displaced = tuple(sorted({*state.displaced, *(o.name for o in displaced)}))
            if state.swap_started is None:
                state.swap_started = now
            return actions
        state.phase = Phase.LOADING
        state.instance += 1
        state.load_started = now
        actions.append(StartProcess(state.name, state.instance, state.displaced, state.swap_started))
        state.displaced, state.swap_started = (), None
        return actions

    def _blocked(self, model: str, claimed: list[str]) -> str | None:
        """The claimed model that keeps `model` from being served now, if any."""
        state = self.models[model]
        for name in claimed:
            if name == model:
                continue
            other = self.models[name]
            if state.phase is Phase.READY and not state.unload_requested:
                # Already resident: only a claimed model that still has to load (and would displace this one)
                # stands in the way. That is what makes a busy model drain before a swap.
                if other.phase is not Phase.READY and self._displaces(other, state):
                    return name
            else:
                if self._displaces(state, other):
                    return name
                if other.phase is not Phase.READY and self._displaces(other, state):
                    return name
        return None

    def _displaces(self, loading: ModelState, other: ModelState) -> bool:
        """Must `other` be stopped before `loading` may load? (the group rules of API.md)"""
        if loading.name == other.name:
            return False
        if loading.config.group == other.config.group:
            return loading.group.swap
        return loading.group.exclusive and not other.group.persistent

    def _expire_idle(self, now: float) -> list[Action]:
        wanted = {w.model for w in self.waiters.values()}
        actions: list[Action] = []
        for state in self.models.values():
            if state.phase is not Phase.READY or state.in_flight:
                continue
            if state.unload_requested:
                actions.append(self._stop(state, "admin"))
            elif state.name not in wanted and now >= (self._ttl_expiry(state) or float("inf")):
                actions.append(self._stop(state, "ttl"))
        return actions

    def _unload(self, event: UnloadRequested) -> list[Action]:
        targets = list(self.models.values()) if event.model is None else [self.models[event.model]]
        actions: list[Action] = []
        for state in targets:
            if state.phase is Phase.FAILED:
                state.phase, state.failures, state.retry_at = Phase.UNLOADED, 0, 0.0
            elif state.phase is Phase.LOADING or (state.phase is Phase.READY and (event.force or not state.in_flight)):
                actions.append(self._stop(state, event.cause))
            elif state.phase is Phase.READY:
                state.unload_requested = True  # stopped by _expire_idle once it drains
        return actions

    def _fail(self, state: ModelState, error: str, now: float, during_load: bool) -> list[Action]:
        state.phase = Phase.FAILED
        state.port = state.pid = None
        state.failures += 1
        state.retry_at = now + restart_delay(state.failures)
        state.last_error = error
        state.unload_requested = False
        if not during_load:
            return []  # a crash: requests wait for (and trigger) the restart
        # Whoever waited for this load gets the cause now rather than a timeout later.
        message = f"model {state.name!r} failed to load: {error}"
        return [
            self._reject(w, 503, "model_load_failed", message, self._retry_after(state))
            for w in list(self.waiters.values())
            if w.model == state.name
        ]

    # ------------------------------------------------------------ helpers

    def _ranked(self) -> list[Waiter]:
        return sorted(self.waiters.values(), key=lambda w: (-self.models[w.model].config.priority, w.seq))

    def _resident(self) -> list[ModelState]:
        return [s for s in self.models.values() if s.phase in RESIDENT]

    def _current(self, model: str, instance: int) -> ModelState | None:
        state = self.models.get(model)
        return state if state is not None and state.instance == instance else None

    def _ttl_expiry(self, state: ModelState) -> float | None:
        if state.phase is not Phase.READY or state.in_flight or not state.config.ttl_s:
            return None
        return state.last_used + state.config.ttl_s

    def _retry_after(self, state: ModelState) -> int:
        # Short: a router should fail over or come back soon, not park the request for minutes.
        expected = state.last_load_s or 1.0
        return max(1, min(10, round(expected + 0.5)))

    def _grant(self, waiter: Waiter, state: ModelState) -> Grant:
        del self.waiters[waiter.request_id]
        self.granted[waiter.request_id] = state.name
        state.in_flight += 1
        assert state.port is not None
        return Grant(waiter.request_id, state.name, state.port)

    def _reject(self, waiter: Waiter, status: int, code: str, message: str, retry_after_s: int) -> Reject:
        self.waiters.pop(waiter.request_id, None)
        return Reject(waiter.request_id, waiter.model, status, code, message, retry_after_s)

    def _stop(self, state: ModelState, cause: StopCause) -> StopProcess:
        state.phase = Phase.UNLOADING
        return StopProcess(state.name, state.instance, cause)

"""What runs, what loads and who waits: the pure decision core.

``SchedulerCore.handle(event) -> [actions]`` is the only way model state changes. It does no I/O and reads no
clock (every event carries ``now``), so it is tested with plain values. The runtime (``runtime.py``) feeds it
events from HTTP handlers and effects, and carries out the actions it returns. What /status shows is derived in
``views.py``; ranking, backoff and the small rules in ``policy.py``; group and memory placement in
``placement.py``.

Rules (see docs/architecture.md):
- A waiting request is served in rank order: model priority first, then arrival. With batching on, requests for a
  model that is already loaded go before those that would swap it out, until one of those has waited
  ``max_batch_wait_s``; a loaded model stays at least ``min_residency_s`` before a swap may take it.
- Requests for a loading model join that load; one load per model at a time.
- Loading a model first stops the models it displaces (its swap group; other non-persistent groups when its group
  is exclusive). A model with requests in flight is never stopped: new requests for it wait while it drains.
- A waiting request gives up at its deadline with 503; a failed load answers its waiters at once with the cause.
- An idle model unloads ``ttl_s`` after its last request finished; 0 means never.
- Memory: a load or a lease is placed only if it fits the budget (total - reserve - foreign) next to what is
  resident and leased; otherwise models are stopped to make room (placement.eviction_order), never one with requests
  in flight (it drains first), never a persistent group's member for another group. A lease displaces only models
  of lower priority than its own. Leases wait in the same ranked queue as requests.
- Cloud fallback: a request whose model has a ``fallback`` (and is not local-only, nor asked to stay local) waits
  ``fallback_after_ms`` for it, then goes to the cloud. Its place in the queue stays behind, detached, so the
  load or swap it started goes on and the next request finds the model ready.
- Gaming mode: models not ``allow_in_gaming`` drain and stop, and are not loaded again; their requests go to the
  cloud or get 503, unless they force it (X-Force-Big).
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from .events import (
    MemorySnapshot,
    PreloadWanted,
    Action, ConfigReloaded, DropWaiters, Event, Fallback, GamingChanged, Grant, GrantLease, LeaseEnded,
    LeaseReleased, LeaseRenewed, LeaseRequested, LoadFailed, LoadSucceeded, MemoryMeasured, NeedLearned,
    ProcessExited, Reject, RequestArrived, RequestCancelled, RequestFinished, StartProcess, StopCause,
    StopCompleted, StopProcess, Tick, UnloadRequested,
)  # fmt: skip
from .placement import Budget, foreign_usage, group_blocked, place
from .reload import apply_reload
from .resting import come_home, home_models, yield_to_others
from .policy import (
    fallback_reason, goes_first_in_batch, kept_out_by_gaming, may_fall_back, rank, restart_delay, retry_after_s,
    ttl_expiry,
)  # fmt: skip
from .state import ORPHANED, RESIDENT, Lease, ModelState, Phase, Waiter

# A request is answered 503 before its wait is up when its model's load, going by the last one, would take this
# many times what is left of the wait (a margin for loads that come out faster than the last one).
EARLY_ANSWER_FACTOR = 1.5

Rank = tuple[Any, ...]


class SchedulerCore:
    def __init__(self, config: Config, needs_mb: dict[str, int] | None = None):
        self.config = config  # as the last ConfigReloaded gave it; settings are read from here, never copied
        self._homes: tuple[Config, int, list[str]] | None = None  # resting.home_models' answer, for this config
        self.models: dict[str, ModelState] = {
            name: ModelState(name=name, config=model, group=config.group_of(name), need_mb=(needs_mb or {}).get(name, 0))
            for name, model in config.models.items()
        }
        self.waiters: dict[int, Waiter] = {}
        self.granted: dict[int, tuple[str, int]] = {}  # request id -> (model, instance), while in flight
        self.leases: dict[int, Lease] = {}
        self.memory: MemorySnapshot | None = None  # the last probe reading
        self.budget: Budget | None = None  # None until the first measurement: nothing is limited by memory
        # Models a queued placement needs gone (they drain), with the rank of the waiter that needs it: a request
        # ranked before that waiter may still be served.
        self.doomed: dict[str, Rank] = {}
        self.short_of_memory: set[str] = set()  # models whose placement waits for memory
        self._now = float("-inf")  # the latest event's time: what is due by then has been acted on
        self._last_yield = float("-inf")  # when models were last unloaded for other programs' memory
        self._home_suspended: set[str] = set()  # homes an administrator unloaded: not reloaded until a request
        self._predicted: dict[str, float] = {}  # models expected soon (predicted preload) -> until when
        self._closing = False
        self.gaming = False
        self._seq = 0

    # ------------------------------------------------------------ the one entry point

    def handle(self, event: Event) -> list[Action]:
        self._now = max(self._now, event.now)
        actions: list[Action] = []
        match event:
            case RequestArrived() if event.model not in self.models or self.models[event.model].retiring:
                # Resolved just before a reload removed it.
                actions.append(Reject(event.request_id, event.model, 503, "model_removed",
                                      f"model {event.model!r} was removed from the config", 1))
            case RequestArrived():
                if event.kind == "request":
                    self._home_suspended.clear()  # someone wants models again: homes may come back when idle
                state = self.models[event.model]
                fallback_at = None
                if event.kind == "request" and may_fall_back(state.config, event.local_only):
                    fallback_at = event.now + state.config.fallback_after_ms / 1000
                self._enqueue(Waiter(event.request_id, event.model, event.now, event.deadline, event.kind, 0,
                                     state.config.priority, fallback_at=fallback_at, force=event.force))
            case LeaseRequested():
                self._enqueue(Waiter(event.lease_id, "", event.now, event.deadline, "lease", 0, event.priority, event))
            case RequestCancelled():
                self.waiters.pop(event.request_id, None)
            case RequestFinished():
                granted = self.granted.pop(event.request_id, None)
                state = self.models.get(granted[0]) if granted is not None else None
                if granted is not None and state is not None:
                    if granted[1] == state.instance:
                        state.in_flight -= 1  # (requests of a crashed instance were written off at the crash)
                    state.last_used = event.now
            case LoadSucceeded():
                state = self._current(event.model, event.instance)
                if state is not None and state.phase is Phase.LOADING:
                    state.phase = Phase.READY
                    state.upstream = event.upstream
                    state.last_load_s = event.load_s
                    state.last_used = state.ready_since = event.now
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
                    state.upstream = None
                    state.unload_requested = False
                    self._write_off_requests(state)  # only a forced stop leaves any
                    if state.retiring:
                        del self.models[state.name]
            case UnloadRequested():
                # An explicit unload is not undone by a home load; a shutdown never is.
                if event.cause == "shutdown":
                    self._closing = True
                elif event.cause == "admin":
                    self._home_suspended.update(self.models if event.model is None else [event.model])
                actions += self._unload(event)
            case DropWaiters():
                for waiter in list(self.waiters.values()):
                    if waiter.detached:  # answered already; only its place goes
                        del self.waiters[waiter.request_id]
                    else:
                        actions.append(self._reject(waiter, 503, "service_unavailable", event.reason, retry_after_s=5))
            case LeaseRenewed():
                lease = self.leases.get(event.lease_id)
                if lease is not None:
                    lease.expires_at = event.now + lease.ttl_s
            case LeaseReleased():
                lease = self.leases.pop(event.lease_id, None)
                if lease is not None:
                    actions.append(LeaseEnded(lease.lease_id, lease.owner, event.reason))
                elif event.lease_id in self.waiters:  # withdrawn while queued
                    del self.waiters[event.lease_id]
            case MemoryMeasured():
                self.memory = event.snapshot
                self.budget = self._measure(event.snapshot)
            case NeedLearned() if event.model in self.models:
                self.models[event.model].need_mb = event.mb
            case GamingChanged():
                self.gaming = event.enabled
            case ConfigReloaded():
                actions += apply_reload(self, event)
            case PreloadWanted() if event.model in self.models:
                self._predicted[event.model] = event.until
            case Tick():
                pass
        actions += self._schedule(event.now)
        return actions

    # ------------------------------------------------------------ queries

    def next_wakeup(self) -> float | None:
        """The earliest time after the last event at which a Tick could change something (a deadline, a TTL, a
        retry, a lease expiry). What fell due by the last event has been acted on; one still pending (an overdue
        waiter, a retry held back by its group) waits for another event, so it is never a wakeup again: a past
        time would fire the timer at once, forever."""
        times = [w.deadline for w in self.waiters.values()]
        times += [w.fallback_at for w in self.waiters.values() if w.fallback_at is not None and not w.detached]
        times += [lease.expires_at for lease in self.leases.values()]
        scheduler = self.config.scheduler
        if scheduler.batching:  # when a waiter becomes overdue, the ranking changes
            times += [w.arrived + scheduler.max_batch_wait_s for w in self.waiters.values()
                      if w.kind == "request" and self.models[w.model].phase is not Phase.READY]
        if scheduler.min_residency_s:
            times += [s.ready_since + scheduler.min_residency_s for s in self.models.values()
                      if s.phase is Phase.READY and s.name in self.doomed]
        for waiter in self.waiters.values():  # when a load will clearly outlast a request's wait
            at = self._early_answer_at(waiter)
            if at is not None:
                times.append(at + 1e-6)  # strictly after: the answer is due once the time has passed
        wanted = {w.model for w in self.waiters.values()}
        homes = home_models(self)
        for state in self.models.values():
            expiry = ttl_expiry(state)
            if expiry is not None and state.name not in homes:
                times.append(expiry)
            if state.phase is Phase.FAILED and (state.name in wanted or (not self.waiters and state.name in homes)):
                times.append(state.retry_at)
        return min((t for t in times if t > self._now), default=None)

    def committed_mb(self) -> tuple[int, int]:
        """(held by resident models, held by granted leases)."""
        models = sum(s.need_mb for s in self.models.values() if s.phase in RESIDENT)
        return models, sum(lease.mb for lease in self.leases.values())

    def free_mb(self) -> int | None:
        if self.budget is None:
            return None
        return self.budget.usable_mb - sum(self.committed_mb())

    # ------------------------------------------------------------ decisions

    def _schedule(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for lease in list(self.leases.values()):
            if lease.expires_at <= now:
                del self.leases[lease.lease_id]
                actions.append(LeaseEnded(lease.lease_id, lease.owner, "expired"))
        # Walk the queue in rank order. `claimed`: models that higher-ranked waiters want resident (a lower-ranked
        # waiter may not displace them). `doomed`: models a higher-ranked placement needs gone (they drain: no new
        # requests). Once a placement waits for memory, lower-ranked ones may not take memory before it.
        claimed: list[str] = []
        doomed: dict[str, Rank] = {}
        self.short_of_memory = set()
        memory_blocked = False
        for waiter in self._ranked(now):
            if waiter.request_id not in self.waiters:
                continue  # removed earlier in this walk (a detached place whose load just started)
            if waiter.kind == "lease":
                if memory_blocked:
                    continue
                placement = place(self, None, waiter, claimed, doomed, now)
                actions += placement.actions
                memory_blocked = placement.outcome == "wait"
                continue
            state = self.models[waiter.model]
            if waiter.detached and state.phase in (Phase.LOADING, Phase.READY):
                del self.waiters[waiter.request_id]  # what it kept its place for happened meanwhile
                continue
            servable = state.phase is Phase.READY and not state.unload_requested and waiter.model not in doomed
            if servable and not kept_out_by_gaming(self.gaming, state.config, waiter.force):
                if waiter.model not in claimed:
                    claimed.append(waiter.model)
                actions.append(self._grant(waiter, state))
                continue
            if waiter.fallback_at is not None and not waiter.detached and now >= waiter.fallback_at:
                actions.append(self._fall_back(waiter, state, doomed))
            # A place kept after a cloud answer forces nothing: X-Force-Big was for the request itself.
            if kept_out_by_gaming(self.gaming, state.config, waiter.force and not waiter.detached):
                message = (f"model {state.name!r} is not allowed in gaming mode (allow_in_gaming = false); "
                           "send X-Force-Big: true to load it anyway")  # fmt: skip
                actions += self._give_up(waiter, 503, "gaming_mode", message, retry_after_s=30)
                continue
            if state.phase is Phase.READY and not state.unload_requested:
                continue  # draining for a placement ranked above it
            if group_blocked(self, state, claimed):
                continue
            if waiter.model not in claimed:
                claimed.append(waiter.model)
            if state.unload_requested or state.phase in (Phase.LOADING, Phase.UNLOADING):
                continue  # joins the load, or is started again once the stop completes
            if state.phase is Phase.FAILED and now < state.retry_at:
                if waiter.deadline <= state.retry_at:
                    # It would time out before the next attempt: tell the client why now, not in 30 s.
                    message = f"model {state.name!r} failed: {state.last_error}; next start in {state.retry_at - now:.1f} s"
                    actions += self._give_up(waiter, 503, "model_failed", message, retry_after_s(state, now))
                continue
            if memory_blocked:
                self.short_of_memory.add(state.name)
                continue
            placement = place(self, state, waiter, claimed, doomed, now)
            actions += placement.actions
            memory_blocked = placement.outcome == "wait"
            if memory_blocked:
                self.short_of_memory.add(state.name)

        self.doomed = doomed
        # After the walk, so a waiter whose bound is now (X-Max-Wait-Ms: 0) is served if it can be, and what it
        # started (a load, a swap) is under way before it is answered.
        for waiter in list(self.waiters.values()):
            if waiter.request_id not in self.waiters:
                continue
            if waiter.deadline <= now:
                actions += self._timed_out(waiter, now)
            elif self._loads_past_deadline(waiter, now):
                actions += self._timed_out(waiter, now, early=True)
        actions += yield_to_others(self, now)
        actions += self._expire_idle(now)
        actions += come_home(self, now)
        return actions

    def _measure(self, snapshot: MemorySnapshot) -> Budget:
        """Foreign use is fixed at the reading, against what was committed then."""
        models_mb, leases_mb = self.committed_mb()
        model_pids = [s.pid for s in self.models.values() if s.pid is not None]
        lease_pids = {lease.pid: lease.mb for lease in self.leases.values() if lease.pid is not None}
        foreign = foreign_usage(snapshot.used_mb, models_mb + leases_mb, snapshot.process_mb, model_pids, lease_pids)
        return Budget(snapshot.total_mb, snapshot.used_mb, self.config.gpu.reserve_mb, foreign)

    def _expire_idle(self, now: float) -> list[Action]:
        wanted = {w.model for w in self.waiters.values()}
        homes = home_models(self)  # a home model is where the daemon rests: no TTL
        actions: list[Action] = []
        for state in self.models.values():
            if state.phase is not Phase.READY or state.in_flight:
                continue
            forced = any(w.model == state.name and w.force and not w.detached for w in self.waiters.values())
            if state.unload_requested:
                actions.append(self._stop(state, state.unload_cause))
            elif kept_out_by_gaming(self.gaming, state.config, force=forced):
                actions.append(self._stop(state, "gaming"))
            elif state.name not in wanted and state.name not in homes and now >= (ttl_expiry(state) or float("inf")):
                actions.append(self._stop(state, "ttl"))
        return actions

    def _unload(self, event: UnloadRequested) -> list[Action]:
        if event.model is not None and event.model not in self.models:
            return []
        targets = list(self.models.values()) if event.model is None else [self.models[event.model]]
        actions: list[Action] = []
        for state in targets:
            if state.phase is Phase.FAILED:
                state.phase, state.failures, state.retry_at = Phase.UNLOADED, 0, 0.0
            elif state.phase is Phase.LOADING or (state.phase is Phase.READY and (event.force or not state.in_flight)):
                actions.append(self._stop(state, event.cause))
            elif state.phase is Phase.READY:
                state.unload_requested, state.unload_cause = True, event.cause  # stopped once it drains
        return actions

    def _fail(self, state: ModelState, error: str, now: float, during_load: bool) -> list[Action]:
        state.phase = Phase.FAILED
        state.upstream = None
        state.failures += 1
        state.retry_at = now + restart_delay(state.failures)
        state.last_error = error
        state.unload_requested = False
        self._write_off_requests(state)
        if not during_load:
            return []  # a crash: requests wait for (and trigger) the restart
        # Whoever waited for this load gets the cause now rather than a timeout later.
        message = f"model {state.name!r} failed to load: {error}"
        actions: list[Action] = []
        for waiter in [w for w in self.waiters.values() if w.model == state.name]:
            actions += self._give_up(waiter, 503, "model_load_failed", message, retry_after_s(state, now))
        return actions

    # ------------------------------------------------------------ helpers

    def _write_off_requests(self, state: ModelState) -> None:
        """The child is gone: its requests fail with it and no longer hold the model; a restart starts with none."""
        state.in_flight = 0
        for request_id, (model, _) in self.granted.items():
            if model == state.name:
                self.granted[request_id] = (model, ORPHANED)

    def _enqueue(self, waiter: Waiter) -> None:
        self._seq += 1
        waiter.seq = self._seq
        self.waiters[waiter.request_id] = waiter

    def _ranked(self, now: float) -> list[Waiter]:
        return sorted(self.waiters.values(), key=lambda w: self._rank_key(w, now))

    def _rank_key(self, waiter: Waiter, now: float) -> Rank:
        scheduler = self.config.scheduler
        model_ready = waiter.kind != "lease" and self.models[waiter.model].phase is Phase.READY
        first = goes_first_in_batch(scheduler.batching, waiter.kind == "lease", model_ready, now - waiter.arrived,
                                    scheduler.max_batch_wait_s)
        return rank(waiter.priority, first, waiter.seq)

    def _resident(self) -> list[ModelState]:
        return [s for s in self.models.values() if s.phase in RESIDENT]

    def _current(self, model: str, instance: int) -> ModelState | None:
        state = self.models.get(model)
        return state if state is not None and state.instance == instance else None

    def _early_answer_at(self, waiter: Waiter) -> float | None:
        """From when its model's load, going by how long the last one took, clearly outlasts what is left of this
        request's wait (waiting it out would only delay the 503 and a router's fallback); None: not a request
        waiting for a load whose length is known. The time t where load_left(t) = FACTOR × wait_left(t)."""
        state = self.models.get(waiter.model)
        if waiter.kind != "request" or waiter.detached or state is None or state.phase is not Phase.LOADING \
                or state.last_load_s is None or state.load_started is None:
            return None
        factor = EARLY_ANSWER_FACTOR
        return (factor * waiter.deadline - state.last_load_s - state.load_started) / (factor - 1)

    def _loads_past_deadline(self, waiter: Waiter, now: float) -> bool:
        at = self._early_answer_at(waiter)
        return at is not None and now > at

    def _timed_out(self, waiter: Waiter, now: float, early: bool = False) -> list[Action]:
        if waiter.kind == "lease":
            lease = waiter.lease
            message = (f"lease of {lease.mb} MB for {lease.owner!r} was not granted within its wait "  # type: ignore[union-attr]
                       f"(free now: {self.free_mb()} MB)")
            return [self._reject(waiter, 503, "lease_timeout", message, retry_after_s=5)]
        state = self.models[waiter.model]
        if early:
            load_left = state.last_load_s - (now - state.load_started)  # type: ignore[operator]
            message = (f"model {waiter.model!r} is loading and will not be ready within this request's wait of "
                       f"{waiter.deadline - waiter.arrived:g} s (about {load_left:.1f} s to go, going by its last "
                       "load); retry shortly")  # fmt: skip
        else:
            message = (f"model {waiter.model!r} was not ready within {waiter.deadline - waiter.arrived:g} s "
                       f"(it is {state.phase.value}); retry shortly")  # fmt: skip
        detach = waiter.kind == "request" and not waiter.detached
        actions = self._give_up(waiter, 503, "queue_timeout", message, retry_after_s(state, now))
        if detach and state.phase is not Phase.READY:
            # Answered, but its place stays (detached) for another queue_timeout_s: the load or swap it started
            # goes on, so the next request finds the model ready.
            waiter.detached = True
            waiter.deadline = now + self.config.daemon.queue_timeout_s
            self.waiters[waiter.request_id] = waiter
        return actions

    def _give_up(self, waiter: Waiter, status: int, code: str, message: str, retry_after_s: int) -> list[Action]:
        """The local model cannot serve this request: the cloud takes it if it may go there, else a 503."""
        if waiter.detached:  # already answered from the cloud
            del self.waiters[waiter.request_id]
            return []
        state = self.models[waiter.model]
        if waiter.fallback_at is not None:
            del self.waiters[waiter.request_id]
            return [Fallback(waiter.request_id, waiter.model, state.config.fallback, code)]  # type: ignore[arg-type]
        return [self._reject(waiter, status, code, message, retry_after_s)]

    def _fall_back(self, waiter: Waiter, state: ModelState, doomed: dict[str, Rank]) -> Fallback:
        """Waited fallback_after_ms: answer from the cloud, but keep the place so the local load goes on."""
        waiter.detached = True
        reason = fallback_reason(state, state.name in doomed, state.name in self.short_of_memory, bool(self.leases))
        return Fallback(waiter.request_id, waiter.model, state.config.fallback, reason)  # type: ignore[arg-type]

    def _start(self, state: ModelState, now: float, cause: str) -> StartProcess:
        for waiter in [w for w in self.waiters.values() if w.detached and w.model == state.name]:
            del self.waiters[waiter.request_id]  # the load they kept their place for is under way
        state.phase = Phase.LOADING
        state.instance += 1
        state.load_started = now
        action = StartProcess(state.name, state.instance, state.displaced, state.swap_started, cause)
        state.displaced, state.swap_started, state.prewarmed = (), None, False
        return action

    def _grant(self, waiter: Waiter, state: ModelState) -> Grant:
        del self.waiters[waiter.request_id]
        self.granted[waiter.request_id] = (state.name, state.instance)
        state.in_flight += 1
        assert state.upstream is not None
        return Grant(waiter.request_id, state.name, state.upstream)

    def _grant_lease(self, waiter: Waiter, now: float) -> GrantLease:
        request = waiter.lease
        assert request is not None
        del self.waiters[waiter.request_id]
        lease = Lease(request.lease_id, request.owner, request.mb, request.priority, request.pid, request.ttl_s,
                      granted_at=now, expires_at=now + request.ttl_s)  # fmt: skip
        self.leases[lease.lease_id] = lease
        return GrantLease(lease.lease_id, lease.mb, lease.expires_at)

    def _reject(self, waiter: Waiter, status: int, code: str, message: str, retry_after_s: int) -> Reject:
        self.waiters.pop(waiter.request_id, None)
        return Reject(waiter.request_id, waiter.model, status, code, message, retry_after_s)

    def _stop(self, state: ModelState, cause: StopCause, detail: str = "") -> StopProcess:
        state.phase = Phase.UNLOADING
        state.last_stop = (cause, detail)
        return StopProcess(state.name, state.instance, cause, detail)

"""The runtime: feeds the pure core events and carries out the actions it returns.

Every state change goes through ``dispatch``, which is synchronous: it applies one event to the core and starts
the effects the core asked for, without awaiting anything in between. On one asyncio loop that makes each
dispatch atomic, so a TTL expiry and an arriving request can never interleave (no locks to forget or deadlock
on). Effects (children, prewarm) run as tasks and report back through ``dispatch``; an exception in one becomes
the matching failure event, never a lost task. A single timer, re-armed after each dispatch, wakes the core at its
next deadline: nothing polls. Requests and leases wait for their answer through one helper (``_await_answer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from .children import Children
from .changes import Changes
from .config import (
    Config, ConfigError, LiveConfig, diff_configs, find_llama_server, keep_restart_only, load_config, preflight,
)  # fmt: skip
from .errors import ApiError
from .estimate import LearnedStore
from .gaming import GamingStore
from .gpu import Probe
from .notices import (
    ChildExited, ChildStopped, FellBack, GamingSet, LeaseFinished, LeaseGranted, LoadFailedNotice, LoadReady,
    LoadStarting, Notice, Prewarmed, Reloaded, RequestRefused,
)  # fmt: skip
from .process import LoadError
from .scheduler import (
    RESIDENT, ConfigReloaded, DropWaiters, Event, Fallback, GamingChanged, Grant, GrantLease, LeaseEnded,
    LeaseReleased, LeaseRenewed, LeaseRequested, LoadFailed, LoadSucceeded, Prewarm, ProcessExited, Reject,
    RequestArrived, RequestCancelled, RequestFinished, SchedulerCore, StartProcess, StopCause, StopCompleted,
    StopProcess, Tick, UnloadRequested, Upstream,
)  # fmt: skip
from .history import History
from .watchers import GamingWatcher, LeaseHolders, MemoryWatcher

log = structlog.get_logger("supervisor")

Observer = Callable[[Notice], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Ticket:
    """Where a request goes: a local upstream, or (target set) a cloud target standing in for the model."""

    request_id: int
    model: str
    upstream: Upstream | None
    target: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class LeaseGrant:
    lease_id: int
    mb: int
    expires_at: float  # unix time


@dataclass
class LoadInFlight:
    """A load being carried out; a stop that cancels it says why here, so the stop is reported with its cause."""

    instance: int
    task: asyncio.Task[None] | None = None
    stop_cause: StopCause = "swap"


def shutting_down() -> ApiError:
    return ApiError(503, "shutting_down", "the daemon is shutting down", retry_after_s=5)


class Runtime:
    def __init__(self, live: LiveConfig, children: Children, probe: Probe, learned: LearnedStore | None = None,
                 gaming_store: GamingStore | None = None):
        self.live = live
        self.children = children
        self.memory = MemoryWatcher(self, probe, learned)
        self.gaming_watcher = GamingWatcher(self, gaming_store)
        self.holders = LeaseHolders(self)
        self.core = SchedulerCore(live.current, self.memory.initial_needs(live.current))
        self.observers: list[Observer] = []
        self.history = History()  # recent loads/unloads and request latencies, for /status and the dashboard
        self.observers.append(self.history.on_notice)
        self.closing = False
        self._answers: dict[int, asyncio.Future[Any]] = {}
        self._loads: dict[str, LoadInFlight] = {}
        self._stops_in_flight = 0  # a swap's load may overlap its outgoing model's stop
        self._stops_started = 0  # ever: a stop that began and ended during a load is seen too
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)
        self._timer: asyncio.Handle | None = None
        self._timer_at: float | None = None  # when the timer fires (uvloop's handles do not say)
        self._changes = Changes()
        self._reloading = asyncio.Lock()
        self._loop = asyncio.get_running_loop()

    @property
    def config(self) -> Config:
        return self.live.current

    def now(self) -> float:
        return self._loop.time()

    def wall(self, loop_time: float) -> float:
        return time.time() + (loop_time - self.now())

    async def start(self) -> None:
        """Take the first memory reading (so the first placement is budgeted) and keep reading; restore gaming
        mode as it was, and watch for games if asked to."""
        self.memory.measure()
        self.spawn(self.memory.run())
        self.gaming_watcher.restore()
        if self.config.gaming.auto_detect:
            self.spawn(self.gaming_watcher.run())

    # ------------------------------------------------------------ gaming mode

    @property
    def gaming(self) -> bool:
        return self.core.gaming

    def set_gaming(self, enabled: bool, source: str) -> None:
        if enabled != self.core.gaming:
            log.info("gaming_mode", enabled=enabled, source=source)
        self.dispatch(GamingChanged(enabled, self.now()))
        if source != "restored":
            self.gaming_watcher.save(enabled)
        self.notify(GamingSet(enabled, source))

    # ------------------------------------------------------------ requests

    async def _await_answer(self, answer_id: int, event: Event,
                            withdraw: Callable[[asyncio.Future[T]], None]) -> T:
        """Dispatch the event that queues a request or lease and wait for the core's answer (a result, or an
        ApiError). Cancelling (the client went away) calls withdraw with the future, answered or not."""
        future: asyncio.Future[T] = self._loop.create_future()
        self._answers[answer_id] = future
        try:
            self.dispatch(event)
            return await future
        except asyncio.CancelledError:
            withdraw(future)
            raise
        finally:
            self._answers.pop(answer_id, None)

    async def acquire(self, model: str, kind: str = "request", wait_s: float | None = None,
                      local_only: bool = False, force: bool = False) -> Ticket:
        """Wait until the model may be sent a request. Raises ApiError. Cancelling gives up the place."""
        if self.closing:
            raise shutting_down()
        request_id = next(self._ids)
        now = self.now()
        deadline = now + (self.config.daemon.queue_timeout_s if wait_s is None else wait_s)

        def withdraw(future: asyncio.Future[Ticket]) -> None:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())  # granted in the same instant the client left
            else:
                self.dispatch(RequestCancelled(request_id, self.now()))

        event = RequestArrived(request_id, model, now, deadline, kind, local_only, force)  # type: ignore[arg-type]
        return await self._await_answer(request_id, event, withdraw)

    async def upstream_gone(self, ticket: Ticket, within_s: float) -> bool:
        """Has the child this ticket was granted on exited or been stopped? Waits up to within_s for the runtime to
        see it (a connection to a killed child fails a few ms before its exit is noticed)."""
        def gone() -> bool:
            state = self.core.models.get(ticket.model)
            return state is None or state.upstream is not ticket.upstream

        try:
            await asyncio.wait_for(self.wait_until(gone), within_s)
        except TimeoutError:
            return False
        return True

    def release(self, ticket: Ticket) -> None:
        if ticket.upstream is not None:  # a cloud ticket held nothing local
            self.dispatch(RequestFinished(ticket.request_id, self.now()))

    async def load(self, model: str) -> None:
        """Load a model and return once it is ready (explicit load: waits for the load itself too)."""
        wait_s = self.config.daemon.queue_timeout_s + self.config.daemon.health_timeout_s
        ticket = await self.acquire(model, kind="load", wait_s=wait_s)
        self.release(ticket)

    async def unload(self, model: str | None) -> None:
        """Unload one model or all. It takes no new requests from now on; in-flight ones get drain_timeout_s to
        finish, then the child is stopped. Returns once the child that was running has gone (a request that
        waited meanwhile may load the model again afterwards)."""
        names = list(self.core.models) if model is None else [model]
        running = {n: self.core.models[n].instance for n in names if self.core.models[n].phase in RESIDENT}

        def gone() -> bool:
            for name, instance in running.items():
                state = self.core.models.get(name)
                if state is not None and state.instance == instance and state.phase in RESIDENT:
                    return False
            return True

        self.dispatch(UnloadRequested(model, self.now()))
        try:
            await asyncio.wait_for(self.wait_until(gone), self.config.daemon.drain_timeout_s)
        except TimeoutError:
            self.dispatch(UnloadRequested(model, self.now(), force=True))
            await self.wait_until(gone)

    async def stop_all(self, reason: str) -> None:
        self.dispatch(DropWaiters(reason, self.now()))
        await self.unload(None)

    async def next_change(self) -> None:
        """Return at the next state change (or poke)."""
        await self._changes.wait()

    def poke(self) -> None:
        """Wake whoever waits for a change though no scheduling state changed (e.g. new latency figures, so /events
        sends them)."""
        self._changes.notify()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until predicate() holds; it is checked after every state change, never by polling."""
        while not predicate():
            await self.next_change()

    # ------------------------------------------------------------ leases

    async def request_lease(self, owner: str, mb: int, priority: int, pid: int | None, ttl_s: float,
                            wait_s: float) -> LeaseGrant:
        """Wait up to wait_s for mb of device memory. Raises ApiError. Cancelling withdraws the request."""
        if self.closing:
            raise shutting_down()
        lease_id = next(self._ids)
        now = self.now()
        if pid is not None:
            self.holders.watch(lease_id, pid)

        def withdraw(future: asyncio.Future[LeaseGrant]) -> None:
            self.dispatch(LeaseReleased(lease_id, self.now()))  # a granted lease is released, a queued one goes

        event = LeaseRequested(lease_id, owner, mb, priority, pid, ttl_s, now, now + wait_s)
        try:
            return await self._await_answer(lease_id, event, withdraw)
        except ApiError:
            self.holders.unwatch(lease_id)
            raise

    def renew_lease(self, lease_id: int) -> float | None:
        """Extend a lease by its ttl; its new expiry (unix time), or None if there is no such lease."""
        if lease_id not in self.core.leases:
            return None
        self.dispatch(LeaseRenewed(lease_id, self.now()))
        return self.wall(self.core.leases[lease_id].expires_at)

    def release_lease(self, lease_id: int) -> bool:
        if lease_id not in self.core.leases:
            return False
        self.dispatch(LeaseReleased(lease_id, self.now()))
        return True

    # ------------------------------------------------------------ reload

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file. Raises ConfigError (the old config stays) if the new one is invalid or cannot
        run. Unchanged models keep running; changed ones restart once idle; removed ones go once idle. Settings
        only a restart can change are listed under needs_restart and otherwise ignored. Files are read off the
        loop (a GGUF estimate reads the vocabulary: seconds for a large one)."""
        path = self.live.path
        if path is None:
            raise ApiError(409, "no_config_file", "this daemon was not started from a config file")
        async with self._reloading:
            new, binary = await asyncio.to_thread(_read_config, path)
            old = self.config
            diff = diff_configs(old, new)
            new = keep_restart_only(old, new, diff.needs_restart)
            needs = await asyncio.to_thread(self.memory.initial_needs, new, [*diff.added, *diff.process_changed])
            resident = {n for n in diff.process_changed if self.core.models[n].phase in RESIDENT}
            summary: dict[str, list[str]] = {
                "unchanged": list(diff.unchanged),
                "changed": [*diff.changed, *(n for n in diff.process_changed if n not in resident)],
                "restarting": sorted(resident),
                "added": list(diff.added),
                "removed": list(diff.removed),
                "needs_restart": list(diff.needs_restart),
            }
            self.live.current, self.live.binary = new, binary
            self.dispatch(ConfigReloaded(new, diff, needs, self.now()))
            self.children.reloaded()
        log.info("config_reloaded", path=path, **{k: v for k, v in summary.items() if v})
        self.notify(Reloaded(summary))
        return summary

    # ------------------------------------------------------------ the one place state changes

    def dispatch(self, event: Event) -> None:
        actions = self.core.handle(event)
        for action in actions:
            self._carry_out(action)
        self._arm_timer()
        self.poke()

    def _answer(self, answer_id: int) -> asyncio.Future[Any] | None:
        future = self._answers.get(answer_id)
        return future if future is not None and not future.done() else None

    def _carry_out(self, action: Any) -> None:
        match action:
            case Grant():
                future = self._answer(action.request_id)
                if future is not None:
                    future.set_result(Ticket(action.request_id, action.model, action.upstream))
                else:  # its client left in the same instant: give the slot straight back
                    self._loop.call_soon(self.dispatch, RequestFinished(action.request_id, self.now()))
            case Fallback():
                future = self._answer(action.request_id)
                if future is not None:
                    future.set_result(Ticket(action.request_id, action.model, None, action.target, action.reason))
                log.info("fallback", model=action.model, target=action.target, reason=action.reason)
                self.notify(FellBack(action.model, action.target, action.reason))
            case Reject():
                future = self._answer(action.request_id)
                if future is not None:
                    future.set_exception(ApiError(action.status, action.code, action.message, action.retry_after_s))
                log.info("request_rejected", model=action.model or None, code=action.code, reason=action.message)
                self.notify(RequestRefused(action.model, action.code))
            case GrantLease():
                future = self._answer(action.lease_id)
                if future is not None:
                    future.set_result(LeaseGrant(action.lease_id, action.mb, self.wall(action.expires_at)))
                else:  # its requester left in the same instant: hand the memory straight back
                    self._loop.call_soon(self.dispatch, LeaseReleased(action.lease_id, self.now()))
                log.info("lease_granted", lease=action.lease_id, mb=action.mb)
                self.notify(LeaseGranted(action.lease_id, action.mb))
            case LeaseEnded():
                self.holders.unwatch(action.lease_id)
                log.info("lease_ended", lease=action.lease_id, owner=action.owner, reason=action.reason)
                self.notify(LeaseFinished(action.lease_id, action.reason))
            case Prewarm():
                self.spawn(self._prewarm(action.model))
            case StartProcess():
                load = LoadInFlight(action.instance)
                self._loads[action.model] = load
                load.task = self.spawn(self._load(action, load))
            case StopProcess():
                load = self._loads.pop(action.model, None)
                if load is not None and load.task is not None and not load.task.done():
                    load.stop_cause = action.cause
                    load.task.cancel()  # its cleanup stops the child and reports StopCompleted with this cause
                else:
                    self.spawn(self._stop(action.model, action.instance, action.cause, action.detail))

    def _arm_timer(self) -> None:
        wakeup = self.core.next_wakeup()
        if self._timer is not None:
            if wakeup is not None and self._timer_at == wakeup:
                return
            self._timer.cancel()
            self._timer = None
        if wakeup is not None:
            self._timer = self._loop.call_at(wakeup, self._on_timer, wakeup)
            self._timer_at = wakeup

    def _on_timer(self, wakeup: float) -> None:
        self._timer = None
        self.dispatch(Tick(max(self.now(), wakeup)))

    # ------------------------------------------------------------ effects

    async def _load(self, action: StartProcess, load: LoadInFlight) -> None:
        name = action.model
        started = self.now()
        log.info("model_loading", model=name, displaced=list(action.displaced))
        self.notify(LoadStarting(name, action.cause))
        memory = self.core.memory
        used_before = memory.used_mb if memory is not None else None
        # The device's growth is this model's only if nothing else loaded or stopped meanwhile.
        alone = len(self._loads) <= 1 and not self._stops_in_flight
        stops_before = self._stops_started
        try:
            upstream = await self.children.start(name)
        except asyncio.CancelledError:  # asked to stop while loading
            await asyncio.shield(self._stop(name, action.instance, load.stop_cause))
            return
        except Exception as exc:  # LoadError, or whatever starting raised (binary gone, E2BIG...): a failed load
            if self._loads.get(name) is load:
                del self._loads[name]
            error = str(exc) if isinstance(exc, LoadError) else f"could not start the server: {exc!r}"
            log.error("model_load_failed", model=name, error=error.splitlines()[0], after_ms=self._ms(started))
            self.notify(LoadFailedNotice(name, error))
            self.dispatch(LoadFailed(name, action.instance, error, self.now()))
            return
        if self._loads.get(name) is load:
            del self._loads[name]
        load_s = self.now() - started
        log.info("model_ready", model=name, pid=upstream.pid, port=upstream.port, load_ms=round(load_s * 1000))
        if action.displaced:
            # Whole swap: from the decision to make room (draining and stopping included) to ready.
            since = action.swap_started if action.swap_started is not None else started
            log.info("swap", to=name, displaced=list(action.displaced), swap_ms=self._ms(since),
                     load_ms=round(load_s * 1000))
        swap_s = None
        if action.displaced:
            swap_s = self.now() - (action.swap_started if action.swap_started is not None else started)
        self.notify(LoadReady(name, upstream.pid, upstream.port, load_s, action.displaced, swap_s))
        self.dispatch(LoadSucceeded(name, action.instance, upstream, load_s, self.now()))
        try:
            alone = alone and not self._loads and not self._stops_in_flight and self._stops_started == stops_before
            self.memory.learn(name, upstream.pid, used_before, alone)
        except Exception:  # learning is a refinement; it must never stop the exit watch below
            log.exception("memory_learning_failed", model=name)
        await self._watch_exit(name, action.instance)

    async def _watch_exit(self, name: str, instance: int) -> None:
        try:
            exited = await self.children.wait_exit(name)
        except Exception as exc:
            # The child can no longer be watched: stop it, and let the core restart it on demand.
            log.exception("child_watch_failed", model=name)
            with contextlib.suppress(Exception):
                await self.children.stop(name, "crash")
            exited = (None, f"the daemon lost track of it: {exc!r}")
        if exited is None:
            return  # stopped by the daemon; _stop reports that
        code, tail = exited
        detail = f"llama-server exited unexpectedly (code {code}); last output:\n{tail}"
        log.error("model_crashed", model=name, code=code)
        self.notify(ChildExited(name, code))
        self.dispatch(ProcessExited(name, instance, detail, self.now()))

    async def _prewarm(self, name: str) -> None:
        started = self.now()
        try:
            asked = await self.children.prewarm(name)
        except Exception as exc:  # advice only: the load reads the file anyway
            log.warning("prewarm_failed", model=name, error=str(exc))
            return
        log.info("prewarm", model=name, mb=asked // 2**20, ms=self._ms(started))
        self.notify(Prewarmed(name, asked))

    async def _stop(self, name: str, instance: int, cause: StopCause, detail: str = "") -> None:
        started = self.now()
        pid = None
        self._stops_in_flight += 1
        self._stops_started += 1
        try:
            pid = await self.children.stop(name, cause)
        except Exception:  # reported all the same: the core must not wait forever on a stop
            log.exception("stop_failed", model=name, cause=cause)
        finally:
            self._stops_in_flight -= 1
        log.info("model_unloaded", model=name, cause=cause, stop_ms=self._ms(started), **({"why": detail} if detail else {}))
        self.notify(ChildStopped(name, cause, pid, self.now() - started))
        self.dispatch(StopCompleted(name, instance, self.now()))

    def spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("effect_failed", error=repr(task.exception()))

    # ------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Queued requests get 503, in-flight ones get drain_timeout_s (as configured now) to finish, then every
        child is stopped. Closing twice is closing once."""
        if self.closing:
            return
        self.closing = True
        daemon = self.config.daemon
        self.dispatch(DropWaiters("the daemon is shutting down", self.now()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_until(lambda: not any(s.in_flight for s in self.core.models.values())),
                                   daemon.drain_timeout_s)
        self.dispatch(UnloadRequested(None, self.now(), force=True, cause="shutdown"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_until(self._nothing_resident), daemon.stop_timeout_s + 5)
        await self.children.close()  # whatever is still alive now (a stop that hung) is killed outright
        self.holders.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()

    def _nothing_resident(self) -> bool:
        return not any(s.phase in RESIDENT for s in self.core.models.values())

    # ------------------------------------------------------------ observers

    def notify(self, notice: Notice) -> None:
        for observer in list(self.observers):
            try:
                observer(notice)
            except Exception:  # an observer must never break the owner of state
                log.exception("observer_failed", kind=notice.kind)

    def _ms(self, since: float) -> int:
        return round((self.now() - since) * 1000)


def _read_config(path: str) -> tuple[Config, str]:
    """Read and check a config file for a reload (blocking: run in a thread)."""
    new = load_config(path)
    problems = preflight(new)
    if problems:
        raise ConfigError(problems, path)
    return new, find_llama_server(new)

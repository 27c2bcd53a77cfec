"""The owner of all model state: feeds the pure core events and carries out the actions it returns.

Every state change goes through ``dispatch``, which is synchronous: it applies one event to the core and starts
the effects the core asked for, without awaiting anything in between. On one asyncio loop that makes each
dispatch atomic, so a TTL expiry and an arriving request can never interleave (no locks to forget or deadlock
on). Effects run as tasks and report back through ``dispatch``. A single timer, re-armed after each dispatch,
wakes the core at its next deadline: nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import psutil
import structlog

from .config import Config, ConfigError, find_llama_server, load_config, preflight
from .estimate import LearnedStore, estimate_model
from .gaming import GamingDetector, GamingStore, running_process_names
from .gpu import MemorySnapshot, Probe, ProbeError
from .estimate import shard_paths
from .process import LlamaServer, LoadError, LogRing, PortPool, prewarm
from .scheduler import (
    RESIDENT,
    DropWaiters,
    ConfigReloaded,
    Event,
    Fallback,
    GamingChanged,
    Grant,
    GrantLease,
    Prewarm,
    LeaseEnded,
    LeaseReleased,
    LeaseRenewed,
    LeaseRequested,
    MemoryMeasured,
    NeedLearned,
    LoadFailed,
    LoadSucceeded,
    ProcessExited,
    Reject,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    SchedulerCore,
    StartProcess,
    StopCompleted,
    StopProcess,
    Tick,
    UnloadRequested,
)

log = structlog.get_logger("supervisor")

Observer = Callable[[str, dict[str, Any]], None]


class Rejected(Exception):
    """A request the scheduler would not serve: carries the HTTP answer."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s


@dataclass(frozen=True)
class Ticket:
    """Where a request goes: a local port, or (target set) a cloud target standing in for the model."""

    request_id: int
    model: str
    port: int
    target: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class LeaseGrant:
    lease_id: int
    mb: int
    expires_at: float  # unix time


class Driver:
    def __init__(self, config: Config, binary: str, http: aiohttp.ClientSession, probe: Probe,
                 learned: LearnedStore | None = None, gaming_store: GamingStore | None = None,
                 child_env: dict[str, str] | None = None):
        self.config = config
        self.binary = binary
        self.http = http
        self.probe = probe
        self.learned = learned
        self.gaming_store = gaming_store
        self.child_env = child_env
        self.snapshot: MemorySnapshot | None = None
        self.need_source: dict[str, str] = {}
        self.core = SchedulerCore(config, self._initial_needs())
        self.ports = PortPool(*config.daemon.port_range)
        self.logs = {name: LogRing(config.daemon.log_lines) for name in config.models}
        self.children: dict[str, LlamaServer] = {}
        self.observers: list[Observer] = []
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._holders: dict[int, Callable[[], None]] = {}  # lease id -> stops watching its holder pid
        self._ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()
        self.closing = False
        self.detection_polls = 0  # how often gaming detection has looked (tests wait on it)
        self._loop = asyncio.get_running_loop()

    async def start(self) -> None:
        """Take the first memory reading (so the first placement is budgeted) and keep reading periodically;
        restore gaming mode as it was, and watch for games if asked to."""
        self.measure()
        self._spawn_task(self._poll_memory())
        if self.gaming_store is not None and self.gaming_store.load():
            self.set_gaming(True, source="restored")
        if self.config.gaming.auto_detect:
            self._spawn_task(self._detect_games())

    # ------------------------------------------------------------ gaming mode

    @property
    def gaming(self) -> bool:
        return self.core.gaming

    def set_gaming(self, enabled: bool, source: str) -> None:
        if enabled != self.core.gaming:
            log.info("gaming_mode", enabled=enabled, source=source)
        self.dispatch(GamingChanged(enabled, self.now()))
        if self.gaming_store is not None and source != "restored":
            self.gaming_store.save(enabled)
        self._notify("gaming", {"enabled": enabled, "source": source})

    async def _detect_games(self) -> None:
        detector = GamingDetector(self.config.gaming.auto_detect, self.config.gaming.off_delay_s)
        while True:
            running = await asyncio.to_thread(running_process_names)  # listing /proc takes a few ms
            change = detector.observe(running, self.now())
            self.detection_polls += 1
            if change is not None:
                self.set_gaming(change, source=f"auto: {', '.join(detector.matching(running)) or 'none running'}")
            await asyncio.sleep(self.config.gaming.poll_interval_s)

    def now(self) -> float:
        return self._loop.time()

    # ------------------------------------------------------------ requests

    async def acquire(self, model: str, kind: str = "request", wait_s: float | None = None,
                      local_only: bool = False, force: bool = False) -> Ticket:
        """Wait until the model may be sent a request. Raises Rejected. Cancelling gives up the place."""
        if self.closing:
            raise Rejected(503, "shutting_down", "the daemon is shutting down", retry_after_s=5)
        request_id = next(self._ids)
        future: asyncio.Future[Ticket] = self._loop.create_future()
        self._pending[request_id] = future
        now = self.now()
        deadline = now + (self.config.daemon.queue_timeout_s if wait_s is None else wait_s)
        self.dispatch(RequestArrived(request_id, model, now, deadline, kind, local_only, force))  # type: ignore[arg-type]
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                if future.result().target is None:
                    self.release(future.result())  # granted in the same instant the client left
            else:
                self.dispatch(RequestCancelled(request_id, self.now()))
            raise
        finally:
            self._pending.pop(request_id, None)

    def release(self, ticket: Ticket) -> None:
        if ticket.target is None:  # a cloud ticket held nothing local
            self.dispatch(RequestFinished(ticket.request_id, self.now()))

    async def load(self, model: str) -> None:
        """Load a model and return once it is ready (explicit load: waits for the load itself too)."""
        wait_s = self.config.daemon.queue_timeout_s + self.config.daemon.health_timeout_s
        ticket = await self.acquire(model, kind="load", wait_s=wait_s)
        self.release(ticket)

    async def unload(self, model: str | None) -> None:
        """Unload one model or all: in-flight requests get drain_timeout_s to finish, then the child is stopped."""
        self.dispatch(UnloadRequested(model, self.now()))
        names = list(self.core.models) if model is None else [model]
        try:
            await asyncio.wait_for(self.wait_until(lambda: not self._resident(names)), self.config.daemon.drain_timeout_s)
        except TimeoutError:
            self.dispatch(UnloadRequested(model, self.now(), force=True))
            await self.wait_until(lambda: not self._resident(names))

    async def stop_all(self, reason: str) -> None:
        self.dispatch(DropWaiters(reason, self.now()))
        await self.unload(None)

    async def next_change(self) -> None:
        """Return at the next state change."""
        await self._changed.wait()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until predicate() holds; it is checked after every state change, never by polling."""
        while not predicate():
            await self._changed.wait()

    def _resident(self, names: list[str]) -> list[str]:
        return [n for n in names if self.core.models[n].phase in RESIDENT]

    # ------------------------------------------------------------ leases

    async def request_lease(self, owner: str, mb: int, priority: int, pid: int | None, ttl_s: float,
                            wait_s: float) -> LeaseGrant:
        """Wait up to wait_s for mb of device memory. Raises Rejected. Cancelling withdraws the request."""
        if self.closing:
            raise Rejected(503, "shutting_down", "the daemon is shutting down", retry_after_s=5)
        lease_id = next(self._ids)
        future: asyncio.Future[LeaseGrant] = self._loop.create_future()
        self._pending[lease_id] = future
        now = self.now()
        if pid is not None:
            self._watch_holder(lease_id, pid)
        self.dispatch(LeaseRequested(lease_id, owner, mb, priority, pid, ttl_s, now, now + wait_s))
        try:
            return await future
        except asyncio.CancelledError:
            self.dispatch(LeaseReleased(lease_id, self.now()))
            raise
        except Rejected:
            self._unwatch_holder(lease_id)
            raise
        finally:
            self._pending.pop(lease_id, None)

    def renew_lease(self, lease_id: int) -> float | None:
        """Extend a lease by its ttl; its new expiry (unix time), or None if there is no such lease."""
        if lease_id not in self.core.leases:
            return None
        self.dispatch(LeaseRenewed(lease_id, self.now()))
        return self._wall(self.core.leases[lease_id].expires_at)

    def release_lease(self, lease_id: int) -> bool:
        if lease_id not in self.core.leases:
            return False
        self.dispatch(LeaseReleased(lease_id, self.now()))
        return True

    def _watch_holder(self, lease_id: int, pid: int) -> None:
        """Release the lease when its holder exits: a pidfd becomes readable at exit, so this is event-driven."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._loop.call_soon(self.dispatch, LeaseReleased(lease_id, self.now(), "holder_died"))
            return
        except (OSError, AttributeError):  # no pidfd (old kernel): poll instead
            task = self._spawn_task(self._poll_holder(lease_id, pid))
            self._holders[lease_id] = task.cancel
            return

        def died() -> None:
            self._unwatch_holder(lease_id)
            self.dispatch(LeaseReleased(lease_id, self.now(), "holder_died"))

        def stop() -> None:
            self._loop.remove_reader(fd)
            os.close(fd)

        self._loop.add_reader(fd, died)
        self._holders[lease_id] = stop

    async def _poll_holder(self, lease_id: int, pid: int) -> None:
        while psutil.pid_exists(pid):
            await asyncio.sleep(0.5)
        self._holders.pop(lease_id, None)
        self.dispatch(LeaseReleased(lease_id, self.now(), "holder_died"))

    def _unwatch_holder(self, lease_id: int) -> None:
        stop = self._holders.pop(lease_id, None)
        if stop is not None:
            stop()

    def _wall(self, loop_time: float) -> float:
        return time.time() + (loop_time - self.now())

    # ------------------------------------------------------------ memory

    def _initial_needs(self, config: Config | None = None, names: list[str] | None = None) -> dict[str, int]:
        """Each model's need: vram_mb from the config, else what was measured last time, else the GGUF estimate."""
        config = config or self.config
        on_gpu = self.probe.name not in ("host",)
        needs: dict[str, int] = {}
        for name, model in config.models.items():
            if names is not None and name not in names:
                continue
            if isinstance(model.vram_mb, int):
                needs[name], self.need_source[name] = model.vram_mb, "config"
                continue
            learned = self.learned.get(name, model.model, list(model.args)) if self.learned else None
            if learned is not None:
                needs[name], self.need_source[name] = learned, "learned"
                continue
            try:
                needs[name] = estimate_model(model.model, list(model.args), on_gpu=on_gpu).total_mb
                self.need_source[name] = "estimate"
            except Exception as exc:  # an unreadable GGUF fails at load with llama-server's own message
                log.warning("estimate_failed", model=name, error=str(exc))
                needs[name], self.need_source[name] = 0, "unknown"
        return needs

    # ------------------------------------------------------------ reload

    def reload(self, path: str) -> dict[str, Any]:
        """Re-read the config. Raises ConfigError (the old config stays) if the new one is invalid or cannot run.

        Models whose file and args are unchanged keep running; changed ones restart once idle; removed ones go
        once idle. Settings only a restart can change are listed under needs_restart and otherwise ignored.
        """
        new = load_config(path)
        problems = preflight(new)
        binary = find_llama_server(new) if not problems else self.binary
        if problems:
            raise ConfigError(problems, path)
        old = self.config
        restart_only = {
            "daemon.listen": (old.daemon.listen, new.daemon.listen),
            "daemon.state_dir": (old.daemon.state_dir, new.daemon.state_dir),
            "daemon.port_range": (old.daemon.port_range, new.daemon.port_range),
            "daemon.max_body_mb": (old.daemon.max_body_mb, new.daemon.max_body_mb),
            "daemon.admin_token_env": (old.daemon.admin_token_env, new.daemon.admin_token_env),
            "daemon.api_key_env": (old.daemon.api_key_env, new.daemon.api_key_env),
            "gpu.backend": (old.gpu.backend, new.gpu.backend),
            "gpu.device": (old.gpu.device, new.gpu.device),
            "gaming.auto_detect": (old.gaming.auto_detect, new.gaming.auto_detect),
        }
        needs_restart = sorted(key for key, (before, after) in restart_only.items() if before != after)
        # Keep what only a restart can change as it is, so the running daemon stays consistent with itself.
        daemon = new.daemon.model_copy(update={k.split(".")[1]: getattr(old.daemon, k.split(".")[1])
                                               for k in needs_restart if k.startswith("daemon.")})  # fmt: skip
        new = new.model_copy(update={"daemon": daemon, "gpu": old.gpu if any(k.startswith("gpu.") for k in needs_restart)
                                     else new.gpu, "gaming": old.gaming if "gaming.auto_detect" in needs_restart
                                     else new.gaming})  # fmt: skip
        summary = {"unchanged": [], "changed": [], "restarting": [], "added": [], "removed": [],
                   "needs_restart": needs_restart}  # fmt: skip
        process_changed = []
        for name, model in new.models.items():
            before = old.models.get(name)
            if before is None:
                summary["added"].append(name)
            elif (before.model, before.args) != (model.model, model.args):
                process_changed.append(name)
                resident = self.core.models[name].phase in RESIDENT
                summary["restarting" if resident else "changed"].append(name)
            elif before != model:
                summary["changed"].append(name)
            else:
                summary["unchanged"].append(name)
        summary["removed"] = sorted(set(old.models) - set(new.models))
        needs = self._initial_needs(new, [*summary["added"], *process_changed])
        for name in summary["added"]:
            self.logs[name] = LogRing(new.daemon.log_lines)
        self.config, self.binary = new, binary
        self.dispatch(ConfigReloaded(new, needs, self.now()))
        log.info("config_reloaded", path=path, **{k: v for k, v in summary.items() if v})
        self._notify("reloaded", summary)
        return summary

    def measure(self, pids: list[int] | None = None) -> MemorySnapshot | None:
        """Read the probe and tell the core. A probe error is logged and the last reading stays."""
        if pids is None:
            pids = [s.pid for s in self.core.models.values() if s.pid is not None]
        try:
            snapshot = self.probe.snapshot(pids)
        except ProbeError as exc:
            log.warning("memory_probe_failed", error=str(exc))
            return None
        self.snapshot = snapshot
        self.dispatch(MemoryMeasured(snapshot.total_mb, snapshot.used_mb, self.now(), snapshot.process_mb))
        return snapshot

    async def _poll_memory(self) -> None:
        while True:
            await asyncio.sleep(self.config.gpu.poll_interval_s)
            self.measure()

    def _learn(self, name: str, pid: int, used_before: int | None, alone: bool) -> None:
        """After a load: what the child really holds (per-process figure, else the device's growth)."""
        snapshot = self.measure()
        if snapshot is None or isinstance(self.config.models[name].vram_mb, int):
            return
        if snapshot.process_mb is not None and pid in snapshot.process_mb:
            measured = snapshot.process_mb[pid]
        elif used_before is not None and alone:
            measured = snapshot.used_mb - used_before
        else:
            return  # another load overlapped: the device's growth is not this model's alone
        if measured <= 0:
            return
        estimate = self.core.models[name].need_mb
        log.info("memory_learned", model=name, measured_mb=measured, estimated_mb=estimate)
        self.need_source[name] = "learned"
        self.dispatch(NeedLearned(name, measured, self.now()))
        if self.learned is not None:
            model = self.config.models[name]
            self.learned.put(name, model.model, list(model.args), measured)

    # ------------------------------------------------------------ the one place state changes

    def dispatch(self, event: Event) -> None:
        actions = self.core.handle(event)
        for action in actions:
            self._carry_out(action)
        self._arm_timer()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _carry_out(self, action: Any) -> None:
        match action:
            case Grant():
                future = self._pending.get(action.request_id)
                if future is not None and not future.done():
                    future.set_result(Ticket(action.request_id, action.model, action.port))
                else:  # its client left in the same instant: give the slot straight back
                    self._loop.call_soon(self.dispatch, RequestFinished(action.request_id, self.now()))
            case Fallback():
                future = self._pending.get(action.request_id)
                if future is not None and not future.done():
                    future.set_result(Ticket(action.request_id, action.model, 0, action.target, action.reason))
                log.info("fallback", model=action.model, target=action.target, reason=action.reason)
                self._notify("fallback", {"model": action.model, "target": action.target, "reason": action.reason})
            case Reject():
                future = self._pending.get(action.request_id)
                if future is not None and not future.done():
                    future.set_exception(Rejected(action.status, action.code, action.message, action.retry_after_s))
                log.info("request_rejected", model=action.model or None, code=action.code, reason=action.message)
                self._notify("rejected", {"model": action.model, "code": action.code})
            case GrantLease():
                future = self._pending.get(action.lease_id)
                if future is not None and not future.done():
                    future.set_result(LeaseGrant(action.lease_id, action.mb, self._wall(action.expires_at)))
                else:  # its requester left in the same instant: hand the memory straight back
                    self._loop.call_soon(self.dispatch, LeaseReleased(action.lease_id, self.now()))
                log.info("lease_granted", lease=action.lease_id, mb=action.mb)
                self._notify("lease_granted", {"lease": action.lease_id, "mb": action.mb})
            case LeaseEnded():
                self._unwatch_holder(action.lease_id)
                log.info("lease_ended", lease=action.lease_id, owner=action.owner, reason=action.reason)
                self._notify("lease_ended", {"lease": action.lease_id, "reason": action.reason})
            case Prewarm():
                self._spawn_task(self._prewarm(action.model))
            case StartProcess():
                self._loading[action.model] = self._spawn_task(self._run_child(action))
            case StopProcess():
                loading = self._loading.pop(action.model, None)
                if loading is not None:
                    loading.cancel()  # its cleanup stops the child and reports StopCompleted
                else:
                    self._spawn_task(self._stop_child(action))

    def _arm_timer(self) -> None:
        wakeup = self.core.next_wakeup()
        if self._timer is not None:
            if wakeup is not None and self._timer.when() == wakeup:
                return
            self._timer.cancel()
            self._timer = None
        if wakeup is not None:
            self._timer = self._loop.call_at(wakeup, self._on_timer, wakeup)

    def _on_timer(self, wakeup: float) -> None:
        self._timer = None
        self.dispatch(Tick(max(self.now(), wakeup)))

    # ------------------------------------------------------------ effects

    async def _run_child(self, action: StartProcess) -> None:
        name = action.model
        model = self.config.models[name]
        server = LlamaServer(name, self.binary, model.model, list(model.args), self.logs[name], self.http, self.child_env)
        self.children[name] = server
        started = self.now()
        log.info("model_loading", model=name, displaced=list(action.displaced))
        self._notify("starting", {"model": name, "cause": action.cause})
        used_before = self.snapshot.used_mb if self.snapshot is not None else None
        alone = len(self._loading) <= 1
        try:
            await server.start(self.ports, self.config.daemon.health_timeout_s)
        except asyncio.CancelledError:
            # Asked to stop while loading.
            await asyncio.shield(self._stop_and_report(server, action.instance, "swap"))
            return
        except LoadError as exc:
            self._loading.pop(name, None)
            log.error("model_load_failed", model=name, error=str(exc).splitlines()[0], after_ms=self._ms(started))
            self._notify("load_failed", {"model": name, "error": str(exc)})
            self.dispatch(LoadFailed(name, action.instance, str(exc), self.now()))
            return
        self._loading.pop(name, None)
        load_s = self.now() - started
        log.info("model_ready", model=name, pid=server.pid, port=server.port, load_ms=round(load_s * 1000))
        if action.displaced:
            # Whole swap: from the decision to make room (draining and stopping included) to ready.
            since = action.swap_started if action.swap_started is not None else started
            log.info("swap", to=name, displaced=list(action.displaced), swap_ms=self._ms(since),
                     load_ms=round(load_s * 1000))
        self._notify("spawned", {"model": name, "pid": server.pid, "port": server.port, "load_s": load_s})
        self.dispatch(LoadSucceeded(name, action.instance, server.port, server.pid, load_s, self.now()))  # type: ignore[arg-type]
        self._learn(name, server.pid, used_before, alone and len(self._loading) == 0)  # type: ignore[arg-type]
        code = await server.wait()
        if not server.stopping:
            self.ports.release(server.port)
            detail = f"llama-server exited unexpectedly (code {code}); last output:\n{server.log.tail()}"
            log.error("model_crashed", model=name, code=code)
            self._notify("exited", {"model": name, "code": code, "cause": "crash"})
            self.dispatch(ProcessExited(name, action.instance, detail, self.now()))

    async def _prewarm(self, name: str) -> None:
        started = self.now()
        asked = await asyncio.to_thread(prewarm, shard_paths(self.config.models[name].model))
        log.info("prewarm", model=name, mb=asked // 2**20, ms=self._ms(started))
        self._notify("prewarm", {"model": name, "bytes": asked})

    async def _stop_child(self, action: StopProcess) -> None:
        server = self.children.get(action.model)
        if server is None:
            self.dispatch(StopCompleted(action.model, action.instance, self.now()))
            return
        await self._stop_and_report(server, action.instance, action.cause)

    async def _stop_and_report(self, server: LlamaServer, instance: int, cause: str) -> None:
        started = self.now()
        await server.stop(self.config.daemon.stop_timeout_s)
        self.ports.release(server.port)
        if self.children.get(server.name) is server:
            del self.children[server.name]
        log.info("model_unloaded", model=server.name, cause=cause, stop_ms=self._ms(started))
        self._notify("stopped", {"model": server.name, "cause": cause, "pid": server.pid})
        self.dispatch(StopCompleted(server.name, instance, self.now()))

    def _spawn_task(self, coroutine: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("effect_failed", error=repr(task.exception()))

    # ------------------------------------------------------------ shutdown

    async def close(self, drain_s: float) -> None:
        """Queued requests get 503, in-flight ones get drain_s to finish, then every child is stopped."""
        self.closing = True
        self.dispatch(DropWaiters("the daemon is shutting down", self.now()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_until(lambda: not any(s.in_flight for s in self.core.models.values())),
                                   drain_s)
        self.dispatch(UnloadRequested(None, self.now(), force=True, cause="shutdown"))
        everything = list(self.core.models)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_until(lambda: not self._resident(everything)),
                                   self.config.daemon.stop_timeout_s + 5)
        # Whatever is still alive now (a stop that hung) is killed outright.
        for server in list(self.children.values()):
            await server.stop(grace_s=0)
        for lease_id in list(self._holders):
            self._unwatch_holder(lease_id)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()

    # ------------------------------------------------------------ observers

    def _notify(self, kind: str, fields: dict[str, Any]) -> None:
        for observer in list(self.observers):
            try:
                observer(kind, fields)
            except Exception:  # an observer must never break the owner of state
                log.exception("observer_failed", kind=kind)

    def _ms(self, since: float) -> int:
        return round((self.now() - since) * 1000)


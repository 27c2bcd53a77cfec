"""The only owner of the daemon's server processes and their ports.

The runtime sees a small protocol: start a model and get an `Upstream` (where it answers), wait for it to exit
on its own, stop it. `LlamaChildren` runs llama-server (one `process.LlamaServer` per model); tests that need no
binary use `FakeChildren` (tests/fake_children.py), which answers the same protocol in milliseconds.

What a daemon killed outright leaves behind: PR_SET_PDEATHSIG reaches only the direct child, so a `llama_server`
wrapper script that does not exec leaves llama-server running, reparented to PID 1, holding its port and memory.
`LlamaChildren` keeps a record of its running children in `state_dir` (RECORD_NAME) and, when it is created, stops
what a previous daemon's record names and what looks like one of our servers left alone (see `find_leftovers`).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
import psutil
import structlog

from .config import LiveConfig
from .notices import ChildExited, Notice, PromptCacheRestored, PromptCacheSaved
from .promptcache import PromptCache
from .estimate import shard_paths
from .process import (HOST, CmdServer, LlamaServer, LogRing, PortPool, child_environment, group_members,
                      kill_and_wait,
                      option_value, prewarm, start_time)
from .scheduler import StopCause, Upstream

log = structlog.get_logger("supervisor")

RECORD_NAME = "children.json"
SAME_START_S = 0.05  # start times are read from /proc in clock ticks: equal within this


class Children(Protocol):
    async def start(self, model: str) -> Upstream:
        """Start the model's server and return once it answers. Raises (LoadError with the reason, or anything
        else an effect can raise); cancelling it stops what was started."""
        ...

    async def wait_exit(self, model: str) -> tuple[int | None, str] | None:
        """Wait until the model's server exits. (exit code, what it last printed) if it exited on its own; None
        when the daemon stopped it."""
        ...

    async def stop(self, model: str, cause: StopCause) -> int | None:
        """Stop the model's server (SIGTERM, then SIGKILL after stop_timeout_s); its pid, None if none ran."""
        ...

    async def prewarm(self, model: str) -> int:
        """Read the model's files into the page cache; the bytes read."""
        ...

    def log_lines(self, model: str) -> list[str]: ...

    def log(self, model: str) -> LogRing:
        """The model's output ring (kept across restarts), for following it live."""
        ...

    def saved_prompts(self, model: str) -> dict[str, Any] | None:
        """What the model's prompt cache holds on disk (tokens, bytes, slots, age_s), or None."""
        ...

    def reloaded(self) -> None:
        """The live config was replaced."""
        ...

    def process_trees(self) -> dict[int, list[int]]:
        """Each running child's pid with every pid of its process group (what its memory is measured over)."""
        ...

    async def close(self) -> None:
        """Kill whatever is still running, at once."""
        ...


@dataclass(frozen=True)
class Leftover:
    """A process group (pgid) or a single process (pid) a previous daemon left running."""

    model: str | None
    port: int | None
    pids: tuple[int, ...]
    pgid: int | None = None


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("children_record_unreadable", path=str(path), error=str(exc))
        return None
    return record if isinstance(record, dict) else None


def _same_start(pid: int, started: Any) -> bool:
    now = start_time(pid)
    return now is not None and isinstance(started, int | float) and abs(now - started) < SAME_START_S


def _command(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _ours(pid: int) -> bool:
    try:
        return psutil.Process(pid).uids().real == os.getuid()
    except psutil.Error:
        return False


def find_leftovers(record: dict[str, Any] | None, port_range: tuple[int, int]) -> list[Leftover]:
    """What a previous daemon left running. Conservative: only what matches is named.

    - A group in the record, if its leader or a member recorded once it answered is still the same process (same
      pid and start time), or a member has the recorded `--port P` in its command line (the leader, a wrapper's
      shell, died with the daemon).
    - Any process of this user reparented to PID 1, whose command has `--model`, `--alias` and `--port P` with P in
      our port range, and that listens on P: a llama-server we started, left alone.
    """
    found: list[Leftover] = []
    entries = (record or {}).get("children") or []
    owner = (record or {}).get("daemon") or {}
    if entries and isinstance(owner.get("pid"), int) and _same_start(owner["pid"], owner.get("started")):
        # The daemon that wrote it still runs (or this is it): its children are its own.
        log.warning("children_record_in_use", daemon_pid=owner["pid"])
        entries = []
    for entry in entries:
        try:
            pgid, pid, port, model = int(entry["pgid"]), int(entry["pid"]), int(entry["port"]), entry.get("model")
        except (KeyError, TypeError, ValueError):
            continue
        members = [m for m in group_members(pgid) if _ours(m)]
        recorded = [(pid, entry.get("started"))]
        recorded += [tuple(x) for x in entry.get("members") or [] if isinstance(x, list) and len(x) == 2]
        same_process = any(p in members and _same_start(p, started) for p, started in recorded)
        if same_process or any(option_value(_command(m), "--port") == str(port) for m in members):
            found.append(Leftover(model, port, tuple(members), pgid))
    claimed = {pid for leftover in found for pid in leftover.pids}
    first, last = port_range
    for process in psutil.process_iter(["ppid", "uids", "cmdline"]):
        info = process.info
        command = info.get("cmdline") or []
        port = option_value(command, "--port")
        if (process.pid in claimed or info.get("ppid") != 1 or info.get("uids") is None
                or info["uids"].real != os.getuid() or port is None or not port.isdigit()
                or not first <= int(port) <= last or "--model" not in command or "--alias" not in command):
            continue  # fmt: skip
        try:
            connections = getattr(process, "net_connections", None) or process.connections  # psutil < 6
            listening = {c.laddr.port for c in connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
        if int(port) in listening:
            found.append(Leftover(option_value(command, "--alias"), int(port), (process.pid,)))
    return found


def stop_leftovers(record_path: Path, port_range: tuple[int, int]) -> list[Leftover]:
    """Find and SIGKILL what a previous daemon left running; each one is logged (`orphan_stopped`)."""
    leftovers = find_leftovers(read_record(record_path), port_range)
    if not leftovers:
        return []
    for leftover in leftovers:
        for pid in leftover.pids:
            log.warning("orphan_stopped", pid=pid, port=leftover.port, model=leftover.model, pgid=leftover.pgid)
    left = kill_and_wait([x.pgid for x in leftovers if x.pgid is not None],
                         [pid for x in leftovers if x.pgid is None for pid in x.pids])  # fmt: skip
    if left:
        log.error("orphans_still_running", pids=left)
    return leftovers


class LlamaChildren:
    def __init__(self, live: LiveConfig, http: aiohttp.ClientSession, env: dict[str, str] | None = None):
        self.live = live
        self.http = http
        self.env = child_environment() if env is None else env
        first, last = live.current.daemon.port_range  # a restart-only setting
        self.ports = PortPool(first, last)
        self.servers: dict[str, LlamaServer] = {}
        self.logs: dict[str, LogRing] = {}
        self.record_path = live.current.daemon.state_dir / RECORD_NAME  # state_dir is restart-only too
        self._recorded: dict[str, dict[str, Any]] = {}
        self._record_failing = False
        self._daemon = {"pid": os.getpid(), "started": start_time(os.getpid())}
        self.prompt_cache = PromptCache(live, http)
        self.notify: Callable[[Notice], None] = lambda notice: None  # the runtime's, once it exists
        self._answering: set[str] = set()  # models whose child got ready: only those have slots to save
        # Before any child of ours runs: the ports and the memory of what a killed daemon left are ours again.
        stop_leftovers(self.record_path, (first, last))
        self._save_record()

    def _spawned(self, server: LlamaServer) -> None:
        assert server.pid is not None
        self._recorded[server.name] = {"model": server.name, "pid": server.pid, "pgid": server.pid,
                                       "port": server.port, "started": start_time(server.pid)}  # fmt: skip
        self._save_record()

    def _record_members(self, model: str, server: LlamaServer) -> None:
        """Once it answers, what runs in its group (a wrapper's server among them) is recorded by pid and start
        time: found again whatever its command line looks like (a `cmd` server need not take `--port`)."""
        entry = self._recorded.get(model)
        if entry is None or entry["pid"] != server.pid:
            return
        entry["members"] = [[pid, start_time(pid)] for pid in group_members(server.pid)]
        self._save_record()

    def _forget(self, model: str, server: LlamaServer) -> None:
        if self.servers.get(model) is server:
            del self.servers[model]
            self._answering.discard(model)
        if model in self._recorded and self._recorded[model].get("pid") == server.pid:
            del self._recorded[model]
        self._save_record()

    def _save_record(self) -> None:
        """Write the record atomically. A failure (full disk, read-only state_dir) is logged, never raised."""
        record = {"daemon": self._daemon, "children": list(self._recorded.values())}
        temporary = self.record_path.with_name(self.record_path.name + ".tmp")
        try:
            temporary.write_text(json.dumps(record))
            os.replace(temporary, self.record_path)
        except OSError as exc:
            if not self._record_failing:  # once, until a write succeeds again
                log.warning("children_record_unwritable", path=str(self.record_path), error=str(exc),
                            effect="llama-servers left by this daemon if it is killed outright may not be found "
                                   "at the next start")  # fmt: skip
            self._record_failing = True
        else:
            self._record_failing = False

    def _log(self, model: str) -> LogRing:
        ring = self.logs.get(model)
        if ring is None:  # kept across restarts, so a crash can be read afterwards
            ring = self.logs[model] = LogRing(self.live.current.daemon.log_lines)
        return ring

    async def start(self, model: str) -> Upstream:
        config = self.live.current
        spec = config.models[model]
        env = {**self.env, **spec.env_vars()}
        if spec.cmd is not None:
            server: LlamaServer = CmdServer(model, spec.argv(), env, spec.check_endpoint, spec.proxy, self._log(model),
                                            self.http)
        else:
            args = [*spec.args, *self.prompt_cache.child_args(model)]
            server = LlamaServer(model, self.live.binary, spec.model, args, self._log(model), self.http, env)
        server.on_spawn = self._spawned
        self.servers[model] = server
        try:
            await server.start(self.ports, config.daemon.health_timeout_s)
        except Exception:
            self._forget(model, server)  # it stopped what it spawned; a cancelled start is stopped by stop()
            raise
        assert server.port is not None
        self._record_members(model, server)
        upstream = Upstream(server.base_url, server.pid, server.port)
        self._answering.add(model)
        if spec.cmd is not None:
            return upstream  # slots are llama-server's
        restored = await self.prompt_cache.restore(model, upstream.base_url)  # before it is reported ready
        if restored is not None:
            self.notify(PromptCacheRestored(model, restored.slots, restored.tokens, restored.bytes, restored.seconds))
        return upstream

    async def wait_exit(self, model: str) -> tuple[int | None, str] | None:
        server = self.servers.get(model)
        if server is None or server.proc is None:
            return None
        code = await server.wait()
        if server.stopping:
            return None
        self.ports.release(server.port)
        self._forget(model, server)
        return code, server.log.tail()

    async def stop(self, model: str, cause: StopCause) -> int | None:
        server = self.servers.get(model)
        if server is None:
            return None
        if server.returncode is not None and not server.stopping:
            # It died on its own just before this stop was decided (its requests were cut, so it looked idle): the
            # stop completes, but the crash is not hidden behind the stop's cause.
            log.error("model_crashed", model=model, code=server.returncode, during=f"stop ({cause})")
            self.notify(ChildExited(model, server.returncode))
        if cause != "crash" and model in self._answering and server.returncode is None and server.port is not None \
                and not isinstance(server, CmdServer):
            saved = await self.prompt_cache.save(model, f"http://{HOST}:{server.port}")  # bounded, never raises
            if saved is not None:
                self.notify(PromptCacheSaved(model, saved.slots, saved.tokens, saved.bytes, saved.seconds))
        await server.stop(self.live.current.daemon.stop_timeout_s)
        self.ports.release(server.port)
        self._forget(model, server)
        return server.pid

    async def prewarm(self, model: str) -> int:
        path = self.live.current.models[model].model
        return 0 if path is None else await asyncio.to_thread(prewarm, shard_paths(path))

    def log_lines(self, model: str) -> list[str]:
        return self._log(model).lines()

    def log(self, model: str) -> LogRing:
        return self._log(model)

    def saved_prompts(self, model: str) -> dict[str, Any] | None:
        return self.prompt_cache.summary(model)

    def reloaded(self) -> None:
        self.prompt_cache.prune()  # what removed models saved goes with them

    def process_trees(self) -> dict[int, list[int]]:
        return {s.pid: group_members(s.pid) or [s.pid] for s in self.servers.values() if s.pid is not None}

    async def close(self) -> None:
        await self.prompt_cache.flush()
        for server in list(self.servers.values()):
            await server.stop(grace_s=0)
        self.servers.clear()
        self._recorded.clear()
        self._save_record()

"""The only owner of the daemon's server processes and their ports.

The runtime sees a small protocol: start a model and get an `Upstream` (where it answers), wait for it to exit
on its own, stop it. `LlamaChildren` runs llama-server (one `process.LlamaServer` per model); tests that need no
binary use `FakeChildren` (tests/fake_children.py), which answers the same protocol in milliseconds.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import aiohttp

from .config import LiveConfig
from .estimate import shard_paths
from .process import HOST, LlamaServer, LogRing, PortPool, child_environment, prewarm
from .scheduler import StopCause, Upstream


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

    def pids(self) -> list[int]: ...

    async def close(self) -> None:
        """Kill whatever is still running, at once."""
        ...


class LlamaChildren:
    def __init__(self, live: LiveConfig, http: aiohttp.ClientSession, env: dict[str, str] | None = None):
        self.live = live
        self.http = http
        self.env = child_environment() if env is None else env
        first, last = live.current.daemon.port_range  # a restart-only setting
        self.ports = PortPool(first, last)
        self.servers: dict[str, LlamaServer] = {}
        self.logs: dict[str, LogRing] = {}

    def _log(self, model: str) -> LogRing:
        ring = self.logs.get(model)
        if ring is None:  # kept across restarts, so a crash can be read afterwards
            ring = self.logs[model] = LogRing(self.live.current.daemon.log_lines)
        return ring

    async def start(self, model: str) -> Upstream:
        config = self.live.current
        spec = config.models[model]
        server = LlamaServer(model, self.live.binary, spec.model, list(spec.args), self._log(model), self.http,
                             self.env)
        self.servers[model] = server
        try:
            await server.start(self.ports, config.daemon.health_timeout_s)
        except Exception:
            self.servers.pop(model, None)  # it stopped what it spawned; a cancelled start is stopped by stop()
            raise
        assert server.port is not None
        return Upstream(f"http://{HOST}:{server.port}", server.pid, server.port)

    async def wait_exit(self, model: str) -> tuple[int | None, str] | None:
        server = self.servers.get(model)
        if server is None or server.proc is None:
            return None
        code = await server.wait()
        if server.stopping:
            return None
        self.ports.release(server.port)
        if self.servers.get(model) is server:
            del self.servers[model]
        return code, server.log.tail()

    async def stop(self, model: str, cause: StopCause) -> int | None:
        server = self.servers.get(model)
        if server is None:
            return None
        await server.stop(self.live.current.daemon.stop_timeout_s)
        self.ports.release(server.port)
        if self.servers.get(model) is server:
            del self.servers[model]
        return server.pid

    async def prewarm(self, model: str) -> int:
        return await asyncio.to_thread(prewarm, shard_paths(self.live.current.models[model].model))

    def log_lines(self, model: str) -> list[str]:
        return self._log(model).lines()

    def pids(self) -> list[int]:
        return [s.pid for s in self.servers.values() if s.pid is not None]

    async def close(self) -> None:
        for server in list(self.servers.values()):
            await server.stop(grace_s=0)
        self.servers.clear()

"""FakeChildren: the children protocol without processes, for runtime and request-path tests that need no binary.

A start returns at once (or when the test opens its gate), can be made to raise, and a running child can be made
to "crash". Every start and stop is recorded with its cause. `upstreams` points a model at a real HTTP server the
test runs (a fake upstream), so requests can be proxied to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

from aiohttp import web

from model_supervisor.process import LogRing
from model_supervisor.scheduler import StopCause, Upstream


class FakeChildren:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[tuple[str, StopCause]] = []
        self.running: dict[str, int] = {}  # model -> pid
        self.gates: dict[str, asyncio.Event] = {}  # a start of this model waits until the test sets it
        self.failures: dict[str, BaseException] = {}  # the next start of this model raises this
        self.upstreams: dict[str, str] = {}  # model -> base URL of an HTTP server standing in for it
        self.start_entered = asyncio.Event()  # set whenever a start begins (tests wait on it)
        self._exits: dict[str, asyncio.Future[tuple[int | None, str] | None]] = {}
        self._pids = itertools.count(100_000)
        self.logs: dict[str, LogRing] = {}

    def hold(self, model: str) -> asyncio.Event:
        """Make starts of this model wait until the returned event is set."""
        gate = self.gates[model] = asyncio.Event()
        return gate

    async def start(self, model: str) -> Upstream:
        self.started.append(model)
        self.start_entered.set()
        failure = self.failures.pop(model, None)
        if failure is not None:
            raise failure
        gate = self.gates.get(model)
        if gate is not None:
            await gate.wait()
        pid = next(self._pids)
        self.running[model] = pid
        self._exits[model] = asyncio.get_running_loop().create_future()
        return Upstream(self.upstreams.get(model, "http://127.0.0.1:9"), pid, None)

    def crash(self, model: str, code: int = -9) -> None:
        """The running child of this model exits on its own."""
        self.running.pop(model)
        self._exits.pop(model).set_result((code, f"{model} was killed"))

    async def wait_exit(self, model: str) -> tuple[int | None, str] | None:
        exit_ = self._exits.get(model)
        return None if exit_ is None else await exit_

    async def stop(self, model: str, cause: StopCause) -> int | None:
        self.stopped.append((model, cause))
        pid = self.running.pop(model, None)
        exit_ = self._exits.pop(model, None)
        if exit_ is not None and not exit_.done():
            exit_.set_result(None)
        return pid

    async def prewarm(self, model: str) -> int:
        return 0

    def log_lines(self, model: str) -> list[str]:
        return self.log(model).lines()

    def log(self, model: str) -> LogRing:
        return self.logs.setdefault(model, LogRing(100))

    def saved_prompts(self, model: str) -> dict | None:
        return None

    def reloaded(self) -> None:
        pass

    def process_trees(self) -> dict[int, list[int]]:
        return {pid: [pid] for pid in self.running.values()}

    async def close(self) -> None:
        for model in list(self.running):
            await self.stop(model, "shutdown")


@contextlib.asynccontextmanager
async def fake_upstream(handler, port: int = 0):
    """A named fake upstream: an aiohttp server on loopback whose handler stands in for (or misbehaves as) a
    model's server, for faults a real one cannot show on cue. On a free port unless given one."""
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()

"""Wiring: build everything from the config, serve it, shut it down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
import structlog
from aiohttp import web

from .children import Children, LlamaChildren
from .config import Config, ConfigError, LiveConfig, is_loopback
from .errors import ApiError
from .estimate import LearnedStore
from .gaming import GamingStore
from .gpu import Probe, open_probe
from .http.app import Api
from .http.cloud import CloudClient
from .http.documents import take_snapshot
from .http.proxy import Proxy
from .http.site import HeadDeadlines, HeadDeadlineSite
from .ledger import Ledger
from .metrics import Metrics
from .runtime import Runtime
from .watchers import PredictedPreloader
from .scheduler import model_views
from .systemd import Notifier, StatusReporter, describe

log = structlog.get_logger("supervisor")

UPSTREAM_KEEPALIVE_S = 4.0  # below llama-server's own 5 s keep-alive (cpp-httplib's default)


def check_exposure(config: Config) -> None:
    """Refuse to listen beyond loopback unless admin endpoints are protected by a token."""
    host = config.daemon.host
    token_env = config.daemon.admin_token_env
    if not is_loopback(host) and not (token_env and os.environ.get(token_env)):
        raise ConfigError([
            f"daemon.listen: {config.daemon.listen} is not a loopback address; set an admin token in "
            f"${token_env or 'MODEL_SUPERVISOR_ADMIN_TOKEN'} (daemon.admin_token_env) before exposing the daemon"
        ])  # fmt: skip


class Daemon:
    """One running model-supervisor: the HTTP server, the runtime and its children, started and stopped as one.

    Everything is entered into one AsyncExitStack in start(), so stop() (or a failed start) unwinds exactly what
    was set up, in reverse order. The config lives in one LiveConfig that a reload replaces for everyone."""

    def __init__(self, config: Config, binary: str, port: int | None = None, probe: Probe | None = None,
                 config_path: str | None = None, children: Children | None = None):
        self.live = LiveConfig(config, config_path, binary)
        self.port = config.daemon.port if port is None else port
        self.probe = probe
        self.children = children  # None: llama-server children (tests may pass fakes)
        self.runtime: Runtime | None = None
        self.proxy: Proxy | None = None
        self.ledger: Ledger | None = None
        self.metrics: Metrics | None = None
        self.runner: web.AppRunner | None = None
        self._stack = contextlib.AsyncExitStack()
        self._sites: list[web.BaseSite] = []

    @property
    def config(self) -> Config:
        return self.live.current

    @property
    def url(self) -> str:
        host = self.config.daemon.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self) -> None:
        config = self.config
        check_exposure(config)
        stack = self._stack
        # One pool for health checks and proxying: upstream connections are reused across requests. llama-server
        # closes a connection idle for 5 s; the pool lets go of one sooner, so a request is not sent on a
        # connection the server is closing (it would be sent again, but only after the failed try).
        http = await stack.enter_async_context(aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=None),
        ))  # fmt: skip
        if self.probe is None:
            self.probe = open_probe(config.gpu.backend, config.gpu.device)
        stack.callback(self.probe.close)
        state_dir_ok = self._state_dir_usable()
        learned = LearnedStore(config.daemon.state_dir) if state_dir_ok else None
        gaming = GamingStore(config.daemon.state_dir) if state_dir_ok else None
        if self.children is None:
            self.children = LlamaChildren(self.live, http)
        runtime = self.runtime = Runtime(self.live, self.children, self.probe, learned, gaming)
        if isinstance(self.children, LlamaChildren):
            self.children.notify = runtime.notify
        await runtime.start()
        stack.push_async_callback(runtime.close)  # for a failed start; a normal stop closes it in _stop_serving
        live = self.live
        self.proxy = Proxy(runtime, http, CloudClient(lambda: live.current, http))
        stack.callback(self.proxy.pool.close)
        self.metrics = Metrics(lambda: take_snapshot(runtime))
        runtime.observers.append(self.metrics.on_notice)
        self.proxy.observers.append(self.metrics.on_request)
        self.proxy.observers.append(runtime.history.on_request)
        self.proxy.observers.append(lambda record: runtime.poke())  # /events carries the new latency figures
        self.proxy.probe_observers.append(self.metrics.on_probe)
        # Without a usable state_dir there is no ledger; requests are served all the same.
        self.ledger = Ledger.open(lambda: live.current) if state_dir_ok else None
        if self.ledger is not None:
            self.proxy.observers.append(self.ledger.record)
            runtime.spawn(PredictedPreloader(runtime, self.ledger).run())  # does nothing while predict_preload is off
            # Closed after the handlers are gone, so every request is in its queue; close() writes it all out.
            stack.push_async_callback(asyncio.to_thread, self.ledger.close)
        heads = HeadDeadlines(config.daemon.header_timeout_s)
        stack.callback(heads.close)
        api = Api(runtime, self.proxy, self.metrics, self.ledger, heads)
        # handler_cancellation: a client that disconnects cancels its handler, which cancels the upstream call.
        # lingering_time: after an early answer (413, 408) the rest of a body is read and dropped this long at most.
        runner = self.runner = web.AppRunner(api.app(), handler_cancellation=True, access_log=None,
                                             keepalive_timeout=config.daemon.keepalive_timeout_s, lingering_time=2.0,
                                             shutdown_timeout=5.0)  # in-flight requests were drained before cleanup
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = HeadDeadlineSite(runner, config.daemon.host, self.port, heads)
        # Unwound first on the way out: no new connections, then the drain, while open ones are still served.
        stack.push_async_callback(self._stop_serving)
        await site.start()
        self._sites.append(site)
        if self.port == 0:  # tests ask for any free port
            self.port = runner.addresses[0][1]
        log.info("daemon_started", url=self.url, models=sorted(config.models), llama_server=self.live.binary)

    async def preload(self, before_each: Callable[[str], None] | None = None) -> list[str]:
        """Load the models marked preload = true, one after another; those that loaded. A failure is logged and
        the daemon serves all the same (the model loads again on its first request)."""
        assert self.runtime is not None
        loaded = []
        for name, model in self.config.models.items():
            if not model.preload:
                continue
            if before_each is not None:
                before_each(name)
            try:
                await self.runtime.load(name)
            except ApiError as exc:
                log.error("preload_failed", model=name, code=exc.code, error=exc.message.splitlines()[0])
                continue
            log.info("preloaded", model=name)
            loaded.append(name)
        return loaded

    async def _stop_serving(self) -> None:
        log.info("daemon_stopping")
        for site in self._sites:
            await site.stop()
        if self.runtime is not None:
            await self.runtime.close()

    async def reload(self) -> dict:
        """Re-read the config file (SIGHUP, POST /reload). Raises ConfigError, keeping the old config."""
        assert self.runtime is not None
        try:
            return await self.runtime.reload()
        except ConfigError as exc:
            log.error("config_reload_refused", path=self.live.path, problems=exc.problems)
            raise

    def _state_dir_usable(self) -> bool:
        state_dir = self.config.daemon.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("state_dir_unusable", state_dir=str(state_dir), error=str(exc),
                        effect="measured memory figures and gaming mode are not kept across restarts")
            return False
        return True

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (drain_timeout_s as configured now), answer queued ones
        with 503, stop the children, write the ledger out."""
        await self._stack.aclose()
        log.info("daemon_stopped")


T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run the daemon's coroutine to the end on uvloop where it is installed, else on asyncio's own loop.

    The request path is event-loop bound (two sockets and a handful of callbacks per request, a read and a write per
    streamed chunk): uvloop's libuv loop and C transports take less CPU for each, CPU that on a small host is the
    model's. asyncio remains the fallback (a platform without uvloop) and what the tests run on."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


# Startup work before READY=1 (memory probe, restoring gaming mode) gets this much on top of TimeoutStartSec.
START_EXTENSION_S = 60
# Time for the process to exit after the children are gone (runner cleanup, closing the probe).
STOP_MARGIN_S = 15


async def serve(config: Config, binary: str, notifier: Notifier | None = None, config_path: str | None = None) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP re-reads the config. Returns the exit code. Tells systemd
    (Type=notify) how it goes."""
    notifier = notifier if notifier is not None else Notifier.from_environment()
    daemon = Daemon(config, binary, config_path=config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    reloads: set[asyncio.Task[None]] = set()

    async def reload_now() -> None:
        notifier.reloading()
        try:
            await daemon.reload()
        except ConfigError:
            pass  # logged by Daemon.reload, with the reasons; the old config stays in force
        except Exception:  # whatever went wrong, systemd must hear READY=1 again
            log.exception("config_reload_failed")
        finally:
            notifier.ready(status.current() if status is not None else "ready")

    def reload() -> None:
        if daemon.runtime is None or config_path is None:
            return
        task = asyncio.ensure_future(reload_now())  # reading GGUFs happens off the loop: it takes a task
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    status: StatusReporter | None = None
    loop.add_signal_handler(signal.SIGHUP, reload)
    notifier.extend_timeout(START_EXTENSION_S)
    notifier.status("starting")
    try:
        await daemon.start()
    except OSError as exc:
        log.error("cannot_listen", listen=config.daemon.listen, error=str(exc))
        notifier.status(f"cannot listen on {config.daemon.listen}: {exc}")
        await daemon.stop()
        notifier.close()
        return 1
    runtime = daemon.runtime
    assert runtime is not None

    def preloading(name: str) -> None:
        # Each preload gets its own extension: a slow load is not killed by TimeoutStartSec, a hung one still is.
        notifier.extend_timeout(daemon.config.daemon.queue_timeout_s + daemon.config.daemon.health_timeout_s + 30)
        notifier.status(f"starting: loading {name} (preload)")

    # Before READY=1, so the models marked preload are ready when systemd says the service is; a SIGTERM meanwhile
    # ends the preloads.
    preloads = asyncio.ensure_future(daemon.preload(preloading))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({preloads, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not preloads.done():
        preloads.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await preloads
    status = StatusReporter(notifier, lambda: describe(model_views(runtime.core, runtime.now()), runtime.gaming))
    runtime.observers.append(status.changed)
    first = status.current()
    notifier.ready(first)  # the HTTP server answers from here on
    status.sent(first)
    watchdog = asyncio.create_task(notifier.run_watchdog())
    try:
        await stop.wait()
        # Draining in-flight requests and stopping children may take longer than TimeoutStopSec when the config
        # asks for long bounds: say so, so systemd does not SIGKILL a drain that is within them.
        status.prefix = "stopping: "
        notifier.stopping(status.current())
        settings = daemon.config.daemon  # as the last reload left them
        notifier.extend_timeout(settings.drain_timeout_s + settings.stop_timeout_s + STOP_MARGIN_S)
        await daemon.stop()
    finally:
        # Pings went on while stopping; a stop that hangs is bounded by the unit's stop timeout, not the watchdog.
        watchdog.cancel()
        status.close()
        notifier.close()
    return 0

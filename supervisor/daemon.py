"""Wiring: build everything from the config, serve it, shut it down cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from .api import Api
from .config import Config, ConfigError, is_loopback
from .driver import Driver
from .estimate import LearnedStore
from .fallback import CloudClient
from .gaming import GamingStore
from .gpu import Probe, open_probe
from .ledger import Ledger
from .metrics import Metrics
from .proxy import Proxy
from .systemd import Notifier, StatusReporter, describe

log = structlog.get_logger("supervisor")


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
    """One running model-supervisor: the HTTP server, the scheduler's owner and its children."""

    def __init__(self, config: Config, binary: str, port: int | None = None, probe: Probe | None = None,
                 config_path: str | None = None):
        self.config = config
        self.config_path = config_path  # what SIGHUP and POST /reload re-read
        self.binary = binary
        self.port = config.daemon.port if port is None else port
        self.probe = probe
        self.driver: Driver | None = None
        self.proxy: Proxy | None = None
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        host = self.config.daemon.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    async def start(self) -> None:
        check_exposure(self.config)
        # One pool for health checks and proxying: upstream connections are reused across requests.
        self._http = aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        if self.probe is None:
            self.probe = open_probe(self.config.gpu.backend, self.config.gpu.device)
        state_dir_ok = self._state_dir_usable()
        learned = LearnedStore(self.config.daemon.state_dir) if state_dir_ok else None
        gaming = GamingStore(self.config.daemon.state_dir) if state_dir_ok else None
        self.driver = Driver(self.config, self.binary, self._http, self.probe, learned, gaming)
        await self.driver.start()
        driver = self.driver
        cloud = CloudClient(lambda: driver.config, self._http)
        self.proxy = Proxy(self.driver, self._http, cloud)
        self.metrics = Metrics(self.driver)
        self.driver.observers.append(self.metrics.on_event)
        self.proxy.observers.append(self.metrics.on_request)
        # Without a usable state_dir there is no ledger; requests are served all the same.
        # The live config, as the proxy sees it: a reload may change prices.
        self.ledger = Ledger.open(lambda: self.driver.config) if state_dir_ok else None
        if self.ledger is not None:
            self.proxy.observers.append(self.ledger.record)
        api = Api(self.driver, self.proxy, self.ledger)
        api.metrics = self.metrics
        if self.config_path is not None:
            api.reloader = self.reload
        # handler_cancellation: a client that disconnects cancels its handler, which cancels the upstream call.
        # lingering_time: after an early answer (413, 408) the rest of a body is read and dropped this long at most.
        self._runner = web.AppRunner(api.app(), handler_cancellation=True, access_log=None,
                                     keepalive_timeout=self.config.daemon.keepalive_timeout_s, lingering_time=2.0,
                                     shutdown_timeout=5.0)  # in-flight requests were drained before cleanup
        await self._runner.setup()
        site = HeadDeadlineSite(self._runner, self.config.daemon.host, self.port,
                                self.config.daemon.header_timeout_s, api.heads_received)
        await site.start()
        if self.port == 0:  # tests ask for any free port
            self.port = self._runner.addresses[0][1]
        log.info("daemon_started", url=self.url, models=sorted(self.config.models), llama_server=self.binary)

    def reload(self) -> dict:
        """Re-read the config file (SIGHUP, POST /reload). Raises ConfigError, keeping the old config."""
        assert self.driver is not None and self.config_path is not None
        try:
            return self.driver.reload(self.config_path)
        except ConfigError as exc:
            log.error("config_reload_refused", path=self.config_path, problems=exc.problems)
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
        """Stop accepting, let in-flight requests finish (bounded), answer queued ones with 503, stop children."""
        log.info("daemon_stopping")
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()  # no new connections; open ones keep being served while they drain
        if self.driver is not None:
            await self.driver.close(drain_s=self.config.daemon.drain_timeout_s)
        if self._runner is not None:
            await self._runner.cleanup()
        ledger = getattr(self, "ledger", None)  # absent when start() failed before creating it
        if ledger is not None:
            # After the handlers are gone, so every request is in the queue; close() writes it all out.
            await asyncio.to_thread(ledger.close)
        if self._http is not None:
            await self._http.close()
        if self.probe is not None:
            self.probe.close()
        log.info("daemon_stopped")


_HEAD_TIMEOUT_BODY = json.dumps({"error": {"message": "the request head did not arrive in time",
                                           "type": "invalid_request_error", "code": "header_timeout"}}).encode()
REQUEST_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_HEAD_TIMEOUT_BODY), _HEAD_TIMEOUT_BODY)
)


class HeadDeadlineSite(web.BaseSite):
    """A TCP site whose connections must send a complete request head within timeout_s of connecting.

    aiohttp has no such timeout: a client trickling header bytes (slowloris) would hold a connection forever.
    The API's middleware records each connection that got a head in; the rest get a 408 and are closed. (A slow
    head on a later keep-alive request is bounded by keepalive_timeout_s instead.)"""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, timeout_s: float, heads: set[int]):
        super().__init__(runner)
        self._host, self._port, self._timeout_s, self._heads = host, port, timeout_s, heads

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        factory = self._runner.server
        assert factory is not None

        def connection() -> asyncio.Protocol:
            handler = factory()
            loop.call_later(self._timeout_s, self._deadline, handler)
            return handler

        self._server = await loop.create_server(connection, self._host, self._port, reuse_address=True)

    def _deadline(self, handler: Any) -> None:
        if id(handler) in self._heads:
            self._heads.discard(id(handler))
            return
        transport = handler.transport
        if transport is not None and not transport.is_closing():
            transport.write(REQUEST_TIMEOUT_408)
            transport.close()


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

    def reload() -> None:
        if daemon.driver is None or config_path is None:
            return
        notifier.reloading()
        try:
            daemon.reload()
        except ConfigError:
            pass  # logged by Daemon.reload, with the reasons; the old config stays in force
        notifier.ready(status.current() if status is not None else "ready")

    status: StatusReporter | None = None
    loop.add_signal_handler(signal.SIGHUP, reload)
    notifier.extend_timeout(START_EXTENSION_S)
    notifier.status("starting")
    try:
        await daemon.start()
        # Startup preloads of models would go here, before READY=1: each one preceded by
        # notifier.extend_timeout(config.daemon.health_timeout_s + margin), so a slow load is not killed by
        # TimeoutStartSec while a hung one still is.
    except OSError as exc:
        log.error("cannot_listen", listen=config.daemon.listen, error=str(exc))
        notifier.status(f"cannot listen on {config.daemon.listen}: {exc}")
        await daemon.stop()
        notifier.close()
        return 1
    driver = daemon.driver
    assert driver is not None
    status = StatusReporter(notifier, lambda: describe(driver.core.views(driver.now()), driver.gaming))
    driver.observers.append(status.changed)
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
        notifier.extend_timeout(config.daemon.drain_timeout_s + config.daemon.stop_timeout_s + STOP_MARGIN_S)
        await daemon.stop()
    finally:
        # Pings went on while stopping; a stop that hangs is bounded by the unit's stop timeout, not the watchdog.
        watchdog.cancel()
        status.close()
        notifier.close()
    return 0

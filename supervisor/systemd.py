"""systemd's notify protocol (sd_notify(3)), written by hand: one datagram per message to $NOTIFY_SOCKET.

- `Notifier.from_environment()` reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID and removes them from
  os.environ, so nothing started later inherits them (llama-server children also get an allow-listed environment
  that never has them). Without NOTIFY_SOCKET every method is a no-op.
- Sending never blocks the event loop and never raises: a vanished socket is logged once.
- `run_watchdog()` pings from the event loop itself, so a loop that is stuck stops pinging and systemd restarts
  the service.
- `StatusReporter` turns model-state changes into throttled STATUS= lines.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import structlog

log = structlog.get_logger("supervisor.systemd")

ENV_NAMES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Messages to the service manager. Disabled (every call a no-op) when there is no socket."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._target: str | bytes | None = _socket_address(address) if address else None
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        # Popped, not read: a child started later must not report to systemd on our behalf.
        address, usec, pid = (env.pop(name, None) for name in ENV_NAMES)
        watchdog: int | None = None
        try:
            # WATCHDOG_PID names the process the watchdog is meant for: when it is another one (we were started
            # by a wrapper that is the service's main process), pinging would be refused anyway.
            if usec and (not pid or int(pid) == os.getpid()):
                watchdog = int(usec) if int(usec) > 0 else None
        except ValueError:
            log.warning("watchdog_env_invalid", watchdog_usec=usec, watchdog_pid=pid)
        if address and not address.startswith(("/", "@")):
            log.warning("notify_socket_unsupported", notify_socket=address, effect="no readiness notifications")
            address = None
        return cls(address or None, watchdog)

    @property
    def enabled(self) -> bool:
        return self._target is not None

    # ------------------------------------------------------------ messages

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        """Config reload begins (SIGHUP); READY=1 follows when it is done. systemd wants the monotonic time."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more from now for the current phase (start, run or stop); systemd >= 236."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the watchdog timeout, as sd_watchdog_enabled(3) advises; None if off."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    async def run_watchdog(self) -> None:
        """Ping until cancelled. Runs on the event loop on purpose: if the loop stalls, the pings stop."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def send(self, *fields: str) -> bool:
        if self._target is None:
            return False
        message = "\n".join(fields)
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never wait on a full queue: a blocked send would stall the loop that the watchdog watches.
                self._socket.setblocking(False)
            self._socket.sendto(message.encode(), self._target)
        except OSError as exc:
            if not self._failed:  # once: a socket that is gone stays gone, and pings come every few seconds
                self._failed = True
                log.warning("notify_failed", notify_socket=self.address, message=message.split("\n")[0],
                            error=str(exc), effect="systemd is not told about this daemon's state")
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(address: str) -> str | bytes:
    # '@name' is an abstract socket: a leading NUL byte instead of a path.
    return b"\0" + address[1:].encode() if address.startswith("@") else address


# ---------------------------------------------------------------- STATUS= lines


def describe(views: Iterable[Any], gaming: bool) -> str:
    """'2 models: a ready, b unloaded; gaming off' (views: scheduler.ModelView), shown by `systemctl status`."""
    views = list(views)
    models = ", ".join(f"{view.name} {view.state}" for view in views)
    return f"{len(views)} model{'' if len(views) == 1 else 's'}: {models}; gaming {'on' if gaming else 'off'}"


class StatusReporter:
    """Sends STATUS= when the text changes, at most once per `min_interval_s`; the last change is always sent.

    `changed` is a runtime observer. It only schedules: the text is built in a later loop callback, because
    observers are called just before the runtime applies the event they announce."""

    def __init__(self, notifier: Notifier, text: Callable[[], str], min_interval_s: float = 0.25):
        self.notifier = notifier
        self.text = text
        self.min_interval_s = min_interval_s
        self.prefix = ""  # e.g. "stopping: " while shutting down
        self._last_text: str | None = None
        self._last_sent = float("-inf")
        self._handle: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def current(self) -> str:
        return self.prefix + self.text()

    def sent(self, text: str) -> None:
        """Record a status that went out with another message (READY=1 carries the first one)."""
        self._last_text, self._last_sent = text, time.monotonic()

    def changed(self, notice: object = None) -> None:
        if not self.notifier.enabled or self._handle is not None:
            return  # a flush is already due and will read the newest state
        delay = max(0.0, self._last_sent + self.min_interval_s - time.monotonic())
        self._handle = self._loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._handle = None
        try:
            text = self.current()
        except Exception:  # a status line must never take the daemon down
            log.exception("status_text_failed")
            return
        if text != self._last_text:
            self.notifier.status(text)
            self.sent(text)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

"""One llama-server child: spawn, readiness, output, stop. It knows nothing of policy.

- Spawned on 127.0.0.1 with a port from the daemon's range, in its own process group, with a minimal environment.
- It dies with the daemon even on SIGKILL: PR_SET_PDEATHSIG is set in the child before exec.
- Readiness: /health is polled from the first milliseconds with a short backoff, and checked again at once whenever
  the child prints something (it logs as it comes up), so ready is seen within a few ms of being true.
- An early exit is seen at once (the exit races the poll) and reported with the child's last lines.
- Stop: SIGTERM to the group, SIGKILL after a bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import signal
import socket
from collections.abc import Iterable
from pathlib import Path

import aiohttp

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1
FIRST_POLL_S = 0.002
MAX_POLL_S = 0.1
BIND_FAILURE_MARKERS = ("couldn't bind", "address already in use", "failed to bind")

# Variables a child may need to find its GPU, libraries and locale. Everything else (cloud keys, tokens,
# NOTIFY_SOCKET) stays with the daemon.
CHILD_ENV_NAMES = {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "USER", "LOGNAME"}
CHILD_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "HIP_", "ROCR_", "HSA_", "GPU_", "GGML_", "VK_", "OMP_", "AMD_")

try:  # Loaded once in the parent: the child must not load libraries between fork and exec.
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: children are still stopped on every clean exit
    _prctl = None


class LoadError(Exception):
    """The child did not become ready. The message says why, with its last output lines."""


def child_environment(source: dict[str, str] | None = None) -> dict[str, str]:
    source = dict(os.environ if source is None else source)
    return {
        key: value
        for key, value in source.items()
        if key in CHILD_ENV_NAMES or key.startswith(CHILD_ENV_PREFIXES)
    }


class LogRing:
    """The last N lines a model's children printed, kept across restarts so a crash can be read afterwards."""

    def __init__(self, max_lines: int):
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._partial = ""
        self.changed = asyncio.Event()

    def feed(self, data: bytes) -> None:
        text = self._partial + data.decode("utf-8", errors="replace")
        *complete, self._partial = text.split("\n")
        self._lines.extend(line.rstrip("\r") for line in complete)
        self.changed.set()

    def flush(self) -> None:
        if self._partial:
            self._lines.append(self._partial)
            self._partial = ""

    def mark(self, text: str) -> None:
        self.flush()
        self._lines.append(f"--- {text} ---")

    def lines(self) -> list[str]:
        return list(self._lines)

    def tail(self, count: int = 15) -> str:
        return "\n".join(list(self._lines)[-count:])


class PortPool:
    """Hands out ports of the configured range that no child holds and that nothing else is listening on."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self._held: set[int] = set()
        self._next = first

    def acquire(self, avoid: Iterable[int] = ()) -> int:
        avoid = set(avoid)
        size = self.last - self.first + 1
        for offset in range(size):
            port = self.first + (self._next - self.first + offset) % size
            if port in self._held or port in avoid or not _bindable(port):
                continue
            self._held.add(port)
            self._next = port + 1 if port < self.last else self.first
            return port
        raise LoadError(f"no free port in port_range {self.first}-{self.last}")

    def release(self, port: int | None) -> None:
        self._held.discard(port)  # type: ignore[arg-type]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As llama-server binds (SO_REUSEADDR): a port left in TIME_WAIT by a stopped child is free, only a live
        # listener makes it taken. Without this, a busy swapping host runs out of ports within a minute.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


PREWARM_CHUNK = 8 * 1024 * 1024


def prewarm(paths: Iterable[Path]) -> int:
    """Read these files through the page cache now, so the load that follows does not wait on the disk; returns the
    bytes read. A single posix_fadvise(WILLNEED) only starts the kernel's read-ahead window (a few MB), so the file
    is read for real, in large chunks into one reused buffer. Blocking: run it in a thread."""
    total = 0
    buffer = bytearray(PREWARM_CHUNK)
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger read-ahead meanwhile
                while read := handle.readinto(buffer):
                    total += read
        except OSError:
            continue  # a missing file fails at load with llama-server's own message
    return total


def _die_with_parent(parent_pid: int) -> None:
    # Runs in the child between fork and exec: only async-signal-safe work here.
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the daemon died before prctl took effect
        os._exit(1)


class LlamaServer:
    """One llama-server process for one model."""

    def __init__(
        self,
        name: str,
        binary: str,
        model_path: Path,
        args: list[str],
        log: LogRing,
        http: aiohttp.ClientSession,
        env: dict[str, str] | None = None,
    ):
        self.name = name
        self.binary = binary
        self.model_path = model_path
        self.args = args
        self.log = log
        self.http = http
        self.env = child_environment() if env is None else env
        self.port: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def command(self, port: int) -> list[str]:
        return [
            self.binary,
            "--model", str(self.model_path),
            "--host", HOST,
            "--port", str(port),
            "--alias", self.name,
            *self.args,
        ]  # fmt: skip

    async def spawn(self, port: int) -> None:
        self.port = port
        self.log.mark(f"starting {self.name} on port {port}")
        parent = os.getpid()
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # its own process group: a stop reaches whatever it forks
            preexec_fn=lambda: _die_with_parent(parent),
        )
        self._reader = asyncio.create_task(self._read_output(self.proc.stdout))

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once /health answers 200; raise LoadError on early exit or after timeout_s."""
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        exited = asyncio.ensure_future(self.proc.wait())
        delay = FIRST_POLL_S
        try:
            while True:
                if exited.done():
                    await self._drain_output()
                    raise LoadError(f"llama-server exited with code {self.proc.returncode} while loading; "
                                    f"last output:\n{self.log.tail()}")
                if await self._healthy():
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    await self.stop(grace_s=2)
                    raise LoadError(f"llama-server was not ready after {timeout_s:g} s (health_timeout_s); "
                                    f"last output:\n{self.log.tail()}")
                self.log.changed.clear()
                output = asyncio.ensure_future(self.log.changed.wait())
                await asyncio.wait({exited, output}, timeout=min(delay, remaining),
                                   return_when=asyncio.FIRST_COMPLETED)
                output.cancel()
                delay = min(delay * 1.5, MAX_POLL_S)
        finally:
            if not exited.done():
                exited.cancel()

    async def start(self, ports: PortPool, timeout_s: float, attempts: int = 3) -> None:
        """Spawn on a free port and wait until ready. If another program takes the port first, try another."""
        tried: list[int] = []
        while True:
            port = ports.acquire(avoid=tried)
            tried.append(port)
            await self.spawn(port)
            try:
                await self.wait_ready(timeout_s)
                return
            except BaseException as exc:
                ports.release(port)
                await self.stop(grace_s=2)
                if isinstance(exc, LoadError) and self.bind_failed() and len(tried) < attempts:
                    self.log.mark(f"port {port} was taken by another program; trying another")
                    self.stopping = False
                    continue
                raise

    def bind_failed(self) -> bool:
        tail = self.log.tail(8).lower()
        return any(marker in tail for marker in BIND_FAILURE_MARKERS)

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        await self._drain_output()
        return code

    async def stop(self, grace_s: float) -> None:
        """SIGTERM the group, SIGKILL it after grace_s. Safe to call more than once."""
        self.stopping = True
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s)
            except TimeoutError:
                self.log.mark(f"no exit {grace_s:g} s after SIGTERM: SIGKILL")
                self._signal_group(signal.SIGKILL)
                await self.proc.wait()
        # The group may hold helpers the child forked; none may outlive it.
        self._signal_group(signal.SIGKILL)
        await self._drain_output()

    def _signal_group(self, signum: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    async def _healthy(self) -> bool:
        try:
            async with self.http.get(f"http://{HOST}:{self.port}/health",
                                     timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _read_output(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        while chunk := await stream.read(65536):
            self.log.feed(chunk)
        self.log.flush()

    async def _drain_output(self) -> None:
        if self._reader is not None:
            # The pipe closes when the child (and its group) is gone; bound the wait in case a grandchild holds it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), 1.0)

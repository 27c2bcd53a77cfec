"""One llama-server child: spawn, readiness, output, stop. It knows nothing of policy.

- Spawned on 127.0.0.1 with a port from the daemon's range, in its own process group, with a minimal environment.
- It dies with the daemon even on SIGKILL: PR_SET_PDEATHSIG is set in the child before exec.
- Readiness: /health is polled from the first milliseconds with a short backoff, and checked again at once whenever
  the child prints something (it logs as it comes up), so ready is seen within a few ms of being true.
- An early exit is seen at once (the exit races the poll) and reported with the child's last lines.
- Stop: SIGTERM to the group, SIGKILL after a bound; done once no process of the group is left, so a wrapper
  script that runs llama-server without exec is stopped whole too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import aiohttp
import yarl
import psutil

from .changes import Changes

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1
FIRST_POLL_S = 0.002
MAX_POLL_S = 0.1
BIND_FAILURE_MARKERS = ("couldn't bind", "address already in use", "failed to bind")
# After the group's SIGKILL: how long its members may take to exit (a GPU context can take seconds to tear down).
GROUP_EXIT_S = 10.0

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
        self.total = 0  # lines ever added: a follower's cursor
        self._grown = Changes()  # every follower wakes once per addition

    def _add(self, lines: list[str]) -> None:
        if not lines:
            return
        self._lines.extend(lines)
        self.total += len(lines)
        self._grown.notify()

    def feed(self, data: bytes) -> None:
        text = self._partial + data.decode("utf-8", errors="replace")
        *complete, self._partial = text.split("\n")
        self._add([line.rstrip("\r") for line in complete])
        self.changed.set()

    def flush(self) -> None:
        if self._partial:
            self._add([self._partial])
            self._partial = ""

    def mark(self, text: str) -> None:
        self.flush()
        self._add([f"--- {text} ---"])

    def since(self, cursor: int) -> tuple[list[str], int]:
        """The lines added after cursor that are still kept, and the new cursor."""
        kept = min(len(self._lines), max(0, self.total - cursor))
        return (list(self._lines)[len(self._lines) - kept:] if kept else []), self.total

    async def grown(self) -> None:
        """Return once a line is added."""
        await self._grown.wait()

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


def _stat(pid: int | str) -> tuple[bytes, int, int] | None:
    """(state, parent pid, process group) of a process from /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
    return (fields[0], int(fields[1]), int(fields[2])) if len(fields) > 2 else None


def alive(pid: int) -> bool:
    """Running, not a zombie (a zombie has let go of its ports and memory)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in (b"Z", b"X")


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid`, zombies not counted."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []  # the common case, answered without reading /proc
    except PermissionError:
        pass
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    members = []
    for name in names:
        if name.isdigit() and (stat := _stat(name)) is not None and stat[2] == pgid and stat[0] not in (b"Z", b"X"):
            members.append(int(name))
    return members


def start_time(pid: int) -> float | None:
    """When the process started (seconds since the epoch, as psutil reads it), None if it is gone. With the pid it
    names one process: a pid reused later has another start time."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def option_value(command: list[str], option: str) -> str | None:
    """The value after `option` in an argument list (`--port 5800`), None if absent."""
    for index, word in enumerate(command[:-1]):
        if word == option:
            return command[index + 1]
    return None


def kill_and_wait(pgids: Iterable[int], pids: Iterable[int], timeout_s: float = GROUP_EXIT_S) -> list[int]:
    """SIGKILL these process groups and processes, and wait (polling: they are not our children) until none is
    left, at most timeout_s. Returns the pids still alive then. Blocking: for startup, before anything serves."""
    pgids, pids = list(pgids), list(pids)
    for kill, target in [(os.killpg, pgid) for pgid in pgids] + [(os.kill, pid) for pid in pids]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(target, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    delay = FIRST_POLL_S
    while True:
        left = [pid for pgid in pgids for pid in group_members(pgid)] + [pid for pid in pids if alive(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(delay)
        delay = min(delay * 1.5, MAX_POLL_S)


def _die_with_parent(parent_pid: int) -> None:
    # Runs in the child between fork and exec: only async-signal-safe work here.
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the daemon died before prctl took effect
        os._exit(1)


class _ChildProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Says when the child itself exits (Process.wait() also waits for its pipes to close, and behind a wrapper
    that does not exec, llama-server holds them after the shell is gone), and hands its output straight to the
    log ring as it is read: no stream reader and no task woken per write (llama-server writes ~1 KB of log lines
    per request; reading them through a StreamReader cost the daemon ~0.1 ms of CPU per request)."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop, on_output: Callable[[bytes], None]):
        super().__init__(limit=limit, loop=loop)
        self.exited = asyncio.Event()
        self.output_closed = asyncio.Event()
        self._on_output = on_output

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self._on_output(data)

    def pipe_connection_lost(self, fd: int, exc: BaseException | None) -> None:
        super().pipe_connection_lost(fd, exc)
        if fd == 1:  # stdout, stderr merged into it
            self.output_closed.set()

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


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
        self.on_spawn: Callable[[LlamaServer], None] | None = None  # the owner records what runs, for a restart
        self.kind = "llama-server"  # what the messages call it
        self._exited = asyncio.Event()  # the child (not its pipes) is gone: set by _ChildProtocol
        self._output_closed: asyncio.Event | None = None

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
        loop = asyncio.get_running_loop()
        # As asyncio.create_subprocess_exec, with a protocol that reports the child's own exit.
        transport, protocol = await loop.subprocess_exec(
            lambda: _ChildProtocol(limit=2**16, loop=loop, on_output=self.log.feed),
            *self.command(port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # its own process group: a stop reaches whatever it forks
            preexec_fn=lambda: _die_with_parent(parent),
        )
        self.proc = asyncio.subprocess.Process(transport, protocol, loop)
        self._exited = protocol.exited
        self._output_closed = protocol.output_closed
        if self.on_spawn is not None:
            self.on_spawn(self)

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once /health answers 200; raise LoadError on early exit or after timeout_s."""
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        exited = asyncio.ensure_future(self._exited.wait())
        delay = FIRST_POLL_S
        try:
            while True:
                if exited.done():
                    await self._drain_output()
                    raise LoadError(f"{self.kind} exited with code {self.proc.returncode} while loading; "
                                    f"last output:\n{self.log.tail()}")
                if await self._healthy():
                    return
                self._check_progress()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    await self.stop(grace_s=2)
                    raise LoadError(f"{self.kind} was not ready after {timeout_s:g} s (health_timeout_s); "
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

    def _check_progress(self) -> None:
        """Raise LoadError when it is clear the child can never become ready (subclasses)."""

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def bind_failed(self) -> bool:
        tail = self.log.tail(8).lower()
        return any(marker in tail for marker in BIND_FAILURE_MARKERS)

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self._exit_code()
        if not self.stopping and group_members(self.proc.pid):
            # A wrapper that died on its own leaves its llama-server holding the port and the memory: none may
            # outlive the child we know. (A stop in progress gives the group its grace instead.)
            self.log.mark("the child exited; stopping what is left of its process group")
            self._signal_group(signal.SIGKILL)
            await self._group_gone(GROUP_EXIT_S)
        await self._drain_output()
        return code

    async def stop(self, grace_s: float) -> None:
        """SIGTERM the group, SIGKILL it after grace_s; return once none of it is left. Safe to call more than
        once."""
        self.stopping = True
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                # The whole group gets the grace: behind a wrapper that does not exec, the shell exits at once
                # and llama-server is still shutting down.
                await asyncio.wait_for(self._exited_whole(), grace_s)
            except TimeoutError:
                self.log.mark(f"no exit {grace_s:g} s after SIGTERM: SIGKILL")
                self._signal_group(signal.SIGKILL)
                await self._exit_code()
        # The group may hold helpers the child forked; none may outlive it.
        self._signal_group(signal.SIGKILL)
        if not await self._group_gone(GROUP_EXIT_S):
            self.log.mark(f"process group {self.proc.pid} still has members {GROUP_EXIT_S:g} s after SIGKILL")
        await self._drain_output()

    async def _exit_code(self) -> int:
        assert self.proc is not None
        await self._exited.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def _exited_whole(self) -> None:
        await self._exit_code()
        await self._group_gone(None)

    async def _group_gone(self, timeout_s: float | None) -> bool:
        """Poll (they may not be our children) until no member of the child's group is left; False on timeout."""
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        delay = FIRST_POLL_S
        while group_members(self.proc.pid):
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, MAX_POLL_S)
        return True

    def _signal_group(self, signum: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    async def _healthy(self) -> bool:
        try:
            async with self.http.get(f"{self.base_url}/health",
                                     timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _drain_output(self) -> None:
        if self._output_closed is not None:
            # The pipe closes when the child (and its group) is gone; bound the wait in case a grandchild holds it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._output_closed.wait(), 1.0)
            self.log.flush()


class CmdServer(LlamaServer):
    """Any server as a model (llama-swap's `cmd`): its command line from a template where ${PORT} and ${MODEL_ID}
    are replaced, extra environment, ready when `check_endpoint` answers 200 at its proxy URL (or, with "none",
    when its port accepts a connection), reached at that URL. Same guarantees as llama-server: own process group,
    dies with the daemon, minimal environment, output kept."""

    OTHER_PORT_CHECK_S = 1.0  # how often to look whether it listens somewhere else than it was told

    def __init__(self, name: str, argv: list[str], env: dict[str, str], check_endpoint: str, proxy: str,
                 log: LogRing, http: aiohttp.ClientSession):
        super().__init__(name, argv[0], Path(argv[0]), [], log, http, env)
        self.argv = argv
        self.check_endpoint = check_endpoint
        self.proxy = proxy
        self.kind = f"{Path(argv[0]).name} (cmd of {name})"
        self._next_port_check = 0.0

    def _expand(self, text: str) -> str:
        return text.replace("${PORT}", str(self.port)).replace("${MODEL_ID}", self.name)

    def command(self, port: int) -> list[str]:
        self.port = port
        return [self._expand(arg) for arg in self.argv]

    @property
    def base_url(self) -> str:
        return self._expand(self.proxy).rstrip("/")

    async def _healthy(self) -> bool:
        if self.check_endpoint == "none":
            url = yarl.URL(self.base_url)
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(url.host, url.port), 2)
            except (OSError, TimeoutError):
                return False
            writer.close()
            return True
        try:
            async with self.http.get(self.base_url + self.check_endpoint,
                                     timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def _check_progress(self) -> None:
        """A server told to use ${PORT} that listens on another port instead will never answer there: say so now
        rather than after health_timeout_s."""
        loop = asyncio.get_running_loop()
        if self.proc is None or loop.time() < self._next_port_check or not any("${PORT}" in a for a in self.argv):
            return
        self._next_port_check = loop.time() + self.OTHER_PORT_CHECK_S
        listening = set()
        for pid in group_members(self.proc.pid) or [self.proc.pid]:
            try:
                connections = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.Error:
                continue
            listening |= {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
        if listening and self.port not in listening:
            ports = ", ".join(str(p) for p in sorted(listening))
            raise LoadError(f"{self.kind} listens on port {ports}, not on the port it was given ({self.port}): "
                            "use ${PORT} in cmd where the server takes its port")

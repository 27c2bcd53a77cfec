"""llama-server processes a daemon leaves behind: behind a wrapper script that does not exec, PR_SET_PDEATHSIG
reaches only the shell, so a SIGKILLed daemon leaves llama-server running. The next daemon finds and stops them."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import psutil
import pytest
from structlog.testing import capture_logs

from conftest import llama_children, make_config
from model_supervisor.children import RECORD_NAME, LlamaChildren
from model_supervisor.config import LiveConfig
from model_supervisor.process import start_time
from test_cli import free_port, wait_http
from test_faults import request


def free_port_range(count: int) -> tuple[int, int]:
    """`count` consecutive ports nothing listens on now, away from the ranges other tests use."""
    for _ in range(200):
        first = random.randrange(20000, 30000)
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first, first + count - 1
    raise AssertionError("no free port range")


def write_wrapper(tmp_path: Path, binary: str) -> Path:
    wrapper = tmp_path / "llama-wrapper"
    wrapper.write_text(f'#!/bin/sh\n"{binary}" "$@"\n')  # no exec: llama-server is the shell's child
    wrapper.chmod(0o755)
    return wrapper


def write_config(tmp_path: Path, model: Path, wrapper: Path, ports: tuple[int, int]) -> tuple[Path, str]:
    port = free_port()
    config = tmp_path / "models.toml"
    config.write_text(f"""[daemon]
listen = "127.0.0.1:{port}"
llama_server = "{wrapper}"
port_range = [{ports[0]}, {ports[1]}]
state_dir = "{tmp_path / 'state'}"
[models.m]
model = "{model}"
args = ["-c", "512"]
""")
    return config, f"http://127.0.0.1:{port}"


def start(config: Path, wrapper: Path) -> subprocess.Popen:
    env = {**os.environ, "LLAMA_SERVER": str(wrapper)}  # the env would win over the config's llama_server
    return subprocess.Popen([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def gone_within(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `processes` still alive after `timeout` (polling: they are not our children)."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in processes if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def stop_all(daemons: list[subprocess.Popen], strays: list[psutil.Process]) -> None:
    for daemon in daemons:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    for stray in strays:
        if alive(stray):
            stray.kill()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.llama
def test_a_llama_server_left_by_a_sigkilled_daemon_behind_a_wrapper_is_stopped_by_the_next_daemon(
    tmp_path, tiny_models, llama_server_bin
):
    wrapper = write_wrapper(tmp_path, llama_server_bin)
    ports = free_port_range(3)
    config, url = write_config(tmp_path, tiny_models[1], wrapper, ports)
    daemons: list[subprocess.Popen] = []
    strays: list[psutil.Process] = []
    try:
        first = start(config, wrapper)
        daemons.append(first)
        wait_http(f"{url}/health", first)
        status, answer = request(f"{url}/v1/chat/completions", CHAT)
        assert status == 200, answer
        (server,) = llama_children(first.pid)
        strays.append(server)
        shell = server.parent()
        assert shell is not None and shell.pid != first.pid  # the wrapper's shell sits between them
        port = json.loads(urllib_get(f"{url}/status"))["models"]["m"]["port"]

        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert gone_within([shell], 5) == []  # PR_SET_PDEATHSIG took the shell...
        assert alive(server) and server.ppid() == 1  # ...and left llama-server running, an orphan

        second = start(config, wrapper)
        daemons.append(second)
        wait_http(f"{url}/health", second)
        assert gone_within([server], 5) == [], "the orphaned llama-server is still running"
        status, answer = request(f"{url}/v1/chat/completions", CHAT)
        assert status == 200, answer
        assert json.loads(urllib_get(f"{url}/status"))["models"]["m"]["port"] == port  # its port is free again
        (new_server,) = llama_children(second.pid)
        assert port in {c.laddr.port for c in new_server.net_connections("tcp") if c.status == psutil.CONN_LISTEN}

        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
        stopped = [json.loads(line) for line in second.stderr.read().splitlines() if '"orphan_stopped"' in line]
        assert [(e["pid"], e["port"], e["model"]) for e in stopped] == [(server.pid, port, "m")]
    finally:
        stop_all(daemons, strays)


@pytest.mark.llama
def test_a_normal_stop_leaves_no_process_of_the_wrappers_group(tmp_path, tiny_models, llama_server_bin):
    wrapper = write_wrapper(tmp_path, llama_server_bin)
    config, url = write_config(tmp_path, tiny_models[1], wrapper, free_port_range(3))
    daemon = start(config, wrapper)
    group: list[psutil.Process] = []
    try:
        wait_http(f"{url}/health", daemon)
        status, answer = request(f"{url}/v1/chat/completions", CHAT)
        assert status == 200, answer
        (server,) = llama_children(daemon.pid)
        pgid = os.getpgid(server.pid)
        group = [p for p in psutil.process_iter() if _pgid(p.pid) == pgid]
        assert len(group) == 2  # the shell and llama-server
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        # Already gone when the daemon exits: its stop waited for the whole group, not just the shell.
        assert gone_within(group, 0) == [], "a process of the wrapper's group outlived the daemon's stop"
    finally:
        stop_all([daemon], group)


def urllib_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# ---------------------------------------------------------------- what is, and is not, taken for a leftover

LISTENER = """import socket, sys, time
if sys.argv[1] != "-":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("up", flush=True)
time.sleep(120)
"""


def spawn(*args: str, listen: int | None = None, orphan: bool = False, session: bool = False) -> psutil.Process:
    """A python process with these arguments, listening on `listen`; `orphan`: reparented to PID 1 (its shell
    exits), as a daemon killed outright leaves one; `session`: leading its own process group."""
    command = [sys.executable, "-c", LISTENER, str(listen) if listen else "-", *args]
    if orphan:
        out = subprocess.run(["sh", "-c", '"$0" "$@" >/dev/null 2>&1 & echo $!', *command], capture_output=True,
                             text=True, check=True)  # fmt: skip
        process = psutil.Process(int(out.stdout))
    else:
        process = psutil.Process(subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                                  start_new_session=session).pid)  # fmt: skip
    deadline = time.monotonic() + 10
    while LISTENER not in process.cmdline() or (listen and not _listening(process, listen)):
        assert time.monotonic() < deadline, "the test process did not come up"
        time.sleep(0.01)
    return process


def _listening(process: psutil.Process, port: int) -> bool:
    return port in {c.laddr.port for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def children_for(tmp_path: Path, ports: tuple[int, int], record: dict | None) -> LlamaChildren:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    if record is not None:
        (state / RECORD_NAME).write_text(json.dumps(record))
    config = make_config({"m": {"model": str(tmp_path / "m.gguf")}}, state_dir=str(state), port_range=list(ports))
    return LlamaChildren(LiveConfig(config, None, "/nonexistent/llama-server"), None)  # type: ignore[arg-type]


GONE_DAEMON = {"pid": 2**22 + 1, "started": 0}  # above the largest pid_max: no such process


def wrapped(*args: str) -> tuple[int, psutil.Process]:
    """A process group as an exec-less wrapper leaves it when the daemon dies: the leader (the shell) gone, its
    child reparented to PID 1. Returns (the group, the child)."""
    shell = subprocess.Popen(["sh", "-c", '"$0" "$@" & wait', sys.executable, "-c", "import time; time.sleep(120)",
                              *args], start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 10
    while not (children := psutil.Process(shell.pid).children()) or "time.sleep" not in " ".join(
            children[0].cmdline()):  # fmt: skip
        assert time.monotonic() < deadline, "the wrapped process did not start"
        time.sleep(0.01)
    shell.kill()
    shell.wait()
    return shell.pid, children[0]


def test_only_what_matches_a_leftover_of_ours_is_stopped(tmp_path):
    first, last = free_port_range(6)
    p = list(range(first, last + 1))
    ours = "--model", "x.gguf", "--host", "127.0.0.1"
    spawned: list[psutil.Process] = []
    try:
        # Found by the scan: reparented to PID 1, our command line, listening on its --port in our range.
        spawned.append(orphan := spawn(*ours, "--port", str(p[0]), "--alias", "a", listen=p[0], orphan=True))
        # Not ours: no --port; --port but listening elsewhere; our command line but its parent is alive.
        spawned.append(no_port := spawn("--model", "x.gguf", "--alias", "b", listen=p[1], orphan=True))
        spawned.append(elsewhere := spawn(*ours, "--port", str(p[2]), "--alias", "c", listen=p[3], orphan=True))
        spawned.append(parented := spawn(*ours, "--port", str(p[4]), "--alias", "d", listen=p[4]))
        # From the record: a group whose leader is the same process; a wrapper's group (its shell gone) with a
        # member that has the recorded --port; one whose member was recorded by pid and start time; a live group
        # that is none of these.
        spawned.append(leader := spawn(session=True))
        group_f, with_port = wrapped("--port", str(p[5]))
        spawned.append(with_port)
        group_g, recorded_member = wrapped("--listen", "anywhere")
        spawned.append(recorded_member)
        spawned.append(stranger := spawn("--port", "1", session=True))
        record = {"daemon": GONE_DAEMON, "children": [
            {"model": "e", "pid": leader.pid, "pgid": leader.pid, "port": 1, "started": start_time(leader.pid)},
            {"model": "f", "pid": group_f, "pgid": group_f, "port": p[5], "started": 0},
            {"model": "g", "pid": group_g, "pgid": group_g, "port": p[5], "started": 0,
             "members": [[recorded_member.pid, start_time(recorded_member.pid)]]},
            {"model": "h", "pid": stranger.pid, "pgid": stranger.pid, "port": p[5], "started": 0,
             "members": [[stranger.pid, 0]]},
        ]}  # fmt: skip
        with capture_logs() as logs:
            children_for(tmp_path, (first, last), record)
        stopped = {(e["pid"], e["port"], e["model"]) for e in logs if e["event"] == "orphan_stopped"}
        assert stopped == {(orphan.pid, p[0], "a"), (leader.pid, 1, "e"), (with_port.pid, p[5], "f"),
                           (recorded_member.pid, p[5], "g")}  # fmt: skip
        assert not any(alive(x) for x in (orphan, leader, with_port, recorded_member))
        assert all(alive(x) for x in (no_port, elsewhere, parented, stranger))
    finally:
        for process in spawned:
            if alive(process):
                process.kill()


def test_a_record_of_a_daemon_still_running_is_left_alone(tmp_path):
    port = free_port_range(1)[0]
    # As two daemons of one process (tests) or a second daemon on one state_dir would see it.
    child = spawn("--port", str(port), session=True)
    try:
        record = {"daemon": {"pid": os.getpid(), "started": start_time(os.getpid())}, "children": [
            {"model": "m", "pid": child.pid, "pgid": child.pid, "port": port, "started": start_time(child.pid)}]}
        with capture_logs() as logs:
            children_for(tmp_path, (port, port), record)
        assert alive(child)
        assert [e["event"] for e in logs] == ["children_record_in_use"]
    finally:
        child.kill()


# ---------------------------------------------------------------- the record, and a wrapper's group, with a fake server

FAKE_SERVER = """import http.server, os, signal, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
def term(signum, frame):  # a shutdown that takes a moment, and says when it is done
    time.sleep(0.3)
    open(os.environ["HOME"] + "/clean-exit", "w").close()
    os._exit(0)
signal.signal(signal.SIGTERM, term)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def fake_wrapper(tmp_path: Path) -> Path:
    server = tmp_path / "fake-server.py"
    server.write_text(FAKE_SERVER)
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(f'#!/bin/sh\n"{sys.executable}" "{server}" "$@"\n')  # no exec, as in the fault
    wrapper.chmod(0o755)
    return wrapper


async def started_children(tmp_path: Path, state_dir: Path, http) -> LlamaChildren:
    (tmp_path / "home").mkdir(exist_ok=True)
    if state_dir.parent.is_dir():
        state_dir.mkdir(exist_ok=True)  # as the daemon does before it creates its children
    config = make_config({"m": {"model": str(tmp_path / "m.gguf")}}, state_dir=str(state_dir),
                         port_range=list(free_port_range(2)), stop_timeout_s=5)  # fmt: skip
    return LlamaChildren(LiveConfig(config, None, str(fake_wrapper(tmp_path))), http,
                         env={"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")})  # fmt: skip


def served_by(pgid: int) -> list[psutil.Process]:
    return [p for p in psutil.process_iter() if _pgid(p.pid) == pgid and "fake-server" in " ".join(p.cmdline())]


async def test_the_record_names_each_running_child_and_a_stop_takes_it_out(tmp_path):
    async with aiohttp.ClientSession() as http:
        children = await started_children(tmp_path, tmp_path / "state", http)
        upstream = await children.start("m")
        try:
            record = json.loads((tmp_path / "state" / RECORD_NAME).read_text())
            assert record["daemon"]["pid"] == os.getpid()
            (entry,) = record["children"]
            assert (entry["model"], entry["pid"], entry["pgid"], entry["port"]) == ("m", upstream.pid, upstream.pid,
                                                                                    upstream.port)  # fmt: skip
            assert entry["started"] == start_time(upstream.pid)
            # Once it answered: its group by pid and start time, the server behind the wrapper's shell among them.
            (server,) = served_by(upstream.pid)
            assert sorted(entry["members"]) == sorted([[pid, start_time(pid)] for pid in (upstream.pid, server.pid)])
        finally:
            await children.stop("m", "admin")
        assert json.loads((tmp_path / "state" / RECORD_NAME).read_text())["children"] == []


async def test_a_record_that_cannot_be_written_is_logged_once_and_children_still_run(tmp_path):
    blocker = tmp_path / "full"
    blocker.write_text("")  # state_dir below a file: every write fails, as on a full or read-only disk
    async with aiohttp.ClientSession() as http:
        with capture_logs() as logs:
            children = await started_children(tmp_path, blocker / "state", http)
            upstream = await children.start("m")
            async with http.get(f"{upstream.base_url}/health") as response:
                assert response.status == 200
            assert await children.stop("m", "admin") == upstream.pid
    assert [e["event"] for e in logs].count("children_record_unwritable") == 1


async def test_a_stop_gives_a_wrappers_server_its_grace_and_returns_once_the_group_is_gone(tmp_path):
    async with aiohttp.ClientSession() as http:
        children = await started_children(tmp_path, tmp_path / "state", http)
        upstream = await children.start("m")
        (server,) = served_by(upstream.pid)
        try:
            await children.stop("m", "admin")
            assert not alive(server)
            # The shell died at SIGTERM at once; the server behind it still finished its own shutdown.
            assert (tmp_path / "home" / "clean-exit").exists()
        finally:
            stop_all([], [server])
            await children.close()


async def test_a_wrapper_that_dies_takes_its_server_with_it(tmp_path):
    async with aiohttp.ClientSession() as http:
        children = await started_children(tmp_path, tmp_path / "state", http)
        upstream = await children.start("m")
        (server,) = served_by(upstream.pid)
        try:
            os.kill(upstream.pid, signal.SIGKILL)  # the wrapper's shell, not the server
            # Seen at once, though the server behind it still holds the output pipe.
            code, _ = await asyncio.wait_for(children.wait_exit("m"), 10)
            assert code == -signal.SIGKILL
            assert not alive(server), "the server outlived the child the daemon knows, holding its port"
        finally:
            stop_all([], [server])
            await children.close()

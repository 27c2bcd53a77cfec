"""systemd integration: the notify protocol (unit and end to end over a socket the test owns), the unit file
(systemd-analyze verify/security where it exists) and scripts/install.sh --dry-run."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from conftest import llama_children
import structlog
import structlog.testing

from model_supervisor.process import child_environment
from model_supervisor.systemd import Notifier, StatusReporter, describe

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "units" / "model-supervisor.service"
MAX_EXPOSURE = 3.0


class NotifyListener:
    """A datagram socket standing in for systemd: every message, with the monotonic time it arrived."""

    def __init__(self, address: str):
        self.address = address  # as NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(0.05)  # lets the reader notice close()
        self.messages: list[tuple[float, list[str]]] = []
        self._cond = threading.Condition()
        self._open = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._open:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append((time.monotonic(), data.decode().split("\n")))
                self._cond.notify_all()

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        with self._cond:
            return [(t, line) for t, lines in self.messages for line in lines if line.startswith(prefix)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out waiting for {what}; got {[m for _, m in self.messages][-20:]}")

    def wait_line(self, prefix: str, timeout: float = 30, after: int = 0) -> tuple[float, str]:
        """The first line starting with prefix among the messages from index `after` on."""
        def found() -> list[tuple[float, str]]:
            return [(t, line) for t, lines in self.messages[after:] for line in lines if line.startswith(prefix)]
        self.wait_for(lambda: bool(found()), timeout, prefix)
        with self._cond:
            return found()[0]

    def close(self) -> None:
        self._open = False
        self._thread.join(5)
        self.sock.close()


# ---------------------------------------------------------------- Notifier, in process


def test_without_notify_socket_the_notifier_does_nothing():
    env: dict[str, str] = {"PATH": "/usr/bin"}
    notifier = Notifier.from_environment(env)
    assert not notifier.enabled
    assert notifier.ready() is False and notifier.status("x") is False and notifier.watchdog() is False
    assert notifier.watchdog_interval() is None
    assert asyncio.run(asyncio.wait_for(notifier.run_watchdog(), 1)) is None  # returns at once: nothing to ping


def test_from_environment_takes_the_variables_away_so_nothing_inherits_them():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid()), "HOME": "/h"}
    notifier = Notifier.from_environment(env)
    assert env == {"HOME": "/h"}
    assert notifier.enabled and notifier.watchdog_interval() == 1.5  # half the timeout


def test_watchdog_meant_for_another_process_is_not_pinged():
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"})
    assert notifier.enabled and notifier.watchdog_interval() is None


def test_unsupported_address_disables_notifications():
    assert not Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_child_environment_never_carries_notify_variables():
    source = {"PATH": "/bin", "HOME": "/var/lib/x", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1",
              "WATCHDOG_PID": "1", "CUDA_VISIBLE_DEVICES": "0"}  # fmt: skip
    assert child_environment(source) == {"PATH": "/bin", "HOME": "/var/lib/x", "CUDA_VISIBLE_DEVICES": "0"}


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_messages_reach_the_socket(tmp_path, kind):
    address = str(tmp_path / "notify") if kind == "path" else f"@model-supervisor-test-{uuid.uuid4().hex}"
    listener = NotifyListener(address)
    try:
        notifier = Notifier(address)
        assert notifier.ready("up") and notifier.extend_timeout(2.5) and notifier.stopping()
        listener.wait_for(lambda: len(listener.messages) == 3, 5, "3 messages")
        assert [m for _, m in listener.messages] == [["READY=1", "STATUS=up"], ["EXTEND_TIMEOUT_USEC=2500000"],
                                                     ["STOPPING=1"]]  # fmt: skip
        notifier.close()
    finally:
        listener.close()


def test_a_vanished_socket_is_logged_once_and_never_raises(tmp_path):
    notifier = Notifier(str(tmp_path / "gone"))
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            assert notifier.watchdog() is False
    assert [entry["event"] for entry in logs] == ["notify_failed"]


async def test_status_lines_are_throttled_and_the_last_state_always_goes_out(tmp_path):
    class Recorder(Notifier):
        def __init__(self):
            super().__init__("@unused")
            self.texts: list[tuple[float, str]] = []
            self.changed = asyncio.Event()

        def send(self, *fields: str) -> bool:
            self.texts += [(time.monotonic(), f.removeprefix("STATUS=")) for f in fields]
            self.changed.set()
            return True

    recorder = Recorder()
    state = {"n": 0}
    reporter = StatusReporter(recorder, lambda: f"n={state['n']}", min_interval_s=0.05)
    for n in range(1, 201):  # a burst of changes, as a busy driver reports them
        state["n"] = n
        reporter.changed()
        if n % 50 == 0:
            await asyncio.sleep(0)  # let due flushes run, as the loop would between events
    deadline = time.monotonic() + 5
    while not recorder.texts or recorder.texts[-1][1] != "n=200":
        assert time.monotonic() < deadline, recorder.texts
        recorder.changed.clear()
        await asyncio.wait_for(recorder.changed.wait(), 5)
    gaps = [b[0] - a[0] for a, b in zip(recorder.texts, recorder.texts[1:])]
    assert len(recorder.texts) < 10 and all(gap >= 0.04 for gap in gaps), recorder.texts
    reporter.changed()  # no change: nothing new is sent
    deadline = time.monotonic() + 5
    while reporter._handle is not None:  # the flush it scheduled has not run yet
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    assert recorder.texts[-1][1] == "n=200" and len([t for t in recorder.texts if t[1] == "n=200"]) == 1
    reporter.close()


def test_describe_says_what_is_loaded():
    class View:
        def __init__(self, name: str, state: str):
            self.name, self.state = name, state

    assert describe([View("a", "ready"), View("b", "unloaded")], False) == "2 models: a ready, b unloaded; gaming off"
    assert describe([View("a", "loading")], True) == "1 model: a loading; gaming on"


# ---------------------------------------------------------------- the daemon under a fake systemd


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
        return response.status


@pytest.mark.llama
@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_daemon_speaks_the_notify_protocol(tmp_path, tiny_models, llama_server_bin, kind):
    from test_cli import cli, write_config

    port = free_port()
    config = write_config(tmp_path / "models.toml", {tiny_models[1]: "chat"}, port, llama_server_bin)
    address = str(tmp_path / "notify") if kind == "path" else f"@model-supervisor-test-{uuid.uuid4().hex}"
    listener = NotifyListener(address)
    watchdog_s = 0.2
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": str(int(watchdog_s * 1e6)),
           "MODEL_SUPERVISOR_DAEMON__STATE_DIR": str(tmp_path / "state")}  # fmt: skip
    env.pop("WATCHDOG_PID", None)
    daemon = subprocess.Popen([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config)], env=env,
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        # READY=1 only once the HTTP server is up: /health answers at the first try when it arrives.
        listener.wait_line("READY=1", timeout=60)
        assert daemon.poll() is None
        assert health(port) == 200
        ready_message = next(lines for _, lines in listener.messages if "READY=1" in lines)
        assert "STATUS=1 model: m1 unloaded; gaming off" in ready_message
        assert listener.lines("STATUS=starting")  # said before startup, READY after

        # Watchdog pings from the event loop at half of WATCHDOG_USEC: measure the rate over 10 intervals.
        first = len(listener.lines("WATCHDOG=1"))
        listener.wait_for(lambda: len(listener.lines("WATCHDOG=1")) >= first + 11, 20, "11 watchdog pings")
        pings = [t for t, _ in listener.lines("WATCHDOG=1")][first:first + 11]
        ratio = ((pings[-1] - pings[0]) / 10) / (watchdog_s / 2)
        assert 0.5 <= ratio <= 2.0, f"ping interval is {ratio:.2f}x the expected {watchdog_s / 2} s"

        # STATUS= follows the model's state; the child never sees the notify variables.
        before = len(listener.messages)
        assert cli("load", "m1", "--url", f"http://127.0.0.1:{port}").returncode == 0
        listener.wait_line("STATUS=1 model: m1 ready", timeout=10, after=before)
        children = llama_children(daemon.pid)
        assert len(children) == 1
        child_env = children[0].environ()
        assert "PATH" in child_env  # the environment was readable
        assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(child_env)

        # SIGTERM: STOPPING=1, the children are stopped, exit 0.
        before = len(listener.messages)
        daemon.send_signal(signal.SIGTERM)
        listener.wait_line("STOPPING=1", timeout=10, after=before)
        assert daemon.wait(30) == 0, daemon.stderr.read() if daemon.stderr else ""
        assert psutil.wait_procs(children, timeout=5)[1] == []
        stopping = [line for _, line in listener.lines("STATUS=")][-1]
        assert stopping.startswith("STATUS=stopping: "), stopping
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        listener.close()


# ---------------------------------------------------------------- the unit file


def unit_for_analysis(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a binary that exists here, which `verify` insists on."""
    text = UNIT.read_text()
    text, count = re.subn(r"^ExecStart=\S+", f"ExecStart={sys.executable}", text, flags=re.M)
    assert count == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60)


def test_unit_declares_notify_and_watchdog():
    text = UNIT.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "DevicePolicy=closed", "NoNewPrivileges=yes",
                 "StateDirectory=model-supervisor", "ProtectSystem=strict", "User=model-supervisor"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert not re.search(r"^MemoryDenyWriteExecute=(yes|true|1)", text, re.M)  # GPU JITs need W+X memory
    assert not re.search(r"^PrivateDevices=(yes|true|1)", text, re.M)  # would hide the GPU


def test_unit_verifies_clean(tmp_path):
    unit = unit_for_analysis(tmp_path)
    result = systemd_analyze("verify", str(unit))
    ours = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert result.returncode == 0 and ours == [], result.stdout + result.stderr


def test_unit_exposure_is_at_most_3(tmp_path):
    unit = unit_for_analysis(tmp_path)
    result = systemd_analyze("security", "--offline=yes", "--no-pager", str(unit))
    if result.returncode != 0 and "--offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no --offline (systemd < 250): {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


# ---------------------------------------------------------------- scripts/install.sh


def test_install_dry_run_shows_every_step_and_changes_nothing(tmp_path):
    before = {p: os.path.exists(p) for p in ("/opt/model-supervisor", "/etc/model-supervisor",
                                            "/etc/systemd/system/model-supervisor.service")}  # fmt: skip
    result = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "--dry-run"], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "/etc/systemd/system/model-supervisor.service" in out
    assert "/opt/model-supervisor/.venv" in out and "pip install" in out
    assert "/etc/model-supervisor/models.toml" in out
    assert "systemctl enable --now model-supervisor" in out
    if subprocess.run(["getent", "passwd", "model-supervisor"], capture_output=True).returncode != 0:
        assert "useradd --system" in out
    assert {p: os.path.exists(p) for p in before} == before


def test_install_refuses_to_run_without_root():
    script = str(REPO / "scripts" / "install.sh")
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and no setpriv to drop to another user")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", script]
    else:
        command = ["bash", script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode == 126 or "Permission denied" in result.stderr:
        pytest.skip(f"the unprivileged user cannot read the script here: {result.stderr.strip()}")
    assert result.returncode == 1 and "must run as root" in result.stderr, result.stderr


def test_sighup_reloads_the_config_and_says_so_to_systemd(tmp_path, tiny_models, llama_server_bin):
    """SIGHUP: RELOADING=1, then READY=1; a new model is served; a broken config afterwards is refused."""
    import json as _json
    import urllib.request

    from test_cli import free_port, wait_http, write_config

    sock_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(30)
    port = free_port()
    config = write_config(tmp_path / "models.toml", {tiny_models[1]: "chat"}, port, llama_server_bin)
    env = {**os.environ, "NOTIFY_SOCKET": sock_path}
    daemon = subprocess.Popen([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", daemon)
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
        write_config(tmp_path / "models.toml", {tiny_models[1]: "chat", tiny_models[2]: "chat"}, port, llama_server_bin)
        daemon.send_signal(signal.SIGHUP)
        seen = []
        while not any("READY=1" in m for m in seen):
            seen.append(listener.recv(4096).decode())
        assert any("RELOADING=1" in m and "MONOTONIC_USEC=" in m for m in seen)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as response:
            assert "m2" in {m["id"] for m in _json.load(response)["data"]}
        (tmp_path / "models.toml").write_text("[daemon\n")
        daemon.send_signal(signal.SIGHUP)
        seen = []
        while not any("READY=1" in m for m in seen):
            seen.append(listener.recv(4096).decode())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as response:
            assert "m2" in {m["id"] for m in _json.load(response)["data"]}  # the old config stays
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert "config_reload_refused" in daemon.stderr.read()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        listener.close()

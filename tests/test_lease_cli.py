"""`model-supervisor lease -- CMD` across a daemon restart: the new daemon knows no lease, so the wrapper takes
its lease again. A lease needs no llama-server child: the daemon runs with a stand-in binary it never starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from test_cli import free_port, wait_http

OWNER = "tts"


@pytest.fixture
def daemon_config(tmp_path, tiny_models) -> tuple[Path, str, dict[str, str]]:
    never_run = tmp_path / "llama-server"
    never_run.write_text("#!/bin/sh\nexit 1\n")
    never_run.chmod(0o755)
    port = free_port()
    config = tmp_path / "models.toml"
    config.write_text(f"""[daemon]
listen = "127.0.0.1:{port}"
llama_server = "{never_run}"
state_dir = "{tmp_path / 'state'}"
[gpu]
backend = "none"
[models.m]
model = "{tiny_models[1]}"
""")  # host RAM as the budget: a 100 MB lease fits on any test machine
    env = {**os.environ, "LLAMA_SERVER": str(never_run)}
    return config, f"http://127.0.0.1:{port}", env


def start_daemon(config: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def stop_daemon(daemon: subprocess.Popen) -> None:
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0


def leases(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/leases", timeout=5) as response:
        return json.loads(response.read())["leases"]


def wait_for(predicate, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.02)


class Lines:
    """A process's stderr lines, read as they come."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def having(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    def finish(self) -> list[str]:
        self._thread.join(10)
        return self.lines


def start_wrapper(url: str, *extra: str) -> tuple[subprocess.Popen, Lines]:
    wrapper = subprocess.Popen([sys.executable, "-m", "model_supervisor.cli", "lease", "--url", url,
                                "--vram-mb", "100", "--ttl-s", "3", "--owner", OWNER, "--priority", "60", *extra,
                                "--", "sleep", "60"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    return wrapper, Lines(wrapper.stderr)


def held_by(url: str, pid: int) -> list[dict]:
    try:
        return [x for x in leases(url) if x["pid"] == pid]
    except OSError:
        return []


def refuse_connections(port: int, count: int) -> None:
    """Stand on the daemon's port while it is down, closing each connection at once, until `count` have come:
    the wrapper has tried that many times without a daemon."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        listener.settimeout(30)
        for _ in range(count):
            connection, _ = listener.accept()
            connection.close()


def end(*processes: subprocess.Popen | None) -> None:
    for process in processes:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the wrapper passes it on: its command does not outlive it
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_a_restarted_daemon_gets_the_lease_again_and_the_wrapper_says_so_once(daemon_config):
    config, url, env = daemon_config
    daemon = start_daemon(config, env)
    wrapper = None
    try:
        wait_http(f"{url}/health", daemon)
        wrapper, stderr = start_wrapper(url)
        wait_for(lambda: held_by(url, wrapper.pid), "the lease is granted")
        stop_daemon(daemon)
        refuse_connections(int(url.rsplit(":", 1)[1]), count=3)  # three tries without a daemon
        daemon = start_daemon(config, env)
        wait_http(f"{url}/health", daemon)

        wait_for(lambda: held_by(url, wrapper.pid), "the restarted daemon holds the lease again", timeout=10)
        (lease,) = held_by(url, wrapper.pid)
        assert (lease["owner"], lease["vram_mb"], lease["priority"], lease["ttl_s"]) == (OWNER, 100, 60, 3)
        wait_for(lambda: stderr.having("taken again"), "the wrapper says it took the lease again")
        assert wrapper.poll() is None  # the command ran on throughout

        wrapper.send_signal(signal.SIGTERM)  # passed to the command; the wrapper releases the lease it holds now
        assert wrapper.wait(15) == 128 + signal.SIGTERM
        lines = stderr.finish()
        assert held_by(url, wrapper.pid) == []
        assert [line for line in lines if "unreachable" in line] and len(stderr.having("unreachable")) == 1, lines
        (taken,) = stderr.having("taken again")
        assert taken.startswith("model-supervisor lease:") and f"(id {lease['id']})" in taken
        assert not stderr.having("lost")
    finally:
        end(wrapper, daemon)


def test_a_lease_the_daemon_no_longer_knows_is_taken_again(daemon_config):
    config, url, env = daemon_config
    daemon = start_daemon(config, env)
    wrapper = None
    try:
        wait_http(f"{url}/health", daemon)
        wrapper, stderr = start_wrapper(url)
        wait_for(lambda: held_by(url, wrapper.pid), "the lease is granted")
        (first,) = held_by(url, wrapper.pid)
        # As a daemon that lost it sees it (here it is deleted under the wrapper): the next renewal finds it gone.
        request = urllib.request.Request(f"{url}/leases/{first['id']}", method="DELETE")
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        wait_for(lambda: [x for x in held_by(url, wrapper.pid) if x["id"] != first["id"]], "the lease is taken again")
        wait_for(lambda: stderr.having("taken again"), "the wrapper says so")
        assert wrapper.poll() is None
    finally:
        end(wrapper, daemon)

"""One llama-server child's lifecycle, against the real binary."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import aiohttp
import psutil
import pytest

from model_supervisor import process
from model_supervisor.process import LlamaServer, LoadError, LogRing, PortPool, child_environment

pytestmark = pytest.mark.llama


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def server(llama_server_bin, model, http, args=("-c", "512"), env=None) -> LlamaServer:
    return LlamaServer("m", llama_server_bin, model, list(args), LogRing(200), http, env)


async def test_start_is_ready_and_stop_ends_the_whole_group(llama_server_bin, tiny_models, http):
    child = server(llama_server_bin, tiny_models[1], http)
    ports = PortPool(19500, 19599)
    await child.start(ports, timeout_s=30)
    try:
        async with http.get(f"http://127.0.0.1:{child.port}/health") as response:
            assert response.status == 200
        assert os.getpgid(child.pid) == child.pid  # leads its own process group
        assert "starting m on port" in "\n".join(child.log.lines())
    finally:
        await child.stop(grace_s=5)
    assert child.returncode is not None
    assert not psutil.pid_exists(child.pid) or psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE


async def test_early_exit_is_reported_with_the_last_output(llama_server_bin, tiny_models, http):
    child = server(llama_server_bin, tiny_models[1], http, args=["--definitely-not-a-flag"])
    with pytest.raises(LoadError) as raised:
        await child.start(PortPool(19500, 19599), timeout_s=60)
    message = str(raised.value)
    assert "exited with code" in message and "--definitely-not-a-flag" in message


async def test_a_missing_model_file_fails_with_llama_servers_reason(llama_server_bin, tmp_path, http):
    child = server(llama_server_bin, tmp_path / "absent.gguf", http)
    with pytest.raises(LoadError) as raised:
        await child.start(PortPool(19500, 19599), timeout_s=60)
    assert "absent.gguf" in str(raised.value)


async def test_health_timeout_stops_the_child_and_says_so(llama_server_bin, tiny_models, http, monkeypatch):
    # A real llama-server is ready in milliseconds; make it look never-ready by probing a port nothing serves.
    child = server(llama_server_bin, tiny_models[1], http)

    async def never_healthy() -> bool:
        return False

    monkeypatch.setattr(child, "_healthy", never_healthy)
    with pytest.raises(LoadError, match=r"not ready after 0\.5 s \(health_timeout_s\)"):
        await child.start(PortPool(19500, 19599), timeout_s=0.5)
    assert child.returncode is not None


async def test_port_taken_by_another_program_between_check_and_bind_moves_to_another(
    llama_server_bin, tiny_models, http, monkeypatch
):
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT from an earlier test is no matter
    squatter.bind(("127.0.0.1", 18900))
    squatter.listen()
    # The check passes (as it would if the other program bound the port a moment later)...
    monkeypatch.setattr(process, "_bindable", lambda port: True)
    child = server(llama_server_bin, tiny_models[1], http)
    try:
        await child.start(PortPool(18900, 18910), timeout_s=30)
        assert child.port != 18900
        assert "port 18900 was taken by another program" in "\n".join(child.log.lines())
    finally:
        await child.stop(grace_s=5)
        squatter.close()


def test_port_pool_skips_ports_in_use_and_ports_it_handed_out():
    # Ports no daemon of the suite uses (their children may leave TIME_WAITs on theirs).
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", 18950))
    squatter.listen()
    try:
        pool = PortPool(18950, 18952)
        first = pool.acquire()
        second = pool.acquire()
        assert {first, second} == {18951, 18952}
        with pytest.raises(LoadError, match="no free port in port_range 18950-18952"):
            pool.acquire()
        pool.release(first)
        assert pool.acquire() == first
    finally:
        squatter.close()


def test_children_get_a_minimal_environment():
    env = child_environment({"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0", "HOME": "/root",
                             "FRONTIER_API_KEY": "sk-secret", "MODEL_SUPERVISOR_ADMIN_TOKEN": "t0ken",
                             "NOTIFY_SOCKET": "/run/systemd/notify", "LC_ALL": "C.UTF-8"})  # fmt: skip
    assert env == {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0", "HOME": "/root", "LC_ALL": "C.UTF-8"}


async def test_child_really_runs_with_that_environment(llama_server_bin, tiny_models, http, monkeypatch):
    monkeypatch.setenv("FRONTIER_API_KEY", "sk-should-not-leak")
    child = server(llama_server_bin, tiny_models[1], http, env=child_environment())
    await child.start(PortPool(19500, 19599), timeout_s=30)
    try:
        assert "FRONTIER_API_KEY" not in psutil.Process(child.pid).environ()
    finally:
        await child.stop(grace_s=5)


async def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path, http):
    # llama-server honours SIGTERM, so a stand-in that ignores it shows the escalation (a named fake).
    stubborn = tmp_path / "stubborn-server"
    stubborn.write_text("#!/bin/sh\ntrap '' TERM\necho armed\nwhile :; do sleep 1; done\n")
    stubborn.chmod(0o755)
    child = LlamaServer("m", str(stubborn), tmp_path / "x.gguf", [], LogRing(50), http)
    await child.spawn(18960)
    while "armed" not in child.log.lines():  # its trap is set before it says so
        child.log.changed.clear()
        await asyncio.wait_for(child.log.changed.wait(), 10)
    await child.stop(grace_s=0.3)
    assert child.returncode == -signal.SIGKILL
    assert "SIGKILL" in child.log.tail()


def test_prewarm_asks_for_every_file_and_skips_missing_ones(tmp_path):
    from model_supervisor.process import prewarm

    shard = tmp_path / "m-00001-of-00002.gguf"
    shard.write_bytes(b"x" * 4096)
    assert prewarm([shard, tmp_path / "absent.gguf"]) == 4096


def test_a_port_left_in_time_wait_counts_as_free():
    """A stopped child's port is in TIME_WAIT after its connections close; the pool must hand it out again."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 18970))
    listener.listen()
    client = socket.create_connection(("127.0.0.1", 18970))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT, as llama-server's does
    client.close()
    listener.close()
    assert PortPool(18970, 18970).acquire() == 18970

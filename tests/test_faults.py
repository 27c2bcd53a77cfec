"""Faults, against the real llama-server (a named fake only where a fault cannot be caused on cue)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from conftest import llama_children
from test_cli import free_port, wait_http, write_config

pytestmark = pytest.mark.llama


async def test_child_killed_mid_stream_ends_the_stream_with_an_error_and_the_next_request_restarts_it(
    start_daemon, tiny_models
):
    d = await start_daemon({"a": {"model": str(tiny_models[1]), "args": ["-c", "8192"]}})
    body = {"model": "a", "stream": True, "max_tokens": 6000, "messages": [{"role": "user", "content": "go"}]}
    async with d.http.post(f"{d.url}/v1/chat/completions", json=body) as stream:
        await stream.content.readline()
        victim = d.runtime.core.models["a"].pid
        os.kill(victim, signal.SIGKILL)
        events = [line async for line in stream.content if line.startswith(b"data: ")]
    final = json.loads(events[-1][6:])
    assert final["error"]["code"] == "upstream_failed" and "'a'" in final["error"]["message"]
    await d.wait_until(lambda: d.state("a") == "failed")
    _, status = await d.get_json("/status")
    assert "exited unexpectedly" in status["models"]["a"]["last_error"]
    status, answer, _ = await d.chat("a")  # after the restart backoff (0.5 s), within the queue timeout
    assert status == 200 and d.runtime.core.models["a"].pid != victim
    assert d.timeline.of("exited", "a")[0]["cause"] == "crash"


async def test_a_server_that_never_gets_ready_fails_after_health_timeout_and_its_waiters_get_503(
    start_daemon, tiny_models, tmp_path, llama_server_bin
):
    # A named fake: llama-server started only once a gate file exists, which this test never creates.
    never = tmp_path / "never-ready-server"
    never.write_text(f'#!/bin/sh\nwhile [ ! -e "{tmp_path}/gate" ]; do sleep 0.05; done\nexec "{llama_server_bin}" "$@"\n')
    never.chmod(0o755)
    d = await start_daemon({"a": {"model": str(tiny_models[1])}}, binary=str(never), health_timeout_s=1)
    started = time.monotonic()
    results = await asyncio.gather(*(d.chat("a") for _ in range(3)))
    assert time.monotonic() - started < 10
    for status, body, headers in results:
        assert status == 503 and body["error"]["code"] == "model_load_failed"
        assert "not ready after 1 s (health_timeout_s)" in body["error"]["message"]
    # The stuck child was stopped, not left behind.
    stuck = [p for p in psutil.Process().children(recursive=True) if "never-ready-server" in " ".join(p.cmdline())]
    assert psutil.wait_procs(stuck, timeout=5)[1] == []
    assert len(d.timeline.of("load_failed", "a")) == 1  # one load for all three waiters


def start_daemon_process(config) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip


def request(url: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_twenty_sigkills_leave_no_orphans_and_each_restart_serves_at_once(tmp_path, tiny_models, llama_server_bin):
    port = free_port()
    config = write_config(tmp_path / "models.toml", {tiny_models[1]: "chat"}, port, llama_server_bin)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for round_ in range(20):
        daemon = start_daemon_process(config)
        try:
            wait_http(f"{url}/health", daemon)
            status, answer = request(f"{url}/v1/chat/completions", body)
            assert status == 200, (round_, answer)
            children = llama_children(daemon.pid)
            assert len(children) == 1
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(10)
            assert psutil.wait_procs(children, timeout=5)[1] == [], f"orphan after kill {round_}"
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()


def test_sigterm_lets_in_flight_requests_finish_answers_queued_ones_and_exits_0(tmp_path, tiny_models,
                                                                              llama_server_bin):
    port = free_port()
    config = tmp_path / "models.toml"
    config.write_text(f"""[daemon]
listen = "127.0.0.1:{port}"
llama_server = "{llama_server_bin}"
port_range = [19900, 19999]
state_dir = "{tmp_path / 'state'}"
[groups.main]
swap = true
[models.a]
model = "{tiny_models[1]}"
group = "main"
args = ["-c", "8192"]
[models.b]
model = "{tiny_models[2]}"
group = "main"
""")
    daemon = start_daemon_process(config)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", daemon)

        async def scenario():
            import aiohttp

            async with aiohttp.ClientSession() as http:
                stream_body = {"model": "a", "stream": True, "max_tokens": 3000,
                               "messages": [{"role": "user", "content": "go"}]}  # fmt: skip
                async with http.post(f"{url}/v1/chat/completions", json=stream_body) as stream:
                    await stream.content.readline()
                    queued = asyncio.ensure_future(http.post(f"{url}/v1/chat/completions", json={
                        "model": "b", "messages": [{"role": "user", "content": "hi"}]}))  # fmt: skip
                    while True:  # b is queued behind a's stream
                        async with http.get(f"{url}/status") as response:
                            if (await response.json())["models"]["b"]["queued"] == 1:
                                break
                    children = llama_children(daemon.pid)
                    daemon.send_signal(signal.SIGTERM)
                    refused = await queued
                    assert refused.status == 503
                    assert (await refused.json())["error"]["code"] in ("service_unavailable", "shutting_down")
                    events = [line async for line in stream.content if line.startswith(b"data: ")]
                    assert events[-1].strip() == b"data: [DONE]" and len(events) > 1000  # finished whole
                return children

        children = asyncio.run(scenario())
        assert daemon.wait(30) == 0
        assert psutil.wait_procs(children, timeout=5)[1] == []
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

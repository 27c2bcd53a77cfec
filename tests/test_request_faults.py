"""Nothing lost, nothing stuck: faults on the request path and in effects.

Against the real llama-server where the fault is real (a killed child, a missing binary, a full disk); a named fake
upstream only where a real one cannot misbehave on cue (a lying Content-Length, a peer that reads and closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from fake_children import fake_upstream

# ---------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def raw_upstream(handle):
    """A named fake upstream at the socket level (for answers aiohttp would not send)."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def chat_body(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "256k"):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> None:
    """Fill a filesystem to the last byte."""
    with open(folder / "filler", "wb") as handle:
        with contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
    with contextlib.suppress(OSError), open(folder / "filler-tail", "wb") as handle:
        while True:
            handle.write(b"\0")
            handle.flush()


# ---------------------------------------------------------------- with fake children (no llama-server)


async def test_a_lying_content_length_ends_the_answer_at_once_instead_of_a_long_wait(start_fake_daemon, tmp_path):
    async def lie(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"partial\":")
        await writer.drain()
        writer.close()

    async with raw_upstream(lie) as url:
        model = tmp_path / "a.gguf"
        model.write_bytes(b"x")
        d = await start_fake_daemon({"a": {"model": str(model), "vram_mb": 1}})
        d.daemon.children.upstreams["a"] = url
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with d.http.post(f"{d.url}/v1/chat/completions", json=chat_body("a")) as response:
                assert response.status == 200
                await response.read()
        assert loop.time() - started < 3  # not the 75 s a keep-alive wait for the missing bytes took


async def test_a_client_that_leaves_mid_stream_is_recorded_as_499_without_blaming_the_model(
    start_fake_daemon, tmp_path, caplog
):
    streaming = asyncio.Event()
    upstream_saw_close = asyncio.Event()

    async def slow_stream(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for n in range(1000):
                await response.write(f"data: {{\"n\": {n}}}\n\n".encode())
                streaming.set()
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.CancelledError):
            upstream_saw_close.set()
            raise
        return response

    async with fake_upstream(slow_stream) as url:
        model = tmp_path / "a.gguf"
        model.write_bytes(b"x")
        d = await start_fake_daemon({"a": {"model": str(model), "vram_mb": 1}})
        d.daemon.children.upstreams["a"] = url
        records = []
        d.daemon.proxy.observers.append(records.append)
        async with aiohttp.ClientSession() as client:
            response = await client.post(f"{d.url}/v1/chat/completions", json=chat_body("a", stream=True))
            await response.content.readline()
            response.close()  # the client leaves mid-stream
        await asyncio.wait_for(upstream_saw_close.wait(), 5)  # and the generation upstream stops
        await d.wait_until(lambda: d.runtime.core.models["a"].in_flight == 0)
        await asyncio.wait_for(_until(lambda: records), 5)
    assert [(r.route, r.status) for r in records] == [("local", 499)]
    assert "upstream_cut" not in caplog.text and "handler_failed" not in caplog.text


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_a_cloud_target_that_reads_and_closes_gets_the_request_once(start_fake_daemon, tmp_path):
    posts = []

    async def read_and_close(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        posts.append(head)
        writer.close()

    async with raw_upstream(read_and_close) as url:
        d = await start_fake_daemon({}, cloud={"frontier": {"base_url": url + "/v1", "model": "big"}})
        async with d.http.post(f"{d.url}/v1/chat/completions", json=chat_body("frontier")) as response:
            body = await response.json()
    assert response.status == 502 and body["error"]["code"] == "cloud_unreachable"
    assert len(posts) == 1  # it may have reached the target: never sent again


async def test_a_cloud_target_that_never_answers_is_given_up_after_first_byte_timeout(start_fake_daemon):
    async def never(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(60)

    async with raw_upstream(never) as url:
        cloud = {"frontier": {"base_url": url + "/v1", "model": "big", "first_byte_timeout_s": 0.5}}
        d = await start_fake_daemon({}, cloud=cloud)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with d.http.post(f"{d.url}/v1/chat/completions", json=chat_body("frontier")) as response:
            body = await response.json()
        assert response.status == 504 and body["error"]["code"] == "cloud_timeout"
        assert loop.time() - started < 3


async def test_slow_head_deadline_holds_for_new_connections_after_many_late_keepalive_requests(start_fake_daemon):
    """Each connection that sent a request after its head deadline used to leave its id() behind; a new
    connection reusing that id skipped its deadline."""
    d = await start_fake_daemon({}, header_timeout_s=0.3)
    host, port = "127.0.0.1", d.daemon.port
    kept = []
    for _ in range(30):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await reader.readuntil(b'"ok"}')
        kept.append((reader, writer))
    await asyncio.sleep(0.4)  # past each connection's head deadline (nothing to await: time itself is the point)
    for reader, writer in kept:
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await reader.readuntil(b'"ok"}')
        writer.close()
    silent = [await asyncio.open_connection(host, port) for _ in range(30)]
    answers = await asyncio.gather(*(asyncio.wait_for(reader.read(), 3) for reader, _ in silent))
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers)
    for _, writer in silent:
        writer.close()


async def test_shutdown_uses_the_drain_timeout_of_the_config_in_force(start_fake_daemon, tmp_path):
    model = tmp_path / "a.gguf"
    model.write_bytes(b"x")
    config = tmp_path / "models.toml"

    def write(drain_s: float) -> None:
        config.write_text(f'[daemon]\nllama_server = "/bin/true"\nstate_dir = "{tmp_path / "state"}"\n'
                          f'drain_timeout_s = {drain_s}\n[models.a]\nmodel = "{model}"\nvram_mb = 1\n')

    write(60)
    d = await start_fake_daemon({}, config_path=str(config))
    ticket = await d.runtime.acquire("a")  # in flight: shutdown waits for it, up to drain_timeout_s
    write(0.2)
    summary = await d.daemon.reload()
    assert summary["changed"] == ["a"] or summary["unchanged"] == ["a"]
    await asyncio.wait_for(d.daemon.stop(), 5)  # with the old 60 s this times out
    d.runtime.release(ticket)


# ---------------------------------------------------------------- with the real llama-server


@pytest.mark.llama
async def test_a_request_right_after_an_idle_child_was_killed_waits_for_the_restart(start_daemon, tiny_models):
    d = await start_daemon({"a": {"model": str(tiny_models[1]), "args": ["-c", "512"]}})
    for attempt in range(8):
        status, body, _ = await d.chat("a")
        assert status == 200, body
        os.kill(d.runtime.core.models["a"].pid, signal.SIGKILL)
        status, body, _ = await d.chat("a")  # at once: its connection is refused or reset
        assert status == 200, (attempt, body)


@pytest.mark.llama
async def test_a_spawn_that_raises_fails_the_load_at_once_and_nothing_stays_stuck(
    start_daemon, tiny_models, tmp_path, llama_server_bin
):
    wrapper = tmp_path / "llama-server"
    wrapper.write_text(f'#!/bin/sh\nexec "{llama_server_bin}" "$@"\n')
    wrapper.chmod(0o755)
    d = await start_daemon({"a": {"model": str(tiny_models[1]), "args": ["-c", "512"]},
                            "b": {"model": str(tiny_models[2]), "args": ["-c", "512"]}},
                           binary=str(wrapper))
    wrapper.chmod(0o644)  # no longer executable: the spawn itself raises PermissionError
    status, body, _ = await asyncio.wait_for(d.chat("a"), 5)
    assert status == 503 and body["error"]["code"] == "model_load_failed"
    assert "Permission denied" in body["error"]["message"]
    status, body = await asyncio.wait_for(d.post_json("/models/a/unload"), 5)
    assert status == 200
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)  # back: the model and its group serve again
    status, body, _ = await d.chat("b")
    assert status == 200, body
    status, body, _ = await d.chat("a")
    assert status == 200, body


@pytest.mark.llama
async def test_a_full_state_disk_does_not_switch_off_crash_detection(start_daemon, tiny_models, tmp_path):
    with small_tmpfs(tmp_path / "state") as state:
        d = await start_daemon({"a": {"model": str(tiny_models[1]), "args": ["-c", "512"]}},
                               state_dir=str(state))
        fill(state)
        status, body, _ = await d.chat("a")  # learning what it holds fails to save: ENOSPC
        assert status == 200, body
        victim = d.runtime.core.models["a"].pid
        os.kill(victim, signal.SIGKILL)
        await d.wait_until(lambda: d.state("a") == "failed", timeout=5)  # the exit was seen all the same
        status, body = await d.get_json("/health/a")
        assert status == 503
        status, body, _ = await d.chat("a")
        assert status == 200 and d.runtime.core.models["a"].pid != victim
        await d.http.close()
        await d.daemon.stop()  # before the tmpfs goes


async def test_reading_a_large_vocabulary_on_reload_does_not_block_the_loop(start_fake_daemon, tmp_path):
    from model_supervisor.testmodels import write_test_model

    small = write_test_model(tmp_path / "small.gguf", seed=1)
    big = write_test_model(tmp_path / "big.gguf", seed=2, extra_vocab=30_000)  # its header takes ~1 s to read
    config = tmp_path / "models.toml"
    head = f'[daemon]\nllama_server = "/bin/true"\nstate_dir = "{tmp_path / "state"}"\n[models.small]\nmodel = "{small}"\n'
    config.write_text(head)
    d = await start_fake_daemon({}, config_path=str(config))
    config.write_text(head + f'[models.big]\nmodel = "{big}"\n')
    loop = asyncio.get_running_loop()
    reload = asyncio.ensure_future(d.post_json("/reload"))
    slowest = 0.0
    while not reload.done():
        started = loop.time()
        async with d.http.get(f"{d.url}/health") as response:
            assert response.status == 200
        slowest = max(slowest, loop.time() - started)
        await asyncio.sleep(0.05)
    status, summary = await reload
    assert status == 200 and summary["added"] == ["big"]
    assert slowest < 0.5, f"/health took {slowest:.2f} s during the reload"
    assert d.runtime.memory.need_source["big"] == "estimate"


@pytest.mark.llama
async def test_unload_under_steady_load_answers_within_the_drain_bound(start_daemon, tiny_models):
    d = await start_daemon({"a": {"model": str(tiny_models[1]), "args": ["-c", "512"]}}, drain_timeout_s=3)
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            await d.chat("a", max_tokens=2)

    clients = [asyncio.ensure_future(client()) for _ in range(4)]
    try:
        await d.wait_until(lambda: d.state("a") == "ready")
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, body = await asyncio.wait_for(d.post_json("/models/a/unload"), 10)
        assert status == 200 and loop.time() - started < 3 + 2
        assert any(f["cause"] == "admin" for f in d.timeline.of("stopped", "a"))
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)

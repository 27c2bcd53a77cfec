"""Cloud fallback, gaming mode and availability, against the real llama-server and a fake cloud on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import pytest
from aiohttp import web

from conftest import llama_children

pytestmark = pytest.mark.llama

CLOUD_KEY = "sk-test-cloud-key-123"


class FakeCloud:
    """An OpenAI-compatible server the test controls: records what it got, answers or streams on cue."""

    def __init__(self):
        self.requests: list[dict] = []
        self.hooks: list[dict] = []
        self.hooked = asyncio.Event()
        self.error: tuple[int, dict] | None = None
        self.release_chunk: list[asyncio.Event] = []
        self.url = ""

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"path": request.path, "body": body, "auth": request.headers.get("Authorization")})
        if self.error is not None:
            return web.json_response(self.error[1], status=self.error[0])
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for index, gate in enumerate(self.release_chunk):
                chunk = {"choices": [{"delta": {"content": f"cloud-{index}"}}], "model": body["model"]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await gate.wait()  # the next chunk only once the test has seen this one
            await response.write(b"data: [DONE]\n\n")
            return response
        return web.json_response({"object": "chat.completion", "model": body["model"],
                                  "choices": [{"message": {"role": "assistant", "content": "from the cloud"}}]})

    async def hook(self, request: web.Request) -> web.Response:
        self.hooks.append(await request.json())
        self.hooked.set()
        return web.json_response({})


@pytest.fixture
async def cloud():
    fake = FakeCloud()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.completions)
    app.router.add_post("/hook", fake.hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield fake
    await runner.cleanup()


@pytest.fixture
def gated_llama_server(tmp_path, llama_server_bin):
    """A named fake for a load that takes as long as the test wants: the real llama-server, exec'd only once
    the gate file exists. Returns (binary, gate); the test opens the gate by creating the file."""
    gate = tmp_path / "gate"
    wrapper = tmp_path / "slow-llama-server"
    wrapper.write_text(f'#!/bin/sh\nwhile [ ! -e "{gate}" ]; do sleep 0.01; done\nexec "{llama_server_bin}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper), gate


@pytest.fixture
def cloud_key(monkeypatch):
    monkeypatch.setenv("FRONTIER_KEY", CLOUD_KEY)


def cloud_settings(cloud: FakeCloud) -> dict:
    return {"frontier": {"base_url": f"{cloud.url}/v1", "model": "big-model", "api_key_env": "FRONTIER_KEY",
                         "input_usd_per_mtok": 3, "output_usd_per_mtok": 15}}  # fmt: skip


def two_models(tiny_models, fallback_after_ms: int = 300) -> dict[str, dict]:
    return {
        "chat": {"model": str(tiny_models[1]), "args": ["-c", "512"], "fallback": "frontier",
                 "fallback_after_ms": fallback_after_ms},
        "strict": {"model": str(tiny_models[2]), "args": ["-c", "512"], "fallback": "frontier",
                   "local_only": True, "group": "other"},
    }  # fmt: skip


OTHER = {"other": {"exclusive": False}}


async def test_during_a_slow_load_the_cloud_answers_after_fallback_after_ms(
    start_daemon, tiny_models, cloud, cloud_key, gated_llama_server
):
    binary, gate = gated_llama_server
    d = await start_daemon(two_models(tiny_models), OTHER, cloud=cloud_settings(cloud), binary=binary)
    started = time.monotonic()
    status, body, headers = await d.chat("chat")
    elapsed = time.monotonic() - started
    assert status == 200 and body["choices"][0]["message"]["content"] == "from the cloud"
    assert (headers["X-Served-By"], headers["X-Fallback-Reason"]) == ("cloud", "loading")
    assert 0.3 <= elapsed < 0.3 + 2.0  # fallback_after_ms, plus the fake cloud's (loopback) latency
    (sent,) = cloud.requests
    assert sent["body"]["model"] == "big-model" and sent["auth"] == f"Bearer {CLOUD_KEY}"
    assert sent["body"]["messages"] == [{"role": "user", "content": "hello"}]  # nothing else changed
    # The load it started goes on; once done, the next request is served locally.
    assert d.state("chat") == "loading"
    gate.touch()
    await d.wait_until(lambda: d.state("chat") == "ready")
    status, body, headers = await d.chat("chat")
    assert status == 200 and headers["X-Served-By"] == "local" and body["model"] == "chat"


async def test_local_only_requests_wait_for_the_local_model(start_daemon, tiny_models, cloud, cloud_key,
                                                            gated_llama_server):
    binary, gate = gated_llama_server
    d = await start_daemon(two_models(tiny_models), OTHER, cloud=cloud_settings(cloud), binary=binary)
    strict = asyncio.ensure_future(d.chat("strict"))  # local_only = true in its config
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    header_only = asyncio.ensure_future(d.http.post(f"{d.url}/v1/chat/completions", json=body,
                                                    headers={"X-Local-Only": "true"}))  # fmt: skip
    await d.wait_until(lambda: d.queued("strict") == 1 and d.queued("chat") == 1)
    _, status_doc = await d.get_json("/status")
    assert status_doc["models"]["strict"]["route"] == "queued"
    # A witness that may fall back does so after fallback_after_ms: by then the others would have too.
    status, _, headers = await d.chat("chat")
    assert headers["X-Served-By"] == "cloud" and len(cloud.requests) == 1
    assert not strict.done() and not header_only.done()
    gate.touch()
    status, answer, headers = await strict
    assert status == 200 and headers["X-Served-By"] == "local" and answer["model"] == "strict"
    response = await header_only
    assert response.status == 200 and response.headers["X-Served-By"] == "local"
    response.release()
    assert len(cloud.requests) == 1  # only the witness


async def test_streaming_through_the_cloud_arrives_chunk_by_chunk(start_daemon, tiny_models, cloud, cloud_key,
                                                                 gated_llama_server):
    binary, gate = gated_llama_server
    cloud.release_chunk = [asyncio.Event(), asyncio.Event(), asyncio.Event()]
    d = await start_daemon(two_models(tiny_models, fallback_after_ms=0), OTHER, cloud=cloud_settings(cloud),
                           binary=binary)  # fmt: skip
    body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with d.http.post(f"{d.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200 and response.headers["X-Served-By"] == "cloud"
        for index, gate_event in enumerate(cloud.release_chunk):
            line = await response.content.readline()
            assert json.loads(line[6:])["choices"][0]["delta"]["content"] == f"cloud-{index}"
            await response.content.readline()  # the blank line ending the event
            gate_event.set()  # the cloud sends the next chunk only now: nothing was buffered
        assert (await response.content.readline()).strip() == b"data: [DONE]"
    gate.touch()


async def test_cloud_errors_reach_the_client_as_they_came(start_daemon, tiny_models, cloud, cloud_key,
                                                         gated_llama_server):
    binary, gate = gated_llama_server
    cloud.error = (429, {"error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limited"}})
    d = await start_daemon(two_models(tiny_models, fallback_after_ms=0), OTHER, cloud=cloud_settings(cloud),
                           binary=binary)  # fmt: skip
    status, body, headers = await d.chat("chat")
    assert status == 429 and body == cloud.error[1] and headers["X-Served-By"] == "cloud"
    gate.touch()


async def test_a_cloud_target_can_be_asked_for_by_name(start_daemon, tiny_models, cloud, cloud_key):
    d = await start_daemon(two_models(tiny_models), OTHER, cloud=cloud_settings(cloud))
    status, body, headers = await d.chat("frontier")
    assert status == 200 and headers["X-Fallback-Reason"] == "requested"
    assert cloud.requests[0]["body"]["model"] == "big-model"
    assert llama_children() == []
    _, listing = await d.get_json("/v1/models")
    assert {m["id"]: m["owned_by"] for m in listing["data"]}["frontier"] == "cloud"


async def test_the_webhook_is_told_once_a_minute_per_model(start_daemon, tiny_models, cloud, cloud_key,
                                                          gated_llama_server):
    binary, gate = gated_llama_server
    d = await start_daemon(two_models(tiny_models, fallback_after_ms=0), OTHER, cloud=cloud_settings(cloud),
                           binary=binary, notify_url=f"{cloud.url}/hook")  # fmt: skip
    for _ in range(3):
        assert (await d.chat("chat"))[2]["X-Served-By"] == "cloud"
    await asyncio.wait_for(cloud.hooked.wait(), 5)
    assert len(cloud.hooks) == 1
    assert cloud.hooks[0]["model"] == "chat" and cloud.hooks[0]["event"] == "fallback_started"
    assert CLOUD_KEY not in json.dumps(cloud.hooks)
    gate.touch()


async def test_gaming_mode_unloads_sends_to_the_cloud_honours_force_big_and_survives_a_restart(
    start_daemon, tiny_models, cloud, cloud_key, tmp_path
):
    models = two_models(tiny_models, fallback_after_ms=30_000)  # local unless gaming mode says otherwise
    models["small"] = {"model": str(tiny_models[3]), "args": ["-c", "512"], "allow_in_gaming": True, "group": "other"}
    state_dir = str(tmp_path / "gaming-state")
    d = await start_daemon(models, OTHER, cloud=cloud_settings(cloud), state_dir=state_dir)
    assert (await d.chat("chat"))[2]["X-Served-By"] == "local"
    assert (await d.chat("small"))[0] == 200
    status, answer = await d.post_json("/gaming-mode", {"enabled": True})
    assert status == 200 and answer == {"enabled": True}
    await d.wait_until(lambda: d.state("chat") == "unloaded")
    assert d.timeline.of("stopped", "chat")[0]["cause"] == "gaming"
    assert d.state("small") == "ready"
    status, body, headers = await d.chat("chat")
    assert headers["X-Served-By"] == "cloud" and headers["X-Fallback-Reason"] == "gaming_mode"
    status, body, headers = await d.chat("strict")  # local_only: no cloud, so 503
    assert status == 503 and body["error"]["code"] == "gaming_mode"
    _, doc = await d.get_json("/status")
    assert (doc["gaming_mode"], doc["models"]["chat"]["route"], doc["models"]["strict"]["route"],
            doc["models"]["small"]["route"]) == (True, "cloud", "rejected", "local")  # fmt: skip
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with d.http.post(f"{d.url}/v1/chat/completions", json=body, headers={"X-Force-Big": "true"}) as forced:
        assert forced.status == 200 and forced.headers["X-Served-By"] == "local"
    await d.wait_until(lambda: d.state("chat") == "unloaded")  # and it goes again once done
    async with d.http.post(f"{d.url}/v1/chat/completions", json=body, headers={"X-Force-Big": "maybe"}) as bad:
        assert bad.status == 400 and (await bad.json())["error"]["code"] == "invalid_header"

    await d.daemon.stop()
    again = await start_daemon(models, OTHER, cloud=cloud_settings(cloud), state_dir=state_dir)
    assert (await again.get_json("/gaming-mode"))[1] == {"enabled": True}
    assert (await again.chat("chat"))[2]["X-Served-By"] == "cloud"
    assert (await again.post_json("/gaming-mode", {"enabled": False}))[1] == {"enabled": False}
    assert (await again.chat("chat"))[2]["X-Served-By"] == "local"


async def test_gaming_auto_detect_follows_a_listed_process(start_daemon, tiny_models, cloud, cloud_key, tmp_path):
    game = tmp_path / "fakegame-x"
    shutil.copy("/bin/sleep", game)  # a process whose name is "fakegame-x"
    d = await start_daemon(two_models(tiny_models), OTHER, cloud=cloud_settings(cloud),
                           gaming={"auto_detect": ["fakegame-x"], "poll_interval_s": 0.05, "off_delay_s": 0.2})
    assert not d.runtime.gaming
    process = subprocess.Popen([str(game), "60"])
    try:
        await d.wait_until(lambda: d.runtime.gaming, timeout=10)
        assert "fakegame-x" in d.timeline.of("gaming")[-1]["source"]
    finally:
        process.kill()
        process.wait()
    await d.wait_until(lambda: not d.runtime.gaming, timeout=10)
    assert d.timeline.of("gaming")[-1]["source"].startswith("auto")

    # A manual toggle wins over detection until what detection sees changes.
    process = subprocess.Popen([str(game), "60"])
    try:
        await d.wait_until(lambda: d.runtime.gaming, timeout=10)
        await d.post_json("/gaming-mode", {"enabled": False})
        polls = d.runtime.gaming_watcher.polls
        while d.runtime.gaming_watcher.polls < polls + 3:  # the detector looks a few more times: the game still runs
            await asyncio.sleep(0.01)
        assert not d.runtime.gaming
    finally:
        process.kill()
        process.wait()


async def test_health_and_route_tell_the_truth_in_each_state(start_daemon, tiny_models, cloud, cloud_key,
                                                            gated_llama_server):
    binary, gate = gated_llama_server
    d = await start_daemon(two_models(tiny_models, fallback_after_ms=60_000), OTHER, cloud=cloud_settings(cloud),
                           binary=binary)  # fmt: skip

    async def health(model):
        status, body = await d.get_json(f"/health/{model}")
        _, doc = await d.get_json("/status")
        return status, body["state"], doc["models"][model]["route"], doc["models"][model]["available_now"]

    assert await health("chat") == (503, "unloaded", "cloud", False)  # never loaded: no ETA, fallback is set
    assert await health("strict") == (503, "unloaded", "queued", False)
    pending = asyncio.ensure_future(d.chat("chat"))
    await d.wait_until(lambda: d.state("chat") == "loading")
    assert (await health("chat"))[:2] == (503, "loading")
    gate.touch()
    assert (await pending)[0] == 200
    assert await health("chat") == (200, "ready", "local", True)
    await d.post_json("/gaming-mode", {"enabled": True})
    await d.wait_until(lambda: d.state("chat") == "unloaded")
    assert await health("chat") == (503, "unloaded", "cloud", False)
    assert await health("strict") == (503, "unloaded", "rejected", False)

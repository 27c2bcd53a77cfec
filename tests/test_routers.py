"""What routers and clients need (no llama-server: FakeChildren, and a named fake upstream that echoes the path):
probes that never load, a per-request wait bound, the wider OpenAI surface, llama-swap's endpoints, metrics."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from test_request_faults import fake_upstream


PROBE = {"X-Health-Check": "true"}


async def echo(request: web.Request) -> web.Response:
    """A named fake upstream: answers any path with what it was asked."""
    body = await request.read()
    return web.json_response({"path": request.path, "body": body.decode(), "usage": {"prompt_tokens": 3,
                                                                                       "completion_tokens": 2}})


@pytest.fixture
async def daemon(start_fake_daemon, tmp_path):
    async def start(**extra):
        model = tmp_path / "m.gguf"
        model.write_bytes(b"x")
        models = {"a": {"model": str(model), "vram_mb": 1, "aliases": ["fast"], **extra.pop("a", {})},
                  "b": {"model": str(model), "vram_mb": 1}}
        d = await start_fake_daemon(models, **extra)
        records = []
        d.daemon.proxy.observers.append(records.append)
        return d, d.daemon.children, records

    return start


def chat(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


# ---------------------------------------------------------------- X-Health-Check


async def test_a_health_check_answers_at_once_loads_nothing_and_is_not_usage(daemon):
    d, children, records = await daemon()
    async with d.http.post(f"{d.url}/v1/chat/completions", json=chat("a"), headers=PROBE) as response:
        body = await response.json()
    assert response.status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ""}
    async with d.http.post(f"{d.url}/v1/embeddings", json={"model": "fast", "input": "x"}, headers=PROBE) as response:
        body = await response.json()
    assert response.status == 200 and body["data"][0]["object"] == "embedding"
    async with d.http.post(f"{d.url}/v1/chat/completions", json=chat("a", stream=True), headers=PROBE) as response:
        text = await response.text()
    assert response.status == 200 and text.endswith("data: [DONE]\n\n")
    assert children.started == [] and d.state("a") == "unloaded" and records == []
    metrics = await (await d.http.get(f"{d.url}/metrics")).text()
    assert 'model_supervisor_health_checks_total{model="a",result="ok"} 3.0' in metrics


async def test_a_health_check_says_why_a_model_cannot_be_served(daemon):
    d, children, _ = await daemon()
    d.runtime.set_gaming(True, source="test")
    async with d.http.post(f"{d.url}/v1/chat/completions", json=chat("a"), headers=PROBE) as response:
        body = await response.json()
    assert response.status == 503 and body["error"]["code"] == "gaming_mode" and response.headers["Retry-After"]
    d.runtime.set_gaming(False, source="test")
    children.failures["b"] = OSError("no such file")
    status, _, _ = await d.chat("b")
    assert status == 503
    async with d.http.post(f"{d.url}/v1/chat/completions", json=chat("b"), headers=PROBE) as response:
        body = await response.json()
    assert response.status == 503 and body["error"]["code"] == "model_failed"
    assert children.started == ["b"]  # the probe did not try again


# ---------------------------------------------------------------- X-Max-Wait-Ms


async def test_a_request_that_may_not_wait_gets_503_at_once_and_its_load_goes_on(daemon):
    async with fake_upstream(echo) as url:
        d, children, _ = await daemon()
        children.upstreams["a"] = url
        gate = children.hold("a")
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with d.http.post(f"{d.url}/v1/chat/completions", json=chat("a"),
                               headers={"X-Max-Wait-Ms": "0"}) as response:
            body = await response.json()
        assert loop.time() - started < 1
        assert response.status == 503 and body["error"]["code"] == "queue_timeout"
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert children.started == ["a"]  # the load it started goes on
        gate.set()
        await d.wait_until(lambda: d.state("a") == "ready")
        async with d.http.post(f"{d.url}/v1/chat/completions", json=chat("a"),
                               headers={"X-Max-Wait-Ms": "0"}) as response:
            assert response.status == 200  # the next request finds it ready


async def test_a_wait_bound_sends_a_request_with_a_fallback_to_the_cloud_at_its_bound(daemon, start_fake_daemon):
    async with fake_upstream(echo) as cloud_url:
        cloud = {"frontier": {"base_url": cloud_url + "/v1", "model": "big"}}
        d, children, _ = await daemon(cloud=cloud, a={"fallback": "frontier", "fallback_after_ms": 60_000})
        children.hold("a")
        async with d.http.post(f"{d.url}/v1/chat/completions", json=chat("a"),
                               headers={"X-Max-Wait-Ms": "50"}) as response:
            assert response.status == 200 and response.headers["X-Served-By"] == "cloud"
            assert response.headers["X-Fallback-Reason"] == "queue_timeout"


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "99999999999", "nan"])
async def test_a_bad_wait_bound_is_a_400(daemon, value):
    d, _, _ = await daemon()
    async with d.http.post(f"{d.url}/v1/chat/completions", json=chat("a"), headers={"X-Max-Wait-Ms": value}) as r:
        body = await r.json()
    assert r.status == 400 and body["error"]["code"] == "invalid_header"


# ---------------------------------------------------------------- the OpenAI surface


async def test_any_post_naming_a_model_is_routed_to_it_with_its_path(daemon):
    async with fake_upstream(echo) as url:
        d, children, records = await daemon()
        children.upstreams["a"] = url
        for path in ("/v1/responses", "/v1/messages", "/v1/rerank", "/infill", "/tokenize", "/detokenize"):
            async with d.http.post(d.url + path, json={"model": "fast", "input": "x"}) as response:
                body = await response.json()
            assert response.status == 200 and body["path"] == path, path
        async with d.http.post(d.url + "/v1/anything", json={"input": "x"}) as response:
            assert response.status == 400 and (await response.json())["error"]["code"] == "missing_model"
        async with d.http.get(d.url + "/no/such/thing") as response:
            assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"


async def test_get_a_model_by_id_and_llama_swaps_status_word(daemon):
    async with fake_upstream(echo) as url:
        d, children, _ = await daemon()
        children.upstreams["a"] = url
        await d.runtime.load("a")
        status, entry = await d.get_json("/v1/models/fast")
        assert status == 200 and entry["alias_of"] == "a" and entry["status"]["value"] == "loaded"
        status, body = await d.get_json("/v1/models/nope")
        assert status == 404 and body["error"]["code"] == "model_not_found"


# ---------------------------------------------------------------- llama-swap's endpoints


async def test_llama_swap_endpoints(daemon):
    async with fake_upstream(echo) as url:
        d, children, _ = await daemon()
        children.upstreams["a"] = url
        await d.runtime.load("a")
        children.log("a").feed(b"first line\n")
        async with d.http.get(f"{d.url}/upstream/a", allow_redirects=False) as response:
            assert response.status == 302 and response.headers["Location"] == "/upstream/a/"
        async with d.http.get(f"{d.url}/logs") as response:
            assert response.status == 200 and "first line" in await response.text()
        async with d.http.get(f"{d.url}/logs/stream/a") as stream:
            assert await stream.content.readline() == b"first line\n"
            children.log("a").feed(b"live line\n")
            assert await asyncio.wait_for(stream.content.readline(), 5) == b"live line\n"
        async with d.http.get(f"{d.url}/logs/stream?no-history") as stream:
            children.log("b").feed(b"from b\n")
            assert await asyncio.wait_for(stream.content.readline(), 5) == b"[b] from b\n"
        async with d.http.get(f"{d.url}/unload") as response:
            assert response.status == 200
        assert d.state("a") == "unloaded"


# ---------------------------------------------------------------- metrics


async def test_duration_and_first_byte_histograms_and_build_info(daemon):
    async with fake_upstream(echo) as url:
        d, children, _ = await daemon()
        children.upstreams["a"] = url
        status, _, _ = await d.chat("a")
        assert status == 200
        metrics = await (await d.http.get(f"{d.url}/metrics")).text()
    assert 'model_supervisor_request_duration_seconds_count{model="a",route="local"} 1.0' in metrics
    assert 'model_supervisor_time_to_first_byte_seconds_count{model="a",route="local"} 1.0' in metrics
    assert "model_supervisor_build_info{" in metrics



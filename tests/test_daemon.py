"""The daemon end to end, against the real llama-server with generated GGUFs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time

import aiohttp
import pytest

from conftest import llama_children

pytestmark = pytest.mark.llama

SWAP_GROUP = {"main": {"swap": True, "exclusive": True}}


def swap_pair(tiny_models, **extra) -> dict[str, dict]:
    return {
        "a": {"model": str(tiny_models[1]), "group": "main", "args": ["-c", "512"], **extra},
        "b": {"model": str(tiny_models[2]), "group": "main", "args": ["-c", "512"], **extra},
    }


@pytest.mark.parametrize("overlap", [False, True], ids=["stop-then-start", "overlapping"])
async def test_swap_a_b_a_serves_each_model_and_never_runs_two_children_that_serve(start_daemon, tiny_models, overlap):
    d = await start_daemon(swap_pair(tiny_models), SWAP_GROUP, scheduler={"overlap_swaps": overlap})
    seen_pids = []
    for model in ("a", "b", "a"):
        status, body, headers = await d.chat(model)
        assert status == 200, body
        assert body["model"] == model  # each child is started with --alias <model name>
        assert body["choices"][0]["message"]["content"]
        assert headers["X-Served-By"] == "local"
        # The child that answered really holds this model's file.
        status, props = await d.get_json(f"/upstream/{model}/props")
        assert props["model_path"].endswith(f"m{1 if model == 'a' else 2}.gguf")
        await d.wait_until(lambda: not any(s.phase.value == "unloading" for s in d.runtime.core.models.values()))
        assert len(llama_children()) == 1
        seen_pids.append(d.runtime.core.models[model].pid)
    assert len(set(seen_pids)) == 3  # a was restarted after b
    assert [f["cause"] for f in d.timeline.of("stopped")] == ["swap", "swap"]
    kinds = [(kind, f["model"]) for kind, f, _ in d.timeline.entries if kind in ("starting", "stopped")]
    if overlap:
        # Host RAM holds both: the incoming model starts while the outgoing one saves its slots and stops.
        assert kinds == [("starting", "a"), ("starting", "b"), ("stopped", "a"), ("starting", "a"), ("stopped", "b")]
        assert d.timeline.max_alive() == 2
    else:
        assert kinds == [("starting", "a"), ("stopped", "a"), ("starting", "b"), ("stopped", "b"), ("starting", "a")]
        assert d.timeline.max_alive() == 1


async def test_models_of_non_exclusive_groups_stay_loaded_together(start_daemon, tiny_models):
    groups = {"chat": {"swap": True, "exclusive": False}, "tools": {"swap": True, "exclusive": False}}
    d = await start_daemon({
        "a": {"model": str(tiny_models[1]), "group": "chat", "args": ["-c", "512"]},
        "t": {"model": str(tiny_models[3]), "group": "tools", "args": ["-c", "512"]},
    }, groups)  # fmt: skip
    assert (await d.chat("a"))[0] == 200
    assert (await d.chat("t"))[0] == 200
    assert (await d.chat("a"))[0] == 200
    assert d.state("a") == d.state("t") == "ready"
    assert len(d.timeline.of("starting")) == 2
    status, running = await d.get_json("/running")
    assert sorted(r["model"] for r in running["running"]) == ["a", "t"]


async def test_persistent_group_member_survives_swaps_of_an_exclusive_group(start_daemon, tiny_models):
    groups = {**SWAP_GROUP, "embed": {"swap": True, "exclusive": False, "persistent": True}}
    models = {
        **swap_pair(tiny_models),
        "e": {"model": str(tiny_models[4]), "group": "embed", "args": ["-c", "512", "--embeddings", "--pooling", "mean"]},
    }
    d = await start_daemon(models, groups)
    async with d.http.post(f"{d.url}/v1/embeddings", json={"model": "e", "input": "hello"}) as response:
        assert response.status == 200
        assert len((await response.json())["data"][0]["embedding"]) == 64
    embed_pid = d.runtime.core.models["e"].pid
    for model in ("a", "b", "a"):
        assert (await d.chat(model))[0] == 200
    assert d.state("e") == "ready"
    assert d.runtime.core.models["e"].pid == embed_pid
    assert not d.timeline.of("stopped", "e")


async def test_concurrent_requests_for_a_cold_model_cause_one_load(start_daemon, tiny_models):
    d = await start_daemon(swap_pair(tiny_models), SWAP_GROUP)
    results = await asyncio.gather(*(d.chat("a") for _ in range(12)))
    assert [status for status, _, _ in results] == [200] * 12
    assert len(d.timeline.of("starting", "a")) == 1


async def test_streaming_request_holds_off_a_swap_until_it_finishes(start_daemon, tiny_models):
    models = swap_pair(tiny_models)
    models["a"]["args"] = ["-c", "8192"]
    # b waits for the whole stream, however slow. Not overlapping the swap, so b stays unloaded until this client
    # has read the last byte (with overlap_swaps it may start as soon as the daemon has relayed it: see the core's
    # test_overlapping_swap_never_starts_beside_a_model_that_still_serves).
    d = await start_daemon(models, SWAP_GROUP, queue_timeout_s=300, scheduler={"overlap_swaps": False})
    body = {"model": "a", "stream": True, "max_tokens": 1500, "messages": [{"role": "user", "content": "go"}]}
    async with d.http.post(f"{d.url}/v1/chat/completions", json=body) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        first = await stream.content.readline()
        assert first.startswith(b"data: ")
        b_request = asyncio.ensure_future(d.chat("b"))
        await d.wait_until(lambda: d.queued("b") == 1)
        # b waits; a keeps its child and keeps streaming.
        assert d.state("a") == "ready" and d.state("b") == "unloaded"
        assert not b_request.done()
        chunks = 0
        async for line in stream.content:
            if line.startswith(b"data: "):
                chunks += 1
                assert d.state("b") == "unloaded"
        finished_stream = time.monotonic()
        assert line.strip() == b"" or b"[DONE]" in line
    assert chunks > 500
    status, answer, _ = await b_request
    assert status == 200 and answer["model"] == "b"
    stop_of_a = next(t for kind, f, t in d.timeline.entries if kind == "stopped" and f["model"] == "a")
    assert stop_of_a >= finished_stream - 0.05  # a was stopped only once its stream was done
    assert d.timeline.max_alive() == 1


async def test_ttl_unloads_an_idle_model_and_ttl_zero_never_does(start_daemon, tiny_models):
    groups = {"x": {"exclusive": False}, "y": {"exclusive": False}}
    d = await start_daemon({
        "short": {"model": str(tiny_models[1]), "group": "x", "ttl_s": 0.3, "args": ["-c", "512"]},
        "forever": {"model": str(tiny_models[2]), "group": "y", "ttl_s": 0, "args": ["-c", "512"]},
    }, groups)  # fmt: skip
    assert (await d.chat("forever"))[0] == 200
    assert (await d.chat("short"))[0] == 200
    _, status = await d.get_json("/status")
    assert 0 < status["models"]["short"]["ttl_remaining_s"] <= 0.3
    assert status["models"]["forever"]["ttl_remaining_s"] is None
    await d.wait_until(lambda: d.state("short") == "unloaded", timeout=10)
    assert d.timeline.of("stopped", "short")[0]["cause"] == "ttl"
    # 'forever' finished its request before 'short' did, so it has been idle longer than short's TTL.
    assert d.state("forever") == "ready"
    assert d.runtime.core.next_wakeup() is None


async def test_model_whose_server_exits_at_start_fails_fast_with_the_cause(start_daemon, tiny_models):
    d = await start_daemon({"broken": {"model": str(tiny_models[1]), "args": ["--no-such-flag"]}},
                           health_timeout_s=60)
    started = time.monotonic()
    status, body, headers = await d.chat("broken")
    elapsed = time.monotonic() - started
    assert status == 503
    message = body["error"]["message"]
    assert "'broken'" in message and "--no-such-flag" in message
    assert body["error"]["code"] == "model_load_failed"
    assert "Retry-After" in headers
    assert elapsed < 10  # seen at exit, not after health_timeout_s (60 s)
    _, status_doc = await d.get_json("/status")
    assert status_doc["models"]["broken"]["state"] == "failed"
    assert "--no-such-flag" in status_doc["models"]["broken"]["last_error"]
    async with d.http.get(f"{d.url}/logs/broken") as response:
        assert "--no-such-flag" in await response.text()
    assert llama_children() == []


async def test_queue_timeout_gives_503_with_retry_after_before_any_stream_byte(start_daemon, tiny_models):
    models = swap_pair(tiny_models)
    models["a"]["args"] = ["-c", "8192"]
    d = await start_daemon(models, SWAP_GROUP, queue_timeout_s=0.5)
    assert (await d.post_json("/models/a/load"))[0] == 200  # loaded first: only b's wait is under test
    body = {"model": "a", "stream": True, "max_tokens": 4000, "messages": [{"role": "user", "content": "go"}]}
    async with d.http.post(f"{d.url}/v1/chat/completions", json=body) as holding:
        await holding.content.readline()  # a is busy, and stays busy while we do not read on
        stream_b = {"model": "b", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with d.http.post(f"{d.url}/v1/chat/completions", json=stream_b) as response:
            assert response.status == 503
            assert 1 <= int(response.headers["Retry-After"]) <= 10
            assert response.headers["Content-Type"].startswith("application/json")
            error = (await response.json())["error"]
            assert error["code"] == "queue_timeout" and "'b'" in error["message"]
    assert d.state("b") == "unloaded"


async def test_client_disconnect_cancels_the_upstream_generation(start_daemon, tiny_models):
    d = await start_daemon({"a": {"model": str(tiny_models[1]), "args": ["-c", "65536", "-np", "1"]}})
    body = {"model": "a", "stream": True, "max_tokens": 60000, "messages": [{"role": "user", "content": "go"}]}
    async with aiohttp.ClientSession() as own:
        response = await own.post(f"{d.url}/v1/chat/completions", json=body)
        await response.content.readline()
        response.close()  # the client goes away mid-stream
    await d.wait_until(lambda: d.runtime.core.models["a"].in_flight == 0, timeout=10)

    async def slot_busy() -> bool:
        _, slots = await d.get_json("/upstream/a/slots")
        return any(slot.get("is_processing") for slot in slots)

    # 60000 tokens would keep the only slot busy for many seconds; cancelled, it frees within moments.
    deadline = time.monotonic() + 5
    while await slot_busy():
        assert time.monotonic() < deadline, "llama-server kept generating for a client that left"
        await asyncio.sleep(0.02)


async def test_openai_errors_for_unknown_model_and_bad_json(start_daemon, tiny_models):
    d = await start_daemon(swap_pair(tiny_models), SWAP_GROUP)
    status, body, _ = await d.chat("nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert body["error"]["type"] == "not_found_error"
    async with d.http.post(f"{d.url}/v1/chat/completions", data=b"{not json",
                           headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_json"
    async with d.http.post(f"{d.url}/v1/completions", json={"prompt": "x"}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "missing_model"
    async with d.http.get(f"{d.url}/no/such/path") as response:
        assert response.status == 404
        assert "error" in await response.json()
    assert llama_children() == []  # none of that started anything


async def test_models_list_health_and_admin_load_unload(start_daemon, tiny_models):
    models = swap_pair(tiny_models)
    models["a"]["aliases"] = ["speed"]
    d = await start_daemon(models, SWAP_GROUP)
    _, listing = await d.get_json("/v1/models")
    by_id = {m["id"]: m for m in listing["data"]}
    assert set(by_id) == {"a", "b", "speed"}
    assert by_id["speed"]["alias_of"] == "a" and by_id["a"]["status"]["value"] == "unloaded"

    status, health = await d.get_json("/health/speed")
    assert status == 503 and health["state"] == "unloaded"
    status, loaded = await d.post_json("/models/speed/load")
    assert status == 200 and loaded["state"] == "ready"
    status, health = await d.get_json("/health/a")
    assert status == 200 and health["state"] == "ready"
    _, listing = await d.get_json("/v1/models")
    assert {m["id"]: m["status"]["value"] for m in listing["data"]}["speed"] == "loaded"  # llama-swap's word; /status says "ready"

    status, _ = await d.post_json("/models/b/load")  # swaps a out
    assert status == 200 and d.state("a") == "unloaded"
    status, _ = await d.post_json("/models/b/unload")
    assert status == 200 and d.state("b") == "unloaded"
    assert llama_children() == []
    status, _ = await d.post_json("/models/a/load")
    status, _ = await d.post_json("/unload")
    assert status == 200 and llama_children() == []
    assert (await d.get_json("/health"))[1] == {"status": "ok"}


async def test_stream_passes_through_as_server_sent_events(start_daemon, tiny_models):
    d = await start_daemon(swap_pair(tiny_models), SWAP_GROUP)
    body = {"model": "a", "stream": True, "max_tokens": 20, "prompt": "once"}
    events = []
    async with d.http.post(f"{d.url}/v1/completions", json=body) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
    assert events[-1] == b"[DONE]"
    assert len(events) >= 20
    assert all("choices" in json.loads(e) for e in events[:-1])


async def test_tokens_guard_admin_and_inference_endpoints(start_daemon, tiny_models, monkeypatch):
    monkeypatch.setenv("MS_TEST_ADMIN", "admin-secret")
    monkeypatch.setenv("MS_TEST_KEY", "inference-secret")
    d = await start_daemon(swap_pair(tiny_models), SWAP_GROUP, admin_token_env="MS_TEST_ADMIN",
                           api_key_env="MS_TEST_KEY")
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers, expected in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                              ({"Authorization": "Bearer inference-secret"}, 200),
                              ({"Authorization": "Bearer admin-secret"}, 200)):
        async with d.http.post(f"{d.url}/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status == expected
            if expected == 401:
                assert (await response.json())["error"]["code"] == "unauthorized"
    for headers, expected in (({}, 401), ({"Authorization": "Bearer inference-secret"}, 401),
                              ({"Authorization": "Bearer admin-secret"}, 200)):
        async with d.http.post(f"{d.url}/models/a/unload", headers=headers) as response:
            assert response.status == expected
    assert (await d.get_json("/health"))[0] == 200  # health and status stay open for routers and monitors
    assert (await d.get_json("/status"))[0] == 200


async def test_each_request_is_reported_with_tokens_and_timings(start_daemon, tiny_models):
    models = swap_pair(tiny_models)
    models["a"]["args"] = ["-c", "8192"]
    d = await start_daemon(models, SWAP_GROUP, queue_timeout_s=0.5)
    assert (await d.post_json("/models/a/load"))[0] == 200  # loaded first: only b's wait is under test
    records = []
    d.daemon.proxy.observers.append(records.append)
    assert (await d.chat("a", content="hi", max_tokens=5))[0] == 200
    body = {"model": "a", "stream": True, "max_tokens": 7, "messages": [{"role": "user", "content": "hi"}]}
    async with d.http.post(f"{d.url}/v1/chat/completions", json=body) as stream:
        await stream.read()
    plain, streamed = records
    assert (plain.model, plain.provider, plain.route, plain.status, plain.tokens_out) == ("a", "local", "local", 200, 5)
    assert plain.tokens_in and plain.tokens_in > 5
    assert streamed.tokens_out == 7 and streamed.tokens_in == plain.tokens_in  # from llama-server's timings
    assert 0 < plain.ttft_ms <= plain.total_ms and plain.wait_ms >= 0
    long_stream = {**body, "max_tokens": 4000}
    async with d.http.post(f"{d.url}/v1/chat/completions", json=long_stream) as holding:
        await holding.content.readline()  # a stays busy while we do not read on
        status, _, _ = await d.chat("b")
        assert status == 503
    rejected = records[-2] if records[-1].model == "a" else records[-1]
    assert (rejected.model, rejected.route, rejected.status, rejected.tokens_in) == ("b", "rejected", 503, None)


async def test_events_stream_the_status_document_as_it_changes(start_daemon, tiny_models):
    d = await start_daemon(swap_pair(tiny_models), SWAP_GROUP)
    async with d.http.get(f"{d.url}/events") as events:
        assert events.headers["Content-Type"] == "text/event-stream"

        async def next_status() -> dict:
            while True:
                line = await events.content.readline()
                if line.startswith(b"data: "):
                    return json.loads(line[6:])

        first = await next_status()
        assert first["models"]["a"]["state"] == "unloaded"
        chat = asyncio.ensure_future(d.chat("a"))
        states = set()
        while "ready" not in states:
            states.add((await next_status())["models"]["a"]["state"])
        assert (await chat)[0] == 200


async def test_slow_clients_get_408_and_the_daemon_goes_on(start_daemon, tiny_models):
    d = await start_daemon(swap_pair(tiny_models), SWAP_GROUP, header_timeout_s=0.3, body_timeout_s=0.3)
    port = int(d.url.rsplit(":", 1)[1])
    # A head that never completes (slowloris): answered 408 and closed.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 408") and b"header_timeout" in answer
    writer.close()
    # A body that never completes: a JSON 408 as well.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\"")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    assert head.startswith(b"HTTP/1.1 408") and b"Connection: close" in head
    assert json.loads(body)["error"]["code"] == "body_timeout"
    writer.close()
    # A prompt client on a connection kept alive across requests is not cut off by the head deadline.
    async with aiohttp.ClientSession() as own:
        for _ in range(3):
            async with own.get(f"{d.url}/health") as response:
                assert response.status == 200
            await asyncio.sleep(0.2)  # spans the 0.3 s head deadline on the same connection
    assert (await d.chat("a"))[0] == 200


async def test_stopping_does_not_wait_on_an_open_event_stream(start_daemon, tiny_models):
    d = await start_daemon(swap_pair(tiny_models), SWAP_GROUP)
    async with aiohttp.ClientSession() as own:
        events = await own.get(f"{d.url}/events")
        await events.content.readline()  # a dashboard is watching
        started = time.monotonic()
        await d.daemon.stop()
        assert time.monotonic() - started < 3
        events.close()


async def test_a_pooled_connection_the_upstream_closed_is_retried_on_a_fresh_one():
    """Named fake: an upstream that says keep-alive but closes after every answer (as llama-server does after a
    stream). The proxy's second request lands on the dead pooled connection and must be sent again, not 502."""
    from model_supervisor.http.errors import stream_through
    from model_supervisor.http.proxy import Proxy
    from model_supervisor.records import ResponseTail
    from model_supervisor.runtime import Ticket
    from model_supervisor.scheduler import Upstream

    async def answer_then_close(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
        await writer.drain()
        # The next request on this connection is read, then the connection closes without an answer: exactly
        # what a client sees when the server's close crosses its reuse of the connection.
        with contextlib.suppress(asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
        writer.close()

    upstream = await asyncio.start_server(answer_then_close, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    async with aiohttp.ClientSession() as pool:
        proxy = Proxy(runtime=None, http=pool, cloud=None)

        async def handler(request):
            body = await request.read()
            upstream = await proxy._open(request, Ticket(1, "m", Upstream(f"http://127.0.0.1:{port}")), "/x", body)
            return await stream_through(request, upstream, {}, "m", ResponseTail())

        app = aiohttp.web.Application()
        app.router.add_post("/", handler)  # POST: aiohttp retries only idempotent methods by itself
        runner = aiohttp.web.AppRunner(app)
        await runner.setup()
        await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
        front = f"http://127.0.0.1:{runner.addresses[0][1]}/"
        try:
            async with aiohttp.ClientSession() as client:
                for _ in range(5):
                    async with client.post(front, json={"model": "m"}) as response:
                        assert (response.status, await response.text()) == (200, "ok")
        finally:
            await runner.cleanup()
            upstream.close()


async def test_a_request_whose_wait_the_swap_will_clearly_outlast_is_answered_at_once_and_the_swap_goes_on(
        start_daemon, tiny_models):
    d = await start_daemon(swap_pair(tiny_models), SWAP_GROUP)
    for model in ("b", "a"):  # b's load is timed once; a is loaded and idle
        assert (await d.chat(model))[0] == 200
    last_load_ms = d.runtime.core.models["b"].last_load_s * 1000
    wait_ms = max(1, int(last_load_ms / 4))  # the swap takes ~4x the wait: not worth waiting out
    body = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with d.http.post(f"{d.url}/v1/chat/completions", json=body,
                           headers={"X-Max-Wait-Ms": str(wait_ms)}) as response:
        answer = await response.json()
        assert response.status == 503 and answer["error"]["code"] == "queue_timeout", answer
        assert "going by its last load" in answer["error"]["message"]  # answered early, not at the deadline
        assert int(response.headers["Retry-After"]) >= 1
    await d.wait_until(lambda: d.state("b") == "ready")  # the swap it started went on
    assert (await d.chat("b"))[0] == 200
    assert len(d.timeline.of("starting", "b")) == 2

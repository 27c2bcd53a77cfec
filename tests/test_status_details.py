"""What /status tells an operator: load progress, why requests wait, the swap timeline, recent latency
(FakeChildren; a named fake upstream that answers chat completions with usage)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from test_request_faults import fake_upstream


async def answer(request: web.Request) -> web.Response:
    await asyncio.sleep(0.01)
    return web.json_response({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 20}})


async def test_progress_reasons_timeline_and_latency(start_fake_daemon, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    async with fake_upstream(answer) as url:
        d = await start_fake_daemon({"a": {"model": str(model), "vram_mb": 1},
                                     "b": {"model": str(model), "vram_mb": 1}})
        children = d.daemon.children
        children.upstreams.update(a=url, b=url)

        gate = children.hold("a")
        first = asyncio.ensure_future(d.chat("a"))
        await children.start_entered.wait()
        _, doc = await d.get_json("/status")
        a = doc["models"]["a"]
        assert a["state"] == "loading" and a["load_progress"] is None
        assert a["load_progress_basis"] == "never loaded before: no estimate" and a["waiting_for"] == "loading"
        gate.set()
        assert (await first)[0] == 200

        held = await d.runtime.acquire("a")  # a is busy: a request for b has to wait for it to drain
        waiting = asyncio.ensure_future(d.chat("b"))
        await d.wait_until(lambda: d.queued("b") == 1)
        _, doc = await d.get_json("/status")
        assert doc["models"]["a"]["waiting_for"] == "draining: to be swapped out for b once 1 request(s) finish"
        assert doc["models"]["b"]["waiting_for"] == "draining a"
        d.runtime.release(held)
        assert (await waiting)[0] == 200

        gate = children.hold("a")
        children.start_entered.clear()
        again = asyncio.ensure_future(d.chat("a"))
        await children.start_entered.wait()
        await asyncio.sleep(0.01)
        _, doc = await d.get_json("/status")
        progress = doc["models"]["a"]["load_progress"]
        assert progress is not None and 0 < progress <= 0.99
        assert doc["models"]["a"]["load_progress_basis"].startswith("its last load took")
        gate.set()
        assert (await again)[0] == 200

        _, doc = await d.get_json("/status")
        events = [(e["model"], e["event"], e["cause"]) for e in doc["timeline"]]
        assert events == [("a", "loaded", "request"), ("a", "unloaded", "swap"), ("b", "loaded", "request"),
                          ("b", "unloaded", "swap"), ("a", "loaded", "request")]
        assert doc["timeline"][2]["displaced"] == ["a"] and doc["timeline"][2]["swap_ms"] >= 0
        latency = doc["models"]["a"]["latency"]
        assert latency["requests"] == 2 and latency["ttft_p50_ms"] > 0 and latency["tokens_per_s"] is None

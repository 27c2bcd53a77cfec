"""/metrics: Prometheus text that follows what the daemon does (real llama-server children)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from model_supervisor.gpu import FixedProbe

pytestmark = pytest.mark.llama


async def scrape(d) -> dict[tuple[str, tuple], float]:
    async with d.http.get(f"{d.url}/metrics") as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_follow_loads_requests_unloads_memory_and_leases(start_daemon, tiny_models):
    models = {
        "a": {"model": str(tiny_models[1]), "group": "main", "args": ["-c", "512"], "vram_mb": 3000},
        "b": {"model": str(tiny_models[2]), "group": "main", "args": ["-c", "512"], "vram_mb": 3000},
    }
    d = await start_daemon(models, {"main": {"swap": True}}, probe=FixedProbe(8000), gpu={"reserve_mb": 500})
    before = await scrape(d)
    assert value(before, "model_supervisor_model_state", model="a", state="unloaded") == 1
    assert value(before, "model_supervisor_memory_bytes", device="fixed test device", pool="vram",
                 kind="total") == 8000 * 2**20  # fmt: skip

    for model in ("a", "a", "b"):
        assert (await d.chat(model, max_tokens=4))[0] == 200
    async with d.http.post(f"{d.url}/leases", json={"owner": "tts", "vram_mb": 1000}) as response:
        assert response.status == 201
    after = await scrape(d)
    assert value(after, "model_supervisor_loads_total", model="a", cause="request") == 1
    assert value(after, "model_supervisor_loads_total", model="b", cause="request") == 1
    assert value(after, "model_supervisor_unloads_total", model="a", cause="swap") == 1
    assert value(after, "model_supervisor_requests_total", model="a", route="local", status="200") == 2
    assert value(after, "model_supervisor_tokens_total", model="a", provider="local", direction="out") == 8
    assert value(after, "model_supervisor_load_seconds_count", model="b") == 1
    assert value(after, "model_supervisor_queue_wait_seconds_count", model="a") == 2
    assert value(after, "model_supervisor_model_state", model="b", state="ready") == 1
    assert value(after, "model_supervisor_model_state", model="a", state="ready") == 0
    assert value(after, "model_supervisor_memory_bytes", device="fixed test device", pool="vram",
                 kind="models") == 3000 * 2**20  # fmt: skip
    assert value(after, "model_supervisor_memory_bytes", device="fixed test device", pool="vram",
                 kind="leases") == 1000 * 2**20  # fmt: skip
    assert value(after, "model_supervisor_lease_events_total", event="granted") == 1
    assert value(after, "model_supervisor_leases", status="held") == 1

    # In flight and queued are read live: hold a stream on b, ask for a (it must wait for b).
    body = {"model": "b", "stream": True, "max_tokens": 400, "messages": [{"role": "user", "content": "go"}]}
    async with d.http.post(f"{d.url}/v1/chat/completions", json=body) as stream:
        await stream.content.readline()
        waiting = asyncio.ensure_future(d.chat("a"))
        await d.wait_until(lambda: d.queued("a") == 1)
        live = await scrape(d)
        assert value(live, "model_supervisor_in_flight", model="b") == 1
        assert value(live, "model_supervisor_queued", model="a") == 1
        await stream.read()
    assert (await waiting)[0] == 200

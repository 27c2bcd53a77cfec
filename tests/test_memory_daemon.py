"""The memory arbiter end to end: a probe with a fixed budget (for determinism) and real llama-server children."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import llama_children
from model_supervisor.gpu import FixedProbe

pytestmark = pytest.mark.llama

# 10 GB device, 1 GB reserved: 9000 MB usable. Models declare their need so the arithmetic is exact.
BUDGET = {"reserve_mb": 1000}
INDEPENDENT = {"x": {"exclusive": False}, "y": {"exclusive": False}}


def models(tiny_models, a_mb=6000, b_mb=2000) -> dict[str, dict]:
    return {
        "a": {"model": str(tiny_models[1]), "group": "x", "vram_mb": a_mb, "args": ["-c", "8192"]},
        "b": {"model": str(tiny_models[2]), "group": "y", "vram_mb": b_mb, "args": ["-c", "512"]},
    }


async def start(start_daemon, tiny_models, **kwargs):
    return await start_daemon(models(tiny_models, **kwargs), INDEPENDENT, probe=FixedProbe(10_000), gpu=BUDGET)


async def lease(d, **body):
    async with d.http.post(f"{d.url}/leases", json={"owner": "tts", "wait_s": 30, **body}) as response:
        return response.status, await response.json()


async def test_a_lease_that_needs_an_idle_models_memory_unloads_it_and_is_granted(start_daemon, tiny_models):
    d = await start(start_daemon, tiny_models)
    assert (await d.chat("a"))[0] == 200
    assert (await d.chat("b"))[0] == 200
    status, granted = await lease(d, vram_mb=5000)
    assert status == 201 and granted["vram_mb"] == 5000
    assert d.state("a") == "unloaded" and d.state("b") == "ready"  # only what was needed went
    assert d.timeline.of("stopped", "a")[0]["cause"] == "lease"
    _, status_doc = await d.get_json("/status")
    (device,) = status_doc["memory"]
    assert (device["leases_mb"], device["models_mb"], device["usable_mb"]) == (5000, 2000, 9000)
    assert status_doc["leases"][0]["owner"] == "tts"


async def test_a_lease_blocked_by_an_in_flight_request_is_granted_once_it_finishes(start_daemon, tiny_models):
    d = await start(start_daemon, tiny_models)
    body = {"model": "a", "stream": True, "max_tokens": 1500, "messages": [{"role": "user", "content": "go"}]}
    async with d.http.post(f"{d.url}/v1/chat/completions", json=body) as stream:
        await stream.content.readline()
        pending = asyncio.ensure_future(lease(d, vram_mb=5000))
        await d.wait_until(lambda: any(w.kind == "lease" for w in d.runtime.core.waiters.values()))
        assert not pending.done() and d.state("a") == "ready"
        # While the lease waits for a to drain, a takes no new requests.
        _, health = await d.get_json("/health/a")
        assert health["state"] == "ready" and health["error"]["code"] == "model_not_ready"
        async for _ in stream.content:
            pass
    status, granted = await pending
    assert status == 201
    order = [(kind, f) for kind, f, _ in d.timeline.entries if kind in ("stopped", "lease_granted")]
    assert [kind for kind, _ in order] == ["stopped", "lease_granted"]


async def test_a_lease_is_released_when_its_holder_dies(start_daemon, tiny_models):
    d = await start(start_daemon, tiny_models)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status, granted = await lease(d, vram_mb=1000, pid=holder.pid)
        assert status == 201 and d.runtime.core.leases
        holder.kill()
        await d.wait_until(lambda: not d.runtime.core.leases, timeout=2)  # released within 2 s
        assert d.timeline.of("lease_ended")[0]["reason"] == "holder_died"
    finally:
        holder.kill()
        holder.wait()


async def test_a_load_that_does_not_fit_beside_a_lease_waits_and_proceeds_when_it_ends(start_daemon, tiny_models):
    d = await start(start_daemon, tiny_models)
    status, granted = await lease(d, vram_mb=5000, priority=99)
    assert status == 201
    waiting = asyncio.ensure_future(d.chat("a"))  # 6000 MB: does not fit next to 5000 of 9000
    await d.wait_until(lambda: d.queued("a") == 1)
    assert d.state("a") == "unloaded" and not waiting.done()
    behind = asyncio.ensure_future(d.chat("b"))  # 2000 would fit, but must not take memory a is waiting for
    await d.wait_until(lambda: d.queued("b") == 1)
    assert d.state("b") == "unloaded"
    async with d.http.delete(f"{d.url}/leases/{granted['id']}") as response:
        assert response.status == 200
    status, body, _ = await waiting
    assert status == 200 and body["model"] == "a"
    status, body, _ = await behind
    assert status == 200 and body["model"] == "b"
    starts = [f["model"] for f in d.timeline.of("starting")]
    assert starts == ["a", "b"]


async def test_a_lease_that_cannot_be_granted_in_time_gets_503_and_the_cli_exits_3(start_daemon, tiny_models):
    d = await start(start_daemon, tiny_models)
    assert (await d.chat("b"))[0] == 200
    status, body = await lease(d, vram_mb=8000, priority=0, wait_s=0.3)  # b (priority 0) may not be displaced
    assert status == 503 and body["error"]["code"] == "lease_timeout"
    status, body = await lease(d, vram_mb=20_000)
    assert status == 503 and body["error"]["code"] == "insufficient_memory"
    result = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "model_supervisor.cli", "lease", "--url", d.url, "--vram-mb", "20000", "--", "true",
        stderr=asyncio.subprocess.PIPE)  # fmt: skip
    _, stderr = await result.communicate()
    assert result.returncode == 3 and b"not granted" in stderr


async def test_lease_requests_are_validated(start_daemon, tiny_models):
    d = await start(start_daemon, tiny_models)
    for body, field in (({}, "vram_mb"), ({"vram_mb": "lots"}, "vram_mb"), ({"vram_mb": 10, "ttl_s": 0}, "ttl_s"),
                        ({"vram_mb": 10, "pid": 2**22 + 12345}, "pid"), ({"vram_mb": 10, "colour": 1}, "colour")):
        status, answer = await lease(d, **body)
        assert status == 400 and field in answer["error"]["message"], answer
    async with d.http.delete(f"{d.url}/leases/424242") as response:
        assert response.status == 404
    async with d.http.post(f"{d.url}/leases/424242/renew") as response:
        assert response.status == 404


async def test_cli_lease_runs_the_command_holding_the_lease_and_returns_its_exit_code(start_daemon, tiny_models):
    d = await start(start_daemon, tiny_models)
    assert (await d.chat("a"))[0] == 200
    # The command itself looks at the daemon: it must see its own lease, and model a gone to make room.
    script = (f"import json, sys, urllib.request as u; s = json.load(u.urlopen('{d.url}/status')); "
              f"print(json.dumps([s['leases'], s['models']['a']['state']])); sys.exit(7)")  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "model_supervisor.cli", "lease", "--url", d.url, "--vram-mb", "4000", "--owner", "comfy",
        "--", sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE)  # fmt: skip
    stdout, _ = await process.communicate()
    assert process.returncode == 7
    leases, a_state = json.loads(stdout)
    assert [(x["owner"], x["vram_mb"]) for x in leases] == [("comfy", 4000)]
    assert a_state == "unloaded"
    assert d.runtime.core.leases == {}  # released when the command exited


async def test_cli_lease_forwards_signals_and_releases(start_daemon, tiny_models, tmp_path):
    d = await start(start_daemon, tiny_models)
    ready = tmp_path / "ready"
    script = (f"import signal, sys, time, pathlib; signal.signal(signal.SIGTERM, lambda *a: sys.exit(42)); "
              f"pathlib.Path('{ready}').touch(); time.sleep(60)")  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "model_supervisor.cli", "lease", "--url", d.url, "--vram-mb", "100", "--",
        sys.executable, "-c", script)  # fmt: skip
    await d.wait_until(lambda: bool(d.runtime.core.leases), timeout=30)
    while not ready.exists():  # the command has installed its handler
        await asyncio.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert await process.wait() == 42
    assert d.runtime.core.leases == {}


async def test_memory_is_learned_after_a_load_and_used_after_a_restart(start_daemon, tiny_models, tmp_path):
    state_dir = tmp_path / "learned-state"
    spec = {"a": {"model": str(tiny_models[1]), "args": ["-c", "512"]}}
    d = await start_daemon(spec, state_dir=str(state_dir))  # the real host probe: RSS of the child
    _, before = await d.get_json("/status")
    assert before["models"]["a"]["vram_source"] == "estimate"
    assert before["memory"][0]["backend"] == "host" and before["memory"][0]["pool"] == "ram"
    assert (await d.chat("a"))[0] == 200
    _, after = await d.get_json("/status")
    rss_mb = after["models"]["a"]["vram_mb"]
    assert after["models"]["a"]["vram_source"] == "learned"
    child = llama_children()[0]
    assert abs(rss_mb - child.memory_info().rss / 2**20) < 64
    await d.daemon.stop()
    again = await start_daemon(spec, state_dir=str(state_dir))
    _, status = await again.get_json("/status")
    assert status["models"]["a"]["vram_source"] == "learned" and status["models"]["a"]["vram_mb"] == rss_mb
    assert os.path.exists(state_dir / "learned-memory.json")


async def test_status_command_shows_memory_and_leases_readably(start_daemon, tiny_models):
    d = await start(start_daemon, tiny_models)
    assert (await d.chat("b"))[0] == 200
    assert (await lease(d, vram_mb=1500))[0] == 201
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "model_supervisor.cli", "status", "--url", d.url, stdout=asyncio.subprocess.PIPE)
    stdout, _ = await process.communicate()
    text = stdout.decode()
    assert process.returncode == 0
    assert "memory: fixed test device" in text
    assert "models 2000 MB, leases 1500 MB, other programs 0 MB, reserve 1000 MB, available 5500 MB" in text
    assert "tts" in text and "2000 (config)" in text

"""Yielding to programs outside the daemon: a real process that grows into the memory models hold makes the daemon
unload idle models (cause memory_pressure), on the host-RAM pool with a real llama-server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from model_supervisor.gpu import HostProbe

pytestmark = pytest.mark.llama

HOG_MB = 3000
HEADROOM_MB = 1500

HOG = f"""
import sys
block = bytearray({HOG_MB} * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1  # touch every page: resident, not just reserved
print("holding", flush=True)
sys.stdin.read()
"""


async def test_a_program_that_grows_makes_an_idle_model_yield_and_it_comes_back_on_demand(start_daemon, tiny_models):
    reading = HostProbe().snapshot()
    need = reading.total_mb - reading.used_mb - HEADROOM_MB  # the model takes all but HEADROOM_MB of what is free
    if need < 1000:
        pytest.skip(f"too little free RAM here ({reading.total_mb - reading.used_mb} MB)")
    d = await start_daemon({"a": {"model": str(tiny_models[1]), "args": ["-c", "512"], "vram_mb": need}},
                           gpu={"backend": "none", "reserve_mb": 0, "poll_interval_s": 0.2, "yield_interval_s": 0})
    status, body, _ = await d.chat("a")
    assert status == 200, body
    hog = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert hog.stdout.readline() == b"holding\n"
        await d.wait_until(lambda: d.state("a") == "unloaded", timeout=15)
        (stopped,) = d.timeline.of("stopped", "a")
        assert stopped["cause"] == "memory_pressure"
        _, status_doc = await d.get_json("/status")
        last_stop = status_doc["models"]["a"]["last_stop"]
        assert last_stop["cause"] == "memory_pressure" and "other programs hold" in last_stop["detail"]
    finally:
        hog.kill()
        hog.wait()
    await d.wait_until(lambda: d.runtime.core.budget.foreign_mb < reading.used_mb + HEADROOM_MB // 2, timeout=10)
    status, body, _ = await d.chat("a")  # the memory is back: it loads again for a request
    assert status == 200, body

"""Soak: many requests over models that must swap, with llama-server children killed at random.

SOAK_REQUESTS (default 1000) sets the length; the benchmark script has a longer mode. Every request must get an
answer or a clean error within its bound; afterwards no process or file descriptor may have leaked and the
daemon's memory may not have grown by 10 % or more.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import aiohttp
import psutil
import pytest

from test_cli import free_port, wait_http

pytestmark = pytest.mark.llama

REQUESTS = int(os.environ.get("SOAK_REQUESTS", "1000"))
CLIENTS = 8
KILL_SHARE = 0.05
BOUND_S = 60  # queue_timeout_s (20) + a load + generation, with room for a busy machine


def llama_children(daemon: psutil.Process) -> list[psutil.Process]:
    from conftest import llama_children as below

    return below(daemon.pid)


def test_soak_with_random_kills(tmp_path, tiny_models, llama_server_bin):
    port = free_port()
    config = tmp_path / "models.toml"
    models = "\n".join(f'[models.m{i}]\nmodel = "{tiny_models[i]}"\ngroup = "main"\nargs = ["-c", "512", "-np", "2"]'
                       for i in (1, 2, 3))  # fmt: skip
    config.write_text(f"""[daemon]
listen = "127.0.0.1:{port}"
llama_server = "{llama_server_bin}"
state_dir = "{tmp_path / 'state'}"
port_range = [19600, 19699]
queue_timeout_s = 20
[scheduler]
max_batch_wait_s = 1
[groups.main]
swap = true
{models}
""")
    log = open(tmp_path / "daemon.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    daemon = psutil.Process(process.pid)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(1234)
    outcomes: dict[str, int] = {}
    kills = 0
    try:
        wait_http(f"{url}/health", process)

        async def run() -> tuple[float, int, float, int]:
            done = 0
            baseline_rss = baseline_fds = 0.0
            queue: asyncio.Queue[int] = asyncio.Queue()
            for index in range(REQUESTS):
                queue.put_nowait(index)

            async def client(http: aiohttp.ClientSession) -> None:
                nonlocal done, kills, baseline_rss, baseline_fds
                while not queue.empty():
                    queue.get_nowait()
                    body = {"model": f"m{rng.randint(1, 3)}", "max_tokens": 4,
                            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
                    started = time.monotonic()
                    async with http.post(f"{url}/v1/chat/completions", json=body) as response:
                        payload = await response.json()
                    assert time.monotonic() - started < BOUND_S
                    if response.status != 200:
                        assert response.status in (502, 503) and payload["error"]["message"], payload
                    outcomes[str(response.status)] = outcomes.get(str(response.status), 0) + 1
                    done += 1
                    if rng.random() < KILL_SHARE:
                        for child in llama_children(daemon):
                            child.send_signal(signal.SIGKILL)
                            kills += 1
                    if done == 100:  # warmed up: every model has been loaded, pools are full
                        baseline_rss, baseline_fds = daemon.memory_info().rss, daemon.num_fds()

            timeout = aiohttp.ClientTimeout(total=BOUND_S)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
            return baseline_rss, baseline_fds, daemon.memory_info().rss, daemon.num_fds()

        baseline_rss, baseline_fds, end_rss, end_fds = asyncio.run(run())
        assert sum(outcomes.values()) == REQUESTS
        assert kills > 0 and outcomes.get("200", 0) > REQUESTS * 0.8, outcomes
        assert end_rss < baseline_rss * 1.10, (baseline_rss, end_rss)
        assert end_fds <= baseline_fds + 4, (baseline_fds, end_fds)  # a child's pipe may be open either time
        assert len(llama_children(daemon)) <= 1
        children = llama_children(daemon)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert psutil.wait_procs(children, timeout=5)[1] == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    text = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in text
    print(f"\nsoak: {REQUESTS} requests, {kills} kills, outcomes {outcomes}, "
          f"RSS {baseline_rss / 2**20:.1f} -> {end_rss / 2**20:.1f} MB, fds {baseline_fds} -> {end_fds}")

"""Secrets (cloud keys, the admin token, the API key) never show up in logs, answers, metrics or children."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp
import pytest

from conftest import llama_children
from aiohttp import web

from test_cli import free_port
from test_fallback import FakeCloud

pytestmark = pytest.mark.llama

SECRETS = {"FRONTIER_KEY": "sk-cloud-5ecret-4242", "MS_ADMIN": "admin-5ecret-4242", "MS_API_KEY": "api-5ecret-4242"}


async def test_secrets_never_leak(tmp_path, tiny_models, llama_server_bin):
    fake = FakeCloud()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.completions)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    cloud_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    port = free_port()
    config = tmp_path / "models.toml"
    config.write_text(f"""[daemon]
listen = "127.0.0.1:{port}"
llama_server = "{llama_server_bin}"
state_dir = "{tmp_path / 'state'}"
port_range = [19500, 19599]
admin_token_env = "MS_ADMIN"
api_key_env = "MS_API_KEY"
[models.m]
model = "{tiny_models[1]}"
args = ["-c", "512"]
fallback = "frontier"
[cloud.frontier]
base_url = "{cloud_url}/v1"
model = "big"
api_key_env = "FRONTIER_KEY"
[cloud.down]
base_url = "http://127.0.0.1:9/v1"
model = "x"
api_key_env = "FRONTIER_KEY"
""")
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log:
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config), "--log-level", "debug",
            env={**os.environ, **SECRETS}, stdout=log, stderr=log)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    seen: list[str] = []  # every answer body and header the daemon gave
    user = {"Authorization": f"Bearer {SECRETS['MS_API_KEY']}"}
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(f"{url}/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)

            async def call(method: str, path: str, **kwargs) -> int:
                async with http.request(method, url + path, **kwargs) as response:
                    seen.append(str(dict(response.headers)) + await response.text())
                    return response.status

            chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert await call("POST", "/v1/chat/completions", json=chat, headers=user) == 200
            assert await call("POST", "/v1/chat/completions", json={**chat, "model": "frontier"}, headers=user) == 200
            assert await call("POST", "/v1/chat/completions", json={**chat, "model": "down"}, headers=user) == 502
            assert await call("POST", "/v1/chat/completions", json=chat) == 401
            assert await call("POST", "/v1/chat/completions", json=chat,
                              headers={"Authorization": "Bearer sk-cloud-5ecret-4242"}) == 401  # fmt: skip
            assert await call("POST", "/gaming-mode", json={"enabled": True},
                              headers={"Authorization": "Bearer wrong"}) == 401  # fmt: skip
            for path in ("/status", "/v1/models", "/metrics", "/logs/m", "/usage", "/running", "/events-not"):
                await call("GET", path, headers=user)
            assert await call("POST", "/reload", headers={"Authorization": f"Bearer {SECRETS['MS_ADMIN']}"}) == 200
            # The cloud got its key; the local model did not get anyone's.
            assert fake.requests[0]["auth"] == f"Bearer {SECRETS['FRONTIER_KEY']}"
            children = llama_children(daemon.pid)
            assert children
            for child in children:
                environment = "\n".join(f"{k}={v}" for k, v in child.environ().items())
                for secret in SECRETS.values():
                    assert secret not in environment
                assert "NOTIFY_SOCKET" not in environment
    finally:
        daemon.send_signal(signal.SIGTERM)
        await daemon.wait()
        await runner.cleanup()
    text = log_path.read_text() + "\n".join(seen)
    for name, secret in SECRETS.items():
        assert secret not in text, f"{name} leaked"
    assert "cloud_request" in text  # the log did record the cloud calls, just not their keys

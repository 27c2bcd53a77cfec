"""Any server as a model (`cmd`): llama-server started through cmd, servers that fail in every way a command can,
and a WebSocket/route-prefix server, each scheduled like a GGUF model."""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
import psutil
import pytest

from test_cli import cli

pytestmark = pytest.mark.llama

# A small real server for the WebSocket and prefix cases (aiohttp, from the registry like the daemon itself): it
# answers /health, echoes WebSocket messages, and serves /sdapi/... paths.
WS_SERVER = r"""
import sys
from aiohttp import web

async def health(request):
    return web.Response(text="ok")

async def sdapi(request):
    return web.json_response({"path": request.path, "method": request.method})

async def socket(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        await ws.send_str("echo: " + message.data)
    return ws

app = web.Application()
app.add_routes([web.get("/health", health), web.route("*", "/sdapi/{tail:.*}", sdapi), web.get("/ws", socket)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


async def test_llama_server_through_cmd_serves_and_swaps_with_a_gguf_model(start_daemon, tiny_models,
                                                                           llama_server_bin):
    cmd = [llama_server_bin, "-m", str(tiny_models[1]), "--host", "127.0.0.1", "--port", "${PORT}",
           "--alias", "${MODEL_ID}", "-c", "512"]
    d = await start_daemon({"viacmd": {"cmd": cmd, "env": ["LLAMA_ARG_THREADS=1"]},
                            "native": {"model": str(tiny_models[2]), "args": ["-c", "512"]}})
    status, body, _ = await d.chat("viacmd")
    assert status == 200 and body["model"] == "viacmd", body
    child = psutil.Process(d.runtime.core.models["viacmd"].pid)
    assert child.environ()["LLAMA_ARG_THREADS"] == "1" and "PATH" in child.environ()
    _, status_doc = await d.get_json("/status")
    assert status_doc["models"]["viacmd"]["vram_source"] == "learned"  # from what its process holds
    status, body, _ = await d.chat("native")  # the same default group: one at a time
    assert status == 200 and d.state("viacmd") == "unloaded"
    async with d.http.get(f"{d.url}/logs/viacmd") as response:
        assert "starting viacmd" in await response.text()


@pytest.mark.parametrize(("cmd", "expected"), [
    (["sh", "-c", "echo going away >&2; exit 3"], "exited with code 3"),
    ([sys.executable, "-c", "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
      " time.sleep(60)", "${PORT}"], "not on the port it was given"),
    (["sleep", "60"], "not ready after 2 s"),
])
async def test_a_cmd_that_fails_says_why_fast_and_leaves_nothing_running(start_daemon, cmd, expected,
                                                                        children_of_this_test):
    d = await start_daemon({"bad": {"cmd": cmd}}, health_timeout_s=2)
    started = time.monotonic()
    status, body, _ = await d.chat("bad")
    assert status == 503 and body["error"]["code"] == "model_load_failed", body
    assert expected in body["error"]["message"] and "'bad'" in body["error"]["message"]
    assert time.monotonic() - started < 4
    gone, alive = psutil.wait_procs(children_of_this_test(), timeout=5)
    assert alive == []


def test_config_errors_name_the_key(tmp_path):
    config = tmp_path / "models.toml"
    config.write_text('[models.a]\ncmd = "no-such-program-here --port ${PORT}"\n')
    result = cli("check-config", str(config))
    assert result.returncode == 2 and "models.a.cmd: 'no-such-program-here' not found" in result.stderr
    config.write_text('[models.a]\ncmd = "true"\nmodel = "x.gguf"\n')
    result = cli("check-config", str(config), "--no-files")
    assert result.returncode == 2 and "models.a: set either `model`" in result.stderr


async def test_a_websocket_and_a_route_prefix_reach_a_cmd_server(start_daemon):
    d = await start_daemon({"sd": {"cmd": [sys.executable, "-c", WS_SERVER, "${PORT}"],
                                   "route_prefixes": ["/sdapi/"]}})
    async with d.http.post(f"{d.url}/sdapi/v1/txt2img", json={"prompt": "x"}) as response:
        assert response.status == 200 and (await response.json())["path"] == "/sdapi/v1/txt2img"
    async with d.http.ws_connect(f"{d.url}/upstream/sd/ws") as ws:
        await ws.send_str("hello")
        message = await asyncio.wait_for(ws.receive(), 5)
        assert message.type is aiohttp.WSMsgType.TEXT and message.data == "echo: hello"
    assert d.state("sd") == "ready"

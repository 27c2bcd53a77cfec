"""Preload and home models with the real llama-server: ready before systemd hears READY=1, and back when idle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid

import pytest
from test_cli import free_port, write_config
from test_systemd import REPO, NotifyListener

pytestmark = pytest.mark.llama


def test_a_preloaded_model_is_ready_when_systemd_hears_ready(tmp_path, tiny_models, llama_server_bin):
    port = free_port()
    config = write_config(tmp_path / "models.toml", {tiny_models[1]: "chat"}, port, llama_server_bin,
                          extra="")
    text = config.read_text().replace('args = ["-c", "512"]', 'args = ["-c", "512"]\npreload = true')
    config.write_text(text)
    address = f"@model-supervisor-test-{uuid.uuid4().hex}"
    listener = NotifyListener(address)
    env = {**os.environ, "NOTIFY_SOCKET": address, "MODEL_SUPERVISOR_DAEMON__STATE_DIR": str(tmp_path / "state")}
    daemon = subprocess.Popen([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config)], env=env,
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        listener.wait_line("READY=1", timeout=60)
        assert listener.lines("STATUS=starting: loading m1 (preload)")
        assert listener.lines("EXTEND_TIMEOUT_USEC=")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
            status = json.load(response)
        assert status["models"]["m1"]["state"] == "ready"
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        listener.close()


async def test_the_home_model_loads_by_itself_and_comes_back_after_the_big_one_idles_out(start_daemon, tiny_models):
    d = await start_daemon({"small": {"model": str(tiny_models[1]), "args": ["-c", "512"], "group": "main"},
                            "big": {"model": str(tiny_models[2]), "args": ["-c", "512"], "group": "main",
                                    "ttl_s": 0.5}},
                           {"main": {"swap": True, "exclusive": True, "home": "small"}})
    await d.wait_until(lambda: d.state("small") == "ready", timeout=10)  # no request asked for it
    status, body, _ = await d.chat("big")
    assert status == 200, body
    assert d.state("small") == "unloaded"
    await d.wait_until(lambda: d.state("small") == "ready" and d.state("big") == "unloaded", timeout=10)
    metrics = await (await d.http.get(f"{d.url}/metrics")).text()
    assert 'model_supervisor_loads_total{cause="home",model="small"} 2.0' in metrics
    assert 'model_supervisor_requests_total{model="small"' not in metrics  # home loads are not usage

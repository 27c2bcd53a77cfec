"""SIGHUP with a config that cannot be used: systemd hears RELOADING=1 and then READY=1 again, and the old config
stays (a cmd-only config: no llama-server needed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid

from test_cli import free_port
from test_systemd import REPO, NotifyListener


def test_sighup_with_a_non_utf8_config_keeps_the_old_one_and_says_ready_again(tmp_path):
    port = free_port()
    config = tmp_path / "models.toml"
    config.write_text(f'[daemon]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{tmp_path / "state"}"\n'
                      '[models.a]\ncmd = "sleep 100"\n')
    address = f"@model-supervisor-test-{uuid.uuid4().hex}"
    listener = NotifyListener(address)
    daemon = subprocess.Popen([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config)],
                              env={**os.environ, "NOTIFY_SOCKET": address}, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        listener.wait_line("READY=1", timeout=30)
        config.write_bytes(b"[models.a]\ncmd = \"sleep \xff\xfe\"\n")
        before = len(listener.messages)
        daemon.send_signal(signal.SIGHUP)
        listener.wait_line("RELOADING=1", timeout=10, after=before)
        listener.wait_line("READY=1", timeout=10, after=before)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
            assert list(json.load(response)["models"]) == ["a"]
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        stderr = daemon.stderr.read()
        assert "config_reload_refused" in stderr and "not UTF-8" in stderr and "Traceback" not in stderr
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        listener.close()

"""The command line, run as a user runs it: real processes, real config files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import llama_children

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "model_supervisor.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(path: Path, models: dict[Path, str], port: int, llama_server: str, extra: str = "") -> Path:
    lines = [
        "[daemon]",
        f'listen = "127.0.0.1:{port}"',
        f'llama_server = "{llama_server}"',
        'port_range = [19900, 19999]',
        "[groups.chat]\nexclusive = false",
        "[groups.embed]\nexclusive = false\npersistent = true",
    ]
    for model_path, group in models.items():
        lines += [f"[models.{model_path.stem}]", f'model = "{model_path}"', f'group = "{group}"',
                  'args = ["-c", "512"]']  # fmt: skip
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def test_check_config_names_the_bad_key_and_exits_2(tmp_path):
    bad = tmp_path / "models.toml"
    bad.write_text('[daemon]\nqueue_timeout_s = "soon"\n[models.a]\nmodel = "a.gguf"\nttl = 5\n')
    result = cli("check-config", str(bad))
    assert result.returncode == 2
    assert "daemon.queue_timeout_s" in result.stderr
    assert "models.a.ttl: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_reports_missing_files_and_toml_syntax(tmp_path):
    missing = tmp_path / "models.toml"
    missing.write_text('[models.a]\nmodel = "nowhere.gguf"\n')
    result = cli("check-config", str(missing), env={"LLAMA_SERVER": "/bin/true"})
    assert result.returncode == 2 and "models.a.model: file not found" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[daemon\n")
    result = cli("check-config", str(broken))
    assert result.returncode == 2 and "not valid TOML" in result.stderr and "line 1" in result.stderr


def test_check_config_prints_what_would_run(tmp_path, tiny_models, llama_server_bin):
    config = write_config(tmp_path / "models.toml", {tiny_models[1]: "chat"}, 8080, llama_server_bin)
    result = cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "m1" in result.stdout and "chat[swap]" in result.stdout


def test_reference_models_toml_is_valid():
    result = cli("check-config", str(REPO / "models.toml"), "--no-files")
    assert result.returncode == 0, result.stderr
    for model in ("local-task", "local-heavy", "local-coder", "local-embeddings"):
        assert model in result.stdout


def test_env_overrides_the_file(tmp_path, tiny_models, llama_server_bin):
    config = write_config(tmp_path / "models.toml", {tiny_models[1]: "chat"}, 8080, llama_server_bin)
    result = cli("check-config", str(config), env={"MODEL_SUPERVISOR_DAEMON__LISTEN": "127.0.0.1:9999"})
    assert "listen 127.0.0.1:9999" in result.stdout


def test_run_refuses_a_bad_config_and_a_missing_llama_server(tmp_path, tiny_models):
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nport_range = [6000, 5000]\n")
    result = cli("run", "--config", str(bad))
    assert result.returncode == 2 and "daemon.port_range" in result.stderr
    config = write_config(tmp_path / "models.toml", {tiny_models[1]: "chat"}, free_port(), "/nonexistent/llama-server")
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_SERVER"}
    result = subprocess.run([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert result.returncode == 2
    assert "llama-server not found" in result.stderr and "daemon.llama_server" in result.stderr


def test_run_refuses_a_public_address_without_an_admin_token(tmp_path, tiny_models, llama_server_bin):
    config = write_config(tmp_path / "models.toml", {tiny_models[1]: "chat"}, 8080, llama_server_bin)
    env = {"MODEL_SUPERVISOR_DAEMON__LISTEN": "0.0.0.0:8080", "MODEL_SUPERVISOR_ADMIN_TOKEN": ""}
    result = cli("run", "--config", str(config), env=env)
    assert result.returncode == 2 and "daemon.listen" in result.stderr and "admin token" in result.stderr


def wait_http(url: str, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stderr.read() if process.stderr else "daemon exited"
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer"
            time.sleep(0.02)


@pytest.mark.llama
def test_daemon_killed_with_sigkill_leaves_no_llama_server(tmp_path, tiny_models, llama_server_bin):
    port = free_port()
    config = write_config(tmp_path / "models.toml", {tiny_models[1]: "chat", tiny_models[2]: "embed"}, port,
                          llama_server_bin)  # fmt: skip
    daemon = subprocess.Popen([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", daemon)
        url = f"http://127.0.0.1:{port}"
        for model in ("m1", "m2"):
            assert cli("load", model, "--url", url).returncode == 0
        status = cli("status", "--url", url)
        assert status.returncode == 0 and "m1" in status.stdout and "ready" in status.stdout
        children = llama_children(daemon.pid)
        assert len(children) == 2
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert alive == [], f"orphaned llama-server processes: {[p.pid for p in alive]}"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


@pytest.mark.llama
def test_sigterm_stops_children_and_exits_0_and_client_commands_report_failures(tmp_path, tiny_models,
                                                                               llama_server_bin):
    port = free_port()
    config = write_config(tmp_path / "models.toml", {tiny_models[1]: "chat"}, port, llama_server_bin)
    daemon = subprocess.Popen([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", daemon)
        # Client commands find the daemon through --config's listen.
        assert cli("load", "m1", "--config", str(config)).returncode == 0
        failed = cli("load", "nope", "--config", str(config))
        assert failed.returncode == 1 and "does not exist" in failed.stderr
        children = llama_children(daemon.pid)
        assert cli("unload", "--config", str(config)).returncode == 0
        assert psutil.wait_procs(children, timeout=5)[1] == []
        assert cli("load", "m1", "--config", str(config)).returncode == 0
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        stderr = daemon.stderr.read()
        assert '"daemon_stopped"' in stderr and '"cause": "shutdown"' in stderr
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    unreachable = cli("status", "--url", f"http://127.0.0.1:{port}")
    assert unreachable.returncode == 1 and "unreachable" in unreachable.stderr

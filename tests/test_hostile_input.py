"""Hostile and malformed input: every answer is a deliberate 4xx in OpenAI-style JSON, never a 500, and a web page
in the user's browser cannot drive the admin API (cross-site requests, DNS rebinding).

All against the in-process daemon with FakeChildren; a named fake upstream stands in for llama-server where the
test needs to see what reaches it (headers) or what it answers (reflected CORS headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fake_children import fake_upstream

from model_supervisor import cli
from model_supervisor.gaming import GamingStore

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}



async def one_model(start_fake_daemon, tmp_path: Path, **daemon):
    tmp_path.mkdir(parents=True, exist_ok=True)
    model = tmp_path / "a.gguf"
    model.write_bytes(b"x")
    return await start_fake_daemon({"a": {"model": str(model), "vram_mb": 1}}, **daemon)


async def call(d, method: str, path: str, **kwargs) -> tuple[int, dict, Any]:
    async with d.http.request(method, d.url + path, **kwargs) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json(), response.headers


async def raw_exchange(d, data: bytes, timeout: float = 10) -> tuple[bytes, bytes]:
    """Send raw bytes; the answer's head and body, read until the daemon closes the connection."""
    port = d.daemon.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)  # up to EOF: the daemon closes after these
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


# ---------------------------------------------------------------- cross-site requests and DNS rebinding


async def test_a_cross_site_page_cannot_turn_on_gaming_mode(start_fake_daemon, tmp_path):
    d = await one_model(start_fake_daemon, tmp_path)
    # What a <form> or a no-cors fetch() from another site sends: a foreign Origin and a "simple" content type.
    status, body, _ = await call(d, "POST", "/gaming-mode", data=b'{"enabled": true}',
                                 headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert (status, body["error"]["code"]) == (403, "cross_origin")
    # Without an Origin, the browser's Sec-Fetch-Site says it all.
    status, body, _ = await call(d, "POST", "/gaming-mode", json={"enabled": True},
                                 headers={"Sec-Fetch-Site": "cross-site"})
    assert (status, body["error"]["code"]) == (403, "cross_origin")
    # Another port on the same host is another origin (a dev server on localhost:3000).
    status, body, _ = await call(d, "POST", "/leases", json={"vram_mb": 1},
                                 headers={"Origin": "http://127.0.0.1:3000"})
    assert (status, body["error"]["code"]) == (403, "cross_origin")
    assert d.runtime.gaming is False and not d.runtime.core.leases
    # The dashboard itself (same origin) still works.
    status, body, _ = await call(d, "POST", "/gaming-mode", json={"enabled": True},
                                 headers={"Origin": d.url, "Sec-Fetch-Site": "same-origin"})
    assert (status, body) == (200, {"enabled": True})


async def test_admin_bodies_must_be_json(start_fake_daemon, tmp_path):
    d = await one_model(start_fake_daemon, tmp_path)
    status, body, _ = await call(d, "POST", "/gaming-mode", data=b'{"enabled": true}',
                                 headers={"Content-Type": "text/plain"})
    assert (status, body["error"]["code"]) == (415, "unsupported_media_type")
    status, body, _ = await call(d, "POST", "/leases", data={"vram_mb": "1"})  # a form
    assert (status, body["error"]["code"]) == (415, "unsupported_media_type")
    assert d.runtime.gaming is False and not d.runtime.core.leases
    status, _, _ = await call(d, "POST", "/gaming-mode", data=b'{"enabled": true}',
                              headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


async def test_the_cli_bodiless_posts_still_work(start_fake_daemon, tmp_path, monkeypatch):
    """urllib sends Content-Type: application/x-www-form-urlencoded with its empty POST bodies."""
    monkeypatch.delenv("MODEL_SUPERVISOR_ADMIN_TOKEN", raising=False)
    d = await one_model(start_fake_daemon, tmp_path)
    options = ["--url", d.url, "--config", str(tmp_path / "none.toml")]
    assert await asyncio.to_thread(cli.main, ["load", "a", *options]) == 0
    assert d.state("a") == "ready"
    assert await asyncio.to_thread(cli.main, ["gaming", "on", *options]) == 0
    assert await asyncio.to_thread(cli.main, ["unload", "a", *options]) == 0
    assert d.state("a") == "unloaded" and d.runtime.gaming is True


async def test_a_foreign_host_name_is_refused(start_fake_daemon, tmp_path):
    """DNS rebinding: evil.example resolves to 127.0.0.1, so the browser sends Host: evil.example."""
    d = await one_model(start_fake_daemon, tmp_path)
    for path in ("/status", "/v1/models"):
        status, body, _ = await call(d, "GET", path, headers={"Host": f"evil.example:{d.daemon.port}"})
        assert (status, body["error"]["code"]) == (421, "host_not_allowed")
    status, body, _ = await call(d, "POST", "/gaming-mode", json={"enabled": True}, headers={"Host": "evil.example"})
    assert (status, body["error"]["code"]) == (421, "host_not_allowed")
    assert d.runtime.gaming is False
    for host in ("localhost", f"localhost:{d.daemon.port}", "127.0.0.1:1", "[::1]:8080", "LOCALHOST."):
        status, _, _ = await call(d, "GET", "/status", headers={"Host": host})
        assert status == 200, host


async def test_allowed_hosts_adds_names(start_fake_daemon, tmp_path):
    d = await one_model(start_fake_daemon, tmp_path, allowed_hosts=["ai.lan"])
    status, _, _ = await call(d, "GET", "/status", headers={"Host": "ai.lan:8080"})
    assert status == 200
    status, _, _ = await call(d, "GET", "/status", headers={"Host": "other.lan"})
    assert status == 421
    # A reverse proxy's pages at https://ai.lan are the operator's own.
    status, _, _ = await call(d, "POST", "/gaming-mode", json={"enabled": True},
                              headers={"Host": "ai.lan", "Origin": "https://ai.lan"})
    assert status == 200
    anything = await one_model(start_fake_daemon, tmp_path / "b", allowed_hosts=["*"])
    status, _, _ = await call(anything, "GET", "/status", headers={"Host": "whatever.example"})
    assert status == 200


async def test_llama_servers_cors_headers_do_not_reach_the_client_set():
    from model_supervisor.http.errors import NOT_FORWARDED_DOWN

    assert {"access-control-allow-origin", "access-control-allow-credentials"} <= NOT_FORWARDED_DOWN


async def test_llama_servers_reflected_cors_headers_are_not_passed_on(start_fake_daemon, tmp_path):
    async def reflecting(request: web.Request) -> web.Response:
        origin = request.headers.get("Origin", "*")
        return web.json_response({"choices": []}, headers={"Access-Control-Allow-Origin": origin,
                                                           "Access-Control-Allow-Credentials": "true"})

    async with fake_upstream(reflecting) as url:
        d = await one_model(start_fake_daemon, tmp_path)
        d.daemon.children.upstreams["a"] = url
        status, _, headers = await call(d, "POST", "/v1/chat/completions", json=CHAT,
                                        headers={"Origin": "http://evil.example"})
        assert status == 200
        assert "Access-Control-Allow-Origin" not in headers
        assert "Access-Control-Allow-Credentials" not in headers


# ---------------------------------------------------------------- what unauthenticated callers see


async def test_children_ports_are_hidden_from_callers_without_the_api_key(start_fake_daemon, tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTILE_API_KEY", "k-123")
    monkeypatch.delenv("MODEL_SUPERVISOR_ADMIN_TOKEN", raising=False)
    d = await one_model(start_fake_daemon, tmp_path, api_key_env="HOSTILE_API_KEY")
    assert (await call(d, "POST", "/models/a/load"))[0] == 200
    user = {"Authorization": "Bearer k-123"}

    _, status_doc, _ = await call(d, "GET", "/status")
    _, running, _ = await call(d, "GET", "/running")
    assert status_doc["models"]["a"]["state"] == "ready"
    assert status_doc["models"]["a"]["pid"] is None and status_doc["models"]["a"]["port"] is None
    assert running["running"][0]["pid"] is None and running["running"][0]["port"] is None
    async with d.http.get(d.url + "/events") as response:
        line = b""
        while not line.startswith(b"data: "):
            line = await response.content.readline()
        event = json.loads(line[len(b"data: "):])
    assert event["models"]["a"]["pid"] is None and event["models"]["a"]["port"] is None

    _, status_doc, _ = await call(d, "GET", "/status", headers=user)
    _, running, _ = await call(d, "GET", "/running", headers=user)
    assert status_doc["models"]["a"]["pid"] == running["running"][0]["pid"] == d.daemon.children.running["a"]


async def test_logs_need_the_admin_token(start_fake_daemon, tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTILE_ADMIN", "adm-1")
    d = await one_model(start_fake_daemon, tmp_path, admin_token_env="HOSTILE_ADMIN")
    status, body, _ = await call(d, "GET", "/logs/a")
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    async with d.http.get(d.url + "/logs/a", headers={"Authorization": "Bearer adm-1"}) as response:
        assert response.status == 200


async def test_the_bearer_scheme_is_case_insensitive(start_fake_daemon, tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTILE_ADMIN", "adm-1")
    d = await one_model(start_fake_daemon, tmp_path, admin_token_env="HOSTILE_ADMIN")
    for given in ("bearer adm-1", "BEARER adm-1", "Bearer  adm-1"):
        status, _, _ = await call(d, "POST", "/gaming-mode", json={"enabled": True},
                                  headers={"Authorization": given})
        assert status == 200, given
    for given in ("Basic adm-1", "bearer adm-2", "bearer", "adm-1", "Bearer adm-1x"):
        status, body, _ = await call(d, "POST", "/gaming-mode", json={"enabled": False},
                                     headers={"Authorization": given})
        assert (status, body["error"]["code"]) == (401, "unauthorized"), given
    assert d.runtime.gaming is True


# ---------------------------------------------------------------- malformed bodies


async def test_deeply_nested_json_is_a_400(start_fake_daemon, tmp_path):
    d = await one_model(start_fake_daemon, tmp_path)
    deep = b"[" * 200_000
    for path in ("/v1/chat/completions", "/leases", "/gaming-mode"):
        status, body, _ = await call(d, "POST", path, data=deep, headers={"Content-Type": "application/json"})
        assert (status, body["error"]["code"]) == (400, "invalid_json"), path


async def test_nan_and_infinity_are_not_json(start_fake_daemon, tmp_path):
    d = await one_model(start_fake_daemon, tmp_path)
    for raw in (b'{"vram_mb": 1, "ttl_s": NaN}', b'{"vram_mb": 1, "wait_s": Infinity}',
                b'{"vram_mb": 1, "ttl_s": -Infinity}'):
        status, body, _ = await call(d, "POST", "/leases", data=raw, headers={"Content-Type": "application/json"})
        assert (status, body["error"]["code"]) == (400, "invalid_json"), raw
    status, body, _ = await call(d, "POST", "/v1/chat/completions", data=b'{"model": "a", "temperature": NaN}',
                                 headers={"Content-Type": "application/json"})
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    assert not d.runtime.core.leases


@pytest.mark.parametrize("field", [
    '"ttl_s": 1e400', '"ttl_s": 604801', '"ttl_s": 0.5', '"wait_s": 1e400', '"wait_s": 3601', '"wait_s": -1',
    '"vram_mb": 2147483649', '"vram_mb": 0', '"priority": 1180591620717411303424', '"priority": 1.5',
    '"pid": 1180591620717411303424', '"pid": 0', '"pid": 4194305',
])  # fmt: skip
async def test_lease_numbers_out_of_range_are_a_400(start_fake_daemon, tmp_path, field):
    """1e400 is valid JSON that Python reads as inf; 2**70 overflowed the pid lookup (a 500)."""
    d = await one_model(start_fake_daemon, tmp_path)
    raw = ('{"vram_mb": 1, ' + field + "}").encode()
    status, body, _ = await call(d, "POST", "/leases", data=raw, headers={"Content-Type": "application/json"})
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    assert field.split(":")[0].strip('"') in body["error"]["message"]
    assert not d.runtime.core.leases


async def test_content_encoding(start_fake_daemon, tmp_path):
    seen: list[tuple[dict, bytes]] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append((dict(request.headers), await request.read()))
        return web.json_response({"choices": []})

    async with fake_upstream(upstream) as url:
        d = await one_model(start_fake_daemon, tmp_path)
        d.daemon.children.upstreams["a"] = url
        json_type = {"Content-Type": "application/json"}
        status, body, _ = await call(d, "POST", "/v1/chat/completions", data=b"not gzip at all",
                                     headers={**json_type, "Content-Encoding": "gzip"})
        assert (status, body["error"]["code"]) == (400, "invalid_content_encoding")
        status, body, _ = await call(d, "POST", "/v1/chat/completions", data=json.dumps(CHAT).encode(),
                                     headers={**json_type, "Content-Encoding": "compress"})
        assert (status, body["error"]["code"]) == (415, "unsupported_content_encoding")
        assert not seen
        # Valid gzip: aiohttp decodes it, so llama-server must get the plain body without the coding header.
        packed = gzip.compress(json.dumps(CHAT).encode())
        status, _, _ = await call(d, "POST", "/v1/chat/completions", data=packed,
                                  headers={**json_type, "Content-Encoding": "gzip"})
        assert status == 200
        headers, sent = seen[0]
        assert json.loads(sent) == CHAT
        assert "content-encoding" not in {k.lower() for k in headers}
        assert int(headers["Content-Length"]) == len(sent)


async def test_a_non_utf8_config_on_reload_is_a_400(start_fake_daemon, tmp_path, tiny_models):
    path = tmp_path / "models.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[models.a]\nmodel = "{tiny_models[1]}"\n')
    d = await start_fake_daemon({}, config_path=str(path))
    path.write_bytes(b'[models.a]\nmodel = "\xff\xfe.gguf"\n')
    status, body, _ = await call(d, "POST", "/reload")
    assert (status, body["error"]["code"]) == (400, "invalid_config")
    assert "UTF-8" in body["error"]["message"]
    assert list(d.runtime.config.models) == ["a"]  # the old config stays


# ---------------------------------------------------------------- what aiohttp answers itself


async def test_unparseable_requests_get_json_errors(start_fake_daemon, tmp_path):
    d = await one_model(start_fake_daemon, tmp_path)
    for raw in (b"GE T / HTTP/1.1\r\nHost: localhost\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n"):
        head, body = await raw_exchange(d, raw)
        assert head.split(b" ")[1] == b"400", head
        assert b"content-type: application/json" in head.lower()
        assert json.loads(body)["error"]["code"] == "bad_http_request"


async def test_a_declared_body_over_the_limit_is_refused_from_the_head(start_fake_daemon, tmp_path):
    d = await one_model(start_fake_daemon, tmp_path, max_body_mb=1, body_timeout_s=60)
    # No body follows: the answer must not wait for one (body_timeout_s is a minute). Read by its length: the
    # daemon then lingers up to 2 s for a body it drops before it closes, which is not what this is about.
    reader, writer = await asyncio.open_connection("127.0.0.1", d.daemon.port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 40000000\r\n\r\n")
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).rstrip()
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        body = await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()
    assert head.split(b" ")[1] == b"413", head
    assert json.loads(body)["error"]["code"] == "body_too_large"


# ---------------------------------------------------------------- gaming state on a full disk


@contextlib.contextmanager
def full_tmpfs(path: Path):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with contextlib.suppress(OSError), open(path / "filler", "wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_saving_gaming_mode_on_a_full_disk_leaves_no_temp_file(tmp_path):
    with full_tmpfs(tmp_path / "state") as state:
        store = GamingStore(state)
        store.save(True)
        assert sorted(p.name for p in state.iterdir()) == ["filler"]
        assert store.load() is False


# ---------------------------------------------------------------- config errors are exit 2 with the reason


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_supervisor.cli", "check-config", "--no-files", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_a_non_utf8_config_is_exit_2_with_the_reason(tmp_path):
    path = tmp_path / "models.toml"
    path.write_bytes(b'[models.a]\nmodel = "caf\xe9.gguf"\n')  # latin-1, not UTF-8
    checked = check_config(path)
    assert checked.returncode == 2, checked.stderr
    assert "UTF-8" in checked.stderr and "Traceback" not in checked.stderr
    ran = subprocess.run([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2, ran.stderr
    assert "UTF-8" in ran.stderr and "Traceback" not in ran.stderr


def test_an_infinite_max_body_is_exit_2_naming_the_key(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text("[daemon]\nmax_body_mb = inf\n")
    checked = check_config(path)
    assert checked.returncode == 2, checked.stderr
    assert "daemon.max_body_mb" in checked.stderr


def test_allowed_hosts_must_be_host_names(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text('[daemon]\nallowed_hosts = ["http://ai.lan/"]\n')
    checked = check_config(path)
    assert checked.returncode == 2, checked.stderr
    assert "daemon.allowed_hosts" in checked.stderr
    path.write_text('[daemon]\nallowed_hosts = ["ai.lan", "192.168.1.5", "[fe80::1]", "*"]\n')
    assert check_config(path).returncode == 0

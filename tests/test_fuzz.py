"""Property tests over what clients and operators can send: HTTP bodies, headers, paths, and models.toml.

The daemon must answer everything with a well-formed HTTP response (JSON errors for its own 4xx/5xx), never a 500
of its own, never a traceback, and must still be healthy afterwards. A config is either valid or refused with
problems that each name their key. Case counts add up to more than 5,000 per run.
"""

from __future__ import annotations

import json
import signal
import socket
import string
import subprocess
import sys
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_supervisor.config import ConfigError, parse_config
from test_cli import free_port, wait_http

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, llama_server_bin):
    """A daemon subprocess with one real model 'a' (alias 'speed'); its stderr is kept to look for tracebacks."""
    from model_supervisor.testmodels import write_test_model

    folder = tmp_path_factory.mktemp("fuzz")
    model = write_test_model(folder / "a.gguf", seed=5)
    port = free_port()
    config = folder / "models.toml"
    config.write_text(f"""[daemon]
listen = "127.0.0.1:{port}"
llama_server = "{llama_server_bin}"
state_dir = "{folder / 'state'}"
port_range = [19700, 19799]
queue_timeout_s = 10
max_body_mb = 1
[models.a]
model = "{model}"
aliases = ["speed"]
args = ["-c", "512"]
""")
    log = open(folder / "daemon.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/health", process)
    yield port, process, log
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    log.seek(0)
    assert "Traceback" not in log.read()


def raw_request(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; return (status, headers, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(data)  # no half-close: the daemon takes that as the client leaving (and cancels)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def check_answer(status: int, headers: dict[str, str], body: bytes, method: str = "POST") -> None:
    assert 100 <= status < 600
    if method != "HEAD" and status >= 400 and "application/json" in headers.get("content-type", ""):
        if headers.get("transfer-encoding") == "chunked":
            return  # llama-server's own answers, passed through
        error = json.loads(body)["error"]
        assert error["message"] and error["code"]
        # A 500 of the daemon's own making would be an unhandled error: never.
        assert not (status == 500 and error["code"] == "internal_error"), error
    assert b"Traceback" not in body


def http(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace") + body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
models = st.sampled_from(["a", "speed", "nope", "", "a/../b", "A"]) | st.text(max_size=12) | json_values
chat_bodies = st.fixed_dictionaries(
    {"model": models},
    optional={"messages": json_values | st.just([{"role": "user", "content": "hi"}]),
              "stream": json_values, "prompt": json_values, "input": json_values, "temperature": json_values},
).map(lambda body: {**body, "max_tokens": 1})  # keep a real generation short when a body is valid  # fmt: skip


@settings(FUZZ, max_examples=1500)
@given(body=chat_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]))
def test_inference_bodies_never_break_the_daemon(daemon, body, path):
    port = daemon[0]
    status, headers, answer = raw_request(port, http("POST", path, json.dumps(body).encode(), {
        "Content-Type": "application/json"}))  # fmt: skip
    check_answer(status, headers, answer)
    if not isinstance(body.get("model"), str) or body["model"] not in ("a", "speed"):
        assert status in (400, 404), (status, answer)


@settings(FUZZ, max_examples=800)
@given(body=st.binary(max_size=300), path=st.sampled_from(["/v1/chat/completions", "/leases", "/gaming-mode",
                                                          "/reload", "/models/a/load", "/leases/1/renew"]))
def test_arbitrary_bytes_as_bodies_get_clean_errors(daemon, body, path):
    if path in ("/models/a/load", "/reload"):
        body = b""  # these take no body; the point is what the others make of garbage
    status, headers, answer = raw_request(daemon[0], http("POST", path, body, {"Content-Type": "application/json"}))
    check_answer(status, headers, answer)
    assert status != 500


header_names = st.sampled_from(["X-Local-Only", "X-Force-Big", "Authorization", "Content-Type", "Accept",
                                "Accept-Encoding", "Transfer-Encoding", "Expect", "X-Anything"])  # fmt: skip
header_values = st.text(alphabet=string.printable.replace("\r", "").replace("\n", ""), max_size=40)


@settings(FUZZ, max_examples=900)
@given(headers=st.dictionaries(header_names, header_values, max_size=4))
def test_headers_never_break_the_daemon(daemon, headers):
    body = json.dumps({"model": "nope", "messages": []}).encode()
    status, answer_headers, answer = raw_request(daemon[0], http("POST", "/v1/chat/completions", body, headers))
    check_answer(status, answer_headers, answer)
    assert status in (400, 404, 411, 413, 415, 417, 501), (status, answer)


@settings(FUZZ, max_examples=600)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.text(alphabet=string.ascii_letters + string.digits + "/._-%?=&", min_size=1, max_size=40))
def test_paths_and_methods_get_clean_answers(daemon, method, path):
    path = "/" + path.lstrip("/")
    if path.startswith(("/upstream/a", "/upstream/speed", "/models/", "/unload", "/stop-all", "/reload", "/events")):
        # Leave the running model and admin actions alone (tested elsewhere), and /events, which streams until
        # the client leaves by design.
        path = "/x" + path
    status, headers, answer = raw_request(daemon[0], http(method, path, b"", {}))
    check_answer(status, headers, answer, method)
    assert status != 500


def test_oversized_bodies_get_413_and_the_daemon_goes_on(daemon):
    port = daemon[0]
    big = json.dumps({"model": "a", "prompt": "x" * (2 * 1024 * 1024)}).encode()
    status, headers, answer = raw_request(port, http("POST", "/v1/completions", big, {"Content-Type": "application/json"}))
    assert status == 413 and json.loads(answer)["error"]["code"] == "body_too_large"
    assert raw_request(port, http("GET", "/health", b"", {}))[0] == 200


# ---------------------------------------------------------------- models.toml

SECTIONS = {
    "daemon": ["listen", "llama_server", "state_dir", "port_range", "health_timeout_s", "queue_timeout_s",
               "admin_token_env", "max_body_mb", "log_lines"],
    "scheduler": ["batching", "max_batch_wait_s", "min_residency_s"],
    "gpu": ["backend", "device", "reserve_mb", "poll_interval_s"],
    "gaming": ["auto_detect", "off_delay_s"],
}  # fmt: skip
MODEL_KEYS = ["model", "aliases", "args", "group", "ttl_s", "priority", "vram_mb", "fallback", "fallback_after_ms",
              "local_only", "allow_in_gaming"]  # fmt: skip
scalars = (st.none() | st.booleans() | st.integers(-10, 100_000) | st.floats(-5, 1e6, allow_nan=False)
           | st.text(max_size=15) | st.lists(st.text(max_size=8) | st.integers(0, 70_000), max_size=3))
keys = lambda known: st.sampled_from(known) | st.text(min_size=1, max_size=8)  # noqa: E731
configs = st.fixed_dictionaries({}, optional={
    **{section: st.dictionaries(keys(names), scalars, max_size=4) for section, names in SECTIONS.items()},
    "groups": st.dictionaries(st.sampled_from(["main", "g", "bad name"]),
                              st.dictionaries(keys(["swap", "exclusive", "persistent"]), scalars, max_size=3), max_size=2),
    "models": st.dictionaries(st.sampled_from(["a", "b", "m-1", "bad/name"]),
                              st.dictionaries(keys(MODEL_KEYS), scalars, max_size=6), max_size=3),
    "cloud": st.dictionaries(st.sampled_from(["c", "a"]),
                             st.dictionaries(keys(["base_url", "model", "api_key_env"]), scalars, max_size=3), max_size=1),
    "unknown": scalars,
})  # fmt: skip


@settings(max_examples=600, deadline=None)  # ~3 ms each: the quick suite's largest single cost at 1500
@given(data=configs)
def test_configs_are_valid_or_refused_naming_each_bad_key(data):
    try:
        parse_config(data)
    except ConfigError as refused:
        assert refused.problems
        for problem in refused.problems:
            key, _, why = problem.partition(": ")
            assert why, problem
            assert key.split(".")[0] in {"daemon", "scheduler", "gpu", "gaming", "groups", "models", "cloud",
                                         "unknown", "ledger", "(top level)"}, problem  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_as_models_toml_is_refused_cleanly_or_parsed(text, tmp_path_factory):
    from model_supervisor.config import load_config

    path = tmp_path_factory.getbasetemp() / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as refused:
        assert all(": " in problem for problem in refused.problems)
    except UnicodeEncodeError:
        pass  # not representable on disk: nothing an operator could write
    else:
        tomllib.loads(path.read_text(encoding="utf-8"))  # it parsed because the file is valid TOML

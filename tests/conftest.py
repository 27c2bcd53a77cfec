import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def llama_server_bin() -> str:
    """Path of the real llama-server: $LLAMA_SERVER, else the cached build (built on first use, minutes)."""
    if os.environ.get("LLAMA_SERVER"):
        return os.environ["LLAMA_SERVER"]
    proc = subprocess.run([str(REPO / "scripts" / "build-llama-server.sh")], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        pytest.fail(f"scripts/build-llama-server.sh failed:\n{proc.stderr[-4000:]}")
    binary = proc.stdout.strip().splitlines()[-1]
    os.environ["LLAMA_SERVER"] = binary  # what a daemon in this process finds again when it re-reads its config
    return binary


# ---------------------------------------------------------------- the daemon, in process, with real children

import asyncio  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator, Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import aiohttp  # noqa: E402
import psutil  # noqa: E402

from model_supervisor.config import Config, load_config, parse_config  # noqa: E402
from fake_children import FakeChildren  # noqa: E402
from model_supervisor.daemon import Daemon  # noqa: E402
from model_supervisor.gpu import FixedProbe  # noqa: E402
from model_supervisor.notices import Notice  # noqa: E402
from model_supervisor.runtime import Runtime  # noqa: E402
from model_supervisor.testmodels import write_test_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[int, pathlib.Path]:
    """Small generated GGUFs, distinct per seed; made once per session."""
    folder = tmp_path_factory.mktemp("models")
    return {seed: write_test_model(folder / f"m{seed}.gguf", seed=seed) for seed in range(1, 5)}


@dataclass
class Timeline:
    """What the runtime reported, in order: (notice kind, its fields, monotonic time)."""

    entries: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)

    def __call__(self, notice: Notice) -> None:
        self.entries.append((notice.kind, notice.fields(), time.monotonic()))

    def of(self, kind: str, model: str | None = None) -> list[dict[str, Any]]:
        return [f for k, f, _ in self.entries if k == kind and (model is None or f.get("model") == model)]

    def max_alive(self) -> int:
        """Most children alive at once. 'starting' precedes the spawn; the end events follow the exit."""
        alive = peak = 0
        for kind, _, _ in self.entries:
            if kind == "starting":
                alive += 1
                peak = max(peak, alive)
            elif kind in ("stopped", "load_failed", "exited"):
                alive -= 1
        return peak


@dataclass
class RunningDaemon:
    daemon: Daemon
    http: aiohttp.ClientSession
    timeline: Timeline

    @property
    def url(self) -> str:
        return self.daemon.url

    @property
    def runtime(self) -> Runtime:
        assert self.daemon.runtime is not None
        return self.daemon.runtime

    def queued(self, model: str) -> int:
        return sum(1 for w in self.runtime.core.waiters.values() if w.model == model)

    def state(self, model: str) -> str:
        return self.runtime.core.models[model].phase.value

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        await asyncio.wait_for(self.runtime.wait_until(predicate), timeout)

    async def chat(self, model: str, content: str = "hello", max_tokens: int = 8, **extra: Any):
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}
        async with self.http.post(f"{self.url}/v1/chat/completions", json=body) as response:
            return response.status, await response.json(), response.headers

    async def get_json(self, path: str):
        async with self.http.get(self.url + path) as response:
            return response.status, await response.json()

    async def post_json(self, path: str, body: Any = None):
        async with self.http.post(self.url + path, json=body) as response:
            return response.status, await response.json()


def make_config(models: dict[str, dict], groups: dict | None = None, gpu: dict | None = None,
                cloud: dict | None = None, gaming: dict | None = None, prompt_cache: dict | None = None,
                scheduler: dict | None = None, **daemon: Any) -> Config:
    settings = {"listen": "127.0.0.1:8080", "port_range": [19100, 19899], "queue_timeout_s": 30,
                "health_timeout_s": 30, "stop_timeout_s": 5, "drain_timeout_s": 10, **daemon}
    return parse_config({"daemon": settings, "groups": groups or {}, "models": models, "gpu": gpu or {},
                         "cloud": cloud or {}, "gaming": gaming or {}, "prompt_cache": prompt_cache or {},
                         "scheduler": scheduler or {}})


class DaemonStarter:
    """Starts daemons on free ports and stops them all afterwards."""

    def __init__(self, tmp_path: pathlib.Path, binary: str, fake: bool):
        self.tmp_path, self.binary, self.fake = tmp_path, binary, fake
        self.running: list[RunningDaemon] = []

    async def __call__(self, models: dict[str, dict], groups: dict | None = None, probe=None, gpu: dict | None = None,
                       cloud: dict | None = None, gaming: dict | None = None, binary: str | None = None,
                       config_path: str | None = None, children=None, prompt_cache: dict | None = None,
                       scheduler: dict | None = None, port: int = 0, **daemon: Any) -> RunningDaemon:
        daemon.setdefault("state_dir", str(self.tmp_path / "state"))
        if config_path is not None:  # a real file, as `run --config` reads it (and SIGHUP re-reads it)
            config = load_config(config_path)
        else:
            config = make_config(models, groups, gpu, cloud, gaming, prompt_cache, scheduler, **daemon)
        if self.fake and children is None:
            children = FakeChildren()
        if self.fake and probe is None:
            probe = FixedProbe(total_mb=1_000_000)
        daemon_obj = Daemon(config, binary or self.binary, port=port, probe=probe, config_path=config_path,
                            children=children)
        await daemon_obj.start()
        timeline = Timeline()
        daemon_obj.runtime.observers.append(timeline)
        handle = RunningDaemon(daemon_obj, aiohttp.ClientSession(), timeline)
        self.running.append(handle)
        return handle

    async def close(self) -> None:
        for handle in self.running:
            await handle.http.close()
            await handle.daemon.stop()


@pytest.fixture
async def start_daemon(llama_server_bin, tmp_path) -> AsyncIterator[DaemonStarter]:
    """start_daemon(models, groups, probe=, gpu=, cloud=, gaming=, binary=, **daemon_keys) -> RunningDaemon.

    On a free port; without a probe the real one for this host is used (host RAM here); binary defaults to the
    real llama-server. Everything is stopped afterwards."""
    starter = DaemonStarter(tmp_path, llama_server_bin, fake=False)
    yield starter
    await starter.close()


@pytest.fixture
async def start_fake_daemon(tmp_path) -> AsyncIterator[DaemonStarter]:
    """The same daemon with FakeChildren (no llama-server needed) and a fixed 1 TB memory budget, unless
    children= or probe= say otherwise. `d.daemon.children` is the FakeChildren."""
    starter = DaemonStarter(tmp_path, "/nonexistent/llama-server", fake=True)
    yield starter
    await starter.close()


def pytest_collection_modifyitems(config, items):
    """Every test that needs the real llama-server (through the fixture) is marked llama, so that
    `pytest -m "not llama"` never builds or looks for it."""
    for item in items:
        if "llama_server_bin" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.llama)


def pytest_collection_finish(session):
    """Modules that start something slow ahead of their tests (test_litellm's LiteLLM proxy, ~6 s) do it now, once
    the session knows it will run them, so it runs beside the tests before theirs."""
    if session.config.option.collectonly:
        return
    for module in {item.module for item in session.items if getattr(item, "module", None) is not None}:
        prepare = getattr(module, "start_ahead", None)
        if prepare is not None:
            prepare()


@pytest.fixture
def children_of_this_test() -> Callable[[], list[psutil.Process]]:
    """The processes below this test process that were not there when the test began (a helper the session started
    ahead, such as test_litellm's LiteLLM proxy, is no child of this test's)."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}

    def since() -> list[psutil.Process]:
        return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]

    return since


def llama_children(pid: int | None = None) -> list[psutil.Process]:
    """llama-server processes below this test process (or below pid). One that exits while we look is not there."""
    found = []
    for process in psutil.Process(pid).children(recursive=True):
        try:
            if "llama-server" in process.name():
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found

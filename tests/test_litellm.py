"""model-supervisor behind a real LiteLLM proxy (its own process), with two real daemons on loopback (fake
children: no llama-server) and a fake cloud: the routing callback (`model_supervisor.litellm.handler`), LiteLLM's
health checks, and the failover each setup gives, with the waits printed (run with -s to see them).

LiteLLM starts once for the module (about 6 s on 2 cores), ahead of it: conftest calls `start_ahead` when the
session's tests are collected, so the start runs beside the tests before these. Each test uses model groups of its
own, so LiteLLM's cooldowns from one test do not steer another.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from conftest import DaemonStarter
from fake_children import FakeChildren
from test_request_faults import fake_upstream

LITELLM = Path(sys.executable).parent / "litellm"
if importlib.util.find_spec("litellm") is None or not LITELLM.exists():
    pytest.skip("needs litellm[proxy] (the test extra)", allow_module_level=True)
# Routing is the callback's logic without LiteLLM's base class: the mirror below needs no LiteLLM in this process
# (importing it takes seconds); LiteLLM's proxy loads the real `handler`.
from model_supervisor.litellm import (  # noqa: E402
    DAEMON_CLOUD, LOADABLE, LOADING, NO_OPINION, NOW, Routing, daemon_root, rank, served_names)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

MASTER_KEY = "sk-model-supervisor-test"
PROBE = {"X-Health-Check": "true"}
HOSTS = ("h1", "h2")
SYNC_MARGIN_S = 0.15  # LiteLLM's watcher gets each event when the test's does; this covers the rest


def measured(what: str, seconds: float) -> None:
    print(f"\n[measured] {what}: {seconds * 1000:.0f} ms")


class SlowChildren(FakeChildren):
    """FakeChildren whose loads take load_s[model] seconds (a swap that takes time)."""

    def __init__(self) -> None:
        super().__init__()
        self.load_s: dict[str, float] = {}

    async def start(self, model: str):
        delay = self.load_s.get(model, 0.0)
        if delay:
            await asyncio.sleep(delay)
        return await super().start(model)


def host_upstream(name: str):
    """What stands in for llama-server on one host: an OpenAI chat answer saying which host and model answered."""

    async def answer(request: web.Request) -> web.Response:
        if request.method != "POST":
            return web.json_response({"hello": name})  # what a base that is not a daemon says to GET /events
        body = await request.json()
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"{name}:{body.get('model')}"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        })  # fmt: skip

    return answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deployment(group: str, url: str, model: str, *, callback: bool = True, wait_ms: int | None = None) -> dict:
    """One model_list entry for a daemon, as docs/litellm.md writes it."""
    params = {"model": f"openai/{model}", "api_base": f"{url}/v1", "api_key": "none"}
    if wait_ms is not None:
        params["headers"] = {"X-Max-Wait-Ms": str(wait_ms)}
    info = {"health_check_params": {"extra_headers": dict(PROBE), "max_retries": 0}}
    if not callback:
        info["model_supervisor"] = False  # the callback leaves it alone: a setup without the callback
    return {"model_name": group, "litellm_params": params, "model_info": info}


def litellm_config(h1: str, h2: str, cloud: str, dead: str) -> dict:
    both = (h1, h2)
    models = []
    for group, model in (("alpha", "alpha"), ("beta", "beta"), ("fast", "fast"), ("moves", "alpha"),
                         ("closed", "alpha"), ("closed-nofallback", "alpha"), ("health", "alpha")):
        models += [deployment(group, url, model) for url in both]
    for group, model in (("plain", "alpha"), ("plain-a", "alpha"), ("plain-b", "beta")):
        models += [deployment(group, url, model, callback=False) for url in both]
    models += [deployment("withdead", url, "alpha") for url in (h1, dead)]
    models.append(deployment("single", h1, "beta", callback=False, wait_ms=500))
    models.append(deployment("single-nowait", h1, "beta", callback=False))
    models.append({"model_name": "cloud", "litellm_params": {"model": "openai/frontier", "api_base": f"{cloud}/v1",
                                                             "api_key": "none"}})
    fallbacks = [{group: ["cloud"]} for group in ("closed", "plain", "single", "single-nowait", "withdead")]
    return {
        "model_list": models,
        "litellm_settings": {"callbacks": "model_supervisor.litellm.handler", "request_timeout": 30},
        "router_settings": {"num_retries": 0, "allowed_fails": 0, "cooldown_time": 5, "fallbacks": fallbacks},
        "general_settings": {"master_key": MASTER_KEY},
    }


def litellm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update({
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the bundled price map, not a download
        "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True", "LITELLM_LOCAL_BLOG_POSTS": "True",
        "LITELLM_LOCAL_POLICY_TEMPLATES": "True", "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
        "LITELLM_TELEMETRY_DISABLED": "true", "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True",
        "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True", "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    return env


class Ahead:
    """The LiteLLM proxy, started ahead of this module's tests (conftest calls start_ahead once the session's tests
    are collected: its ~6 s start runs beside the tests before these), and the ports of what its config names:
    bound, not listening, until the daemons and the fake cloud take them."""

    def __init__(self) -> None:
        self.reserved = {name: reserve_port() for name in (*HOSTS, "cloud")}
        self.urls = {name: f"http://127.0.0.1:{s.getsockname()[1]}" for name, s in self.reserved.items()}
        self.dead = f"http://127.0.0.1:{free_port()}"  # a host that is down: nothing listens there
        self.folder = Path(tempfile.mkdtemp(prefix="litellm-test-"))
        config = litellm_config(self.urls["h1"], self.urls["h2"], self.urls["cloud"], self.dead)
        path = self.folder / "litellm.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = self.folder / "litellm.log"
        self.started = time.monotonic()
        with open(self.log, "wb") as log_file:
            self.process = subprocess.Popen(
                [str(LITELLM), "--config", str(path), "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1]],
                cwd=self.folder, env=litellm_env(), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        atexit.register(self.stop)  # if this module's tests never got to run

    def port(self, name: str) -> int:
        return self.reserved[name].getsockname()[1]

    def release(self) -> None:
        """The servers are on their ports now (they bind beside the reservation: both reuse the address)."""
        for reservation in self.reserved.values():
            reservation.close()

    async def ready(self) -> SimpleNamespace:
        deadline = time.monotonic() + 90  # from now: it was started minutes ago in a whole-suite run
        async with aiohttp.ClientSession() as http:
            while True:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"LiteLLM did not start:\n{self.log.read_text()[-4000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.url}/health/liveliness") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.2)
        measured("LiteLLM proxy startup (beside the tests before these)", time.monotonic() - self.started)
        return SimpleNamespace(url=self.url, log=self.log)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def reserve_port() -> socket.socket:
    reservation = socket.socket()
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reservation.bind(("127.0.0.1", 0))
    return reservation


_ahead: Ahead | None = None


def start_ahead() -> Ahead:
    global _ahead
    if _ahead is None:
        _ahead = Ahead()
    return _ahead


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("litellm")
    ahead = start_ahead()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(ahead.stop)
        cloud = await stack.enter_async_context(fake_upstream(host_upstream("cloud"), port=ahead.port("cloud")))
        starter = DaemonStarter(folder, "/nonexistent/llama-server", fake=True)
        stack.push_async_callback(starter.close)
        hosts = {}
        for name in HOSTS:
            children = SlowChildren()
            upstream = await stack.enter_async_context(fake_upstream(host_upstream(name)))
            children.upstreams.update(alpha=upstream, beta=upstream)
            models = {"alpha": {"model": str(folder / "alpha.gguf"), "vram_mb": 1, "aliases": ["fast"],
                                "group": "main"},
                      "beta": {"model": str(folder / "beta.gguf"), "vram_mb": 1, "group": "main"}}
            d = await starter(models, groups={"main": {"swap": True}}, children=children, queue_timeout_s=2,
                              state_dir=str(folder / name), port=ahead.port(name))
            records = []
            d.daemon.proxy.observers.append(records.append)
            hosts[name] = SimpleNamespace(d=d, children=children, records=records)
        ahead.release()
        assert [hosts[n].d.url for n in HOSTS] + [cloud] == [ahead.urls[n] for n in (*HOSTS, "cloud")]
        dead = ahead.dead
        proxy = await ahead.ready()
        http = await stack.enter_async_context(aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=aiohttp.ClientTimeout(total=30)))
        mirror = Routing(first_wait_s=5)  # follows the daemons as LiteLLM's copy does
        stack.push_async_callback(mirror.aclose)
        world = SimpleNamespace(proxy=proxy, http=http, hosts=hosts, mirror=mirror, cloud=cloud, dead=dead)
        status, content, _ = await ask(world, "cloud")  # LiteLLM imports its OpenAI client on first use
        assert status == 200 and content == "cloud:frontier"
        status, _, _ = await ask(world, "alpha")  # the callback in LiteLLM starts following the daemons
        assert status == 200
        yield world


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def fresh(world):
    """Every test starts with nothing loaded, gaming mode off, no loads counted."""
    for host in world.hosts.values():
        host.d.runtime.set_gaming(False, source="test")
        await host.d.runtime.unload(None)
        host.children.load_s.clear()
    await synced(world)
    for host in world.hosts.values():
        host.children.started.clear()
        host.children.stopped.clear()
        host.records.clear()
    yield


async def ask(world, group: str, headers: dict | None = None) -> tuple[int, str | None, float]:
    """One chat request through LiteLLM: (status, the answer's content, seconds)."""
    body = {"model": group, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    started = time.monotonic()
    async with world.http.post(f"{world.proxy.url}/v1/chat/completions", json=body, headers=headers) as response:
        payload = await response.json(content_type=None)
    elapsed = time.monotonic() - started
    if response.status != 200:
        return response.status, None, elapsed
    return 200, payload["choices"][0]["message"]["content"], elapsed


async def synced(world, timeout: float = 10) -> float:
    """Wait until the callback's view (the mirror's, and so LiteLLM's) matches what the daemons are now; seconds."""
    started = time.monotonic()
    targets = [deployment("sync", h.d.url, "alpha") for h in world.hosts.values()]
    while True:
        await world.mirror.filter("sync", targets)  # starts the mirror's watchers on first use
        views = [world.mirror.hosts.get(daemon_root(h.d.url + "/v1")) for h in world.hosts.values()]
        if all(v is not None and v.document is not None and _matches(v.document, h.d)
               for v, h in zip(views, world.hosts.values(), strict=True)):
            break
        assert time.monotonic() - started < timeout, "the daemons' /events never showed their state"
        await asyncio.sleep(0.02)
    seen = time.monotonic() - started
    await asyncio.sleep(SYNC_MARGIN_S)
    return seen


def _matches(document: dict, d) -> bool:
    return document["gaming_mode"] == d.runtime.gaming and all(
        document["models"][m]["state"] == d.state(m) for m in ("alpha", "beta"))


async def place(world, **loaded: str) -> None:
    """Load a model on each named host (place(h1="alpha")) and wait until the callback sees it."""
    for host, model in loaded.items():
        await world.hosts[host].d.runtime.load(model)
    await synced(world)
    for host in world.hosts.values():
        host.children.started.clear()


def loads(world) -> dict[str, list[str]]:
    return {name: list(h.children.started) for name, h in world.hosts.items()}


# ---------------------------------------------------------------- the callback, against real LiteLLM


async def test_each_model_goes_to_the_host_where_it_is_loaded(world):
    await place(world, h1="alpha", h2="beta")
    answers = {group: [] for group in ("alpha", "fast", "beta")}
    for _ in range(8):
        for group in answers:
            status, content, _ = await ask(world, group)
            assert status == 200
            answers[group].append(content)
    assert set(answers["alpha"]) == {"h1:alpha"}
    assert set(answers["fast"]) == {"h1:fast"}  # an alias: the daemon lists it under alpha
    assert set(answers["beta"]) == {"h2:beta"}
    assert loads(world) == {"h1": [], "h2": []}  # 24 requests, no swap


async def test_a_model_no_host_has_loaded_goes_to_one_host_and_stays_there(world):
    status, first, _ = await ask(world, "alpha")
    assert status == 200
    host = first.split(":")[0]
    await synced(world)
    for _ in range(6):
        status, content, _ = await ask(world, "alpha")
        assert (status, content) == (200, f"{host}:alpha")
    assert sum(len(v) for v in loads(world).values()) == 1


async def test_gaming_mode_on_one_host_moves_its_models_to_the_other(world):
    await place(world, h1="alpha", h2="beta")
    world.hosts["h1"].d.runtime.set_gaming(True, source="test")
    measured("callback sees gaming mode (daemon's /events)", await synced(world))
    for _ in range(6):
        status, content, _ = await ask(world, "moves")
        assert (status, content) == (200, "h2:alpha")
    assert loads(world) == {"h1": [], "h2": ["alpha"]}  # one swap on h2 (beta out, alpha in), then none
    assert world.hosts["h1"].records == []  # nothing reached the gaming host, not even a 503


async def test_no_host_can_serve_so_litellms_fallback_answers_at_once(world):
    for host in world.hosts.values():
        host.d.runtime.set_gaming(True, source="test")
    await synced(world)
    waits = []
    for _ in range(5):
        status, content, elapsed = await ask(world, "closed")
        assert (status, content) == (200, "cloud:frontier")
        waits.append(elapsed)
    measured("both hosts gaming -> LiteLLM fallback (worst of 5)", max(waits))
    assert max(waits) < 1.0
    status, _, elapsed = await ask(world, "closed-nofallback")
    measured(f"both hosts gaming, no fallback -> {status}", elapsed)
    assert status in (429, 503) and elapsed < 1.0
    assert all(h.records == [] and h.children.started == [] for h in world.hosts.values())


async def test_litellm_health_checks_load_nothing(world):
    await place(world, h2="beta")
    async with world.http.get(f"{world.proxy.url}/health") as response:
        health = await response.json()
    assert response.status == 200, health
    healthy = {(e.get("model"), e.get("api_base")) for e in health["healthy_endpoints"]}
    assert ("openai/alpha", world.hosts["h1"].d.url + "/v1") in healthy  # loadable counts as healthy
    unhealthy = {e.get("api_base") for e in health["unhealthy_endpoints"]}
    assert unhealthy == {world.dead + "/v1"}, health["unhealthy_endpoints"]  # only the host that is down
    assert loads(world) == {"h1": [], "h2": []}
    assert world.hosts["h2"].children.stopped == []  # beta was not swapped out either
    assert all(h.records == [] for h in world.hosts.values())  # probes are not usage
    metrics = await (await world.hosts["h1"].d.http.get(world.hosts["h1"].d.url + "/metrics")).text()
    assert 'model_supervisor_health_checks_total{model="alpha",result="ok"}' in metrics

    world.hosts["h1"].d.runtime.set_gaming(True, source="test")
    started = time.monotonic()
    async with world.http.get(f"{world.proxy.url}/health", params={"model": "health"}) as response:
        health = await response.json()
    measured("LiteLLM /health of a group with one host gaming", time.monotonic() - started)
    unhealthy = {e.get("api_base") for e in health["unhealthy_endpoints"]}
    assert unhealthy == {world.hosts["h1"].d.url + "/v1"} and health["healthy_count"] == 1
    assert loads(world) == {"h1": [], "h2": []}


# ---------------------------------------------------------------- setups without the callback, for comparison


async def test_without_the_callback_models_swap_back_and_forth(world):
    await place(world, h1="alpha", h2="beta")
    for _ in range(8):
        for group in ("plain-a", "plain-b"):
            status, _, _ = await ask(world, group)
            assert status == 200
    swaps = sum(len(v) for v in loads(world).values())
    print(f"\n[measured] two hosts, no callback, alpha on h1 and beta on h2: 16 requests caused {swaps} loads")
    assert swaps >= 1


async def test_single_host_a_swap_fails_over_after_x_max_wait_ms(world):
    await place(world, h1="beta")  # beta's last load was quick: the daemon expects this swap to be quick too
    await place(world, h1="alpha")
    world.hosts["h1"].children.load_s["beta"] = 1.5  # the swap to beta takes 1.5 s
    status, content, elapsed = await ask(world, "single")
    measured("single host swapping, X-Max-Wait-Ms 500 -> LiteLLM fallback", elapsed)
    assert (status, content) == (200, "cloud:frontier") and 0.5 <= elapsed < 1.5
    asked = len(world.hosts["h1"].records)
    status, content, elapsed = await ask(world, "single")
    measured("single host in cooldown (the 503's Retry-After) -> LiteLLM fallback", elapsed)
    assert (status, content) == (200, "cloud:frontier") and elapsed < 0.5
    assert len(world.hosts["h1"].records) == asked  # LiteLLM did not ask the swapping host again
    await world.hosts["h1"].d.wait_until(lambda: world.hosts["h1"].d.state("beta") == "ready")
    ready = time.monotonic()
    while True:  # LiteLLM cooled h1 down for the 503's Retry-After; then the request is local again
        status, content, _ = await ask(world, "single")
        assert status == 200
        if content == "h1:beta":
            break
        assert content == "cloud:frontier" and time.monotonic() - ready < 12
        await asyncio.sleep(0.25)
    measured("single host: beta ready -> LiteLLM sends to it again (cooldown left)", time.monotonic() - ready)
    assert loads(world)["h1"] == ["beta"]  # the swap went on


async def test_single_host_a_swap_known_to_outlast_the_wait_fails_over_at_once(world):
    world.hosts["h1"].children.load_s["beta"] = 0.9
    await place(world, h1="beta")  # beta's loads take 0.9 s: more than 1.5 x the 0.5 s X-Max-Wait-Ms
    await place(world, h1="alpha")
    status, content, elapsed = await ask(world, "single")
    measured("single host swapping, a load known to take 0.9 s, X-Max-Wait-Ms 500 -> LiteLLM fallback", elapsed)
    assert (status, content) == (200, "cloud:frontier") and elapsed < 0.4  # not after the 0.5 s wait
    await world.hosts["h1"].d.wait_until(lambda: world.hosts["h1"].d.state("beta") == "ready")
    assert loads(world)["h1"] == ["beta"]  # the load it started went on


async def test_single_host_without_a_wait_bound_fails_over_after_queue_timeout(world):
    await place(world, h1="beta")  # a quick last load: worth waiting for
    await place(world, h1="alpha")
    world.hosts["h1"].children.load_s["beta"] = 4.0
    status, content, elapsed = await ask(world, "single-nowait")
    measured("single host swapping, no X-Max-Wait-Ms (queue_timeout_s 2) -> LiteLLM fallback", elapsed)
    assert (status, content) == (200, "cloud:frontier") and 2.0 <= elapsed < 3.5


async def test_two_hosts_without_the_callback_fail_over_by_cooldown(world):
    await place(world, h1="alpha", h2="alpha")
    world.hosts["h1"].d.runtime.set_gaming(True, source="test")
    await synced(world)
    answers, waits = [], []
    for _ in range(10):
        status, content, elapsed = await ask(world, "plain")
        assert status == 200
        answers.append(content.split(":")[0])
        waits.append(elapsed)
    print(f"\n[measured] two hosts, no callback, h1 gaming: answered by {answers}, "
          f"waits {[round(w * 1000) for w in waits]} ms")
    assert "h1" not in answers and max(waits) < 1.0
    assert answers.count("cloud") <= 1  # one 503 from h1 puts it in cooldown (allowed_fails: 0)


async def test_a_host_that_is_down_gets_its_share_and_each_of_those_fails_over(world):
    """The callback has no opinion on a base it cannot reach; LiteLLM sends it a request, which fails over to the
    fallback at once (nothing listens), and cools that deployment down: the rest go to h1."""
    await place(world, h1="alpha")
    answers, waits = [], []
    for _ in range(10):
        status, content, elapsed = await ask(world, "withdead")
        assert status == 200
        answers.append(content.split(":")[0])
        waits.append(elapsed)
    print(f"\n[measured] h1 + a host that is down (callback on): answered by {answers}, "
          f"waits {[round(w * 1000) for w in waits]} ms")
    assert set(answers) <= {"h1", "cloud"} and answers.count("cloud") <= 1 and max(waits) < 1.0


# ---------------------------------------------------------------- the callback's rules, without LiteLLM


async def test_names_and_roots():
    assert served_names({"model": "openai/qwen"}) == ["qwen", "openai/qwen"]
    assert served_names({"model": "org/qwen", "custom_llm_provider": "openai"}) == ["org/qwen"]
    assert daemon_root("http://gpu-a.lan:8080/v1") == "http://gpu-a.lan:8080"
    assert daemon_root("http://gpu-a.lan:8080/v1/") == "http://gpu-a.lan:8080"
    assert daemon_root("https://proxy.lan/ms/v1") == "https://proxy.lan/ms"
    assert daemon_root("not a url") is None


async def test_ranks():
    def doc(gaming=False, **entry):
        base = {"state": "unloaded", "route": "queued", "available_now": False, "aliases": ["q"], "vram_mb": 10,
                "allow_in_gaming": False}
        return {"gaming_mode": gaming, "memory": [{"usable_mb": 100}], "models": {"m": {**base, **entry}}}

    assert rank(doc(state="ready", available_now=True, route="local"), ["q"])[0] == NOW
    assert rank(doc(), ["m"])[0] == LOADABLE
    assert rank(doc(state="loading"), ["m"])[0] == LOADING
    assert rank(doc(gaming=True, route="rejected"), ["m"])[0] is None
    assert rank(doc(gaming=True, route="cloud"), ["m"])[0] == DAEMON_CLOUD  # the daemon's own fallback answers
    assert rank(doc(gaming=True, allow_in_gaming=True), ["m"])[0] == LOADABLE
    assert rank(doc(state="failed", route="rejected"), ["m"])[0] is None
    assert rank(doc(state="failed", route="queued"), ["m"])[0] == LOADABLE  # its retry is due
    assert rank(doc(vram_mb=1000, route="rejected"), ["m"])[0] is None
    assert rank(doc(), ["other"])[0] == NO_OPINION  # not its model


async def test_unreachable_and_foreign_bases_are_left_alone(world):
    router = Routing(first_wait_s=2)
    async with fake_upstream(host_upstream("plain")) as plain:  # answers /events with JSON: not a daemon
        candidates = [deployment("x", f"http://127.0.0.1:{free_port()}", "alpha"),  # nothing listens there
                      deployment("x", plain, "alpha"),
                      deployment("x", world.hosts["h1"].d.url, "alpha"),
                      {"model_name": "x", "litellm_params": {"model": "gpt-4o"}},
                      deployment("x", world.hosts["h1"].d.url, "zeta")]  # a model h1 does not list
        try:
            assert await router.filter("x", candidates) == candidates  # h1 can load alpha: nothing is better
            world.hosts["h1"].d.runtime.set_gaming(True, source="test")
            await synced(world)
            await asyncio.sleep(0.2)
            kept = await router.filter("x", candidates)
            assert kept == [candidates[0], candidates[1], candidates[3], candidates[4]]  # only the daemon that cannot
            assert router.hosts[daemon_root(plain)].kind == "other"
        finally:
            await router.aclose()

"""A LiteLLM callback that sends each request to a model-supervisor host that can serve its model now.

Enable it in the LiteLLM proxy's config (nothing else to configure):

    litellm_settings:
      callbacks: model_supervisor.litellm.handler

For every request LiteLLM routes, the callback looks at the candidate deployments (after LiteLLM's own cooldown
filter) and, among those that are model-supervisor daemons, keeps

1. the hosts that can serve the model now (`available_now`: it is loaded and takes requests);
2. else the hosts where it is loading already (the request joins that load: no second swap);
3. else the hosts that can load it (not kept out by gaming mode, not failed, fits in memory);
4. else the hosts that would answer from their own cloud `fallback` at once;
5. else none, so LiteLLM's `fallbacks` fire at once instead of after a 503.

It recognises a daemon by its api_base (the deployment's `api_base` without a trailing `/v1`): `GET /events` there
answers with the model-supervisor status document. It learns each daemon's state from that stream: one long-lived
connection per daemon, in a background task, reconnecting with backoff; a routing decision reads the last
document and makes no request. Deployments it does not know about (not a daemon, no `api_base`, `model_info:
{model_supervisor: false}`) are left alone, and so is a daemon it cannot reach or has not heard from yet: it
removes a deployment only when it knows that another one is better.

The model a deployment serves is its `litellm_params.model` after the provider prefix (`openai/qwen` -> `qwen`),
resolved through the aliases the daemon lists. The filter runs in LiteLLM's Router through
`CustomLogger.async_filter_deployments`, which the Router calls for the routing strategies with an async path
(simple-shuffle, the default; least-busy, latency-based, cost-based, usage-based-routing-v2).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL


log = logging.getLogger("model_supervisor.litellm")

# Ranks of a daemon deployment for one model, best first; None: it cannot serve the model at all; NO_OPINION: the
# daemon does not list the model (the deployment stays a candidate, as one the callback knows nothing of).
NOW, LOADING, LOADABLE, DAEMON_CLOUD = 0, 1, 2, 3
NO_OPINION = -1
RANK_NAMES = {NOW: "now", LOADING: "loading", LOADABLE: "loadable", DAEMON_CLOUD: "daemon_cloud", None: "never"}

MAX_EVENT_BYTES = 16 * 1024 * 1024  # a status document is a few KB per model


@dataclass
class Host:
    """What the callback knows of one api_base root."""

    root: str
    kind: str = "unknown"  # "unknown" (not heard from yet), "daemon", "other" (not a model-supervisor daemon)
    document: dict[str, Any] | None = None  # the last status document, while its stream is connected
    received_at: float = 0.0  # monotonic time of that document
    error: str | None = None  # why there is no document
    created_at: float = field(default_factory=time.monotonic)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set once the first look has an outcome
    task: asyncio.Task | None = None

    def forget(self, why: str) -> None:
        if self.document is not None:  # a daemon it followed is gone: worth a warning
            log.warning("model-supervisor at %s: no state (%s); leaving its deployments unfiltered", self.root, why)
        elif self.error != why:
            log.info("model-supervisor at %s: no state (%s)", self.root, why)
        self.document, self.error = None, why


def _resolve_secret(value: Any) -> Any:
    """LiteLLM's `os.environ/NAME` spelling, where the Router has not resolved it already."""
    if isinstance(value, str) and value.startswith("os.environ/"):
        return os.environ.get(value.removeprefix("os.environ/"))
    return value


def daemon_root(api_base: str) -> str | None:
    """The daemon's own URL from a deployment's api_base: `http://h:8080/v1` -> `http://h:8080`."""
    try:
        url = URL(api_base.strip())
    except (ValueError, TypeError):
        return None
    if url.scheme not in ("http", "https") or not url.host:
        return None
    path = url.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return str(url.with_path(path or "/").with_query(None).with_fragment(None)).rstrip("/")


def served_names(litellm_params: dict[str, Any]) -> list[str]:
    """The names a deployment may ask its daemon for, most likely first: `openai/qwen` -> ["qwen", "openai/qwen"]."""
    model = litellm_params.get("model")
    if not isinstance(model, str) or not model:
        return []
    provider = litellm_params.get("custom_llm_provider")
    if isinstance(provider, str) and provider and not model.startswith(provider + "/"):
        return [model]
    prefix, slash, rest = model.partition("/")
    return [rest, model] if slash and rest else [model]


def looks_like_status(document: Any) -> bool:
    """Whether a JSON value is a model-supervisor /status document."""
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        return False
    if not isinstance(document.get("gaming_mode"), bool):
        return False
    return all(isinstance(m, dict) and "state" in m and "route" in m for m in document["models"].values())


def resolve(document: dict[str, Any], names: list[str]) -> str | None:
    """The daemon's model for the first of these names that is a model or an alias there."""
    models = document["models"]
    for name in names:
        if name in models:
            return name
        for model, entry in models.items():
            if name in (entry.get("aliases") or []):
                return model
    return None


def rank(document: dict[str, Any], names: list[str]) -> tuple[int | None, str]:
    """How well this daemon can serve the model named by `names` now (a rank, None: not at all) and why.
    A model the daemon does not list is NO_OPINION: LiteLLM's choice stands."""
    model = resolve(document, names)
    if model is None:
        return NO_OPINION, "not a model of this daemon"
    entry = document["models"][model]
    route, state = entry.get("route"), entry.get("state")
    if entry.get("available_now") is True or route == "local":
        return NOW, f"{model} is {state}"
    if isinstance(entry.get("loadable"), bool):  # the daemon's own answer, as an X-Health-Check probe gets it
        if entry["loadable"]:
            return (LOADING, f"{model} is loading") if state == "loading" else (LOADABLE, f"{model} can load")
        why = entry.get("unavailable_reason") or f"{model} is {state}"
        if route == "cloud":
            return DAEMON_CLOUD, f"{why}: the daemon answers from its cloud fallback"
        return None, why
    # An older daemon without `loadable`: judged from route, state, gaming mode and memory.
    gaming = document.get("gaming_mode") is True and not entry.get("allow_in_gaming", False)
    usable = [d.get("usable_mb") for d in document.get("memory") or [] if isinstance(d, dict)]
    usable = [u for u in usable if isinstance(u, (int, float))]
    need = entry.get("vram_mb")
    fits = not usable or not isinstance(need, (int, float)) or need <= max(usable)
    # A failed model is retried by the next request once its backoff is nearly over: the daemon says so by
    # routing it "queued" again.
    healthy = state != "failed" or route == "queued"
    if route in ("queued", "cloud") and not gaming and fits and healthy:
        return (LOADING, f"{model} is loading") if state == "loading" else (LOADABLE, f"{model} can load")
    why = "gaming mode" if gaming else "does not fit" if not fits else f"{model} is {state}"
    if route == "cloud":
        return DAEMON_CLOUD, f"{why}: the daemon answers from its cloud fallback"
    return None, why


async def sse_events(content: aiohttp.StreamReader):
    """(event, data) pairs of a server-sent event stream."""
    buffer = bytearray()
    event, data = "message", []
    async for chunk in content.iter_any():
        buffer += chunk
        if len(buffer) > MAX_EVENT_BYTES:
            raise ValueError("an event larger than %d bytes" % MAX_EVENT_BYTES)
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end]).rstrip(b"\r").decode("utf-8", "replace")
            start = end + 1
            if not line:
                if data:
                    yield event, "\n".join(data)
                event, data = "message", []
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
        del buffer[:start]


class Routing:
    """Keeps, of a request's candidate deployments, the model-supervisor hosts that serve its model best now.
    LiteLLM's callback (`handler`) is this with LiteLLM's CustomLogger as a base; this alone is the same logic
    without LiteLLM imported (importing LiteLLM takes seconds)."""

    def __init__(self, first_wait_s: float = 1.0, connect_timeout_s: float = 3.0, read_timeout_s: float = 40.0,
                 backoff_s: tuple[float, float] = (0.25, 15.0), recheck_other_s: float = 300.0, **kwargs: Any):
        super().__init__(**kwargs)  # cooperative: CustomLogger's in the callback class, object's otherwise
        self.first_wait_s = first_wait_s  # a request that finds a host first seen this long ago waits for its state
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s  # the daemon sends a keep-alive every 15 s: silence longer is a loss
        self.backoff_s = backoff_s  # reconnect delay: first, most
        self.recheck_other_s = recheck_other_s  # a base that is not a daemon is looked at again after this long
        self.hosts: dict[str, Host] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------ LiteLLM's hook

    async def async_filter_deployments(self, model: str, healthy_deployments: list, messages: Any = None,
                                       request_kwargs: dict | None = None, parent_otel_span: Any = None) -> list:
        try:
            return await self.filter(model, healthy_deployments)
        except Exception:  # never take routing down: no opinion
            log.exception("model-supervisor routing failed; leaving the deployments unfiltered")
            return healthy_deployments

    async def filter(self, model_group: str, deployments: list[dict[str, Any]]) -> list[dict[str, Any]]:
        targets = [self._target(d) for d in deployments]
        roots = {t[0] for t in targets if t is not None}
        if not roots:
            return deployments
        await self._settle(roots)
        ranks: list[int | None] = []
        known: list[bool] = []
        reasons: list[str] = []
        for target in targets:
            host = None if target is None else self.hosts.get(target[0])
            if host is None or host.kind != "daemon" or host.document is None:
                known.append(False)
                ranks.append(None)
                reasons.append("left alone" if host is None or host.kind == "other" else f"no state ({host.error})")
                continue
            value, why = rank(host.document, target[1])
            known.append(value != NO_OPINION)
            ranks.append(value)
            reasons.append(why)
        if not any(known):
            return deployments
        best = min((r for r, k in zip(ranks, known, strict=True) if k and r is not None), default=None)
        kept = [d for d, r, k in zip(deployments, ranks, known, strict=True) if not k or (r is not None and r == best)]
        if len(kept) != len(deployments) and log.isEnabledFor(logging.INFO):
            decisions = [f"{_describe(d)}: {RANK_NAMES.get(r, r) if k else 'kept'} ({why})"
                         for d, r, k, why in zip(deployments, ranks, known, reasons, strict=True)]
            log.info("model-supervisor routing for %s keeps %d of %d: %s", model_group, len(kept), len(deployments),
                     "; ".join(decisions))
        return kept

    def _target(self, deployment: dict[str, Any]) -> tuple[str, list[str]] | None:
        """(daemon root, names of its model) of a deployment the callback may look at; None to leave it alone."""
        if not isinstance(deployment, dict):
            return None
        info = deployment.get("model_info") or {}
        if isinstance(info, dict) and info.get("model_supervisor") is False:
            return None
        params = deployment.get("litellm_params") or {}
        api_base = _resolve_secret(params.get("api_base"))
        if not isinstance(api_base, str) or not api_base:
            return None
        root = daemon_root(api_base)
        names = served_names(params)
        if root is None or not names:
            return None
        host = self.hosts.get(root)
        if host is None or host.task is None or host.task.done():
            self._watch(root)
        return root, names

    # ------------------------------------------------------------ watchers

    def _watch(self, root: str) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed() and self._loop.is_running():
                # Another loop owns the watchers (a second thread): start it there, read the state from here.
                self._loop.call_soon_threadsafe(self._watch_here, root)
                return
            self._loop, self._session = loop, None  # the old loop is gone, and its tasks with it
            self.hosts = {}
        self._watch_here(root)

    def _watch_here(self, root: str) -> None:
        host = self.hosts.get(root)
        if host is not None and host.task is not None and not host.task.done():
            return
        if host is None:
            host = self.hosts[root] = Host(root)
        # No credentials: /events is open on a daemon (the deployment's key is for its /v1, and a base that is
        # not a daemon gets nothing of ours).
        headers = {"Accept": "text/event-stream"}
        host.task = asyncio.get_running_loop().create_task(self._follow_forever(host, headers),
                                                           name=f"model-supervisor events {root}")

    async def _settle(self, roots: set[str]) -> None:
        """Wait, at most until first_wait_s after they were first seen, for hosts whose first look is pending."""
        if self._loop is not asyncio.get_running_loop():
            return
        now = time.monotonic()
        pending = [h for r in roots if (h := self.hosts.get(r)) is not None and not h.settled.is_set()
                   and now < h.created_at + self.first_wait_s]
        if not pending:
            return
        deadline = max(h.created_at for h in pending) + self.first_wait_s
        waits = [asyncio.ensure_future(h.settled.wait()) for h in pending]
        try:
            await asyncio.wait(waits, timeout=max(0.0, deadline - now))
        finally:
            for waiter in waits:
                waiter.cancel()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _follow_forever(self, host: Host, headers: dict[str, str]) -> None:
        first, most = self.backoff_s
        delay = first
        while True:
            outcome = await self._follow(host, headers)
            host.settled.set()
            if outcome == "other":
                await asyncio.sleep(self.recheck_other_s)
                delay = first
                continue
            if outcome == "connected":
                delay = first
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(most, delay * 2)

    async def _follow(self, host: Host, headers: dict[str, str]) -> str:
        """One connection to a root's /events: "other" (not a daemon), "connected" (documents came, then the
        stream ended), or "lost" (nothing came)."""
        timeout = aiohttp.ClientTimeout(total=None, connect=self.connect_timeout_s, sock_read=self.read_timeout_s)
        got = False
        try:
            async with self._http().get(host.root + "/events", headers=headers, timeout=timeout) as response:
                content_type = response.headers.get("Content-Type", "")
                if response.status != 200 or not content_type.startswith("text/event-stream"):
                    if response.status >= 500 and host.kind == "daemon":
                        host.forget(f"GET /events answered {response.status}")
                        return "lost"
                    return self._other(host, f"GET /events answered {response.status} {content_type}")
                async for event, data in sse_events(response.content):
                    if event != "status":
                        continue
                    document = json.loads(data)
                    if not looks_like_status(document):
                        return self._other(host, "its /events is not a model-supervisor status stream")
                    if host.kind != "daemon" or host.document is None:
                        log.info("model-supervisor at %s: following its /events", host.root)
                    host.kind, host.document, host.error = "daemon", document, None
                    host.received_at = time.monotonic()
                    host.settled.set()
                    got = True
            host.forget("its /events stream ended")
        except asyncio.CancelledError:
            host.forget("stopped")
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            host.forget(f"{type(exc).__name__}: {exc}".rstrip(": "))
        return "connected" if got else "lost"

    @staticmethod
    def _other(host: Host, why: str) -> str:
        if host.kind != "other":
            log.info("%s is not a model-supervisor daemon (%s): its deployments are left alone", host.root, why)
        host.kind, host.document, host.error = "other", None, why
        return "other"

    async def aclose(self) -> None:
        """Stop every watcher (for tests; LiteLLM keeps the callback for its lifetime)."""
        tasks = [h.task for h in self.hosts.values() if h.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self.hosts, self._session, self._loop = {}, None, None


def _describe(deployment: dict[str, Any]) -> str:
    params = deployment.get("litellm_params") or {}
    return f"{params.get('model')}@{params.get('api_base')}"


def __getattr__(name: str) -> Any:
    """`ModelSupervisorRouting` (Routing as a LiteLLM CustomLogger) and `handler` (the instance LiteLLM's config
    names) are made on first use: inside LiteLLM's proxy, LiteLLM is imported already; elsewhere importing this
    module stays cheap. Without LiteLLM installed they are plain Routing."""
    if name not in ("ModelSupervisorRouting", "handler"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from litellm.integrations.custom_logger import CustomLogger
    except ImportError:
        callback: type[Routing] = Routing
    else:
        callback = type("ModelSupervisorRouting", (Routing, CustomLogger), {"__module__": __name__})
    globals().update(ModelSupervisorRouting=callback, handler=callback())
    return globals()[name]

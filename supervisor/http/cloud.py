"""The cloud side: send a request to an OpenAI-compatible target, and tell a webhook when fallback starts.

Only the `model` field of the body is rewritten (to the target's model name); the API key comes from the
environment variable the target names and is sent as a bearer token, never logged or shown. Only a connection
that could not be established is tried again (tenacity): a request that may have reached the target is never sent
twice. The wait for the response head is bounded (`first_byte_timeout_s`); an error the cloud answers with is
passed to the client as it came.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from ..config import CloudConfig, Config
from ..records import ResponseTail
from .errors import NOT_FORWARDED_UP, ApiError, stream_through

log = structlog.get_logger("supervisor.fallback")

NOTIFY_EVERY_S = 60.0
# Only these prove the request never left: the TCP/TLS connection itself was not established.
RETRY_ON = (aiohttp.ClientConnectorError,)
BETWEEN_CHUNKS_S = 300  # a stream that stops for this long is cut


class CloudClient:
    def __init__(self, config: Callable[[], Config], http: aiohttp.ClientSession):
        self._config = config  # a reload replaces the config: always read the live one
        self.http = http
        self._last_notified: dict[str, float] = {}
        self._sending: set[asyncio.Task[None]] = set()

    @property
    def config(self) -> Config:
        return self._config()

    def target(self, name: str) -> CloudConfig | None:
        return self.config.cloud.get(name)

    async def forward(self, request: web.Request, body: bytes, target_name: str, model: str | None,
                      reason: str, tail: ResponseTail | None = None) -> web.StreamResponse:
        """Send the request to the cloud target; model is the local model it stands in for (None: asked directly)."""
        target = self.config.cloud[target_name]
        payload = json.loads(body)
        payload["model"] = target.model
        # /v1/chat/completions -> {base_url}/chat/completions: base_url already ends at the API root.
        suffix = request.path.removeprefix("/v1")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED_UP}
        headers["Content-Type"] = "application/json"
        key = os.environ.get(target.api_key_env, "") if target.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        log.info("cloud_request", model=model, target=target_name, reason=reason)
        if model is not None:
            self._notify_fallback(model, target_name, reason)
        upstream = await self._open(target_name, target.base_url + suffix, json.dumps(payload).encode(), headers,
                                    target.first_byte_timeout_s)
        extra = {"X-Served-By": "cloud", "X-Fallback-Reason": reason}
        return await stream_through(request, upstream, extra, label=f"cloud target {target_name!r}", tail=tail)

    async def _open(self, name: str, url: str, data: bytes, headers: dict[str, str],
                    first_byte_s: float) -> aiohttp.ClientResponse:
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(RETRY_ON),
                stop=stop_after_attempt(3),
                wait=wait_exponential(multiplier=0.1, max=1),
                reraise=True,
            ):
                with attempt:
                    return await asyncio.wait_for(self.http.post(
                        url, data=data, headers=headers,
                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=BETWEEN_CHUNKS_S),
                    ), first_byte_s)  # fmt: skip
        except TimeoutError:
            raise ApiError(504, "cloud_timeout", f"cloud target {name!r} sent no answer within {first_byte_s:g} s "
                                                 "(first_byte_timeout_s)") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ApiError(502, "cloud_unreachable", f"cloud target {name!r} did not answer: {type(exc).__name__}") from None
        raise AssertionError("unreachable")  # AsyncRetrying either returns or raises

    def _notify_fallback(self, model: str, target: str, reason: str) -> None:
        """Tell [daemon] notify_url that fallback fires for this model, at most once a minute per model."""
        url = self.config.daemon.notify_url
        now = time.monotonic()
        if not url or now - self._last_notified.get(model, -NOTIFY_EVERY_S) < NOTIFY_EVERY_S:
            return
        self._last_notified[model] = now
        event = {"event": "fallback_started", "model": model, "target": target, "reason": reason, "time": time.time()}
        task = asyncio.ensure_future(self._post(url, event))  # fire and forget: _post logs its own failures
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _post(self, url: str, event: dict[str, Any]) -> None:
        try:
            async with self.http.post(url, json=event, timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status >= 400:
                    log.warning("notify_failed", url=url, status=response.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("notify_failed", url=url, error=type(exc).__name__)


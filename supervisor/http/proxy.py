"""The request path: read the model name, get a ticket from the scheduler, pass bytes through untouched.

Response bodies are never parsed or re-encoded: chunks are written to the client as they arrive, so SSE streams
stay unbuffered. The upstream connection pool is shared. When the client goes away the handler is cancelled,
which closes the upstream request (llama-server then stops generating) and returns the ticket.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import Callable

import aiohttp
import structlog
import yarl
from aiohttp import web

from ..config import Config
from ..records import RequestObserver, RequestRecord, ResponseTail
from ..runtime import Runtime, Ticket
from ..scheduler import probe
from .cloud import CloudClient
from .upstream import UpstreamPool, UpstreamUnreachable, relay
from .errors import (NOT_FORWARDED_UP, ApiError, ClientGone, error_response, parse_json, read_body,
                     stream_through)

log = structlog.get_logger("supervisor.proxy")

# Failures that mean "the pooled connection was already closed": nothing reached llama-server's handler.
STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
# A connection to a child that was just killed fails a few ms before the runtime sees the exit: wait this long
# for it before deciding the child lives on. And resend at most this often (each waits for a restart).
EXIT_NOTICE_S = 1.0
MAX_RESENDS = 2
# A request that fails on a stale pooled connection is sent this many times in all (the retry gets a fresh one).
STALE_ATTEMPTS = 2
# Built once: the request path runs per request, and upstream requests have no total bound (streams run long).
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)



TRUE_VALUES, FALSE_VALUES = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


def flag_header(request: web.Request, name: str) -> bool:
    """A true/false request header; anything else is the client's mistake, answered with 400."""
    value = request.headers.get(name, "").strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ApiError(400, "invalid_header", f"header {name} must be true or false")


MAX_WAIT_HEADER = "X-Max-Wait-Ms"
MAX_WAIT_LIMIT_MS = 3_600_000


def wait_header(request: web.Request) -> float | None:
    """X-Max-Wait-Ms: how long this request may wait for its model, in seconds; None when not given."""
    raw = request.headers.get(MAX_WAIT_HEADER)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_WAIT_LIMIT_MS:
        raise ApiError(400, "invalid_header", f"header {MAX_WAIT_HEADER} must be a whole number of milliseconds "
                                              f"from 0 to {MAX_WAIT_LIMIT_MS}")
    return value / 1000


@functools.lru_cache(maxsize=512)
def encoded_path(path: str) -> str:
    """A decoded path as a request line needs it, percent-encoded (the same few paths come again and again)."""
    return yarl.URL.build(path=path).raw_path


def unknown_model_error(config: Config, name: str) -> ApiError:
    known = ", ".join(sorted(config.models)) or "none"
    return ApiError(404, "model_not_found", f"model {name!r} does not exist (models: {known})")


class Proxy:
    def __init__(self, runtime: Runtime, http: aiohttp.ClientSession, cloud: CloudClient):
        self.runtime = runtime
        self.http = http
        self.cloud = cloud
        self.observers: list[RequestObserver] = []  # told about every request that named a model
        self.probe_observers: list[Callable[[str, bool], None]] = []  # told about every X-Health-Check probe
        self.pool = UpstreamPool()  # kept-alive connections of the lean client (POSTs)

    @property
    def config(self) -> Config:
        return self.runtime.config  # the live config: a reload replaces it

    async def openai(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, /v1/messages, ..., and any
        other POST whose JSON body names a model: routed to that model, the path passed through."""
        body = await read_body(request, self.config.daemon.body_timeout_s)
        payload = parse_json(body)
        if not isinstance(payload, dict):
            raise ApiError(400, "invalid_request", "request body must be a JSON object")
        name = payload.get("model")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "missing_model", "request body needs a string 'model' naming a model or alias")
        local_only, force = flag_header(request, "X-Local-Only"), flag_header(request, "X-Force-Big")
        # Only OpenAI's own API has a cloud equivalent; llama-server's extras (/tokenize, /infill...) stay local.
        local_only = local_only or not request.path.startswith("/v1/")
        model = self.config.resolve(name)
        if flag_header(request, "X-Health-Check"):
            return self._probe(request, name, model, payload)
        if model is None:
            if name in self.config.cloud and not local_only:  # asked for the cloud target itself
                report = _Report(self, request, name, name)
                return await report.cloud(self.cloud.forward(request, body, name, None, "requested", report.tail),
                                          name, "requested")  # fmt: skip
            raise unknown_model_error(self.config, name)
        return await self._serve(request, name, model, request.path, body, local_only, force)

    def _probe(self, request: web.Request, name: str, model: str | None, payload: dict) -> web.StreamResponse:
        """X-Health-Check: true. Answers at once from the scheduler's state: loads nothing, queues nothing, writes
        no ledger row (a router's health check must never swap the GPU)."""
        if model is None:
            if name not in self.config.cloud:
                raise unknown_model_error(self.config, name)
            ok, code, reason = True, "cloud", f"{name!r} is a cloud target"
        else:
            ok, code, reason = probe(self.runtime.core, model, self.runtime.now())
        for observer in list(self.probe_observers):
            observer(model or name, ok)
        if not ok:
            state = self.runtime.core.models[model].phase.value if model is not None else "cloud"
            raise ApiError(503, code, reason, retry_after_s=30 if code == "gaming_mode" else 5,
                           extra={"model": name, "state": state})
        return probe_answer(request.path, name, bool(payload.get("stream")), code)

    async def upstream(self, request: web.Request) -> web.StreamResponse:
        """ANY /upstream/{model}/{path}: raw pass-through to that model's server (loading it), WebSockets too."""
        name = request.match_info["model"]
        model = self.config.resolve(name)
        if model is None:
            raise unknown_model_error(self.config, name)
        return await self.pass_through(request, name, model, "/" + request.match_info["path"])

    def prefixed(self, path: str) -> str | None:
        """The model whose route_prefixes claim this path (for clients that cannot be pointed at /upstream/)."""
        for name, spec in self.config.models.items():
            if any(path.startswith(prefix) for prefix in spec.route_prefixes):
                return name
        return None

    async def pass_through(self, request: web.Request, name: str, model: str, path: str) -> web.StreamResponse:
        # Raw paths mean nothing to a cloud target: this is local only.
        force = flag_header(request, "X-Force-Big")
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request, model, path, force)
        body = await read_body(request, self.config.daemon.body_timeout_s)
        return await self._serve(request, name, model, path, body, True, force)

    async def _websocket(self, request: web.Request, model: str, path: str, force: bool) -> web.StreamResponse:
        """Relay a WebSocket (ComfyUI's UI and progress use one) to the model's server. The model is loaded for it,
        but an open socket does not hold the model: a swap or unload closes it, as it would a stream."""
        ticket = await self.runtime.acquire(model, local_only=True, force=force)
        try:
            assert ticket.upstream is not None
            url = yarl.URL(ticket.upstream.base_url.replace("http", "ws", 1) + path).with_query(request.query)
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in NOT_FORWARDED_UP and not k.lower().startswith("sec-websocket")}
            protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
            try:
                upstream = await self.http.ws_connect(url, headers=headers, protocols=protocols, autoping=False)
            except (aiohttp.ClientError, OSError) as exc:
                raise ApiError(502, "upstream_unreachable", f"model {model!r} refused the WebSocket: {exc}") from None
        finally:
            self.runtime.release(ticket)
        client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (), autoping=False)
        await client.prepare(request)

        async def relay(source, sink) -> None:
            async for message in source:
                if message.type in (aiohttp.WSMsgType.TEXT,):
                    await sink.send_str(message.data)
                elif message.type is aiohttp.WSMsgType.BINARY:
                    await sink.send_bytes(message.data)
                elif message.type is aiohttp.WSMsgType.PING:
                    await sink.ping(message.data)
                elif message.type is aiohttp.WSMsgType.PONG:
                    await sink.pong(message.data)
                else:
                    break

        relays = [asyncio.ensure_future(relay(client, upstream)), asyncio.ensure_future(relay(upstream, client))]
        try:
            await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in relays:
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)
            await upstream.close()
            await client.close()
        return client

    async def _serve(self, request: web.Request, requested: str, model: str, path: str, body: bytes,
                     local_only: bool, force: bool) -> web.StreamResponse:
        report = _Report(self, request, requested, model)
        loop = asyncio.get_running_loop()
        max_wait_s = wait_header(request)
        deadline = loop.time() + (self.config.daemon.queue_timeout_s if max_wait_s is None else max_wait_s)
        resends = 0
        while True:
            try:
                wait_s = max_wait_s if not resends else max(0.0, deadline - loop.time())
                ticket = await self.runtime.acquire(model, local_only=local_only, force=force, wait_s=wait_s)
            except ApiError as refused:
                report.done("rejected", "local", refused.status, None)
                raise
            except asyncio.CancelledError:
                report.done("rejected", "local", 499, None)
                raise
            report.waited()
            if ticket.upstream is None:
                reason, target = ticket.reason or "unavailable", ticket.target or ""
                forwarding = self.cloud.forward(request, body, target, model, reason, report.tail)
                return await report.cloud(forwarding, target, reason)
            try:
                try:
                    if request.method == "POST" and ticket.upstream.base_url.startswith("http://"):
                        return await self._relay(request, ticket, path, body, report)
                    upstream = await self._open(request, ticket, path, body)
                except UpstreamUnreachable as failure:
                    # Refused or reset before any response byte. If its child has just died, no live server can
                    # have read it: wait for the restart and send it there. If the child lives on, it may have.
                    if resends < MAX_RESENDS and await self.runtime.upstream_gone(ticket, EXIT_NOTICE_S):
                        resends += 1
                        log.info("resend_after_child_exit", model=model, error=str(failure))
                        continue  # the ticket is released below; the next one waits for the restart
                    report.done("local", "local", 502, None)
                    message = f"model {ticket.model!r} did not answer: {failure}"
                    return error_response(ApiError(502, "upstream_unreachable", message))
                label = f"model {ticket.model!r}"
                response = await stream_through(request, upstream, {"X-Served-By": "local"}, label, report.tail)
                report.done("local", "local", response.status, None)
                return response
            except asyncio.CancelledError:
                report.done("local", "local", 499, None)  # the client went away: its request ends here
                raise
            except ClientGone as gone:
                report.done("local", "local", 499, None)
                log.info("client_gone", model=model, during="answer", error=str(gone))
                return gone.response
            finally:
                self.runtime.release(ticket)

    async def _relay(self, request: web.Request, ticket: Ticket, path: str, body: bytes,
                     report: _Report) -> web.StreamResponse:
        """A POST (every inference request) on the lean client: see upstream.py."""
        assert ticket.upstream is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED_UP]
        # The request line needs the raw (still percent-encoded) path and query: request.path and match_info are
        # decoded (a space or a non-ASCII letter would break the line).
        raw_path = encoded_path(path)
        query = request.rel_url.raw_query_string
        target = f"{raw_path}?{query}" if query else raw_path
        answer = await self.pool.post(ticket.upstream.base_url, target, headers, body)
        try:
            response = await relay(request, answer, {"X-Served-By": "local"}, f"model {ticket.model!r}", report.tail)
        finally:
            self.pool.release(answer)
        report.done("local", "local", response.status, None)
        return response

    async def _open(self, request: web.Request, ticket: Ticket, path: str, body: bytes) -> aiohttp.ClientResponse:
        """Send the request to the ticket's upstream; its response once the head is in. Raises UpstreamUnreachable
        when no response byte came back (connection refused, reset or closed)."""
        assert ticket.upstream is not None
        url = ticket.upstream.base_url + path
        headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED_UP}
        params, data = request.query or None, body or None
        # llama-server may close a pooled keep-alive connection after a stream: a request that fails on such a
        # connection before anything came back is sent again, once, on a fresh one. (A plain loop: tenacity's
        # per-call setup was about a third of this function's CPU, per request.)
        for attempt in range(1, STALE_ATTEMPTS + 1):
            try:
                return await self.http.request(request.method, url, params=params, data=data, headers=headers,
                                               timeout=UPSTREAM_TIMEOUT)
            except STALE_CONNECTION as exc:
                if attempt < STALE_ATTEMPTS:
                    continue
                raise UpstreamUnreachable(str(exc) or type(exc).__name__) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise UpstreamUnreachable(str(exc) or type(exc).__name__) from None
        raise AssertionError("unreachable")  # the last attempt returns or raises


class _Report:
    """Times one request and tells the proxy's observers how it went, once."""

    def __init__(self, proxy: Proxy, request: web.Request, requested: str, model: str):
        self.proxy, self.request, self.requested, self.model = proxy, request, requested, model
        self.started_at = time.time()
        self.arrived = time.monotonic()
        self.wait_ms = 0.0
        self.tail = ResponseTail()
        self.sent = False

    def waited(self) -> None:
        self.wait_ms = (time.monotonic() - self.arrived) * 1000

    async def cloud(self, forwarding, target: str, reason: str) -> web.StreamResponse:
        try:
            response = await forwarding
        except ClientGone as gone:
            self.done("cloud", target, 499, reason)
            log.info("client_gone", model=self.model, during="answer", error=str(gone))
            return gone.response
        except ApiError as error:
            self.done("cloud", target, error.status, reason)
            raise
        except asyncio.CancelledError:
            self.done("cloud", target, 499, reason)
            raise
        self.done("cloud", target, response.status, reason)
        return response

    def done(self, route: str, provider: str, status: int, reason: str | None) -> None:
        if self.sent or not self.proxy.observers:
            return
        self.sent = True
        now = time.monotonic()
        tokens_in, tokens_out = self.tail.tokens() if route != "rejected" else (None, None)
        first = self.tail.first_byte_at
        record = RequestRecord(
            started_at=self.started_at, requested=self.requested, model=self.model, provider=provider, route=route,
            endpoint=self.request.path, status=status, fallback_reason=reason, tokens_in=tokens_in,
            tokens_out=tokens_out, wait_ms=round(self.wait_ms if route != "rejected" else (now - self.arrived) * 1000, 3),
            ttft_ms=None if first is None else round((first - self.arrived) * 1000, 3),
            total_ms=round((now - self.arrived) * 1000, 3),
        )  # fmt: skip
        for observer in list(self.proxy.observers):
            try:
                observer(record)
            except Exception:  # the ledger or metrics failing must not fail the request
                log.exception("request_observer_failed")


def probe_answer(path: str, model: str, stream: bool, code: str) -> web.StreamResponse:
    """The smallest valid answer of the endpoint a probe was sent to, so a router's health check parses it."""
    created, ident = int(time.time()), f"health-{uuid.uuid4().hex[:12]}"
    headers = {"X-Served-By": "health-check", "X-Health-Check": code}
    if path.endswith("/embeddings"):
        body: dict = {"object": "list", "model": model, "data": [{"object": "embedding", "index": 0, "embedding": [0.0]}],
                      "usage": {"prompt_tokens": 0, "total_tokens": 0}}
    elif path.endswith("/chat/completions"):
        if stream:
            chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]}
            text = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
            return web.Response(text=text, content_type="text/event-stream", headers=headers)
        body = {"id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    elif path.endswith("/completions"):
        body = {"id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    elif path.endswith("/responses"):
        body = {"id": ident, "object": "response", "created_at": created, "model": model, "status": "completed",
                "output": [], "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}}
    elif path.endswith("/messages"):
        body = {"id": ident, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": "end_turn", "usage": {"input_tokens": 0, "output_tokens": 0}}
    else:
        body = {"model": model, "status": "ok"}
    return web.json_response(body, headers=headers)
